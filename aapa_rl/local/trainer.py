"""The single-process trainer: SFT, GRPO (group_norm / dr_grpo / rloo) and CHORD, each with or without AAPA,
following the stage schedule of the recipe's AAPA settings. A step reads top to bottom in `train_step`:
rollout, reward, critic, advantages, losses, update. The loss math is aapa_rl.objectives', the critic's
aapa_rl.anchor's; this file moves tensors between them. The run directory is aapa_rl.local.rundir's.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm import tqdm

from aapa_rl.data.experts import label_problems
from aapa_rl.data.rows import DataError, check_row, read_rows
from aapa_rl.local import plots
from aapa_rl.local.evaluation import RewardFn, evaluate, load_reward
from aapa_rl.local.policy import (
    NonFiniteLogits,
    autocast,
    generate,
    load_policy,
    load_tokenizer,
    pack,
    response_log_probs,
    response_logits,
    truncated,
)
from aapa_rl.local.recipe import Recipe, recipe_dict
from aapa_rl.local.rundir import (  # noqa: F401  (RunDirError, checkpoints: the trainer's API)
    RunDirError,
    RunLog,
    checkpoints,
    latest_checkpoint,
    prepare,
    read_checkpoint,
    save_checkpoint,
)
from aapa_rl.objectives import (
    EXPERT_OBJECTIVES,
    anchor_loss,
    approx_kl,
    group_advantages,
    masked_mean,
    policy_loss,
    selection_diagnostics,
    sft_loss,
    stage_estimator,
    stage_loss_weights,
    token_log_probs,
)
from reward_fns.combine import RewardError, call_reward, reward_name, stopping_reward

if TYPE_CHECKING:
    from aapa_rl.anchor import ExpertBank
    from aapa_rl.schedule import ScheduleValues


class NonFiniteError(RuntimeError):
    """Too many non-finite steps in a row."""


class _SkipStep(Exception):
    """Non-finite logits in the rollout, or a non-finite loss or gradient: the step's update is dropped."""


def load_rows(
    path: str | Path,
    texts: tuple[str, ...],
    present: tuple[str, ...] = (),
    reward_fn: RewardFn | None = None,
    bank: ExpertBank | None = None,
) -> list[dict]:
    """Rows of a JSONL, parquet or `datasets` file (aapa_rl.data.rows.read_rows), checked by check_row:
    the `texts` fields non-empty strings, the `present` fields there. With `reward_fn`, every label must be
    one the reward can read; with `bank`, every prompt must have an expert there. A bad row
    is an error naming the file, row and field."""
    numbers, rows = [], []
    for number, record in read_rows(path):
        row = check_row(path, number, record, texts, present=present)
        if bank is not None and bank.expert_for(prompt=row["prompt"]) is None:
            raise DataError(
                f"{path}: row {number}: field 'prompt': no expert for this prompt in {bank.source}; "
                "add one there or set aapa.missing_expert: skip"
            )
        numbers.append(number)
        rows.append(row)
    if not rows:
        raise DataError(f"{path}: no rows")
    problems = label_problems(reward_fn, [row["label"] for row in rows]) if reward_fn is not None else {}
    if problems:
        i, problem = next(iter(problems.items()))
        raise DataError(f"{path}: row {numbers[i]}: field 'label': {problem}")
    return rows


class Stream:
    """Endless shuffled passes over `n` rows; its state makes a resumed run read the same rows."""

    def __init__(self, n: int, seed: int):
        self.n, self.rng, self.order, self.pos = n, random.Random(seed), [], 0

    def take(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            if self.pos >= len(self.order):
                self.order = list(range(self.n))
                self.rng.shuffle(self.order)
                self.pos = 0
            out.append(self.order[self.pos])
            self.pos += 1
        return out

    def state_dict(self) -> dict:
        return {"rng": self.rng.getstate(), "order": self.order, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.rng.setstate(state["rng"])
        self.order, self.pos = state["order"], state["pos"]


class Trainer:
    def __init__(
        self, recipe: Recipe, *, resume: bool = False, overwrite: bool = False, progress: bool = True
    ):
        self.recipe = r = recipe
        self.run_dir = Path(r.out)
        self.progress = progress
        resume_from = prepare(self.run_dir, recipe_dict(r), resume, overwrite)  # checkpoints, newest first
        if r.threads:
            torch.set_num_threads(r.threads)
        import transformers

        transformers.utils.logging.disable_progress_bar()  # no bars for loading/saving a tiny model
        torch.manual_seed(r.seed)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

        paths = {**dataclasses.asdict(r.data), "expert_bank": r.aapa.expert_bank}
        if r.task is not None:
            written = r.task.write(self.run_dir / "data")
            paths = {
                "sft": written["sft"],
                "train": written["train"],
                "eval": written["eval"],
                "expert_bank": written["experts"],
            }
        self.bank = None
        if paths["expert_bank"]:
            from aapa_rl.anchor import ExpertBank

            self.bank = ExpertBank.load(paths["expert_bank"])
        self.reward_fn = load_reward(r.reward, r.task) if (r.uses_rollouts or paths["eval"]) else None
        # Labels (and, for the critic, experts) are checked here: a bad row found mid-run loses the training.
        needs_expert = r.aapa.discriminator is not None and r.aapa.missing_expert == "error"
        self.sft_rows = load_rows(paths["sft"], ("prompt", "expert")) if r.uses_sft_data else []
        self.train_rows = (
            load_rows(
                paths["train"], ("prompt",), ("label",), self.reward_fn, self.bank if needs_expert else None
            )
            if r.uses_rollouts
            else []
        )
        self.eval_rows = (
            load_rows(paths["eval"], ("prompt",), ("label",), self.reward_fn)[: r.log.eval_samples]
            if paths["eval"]
            else []
        )
        if r.aapa.selection == "oracle" and self.train_rows:
            # The oracle anchors the prompts whose rollouts earn the reward's flaw_bonus: a reward without
            # that log is refused here, before the run log opens, not at the first step.
            row = self.train_rows[0]
            _, logs = call_reward(self.reward_fn, [""], [row["label"]], [row["prompt"]])
            if "flaw_bonus" not in logs:
                raise RewardError(
                    f"reward {reward_name(self.reward_fn)!r} logs no per-sample 'flaw_bonus', which "
                    "aapa.selection: oracle selects by; use gap, random or all"
                )

        self.tokenizer = load_tokenizer(r.model.tokenizer or r.model.path)
        self.policy = load_policy(r.model.path, self.tokenizer, seed=r.seed, device=self.device)
        self.reference = None
        if r.loss.kl_coef > 0:
            self.reference = copy.deepcopy(self.policy).eval().requires_grad_(False)
        if resume_from:
            resume_from, self.policy, state = read_checkpoint(
                self.run_dir, resume_from, lambda path: load_policy(path, self.tokenizer, device=self.device)
            )
        self.policy.train()

        self.discriminator = self.critic = None
        if r.aapa.discriminator:
            from aapa_rl.anchor import AnchorCritic, load_discriminator

            self.discriminator = load_discriminator(
                r.aapa.discriminator, force=r.aapa.force_discriminator, device=str(self.device)
            )
            self.critic = AnchorCritic(
                self.discriminator, eps=r.aapa.eps, missing_expert=r.aapa.missing_expert
            )
        self.schedule = r.aapa.schedule()
        self.optimizer = torch.optim.AdamW(
            self.policy.parameters(),
            lr=r.optim.lr,
            weight_decay=r.optim.weight_decay,
            betas=(r.optim.beta1, r.optim.beta2),
        )
        self.sft_stream = Stream(len(self.sft_rows), r.seed + 1)
        self.train_stream = Stream(len(self.train_rows), r.seed + 2)
        self.step = 0
        self.nonfinite = 0  # non-finite steps in a row
        self.skipped = 0  # non-finite steps in the whole run
        if resume_from:
            self.load_state_dict(state)
            print(f"resumed from {resume_from} at step {self.step}")
        self.log = RunLog(self.run_dir, self.step)

    def close(self) -> None:
        self.log.close()

    # ------------------------------------------------------------------------------------------- checkpoints
    def save(self) -> Path:
        return save_checkpoint(self.run_dir, self.step, self.policy, self.tokenizer, self.state_dict())

    def state_dict(self) -> dict:
        return {
            "recipe": recipe_dict(self.recipe),  # what a resume compares with when config.yaml is unreadable
            "step": self.step,
            "nonfinite": self.nonfinite,
            "skipped": self.skipped,
            "schedule": self.schedule.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "streams": {"sft": self.sft_stream.state_dict(), "train": self.train_stream.state_dict()},
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            },
        }

    def load_state_dict(self, state: dict) -> None:
        self.step, self.nonfinite = state["step"], state["nonfinite"]
        self.skipped = state.get("skipped", 0)  # checkpoints written before the count was kept lack it
        self.schedule.load_state_dict(state["schedule"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.sft_stream.load_state_dict(state["streams"]["sft"])
        self.train_stream.load_state_dict(state["streams"]["train"])
        torch.set_rng_state(state["rng"]["torch"])
        if state["rng"]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])

    # ---------------------------------------------------------------------------------------------- training
    def lr_at(self, step: int) -> float:
        o = self.recipe.optim
        scale = min(1.0, (step + 1) / o.warmup_steps) if o.warmup_steps else 1.0
        if o.lr_schedule == "cosine":
            scale *= 0.5 * (1 + math.cos(math.pi * step / self.recipe.steps))
        return o.lr * scale

    def _chunks(self, n: int) -> list[slice]:
        size = self.recipe.optim.micro_batch_size or n
        return [slice(s, min(s + size, n)) for s in range(0, n, size)]

    def _backward(self, loss: torch.Tensor) -> float:
        if not torch.isfinite(loss):
            raise _SkipStep
        if loss.requires_grad:
            loss.backward()
        return loss.item()

    def train_step(self, step: int) -> tuple[dict, dict]:
        """One step: rollout -> reward -> critic -> advantages -> losses (backward each) -> update.
        Returns the step's metrics and its per-sample scores."""
        r, values = self.recipe, self.schedule.at(step)
        P, G = r.rollout.prompts_per_step, r.rollout.group_size
        lr = self.lr_at(step)
        m: dict = {
            "step": step,
            "stage": values.stage,
            "objective": values.objective,
            "lambda": values.lam,
            "alpha": values.alpha,
            "rho": values.rho,
            "lr": lr,
        }
        if values.objective == "chord":
            m["mu"] = values.mu
        scores: dict = {}
        started = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        losses = {"policy": 0.0, "kl": 0.0, "sft": 0.0, "anchor": 0.0}
        anchor = experts = None
        try:
            if values.objective != "sft" or values.alpha > 0 or values.lam > 0:
                rows = [self.train_rows[i] for i in self.train_stream.take(P)]
                batch, t = self.rollout([x["prompt"] for x in rows])
                m["time/rollout"] = t
                rewards, extras, t = self.reward(values, batch.texts, rows)
                if t is not None:
                    m["time/reward"] = t
                if values.objective != "sft":  # an SFT stage's rollouts are not scored by the reward
                    m["reward/raw"] = float(rewards.mean())
                m.update({f"reward/{k}": float(v.float().mean()) for k, v in extras.items()})
                prompts, experts = self.experts(rows)
                shaped = rewards
                if self.critic is not None:
                    anchor, d_scores, t = self.score(
                        values, prompts, experts, batch.texts, rewards, extras.get("flaw_bonus")
                    )
                    shaped = anchor.shaped_rewards.reshape(-1).float().cpu()
                    m.update({"time/critic": t, **{f"aapa/{k}": v for k, v in anchor.metrics.items()}})
                    scores.update(d_scores)
                m["reward/shaped"] = float(shaped.mean())
                lengths = batch.response_mask.sum(-1)
                m["response/length"] = float(lengths.float().mean())
                m["response/truncated"] = float(truncated(batch, self.tokenizer.eos_token_id).float().mean())
                scores["length"] = lengths.tolist()

                advantages = group_advantages(shaped, G, stage_estimator(values.objective, r.loss.estimator))
                (losses["policy"], losses["kl"], seq_logp), m["time/policy"] = self.policy_gradient(
                    values, batch, advantages.to(self.device)
                )
                m["logp/rollout"] = float(seq_logp.mean())
                scores["logp_rollout"] = seq_logp.tolist()
            if values.objective in EXPERT_OBJECTIVES:
                losses["sft"], m["time/sft"] = self.sft_term(values)
            if experts and any(e is not None for e in experts):
                expert_logp, anchor_loss_value, extra = self.anchor_term(values, prompts, experts, anchor)
                m["logp/expert"] = float(expert_logp.mean())
                scores["logp_expert"] = expert_logp.tolist()
                m.update(extra)
                if anchor_loss_value is not None:
                    losses["anchor"] = anchor_loss_value
                if anchor is not None:
                    self.schedule.observe(m["aapa/gap_mean"])
            m["grad_norm"], m["time/optimizer"] = self.update(lr)
            m["nonfinite_skipped"] = 0
        except _SkipStep:
            self.optimizer.zero_grad(set_to_none=True)
            m["nonfinite_skipped"] = 1
            losses = dict.fromkeys(losses, math.nan)  # not 0.0: no loss of this step was trained on
        for key, value in losses.items():
            m[f"loss/{key}"] = value
        m["time/step"] = time.perf_counter() - started
        return m, scores

    def rollout(self, prompts: list[str]):
        """G sampled responses per prompt (and the seconds it took)."""
        r, t0 = self.recipe, time.perf_counter()
        try:
            batch = generate(
                self.policy,
                self.tokenizer,
                prompts,
                n=r.rollout.group_size,
                max_new_tokens=r.rollout.max_new_tokens,
                temperature=r.rollout.temperature,
                top_p=r.rollout.top_p,
                top_k=r.rollout.top_k,
                dtype=r.model.dtype,
            )
        except NonFiniteLogits:  # nothing to sample from: skipped and counted like a non-finite loss
            raise _SkipStep from None
        return batch, time.perf_counter() - t0

    def reward(self, values: ScheduleValues, texts: list[str], rows: list[dict]):
        """(rewards (P*G,) on the CPU, the reward's extra metrics as it returned them, seconds or None): none
        in an SFT stage, where the rollouts carry only the shaping term."""
        if values.objective == "sft":
            return torch.zeros(len(texts)), {}, None
        t0 = time.perf_counter()
        group = self.recipe.rollout.group_size
        labels = [x["label"] for x in rows for _ in range(group)]
        rewards, extras = call_reward(
            stopping_reward(self.reward_fn, f"at step {self.step}"),
            texts,
            labels,
            [x["prompt"] for x in rows for _ in range(group)],
        )
        elapsed = time.perf_counter() - t0
        return rewards.float().cpu(), extras, elapsed

    def experts(self, rows: list[dict]) -> tuple[list[str], list[str | None]]:
        """The prompts the discriminator sees and their experts (aapa_rl.anchor.label_expert's rule)."""
        from aapa_rl.anchor import label_expert

        pairs = [label_expert(x["label"], x["prompt"], self.bank) for x in rows]
        return [p for p, _ in pairs], [e for _, e in pairs]

    def score(
        self,
        values: ScheduleValues,
        prompts: list[str],
        experts: list,
        texts: list[str],
        rewards: torch.Tensor,
        flaw_bonus: torch.Tensor | None = None,
    ):
        """The critic's AnchorStep (shaped rewards, hard set, metrics), the D samples logged, and seconds.
        With the reward's per-sample `flaw_bonus`, the oracle selection sees which prompts' rollouts exploit
        the flaw, and the metrics say how well the hard set and the gaps find them (selection_diagnostics)."""
        from aapa_rl.anchor import anchor_step

        t0, G = time.perf_counter(), self.recipe.rollout.group_size
        rollouts = [texts[i * G : (i + 1) * G] for i in range(len(prompts))]
        scored = self.critic.score(prompts, experts, rollouts)
        exploiting = None  # per prompt, its rollouts that earn a flaw bonus
        if flaw_bonus is not None and flaw_bonus.numel() == len(texts):
            exploiting = (flaw_bonus.cpu().view(len(prompts), G) > 0).sum(-1)
        anchor = anchor_step(values, self.recipe.aapa, scored, rewards.view(len(prompts), G), exploiting)
        if exploiting is not None:
            anchor.metrics.update(selection_diagnostics(scored.gaps, anchor.hard_set, exploiting > 0))
        d_scores = {
            "d_rollout": scored.scores.reshape(-1).tolist(),
            "d_expert": scored.expert_scores.tolist(),
        }
        return anchor, d_scores, time.perf_counter() - t0

    def policy_gradient(self, values: ScheduleValues, batch, advantages: torch.Tensor):
        """Backpropagate the clipped policy-gradient term (and KL), scaled for the stage; returns
        ((policy loss, KL, per-sequence mean log-prob), seconds)."""
        r, dev, t0 = self.recipe, self.device, time.perf_counter()
        host_weight, _ = stage_loss_weights(values.objective, values.mu)
        # Without shaping an SFT stage has all-zero rewards, so all-zero advantages: nothing to backpropagate.
        coef = 0.0 if values.objective == "sft" and values.alpha == 0 else host_weight
        mask = batch.response_mask
        n = mask.shape[0]
        ref_lp = None
        if self.reference is not None:
            with torch.no_grad(), autocast(dev, r.model.dtype):
                ref_lp = torch.cat(
                    [
                        response_log_probs(self.reference, batch.rows(sl), r.rollout.temperature)
                        for sl in self._chunks(n)
                    ]
                )
        total_tokens, total_seqs = mask.sum(), (mask.sum(-1) > 0).sum()
        policy, kl_total, seq_logp = 0.0, 0.0, []
        temperature = r.rollout.temperature
        for sl in self._chunks(n):
            sub = batch.rows(sl)
            with autocast(dev, r.model.dtype):
                logits = response_logits(self.policy, sub)
                lp = token_log_probs(logits / temperature if temperature != 1 else logits, sub.response_ids)
            token_share = sub.response_mask.sum() / total_tokens
            share = (
                token_share
                if r.loss.agg == "token-mean"
                else (sub.response_mask.sum(-1) > 0).sum() / total_seqs
            )
            pg = policy_loss(
                lp,
                lp.detach(),
                advantages[sl],
                sub.response_mask,
                r.loss.clip_low,
                r.loss.clip_high,
                r.loss.agg,
            )
            loss = coef * share * pg
            if ref_lp is not None:
                kl = masked_mean(approx_kl(lp, ref_lp[sl], r.loss.kl_estimator), sub.response_mask)
                kl_total += kl.item() * token_share.item()
                # CHORD mixes the host's whole loss, KL included: (1 - mu) * (surrogate + KL) + mu * L_sft.
                loss = loss + host_weight * r.loss.kl_coef * token_share * kl
            policy += pg.item() * float(share)
            if coef > 0 or ref_lp is not None:
                self._backward(loss)
            # Logged at temperature 1, the distribution logp/expert is measured under; the loss keeps the
            # rollout's temperature.
            plain = lp.detach() if temperature == 1 else token_log_probs(logits.detach(), sub.response_ids)
            seq_logp.append((plain * sub.response_mask).sum(-1) / sub.response_mask.sum(-1).clamp(min=1))
        return (policy, kl_total, torch.cat(seq_logp).float().cpu()), time.perf_counter() - t0

    def sft_term(self, values: ScheduleValues) -> tuple[float, float]:
        """Backpropagate the SFT term on a batch of the SFT stream (CHORD: mu times the phi-weighted NLL);
        returns (the NLL, seconds)."""
        r, dev, t0 = self.recipe, self.device, time.perf_counter()
        rows = [self.sft_rows[i] for i in self.sft_stream.take(r.loss.sft_batch_size)]
        batch = pack(self.tokenizer, [x["prompt"] for x in rows], [x["expert"] for x in rows], dev)
        total = batch.response_mask.sum()
        _, coef = stage_loss_weights(values.objective, values.mu)
        phi = values.objective == "chord" and r.aapa.chord.phi
        nll_total = 0.0
        for sl in self._chunks(len(rows)):
            sub = batch.rows(sl)
            with autocast(dev, r.model.dtype):
                lp = response_log_probs(self.policy, sub)
            share = sub.response_mask.sum() / total
            nll = sft_loss(lp, sub.response_mask, phi)
            self._backward(coef * share * nll)
            nll_total += nll.item() * share.item()
        return nll_total, time.perf_counter() - t0

    def anchor_term(self, values: ScheduleValues, prompts: list[str], experts: list, anchor):
        """The experts' log-probs under the policy (logged), and lambda * L_anchor over the hard set H
        (backpropagated; only reported when lambda is 0). Returns (per-expert mean log-prob, L_anchor or None
        without a critic, metrics)."""
        r, dev = self.recipe, self.device
        have = [i for i, e in enumerate(experts) if e is not None]
        batch = pack(self.tokenizer, [prompts[i] for i in have], [experts[i] for i in have], dev)
        with torch.no_grad(), autocast(dev, r.model.dtype):
            lp = response_log_probs(self.policy, batch).float()
        mask = batch.response_mask
        expert_logp = ((lp * mask).sum(-1) / mask.sum(-1)).cpu()
        if anchor is None:
            return expert_logp, None, {}
        row_of = {i: j for j, i in enumerate(have)}
        hard = [row_of[i] for i in anchor.hard_set.tolist()]
        weights = anchor.hard_weights.to(dev)
        metrics: dict = {"aapa/anchor_rows": len(hard), "aapa/anchor_budget": 0.0}
        if not hard:
            return expert_logp, 0.0, metrics
        idx = torch.tensor(hard, device=dev)
        # lam x the weighted expert tokens of H: the anchor budget spent this step, comparable across
        # selections (bench/selection.py plots format against its running sum).
        metrics["aapa/anchor_budget"] = values.lam * float((weights * mask[idx].sum(-1)).sum())
        if values.lam == 0:  # e.g. a monitored baseline: report L_anchor without optimising it
            return (
                expert_logp,
                float(anchor_loss(lp[idx], mask[idx], weights, phi=r.aapa.anchor_phi)),
                metrics,
            )
        t0 = time.perf_counter()
        sub = batch.rows(torch.tensor(hard))
        with autocast(dev, r.model.dtype):
            hard_lp = response_log_probs(self.policy, sub)
        value = self._backward(
            values.lam * anchor_loss(hard_lp, sub.response_mask, weights, phi=r.aapa.anchor_phi)
        )
        metrics["time/anchor"] = time.perf_counter() - t0  # the anchor term's forward/backward
        metrics["aapa/anchor_tokens"] = int(sub.response_mask.sum())
        return expert_logp, value / values.lam, metrics

    def update(self, lr: float) -> tuple[float, float]:
        """Clip and apply the accumulated gradients; returns (gradient norm, seconds)."""
        t0 = time.perf_counter()
        clip = self.recipe.optim.grad_clip
        params = [p for p in self.policy.parameters() if p.grad is not None]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else math.inf)
        if not torch.isfinite(grad_norm):
            raise _SkipStep
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        return float(grad_norm), time.perf_counter() - t0

    # ------------------------------------------------------------------------------------------- evaluation
    def evaluate(self) -> dict:
        r = self.recipe
        where = f"in the {'final ' if self.step >= r.steps else ''}eval after step {self.step - 1}"
        summary, records = evaluate(
            self.policy,
            self.tokenizer,
            self.eval_rows,
            stopping_reward(self.reward_fn, where),
            max_new_tokens=r.rollout.max_new_tokens,
            dtype=r.model.dtype,
            discriminator=self.discriminator,
        )
        (self.run_dir / "eval").mkdir(exist_ok=True)
        with open(self.run_dir / "eval" / f"step_{self.step:06d}.jsonl", "w") as f:
            for rec in records:
                f.write(json.dumps(rec) + "\n")
        return summary

    def fit(self) -> dict:
        """Train to `steps`, evaluating and checkpointing on schedule, then _finish; returns the final eval
        summary. A run resumed after its last step only finishes, if it had not."""
        r = self.recipe
        started = time.perf_counter()
        if self.step >= r.steps:
            try:
                done = json.loads((self.run_dir / "summary.json").read_text())
            except (OSError, ValueError):  # none, or its write was cut short
                done = {}
            # Killed after its final checkpoint; or this summary is of an end before the run was extended.
            if done.get("steps") != self.step:
                print(f"{self.run_dir} trained its {r.steps} steps but stopped before its final eval, plots "
                      "and summary.json; running them now")
                return self._finish(started)
            self.close()
            print(f"{self.run_dir} already finished its {r.steps} steps; raise `steps` to train further")
            return done["eval"]
        bar = tqdm(
            range(self.step, r.steps),
            initial=self.step,
            total=r.steps,
            desc=f"train {self.run_dir.name}",
            disable=not self.progress,
            dynamic_ncols=True,
        )
        try:
            for step in bar:
                metrics, scores = self.train_step(step)
                self.step = step + 1
                self.nonfinite = self.nonfinite + 1 if metrics["nonfinite_skipped"] else 0
                self.skipped += metrics["nonfinite_skipped"]
                if metrics["nonfinite_skipped"]:
                    tqdm.write(
                        f"step {step}: non-finite logits, loss or gradient, update skipped "
                        f"({self.nonfinite} in a row)"
                    )
                last = self.step == r.steps
                # The final eval comes after the last row and the final checkpoint (_finish), so that
                # its failure or a kill during it loses neither; --resume then runs it.
                if self.eval_rows and not last and r.log.eval_every and self.step % r.log.eval_every == 0:
                    metrics.update({f"eval/{k}": v for k, v in self.evaluate().items()})
                self.log.write(metrics, scores)
                # Checkpoints come after the step's log row, so a resumed run misses no row.
                if last:
                    # RUN/final is linked by _finish; an older run's link must not outlast a non-finite end.
                    (self.run_dir / "final").unlink(missing_ok=True)
                    if self.nonfinite == 0:
                        self.save()
                elif self.nonfinite == 0 and r.log.save_every and self.step % r.log.save_every == 0:
                    self.save()
                if self.nonfinite >= r.max_nonfinite:
                    good = latest_checkpoint(self.run_dir)
                    raise NonFiniteError(
                        f"{self.nonfinite} non-finite steps in a row (last at step {step}); "
                        f"aborting. Last good checkpoint: {good or 'none'}"
                    )
                bar.set_postfix(
                    {
                        k.split("/")[-1]: f"{metrics[k]:.3g}"
                        for k in ("reward/raw", "reward/correct", "response/length", "aapa/gap_mean")
                        if isinstance(metrics.get(k), float)
                    }
                )
        except BaseException:
            self.close()
            raise
        finally:
            bar.close()
        return self._finish(started)

    def _finish(self, started: float) -> dict:
        """The final eval (added to the last step's row), plots and summary.json, after the last step."""
        r = self.recipe
        # RUN/final names the last step's checkpoint, or is absent. Made here, so that a resume that only
        # finishes makes it too: after a kill before the link, or with `steps` lowered to the checkpoint's.
        final, checkpoint = self.run_dir / "final", self.run_dir / "checkpoints" / f"step_{self.step:06d}"
        final.unlink(missing_ok=True)
        if self.nonfinite == 0 and (checkpoint / "trainer_state.pt").exists():
            final.symlink_to(checkpoint.relative_to(self.run_dir))
        summary: dict = {}
        try:
            if self.eval_rows:
                summary = self.evaluate()
                self.log.add({f"eval/{k}": v for k, v in summary.items()}, self.step - 1)
        finally:
            self.close()
        if r.log.plots:
            plots.plot_run(self.run_dir)
        result = {
            "steps": self.step,
            "nonfinite_skipped": self.skipped,
            "final": os.readlink(final) if final.is_symlink() else None,
            "train_seconds": time.perf_counter() - started,
            "eval": summary,
        }
        (self.run_dir / "summary.json").write_text(json.dumps(result, indent=2) + "\n")
        if self.nonfinite:  # the last steps' updates were skipped, and with them the final checkpoint
            raise NonFiniteError(
                f"the last {self.nonfinite} of {r.steps} steps were non-finite ({self.skipped} in all), "
                f"so no final checkpoint was saved. Last good checkpoint: "
                f"{latest_checkpoint(self.run_dir) or 'none'}"
            )
        if self.skipped:
            print(
                f"warning: {self.skipped} of {r.steps} steps had non-finite logits, loss or gradient and "
                "were skipped (nonfinite_skipped in metrics.jsonl)",
                file=sys.stderr,
            )
        return summary
