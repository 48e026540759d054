"""The adversarial anchor critic, backend-neutral: the frozen discriminator's scores of a rollout batch
(`AnchorCritic.score`), and what a training step makes of them (`anchor_step`): shaped rewards, the hard set
H with its weights, and the metrics every backend logs under `aapa/`."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain

import numpy as np
import torch

from aapa_rl.objectives import anchor_gaps, choose_hard_set, shape_rewards

from .discriminator import Discriminator


@dataclass
class CriticScores:
    # NaN marks a missing expert only: score() raises on a non-finite D.
    scores: torch.Tensor  # (P, G) D of the rollouts; NaN where it needs an expert the prompt lacks
    expert_scores: torch.Tensor  # (P,) D of the experts; NaN without one
    gaps: torch.Tensor  # (P,) anchor gaps; NaN without an expert
    truncations: int  # texts the encoder cut to its length limit
    missing_experts: int


@dataclass
class AnchorStep:
    shaped_rewards: torch.Tensor  # (P, G) r + alpha * s (r = 0 in an SFT stage)
    shaping: torch.Tensor  # (P, G) s = g(D), 0 where D is NaN
    hard_set: torch.Tensor  # (k,) prompt indices
    hard_weights: torch.Tensor  # (k,)
    metrics: dict[str, float]  # named as logged, without the `aapa/` prefix


class AnchorCritic:
    """Scores rollouts and experts with a frozen discriminator; the experts come with the call."""

    def __init__(self, discriminator: Discriminator, *, eps: float = 1e-6, missing_expert: str = "error"):
        if missing_expert not in ("error", "skip"):
            raise ValueError(f"missing_expert must be 'error' or 'skip', got {missing_expert!r}")
        self.discriminator = discriminator
        self.eps = eps
        self.missing_expert = missing_expert
        self._expert_scores: dict[tuple[str, str], float] = {}  # D(x, y*) is fixed: score it once

    def score(self, prompts: list[str], experts: list[str | None], rollouts: list[list[str]]) -> CriticScores:
        """D for P groups of G rollouts and for each prompt's expert (None or blank: the prompt has none).
        The inputs are checked here, so an error names the prompt and rollout, not a flattened position."""
        num_prompts = len(prompts)
        if len(experts) != num_prompts or len(rollouts) != num_prompts:
            raise ValueError(f"expected one expert and one group of rollouts per prompt; got {num_prompts} "
                             f"prompts, {len(experts)} experts and {len(rollouts)} groups")
        for i, ys in enumerate(rollouts):
            if not isinstance(ys, list | tuple):  # a flat list of strings would score each character
                raise TypeError(f"the rollouts of prompt {i} are {type(ys).__name__}, expected a list of str")
            if len(ys) != len(rollouts[0]):
                raise ValueError(f"prompt {i} has {len(ys)} rollouts but prompt 0 has {len(rollouts[0])}: "
                                 "every group must be of one size")
        group = len(rollouts[0]) if rollouts else 0
        for i, (prompt, expert) in enumerate(zip(prompts, experts, strict=True)):
            if not isinstance(prompt, str):
                raise TypeError(f"prompt {i} is {type(prompt).__name__}, expected str")
            if not isinstance(expert, str | None):
                raise TypeError(f"the expert of prompt {i} is {type(expert).__name__}, expected str or None")
        if not set(map(type, chain.from_iterable(rollouts))) <= {str}:  # one pass in C when all are fine
            for i, ys in enumerate(rollouts):
                for j, y in enumerate(ys):
                    if not isinstance(y, str):
                        raise TypeError(f"prompt {i}, rollout {j} is {type(y).__name__}, expected str "
                                        "(decode bytes first)")
        # A blank expert cannot anchor anything: it is a missing one.
        experts = [None if e is not None and not e.strip() else e for e in experts]
        missing = [i for i, e in enumerate(experts) if e is None]
        if missing and self.missing_expert == "error":
            raise KeyError(
                f"{len(missing)} of {num_prompts} prompts have no expert, first: prompt {missing[0]} "
                f"{prompts[missing[0]][:120]!r} (a blank expert counts as none). Add them to the expert bank "
                "or labels, or set missing_expert: skip."
            )
        disc = self.discriminator
        truncated_before = disc.truncated
        rows = [i for i in range(num_prompts) if experts[i] is not None or not disc.needs_expert]
        flat = disc.score(
            [prompts[i] for i in rows for _ in range(group)],
            [y for i in rows for y in rollouts[i]],
            [experts[i] for i in rows for _ in range(group)] if disc.needs_expert else None,
        )
        _require_finite(flat, [i for i in rows for _ in range(group)], "rollouts", prompts)
        if len(rows) == num_prompts:
            scores = flat.cpu().float().view(num_prompts, group)
        else:
            scores = torch.full((num_prompts, group), float("nan"))
            scores[rows] = flat.cpu().view(len(rows), group)

        pairs = list(zip(prompts, experts, strict=True))
        first = {}  # each (prompt, expert) pair's first prompt index, in batch order
        for i, pair in enumerate(pairs):
            first.setdefault(pair, i)
        new = [p for p in first if p[1] is not None and p not in self._expert_scores]
        if new:
            fresh = disc.score([p for p, _ in new], [e for _, e in new], [e for _, e in new], cached=True)
            _require_finite(fresh, [first[pair] for pair in new], "experts", prompts)
            self._expert_scores.update(zip(new, fresh.cpu().tolist(), strict=True))
        expert_scores = torch.tensor([self._expert_scores.get(pair, float("nan")) for pair in pairs])
        gaps = anchor_gaps(scores, expert_scores, self.eps)
        return CriticScores(scores, expert_scores, gaps, disc.truncated - truncated_before, len(missing))


def _require_finite(d: torch.Tensor, prompt_of: list[int], what: str, prompts: list[str]) -> None:
    """NaN in CriticScores means "no expert": a non-finite D (a broken head, fp16 overflow) must not pass for
    one, or its rollout gets the best shaping (0) and its prompt silently leaves the hard set."""
    bad = (~torch.isfinite(d.detach().cpu().float())).nonzero().flatten().tolist()
    if bad:
        first = prompt_of[bad[0]]
        raise RuntimeError(
            f"the discriminator returned a non-finite score for {len(bad)} of {len(d)} {what}, first: "
            f"prompt {first} {prompts[first][:120]!r}. Check its head and dtype (fp16 overflows)."
        )


def anchor_step(
    values, settings, scored: CriticScores, rewards: torch.Tensor, exploiting: torch.Tensor | None = None
) -> AnchorStep:
    """Shaping, hard set and metrics for one step's batch: `values` from the stage schedule, `settings` an
    AapaSettings, `rewards` (P, G) the task rewards, `exploiting` (P,) how many rollouts of each prompt
    exploit the reward's flaw (only the oracle selection reads it). In an SFT stage the rollouts carry the
    shaping alone."""
    base = torch.zeros_like(rewards, dtype=torch.float32) if values.objective == "sft" else rewards.float()
    shaped, shaping = shape_rewards(
        base.cpu(), scored.scores, values.alpha, settings.transform, settings.eps, settings.shaping_floor
    )
    hard, weights = choose_hard_set(
        scored.gaps, values.rho, settings.temperature, settings.selection, exploiting
    )
    # In numpy: a few microseconds each, where torch's small-tensor ops cost more than the rest.
    ok, d, e, g = (
        ~scored.scores.isnan().numpy(),
        scored.scores.numpy(),
        scored.expert_scores.numpy(),
        scored.gaps.numpy(),
    )
    rollout_d, expert_d, valid_gaps, s = d[ok], e[~np.isnan(e)], g[~np.isnan(g)], shaping.numpy()[ok]
    metrics = {
        "d_rollout_mean": _mean(rollout_d),
        "d_rollout_std": _std(rollout_d),
        "d_expert_mean": _mean(expert_d),
        "d_expert_std": _std(expert_d),
        "shaping_mean": _mean(s),
        "shaping_std": _std(s),
        # NaN: a rollout no reward could score (TRL's None), left out as the host leaves it out
        "reward_raw_mean": float(rewards.float().nanmean()),
        "reward_shaped_mean": float(shaped.nanmean()),
        "gap_mean": _mean(valid_gaps),
        "gap_max": float(valid_gaps.max()) if len(valid_gaps) else float("nan"),
        "hard_set_size": float(len(hard)),
        "encoder_truncations": float(scored.truncations),
        "missing_experts": float(scored.missing_experts),
    }
    return AnchorStep(shaped, shaping, hard, weights, metrics)


def _mean(x: np.ndarray) -> float:
    return float(x.mean(dtype=np.float64)) if x.size else float("nan")


def _std(x: np.ndarray) -> float:
    return float(x.std(dtype=np.float64)) if x.size else float("nan")
