"""The `--aapa.*` flags, their stage schedule and what AAPA refuses: all checked before Ray starts.

OpenRLHF's parser rejects unknown flags, so the launcher parses `--aapa.*` apart and hands the rest on.
Nested values (stages, the adaptive-lambda controller, CHORD's mu schedule) travel as JSON strings so that
the printed command is complete and can be pasted into a shell or a `ray job submit` entrypoint.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

from aapa_rl.objectives import SHAPING_TRANSFORMS
from aapa_rl.schedule import AdaptiveLambda, Stage, StageSchedule

PREFIX = "--aapa."
CHORD_KEYS = {"warmup_steps", "decay_steps", "peak", "valley"}

# (flag, is_refused(value), why): each would break an assumption AAPA makes about the batch it sees.
REFUSALS: list[tuple[str, Callable[[object], bool], str]] = [
    ("train.async_enable", bool,
     "async training builds its own trainer, so the AAPA driver would never be installed"),
    ("train.dynamic_batch_enable", bool,
     "dynamic batching re-splits micro-batches and rescales losses per sample; the anchor normaliser "
     "assumes fixed micro-batches"),
    ("ds.ring_attn_size", lambda v: int(v) > 1,
     "ring attention shards each sequence across ranks; the anchor forward does not"),
    ("ds.tensor_parallel_size", lambda v: int(v) > 1,
     "tensor parallel ranks duplicate micro-batches; anchor weights would be counted once per duplicate"),
]


class AapaConfigError(ValueError):
    """A bad `--aapa.*` flag or recipe entry; the message names it."""


def parse_json(text: str):
    return json.loads(text)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m aapa_rl.openrlhf_adapter.launch", allow_abbrev=False,
                                add_help=False, description="AAPA flags; every other flag goes to OpenRLHF.")
    a = p.add_argument
    a("--aapa.discriminator", required=True, help="directory written by `aapa-rl discriminator train`")
    a("--aapa.expert_bank", default=None,
      help="expert bank (JSONL/parquet/datasets dir): experts for labels that carry an `id` but no `expert`")
    a("--aapa.stages", type=parse_json, required=True,
      help='JSON list: [{"end_step": 50, "objective": "sft", "lam": 1.0, "alpha": 0.1, "rho": 0.25}, ...]')
    a("--aapa.adaptive", type=parse_json, default=None,
      help='JSON adaptive-lambda controller: {"target_gap": 0.5, "rate": 0.1, "lam_min": 0, "lam_max": 10}')
    a("--aapa.chord", type=parse_json, default=None,
      help='JSON CHORD mu schedule for "chord" stages: {"warmup_steps", "decay_steps", "peak", "valley"}')
    a("--aapa.temperature", type=float, default=None,
      help="softmax temperature of the anchor weights (default: uniform)")
    a("--aapa.transform", choices=SHAPING_TRANSFORMS, default="log", help="shaping s = g(D)")
    a("--aapa.eps", type=float, default=1e-6, help="floor on D inside logs")
    a("--aapa.anchor_phi", action="store_true", help="weight anchor tokens by p(1-p) (CHORD-style)")
    a("--aapa.missing_expert", choices=["error", "skip"], default="error",
      help="a prompt without an expert: stop, or leave it out of the hard set and count it")
    a("--aapa.force_discriminator", action="store_true",
      help="use a discriminator whose held-out AUROC is below 0.6")
    a("--aapa.score_on", choices=["actors", "driver"], default="actors",
      help="score rollouts on the policy GPUs (default) or on the CPU of the trainer process")
    return p


def dests() -> dict[str, argparse.Action]:
    """Recipe key (e.g. `stages`) -> its argparse action."""
    return {a.dest.removeprefix("aapa."): a for a in parser()._actions if a.dest.startswith("aapa.")}


def split_argv(argv: list[str]) -> tuple[SimpleNamespace, list[str]]:
    """Take the `--aapa.*` flags out of `argv`; returns (aapa settings, the flags left for OpenRLHF)."""
    flat, rest = parser().parse_known_args(argv)
    unknown = [arg for arg in rest if arg.startswith(PREFIX)]
    if unknown:
        raise AapaConfigError(f"unknown AAPA flag {unknown[0].split('=')[0]}; known: {sorted(dests())}")
    return SimpleNamespace(**{k.removeprefix("aapa."): v for k, v in vars(flat).items()}), rest


def build_schedule(aapa: SimpleNamespace) -> StageSchedule:
    if not isinstance(aapa.stages, list) or not aapa.stages:
        raise AapaConfigError("--aapa.stages must be a non-empty JSON list of stages")
    stages = []
    for i, stage in enumerate(aapa.stages):
        try:
            stages.append(Stage(**stage))
        except (TypeError, ValueError) as e:
            raise AapaConfigError(f"--aapa.stages[{i}] {stage!r}: {e}") from e
    if any(s.objective == "chord" for s in stages):
        if not isinstance(aapa.chord, dict) or set(aapa.chord) != CHORD_KEYS:
            raise AapaConfigError(f"a chord stage needs --aapa.chord with exactly the keys "
                                  f"{sorted(CHORD_KEYS)}, got {aapa.chord!r}")
    try:
        adaptive = None if aapa.adaptive is None else AdaptiveLambda(**aapa.adaptive)
        return StageSchedule(stages, adaptive)
    except (TypeError, ValueError) as e:
        raise AapaConfigError(f"--aapa.stages / --aapa.adaptive: {e}") from e


def check_files(aapa: SimpleNamespace) -> list[str]:
    """Problems with the files AAPA reads (empty when none): checked on the launching machine."""
    from aapa_rl.anchor.discriminator import quality_problem

    problems = []
    disc = Path(aapa.discriminator)
    if not (disc / "config.json").exists():
        problems.append(f"--aapa.discriminator {disc}: not a discriminator directory (no config.json)")
    else:
        found = None if aapa.force_discriminator else quality_problem(disc)
        if found:
            problems.append(f"--aapa.discriminator {disc} {found} "
                            "(retrain it, or pass --aapa.force_discriminator)")
    if aapa.expert_bank is not None and not Path(aapa.expert_bank).exists():
        problems.append(f"--aapa.expert_bank {aapa.expert_bank}: no such file or directory")
    return problems


def refused(get: Callable[[str], object]) -> list[str]:
    """Messages for the OpenRLHF settings AAPA does not support; `get(name)` reads a flag's value."""
    return [f"--{flag} is not supported with AAPA: {why}" for flag, is_refused, why in REFUSALS
            if is_refused(get(flag))]


def refuse_unsupported(args: SimpleNamespace) -> None:
    """Stop with a message naming the flag, on OpenRLHF's parsed (nested) arguments, before any GPU work."""
    def get(flag: str) -> object:
        node = args
        for part in flag.split("."):
            node = getattr(node, part)
        return node

    problems = refused(get)
    if problems:
        raise SystemExit("aapa-rl: " + "\n".join(problems))
