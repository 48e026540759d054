"""The single-process trainer: SFT, GRPO (group_norm / dr_grpo / rloo) and CHORD, each with or without AAPA,
following a stage schedule. All loss math goes through aapa_rl.objectives and the anchor through
aapa_rl.anchor.AnchorCritic, so this file only moves tensors between them.

A run directory holds: config.yaml, metrics.jsonl (one row per step, eval rows prefixed `eval/`),
scores.jsonl (per-step D and log-prob samples), tb/ (TensorBoard), eval/ (per-sample eval records),
checkpoints/step_N/ (save_pretrained + trainer_state.pt), final (a link to the last checkpoint),
plots/*.png and summary.json.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import yaml
from tqdm import tqdm

from aapa_rl.data.experts import label_problems
from aapa_rl.data.rows import DataError, check_row, read_rows
from aapa_rl.local import plots
from aapa_rl.local.evaluation import RewardFn, evaluate, load_reward
from aapa_rl.local.policy import (
    autocast,
    generate,
    load_policy,
    load_tokenizer,
    pack,
    response_log_probs,
    truncated,
)
from aapa_rl.local.recipe import Recipe, recipe_dict
from aapa_rl.objectives import (
    anchor_loss,
    approx_kl,
    chord_mu,
    group_advantages,
    masked_mean,
    policy_loss,
    sft_loss,
)
from aapa_rl.schedule import AdaptiveLambda, StageSchedule

if TYPE_CHECKING:
    from aapa_rl.anchor import ExpertBank

RUN_MARKERS = ("metrics.jsonl", "checkpoints")  # written once a run has started; config.yaml comes before


class RunDirError(RuntimeError):
    """The run directory already holds a run (or holds none to resume)."""


class NonFiniteError(RuntimeError):
    """Too many non-finite steps in a row."""


class _SkipStep(Exception):
    """A non-finite loss or gradient: the step's update is dropped."""


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


def checkpoints(run_dir: Path) -> list[Path]:
    """The run's checkpoint directories, newest first (a write cut short leaves only a step_N.tmp)."""
    return sorted((run_dir / "checkpoints").glob("step_*[0-9]"), reverse=True)


def latest_checkpoint(run_dir: Path) -> Path | None:
    return next((d for d in checkpoints(run_dir) if (d / "trainer_state.pt").exists()), None)


class Trainer:
    def __init__(
        self, recipe: Recipe, *, resume: bool = False, overwrite: bool = False, progress: bool = True
    ):
        self.recipe = r = recipe
        self.run_dir = Path(r.out)
        self.progress = progress
        resume_from = self._prepare_run_dir(resume, overwrite)  # checkpoints to try, newest first
        if r.threads:
            torch.set_num_threads(r.threads)
        import transformers

        transformers.utils.logging.disable_progress_bar()  # no bars for loading/saving a tiny model
        torch.manual_seed(r.seed)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

        paths = dataclasses.asdict(r.data)
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

        self.tokenizer = load_tokenizer(r.model.tokenizer or r.model.path)
        self.policy = load_policy(r.model.path, self.tokenizer, seed=r.seed, device=self.device)
        self.reference = None
        if r.loss.kl_coef > 0:
            self.reference = copy.deepcopy(self.policy).eval().requires_grad_(False)
        if resume_from:
            resume_from, self.policy, state = self._read_checkpoint(resume_from)
        self.policy.train()

        self.discriminator = self.critic = None
        if r.aapa.discriminator:
            from aapa_rl.anchor import AnchorCritic, load_discriminator

            self.discriminator = load_discriminator(
                r.aapa.discriminator, force=r.aapa.force, device=str(self.device)
            )
            self.critic = AnchorCritic(
                self.discriminator,
                self.bank,
                temperature=r.aapa.temperature,
                transform=r.aapa.transform,
                missing_expert=r.aapa.missing_expert,
            )
        adaptive = AdaptiveLambda(**dataclasses.asdict(r.adaptive)) if r.adaptive else None
        self.schedule = StageSchedule(list(r.stages), adaptive)
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
            self._load_state(state)
            print(f"resumed from {resume_from} at step {self.step}")
        self._open_logs()

    # ----------------------------------------------------------------------------------------- run directory
    def _prepare_run_dir(self, resume: bool, overwrite: bool) -> list[Path]:
        d = self.run_dir
        holds_run = d.is_dir() and any((d / m).exists() for m in RUN_MARKERS)
        if resume:
            found = checkpoints(d)
            if not found:
                raise RunDirError(f"{d}: no checkpoint to resume from; start over with --overwrite")
            return found
        if holds_run and not overwrite:
            raise RunDirError(
                f"{d} already holds a run; pass --resume to continue it or --overwrite to replace it"
            )
        if holds_run or (d / "config.yaml").exists():  # or a start that failed before training (a bad row)
            shutil.rmtree(d)
        elif d.exists() and (not d.is_dir() or any(d.iterdir())):
            raise RunDirError(
                f"{d} exists and is not an empty directory or a run directory; choose another out"
            )
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.yaml").write_text(yaml.safe_dump(recipe_dict(self.recipe), sort_keys=False))
        return []

    def _open_logs(self) -> None:
        from torch.utils.tensorboard import SummaryWriter

        for name in ("metrics.jsonl", "scores.jsonl"):
            path = self.run_dir / name
            if path.exists():  # a resumed run drops what was logged after its checkpoint
                keep = [row for row in plots.read_log(path) if row["step"] < self.step]
                path.write_text("".join(json.dumps(row) + "\n" for row in keep))
        self.metrics_file = open(self.run_dir / "metrics.jsonl", "a")
        self.scores_file = open(self.run_dir / "scores.jsonl", "a")
        self.tb = SummaryWriter(str(self.run_dir / "tb"), purge_step=self.step or None)

    def close(self) -> None:
        self.metrics_file.close()
        self.scores_file.close()
        self.tb.close()

    def _log(self, metrics: dict, scores: dict | None) -> None:
        self.metrics_file.write(json.dumps(metrics) + "\n")
        self.metrics_file.flush()
        step = metrics["step"]
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and key != "step" and math.isfinite(value):
                self.tb.add_scalar(key, value, step)
        if scores:
            self.scores_file.write(json.dumps({"step": step, **scores}) + "\n")
            self.scores_file.flush()
            for key in ("d_rollout", "d_expert"):
                if scores.get(key):
                    self.tb.add_histogram(f"aapa/{key}", torch.tensor(scores[key]), step)

    # ------------------------------------------------------------------------------------------- checkpoints
    def save(self) -> Path:
        final = self.run_dir / "checkpoints" / f"step_{self.step:06d}"
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        self.policy.save_pretrained(tmp)
        self.tokenizer.save_pretrained(tmp)
        state = {
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
        torch.save(state, tmp / "trainer_state.pt")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)  # a checkpoint directory exists only once it is complete
        return final

    def _read_checkpoint(self, candidates: list[Path]) -> tuple[Path, torch.nn.Module, dict]:
        """The newest checkpoint that loads. One that does not (a copy cut short, a bad disk) is named and
        the one before it tried; its steps are trained again and it is overwritten on the way."""
        problems = []
        for checkpoint in candidates:
            try:
                policy = load_policy(str(checkpoint), self.tokenizer, device=self.device)
                state = torch.load(checkpoint / "trainer_state.pt", weights_only=False)
            except Exception as exc:  # whatever a damaged file raises: safetensors, pickle, OS errors
                problems.append(f"{checkpoint} cannot be loaded: {type(exc).__name__}: {str(exc)[:200]}")
                print(f"warning: {problems[-1]}; trying the checkpoint before it", file=sys.stderr)
                continue
            return checkpoint, policy, state
        raise RunDirError(
            f"{self.run_dir}: no checkpoint can be loaded ({'; '.join(problems)}); "
            "start over with --overwrite"
        )

    def _load_state(self, state: dict) -> None:
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
        r, dev = self.recipe, self.device
        sv = self.schedule.at(step)
        lr = self.lr_at(step)
        m: dict = {
            "step": step,
            "stage": sv.stage,
            "objective": sv.objective,
            "lambda": sv.lam,
            "alpha": sv.alpha,
            "rho": sv.rho,
            "lr": lr,
        }
        scores: dict = {}
        started = time.perf_counter()
        mu = 0.0
        if sv.objective == "chord":
            mu = chord_mu(
                sv.stage_step,
                r.loss.chord_warmup_steps,
                r.loss.chord_decay_steps,
                r.loss.chord_peak,
                r.loss.chord_valley,
            )
            m["mu"] = mu
        self.optimizer.zero_grad(set_to_none=True)
        losses = {"policy": 0.0, "kl": 0.0, "sft": 0.0, "anchor": 0.0}
        result = None
        try:
            if sv.objective != "sft" or sv.alpha > 0 or sv.lam > 0:
                result = self._rollout_part(sv, mu, m, scores, losses)
            if sv.objective in ("sft", "chord"):
                t0 = time.perf_counter()
                rows = [self.sft_rows[i] for i in self.sft_stream.take(r.loss.sft_batch_size)]
                batch = pack(self.tokenizer, [x["prompt"] for x in rows], [x["expert"] for x in rows], dev)
                total = batch.response_mask.sum()
                coef = 1.0 if sv.objective == "sft" else mu
                phi = sv.objective == "chord" and r.loss.chord_phi
                for sl in self._chunks(len(rows)):
                    sub = batch.rows(sl)
                    with autocast(dev, r.model.dtype):
                        lp = response_log_probs(self.policy, sub)
                    share = sub.response_mask.sum() / total
                    nll = sft_loss(lp, sub.response_mask, phi)
                    self._backward(coef * share * nll)
                    losses["sft"] += nll.item() * share.item()
                m["time/sft"] = time.perf_counter() - t0
            if result is not None and result[0]:
                self._anchor_part(sv, *result, m, scores, losses)
            t0 = time.perf_counter()
            params = [p for p in self.policy.parameters() if p.grad is not None]
            grad_norm = torch.nn.utils.clip_grad_norm_(
                params, r.optim.grad_clip if r.optim.grad_clip > 0 else math.inf
            )
            if not torch.isfinite(grad_norm):
                raise _SkipStep
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.step()
            m["time/optimizer"] = time.perf_counter() - t0
            m["grad_norm"] = float(grad_norm)
            m["nonfinite_skipped"] = 0
        except _SkipStep:
            self.optimizer.zero_grad(set_to_none=True)
            m["nonfinite_skipped"] = 1
        for key, value in losses.items():
            m[f"loss/{key}"] = value
        m["time/step"] = time.perf_counter() - started
        return m, scores

    def _rollout_part(self, sv, mu: float, m: dict, scores: dict, losses: dict):
        """Sample, reward, score with the critic, and backpropagate the policy-gradient (and KL) terms."""
        r, dev = self.recipe, self.device
        P, G = r.rollout.prompts_per_step, r.rollout.group_size
        rows = [self.train_rows[i] for i in self.train_stream.take(P)]
        prompts, labels = [x["prompt"] for x in rows], [x["label"] for x in rows]
        t0 = time.perf_counter()
        batch = generate(
            self.policy,
            self.tokenizer,
            prompts,
            n=G,
            max_new_tokens=r.rollout.max_new_tokens,
            temperature=r.rollout.temperature,
            top_p=r.rollout.top_p,
            top_k=r.rollout.top_k,
            dtype=r.model.dtype,
        )
        m["time/rollout"] = time.perf_counter() - t0
        if sv.objective == "sft":  # pure SFT has no task reward: the rollouts carry only the shaping term
            rewards, extras = torch.zeros(P * G), {}
        else:
            t0 = time.perf_counter()
            rewards, extras = self.reward_fn(batch.texts, [lab for lab in labels for _ in range(G)])
            m["time/reward"] = time.perf_counter() - t0
        rewards = rewards.float().cpu()
        m["reward/raw"] = float(rewards.mean())
        for key, value in extras.items():
            m[f"reward/{key}"] = float(value.float().mean())
        shaped, critic_result = rewards, None
        if self.critic is not None:
            t0 = time.perf_counter()
            critic_result = self.critic.evaluate(
                prompts,
                [batch.texts[i * G : (i + 1) * G] for i in range(P)],
                rewards.view(P, G),
                alpha=sv.alpha,
                rho=sv.rho,
            )
            m["time/critic"] = time.perf_counter() - t0
            shaped = critic_result.shaped_rewards.reshape(-1).float().cpu()
            m.update({f"aapa/{k}": v for k, v in critic_result.metrics.items()})
            scores["d_rollout"] = critic_result.scores.reshape(-1).tolist()
            scores["d_expert"] = critic_result.expert_scores.tolist()
        m["reward/shaped"] = float(shaped.mean())
        mask = batch.response_mask
        lengths = mask.sum(-1)
        m["response/length"] = float(lengths.float().mean())
        m["response/truncated"] = float(truncated(batch, self.tokenizer.eos_token_id).float().mean())
        scores["length"] = lengths.tolist()

        coef = {"grpo": 1.0, "chord": 1.0 - mu, "sft": 1.0 if sv.alpha > 0 else 0.0}[sv.objective]
        t0 = time.perf_counter()
        estimator = "dr_grpo" if sv.objective == "sft" else r.loss.estimator  # spec: group-mean baseline
        advantages = group_advantages(shaped, G, estimator).to(dev)
        ref_lp = None
        if self.reference is not None:
            with torch.no_grad(), autocast(dev, r.model.dtype):
                ref_lp = torch.cat(
                    [
                        response_log_probs(self.reference, batch.rows(sl), r.rollout.temperature)
                        for sl in self._chunks(P * G)
                    ]
                )
        total_tokens = mask.sum()
        total_seqs = (lengths > 0).sum()
        seq_logp = []
        for sl in self._chunks(P * G):
            sub = batch.rows(sl)
            with autocast(dev, r.model.dtype):
                lp = response_log_probs(self.policy, sub, r.rollout.temperature)
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
                losses["kl"] += kl.item() * token_share.item()
                # CHORD mixes the host's whole loss, KL included: (1 - mu) * (surrogate + KL) + mu * L_sft.
                kl_scale = 1.0 - mu if sv.objective == "chord" else 1.0
                loss = loss + kl_scale * r.loss.kl_coef * token_share * kl
            losses["policy"] += pg.item() * float(share)
            if coef > 0 or ref_lp is not None:
                self._backward(loss)
            seq_logp.append(
                (lp.detach() * sub.response_mask).sum(-1) / sub.response_mask.sum(-1).clamp(min=1)
            )
        m["time/policy"] = time.perf_counter() - t0  # policy-gradient (and KL) forward/backward
        seq_logp = torch.cat(seq_logp).float().cpu()
        m["logp/rollout"] = float(seq_logp.mean())
        scores["logp_rollout"] = seq_logp.tolist()

        experts = (
            critic_result.experts
            if critic_result is not None
            else [self.bank.expert_for(prompt=p) for p in prompts]
            if self.bank is not None
            else []
        )
        return experts, prompts, critic_result

    def _anchor_part(self, sv, experts, prompts, critic_result, m: dict, scores: dict, losses: dict) -> None:
        """Expert log-probs of this batch's prompts (logged), and lambda * L_anchor over the hard set H."""
        r, dev = self.recipe, self.device
        have = [i for i, e in enumerate(experts) if e is not None]
        if not have:
            return
        batch = pack(self.tokenizer, [prompts[i] for i in have], [experts[i] for i in have], dev)
        with torch.no_grad(), autocast(dev, r.model.dtype):
            lp = response_log_probs(self.policy, batch).float()
        mask = batch.response_mask
        seq = (lp * mask).sum(-1) / mask.sum(-1)
        m["logp/expert"] = float(seq.mean())
        scores["logp_expert"] = seq.cpu().tolist()
        if critic_result is None:
            return
        row_of = {i: j for j, i in enumerate(have)}
        hard = [row_of[i] for i in critic_result.hard_set.tolist()]
        weights = critic_result.hard_weights.to(dev)
        if r.aapa.selection == "random":  # control arm: as many anchor prompts, picked blind to the gaps
            k = math.ceil(sv.rho * len(prompts) - 1e-9)
            hard = torch.randperm(len(have))[:k].tolist()
            weights = torch.ones(len(hard), device=dev)
        m["aapa/anchor_rows"] = len(hard)
        if not hard:
            losses["anchor"] = 0.0
        elif sv.lam > 0:
            t0 = time.perf_counter()
            sub = batch.rows(torch.tensor(hard))
            with autocast(dev, r.model.dtype):
                hard_lp = response_log_probs(self.policy, sub)
            la = anchor_loss(hard_lp, sub.response_mask, weights, phi=r.loss.anchor_phi)
            losses["anchor"] = self._backward(sv.lam * la) / sv.lam
            m["time/anchor"] = time.perf_counter() - t0  # the anchor term's forward/backward
            m["aapa/anchor_tokens"] = int(sub.response_mask.sum())
        else:  # lambda = 0 (e.g. a monitored baseline): report L_anchor without optimising it
            idx = torch.tensor(hard, device=dev)
            losses["anchor"] = float(anchor_loss(lp[idx], mask[idx], weights, phi=r.loss.anchor_phi))
        gap = critic_result.metrics.get("gap_mean", math.nan)
        if math.isfinite(gap):
            self.schedule.observe(gap)

    # ------------------------------------------------------------------------------------------- evaluation
    def evaluate(self) -> dict:
        r = self.recipe
        summary, records = evaluate(
            self.policy,
            self.tokenizer,
            self.eval_rows,
            self.reward_fn,
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
        """Train to `steps`, evaluating and checkpointing on schedule; returns the final eval summary."""
        r = self.recipe
        if self.step >= r.steps:
            self.close()
            print(f"{self.run_dir} already finished its {r.steps} steps; raise `steps` to train further")
            done = self.run_dir / "summary.json"
            if not done.exists():  # the final checkpoint is saved before the final eval
                print(f"it stopped before its final eval: run `aapa-rl eval` on {self.run_dir / 'final'}")
            return json.loads(done.read_text())["eval"] if done.exists() else {}
        started = time.perf_counter()
        bar = tqdm(
            range(self.step, r.steps),
            initial=self.step,
            total=r.steps,
            desc=f"train {self.run_dir.name}",
            disable=not self.progress,
            dynamic_ncols=True,
        )
        summary: dict = {}
        try:
            for step in bar:
                metrics, scores = self.train_step(step)
                self.step = step + 1
                self.nonfinite = self.nonfinite + 1 if metrics["nonfinite_skipped"] else 0
                self.skipped += metrics["nonfinite_skipped"]
                if metrics["nonfinite_skipped"]:
                    tqdm.write(
                        f"step {step}: non-finite loss or gradient, update skipped "
                        f"({self.nonfinite} in a row)"
                    )
                last = self.step == r.steps
                if last:  # before the final eval, so that an eval failure cannot lose the run
                    final = self.run_dir / "final"  # RUN/final names the trained model, or is absent
                    final.unlink(missing_ok=True)
                    if self.nonfinite == 0:
                        final.symlink_to(self.save().relative_to(self.run_dir))
                if self.eval_rows and ((r.log.eval_every and self.step % r.log.eval_every == 0) or last):
                    summary = self.evaluate()
                    metrics.update({f"eval/{k}": v for k, v in summary.items()})
                self._log(metrics, scores)
                if self.nonfinite >= r.max_nonfinite:
                    good = latest_checkpoint(self.run_dir)
                    raise NonFiniteError(
                        f"{self.nonfinite} non-finite steps in a row (last at step {step}); "
                        f"aborting. Last good checkpoint: {good or 'none'}"
                    )
                # Periodic checkpoints come after the step's log row, so a resumed run misses no row.
                if (
                    not last
                    and self.nonfinite == 0
                    and r.log.save_every
                    and self.step % r.log.save_every == 0
                ):
                    self.save()
                bar.set_postfix(
                    {
                        k.split("/")[-1]: f"{metrics[k]:.3g}"
                        for k in ("reward/raw", "reward/correct", "response/length", "aapa/gap_mean")
                        if isinstance(metrics.get(k), float)
                    }
                )
        finally:
            bar.close()
            self.close()
        if r.log.plots:
            plots.plot_run(self.run_dir)
        final = self.run_dir / "final"
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
                f"warning: {self.skipped} of {r.steps} steps had a non-finite loss or gradient and were "
                "skipped (nonfinite_skipped in metrics.jsonl)",
                file=sys.stderr,
            )
        return summary
