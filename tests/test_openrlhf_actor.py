"""Actor side of the OpenRLHF adapter: AAPA terms inside OpenRLHF's own training step, on a tiny Qwen3 (CPU).

The expected gradients are built independently of the adapter: OpenRLHF's stock ActorPPOTrainer for the host
loss, and a hand-tokenised prompt + expert + EOS forward for the expert terms.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from openrlhf.models import Actor, PolicyLoss
from openrlhf.trainer.ppo_utils.experience import Experience
from openrlhf.trainer.ppo_utils.replay_buffer import NaiveReplayBuffer
from openrlhf.trainer.ray.ppo_actor import ActorPPOTrainer
from test_openrlhf_driver import TOKENIZER, rollout_sample

from aapa_rl.local.task import expert_for, prompt_for, tiny_qwen3
from aapa_rl.objectives import phi_weight, token_log_probs
from aapa_rl.openrlhf_adapter.ppo_actor import AapaActorPPOTrainer
from aapa_rl.schedule import Stage
from aapa_rl.settings import AapaSettings

torch.set_num_threads(1)
ns = SimpleNamespace
PROMPTS = [(12, "+", 34), (57, "-", 18), (23, "*", 4), (45, "+", 45)]


class FakeStrategy:
    """The DeepspeedStrategy calls the actor update makes, for a plain torch module on one CPU process."""

    ring_attn_group = None

    def __init__(self, args, gas: int = 1):
        self.args, self.accumulated_gradient = args, gas
        self.backward_calls = self.optimizer_steps = 0

    def backward(self, loss, model, optimizer, **kwargs):
        self.backward_calls += 1
        (loss / self.accumulated_gradient).backward()  # DeepSpeed scales each micro-step by 1/gas

    def optimizer_step(self, optimizer, model, scheduler, name="model", **kwargs):
        self.optimizer_steps += 1  # gradients are left in place so the test can read the accumulated sum

    def get_grad_norm(self, model):
        return 0.0

    def all_reduce(self, data, op="mean"):
        return data

    def is_rank_0(self):
        return True


def make_trainer(objective: str, lam: float, mu: float = 0.0, gas: int = 1, temperature: float = 0.7):
    args = ns(
        actor=ns(eps_clip_low_high=(0.2, 0.28), dual_clip=None, loss_agg_mode="token-mean",
                 policy_loss_type="ppo", entropy_coef=None, aux_loss_coef=0.0),
        algo=ns(kl=ns(use_loss=True, init_coef=0.01, estimator="k3", unbiased_gradient=False)),
        train=ns(dynamic_batch_enable=False, max_epochs=1),
        ds=ns(packing_samples=False, tensor_parallel_size=1),
        data=ns(max_len=256), aapa=AapaSettings(stages=[Stage(1, "grpo")]),
    )
    actor = Actor(tiny_qwen3(len(TOKENIZER), seed=0), temperature=temperature)
    actor.packing_samples = False  # Actor(nn.Module) leaves it unset
    trainer = AapaActorPPOTrainer.__new__(AapaActorPPOTrainer)
    trainer.__dict__.update(
        strategy=FakeStrategy(args, gas), args=args, actor=actor, tokenizer=TOKENIZER, ema_model=None,
        actor_optim=None, actor_scheduler=ns(get_last_lr=lambda: [1e-6]), aux_loss=False, max_epochs=1,
        dataloader_pin_memory=False, replay_buffer=None,
        actor_loss_fn=PolicyLoss(clip_eps_low=0.2, clip_eps_high=0.28),
        aapa_state={"step": 3, "objective": objective, "lam": lam, "mu": mu},
    )
    return trainer


def stock_copy(trainer) -> ActorPPOTrainer:
    """OpenRLHF's unmodified ActorPPOTrainer on the same module, with its own fake strategy."""
    stock = ActorPPOTrainer.__new__(ActorPPOTrainer)
    stock.__dict__.update(trainer.__dict__)
    stock.strategy = FakeStrategy(trainer.args, trainer.strategy.accumulated_gradient)
    return stock


def training_samples(marks: dict[int, tuple[float, float]], n: int = 4) -> list[Experience]:
    """n single-sample experiences ready for the actor: rollout of prompt i%4 (a wrong answer), with
    info aapa_w / aapa_sft from `marks` {sample: (anchor weight, sft flag)}."""
    gen = torch.Generator().manual_seed(1)
    out = []
    for i in range(n):
        a, op, b = PROMPTS[i % len(PROMPTS)]
        exp = rollout_sample(prompt_for(a, op, b), f"{a}{op}{b} is {i}", 1.0,
                             {"answer": "7", "expert": expert_for(a, op, b)})
        width = exp.action_mask.shape[1]
        exp.action_log_probs = -torch.rand(1, width, generator=gen) * exp.action_mask
        exp.base_action_log_probs = exp.action_log_probs - 0.1 * torch.rand(1, width, generator=gen)
        exp.advantages = torch.randn(1, 1, generator=gen).expand(1, width) * exp.action_mask
        weight, sft = marks.get(i, (0.0, 0.0))
        exp.info.update(aapa_w=torch.tensor([weight]), aapa_sft=torch.tensor([sft]))
        out.append(exp)
    return out


def batch(samples: list[Experience]) -> Experience:
    return Experience.concat_experiences(samples, TOKENIZER.pad_token_id)


def expert_terms(model, samples, marks, phi_sft: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_anchor, L_sft) computed by hand at temperature 1: token means of (weighted) expert NLL."""
    anchor_num = anchor_den = sft_num = sft_den = 0
    for i, (weight, sft) in marks.items():
        prompt = samples[i].prompts[0]
        p = TOKENIZER(prompt, add_special_tokens=False).input_ids
        e = TOKENIZER(samples[i].labels[0]["expert"], add_special_tokens=False).input_ids
        e = e + [TOKENIZER.eos_token_id]
        seq = torch.tensor([p + e])
        logp = token_log_probs(model(seq).logits[:, :-1], seq[:, 1:])[0, len(p) - 1 :]
        if weight > 0:
            anchor_num, anchor_den = anchor_num + weight * -logp.sum(), anchor_den + len(e)
        if sft > 0:
            sft_nll = -logp * phi_weight(logp) if phi_sft else -logp
            sft_num, sft_den = sft_num + sft_nll.sum(), sft_den + len(e)
    zero = torch.zeros(())
    return (anchor_num / anchor_den if anchor_den else zero, sft_num / sft_den if sft_den else zero)


def grads(model) -> torch.Tensor:
    return torch.cat([torch.zeros(p.numel()) if p.grad is None else p.grad.flatten()
                      for p in model.parameters()])


@pytest.mark.parametrize("objective, mu", [("grpo", 0.0), ("sft", 0.0), ("chord", 0.3)])
def test_training_step_adds_expert_terms_through_one_backward(objective, mu):
    lam, marks = 0.7, {0: (1.5, 1.0), 2: (0.0, 1.0), 3: (0.5, 0.0)}
    trainer = make_trainer(objective, lam, mu)
    model = trainer.actor.model
    samples = training_samples(marks)

    model.zero_grad()
    stock = stock_copy(trainer)
    stock.training_step(batch(copy.deepcopy(samples)), 0.01, 0)
    host = grads(model)
    model.zero_grad()
    anchor, sft = expert_terms(model, samples, marks, phi_sft=objective == "chord")
    anchor.backward(retain_graph=True)
    g_anchor = grads(model)
    model.zero_grad()
    sft.backward()
    g_sft = grads(model)

    model.zero_grad()
    status = trainer.training_step(batch(copy.deepcopy(samples)), 0.01, 0)
    total = grads(model)
    host_coef = 1 - mu if objective == "chord" else 1.0
    sft_coef = {"grpo": 0.0, "sft": 1.0, "chord": mu}[objective]
    expected = host_coef * host + sft_coef * g_sft + lam * g_anchor
    assert (total - expected).abs().max().item() < 1e-6
    assert g_anchor.abs().max() > 1e-3 and g_sft.abs().max() > 1e-3  # the terms are not trivially zero
    assert trainer.strategy.backward_calls == 1 and trainer.strategy.optimizer_steps == 1
    assert trainer.actor.temperature == 0.7 and "backward" not in vars(trainer.strategy)
    m = status["metrics"]
    assert m["aapa/anchor_nll_sum"] / m["aapa/anchor_tokens"] == pytest.approx(anchor.item(), rel=1e-5)
    stock_status = stock.training_step(batch(copy.deepcopy(samples)), 0.01, 0)
    assert m["policy_loss"].item() == pytest.approx(stock_status["metrics"]["policy_loss"].item(), abs=1e-6)
    assert "aapa_w" not in m and all(status["weights"][k] == "sample" for k in m if k.startswith("aapa/"))


def test_micro_step_without_anchor_runs_a_dummy_forward_and_stays_finite():
    trainer = make_trainer("grpo", lam=2.0)
    model = trainer.actor.model
    samples = training_samples({})  # lam > 0 but nothing marked on this rank
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    model.zero_grad()
    status = trainer.training_step(batch(samples), 0.01, 0)
    assert len(calls) == 2  # the policy forward and the 1-token dummy expert forward (ZeRO-3 lockstep)
    assert torch.isfinite(grads(model)).all() and grads(model).abs().max() > 0
    assert status["metrics"]["aapa/anchor_tokens"] == 0 and status["metrics"]["aapa/anchor_nll_sum"] == 0

    idle = make_trainer("grpo", lam=0.0)  # no expert term at all: OpenRLHF's step unchanged, one forward
    calls.clear()
    idle.actor.model.register_forward_hook(lambda *a: calls.append(1))
    idle.training_step(batch(training_samples({0: (1.0, 0.0)})), 0.01, 0)
    assert len(calls) == 1


def test_ppo_train_normalises_anchors_over_the_optimizer_step(monkeypatch):
    """4 micro-batches in one optimizer step (gas 4): anchors sit in two of them; the anchor term is the token
    mean over all of the step's anchor tokens, with one backward and one optimizer step per micro-batch."""
    lam, marks = 0.7, {0: (1.0, 0.0), 5: (2.0, 0.0), 6: (0.5, 0.0)}
    trainer = make_trainer("grpo", lam, gas=4)
    model = trainer.actor.model
    samples = training_samples(marks, n=8)

    def filled_buffer():
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)  # constructing the buffer names a device
        buffer = NaiveReplayBuffer(sample_batch_size=2, cpu_offload=True)
        for exp in copy.deepcopy(samples):
            buffer.append(batch([exp]))
        monkeypatch.setattr(torch.cuda, "current_device", lambda: "cpu")  # ppo_train moves batches there
        return buffer

    stock = stock_copy(trainer)
    stock.replay_buffer = filled_buffer()
    model.zero_grad()
    stock.ppo_train(0.01)
    host = grads(model)
    model.zero_grad()
    anchor, _ = expert_terms(model, samples, marks, phi_sft=False)
    anchor.backward()
    g_anchor = grads(model)

    trainer.replay_buffer = filled_buffer()
    model.zero_grad()
    status = trainer.ppo_train(0.01)
    assert trainer.strategy.backward_calls == 4 and trainer.strategy.optimizer_steps == 4
    assert (grads(model) - (host + lam * g_anchor)).abs().max().item() < 1e-6
    logged = status["aapa/anchor_nll_sum"] / status["aapa/anchor_tokens"]
    assert logged == pytest.approx(anchor.item(), rel=1e-5)
    import openrlhf.trainer.ray.ppo_actor as ppo_actor
    from openrlhf.utils.loss_utils import iter_grad_accum_global_norm

    assert ppo_actor.iter_grad_accum_global_norm is iter_grad_accum_global_norm  # restored after the call


def weights_and_grads(model) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.cat([p.detach().flatten() for p in model.parameters()]).clone(), grads(model)


@pytest.mark.parametrize("broken", ["anchor term", "host policy loss"])
def test_a_non_finite_loss_stops_before_backward_and_leaves_the_weights(monkeypatch, broken):
    """A NaN anchor term (through lam * L_anchor) or host loss (NaN advantages, with no expert term at all)
    stops the micro-step before strategy.backward: no gradient, no optimizer step, the weights unchanged."""
    import aapa_rl.openrlhf_adapter.ppo_actor as adapter

    marks = {0: (1.0, 0.0)}
    trainer = make_trainer("grpo", lam=0.7 if broken == "anchor term" else 0.0)
    samples = training_samples(marks)
    if broken == "anchor term":
        monkeypatch.setattr(adapter, "anchor_loss", lambda *a, **k: torch.tensor(float("nan")))
    else:
        samples[2].advantages = samples[2].advantages * float("nan")
    model = trainer.actor.model
    model.zero_grad(set_to_none=False)
    before = weights_and_grads(model)
    with pytest.raises(FloatingPointError) as stopped:
        trainer.training_step(batch(samples), 0.01, 5)
    message = str(stopped.value)
    for part in ("non-finite loss at step 3, micro-batch 5", f"on some rank: {broken})",
                 "the last checkpoint is intact", "--ckpt.load_enable"):
        assert part in message, (part, message)
    assert trainer.strategy.backward_calls == 0 and trainer.strategy.optimizer_steps == 0
    after = weights_and_grads(model)
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
    assert "backward" not in vars(trainer.strategy)


def test_a_non_finite_loss_on_another_rank_stops_this_one_too():
    """Every rank max-reduces the flags of (total loss, host, SFT, anchor) before backward: a rank whose own
    loss is finite stops with the others, naming the term that broke there, instead of waiting for them in
    DeepSpeed's next collective."""
    trainer = make_trainer("sft", lam=0.7)
    reduced = []

    def all_reduce(flags, op="mean"):
        reduced.append((flags.clone(), op))
        return torch.maximum(flags, torch.tensor([1.0, 0.0, 1.0, 0.0]))  # the other rank: a NaN SFT term

    trainer.strategy.all_reduce = all_reduce
    model = trainer.actor.model
    model.zero_grad(set_to_none=False)
    with pytest.raises(FloatingPointError, match=r"micro-batch 0 \(non-finite on some rank: SFT term\)"):
        trainer.training_step(batch(training_samples({0: (1.0, 1.0)})), 0.01, 0)
    assert [(f.tolist(), op) for f, op in reduced] == [([0.0, 0.0, 0.0, 0.0], "max")]  # one, finite here
    assert trainer.strategy.backward_calls == 0 and not grads(model).any()
