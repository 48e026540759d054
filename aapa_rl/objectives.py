"""Objective math as pure functions of tensors: shared by the local trainer and the OpenRLHF adapter.

Shapes: B sequences, T tokens, P prompts with G rollouts each (B = P * G, consecutive groups).
Masks are 0/1 tensors of the same shape as the per-token values they select.
"""

from __future__ import annotations

import math

import torch

ADVANTAGE_ESTIMATORS = ("group_norm", "dr_grpo", "rloo")
LOSS_AGGREGATIONS = ("token-mean", "seq-mean-token-mean")
KL_ESTIMATORS = ("k1", "k2", "k3")
SHAPING_TRANSFORMS = ("log", "neg_log_one_minus", "logit")
EXPERT_OBJECTIVES = ("sft", "chord")  # the base objectives whose loss has an SFT term on the experts
SELECTIONS = ("gap", "random", "oracle", "all")  # how the hard set is chosen: choose_hard_set
# What every backend that cannot pass per-sample exploit flags to choose_hard_set says of `oracle`.
ORACLE_NEEDS_FLAW_BONUS = (
    "aapa.selection: oracle needs a reward that reports a per-sample `flaw_bonus`, which only the local "
    "trainer passes; use gap, random or all"
)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `x` where `mask` is set; 0 (not NaN) where the mask is empty."""
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def token_log_probs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log pi(target_t | ...) for every position: (B, T, V) logits, (B, T) targets -> (B, T)."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def group_advantages(rewards: torch.Tensor, group_size: int, estimator: str = "group_norm") -> torch.Tensor:
    """Per-sample advantages with a per-prompt baseline over consecutive groups of `group_size`.

    group_norm (GRPO): (r - mean) / (std + 1e-9); dr_grpo: r - mean; rloo: r - mean of the others.
    """
    if estimator not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {estimator!r}; choose one of {ADVANTAGE_ESTIMATORS}")
    if group_size < 2 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards cannot form groups of {group_size} (>= 2 per group)")
    r = rewards.float().reshape(-1, group_size)
    mean = r.mean(-1, keepdim=True)
    if estimator == "group_norm":
        # A group of equal rewards has no signal. In float32 its mean can miss them by an ulp (AAPA's shaped
        # rewards are not exact), which over std + 1e-9 gave every member the same advantage, up to +-500.
        spread = r.amax(-1, keepdim=True) - r.amin(-1, keepdim=True)
        adv = torch.where(spread > 0, (r - mean) / (r.std(-1, keepdim=True) + 1e-9), 0.0)
    elif estimator == "dr_grpo":
        adv = r - mean
    else:
        adv = r - (r.sum(-1, keepdim=True) - r) / (group_size - 1)
    return adv.reshape(-1)


def aggregate(loss: torch.Tensor, mask: torch.Tensor, agg: str = "token-mean") -> torch.Tensor:
    """Reduce a (B, T) per-token loss: mean over all tokens, or mean over sequences of their token mean."""
    if agg == "token-mean":
        return masked_mean(loss, mask)
    if agg == "seq-mean-token-mean":
        counts = mask.sum(-1)
        per_seq = (loss * mask).sum(-1) / (counts + 1e-8)
        return masked_mean(per_seq, (counts > 0).float())
    raise ValueError(f"unknown loss aggregation {agg!r}; choose one of {LOSS_AGGREGATIONS}")


def policy_loss(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    agg: str = "token-mean",
) -> torch.Tensor:
    """PPO/GRPO clipped surrogate; clip_high > clip_low is DAPO's clip-higher."""
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)
    ratio = (log_probs - old_log_probs).clamp(-20.0, 20.0).exp()
    unclipped = ratio * advantages
    clipped = ratio.clamp(1 - clip_low, 1 + clip_high) * advantages
    return aggregate(-torch.min(unclipped, clipped), mask, agg)


def approx_kl(log_probs: torch.Tensor, ref_log_probs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token KL(pi || ref) estimators k1/k2/k3 (Schulman), clamped to [-10, 10] like OpenRLHF."""
    log_ratio = log_probs.float() - ref_log_probs.float()
    if estimator == "k1":
        kl = log_ratio
    elif estimator == "k2":
        kl = log_ratio**2 / 2
    elif estimator == "k3":
        # Bounding before exp keeps the derivative finite where the clamp below would cut it anyway.
        lr = log_ratio.clamp(min=-10)
        kl = (-lr).exp() - 1 + lr
    else:
        raise ValueError(f"unknown KL estimator {estimator!r}; choose one of {KL_ESTIMATORS}")
    return kl.clamp(-10, 10)


def phi_weight(log_probs: torch.Tensor) -> torch.Tensor:
    """CHORD's token weight p(1-p), detached: it rescales tokens but must not be optimised itself."""
    p = log_probs.detach().exp()
    return p * (1 - p)


def sft_loss(log_probs: torch.Tensor, mask: torch.Tensor, phi: bool = False) -> torch.Tensor:
    """Token-mean negative log-likelihood, optionally phi-weighted (CHORD-phi)."""
    nll = -log_probs
    if phi:
        nll = nll * phi_weight(log_probs)
    return masked_mean(nll, mask)


def chord_mu(step: int, warmup_steps: int, decay_steps: int, peak: float, valley: float) -> float:
    """CHORD's mu(t): linear warm-up to `peak`, cosine decay to `valley`, then flat at the floor."""
    if step < warmup_steps:
        return peak * step / warmup_steps
    if step >= warmup_steps + decay_steps:
        return valley
    progress = (step - warmup_steps) / decay_steps
    return valley + (peak - valley) * 0.5 * (1 + math.cos(math.pi * progress))


def stage_loss_weights(objective: str, mu: float) -> tuple[float, float]:
    """(weight of the host's RL loss, weight of the SFT term on the experts) of a base objective; every
    backend adds lam * L_anchor to their sum. grpo: 1, 0. sft: 1, 1 (its RL term carries alpha * g(D)
    alone, zero without shaping). chord: 1 - mu, mu (CHORD's mix, the host's KL included)."""
    return {"grpo": (1.0, 0.0), "sft": (1.0, 1.0), "chord": (1.0 - mu, mu)}[objective]


def stage_loss(
    host_loss: torch.Tensor, sft_term: torch.Tensor, anchor_term: torch.Tensor, objective: str, mu: float,
    lam: float
) -> torch.Tensor:
    """The stage's whole loss for a backend that gets the host's loss as one tensor: the weighted host loss
    and SFT term (stage_loss_weights) plus lam * L_anchor. A weight-0 SFT term is left out, not multiplied
    by 0: grpo batches carry no SFT expert."""
    host_weight, sft_weight = stage_loss_weights(objective, mu)
    loss = host_weight * host_loss
    if sft_weight:
        loss = loss + sft_weight * sft_term
    return loss + lam * anchor_term


def shaping_signal(scores: torch.Tensor, transform: str = "log", eps: float = 1e-6) -> torch.Tensor:
    """s = g(D) for discriminator scores D in (0, 1); every transform is increasing in D."""
    d = scores.float().clamp(eps, 1 - eps)
    if transform == "log":
        return torch.log(d)
    if transform == "neg_log_one_minus":
        return -torch.log1p(-d)
    if transform == "logit":
        return torch.log(d) - torch.log1p(-d)
    raise ValueError(f"unknown shaping transform {transform!r}; choose one of {SHAPING_TRANSFORMS}")


def shape_rewards(
    rewards: torch.Tensor,
    scores: torch.Tensor,
    alpha: float,
    transform: str = "log",
    eps: float = 1e-6,
    floor: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(r + alpha * s, s) with s = g(D), clamped from below at `floor` when given; s = 0 where D is NaN (a
    prompt the discriminator could not score)."""
    signal = shaping_signal(scores, transform, eps)
    if floor is not None:
        signal = signal.clamp(min=floor)
    shaping = torch.where(~scores.isnan(), signal, 0.0)
    return rewards.detach().float() + alpha * shaping, shaping


def stage_estimator(objective: str, estimator: str) -> str:
    """The advantage estimator a stage uses: the SFT stage's policy-gradient term is shaping alone, and alpha
    must scale it, so its baseline is the plain group mean (no division by the group's std)."""
    return "dr_grpo" if objective == "sft" else estimator


def anchor_gaps(rollout_scores: torch.Tensor, expert_scores: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """g_i = log D(x_i, y*_i) - mean_j log D(x_i, y_ij): how much less expert-like the rollouts look."""
    log_rollouts = rollout_scores.float().clamp(min=eps).log().mean(-1)
    return expert_scores.float().clamp(min=eps).log() - log_rollouts


def hard_set_budget(rho: float, num_prompts: int) -> int:
    """ceil(rho * P), the most prompts H may hold. A product within a relative 1e-12 of an integer counts as
    that integer, so float noise (0.1 * 30 = 3.0000000000000004) adds no prompt while a real excess does."""
    size = rho * num_prompts
    nearest = round(size)
    return nearest if math.isclose(size, nearest, rel_tol=1e-12) else math.ceil(size)


def select_hard_set(
    gaps: torch.Tensor, rho: float, temperature: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """H = the ceil(rho * P) prompts with the largest positive gap; weights |H| * softmax(g / T) over H.

    Uniform weights (all 1) when `temperature` is None; every member's weight is > 0. Ties keep the lower
    index first. A NaN gap (a prompt without an expert) is never chosen.
    """
    if not 0.0 <= rho <= 1.0:
        raise ValueError(f"rho must be in [0, 1], got {rho}")
    budget = hard_set_budget(rho, gaps.numel())
    gaps = torch.where(gaps.isnan(), float("-inf"), gaps.float())  # a descending sort puts NaN first
    order = torch.sort(gaps, descending=True, stable=True).indices
    chosen = order[:budget]
    chosen = chosen[gaps[chosen] > 0]
    if chosen.numel() == 0 or temperature is None:
        return chosen, torch.ones(chosen.numel(), dtype=torch.float32, device=gaps.device)
    # Floored at the smallest normal float: a weight that underflowed to 0 would drop its expert from H
    # wherever a backend marks H by w > 0, and L_anchor's denominator counts every expert of H.
    weights = chosen.numel() * torch.softmax(gaps[chosen] / temperature, dim=0)
    return chosen, weights.clamp(min=torch.finfo(weights.dtype).tiny)


def choose_hard_set(
    gaps: torch.Tensor,
    rho: float,
    temperature: float | None = None,
    selection: str = "gap",
    exploiting: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The hard set H and its weights. NaN gaps (prompts without an expert) are never chosen.

    "gap": the spec's rule (select_hard_set). "random": ceil(rho * P) prompts with a gap, drawn with torch's
    global generator, weights 1: the same budget blind to the critic. "oracle": the ceil(rho * P) prompts
    with the most exploiting rollouts (`exploiting`, (P,) counts; ties: larger gap first), weights 1: an
    upper bound that needs the reward to say which rollouts exploit its flaw. "all": every prompt with a
    gap, weights rho.
    """
    if selection == "gap":
        return select_hard_set(gaps, rho, temperature)
    if selection not in SELECTIONS:
        raise ValueError(f"unknown selection {selection!r}; choose one of {SELECTIONS}")
    have = torch.nonzero(~gaps.isnan()).flatten()
    budget = hard_set_budget(rho, gaps.numel())
    ones = torch.ones(min(budget, len(have)), dtype=torch.float32, device=gaps.device)
    if selection == "random":
        return have[torch.randperm(len(have))[:budget]], ones
    if selection == "oracle":
        if exploiting is None:
            raise ValueError(ORACLE_NEEDS_FLAW_BONUS)
        by_gap = have[torch.sort(gaps[have], descending=True, stable=True).indices]
        order = by_gap[torch.sort(exploiting[by_gap], descending=True, stable=True).indices]
        return order[:budget], ones
    # "all": anchor_loss is a token mean over H, so weights rho make it rho x the mean expert NLL, and
    # lam sum_i w_i |y*_i| (aapa/anchor_budget) equals the top-k's lam k |y*| on equal-length experts: the
    # same anchor budget rho x lam spread evenly over all prompts (CHORD-like mixing).
    return have, torch.full((len(have),), float(rho), device=gaps.device)


def anchor_loss(
    log_probs: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor, phi: bool = False
) -> torch.Tensor:
    """L_anchor = sum_i w_i sum_t -log pi(y*_it) / sum_i |y*_i| over the hard set (rows of the inputs).

    An empty hard set gives an exact zero that still carries a graph (no NaN), so every rank can backward.
    """
    nll = -log_probs * mask
    if phi:
        nll = nll * phi_weight(log_probs)
    per_row = nll.sum(-1)
    return (weights.to(per_row.dtype) * per_row).sum() / mask.sum().clamp(min=1)


def selection_diagnostics(
    gaps: torch.Tensor, hard_set: torch.Tensor, exploiting: torch.Tensor
) -> dict[str, float]:
    """How well the critic finds the prompts whose rollouts exploit a flaw, when the reward knows them.

    gaps (P,) anchor gaps (NaN: no expert), hard_set (k,) the chosen prompt indices, exploiting (P,) bool.
    hard_precision: the fraction of H that exploits; hard_recall: the fraction of exploiting prompts in H;
    gap_auroc: the probability that an exploiting prompt's gap exceeds a non-exploiting one's (ties count
    half), among prompts with a finite gap. Each is NaN where undefined.
    """
    exploiting = exploiting.bool()
    hits = exploiting[hard_set]
    count = int(exploiting.sum())
    finite = gaps.isfinite()
    pos, neg = gaps[finite & exploiting].double(), gaps[finite & ~exploiting].double()
    auroc = math.nan
    if len(pos) and len(neg):
        # Every (exploiting, other) pair: the Mann-Whitney U statistic, normalised.
        wins = (pos[:, None] > neg[None, :]).double() + 0.5 * (pos[:, None] == neg[None, :]).double()
        auroc = float(wins.mean())
    return {
        "hard_precision": float(hits.double().mean()) if len(hits) else math.nan,
        "hard_recall": float(hits.sum()) / count if count else math.nan,
        "gap_auroc": auroc,
        "exploiting_prompts": float(count),
    }
