"""Driver side of the OpenRLHF adapter on real openrlhf Experience objects (CPU, no Ray)."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from openrlhf.trainer.ppo_utils.experience import Experience
from openrlhf.trainer.ppo_utils.kl_controller import FixedKLController
from openrlhf.trainer.ppo_utils.length_penalty import apply_length_penalties
from openrlhf.trainer.ppo_utils.replay_buffer import NaiveReplayBuffer

from aapa_rl.anchor import build_discriminator, load_discriminator
from aapa_rl.local.task import char_tokenizer, expert_for, prompt_for
from aapa_rl.objectives import group_advantages, shaping_signal
from aapa_rl.openrlhf_adapter.ppo_actor import _per_sample
from aapa_rl.openrlhf_adapter.ppo_trainer import AapaExperienceMaker
from aapa_rl.openrlhf_adapter.scoring import build_critic
from aapa_rl.openrlhf_adapter.settings import split_argv
from aapa_rl.schedule import ScheduleValues
from reward_fns.combine import RewardError

TOKENIZER = char_tokenizer()
PROBLEMS = [(12, "+", 34), (57, "-", 18), (23, "*", 4), (45, "+", 45)]
GROUP = 4


def save_discriminator(directory, auroc: float = 0.9) -> str:
    """A real (cosine, hashing-encoder) discriminator directory with a training report."""
    build_discriminator("cosine", "hash", margin=0.3, tau=0.1).save(directory, {"heldout": {"auroc": auroc}})
    return str(directory)


def make_args(disc_dir: str, *, n: int = GROUP, estimator: str = "group_norm", aapa_flags=()):
    """OpenRLHF's nested arguments, as far as the experience maker reads them, with the AAPA section."""
    ns = SimpleNamespace
    stages = [{"end_step": 100, "objective": "grpo", "lam": 0.5, "alpha": 0.3, "rho": 0.5}]
    aapa, score_on, _ = split_argv(["--aapa.discriminator", disc_dir, "--aapa.stages", json.dumps(stages),
                                    "--aapa.score_on", "driver", *aapa_flags])
    return ns(
        rollout=ns(n_samples_per_prompt=n, micro_batch_size=3, max_new_tokens=64, batch_size=len(PROBLEMS)),
        train=ns(dynamic_batch_enable=False),
        algo=ns(advantage=ns(estimator=estimator, gamma=1.0, lambd=1.0, no_std_norm=False),
                kl=ns(use_loss=True)),
        reward=ns(clip_range=(-10, 10), overlong_buffer_len=None, stop_properly_penalty_coef=None,
                  remote_url=["reward_fns/math.py"], model_name_or_path=None),
        data=ns(max_len=256),
        ds=ns(ring_attn_size=1, tensor_parallel_size=1),
        actor=ns(num_nodes=1, num_gpus_per_node=1),
        aapa=aapa,
        aapa_score_on=score_on,
    )


def step_values(objective: str, *, lam: float, alpha: float, rho: float) -> ScheduleValues:
    return ScheduleValues(stage=0, stage_step=0, objective=objective, lam=lam, alpha=alpha, rho=rho, mu=0.0)


def rollout_sample(prompt: str, response: str, reward: float, label) -> Experience:
    """One sample as OpenRLHF's SamplesGenerator builds it: prompt + response tokens, action mask over T-1."""
    p = TOKENIZER(prompt, add_special_tokens=False).input_ids
    r = TOKENIZER(response, add_special_tokens=False).input_ids + [TOKENIZER.eos_token_id]
    seq = torch.tensor(p + r)
    action_mask = torch.zeros(len(seq) - 1, dtype=torch.bool)
    action_mask[len(p) - 1 :] = True
    return Experience(
        sequences=seq[None], attention_mask=torch.ones_like(seq)[None], action_mask=action_mask[None],
        prompts=[prompt], labels=[label], rewards=torch.tensor([reward]),
        response_length=torch.tensor([len(r)]),
        truncated=torch.tensor([False]), total_length=torch.tensor([float(len(seq))]),
        info={"reward": torch.tensor([reward])},
    )


def rollout_batch():
    """16 rollouts (4 prompts x 4): the expert itself, the expert with its answer repeated, a wrong answer,
    and noise. Returns (samples in rollout order, per-sample (prompt, response, reward, expert))."""
    rows = []
    for a, op, b in PROBLEMS:
        prompt, expert = prompt_for(a, op, b), expert_for(a, op, b)
        answer = {"+": a + b, "-": a - b, "*": a * b}[op]
        responses = [(expert, 1.0), (expert + f" \\boxed{{{answer}}}" * 3, 1.0),
                     (expert.replace(str(answer), str(answer + 1)), 0.0), ("zz qq", 0.0)]
        rows += [(prompt, response, reward, expert) for response, reward in responses]
    samples = [rollout_sample(p, r, w, {"answer": "x", "expert": e}) for p, r, w, e in rows]
    return samples, rows


def make_experiences(maker: AapaExperienceMaker) -> tuple[list[Experience], list[tuple]]:
    samples, rows = rollout_batch()
    experiences = maker.split_rollout_samples(samples)  # OpenRLHF's own micro-batching (sets `index`)
    gen = torch.Generator().manual_seed(0)
    for exp in experiences:
        exp.action_log_probs = -torch.rand(exp.action_mask.shape, generator=gen) * exp.action_mask
        exp.kl = torch.zeros(exp.action_mask.shape)
    return experiences, rows


def make_maker(args) -> AapaExperienceMaker:
    strategy = SimpleNamespace(args=args)
    return AapaExperienceMaker(None, None, None, None, FixedKLController(0.0), strategy, TOKENIZER)


def by_index(experiences, field):
    """A per-sample field of all micro-batches, in rollout order."""
    out = {}
    for exp in experiences:
        values = getattr(exp, field) if isinstance(field, str) else field(exp)
        for row, idx in enumerate(exp.index):
            out[idx] = values[row]
    return [out[i] for i in range(len(out))]


@pytest.fixture(scope="module")
def disc_dir(tmp_path_factory):
    return save_discriminator(tmp_path_factory.mktemp("disc"))


def expected_scores(disc_dir, rows) -> torch.Tensor:
    disc = load_discriminator(disc_dir)
    return disc.score([r[0] for r in rows], [r[1] for r in rows], [r[3] for r in rows])


def test_rewards_are_shaped_before_the_group_baseline(disc_dir):
    args = make_args(disc_dir)
    maker = make_maker(args)
    maker.values = step_values("grpo", lam=0.5, alpha=0.3, rho=0.5)
    experiences, rows = make_experiences(maker)
    assert len(experiences) == 6 and any(len(e.index) == 1 for e in experiences)  # groups span micro-batches

    maker.compute_advantages_and_returns(experiences)

    raw = torch.tensor([r[2] for r in rows])
    d = expected_scores(disc_dir, rows)
    shaped = raw + 0.3 * shaping_signal(d, "log", 1e-6)
    assert torch.allclose(torch.stack(by_index(experiences, "rewards")), shaped, atol=1e-5)
    assert torch.equal(torch.stack(by_index(experiences, lambda e: e.info["aapa/raw_reward"])), raw)
    # OpenRLHF's group_norm saw the shaped rewards: advantage of every token = normalised shaped reward.
    first_token_adv = torch.stack(by_index(experiences, lambda e: e.advantages[:, 0]))
    assert torch.allclose(first_token_adv, group_advantages(shaped, GROUP, "group_norm"), atol=1e-4)
    assert not torch.allclose(first_token_adv, group_advantages(raw, GROUP, "group_norm"), atol=1e-2)
    # D prefers each clean expert over its repeated-answer copy: shaping separates equal rewards.
    assert (d.view(-1, GROUP)[:, 0] > d.view(-1, GROUP)[:, 1]).all()


def test_a_group_of_equal_rewards_gets_zero_advantages_though_openrlhf_normalised_it(disc_dir):
    """OpenRLHF's group_norm divides by std + 1e-9 in float32: four groups of 8 equal rewards (values from a
    GRPO + shaping run, whose mean missed them by an ulp on an AVX-512 Xeon) and one mixed group. The adapter
    takes back the term OpenRLHF added to the equal groups and leaves the rewards it logs alone."""
    n, problems = 8, [*PROBLEMS, (31, "+", 9)]
    maker = make_maker(make_args(disc_dir, n=n))
    maker.values = step_values("grpo", lam=0.5, alpha=0.0, rho=0.5)  # alpha 0: these rewards as they are
    equal = [0.9305313229560852, 0.984295666217804, 0.9213687181472778, -6.907755374908447]
    rewards = [v for v in equal for _ in range(n)] + [1.0, 0.0] * (n // 2)
    rows = [(prompt_for(*p), expert_for(*p), expert_for(*p)) for p in problems for _ in range(n)]
    samples = [rollout_sample(p, r, w, {"answer": "x", "expert": e})
               for (p, r, e), w in zip(rows, rewards, strict=True)]
    experiences = maker.split_rollout_samples(samples)
    gen = torch.Generator().manual_seed(0)
    for exp in experiences:
        exp.action_log_probs = torch.zeros(exp.action_mask.shape)
        exp.kl = torch.rand(exp.action_mask.shape, generator=gen) * exp.action_mask
    maker.kl_ctl = FixedKLController(0.01)  # a per-token KL reward, which must stay in the returns
    kl_return = torch.stack(by_index(experiences, lambda e: -0.01 * (e.kl * e.action_mask).sum(-1)))

    maker.compute_advantages_and_returns(experiences)

    first_token_adv = torch.stack(by_index(experiences, lambda e: e.advantages[:, 0]))
    expected = torch.cat([torch.zeros(32), group_advantages(torch.tensor(rewards[32:]), n)]) + kl_return
    torch.testing.assert_close(first_token_adv, expected, atol=1e-5, rtol=0)
    returns = torch.stack(by_index(experiences, lambda e: e.info["return"]))
    torch.testing.assert_close(returns, expected, atol=1e-5, rtol=0)
    assert torch.equal(torch.stack(by_index(experiences, "rewards")), torch.tensor(rewards))


@pytest.mark.parametrize("penalty", ["stop_properly", "overlong"])
@pytest.mark.parametrize("objective", ["grpo", "sft"])
def test_length_penalties_act_once_on_the_task_reward_before_shaping(disc_dir, objective, penalty):
    """OpenRLHF's ProRL stop-properly and DAPO overlong penalties change the task reward r of
    r + alpha * g(D), once; an SFT stage's reward is alpha * g(D) alone. Scaling the shaped (negative) reward
    instead would raise a truncated rollout's reward toward 0. The logged shaped mean is the reward OpenRLHF
    optimises."""
    args = make_args(disc_dir, estimator="dr_grpo")
    if penalty == "stop_properly":
        args.reward.stop_properly_penalty_coef = 0.5
    else:
        args.reward.overlong_buffer_len, args.reward.overlong_penalty_factor = 40, 1.0
    maker = make_maker(args)
    maker.values = step_values(objective, lam=0.5, alpha=0.3, rho=0.5)
    (experiences, rows), (penalised, _) = make_experiences(maker), make_experiences(maker)
    for exp in experiences + penalised:  # each group's expert (reward 1) and noise rollout hit the limit
        exp.truncated = torch.tensor([int(i) % GROUP in (0, 3) for i in exp.index])
    apply_length_penalties(penalised, args)  # OpenRLHF's own penalties on the task rewards alone
    raw, penalised = torch.tensor([r[2] for r in rows]), torch.stack(by_index(penalised, "rewards"))
    assert not torch.allclose(penalised, raw)

    maker.compute_advantages_and_returns(experiences)

    task = torch.zeros_like(raw) if objective == "sft" else penalised
    shaped = task + 0.3 * shaping_signal(expected_scores(disc_dir, rows), "log", 1e-6)
    torch.testing.assert_close(torch.stack(by_index(experiences, "rewards")), shaped, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.stack(by_index(experiences, lambda e: e.info["reward"])), shaped,
                               atol=1e-5, rtol=0)
    first_token_adv = torch.stack(by_index(experiences, lambda e: e.advantages[:, 0]))
    torch.testing.assert_close(first_token_adv, group_advantages(shaped, GROUP, "dr_grpo"), atol=1e-5, rtol=0)
    assert maker.last_metrics["aapa/reward_shaped_mean"] == pytest.approx(shaped.mean().item(), abs=1e-5)
    logged_raw = torch.stack(by_index(experiences, lambda e: e.info["aapa/raw_reward"]))
    torch.testing.assert_close(logged_raw, raw if objective == "sft" else penalised)
    assert args.reward.stop_properly_penalty_coef == (0.5 if penalty == "stop_properly" else None)
    assert args.reward.overlong_buffer_len == (40 if penalty == "overlong" else None)


def test_hard_set_one_weight_per_sample_and_metrics(disc_dir):
    args = make_args(disc_dir, aapa_flags=["--aapa.temperature", "0.5"])
    maker = make_maker(args)
    maker.values = step_values("grpo", lam=0.5, alpha=0.3, rho=0.5)
    experiences, rows = make_experiences(maker)
    maker.compute_advantages_and_returns(experiences)

    for exp in experiences:  # one weight per sample in every micro-batch
        assert exp.info["aapa_w"].shape == (len(exp.index),) == exp.info["aapa_sft"].shape
    weights = torch.stack(by_index(experiences, lambda e: e.info["aapa_w"])).view(-1, GROUP)
    d = expected_scores(disc_dir, rows).view(-1, GROUP)
    gaps = d[:, 0].log() - d.log().mean(-1)  # the expert is rollout 0 here, so D(y*) = D(rollout 0)
    top = torch.topk(gaps, 2).indices  # rho 0.5 of 4 prompts
    assert (gaps[top] > 0).all()
    assert torch.count_nonzero(weights) == 2 and (weights[:, 1:] == 0).all()  # only each group's first sample
    expected = 2 * torch.softmax(gaps[top] / 0.5, 0)
    assert torch.allclose(weights[top, 0], expected, atol=1e-4)
    sft = torch.stack(by_index(experiences, lambda e: e.info["aapa_sft"]))
    assert torch.all(sft == 0)  # grpo: no SFT term
    m = maker.last_metrics
    for key in ("aapa/reward_raw_mean", "aapa/reward_shaped_mean", "aapa/shaping_mean", "aapa/shaping_std",
                "aapa/gap_mean", "aapa/gap_max", "aapa/hard_set_size", "aapa/lambda", "aapa/alpha",
                "aapa/stage", "aapa/d_rollout_mean", "aapa/d_expert_mean", "aapa/rollout_logp_mean"):
        assert math.isfinite(m[key]), key
    assert m["aapa/hard_set_size"] == 2 and m["aapa/lambda"] == 0.5
    assert m["aapa/gap_max"] == pytest.approx(gaps.max().item(), abs=1e-4)
    assert maker.last_scores["rollouts"].shape == (16,) and maker.last_scores["experts"].shape == (4,)


def test_every_expert_of_h_reaches_the_actor_even_when_its_softmax_weight_underflows(disc_dir):
    # The actor marks H by w > 0 (expert_batch, and L_anchor's denominator): at T = 1e-9 the second
    # member's softmax weight underflows, and must still be > 0.
    maker = make_maker(make_args(disc_dir, aapa_flags=["--aapa.temperature", "1e-9"]))
    maker.values = step_values("grpo", lam=0.5, alpha=0.3, rho=0.5)
    experiences, _ = make_experiences(maker)
    maker.compute_advantages_and_returns(experiences)
    weights = torch.stack(by_index(experiences, lambda e: e.info["aapa_w"]))
    assert maker.last_metrics["aapa/hard_set_size"] == 2
    assert torch.count_nonzero(weights) == 2 and weights.min() >= 0 and weights.max() == pytest.approx(2.0)


def test_sft_stage_shapes_zero_reward_with_group_mean_baseline(disc_dir):
    args = make_args(disc_dir)
    maker = make_maker(args)
    maker.values = step_values("sft", lam=1.0, alpha=0.3, rho=0.25)
    experiences, rows = make_experiences(maker)
    maker.compute_advantages_and_returns(experiences)

    s = shaping_signal(expected_scores(disc_dir, rows), "log", 1e-6)
    assert torch.allclose(torch.stack(by_index(experiences, "rewards")), 0.3 * s, atol=1e-5)
    first_token_adv = torch.stack(by_index(experiences, lambda e: e.advantages[:, 0]))
    assert torch.allclose(first_token_adv, group_advantages(0.3 * s, GROUP, "dr_grpo"), atol=1e-5)
    assert args.algo.advantage.estimator == "group_norm" and maker.advantage_estimator == "group_norm"
    sft = torch.stack(by_index(experiences, lambda e: e.info["aapa_sft"])).view(-1, GROUP)
    assert (sft[:, 0] == 1).all() and (sft[:, 1:] == 0).all()


def test_mixed_groups_and_missing_experts_are_errors(disc_dir):
    maker = make_maker(make_args(disc_dir))
    maker.values = step_values("grpo", lam=0.5, alpha=0.3, rho=0.5)
    samples, _ = rollout_batch()
    samples[1], samples[4] = samples[4], samples[1]  # a sample of prompt 1 inside the group of prompt 0
    experiences = maker.split_rollout_samples(samples)
    with pytest.raises(RuntimeError, match="group 0 mixes prompts"):
        maker.compute_advantages_and_returns(experiences)

    samples, _ = rollout_batch()
    for s in samples[:GROUP]:
        s.labels = [{"answer": "x"}]
    with pytest.raises(KeyError, match="1 of 4 prompts have no expert"):
        maker.compute_advantages_and_returns(make_experiences_from(maker, samples))

    skip = make_maker(make_args(disc_dir, aapa_flags=["--aapa.missing_expert", "skip"]))
    skip.values = maker.values
    experiences = make_experiences_from(skip, samples)
    skip.compute_advantages_and_returns(experiences)
    assert skip.last_metrics["aapa/missing_experts"] == 1
    weights = torch.stack(by_index(experiences, lambda e: e.info["aapa_w"])).view(-1, GROUP)
    assert (weights[0] == 0).all()  # a prompt without an expert is never anchored


@pytest.mark.parametrize("bad", [math.nan, -math.inf])
@pytest.mark.parametrize("remote_url, named", [(["my/reward.py", "http://rm:5000"], "my/reward.py,http://rm:5000"),
                                               (None, "my/reward-model")])
def test_a_non_finite_task_reward_stops_before_shaping_naming_the_reward_step_and_prompt(
        disc_dir, bad, remote_url, named):
    """OpenRLHF calls the --reward.remote_url file (or reward model) itself, past call_reward's check: the
    experience maker stops on a non-finite reward before it reaches the shaping, advantages and weights."""
    maker = make_maker(make_args(disc_dir))
    maker.args.reward.remote_url, maker.args.reward.model_name_or_path = remote_url, "my/reward-model"
    maker.values, maker.step = step_values("grpo", lam=0.5, alpha=0.3, rho=0.5), 7
    samples, rows = rollout_batch()
    for i in (6, 13):
        samples[i].rewards = torch.tensor([bad])
    experiences = make_experiences_from(maker, samples)
    maker._score = lambda *a: pytest.fail("scored a batch with a non-finite reward")
    with pytest.raises(RewardError) as stopped:
        maker.compute_advantages_and_returns(experiences)
    message = str(stopped.value)
    for part in (f"reward {named!r}: non-finite reward {bad} at step 7 for prompt {rows[6][0][:120]!r}",
                 "(2 of 16 rewards)", "--ckpt.load_enable"):
        assert part in message, (part, message)


def make_experiences_from(maker, samples):
    experiences = maker.split_rollout_samples(samples)
    for exp in experiences:
        exp.action_log_probs = torch.zeros(exp.action_mask.shape)
        exp.kl = torch.zeros(exp.action_mask.shape)
    return experiences


def test_replay_buffer_round_trip_keeps_weights_and_label_dicts(disc_dir, monkeypatch):
    maker = make_maker(make_args(disc_dir))
    maker.values = step_values("chord", lam=0.5, alpha=0.3, rho=0.5)
    experiences, rows = make_experiences(maker)
    maker.compute_advantages_and_returns(experiences)
    weights = by_index(experiences, lambda e: e.info["aapa_w"])
    sft = by_index(experiences, lambda e: e.info["aapa_sft"])
    sent = {(r[0], r[1]): (w.item(), s.item()) for r, w, s in zip(rows, weights, sft, strict=True)}

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)  # only to construct the buffer on CPU
    buffer = NaiveReplayBuffer(sample_batch_size=5, cpu_offload=True)
    for exp in experiences:
        buffer.append(exp)
    assert len(buffer) == 16
    received = {}
    for start in range(0, 16, 5):
        batch = buffer.collate_fn([buffer[i] for i in range(start, min(start + 5, 16))])
        weights = _per_sample(batch.info["aapa_w"], len(batch.sequences))
        sft = _per_sample(batch.info["aapa_sft"], len(batch.sequences))
        for row, label in enumerate(batch.labels):
            assert isinstance(label, dict) and label["expert"].endswith("}") and label["answer"] == "x"
            mask = batch.action_mask[row].bool()
            tokens = batch.sequences[row, -mask.numel() :][mask].tolist()
            response = TOKENIZER.decode(tokens, skip_special_tokens=True)
            received[(batch.prompts[row], response)] = (weights[row].item(), sft[row].item())
    assert received == sent
    assert sum(w for w, _ in received.values()) == pytest.approx(2.0)


@pytest.mark.parametrize("objective,selection", [("grpo", "gap"), ("sft", "gap"), ("chord", "random")])
def test_both_backends_feed_the_same_shaping_and_anchors(disc_dir, objective, selection):
    """The local trainer's critic step and the OpenRLHF experience maker, given the same batch, settings and
    seed, hand their losses the same shaped rewards, hard set, weights and metrics."""
    from aapa_rl.anchor import AnchorCritic
    from aapa_rl.local.trainer import Trainer

    args = make_args(disc_dir, aapa_flags=["--aapa.selection", selection, "--aapa.temperature", "0.5"])
    values = step_values(objective, lam=0.5, alpha=0.3, rho=0.5)
    maker = make_maker(args)
    maker.values = values
    maker._critic = build_critic(args.aapa)  # loaded before the seed, as the local critic below
    experiences, rows = make_experiences(maker)
    torch.manual_seed(7)
    maker.compute_advantages_and_returns(experiences)

    groups = [rows[i : i + GROUP] for i in range(0, len(rows), GROUP)]
    prompts, experts = [g[0][0] for g in groups], [g[0][3] for g in groups]
    texts = [r[1] for r in rows]
    rewards = torch.tensor([r[2] for r in rows])
    critic = AnchorCritic(load_discriminator(disc_dir))
    local = SimpleNamespace(critic=critic, recipe=SimpleNamespace(rollout=SimpleNamespace(group_size=GROUP),
                                                                  aapa=args.aapa))
    torch.manual_seed(7)
    anchor, _, _ = Trainer.score(local, values, prompts, experts, texts, rewards)

    shaped = torch.stack(by_index(experiences, "rewards")).view(-1, GROUP)
    assert torch.allclose(shaped, anchor.shaped_rewards, atol=1e-6)
    weights = torch.stack(by_index(experiences, lambda e: e.info["aapa_w"])).view(-1, GROUP)[:, 0]
    local_weights = torch.zeros(len(groups))
    local_weights[anchor.hard_set] = anchor.hard_weights
    assert torch.allclose(weights, local_weights) and len(anchor.hard_set) == 2
    for key, value in anchor.metrics.items():
        assert maker.last_metrics[f"aapa/{key}"] == pytest.approx(value, nan_ok=True), key


def test_both_backends_read_one_schedule():
    """Stage, lambda (decay and adaptive), alpha, rho and CHORD's mu come from AapaSettings.schedule in both
    backends, so a staged recipe means the same thing to each."""
    from aapa_rl.openrlhf_adapter.ppo_trainer import AapaPPOTrainer

    stages = [{"end_step": 3, "objective": "sft", "lam": 1.0, "alpha": 0.1, "rho": 0.25},
              {"end_step": 8, "objective": "grpo", "lam": 1.0, "lam_end": 0.2, "alpha": 0.1, "rho": 0.25},
              {"end_step": 12, "objective": "chord", "lam": 0.5, "rho": 0.5}]
    aapa, _, _ = split_argv(["--aapa.discriminator", "d", "--aapa.stages", json.dumps(stages),
                             "--aapa.chord", json.dumps({"decay_steps": 3, "peak": 0.6})])
    driver = AapaPPOTrainer.__ray_actor_class__.__new__(AapaPPOTrainer.__ray_actor_class__)
    driver.args = SimpleNamespace(aapa=aapa)
    driver.aapa_schedule = aapa.schedule()
    local = aapa.schedule()  # what aapa_rl.local.trainer.Trainer builds from the recipe's `aapa:` section
    seen = [(driver.aapa_schedule.at(step), local.at(step)) for step in range(14)]
    assert all(a == b for a, b in seen)
    assert [v.mu for v, _ in seen[8:12]] == pytest.approx([0.6, 0.4625, 0.1875, 0.05])
    assert seen[5][0].lam == pytest.approx(1.0 + (0.2 - 1.0) * 2 / 5)
