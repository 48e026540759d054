"""Extends OpenRLHF's ppo_actor (the policy ranks): AAPA's expert terms join the actor loss inside its single
backward per micro-step.

Per micro-step the loss handed to `strategy.backward` becomes
    grpo:  L_host + lam * L_anchor
    sft:   L_host + L_sft + lam * L_anchor          (L_host's advantages come from shaping alone)
    chord: (1 - mu) * L_host + mu * L_sft_phi + lam * L_anchor
where L_host is OpenRLHF's own policy (+ KL, entropy, aux) loss. The expert terms are token means over the
optimizer step's expert tokens on all DP ranks, normalised like OpenRLHF's policy loss (total / gas, times
dp_size), so DeepSpeed's 1/gas scaling and DP averaging leave exactly the token mean of the spec. A loss
that is non-finite on any rank stops every rank before its backward (FloatingPointError).
"""

from __future__ import annotations

from . import pinned  # noqa: F401  (refuses another OpenRLHF version before using its internals)

# isort: split

import ray
import torch
import torch.distributed as dist
from openrlhf.trainer.ppo_utils.experience import Experience
from openrlhf.trainer.ray import ppo_actor
from openrlhf.trainer.ray.ppo_actor import ActorPPOTrainer, PolicyModelActor

from aapa_rl.anchor import CriticScores
from aapa_rl.objectives import EXPERT_OBJECTIVES, anchor_loss, sft_loss, stage_loss

from .scoring import build_critic

# Until the driver pushes a step's values: no expert term.
IDLE_STATE = {"step": 0, "objective": "grpo", "lam": 0.0, "mu": 0.0}


def _per_sample(values, size: int) -> torch.Tensor:
    """A per-sample `info` entry (a tensor, or the list of 0-d tensors batching makes of it) as floats."""
    return torch.zeros(size) if values is None else torch.as_tensor([float(v) for v in values])


class AapaActorPPOTrainer(ActorPPOTrainer):
    """ActorPPOTrainer whose training step adds the AAPA expert terms; installed by AapaPolicyModelActor."""

    aapa_state: dict = IDLE_STATE

    def needs_experts(self) -> bool:
        # The same answer on every rank (the state is pushed to all), so ZeRO-3 ranks stay in lockstep.
        return self.aapa_state["lam"] > 0 or self.aapa_state["objective"] in EXPERT_OBJECTIVES

    def ppo_train(self, kl_ctl: float):
        # ppo_train groups micro-batches into optimizer-step windows with this module function; wrapping it
        # (for this call, in this process) lets each window also count its expert tokens on all ranks.
        original = ppo_actor.iter_grad_accum_global_norm

        def windows(data_iter, strategy, accumulated_gradient, mask_fn):
            gas, window = max(int(accumulated_gradient), 1), []
            for item in data_iter:
                window.append(item)
                if len(window) == gas:
                    self.attach_expert_batches(window, gas)
                    yield from original(iter(window), strategy, accumulated_gradient, mask_fn)
                    window = []
            if window:
                self.attach_expert_batches(window, gas)
                yield from original(iter(window), strategy, accumulated_gradient, mask_fn)

        ppo_actor.iter_grad_accum_global_norm = windows
        try:
            return super().ppo_train(kl_ctl)
        finally:
            ppo_actor.iter_grad_accum_global_norm = original

    def attach_expert_batches(self, window: list[Experience], gas: int) -> None:
        """Give each micro-batch of an optimizer-step window its expert batch and the window's normalisers."""
        if not self.needs_experts():
            return
        batches = [self.expert_batch(exp) for exp in window]
        device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
        totals = torch.zeros(2, device=device)
        for b in batches:
            mask = b["action_mask"].float().to(device)
            totals += torch.stack([(mask * (b["anchor_w"].to(device) > 0)[:, None]).sum(),
                                   (mask * (b["sft_w"].to(device) > 0)[:, None]).sum()])
        if dist.is_initialized():  # TP and ring attention are refused, so the world group is the DP group
            dist.all_reduce(totals)
        # Never zero: a window without expert tokens gives zero terms, not 0/0.
        norms = totals.clamp(min=1).cpu() / gas
        for exp, b in zip(window, batches, strict=True):
            b["anchor_norm"], b["sft_norm"] = norms[0], norms[1]
            # An attribute, not a field: to_device moves it, and the replay buffer never sees it.
            exp.aapa_batch = b

    def expert_batch(self, exp: Experience) -> dict:
        """Prompt + expert (+ EOS) for the samples the driver marked; a 1-token dummy when there are none."""
        size = len(exp.sequences)
        anchor_w = _per_sample(exp.info.get("aapa_w"), size)
        sft_w = _per_sample(exp.info.get("aapa_sft"), size)
        rows = torch.nonzero((anchor_w > 0) | (sft_w > 0)).flatten().tolist()
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        max_len, width = self.args.data.max_len, exp.action_mask.shape[1]
        pairs, truncated = [], 0
        for r in rows:
            label = exp.labels[r]
            if not isinstance(label, dict) or not label.get("expert"):
                raise ValueError(f"sample marked for the AAPA expert term has no label['expert']: {label!r}")
            actions = torch.nonzero(exp.action_mask[r]).flatten()
            prompt_len = exp.sequences.shape[1] - width + int(actions[0]) if len(actions) else \
                int(exp.attention_mask[r].sum())
            prompt = exp.sequences[r, :prompt_len][exp.attention_mask[r, :prompt_len].bool()].tolist()
            expert = self.tokenizer(label["expert"], add_special_tokens=False)["input_ids"] + [eos]
            room = max(max_len - len(prompt), 0)
            truncated += len(expert) > room
            pairs.append((prompt, expert[:room]))
        if not pairs:
            pairs, rows = [([eos], [eos])], []  # dummy: every rank still runs one forward (ZeRO-3 lockstep)
        length = max(len(p) + len(e) for p, e in pairs)
        device = exp.sequences.device
        sequences = torch.full((len(pairs), length), pad, dtype=torch.long, device=device)
        attention = torch.zeros((len(pairs), length), dtype=torch.long, device=device)
        action_mask = torch.zeros((len(pairs), length - 1), dtype=torch.bool, device=device)
        for i, (prompt, expert) in enumerate(pairs):
            sequences[i, : len(prompt) + len(expert)] = torch.tensor(prompt + expert)
            attention[i, : len(prompt) + len(expert)] = 1
            action_mask[i, len(prompt) - 1 : len(prompt) - 1 + len(expert)] = bool(rows)
        return {"sequences": sequences, "attention_mask": attention, "action_mask": action_mask,
                "anchor_w": anchor_w[rows].to(device) if rows else torch.zeros(1, device=device),
                "sft_w": sft_w[rows].to(device) if rows else torch.zeros(1, device=device),
                "truncated": truncated}

    def training_step(self, experience: Experience, kl_ctl: float, step: int, loss_batch_info=None) -> dict:
        batch = experience.__dict__.pop("aapa_batch", None)
        if batch is None and self.needs_experts():  # called outside ppo_train's windows: a window of one
            self.attach_expert_batches([experience], 1)
            batch = experience.__dict__.pop("aapa_batch")
        experience.info.pop("aapa_w", None)
        experience.info.pop("aapa_sft", None)
        state, terms = self.aapa_state, {}
        if batch is not None:
            saved = self.actor.temperature
            self.actor.temperature = 1.0  # the expert NLL is under the policy, not the sampling temperature
            try:
                log_probs = self.actor(batch["sequences"], batch["action_mask"],
                                       attention_mask=batch["attention_mask"],
                                       ring_attn_group=self.strategy.ring_attn_group)
            finally:
                self.actor.temperature = saved
            mask = batch["action_mask"].float()
            anchor_mask = mask * (batch["anchor_w"] > 0)[:, None]
            sft_mask = mask * (batch["sft_w"] > 0)[:, None]
            dp_size = dist.get_world_size() if dist.is_initialized() else 1
            # The objectives return local token means; times the local count gives the sums the window
            # normalises.
            anchor_mean = anchor_loss(log_probs, anchor_mask, batch["anchor_w"],
                                      phi=self.args.aapa.anchor_phi)
            anchor_sum = anchor_mean * anchor_mask.sum().clamp(min=1)
            chord_phi = state["objective"] == "chord" and self.args.aapa.chord.phi
            sft_mean = sft_loss(log_probs, sft_mask, phi=chord_phi)
            sft_sum = sft_mean * sft_mask.sum().clamp(min=1)
            anchor_term = anchor_sum / batch["anchor_norm"].to(anchor_sum.device) * dp_size
            sft_term = sft_sum / batch["sft_norm"].to(sft_sum.device) * dp_size
            terms = {"SFT term": sft_term, "anchor term": anchor_term}

        original, shadowed, calls = self.strategy.backward, vars(self.strategy).get("backward"), []

        def backward(loss, model, optimizer, **kwargs):
            calls.append(loss)
            parts = {"host policy loss": loss, **terms}
            if batch is not None:
                loss = stage_loss(loss, sft_term, anchor_term, state["objective"], state["mu"], state["lam"])
            # ZeRO-3 bf16 would apply NaN gradients and later checkpoints rotate the good ones away. A max
            # over the DP group stops all ranks here together (one raising alone leaves the rest hanging in
            # the next collective): one all-reduce of a few floats per micro-batch.
            bad = ~torch.isfinite(loss.detach())
            flags = torch.stack([bad, *(bad & ~torch.isfinite(t.detach()) for t in parts.values())]).float()
            flags = self.strategy.all_reduce(flags, op="max").tolist()
            if flags[0]:
                names = [name for name, flag in zip(parts, flags[1:], strict=True) if flag] or ["their sum"]
                raise FloatingPointError(
                    f"non-finite loss at step {state['step']}, micro-batch {step} (non-finite on some rank: "
                    f"{', '.join(names)}); stopped before its backward, so the last checkpoint is intact: "
                    "relaunch with --ckpt.load_enable to resume from it (with a lower learning rate or fp32)")
            return original(loss, model, optimizer, **kwargs)

        self.strategy.backward = backward
        try:
            status = super().training_step(experience, kl_ctl, step, loss_batch_info)
        finally:
            if shadowed is None:
                del self.strategy.backward
            else:
                self.strategy.backward = shadowed
        if len(calls) != 1:
            raise RuntimeError(f"OpenRLHF's training_step called strategy.backward {len(calls)} times")
        if batch is None:
            return status

        added = {
            "aapa/anchor_nll_sum": anchor_sum.detach(), "aapa/anchor_tokens": anchor_mask.sum(),
            "aapa/sft_nll_sum": sft_sum.detach(), "aapa/sft_tokens": sft_mask.sum(),
            "aapa/expert_logp_sum": (log_probs.detach() * mask).sum(), "aapa/expert_tokens": mask.sum(),
            "aapa/expert_truncated": float(batch["truncated"]),
        }
        status["metrics"].update(added)
        status["weights"].update(dict.fromkeys(added, "sample"))
        return status


@ray.remote(num_gpus=1)
class AapaPolicyModelActor(PolicyModelActor.__ray_actor_class__):
    """OpenRLHF's policy actor with the AAPA trainer, the schedule state and discriminator scoring."""

    def init_model_from_pretrained(self, strategy, pretrain, max_steps=None, vllm_engines=None):
        super().init_model_from_pretrained(strategy, pretrain, max_steps, vllm_engines)
        # ActorPPOTrainer.__init__ opens the weight-sync group with vLLM: it must run once, so swap the class.
        self.trainer.__class__ = AapaActorPPOTrainer
        self.trainer.aapa_state = getattr(self, "aapa_state", IDLE_STATE)

    def aapa_set_state(self, step: int, objective: str, lam: float, mu: float) -> dict:
        self.aapa_state = {"step": step, "objective": objective, "lam": lam, "mu": mu}
        if hasattr(self, "trainer"):
            self.trainer.aapa_state = self.aapa_state
        return self.aapa_state

    def aapa_score(self, aapa, prompts, experts, rollouts) -> CriticScores:
        """Score a chunk of whole rollout groups with the frozen discriminator on this rank's GPU."""
        if getattr(self, "aapa_critic", None) is None:
            self.aapa_critic = build_critic(aapa, device="cuda" if torch.cuda.is_available() else None)
        return self.aapa_critic.score(prompts, experts, rollouts)
