"""Extends OpenRLHF's PPOTrainer (the driver Ray actor): per rollout batch, the critic's scores and the core's
anchor step (shaping, the hard set H, metrics); the stage schedule pushed to the policy ranks; plugin state in
OpenRLHF's checkpoints."""

from __future__ import annotations

from . import pinned  # noqa: F401  (refuses another OpenRLHF version before using its internals)

# isort: split

import math
import os
from operator import itemgetter

import ray
import torch
from openrlhf.trainer.ppo_trainer import PPOTrainer
from openrlhf.trainer.ppo_utils.experience import Experience
from openrlhf.trainer.ppo_utils.experience_maker import RemoteExperienceMaker
from openrlhf.trainer.ppo_utils.length_penalty import apply_length_penalties
from openrlhf.utils.logging_utils import init_logger

from aapa_rl.anchor import CriticScores, ExpertBank, anchor_step, label_expert
from aapa_rl.objectives import EXPERT_OBJECTIVES, stage_estimator
from aapa_rl.schedule import ScheduleValues
from reward_fns.combine import RewardError

from .scoring import build_critic
from .settings import stage_list_refusal

logger = init_logger(__name__)

# Metrics the policy ranks report as sums (weighted alike), made ratios here: name -> (numerator, denom).
ACTOR_RATIOS = {
    "aapa/anchor_loss": ("aapa/anchor_nll_sum", "aapa/anchor_tokens"),
    "aapa/sft_loss": ("aapa/sft_nll_sum", "aapa/sft_tokens"),
    "aapa/expert_logp_mean": ("aapa/expert_logp_sum", "aapa/expert_tokens"),
}


class AapaExperienceMaker(RemoteExperienceMaker):
    """After rewards, before advantages: apply OpenRLHF's length penalties to the task rewards, score rollouts
    with the frozen discriminator, shape the rewards, choose H over the whole rollout batch
    (aapa_rl.anchor.anchor_step) and mark its anchors in `info` for the policy ranks."""

    values: ScheduleValues | None = None  # this step's schedule values, set by AapaPPOTrainer.train_step
    step: int | None = None  # this batch's global step, set with the values
    _critic = None
    _bank = None

    @torch.no_grad()
    def compute_advantages_and_returns(self, experiences: list[Experience]) -> list[Experience]:
        if self.values is None:
            raise RuntimeError("no schedule values: AapaPPOTrainer.train_step sets them before each batch")
        args, aapa, values = self.args, self.args.aapa, self.values
        n = args.rollout.n_samples_per_prompt
        samples = sorted(((idx, exp, row) for exp in experiences for row, idx in enumerate(exp.index)),
                         key=itemgetter(0))
        if [s[0] for s in samples] != list(range(len(samples))) or len(samples) % n:
            raise RuntimeError(f"rollout batch of {len(samples)} samples does not form groups of "
                               f"--rollout.n_samples_per_prompt {n} with indices 0..{len(samples) - 1}")
        groups = [samples[i : i + n] for i in range(0, len(samples), n)]
        if aapa.expert_bank and self._bank is None:
            self._bank = ExpertBank.load(aapa.expert_bank)

        prompts, experts, rollouts = [], [], []
        for p, group in enumerate(groups):
            _, exp0, row0 = group[0]
            if any(exp.prompts[row] != exp0.prompts[row0] for _, exp, row in group):
                raise RuntimeError(f"group {p} mixes prompts: samples {[s[0] for s in group]} must share one")
            disc_prompt, expert = label_expert(exp0.labels[row0], exp0.prompts[row0], self._bank)
            prompts.append(disc_prompt)
            experts.append(expert)
            rollouts.append([self._response_text(exp, row) for _, exp, row in group])
        seen: dict[str, str | None] = {}
        for p, (prompt, expert) in enumerate(zip(prompts, experts, strict=True)):
            if seen.setdefault(prompt, expert) != expert:
                raise RuntimeError(f"prompt {prompt[:120]!r} has two different experts in one rollout batch "
                                   f"(group {p}); the discriminator needs one expert per prompt")

        for exp in experiences:
            exp.rewards = exp.rewards.to(torch.promote_types(exp.rewards.dtype, torch.float32))
        # OpenRLHF's length penalties (DAPO overlong, ProRL stop-properly) belong to the task reward r of
        # r' = r + alpha * g(D): ProRL's scaling assumes r >= 0, which shaping breaks. SFT stages have no r.
        if values.objective != "sft":
            apply_length_penalties(experiences, args)
        for exp in experiences:
            exp.info["aapa/raw_reward"] = exp.rewards.clone()
            exp.info["aapa_w"] = torch.zeros(len(exp.index))
            exp.info["aapa_sft"] = torch.zeros(len(exp.index))
        rewards = torch.stack([torch.stack([exp.rewards[row] for _, exp, row in group]) for group in groups])
        # OpenRLHF calls the reward itself, not through call_reward and its finiteness check: a NaN here
        # would reach the shaped rewards, the advantages and the weights.
        bad = (~rewards.isfinite()).nonzero()
        if len(bad):
            p, j = bad[0].tolist()
            urls = args.reward.remote_url
            reward = ",".join(urls) if urls else args.reward.model_name_or_path
            raise RewardError(
                f"reward {reward!r}: non-finite reward {rewards[p, j].item()} at step {self.step} for prompt "
                f"{prompts[p][:120]!r} ({len(bad)} of {rewards.numel()} rewards); fix the reward, then "
                "relaunch with --ckpt.load_enable to resume from the last checkpoint")
        scored = self._score(prompts, experts, rollouts)
        anchor = anchor_step(values, aapa, scored, rewards.cpu())
        anchor_w = torch.zeros(len(groups))
        anchor_w[anchor.hard_set] = anchor.hard_weights.float()

        expert_term = values.objective in EXPERT_OBJECTIVES
        for p, group in enumerate(groups):
            for j, (_, exp, row) in enumerate(group):
                exp.rewards[row] = anchor.shaped_rewards[p, j]
            # One sample per prompt carries its expert to the actor: one anchor / SFT forward per prompt.
            _, exp, row = group[0]
            exp.info["aapa_w"][row] = anchor_w[p]
            exp.info["aapa_sft"][row] = float(expert_term and experts[p] is not None)
            label = exp.labels[row]
            if experts[p] is not None and not (isinstance(label, dict) and label.get("expert") == experts[p]):
                exp.labels[row] = {**label, "expert": experts[p]} if isinstance(label, dict) else \
                    {"answer": label, "expert": experts[p]}

        logp = sum((e.action_log_probs.float() * e.action_mask).sum() for e in experiences)
        tokens = sum(e.action_mask.sum() for e in experiences)
        self.last_metrics = {
            "aapa/stage": values.stage, "aapa/lambda": values.lam, "aapa/alpha": values.alpha,
            "aapa/rho": values.rho, **{f"aapa/{k}": v for k, v in anchor.metrics.items()},
            "aapa/rollout_logp_mean": (logp / max(tokens, 1)).item(),
        }
        self.last_scores = {"rollouts": scored.scores[~scored.scores.isnan()],
                            "experts": scored.expert_scores[~scored.expert_scores.isnan()]}

        # For this call only: the stage's estimator (settings.refused keeps SFT stages on group estimators),
        # and no length penalties, which the task rewards already carry.
        estimator, stage = args.algo.advantage.estimator, values.objective
        penalties = args.reward.overlong_buffer_len, args.reward.stop_properly_penalty_coef
        args.algo.advantage.estimator = self.advantage_estimator = stage_estimator(stage, estimator)
        args.reward.overlong_buffer_len = args.reward.stop_properly_penalty_coef = None
        try:
            experiences = super().compute_advantages_and_returns(experiences)
            normalised = self.advantage_estimator == "group_norm"
        finally:
            args.algo.advantage.estimator = self.advantage_estimator = estimator
            args.reward.overlong_buffer_len, args.reward.stop_properly_penalty_coef = penalties
        if normalised:
            self._take_back_equal_group_terms(groups)
        return experiences

    def _take_back_equal_group_terms(self, groups: list[list[tuple]]) -> None:
        """A group of equal rewards has no signal (the core's group_advantages gives it 0), but OpenRLHF's
        float32 (r - mean) / (std + 1e-9) turns its mean's one-ulp miss into +-60..500 for the whole group.
        Recompute that term as OpenRLHF did, on the rewards it normalised (the same (groups, n) float32
        tensor, so the mean rounds alike), and subtract it where it was added: the return and advantage of
        every position up to the last action token, and the logged return. The rewards stay as logged."""
        rewards = torch.stack([torch.stack([exp.rewards[row] for _, exp, row in group]) for group in groups])
        term = (rewards - rewards.mean(-1, keepdim=True)) / (rewards.std(-1, keepdim=True) + 1e-9)
        term = torch.where(rewards.amax(-1, keepdim=True) == rewards.amin(-1, keepdim=True), term, 0.0)
        if self.args.reward.clip_range:
            term = term.clamp(*self.args.reward.clip_range)
        for p, group in enumerate(groups):
            for j, (_, exp, row) in enumerate(group):
                up_to_last_action = exp.action_mask[row].flip(0).cumsum(0).flip(0) > 0
                per_token = term[p, j].to(exp.returns.dtype) * up_to_last_action
                exp.returns[row] -= per_token
                exp.advantages[row] -= per_token
                exp.info["return"][row] -= term[p, j].to(exp.info["return"].dtype)

    def _response_text(self, exp: Experience, row: int) -> str:
        # Same alignment as openrlhf's Actor.forward: the action mask covers the last A target tokens.
        mask = exp.action_mask[row].bool()
        tokens = exp.sequences[row, -mask.numel():][mask]
        return self.tokenizer.decode(tokens.tolist(), skip_special_tokens=True)

    def _score(self, prompts, experts, rollouts) -> CriticScores:
        if self.args.aapa_score_on == "driver" or self.actor_model_group is None:
            if self._critic is None:
                self._critic = build_critic(self.args.aapa)
            return self._critic.score(prompts, experts, rollouts)
        # On the policy GPUs: contiguous chunks of whole groups, one per rank, gathered in order.
        handles = self.actor_model_group._actor_handlers
        size = math.ceil(len(prompts) / len(handles))
        refs = [handle.aapa_score.remote(self.args.aapa, prompts[a : a + size], experts[a : a + size],
                                         rollouts[a : a + size])
                for handle, a in zip(handles, range(0, len(prompts), size), strict=False)]
        parts = ray.get(refs)
        return CriticScores(torch.cat([p.scores for p in parts]), torch.cat([p.expert_scores for p in parts]),
                            torch.cat([p.gaps for p in parts]), sum(p.truncations for p in parts),
                            sum(p.missing_experts for p in parts))


@ray.remote
class AapaPPOTrainer(PPOTrainer.__ray_actor_class__):
    """OpenRLHF's synchronous PPOTrainer with the AAPA experience maker, schedule and checkpoint state."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.setup_aapa()

    def setup_aapa(self) -> None:
        self.experience_maker = AapaExperienceMaker(
            self.actor_model_group, self.critic_model_group, self.reward_model_group,
            self.reference_model_group, self.kl_ctl, self.strategy, self.tokenizer)
        self.aapa_schedule = self.args.aapa.schedule()
        self.aapa_counters = {"anchors": 0, "prompts_scored": 0, "missing_experts": 0}

    def train_step(self, rollout_samples, global_step: int):
        values = self.aapa_schedule.at(global_step)
        self.experience_maker.values, self.experience_maker.step = values, global_step
        ray.get(self.actor_model_group.async_run_method(method_name="aapa_set_state", step=global_step,
                                                        objective=values.objective, lam=values.lam,
                                                        mu=values.mu))

        status, next_step = super().train_step(rollout_samples, global_step)

        aapa_metrics = self.experience_maker.last_metrics
        self.aapa_schedule.observe(aapa_metrics["aapa/gap_mean"])
        self.aapa_counters["anchors"] += int(aapa_metrics["aapa/hard_set_size"])
        self.aapa_counters["prompts_scored"] += len(rollout_samples) // self.args.rollout.n_samples_per_prompt
        self.aapa_counters["missing_experts"] += int(aapa_metrics["aapa/missing_experts"])
        status.update(aapa_metrics)
        status["aapa/mu"] = values.mu
        status["aapa/anchors_total"] = self.aapa_counters["anchors"]
        for name, (numerator, denominator) in ACTOR_RATIOS.items():
            if numerator in status:
                status[name] = status.pop(numerator) / max(status.pop(denominator), 1e-12)
        if self.tensorboard_logger:
            for name, scores in self.experience_maker.last_scores.items():
                if scores.numel():  # empty when no prompt of the batch has an expert (add_histogram raises)
                    self.tensorboard_logger.writer.add_histogram(f"aapa/d_{name}", scores, next_step)
        return status, next_step

    def aapa_state_dict(self) -> dict:
        return {"schedule": self.aapa_schedule.state_dict(), "counters": dict(self.aapa_counters),
                "discriminator": str(self.args.aapa.discriminator)}

    def save_logs_and_checkpoints(self, global_step: int, logs_dict=None, client_states=None) -> None:
        # In place: fit() hands the same dict to save_best_checkpoint, so best checkpoints carry it too.
        if client_states is not None:
            client_states["aapa"] = self.aapa_state_dict()
        super().save_logs_and_checkpoints(global_step, logs_dict, client_states)

    def init_checkpoint_states(self) -> dict:
        states = super().init_checkpoint_states()
        saved = states.get("aapa")
        if saved is None:
            if states.get("global_step", 0) > 0:
                logger.warning("resuming from a checkpoint without AAPA state: the adaptive lambda and the "
                               "AAPA counters start afresh (the stage follows the restored global step)")
            return states
        problem = stage_list_refusal(saved, self.args.aapa, os.path.join(self.args.ckpt.path, "_actor"))
        if problem:
            raise ValueError(problem)
        self.aapa_schedule.load_state_dict(saved["schedule"])
        self.aapa_counters = dict(saved["counters"])
        if saved["discriminator"] != str(self.args.aapa.discriminator):
            logger.warning(f"checkpoint was trained with discriminator {saved['discriminator']}, "
                           f"resuming with {self.args.aapa.discriminator}")
        return states
