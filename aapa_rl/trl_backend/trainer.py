"""Extends TRL's GRPOTrainer (trl==1.16.0) with AAPA; every rule is the core's. One generation batch is one
optimizer step, and TRL's global step is the stage schedule's step:

    rollout     TRL samples G completions per prompt (transformers or vLLM)
    reward      the task rewards (reward_fns through `trl_reward`); none in an SFT stage
    critic      the frozen discriminator scores the whole generation batch (AnchorCritic.score) and
                aapa_rl.anchor.anchor_step gives the shaping s = g(D), the hard set H and the metrics
    advantages  TRL's group baseline over r + alpha * s: the shaping is one more reward column, of weight 1;
                an SFT stage takes the plain group mean (aapa_rl.objectives.stage_estimator)
    losses      per micro-step, TRL's loss plus lam * L_anchor on H's experts and the SFT / CHORD term:
                grpo: L + lam * L_anchor; sft: L + L_sft + lam * L_anchor;
                chord: (1 - mu) * L + mu * L_sft_phi + lam * L_anchor

The expert terms are token means over the whole batch's expert tokens (all processes), split over the
micro-steps, so that the accumulated, process-averaged gradient is exactly the spec's. This module and
aapa_rl/trl_backend/cli.py are the only ones that import trl.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import trl
from accelerate.utils import broadcast_object_list, gather_object
from transformers.trainer import TRAINER_STATE_NAME
from trl import GRPOTrainer

from aapa_rl.anchor import AnchorCritic, ExpertBank, anchor_step, label_expert
from aapa_rl.local.plots import read_log
from aapa_rl.local.rundir import replace_text
from aapa_rl.objectives import (
    EXPERT_OBJECTIVES,
    ORACLE_NEEDS_FLAW_BONUS,
    anchor_loss,
    sft_loss,
    stage_estimator,
    stage_loss,
    token_log_probs,
)
from aapa_rl.settings import AapaSettings, ConfigError

TRL_VERSION = "1.16.0"  # the backend overrides GRPOTrainer internals of exactly this release
if trl.__version__ != TRL_VERSION:
    raise ImportError(f"aapa-rl's TRL backend needs trl=={TRL_VERSION} (it extends GRPOTrainer's internals); "
                      f"found {trl.__version__}: pip install 'aapa-rl[trl]'")

logger = logging.getLogger(__name__)

SHAPING = "aapa_shaping"  # the reward column that carries alpha * s
STATE_FILE = "aapa_state.json"  # the plugin's state in each TRL checkpoint
SCORES_FILE = "scores.jsonl"  # per step, D of the rollouts and of the experts (the local trainer's format)


def text_of(value) -> str:
    """A prompt or completion as text: a string as it is, a conversation as its last message's content."""
    return value if isinstance(value, str) else value[-1]["content"]


def labels_of(label_json: list | None, label: list | None, n: int) -> list:
    """The rows' labels: the JSON text column `label_json` that `aapa-rl trl` writes, else a raw `label`."""
    if label_json is not None:
        return [json.loads(x) for x in label_json]
    return list(label) if label is not None else [None] * n


def trl_reward(reward, name: str) -> Callable:
    """A reward of reward_fns (reward_fns.combine.load_reward: a module name, a .py file or a weighted sum) as
    a TRL reward function, so that one reward file serves the local trainer, OpenRLHF and TRL. Its extra
    metrics are logged as `reward/<name>` like the other backends. An exception it raises (the user's code)
    becomes a RewardError naming it, the exception and the step (reward_fns.combine.stopping_reward):
    `aapa-rl trl` stops on it with the last checkpoint."""
    from reward_fns.combine import call_reward, stopping_reward

    def reward_function(
        prompts, completions, label_json=None, label=None, log_metric=None, trainer_state=None, **_
    ) -> list:
        labels = labels_of(label_json, label, len(completions))
        texts, prompt_texts = [text_of(c) for c in completions], [text_of(p) for p in prompts]
        where = "outside training" if trainer_state is None else f"at step {trainer_state.global_step}"
        rewards, extras = call_reward(stopping_reward(reward, where), texts, labels, prompt_texts)
        if log_metric is not None:
            for key, value in extras.items():
                log_metric(f"reward/{key}", float(value.float().mean()))
        return rewards.float().tolist()

    reward_function.__name__ = name
    return reward_function


def _shaping_column(prompts, completions, **_) -> list:
    return [0.0] * len(completions)  # filled by AapaGRPOTrainer._calculate_rewards


_shaping_column.__name__ = SHAPING


class AapaGRPOTrainer(GRPOTrainer):
    """GRPOTrainer with AAPA. `aapa`: the settings; `critic`: the frozen discriminator's AnchorCritic (None
    when no stage uses it); `bank`: experts for prompts whose labels carry none."""

    def __init__(
        self,
        *args,
        aapa: AapaSettings,
        critic: AnchorCritic | None = None,
        bank: ExpertBank | None = None,
        reward_funcs=None,
        **kwargs,
    ):
        if kwargs.get("environment_factory") is not None:  # TRL appends its reward column after the shaping's
            raise ValueError("AapaGRPOTrainer: environment_factory is not supported (the shaping must be the "
                             "last reward column)")
        config = kwargs.get("args")
        funcs = list(reward_funcs) if isinstance(reward_funcs, list | tuple) else [reward_funcs]
        if config is not None and config.reward_weights is not None:
            config = kwargs["args"] = copy.copy(config)  # the caller's config stays usable for another
            config.reward_weights = [*config.reward_weights, 1.0]
        classes = kwargs.get("reward_processing_classes")
        if classes is not None:  # TRL wants one per reward function; the shaping column needs none
            classes = classes if isinstance(classes, list) else [classes]
            kwargs["reward_processing_classes"] = [*classes, None]
        super().__init__(*args, reward_funcs=[*funcs, _shaping_column], **kwargs)
        self.aapa, self.critic, self.bank = aapa, critic, bank
        self.aapa_schedule = aapa.schedule()
        self.aapa_anchors_total = 0
        self._aapa_values = None  # this generation batch's schedule values (None in evaluation)
        # This generation batch as the critic saw it: prompts, experts, texts, task rewards (P, G), the
        # AnchorStep (None without a critic) and the reward columns TRL sums.
        self.aapa_batch: dict | None = None
        self._aapa_chunks: list[list] = []  # expert rows for each micro-step of this process
        self._aapa_norms = (1, 1)  # anchor and SFT expert tokens of the whole batch
        # Over a step's micro-steps: anchor NLL, anchor tokens, SFT NLL, SFT tokens, expert-forward seconds,
        # the expert rows' log-prob sum and tokens, the rollouts' log-prob sum and tokens.
        self._aapa_sums = torch.zeros(9)
        self._aapa_rollout_logps: torch.Tensor | None = None  # caught from TRL's forward in compute_loss
        problems = check_trainer_config(aapa, self.args, critic is not None)
        if problems:
            raise ValueError("; ".join(problems))

    # ------------------------------------------------------------------------------------------- per batch
    def _generate_and_score_completions(self, inputs):
        if not self.model.training:  # evaluation: no AAPA terms, and the training batch's values are kept
            saved, self._aapa_values = self._aapa_values, None
            try:
                return super()._generate_and_score_completions(inputs)
            finally:
                self._aapa_values = saved
        values = self._aapa_values = self.aapa_schedule.at(self.state.global_step)
        scale = self.scale_rewards
        if stage_estimator(values.objective, "group_norm") == "dr_grpo":
            self.scale_rewards = "none"  # the SFT stage's baseline: the group mean alone
        try:
            output = super()._generate_and_score_completions(inputs)
        finally:
            self.scale_rewards = scale
        self._aapa_chunks = self._expert_rows(output, values)
        metrics = {
            "aapa/lambda": values.lam,
            "aapa/alpha": values.alpha,
            "aapa/rho": values.rho,
            "aapa/mu": values.mu,
        }
        anchor = self.aapa_batch and self.aapa_batch["anchor"]
        if anchor is not None:
            metrics.update({f"aapa/{k}": v for k, v in anchor.metrics.items()})
        for name, value in metrics.items():
            self._metrics["train"][name].append(value)
        # TRL's log() averages each list over the logging window: a stage or a running total keeps its latest
        self._metrics["train"]["aapa/stage"] = [values.stage]
        if anchor is not None:
            self.aapa_anchors_total += len(anchor.hard_set)
            self._metrics["train"]["aapa/anchors_total"] = [self.aapa_anchors_total]
        return output

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        values = self._aapa_values
        if values is not None and values.objective == "sft":  # the rollouts carry the shaping alone
            total = len(prompts) * self.accelerator.num_processes
            rewards = torch.zeros(total, len(self.reward_funcs), device=self.accelerator.device)
        else:
            rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        # TRL gives a row whose every reward is None (NaN) advantage 0, out of the baseline: so its shaping
        # is NaN too, else that column alone would make the row scorable
        unscorable = rewards[:, :-1].isnan().all(1)
        rewards[unscorable, -1] = math.nan
        if values is None:  # evaluation
            return rewards
        self.aapa_batch = None
        if self.critic is None and values.objective not in EXPERT_OBJECTIVES:
            return rewards
        # Groups may span processes: every process sees the whole generation batch.
        G = self.num_generations
        texts = gather_object([text_of(c) for c in completions])
        prompt_texts = gather_object([text_of(p) for p in prompts])
        label_json = [x["label_json"] for x in inputs] if "label_json" in inputs[0] else None
        labels = gather_object(labels_of(label_json, [x.get("label") for x in inputs], len(inputs)))
        pairs = [label_expert(labels[i], prompt_texts[i], self.bank) for i in range(0, len(texts), G)]
        experts = [e for _, e in pairs]
        task = (rewards[:, :-1] * self.reward_weights[:-1].to(rewards.device)).nansum(1)
        task = task.masked_fill(unscorable, math.nan).view(-1, G).cpu()  # the core's reward means skip them
        self.aapa_batch = batch = {"prompts": [p for p, _ in pairs], "experts": experts, "texts": texts,
                                   "rewards": task, "anchor": None, "columns": rewards}
        if self.critic is None:  # an SFT or CHORD stage without AAPA: the experts alone
            return rewards
        started = time.perf_counter()
        rollouts = [texts[i : i + G] for i in range(0, len(texts), G)]
        scored = self.critic.score(batch["prompts"], experts, rollouts)
        anchor = batch["anchor"] = anchor_step(values, self.aapa, scored, task)
        # One hard set for all processes (a random selection draws from each process's own generator).
        shared = [(anchor.hard_set, anchor.hard_weights)]
        broadcast_object_list(shared, from_process=0)
        anchor.hard_set, anchor.hard_weights = shared[0]
        anchor.metrics["hard_set_size"] = float(len(anchor.hard_set))
        anchor.metrics["time_critic"] = time.perf_counter() - started
        rewards[:, -1] = (values.alpha * anchor.shaping.reshape(-1)).to(rewards.device)
        rewards[unscorable, -1] = math.nan
        if self.accelerator.is_main_process:  # for the histogram of D, rollouts against experts
            row = {"step": self.state.global_step}
            for key, d in (("d_rollout", scored.scores), ("d_expert", scored.expert_scores)):
                row[key] = [v for v in d.reshape(-1).tolist() if math.isfinite(v)]  # NaN: no expert
            with open(os.path.join(self.args.output_dir, SCORES_FILE), "a") as f:
                f.write(json.dumps(row) + "\n")
        self.aapa_schedule.observe(anchor.metrics["gap_mean"])
        return rewards

    def _expert_rows(self, output: dict, values) -> list[list]:
        """This process's expert rows (prompt ids, expert ids + eos, anchor weight, SFT flag) for each
        micro-step: H's experts (weight > 0: the core keeps every member's > 0) and, in SFT and CHORD stages,
        every prompt's expert."""
        needs_sft = values.objective in EXPERT_OBJECTIVES
        if self.aapa_batch is None or not (values.lam > 0 or needs_sft):
            return []
        anchor, experts = self.aapa_batch["anchor"], self.aapa_batch["experts"]
        hard = ([], []) if anchor is None else (anchor.hard_set.tolist(), anchor.hard_weights.tolist())
        G, eos = self.num_generations, self.processing_class.eos_token_id
        local = [
            ids[m.bool()].tolist() for ids, m in zip(output["prompt_ids"], output["prompt_mask"], strict=True)
        ]
        prompt_ids = gather_object(local)[::G]  # one row per prompt, as TRL tokenized it
        weight = dict(zip(*hard, strict=True))
        rows = []
        for p, expert in enumerate(experts):
            w = weight.get(p, 0.0) if values.lam > 0 else 0.0
            if expert is None or (w == 0 and not needs_sft):
                continue
            ids = self.processing_class(text=expert, add_special_tokens=False)["input_ids"] + [eos]
            rows.append((prompt_ids[p], ids, w, needs_sft))
        self._aapa_norms = (sum(len(r[1]) for r in rows if r[2] > 0), sum(len(r[1]) for r in rows if r[3]))
        mine = rows[self.accelerator.process_index :: self.accelerator.num_processes]
        steps = self.args.steps_per_generation
        return [mine[j::steps] for j in range(steps)]

    # ----------------------------------------------------------------------------------------- per micro-step
    def _get_per_token_logps_and_entropies(self, *args, **kwargs):
        out = super()._get_per_token_logps_and_entropies(*args, **kwargs)
        if self._aapa_rollout_logps is None:  # compute_loss asked for its first forward: the policy's
            self._aapa_rollout_logps = out[0].detach()
        return out

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        training = self.model.training
        self._aapa_rollout_logps = None if training else torch.empty(0)
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        values, logps = self._aapa_values, self._aapa_rollout_logps
        if training and logps is not None and logps.numel():  # mean log-prob of the rollouts under the policy
            mask = inputs["completion_mask"]
            self._aapa_sums[7:] += torch.tensor([float((logps * mask).sum()), float(mask.sum())])
        if training and values is not None:
            step = self._step % self.args.steps_per_generation
            if self._aapa_chunks:
                started = time.perf_counter()
                anchor_term, sft_term = self._expert_terms(model, self._aapa_chunks[step])
                self._aapa_sums[4] += time.perf_counter() - started
                loss = stage_loss(loss, sft_term, anchor_term, values.objective, values.mu, values.lam)
            if step == self.args.steps_per_generation - 1:
                self._log_expert_losses()
        # The whole loss: the expert forward (prompt + expert, maybe longer than any rollout) can overflow too
        if not torch.isfinite(loss).all():  # TRL would step the optimizer on it and ruin the weights
            raise FloatingPointError(f"non-finite loss {loss.item()} at step {self.state.global_step}: "
                                     "resume from the last checkpoint (with a lower learning rate or fp32)")
        return loss

    def _expert_terms(self, model, rows: list) -> tuple[torch.Tensor, torch.Tensor]:
        """(anchor term, SFT term) of these rows, each its NLL sum over the batch's expert tokens times the
        number of processes (their gradients are averaged). No rows: a zero-weight dummy row, so that every
        process runs the same forwards (ZeRO-3 gathers parameters collectively)."""
        device, pad = self.accelerator.device, self.processing_class.pad_token_id
        eos = self.processing_class.eos_token_id
        rows = rows or [([eos], [eos], 0.0, False)]
        length = max(len(p) + len(e) for p, e, *_ in rows)
        ids = torch.full((len(rows), length), pad, dtype=torch.long)
        attention = torch.zeros_like(ids)
        targets = torch.zeros(len(rows), length - 1)  # 1 where position t predicts an expert token
        for i, (prompt, expert, *_) in enumerate(rows):
            ids[i, : len(prompt) + len(expert)] = torch.tensor(prompt + expert)
            attention[i, : len(prompt) + len(expert)] = 1
            targets[i, len(prompt) - 1 : len(prompt) - 1 + len(expert)] = 1
        ids, attention, targets = ids.to(device), attention.to(device), targets.to(device)
        logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1]
        log_probs = token_log_probs(logits, ids[:, 1:])  # at temperature 1: the policy's NLL of the expert
        weights = torch.tensor([r[2] for r in rows], device=device)
        anchor_mask = targets * (weights > 0)[:, None]
        sft_mask = targets * torch.tensor([float(r[3]) for r in rows], device=device)[:, None]
        chord_phi = self._aapa_values.objective == "chord" and self.aapa.chord.phi
        # The core's token means times the local token counts: the sums that the batch totals normalise.
        anchor_sum = (
            anchor_loss(log_probs, anchor_mask, weights, phi=self.aapa.anchor_phi) * anchor_mask.sum()
        )
        sft_sum = sft_loss(log_probs, sft_mask, phi=chord_phi) * sft_mask.sum()
        rows_mask = anchor_mask.bool() | sft_mask.bool()
        self._aapa_sums[:4] += torch.tensor(
            [anchor_sum.item(), anchor_mask.sum().item(), sft_sum.item(), sft_mask.sum().item()]
        )
        expert_logp = float(log_probs.detach()[rows_mask].sum())
        self._aapa_sums[5:7] += torch.tensor([expert_logp, float(rows_mask.sum())])
        processes = self.accelerator.num_processes
        anchor_tokens, sft_tokens = (max(n, 1) for n in self._aapa_norms)
        return anchor_sum / anchor_tokens * processes, sft_sum / sft_tokens * processes

    def _log_expert_losses(self) -> None:
        """L_anchor and L_sft of the whole batch (all processes), logged once per optimizer step."""
        sums = self.accelerator.reduce(self._aapa_sums.to(self.accelerator.device), reduction="sum").cpu()
        if sums[1] > 0:
            self._metrics["train"]["aapa/anchor_loss"].append(float(sums[0] / sums[1]))
            self._metrics["train"]["aapa/anchor_tokens"].append(float(sums[1]))
        if sums[3] > 0:
            self._metrics["train"]["aapa/sft_loss"].append(float(sums[2] / sums[3]))
        for key, (total, tokens) in {"expert_logp_mean": sums[5:7], "rollout_logp_mean": sums[7:9]}.items():
            if tokens > 0:  # the expert rows trained on (H, every expert in SFT / CHORD), TRL's rollouts
                self._metrics["train"][f"aapa/{key}"].append(float(total / tokens))
        if sums[1] > 0 or sums[3] > 0:
            # seconds in the expert rows' forward passes (their backward is inside TRL's), mean over processes
            seconds = float(sums[4]) / self.accelerator.num_processes
            self._metrics["train"]["aapa/time_expert_forward"].append(seconds)
        self._aapa_sums.zero_()

    # ------------------------------------------------------------------------------------------- checkpoints
    def aapa_state_dict(self) -> dict:
        return {
            "schedule": self.aapa_schedule.state_dict(),
            "anchors_total": self.aapa_anchors_total,
            "discriminator": self.aapa.discriminator,
        }

    def _save_checkpoint(self, model, trial):
        # Trainer writes trainer_state.json last, then deletes checkpoints beyond save_total_limit: the AAPA
        # state goes in first, so one with trainer_state.json is complete (last_checkpoint) before older ones
        # go. A save of this step cut short (the run resumed before it) left a trainer_state.json: out first.
        if self.args.should_save:
            folder = Path(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}")
            folder.mkdir(parents=True, exist_ok=True)
            (folder / TRAINER_STATE_NAME).unlink(missing_ok=True)
            (folder / STATE_FILE).write_text(json.dumps(self.aapa_state_dict(), indent=1))
        super()._save_checkpoint(model, trial)

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        path = os.path.join(checkpoint, STATE_FILE)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: the checkpoint has no AAPA state (written by another trainer?)")
        with open(path) as f:
            state = json.load(f)
        try:
            self.aapa_schedule.load_state_dict(state["schedule"])
        except ValueError as e:  # another stage schedule than the checkpoint's
            raise ConfigError(f"{path}: {e}") from e
        self.aapa_anchors_total = state["anchors_total"]
        if state["discriminator"] != self.aapa.discriminator:  # allowed, as in the OpenRLHF adapter
            logger.warning(f"checkpoint was trained with discriminator {state['discriminator']}, "
                           f"resuming with {self.aapa.discriminator}")
        scores = Path(self.args.output_dir) / SCORES_FILE
        if self.accelerator.is_main_process and scores.exists():  # drop the steps after the checkpoint
            kept = [row for row in read_log(scores) if row["step"] < self.state.global_step]
            replace_text(scores, "".join(json.dumps(row) + "\n" for row in kept))


def last_checkpoint(output_dir: str | Path, *, warn: bool = False) -> Path | None:
    """The newest complete checkpoint-N in output_dir (None: none is). A save cut short leaves one without
    trainer_state.json or the AAPA state (AapaGRPOTrainer._save_checkpoint); `warn`: name each one passed
    over, as the local backend's read_checkpoint does."""
    found = [p for p in Path(output_dir).glob("checkpoint-*") if p.name.removeprefix("checkpoint-").isdigit()]
    for checkpoint in sorted(found, key=lambda p: int(p.name.removeprefix("checkpoint-")), reverse=True):
        missing = [name for name in (TRAINER_STATE_NAME, STATE_FILE) if not (checkpoint / name).exists()]
        if not missing:
            return checkpoint
        if warn:
            print(f"warning: {checkpoint} is incomplete (no {' or '.join(missing)}: a save cut short); "
                  "trying the checkpoint before it", file=sys.stderr)
    return None


def check_trainer_config(aapa: AapaSettings, args, has_critic: bool) -> list[str]:
    """What the TRL config must be for the AAPA terms to be exact; each problem names its key."""
    problems = []
    if aapa.uses_critic and not has_critic:
        problems.append(
            "aapa.discriminator: a stage uses shaping or anchors (alpha, lam > 0 or adaptive) but "
            "no discriminator is set"
        )
    if any(s.alpha > 0 for s in aapa.stages) and args.multi_objective_aggregation != "sum_then_normalize":
        problems.append(
            "trl.multi_objective_aggregation must be sum_then_normalize with shaping (alpha > 0): "
            "r + alpha * s is one reward, normalised once"
        )
    if aapa.selection == "oracle":
        problems.append(ORACLE_NEEDS_FLAW_BONUS)
    # adaptive lambda lifts a lam of 0 above 0 at run time, so it counts as an expert term too
    expert_terms = aapa.adaptive is not None or any(
        s.lam > 0 or s.objective in EXPERT_OBJECTIVES for s in aapa.stages
    )
    if expert_terms and args.steps_per_generation != args.gradient_accumulation_steps:
        problems.append(
            f"trl.steps_per_generation ({args.steps_per_generation}) must equal "
            f"gradient_accumulation_steps ({args.gradient_accumulation_steps}) with expert terms "
            "(lam > 0, sft or chord stages): one generation batch per optimizer step"
        )
    return problems
