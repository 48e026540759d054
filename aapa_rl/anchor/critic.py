"""The adversarial anchor critic: one call per batch gives shaped rewards, anchor gaps and the hard set H."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from aapa_rl.objectives import anchor_gaps, select_hard_set, shaping_signal

from .bank import ExpertBank
from .discriminator import Discriminator


@dataclass
class CriticResult:
    scores: torch.Tensor  # (P, G) D of the rollouts; NaN where it needs an expert the prompt lacks
    expert_scores: torch.Tensor  # (P,) D of the experts; NaN without one
    shaping: torch.Tensor  # (P, G) s_ij = g(D), 0 where D is NaN
    shaped_rewards: torch.Tensor  # (P, G) r_ij + alpha * s_ij
    gaps: torch.Tensor  # (P,) anchor gaps; NaN without an expert
    hard_set: torch.Tensor  # (k,) prompt indices
    hard_weights: torch.Tensor  # (k,)
    experts: list[str | None]  # (P,)
    metrics: dict[str, float]


class AnchorCritic:
    """Scores rollouts against the expert bank with a frozen discriminator (AAPA's two signals)."""

    def __init__(self, discriminator: Discriminator, bank: ExpertBank, *, temperature: float | None = None,
                 eps: float = 1e-6, transform: str = "log", missing_expert: str = "error"):
        if missing_expert not in ("error", "skip"):
            raise ValueError(f"missing_expert must be 'error' or 'skip', got {missing_expert!r}")
        self.discriminator = discriminator
        self.bank = bank
        self.temperature = temperature
        self.eps = eps
        self.transform = transform
        self.missing_expert = missing_expert
        self._expert_scores: dict[tuple[str, str], float] = {}  # D(x, y*) is fixed: score it once

    def evaluate(self, prompts: list[str], rollouts: list[list[str]], rewards: torch.Tensor, *,
                 alpha: float, rho: float) -> CriticResult:
        num_prompts = len(prompts)
        group = rewards.shape[1] if rewards.dim() == 2 else -1
        if rewards.shape[0] != num_prompts or len(rollouts) != num_prompts or \
                any(len(r) != group for r in rollouts):
            sizes = sorted({len(r) for r in rollouts})
            raise ValueError(f"expected {num_prompts} prompts, {num_prompts} groups of rollouts and rewards "
                             f"(P, G) of the same sizes; got {len(rollouts)} groups (sizes {sizes}) "
                             f"and rewards {tuple(rewards.shape)}")
        disc = self.discriminator
        experts = [self.bank.expert_for(prompt=p) for p in prompts]
        missing = [i for i, e in enumerate(experts) if e is None]
        if missing and self.missing_expert == "error":
            raise KeyError(f"{len(missing)} of {num_prompts} prompts have no expert in {self.bank.source}, "
                           f"first: prompt {missing[0]} {prompts[missing[0]][:120]!r}. "
                           "Add them to the bank or set missing_expert='skip'.")
        truncated_before = disc.truncated

        rows = [i for i in range(num_prompts) if experts[i] is not None or not disc.needs_expert]
        flat = disc.score([prompts[i] for i in rows for _ in range(group)],
                          [y for i in rows for y in rollouts[i]],
                          [experts[i] for i in rows for _ in range(group)] if disc.needs_expert else None)
        if len(rows) == num_prompts:
            scores = flat.cpu().float().view(num_prompts, group)
        else:
            scores = torch.full((num_prompts, group), float("nan"))
            scores[rows] = flat.cpu().view(len(rows), group)

        pairs = list(zip(prompts, experts, strict=True))
        new = [p for p in dict.fromkeys(pairs) if p[1] is not None and p not in self._expert_scores]
        if new:
            fresh = disc.score([p for p, _ in new], [e for _, e in new], [e for _, e in new], cached=True)
            self._expert_scores.update(zip(new, fresh.cpu().tolist(), strict=True))
        expert_scores = torch.tensor([self._expert_scores.get(pair, float("nan")) for pair in pairs])

        scored = ~scores.isnan()
        shaping = torch.where(scored, shaping_signal(scores, self.transform, self.eps), 0.0)
        shaped = rewards.detach().float().cpu() + alpha * shaping
        gaps = anchor_gaps(scores, expert_scores, self.eps)
        hard_set, hard_weights = select_hard_set(gaps.nan_to_num(nan=float("-inf")), rho, self.temperature)

        # Metrics in numpy: a few microseconds each, where torch's small-tensor ops cost more than the rest.
        ok, d, e, g = scored.numpy(), scores.numpy(), expert_scores.numpy(), gaps.numpy()
        rollout_d, expert_d, valid_gaps, s = d[ok], e[~np.isnan(e)], g[~np.isnan(g)], shaping.numpy()[ok]
        metrics = {
            "d_rollout_mean": _mean(rollout_d), "d_rollout_std": _std(rollout_d),
            "d_expert_mean": _mean(expert_d), "d_expert_std": _std(expert_d),
            "shaping_mean": _mean(s), "shaping_std": _std(s),
            "reward_mean": float(rewards.float().mean()), "shaped_reward_mean": float(shaped.mean()),
            "gap_mean": _mean(valid_gaps),
            "gap_max": float(valid_gaps.max()) if len(valid_gaps) else float("nan"),
            "hard_set_size": float(len(hard_set)),
            "truncations": float(disc.truncated - truncated_before),
            "missing_experts": float(len(missing)),
        }
        dev = rewards.device
        return CriticResult(scores.to(dev), expert_scores.to(dev), shaping.to(dev), shaped.to(dev),
                            gaps.to(dev), hard_set.to(dev), hard_weights.to(dev), experts, metrics)


def _mean(x: np.ndarray) -> float:
    return float(x.mean(dtype=np.float64)) if x.size else float("nan")


def _std(x: np.ndarray) -> float:
    return float(x.std(dtype=np.float64)) if x.size else float("nan")
