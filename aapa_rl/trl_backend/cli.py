"""`aapa-rl trl --config configs/trl-*.yaml [--dry-run] [--resume]`: GRPO (+ AAPA) through TRL.

One YAML file describes one run:

    model: a Hugging Face directory or hub id (the tokenizer comes from the same place)
    data: {train: rows of {prompt, label}, eval: null, chat_template: false}   (JSONL, parquet, datasets dir)
    task: the embedded arithmetic task instead of data (writes it into <trl.output_dir>/data)
    reward: a reward_fns module, a .py file or a weighted sum (docs/rewards.md); `arithmetic` with `task`
    aapa: the AAPA settings, the same keys as every backend's (docs/settings.md)
    trl: GRPOConfig's own fields (output_dir, learning_rate, num_generations, max_steps, use_vllm, ...)
    threads: torch CPU threads (0: torch's default)

Several GPUs: `accelerate launch --config_file configs/accelerate/zero2.yaml -m aapa_rl.cli trl --config X`.
The checks of the dry run also run before every training, before any model loads.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import traceback
import typing
from dataclasses import dataclass
from pathlib import Path

import yaml

from aapa_rl.objectives import EXPERT_OBJECTIVES
from aapa_rl.settings import AapaSettings, ConfigError, build, convert


@dataclass
class DataSection:
    train: str | None = None
    eval: str | None = None
    chat_template: bool = False


@dataclass
class Sections:
    """The YAML's top level, typed so that settings.build names a bad section or field (`aapa` included)."""

    model: str
    aapa: AapaSettings
    trl: dict
    data: DataSection | None = None
    task: dict | None = None
    reward: str | dict | list | None = None
    threads: int = 0


@dataclass
class TrlRun:
    path: Path  # the YAML file
    model: str
    train: str
    eval: str | None
    chat_template: bool
    reward: str | dict | list
    task: object | None  # aapa_rl.local.task.ArithmeticTask
    aapa: AapaSettings
    config: object  # trl.GRPOConfig
    threads: int
    bank: str | None  # the expert bank: aapa.expert_bank, or the task's


def add_commands(subparsers) -> None:
    p = subparsers.add_parser(
        "trl",
        help="GRPO (+ AAPA) with Hugging Face TRL from one YAML (trl==1.16.0; `accelerate launch` for GPUs)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", required=True, help="YAML, e.g. configs/trl-tiny.yaml")
    p.add_argument("--dry-run", action="store_true", help="check config, data, experts, discriminator; stop")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in output_dir")
    p.set_defaults(func=run_command)


def load(path: str | Path, *, for_dry_run: bool = False) -> TrlRun:
    """The run described by `path`; a bad key or type is a ConfigError naming the file and the key.
    `for_dry_run`: a GPU recipe is read on a machine without one (its bf16/fp16 are left unchecked)."""
    path = Path(path)
    raw = yaml.safe_load(path.read_text()) or {}
    where = f"{path}:"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} expected a mapping of sections, got {type(raw).__name__}")
    names = [f.name for f in dataclasses.fields(Sections)]
    unknown = sorted(set(raw) - set(names))
    if unknown:
        raise ConfigError(f"{where} unknown section(s) {unknown}; allowed: {names}")
    try:  # build names a missing or bad section or field
        sections = build(Sections, raw, "")
    except ConfigError as e:
        raise ConfigError(f"{where} {e}") from e
    aapa = sections.aapa
    import torch
    from trl import GRPOConfig

    fields = dict(sections.trl)
    if for_dry_run and not torch.cuda.is_available() and not fields.get("use_cpu"):
        fields.update(bf16=False, fp16=False)  # TrainingArguments refuses them without a GPU
    hints, problems = typing.get_type_hints(GRPOConfig), []
    for key, value in fields.items():
        # GRPOConfig fails on a bad type without the field's name, so its plain fields are converted first; a
        # value that does not convert goes as it is: TRL takes more than some hints say (scale_rewards: bool)
        hint = hints.get(key)
        if set(typing.get_args(hint) or [hint]) <= {int, float, bool, str, type(None)}:
            try:
                fields[key] = convert(value, hint, f"trl.{key}")
            except ConfigError as e:
                problems.append(str(e))
    try:
        config = GRPOConfig(**fields)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where} {'; '.join(problems) or f'trl: {e}'}") from e
    data = sections.data or DataSection()
    task, bank = None, aapa.expert_bank
    if sections.task is not None:
        from aapa_rl.local.task import ArithmeticTask

        try:
            task = build(ArithmeticTask, sections.task, "task")
        except ConfigError as e:
            raise ConfigError(f"{where} {e}") from e
        if data.train or bank:
            raise ConfigError(
                f"{where} task: the arithmetic task writes its own data and expert bank; "
                "remove data.train and aapa.expert_bank, or the task"
            )
        written = Path(config.output_dir) / "data"
        data = dataclasses.replace(data, train=str(written / "train.jsonl"))
        bank = str(written / "experts.jsonl")
    if not data.train:
        raise ConfigError(f"{where} data.train: required (or a task section)")
    reward = "arithmetic" if sections.reward is None and task is not None else sections.reward
    if reward is None:
        raise ConfigError(f"{where} reward: required (a reward_fns name, a .py file or a weighted sum)")
    if reward == "arithmetic" and task is None:
        raise ConfigError(f"{where} reward: 'arithmetic' needs the task section")
    return TrlRun(
        path, sections.model, data.train, data.eval, data.chat_template, reward, task, aapa, config,
        sections.threads, bank,
    )


def check(run: TrlRun) -> tuple[list[str], list[str], dict]:
    """(ok lines, problems, loaded pieces) of everything that can be checked before a model loads."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    from aapa_rl.anchor import ExpertBank, label_expert
    from aapa_rl.anchor.discriminator import heldout_auroc, quality_problem
    from aapa_rl.data.rows import DataError
    from aapa_rl.local.evaluation import load_reward
    from aapa_rl.local.trainer import load_rows

    from .trainer import check_trainer_config

    ok, bad, loaded = [], [], {}
    c = run.config
    if os.path.isdir(run.model):
        ok.append(f"model {run.model}: a local directory")
    else:
        try:  # from_pretrained reads anything but a directory as a hub id
            validate_repo_id(run.model)
            ok.append(f"model {run.model}: a hub id (the Hugging Face cache, else the hub)")
        except HFValidationError:
            bad.append(f"model {run.model!r}: no such directory, and not a hub id")
    if run.task is not None:
        written = run.task.write(Path(c.output_dir) / "data")
        ok.append(f"task: arithmetic data written to {Path(written['train']).parent}")
    try:
        reward_fn = loaded["reward"] = load_reward(run.reward, run.task)
    except ValueError as e:
        raise ConfigError(f"{run.path}: reward: {e}") from e
    ok.append(f"reward: {run.reward}")
    bank = loaded["bank"] = None
    if run.bank:
        try:
            bank = loaded["bank"] = ExpertBank.load(run.bank)
            ok.append(f"aapa.expert_bank {run.bank}: {len(bank)} experts")
        except (DataError, OSError) as e:
            bad.append(f"aapa.expert_bank: {e}")
    for split, path in (("train", run.train), ("eval", run.eval)):
        if path is None:
            continue
        try:
            rows = loaded[split] = load_rows(path, ("prompt",), ("label",), reward_fn)
        except (DataError, OSError) as e:
            bad.append(str(e))
            continue
        missing = sum(label_expert(r["label"], r["prompt"], bank)[1] is None for r in rows)
        if split == "train" and missing and run.aapa.missing_expert == "error" and _needs_experts(run.aapa):
            bad.append(
                f"data.train {path}: {missing} of {len(rows)} rows have no expert (in the label or the "
                "expert bank by id or prompt); add them or set aapa.missing_expert: skip"
            )
        else:
            ok.append(f"data.{split} {path}: {len(rows)} rows, {len(rows) - missing} with an expert")
    if run.aapa.discriminator:
        problem = (
            quality_problem(run.aapa.discriminator)
            if Path(run.aapa.discriminator).exists()
            else "does not exist"
        )
        if problem and not run.aapa.force_discriminator:
            bad.append(f"aapa.discriminator {run.aapa.discriminator} {problem}")
        else:
            ok.append(
                f"aapa.discriminator {run.aapa.discriminator}: held-out AUROC "
                f"{heldout_auroc(run.aapa.discriminator)}"
            )
    bad += check_trainer_config(run.aapa, c, run.aapa.discriminator is not None)
    generation = c.generation_batch_size
    if generation % c.num_generations:
        bad.append(
            f"trl: generation batch {generation} is not a multiple of num_generations {c.num_generations}"
        )
    else:
        ok.append(
            f"batches: {generation // c.num_generations} prompts x {c.num_generations} completions per "
            f"step, {c.steps_per_generation} micro-step(s) of {c.per_device_train_batch_size} per process, "
            f"with {c.world_size} process(es) (accelerate launch sets how many)"
        )
    return ok, bad, loaded


def _needs_experts(aapa: AapaSettings) -> bool:
    return aapa.uses_critic or any(s.objective in EXPERT_OBJECTIVES for s in aapa.stages)


def dataset(rows: list[dict], chat_template: bool):
    """Rows {prompt, label} as TRL's dataset; labels as JSON text: one Arrow type for any mix of shapes."""
    from datasets import Dataset

    return Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": r["prompt"]}] if chat_template else r["prompt"],
                "label_json": json.dumps(r["label"]),
            }
            for r in rows
        ]
    )


def build_trainer(run: TrlRun, loaded: dict):
    """The AapaGRPOTrainer of a checked run (`loaded`: what `check` loaded), before any training."""
    import torch
    from transformers import AutoTokenizer

    from aapa_rl.anchor import AnchorCritic, load_discriminator

    from .trainer import AapaGRPOTrainer, trl_reward

    if run.threads:
        torch.set_num_threads(run.threads)
    tokenizer = AutoTokenizer.from_pretrained(run.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    critic = None
    if run.aapa.discriminator and run.aapa.uses_critic:
        disc = load_discriminator(run.aapa.discriminator, force=run.aapa.force_discriminator)
        critic = AnchorCritic(disc, eps=run.aapa.eps, missing_expert=run.aapa.missing_expert)
    name = run.reward if isinstance(run.reward, str) else "reward"
    return AapaGRPOTrainer(
        model=run.model,
        reward_funcs=[trl_reward(loaded["reward"], Path(name).stem)],
        args=run.config,
        train_dataset=dataset(loaded["train"], run.chat_template),
        eval_dataset=dataset(loaded["eval"], run.chat_template) if "eval" in loaded else None,
        processing_class=tokenizer,
        aapa=run.aapa,
        critic=critic,
        bank=loaded["bank"],
    )


def train(run: TrlRun, *, resume: bool = False) -> dict:
    """Check, then train with TRL; returns the final logged metrics. Writes <output_dir>/final and
    <output_dir>/metrics.jsonl (TRL's log history), curves.png and disc_hist.png (D of rollouts and experts,
    from scores.jsonl)."""
    from aapa_rl.local.plots import histograms, read_log

    from .trainer import SCORES_FILE, last_checkpoint

    ok, bad, loaded = check(run)
    if bad:
        raise ConfigError(f"{run.path}: " + "; ".join(bad))
    out = Path(run.config.output_dir)
    if any(out.glob("checkpoint-*")) and not resume:
        raise ConfigError(
            f"{out} holds checkpoints of an earlier run: pass --resume to continue it, or choose "
            "another trl.output_dir"
        )
    # TRL's own resume takes the newest checkpoint-N, even one whose save was cut short
    checkpoint = last_checkpoint(out, warn=True) if resume else None
    if resume and checkpoint is None:
        raise ConfigError(f"--resume: {out} holds no complete checkpoint-* to resume from")
    if not resume:
        (out / SCORES_FILE).unlink(missing_ok=True)  # an earlier run's, without checkpoints
    trainer = build_trainer(run, loaded)
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    trainer.save_model(str(out / "final"))
    if trainer.accelerator.is_main_process:
        with open(out / "metrics.jsonl", "w") as f:
            for row in trainer.state.log_history:
                f.write(json.dumps(row) + "\n")
        plot_curves(trainer.state.log_history, out / "curves.png")
        histograms(out / "disc_hist.png", {out.name: read_log(out / SCORES_FILE)}, "d", "D(x, y)")
    return trainer.state.log_history[-1] if trainer.state.log_history else {}


CURVES = [  # (panel title, [(metric, label)]): the run at a glance, beside TRL's TensorBoard logs
    ("reward", [("reward", "shaped (TRL's reward)"), ("aapa/reward_raw_mean", "task reward")]),
    ("the reward's logs", [("reward/correct", "correct"), ("reward/format", "format"),
                           ("reward/flaw_bonus", "flaw bonus")]),
    ("completion length", [("completions/mean_length", "mean"), ("completions/max_length", "max")]),
    ("anchor gap", [("aapa/gap_mean", "mean"), ("aapa/gap_max", "max")]),
    ("schedule", [("aapa/lambda", "lambda"), ("aapa/alpha", "alpha"), ("aapa/mu", "CHORD mu")]),
    ("expert terms", [("aapa/anchor_loss", "L_anchor"), ("aapa/sft_loss", "L_sft")]),
]


def plot_curves(history: list[dict], path: Path) -> None:
    """The training curves of CURVES that the run logged, smoothed, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from aapa_rl.local.plots import series, smooth

    fig, axes = plt.subplots(2, 3, figsize=(16, 8))
    for ax, (title, keys) in zip(axes.flat, CURVES, strict=True):
        for key, label in keys:
            x, y = series(history, key)
            if len(x):
                ax.plot(x, smooth(y), label=label)
        ax.set_title(title)
        ax.set_xlabel("step")
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def run_command(args: argparse.Namespace) -> int:
    from reward_fns.combine import RewardError

    try:
        from . import trainer  # TRL present, at the pinned version
    except ImportError as e:
        print(f"aapa-rl trl: {e}; pip install 'aapa-rl[trl]' (trl==1.16.0, Python >= 3.11)")
        return 2
    try:
        run = load(args.config, for_dry_run=args.dry_run)
        if args.dry_run:
            ok, bad, _ = check(run)
            for line in ok:
                print(f"  ok    {line}")
            for line in bad:
                print(f"  FAIL  {line}")
            print(
                f"dry run: {len(bad)} problem(s); nothing was trained"
                if bad
                else "dry run: the config is consistent; nothing was trained"
            )
            return 1 if bad else 0
        train(run, resume=args.resume)
    except RewardError as e:  # a reward that broke its contract, or raised (trainer.trl_reward), mid-run
        if e.__cause__ is not None:  # it raised: its traceback points into the user's reward file
            traceback.print_exception(e.__cause__)
        good = trainer.last_checkpoint(run.config.output_dir)
        print(f"aapa-rl trl: {e}\nlast checkpoint: {good or 'none'}"
              + (" (fix the cause, then --resume)" if good else ""))
        return 2
    except (ConfigError, OSError, yaml.YAMLError, FloatingPointError) as e:
        print(f"aapa-rl trl: {e}")
        return 2
    return 0
