"""The frozen discriminator's critic, built alike in the trainer process (CPU) and on the policy ranks."""

from __future__ import annotations

from aapa_rl.anchor import AnchorCritic, load_discriminator
from aapa_rl.settings import AapaSettings


def build_critic(aapa: AapaSettings, device: str | None = None) -> AnchorCritic:
    disc = load_discriminator(aapa.discriminator, force=aapa.force_discriminator, device=device)
    return AnchorCritic(disc, eps=aapa.eps, missing_expert=aapa.missing_expert)
