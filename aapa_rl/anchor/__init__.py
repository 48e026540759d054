"""The adversarial anchor: expert bank, frozen sentence-level discriminator and anchor critic.

Framework-free (torch only). Names are imported lazily so `aapa-rl --help` does not pay for torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ExpertBank": "bank", "ExpertRecord": "bank", "DataError": "bank", "label_expert": "bank",
    "load_encoder": "encoders", "HashEncoder": "encoders", "SentenceEncoder": "encoders",
    "EmbeddingCache": "encoders",
    "Discriminator": "discriminator", "build_discriminator": "discriminator",
    "load_discriminator": "discriminator", "DiscriminatorQualityError": "discriminator",
    "VARIANTS": "discriminator",
    "AnchorCritic": "critic", "CriticScores": "critic", "AnchorStep": "critic", "anchor_step": "critic",
    "train_discriminator": "training",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
