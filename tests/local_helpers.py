"""Shared pieces of the local-trainer tests: one SFT-warmed tiny model and one discriminator per session.

Both are built once (memoised here, so every test module that asks gets the same directories) into a
temporary directory that lives as long as the test process.
"""

from __future__ import annotations

import atexit
import functools
import json
import shutil
import tempfile
from pathlib import Path

import torch

# A small version of the demo task: enough rows for a few steps, quick to write.
# A reward file that raises from the third step's rollouts on (the startup label check scores "" only).
RAISING_REWARD = (
    "import torch\nCALLS = []\n"
    "def batch_reward(responses, labels):\n"
    "    CALLS.extend([1] if any(responses) else [])\n"
    "    if len(CALLS) >= 3:\n"
    "        raise KeyError('no such label')\n"
    "    return torch.ones(len(responses)), {}\n"
)
TASK = {"seed": 0, "n_sft": 300, "n_train": 64, "n_eval": 16, "flawed_fraction": 0.05}
_ROOT = Path(tempfile.mkdtemp(prefix="aapa-local-tests-"))
atexit.register(shutil.rmtree, _ROOT, ignore_errors=True)


def base_recipe(out: Path, *, stages: list | None = None, aapa: dict | None = None, **extra) -> dict:
    """A tiny recipe; `stages` and `aapa` fill its `aapa:` section, everything else its top level."""
    recipe = {
        "out": str(out),
        "steps": 2,
        "seed": 0,
        "threads": 1,
        "task": dict(TASK),
        "rollout": {"prompts_per_step": 4, "group_size": 4, "max_new_tokens": 40},
        "optim": {"lr": 1e-3},
        "loss": {"sft_batch_size": 8},
        "aapa": {"stages": stages or [{"end_step": 2, "objective": "grpo"}], **(aapa or {})},
        "log": {"eval_every": 0, "eval_samples": 8, "save_every": 0, "plots": False},
    }
    recipe.update(extra)
    return recipe


@functools.cache
def warm_run() -> Path:
    """The run directory of 40 SFT steps from scratch (its metrics hold the SFT loss curve)."""
    from aapa_rl.local.recipe import load_recipe
    from aapa_rl.local.trainer import Trainer

    torch.set_num_threads(1)
    out = _ROOT / "warm"
    recipe = base_recipe(
        out,
        steps=40,
        stages=[{"end_step": 40, "objective": "sft"}],
        optim={"lr": 3e-3, "warmup_steps": 10, "lr_schedule": "cosine"},
        loss={"sft_batch_size": 32},
    )
    Trainer(load_recipe(None, base=recipe), progress=False).fit()
    return out


@functools.cache
def discriminator_dir() -> Path:
    """A pairwise discriminator on the hashing encoder, trained on the task's experts vs generic negatives."""
    from aapa_rl.anchor import ExpertBank, build_discriminator, train_discriminator

    bank = ExpertBank.load(warm_run() / "data" / "experts.jsonl")
    out = _ROOT / "disc"
    disc = build_discriminator("pairwise", "hash", cache_dir=out / "embedding_cache")
    train_discriminator(disc, bank, [], out, steps=100)
    return out


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
