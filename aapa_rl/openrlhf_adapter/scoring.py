"""Discriminator scoring of rollout groups, shared by the trainer process (CPU) and the policy ranks (GPU)."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from aapa_rl.anchor import AnchorCritic, ExpertBank, ExpertRecord, load_discriminator


def build_critic(aapa: SimpleNamespace, device: str | None = None) -> AnchorCritic:
    """The frozen discriminator in an AnchorCritic; its bank is replaced per batch by the labels' experts."""
    disc = load_discriminator(aapa.discriminator, force=aapa.force_discriminator, device=device)
    return AnchorCritic(disc, ExpertBank([], source="<no batch yet>"), temperature=aapa.temperature,
                        eps=aapa.eps, transform=aapa.transform, missing_expert=aapa.missing_expert)


def score_groups(critic: AnchorCritic, prompts: list[str], experts: list[str | None],
                 rollouts: list[list[str]], rewards: torch.Tensor, alpha: float) -> dict[str, torch.Tensor]:
    """D, shaping and gaps for P groups of G rollouts (rewards (P, G)); the hard set is chosen by the caller
    over the whole rollout batch, so a chunk scored on one rank never selects on its own."""
    records = [ExpertRecord(p, e, None, None, i)
               for i, (p, e) in enumerate(zip(prompts, experts, strict=True)) if e is not None]
    critic.bank = ExpertBank(records, source="the label dicts of this rollout batch")
    result = critic.evaluate(prompts, rollouts, rewards, alpha=alpha, rho=0.0)
    return {
        "scores": result.scores.cpu(),
        "expert_scores": result.expert_scores.cpu(),
        "shaping": result.shaping.cpu(),
        "shaped_rewards": result.shaped_rewards.cpu(),
        "gaps": result.gaps.cpu(),
        "truncations": torch.tensor(result.metrics["truncations"]),
        "missing_experts": torch.tensor(result.metrics["missing_experts"]),
    }
