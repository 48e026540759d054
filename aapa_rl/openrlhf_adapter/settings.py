"""The `--aapa.*` flags (the fields of aapa_rl.settings.AapaSettings, plus where to score) and what AAPA
refuses: all checked before Ray starts.

OpenRLHF's parser rejects unknown flags, so the launcher parses `--aapa.*` apart and hands the rest on.
Nested values (stages, the adaptive-lambda controller, CHORD's settings) travel as JSON strings so that the
printed command is complete and can be pasted into a shell or a `ray job submit` entrypoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pickle
import typing
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import torch

from aapa_rl.objectives import ORACLE_NEEDS_FLAW_BONUS
from aapa_rl.settings import AapaSettings, ConfigError, build

PREFIX = "--aapa."
SCORE_ON = ("actors", "driver")  # the one OpenRLHF-only setting: where the discriminator runs
# OpenRLHF's advantage estimators with a per-prompt group baseline (GAE has none).
GROUP_ESTIMATORS = ("group_norm", "dr_grpo", "rloo", "reinforce_baseline")

# (flag, is_refused(value), why): each would break an assumption AAPA makes about the batch it sees.
REFUSALS: list[tuple[str, Callable[[object], bool], str]] = [
    ("train.async_enable", bool,
     "async training builds its own trainer, so the AAPA driver would never be installed"),
    ("train.dynamic_batch_enable", bool,
     "dynamic batching re-splits micro-batches and rescales losses per sample; the anchor normaliser "
     "assumes fixed micro-batches"),
    ("ds.ring_attn_size", lambda v: v > 1,
     "ring attention shards each sequence across ranks; the anchor forward does not"),
    ("ds.tensor_parallel_size", lambda v: v > 1,
     "tensor parallel ranks duplicate micro-batches; anchor weights would be counted once per duplicate"),
]


class AapaConfigError(ConfigError):
    """A bad `--aapa.*` flag or recipe entry; the message names it."""


def parse_json(text: str):
    return json.loads(text)


def _structured(hint) -> bool:
    """A list or a dataclass (or one of them or null): given as JSON."""
    options = typing.get_args(hint) or (hint,)
    return any(dataclasses.is_dataclass(t) or typing.get_origin(t) is list for t in options)


def parser() -> argparse.ArgumentParser:
    """One flag per AapaSettings field (structured ones as JSON) and --aapa.score_on; a flag not given is
    absent from the parsed namespace, so the schema's defaults apply."""
    p = argparse.ArgumentParser(prog="python -m aapa_rl.openrlhf_adapter.launch", allow_abbrev=False,
                                add_help=False, argument_default=argparse.SUPPRESS,
                                description="AAPA flags; every other flag goes to OpenRLHF.")
    hints = typing.get_type_hints(AapaSettings)
    for f in dataclasses.fields(AapaSettings):
        flag, help, hint = f"{PREFIX}{f.name}", f.metadata["help"], hints[f.name]
        if hint is bool:
            p.add_argument(flag, action="store_true", help=help)
        elif _structured(hint):
            p.add_argument(flag, type=parse_json, help=f"JSON: {help}")
        else:
            p.add_argument(flag, help=help)  # converted and checked by aapa_rl.settings.build
    p.add_argument(f"{PREFIX}score_on", choices=SCORE_ON,
                   help="score rollouts on the policy GPUs (actors, default) or the trainer's CPU (driver)")
    return p


def dests() -> set[str]:
    """The recipe keys of the `aapa:` section (e.g. `stages`)."""
    return {f.name for f in dataclasses.fields(AapaSettings)} | {"score_on"}


def split_argv(argv: list[str]) -> tuple[AapaSettings, str, list[str]]:
    """Take the `--aapa.*` flags out of `argv`: (AAPA settings, where to score, the flags for OpenRLHF)."""
    bare = {f"{PREFIX}{name}" for name, hint in typing.get_type_hints(AapaSettings).items() if hint is bool}
    for flag, token in zip(argv, argv[1:], strict=False):
        if flag in bare and not token.startswith("--"):  # else OpenRLHF's parser blames the flag before it
            raise AapaConfigError(f"{flag} takes no value (give it to turn it on), got {token!r}")
    flat, rest = parser().parse_known_args(argv)
    unknown = [arg for arg in rest if arg.startswith(PREFIX)]
    if unknown:
        raise AapaConfigError(f"unknown AAPA flag {unknown[0].split('=')[0]}; known: {sorted(dests())}")
    given = {k.removeprefix("aapa."): v for k, v in vars(flat).items()}
    score_on = given.pop("score_on", "actors")
    try:
        settings = build(AapaSettings, given, "--aapa")
    except ConfigError as e:
        raise AapaConfigError(str(e)) from None
    if settings.discriminator is None:
        raise AapaConfigError("--aapa.discriminator is required: the directory of a trained discriminator")
    if settings.selection == "oracle":
        raise AapaConfigError(ORACLE_NEEDS_FLAW_BONUS)
    return settings, score_on, rest


def check_files(aapa: AapaSettings) -> list[str]:
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


def refused(get: Callable[[str], object], aapa: AapaSettings) -> list[str]:
    """Messages for the OpenRLHF settings AAPA does not support (with these AAPA stages); `get(name)` reads a
    flag's value."""
    problems = [f"--{flag} is not supported with AAPA: {why}" for flag, is_refused, why in REFUSALS
                if is_refused(get(flag))]
    # The spec's SFT stage: reward alpha * g(D) with a group-mean baseline. reinforce whitens it over the
    # batch (alpha then has no effect), flash_reinforce subtracts the batch mean, gae a critic's value.
    estimator = get("algo.advantage.estimator")
    if estimator not in GROUP_ESTIMATORS:
        problems += [f"--algo.advantage.estimator {estimator} is not supported with an AAPA sft stage "
                     f"(--aapa.stages[{i}]): its shaping reward needs a group-mean baseline, which only "
                     f"{', '.join(GROUP_ESTIMATORS)} give"
                     for i, stage in enumerate(aapa.stages) if stage.objective == "sft"]
    return problems + resume_refusals(get, aapa)


def resume_refusals(get: Callable[[str], object], aapa: AapaSettings) -> list[str]:
    """With --ckpt.load_enable, the checkpoint OpenRLHF would resume from must fit this run: its stage list,
    and as many policy ranks as wrote its ZeRO optimizer state (DeepSpeed refuses another count, after the
    models load). Read here, before anything starts; the trainer checks the stages again where it restores
    the checkpoint."""
    actor = Path(str(get("ckpt.path"))) / "_actor"
    latest = actor / "latest"  # DeepSpeed's pointer to the newest tag, which OpenRLHF's resume loads
    if not get("ckpt.load_enable") or not latest.is_file():
        return []
    tag = actor / latest.read_text().strip()
    try:  # mmap: the weights stored beside the client state are not read
        state = torch.load(sorted(tag.glob("*model_states.pt"))[0], map_location="cpu", mmap=True,
                           weights_only=False)
    except (IndexError, OSError, RuntimeError, pickle.UnpicklingError):
        return []  # not readable here: DeepSpeed's own load will say why
    problems = []
    ranks, saved_ranks = get("actor.num_nodes") * get("actor.num_gpus_per_node"), state.get("dp_world_size")
    if get("ds.zero_stage") and not get("ds.use_universal_ckpt") and saved_ranks not in (None, ranks):
        problems.append(f"--ckpt.load_enable: the checkpoint {tag} was written by {saved_ranks} policy ranks "
                        f"and this layout has {ranks} (--actor.num_nodes x --actor.num_gpus_per_node): "
                        "DeepSpeed cannot split its ZeRO optimizer state over another number of ranks; "
                        "resume with the saved layout, or start afresh with another --ckpt.path or without "
                        "--ckpt.load_enable")
    if state.get("aapa") and (problem := stage_list_refusal(state["aapa"], aapa, str(actor))):
        problems.append(problem)
    return problems


def stage_list_refusal(saved: dict, aapa: AapaSettings, checkpoint: str) -> str | None:
    """Why a checkpoint's AAPA state (`saved`) cannot resume with these settings, or None."""
    try:
        aapa.schedule().load_state_dict(saved["schedule"])
    except ValueError:  # the schedule's message cannot know the checkpoint or the flags
        return (f"--aapa.stages differs from the stage list saved in the checkpoint {checkpoint} "
                "(resumed because --ckpt.load_enable is set):\n"
                f"  saved: {json.dumps(saved['schedule']['stages'])}\n"
                f"  given: {json.dumps(aapa.schedule().state_dict()['stages'])}\n"
                "To resume, pass the saved list (--aapa.stages, or the recipe's aapa.stages); to train with "
                "the new one, start afresh with another --ckpt.path or without --ckpt.load_enable.")
    return None


def refuse_unsupported(args: SimpleNamespace) -> None:
    """Stop with a message naming the flag, on OpenRLHF's parsed (nested) arguments, before any GPU work."""
    def get(flag: str) -> object:
        node = args
        for part in flag.split("."):
            node = getattr(node, part)
        return node

    problems = refused(get, args.aapa)
    if problems:
        raise SystemExit("aapa-rl: " + "\n".join(problems))
