"""A local run's directory: starting or resuming it, its logs, and its checkpoints.

It holds config.yaml, metrics.jsonl (one row per step, eval rows prefixed `eval/`), scores.jsonl (per-step
D and log-prob samples), tb/ (TensorBoard), eval/ (per-sample eval records), checkpoints/step_N/
(save_pretrained + trainer_state.pt, which also keeps the recipe), final (a link to the last checkpoint),
plots/*.png and summary.json.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import yaml

from aapa_rl.local import plots
from aapa_rl.local.recipe import Recipe, recipe_dict
from aapa_rl.settings import ConfigError, build

RUN_MARKERS = ("metrics.jsonl", "checkpoints")  # written once a run has started; config.yaml comes before
# What a start writes before its run log opens (Trainer.__init__: prepare, then the task's data): a directory
# holding only these, with config.yaml a run's (or only its .tmp), is a failed start, not a run to protect.
START_FILES = {"config.yaml", "config.yaml.tmp", "data"}
# Recipe keys a resume may change, as none changes what is trained: `steps` extends (or shortens) the run,
# `out` is this same directory however it is spelt (or wherever it was moved), the others log, set CPU
# threads or guard the run. A key ending in "." stands for its whole section.
RESUME_MAY_CHANGE = ("out", "steps", "threads", "max_nonfinite", "log.", "aapa.force_discriminator")


class RunDirError(RuntimeError):
    """The run directory already holds a run (or holds none to resume)."""


def checkpoints(run_dir: Path) -> list[Path]:
    """The run's checkpoint directories, newest first (a write cut short leaves only a step_N.tmp)."""
    return sorted((run_dir / "checkpoints").glob("step_*[0-9]"), reverse=True)


def latest_checkpoint(run_dir: Path) -> Path | None:
    return next((d for d in checkpoints(run_dir) if (d / "trainer_state.pt").exists()), None)


def _read_config(run_dir: Path) -> dict | None:
    """run_dir/config.yaml (None if there is none, or it is not a YAML mapping)."""
    try:
        written = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    return written if isinstance(written, dict) else None


def _flatten(value, prefix: str = "") -> dict:
    """{"a.b.0.c": leaf}: a config under the dotted keys --set takes."""
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return {prefix: value}
    flat = {}
    for key, item in items:
        flat.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def _both_nan(a, b) -> bool:
    return isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)


def _with_defaults(saved: dict) -> dict:
    """A saved config with every key of this version's recipe: a run written before a key existed trained
    with its default. A config this version cannot read is compared as it is."""
    try:
        return yaml.safe_load(yaml.safe_dump(recipe_dict(build(Recipe, saved, ""))))
    except (ConfigError, TypeError, ValueError):
        return saved


def replace_text(path: Path, text: str) -> None:
    """Replace `path` whole (written as path.tmp, then renamed): a kill leaves the old file or the new one,
    never one cut off."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _write_config(run_dir: Path, config: dict) -> None:
    replace_text(run_dir / "config.yaml", yaml.safe_dump(config, sort_keys=False))


def check_resume_config(run_dir: Path, config: dict, found: list[Path]) -> None:
    """Refuse to resume the run in `run_dir` (`found`: its checkpoints, newest first) with a recipe that
    differs from its config.yaml in a key that changes what is trained, naming every such key; without a
    readable config.yaml, from the recipe the newest checkpoint keeps. After the changes a resume may make
    (RESUME_MAY_CHANGE), config.yaml is rewritten so that it describes the run."""
    new = yaml.safe_load(yaml.safe_dump(config, sort_keys=False))  # as config.yaml holds it: lists, no tuples
    trained = int(found[0].name.removeprefix("step_"))
    if new["steps"] < trained:
        raise RunDirError(
            f"{run_dir}: steps {new['steps']} is below the {trained} steps its newest checkpoint has "
            f"trained; pass steps >= {trained}, or start a new run (another --out)"
        )
    saved, source = _read_config(run_dir), "config.yaml"
    if saved is None:  # removed, or damaged some other way: the checkpoints keep the recipe they trained with
        for checkpoint in found:
            try:  # mmap: only the recipe is read, not the optimizer state
                state = torch.load(checkpoint / "trainer_state.pt", weights_only=False, mmap=True)
            except Exception:  # a damaged checkpoint: read_checkpoint names it
                continue
            if "recipe" in state:  # checkpoints written before it was kept lack it
                saved = yaml.safe_load(yaml.safe_dump(state["recipe"], sort_keys=False))
                source = f"recipe in {checkpoint.name}"
            break
    if saved is None:
        print(f"warning: {run_dir / 'config.yaml'} is missing or not a recipe, so this recipe cannot be "
              "compared with the run's; writing this one", file=sys.stderr)
    else:
        old, now = _flatten(_with_defaults(saved)), _flatten(new)
        unset = "(not set)"
        changed = {
            key: (old.get(key, unset), now.get(key, unset))
            for key in {**now, **old}  # the new recipe's order, then the keys it no longer has
            if old.get(key, unset) != now.get(key, unset) and not _both_nan(old.get(key), now.get(key))
        }
        refused = [
            key for key in changed
            if key not in RESUME_MAY_CHANGE and key.split(".")[0] + "." not in RESUME_MAY_CHANGE
        ]
        if refused:
            lines = "".join(f"\n  {key}: {changed[key][0]!r} -> {changed[key][1]!r}" for key in refused)
            allowed = ", ".join(k + "*" if k.endswith(".") else k for k in RESUME_MAY_CHANGE)
            raise RunDirError(
                f"{run_dir}: this recipe differs from the run's {source} in what is trained (old -> new):"
                f"{lines}\na resume may change only {allowed}; start a new run (another --out) or replace "
                "this one (--overwrite)"
            )
        for key, (before, after) in changed.items():
            print(f"resuming with {key}: {before!r} -> {after!r} (config.yaml updated)")
        if not changed and new == saved and source == "config.yaml":
            return
    _write_config(run_dir, config)


def _remove(paths: list[Path]) -> None:
    for path in paths:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()  # a file, or the `final` link


def prepare(run_dir: Path, config: dict, resume: bool, overwrite: bool) -> list[Path]:
    """Make `run_dir` ready: for a resume, the checkpoints to try (newest first); else an empty list, after
    writing config.yaml. A run is replaced only with `overwrite`, and only a run directory (config.yaml
    written by a run) ever is; what a start that failed before training left is cleared without it."""
    if resume:
        found = checkpoints(run_dir)
        if not found:
            raise RunDirError(f"{run_dir}: no checkpoint to resume from; start over with --overwrite")
        check_resume_config(run_dir, config, found)
        return found
    entries = list(run_dir.iterdir()) if run_dir.is_dir() else []
    if entries:
        keys, names = set(_read_config(run_dir) or {}), {p.name for p in entries}
        holds_run = {"out", "steps"} <= keys and any((run_dir / m).exists() for m in RUN_MARKERS)
        # A failed start's config.yaml has every key a run writes (a recipe of one's own, exp1/config.yaml
        # trained into exp1, leaves some out and is kept), or is still config.yaml.tmp: killed writing it.
        ours = keys == set(config) if "config.yaml" in names else "config.yaml.tmp" in names
        failed_start = names <= START_FILES and ours
        if holds_run and not overwrite:
            raise RunDirError(
                f"{run_dir} already holds a run; pass --resume to continue it or --overwrite to replace it"
            )
        if not (holds_run or failed_start):
            raise RunDirError(
                f"{run_dir} exists and is not an empty directory or a run directory (the config.yaml "
                "aapa-rl train writes, with metrics.jsonl or checkpoints/); choose another out"
            )
        _remove(entries)  # the directory itself stays: it may be the working directory (--out .)
    elif run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"{run_dir} exists and is not a directory; choose another out")
    run_dir.mkdir(parents=True, exist_ok=True)
    _write_config(run_dir, config)
    return []


def read_checkpoint(run_dir: Path, candidates: list[Path], load_policy: Callable[[str], torch.nn.Module]):
    """(checkpoint, policy, trainer state) of the newest checkpoint that loads. One that does not (a copy cut
    short, a bad disk) is named and the one before it tried; its steps are trained again and it is
    overwritten on the way."""
    problems = []
    for checkpoint in candidates:
        try:
            policy = load_policy(str(checkpoint))
            state = torch.load(checkpoint / "trainer_state.pt", weights_only=False)
        except Exception as exc:  # whatever a damaged file raises: safetensors, pickle, OS errors
            problems.append(f"{checkpoint} cannot be loaded: {type(exc).__name__}: {str(exc)[:200]}")
            print(f"warning: {problems[-1]}; trying the checkpoint before it", file=sys.stderr)
            continue
        return checkpoint, policy, state
    raise RunDirError(
        f"{run_dir}: no checkpoint can be loaded ({'; '.join(problems)}); start over with --overwrite"
    )


def save_checkpoint(run_dir: Path, step: int, policy, tokenizer, state: dict) -> Path:
    """checkpoints/step_N with the model, tokenizer and trainer state; it exists only once complete."""
    final = run_dir / "checkpoints" / f"step_{step:06d}"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    policy.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    torch.save(state, tmp / "trainer_state.pt")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


class RunLog:
    """metrics.jsonl, scores.jsonl and TensorBoard; a resumed run drops what was logged after `step`."""

    def __init__(self, run_dir: Path, step: int):
        from torch.utils.tensorboard import SummaryWriter

        for name in ("metrics.jsonl", "scores.jsonl"):
            path = run_dir / name
            if path.exists():
                keep = [row for row in plots.read_log(path) if row["step"] < step]
                # Replaced whole, as in `add`: a kill while rewriting in place lost the rows not yet written.
                replace_text(path, "".join(json.dumps(row) + "\n" for row in keep))
        self.metrics_path = run_dir / "metrics.jsonl"
        self.metrics_file = open(self.metrics_path, "a")
        self.scores_file = open(run_dir / "scores.jsonl", "a")
        self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=step or None)

    def write(self, metrics: dict, scores: dict | None) -> None:
        self.metrics_file.write(json.dumps(metrics) + "\n")
        self.metrics_file.flush()
        step = metrics["step"]
        self._scalars(metrics, step)
        if scores:
            self.scores_file.write(json.dumps({"step": step, **scores}) + "\n")
            self.scores_file.flush()
            for key in ("d_rollout", "d_expert"):
                values = torch.tensor(scores.get(key) or [], dtype=torch.float32)
                values = values[values.isfinite()]  # NaN: a prompt without an expert (missing_expert: skip)
                if len(values):
                    self.tb.add_histogram(f"aapa/{key}", values, step)

    def add(self, metrics: dict, step: int) -> None:
        """Add `metrics` (the final eval's) to step's row, the last one written. The file is replaced whole,
        so a kill leaves the row with or without them, never a row cut off."""
        rows = plots.read_log(self.metrics_path)
        if rows and rows[-1]["step"] == step:
            rows[-1].update(metrics)
        else:  # no row: a run killed in its final eval when the row was written after it
            rows.append({"step": step, **metrics})
        self.metrics_file.close()
        replace_text(self.metrics_path, "".join(json.dumps(row) + "\n" for row in rows))
        self.metrics_file = open(self.metrics_path, "a")
        self._scalars(metrics, step)

    def _scalars(self, metrics: dict, step: int) -> None:
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and key != "step" and math.isfinite(value):
                self.tb.add_scalar(key, value, step)

    def close(self) -> None:
        self.metrics_file.close()
        self.scores_file.close()
        self.tb.close()
