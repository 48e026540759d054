"""`aapa-rl train | eval | analyze`: the local trainer's commands. Heavy imports stay inside the handlers."""

from __future__ import annotations

import argparse
import json
import math
import sys
import traceback
from pathlib import Path

EVAL_COLUMNS = [
    ("accuracy", "accuracy"),
    ("reward/format", "format"),
    ("expert_match", "exact"),
    ("reward", "reward"),
    ("reward/boxes", "boxes"),
    ("length", "length"),
    ("expert_nll_token", "nll/tok"),
    ("expert_nll_seq", "nll/seq"),
    ("p_end_after_expert", "P(end)"),
    ("d_response", "D(resp)"),
    ("d_expert", "D(exp)"),
]


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    train = subparsers.add_parser(
        "train", help="train with the local single-process trainer from a YAML recipe"
    )
    train.add_argument("--config", required=True, help="recipe YAML (see configs/)")
    train.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe key, e.g. --set optim.lr=1e-4 --set aapa.stages.0.lam=0.5",
    )
    train.add_argument("--out", help="run directory (overrides the recipe's `out`)")
    group = train.add_mutually_exclusive_group()
    group.add_argument(
        "--resume", action="store_true", help="continue the run in `out` from its last checkpoint"
    )
    group.add_argument("--overwrite", action="store_true", help="delete the run in `out` and start over")
    train.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    train.set_defaults(func=_train)

    ev = subparsers.add_parser(
        "eval", help="evaluate a checkpoint: greedy accuracy, pass@k, length, expert NLL, D"
    )
    ev.add_argument(
        "--checkpoint", required=True, help="a Hugging Face model directory (e.g. RUN/checkpoints/step_N)"
    )
    ev.add_argument("--data", required=True, help="JSONL rows {prompt, label, expert?}")
    ev.add_argument(
        "--reward", required=True, help='"arithmetic" or a reward_fns module (math, code, ifeval, format)'
    )
    ev.add_argument("--discriminator", help="score responses and experts with this discriminator directory")
    ev.add_argument("--force", action="store_true", help="accept a discriminator with near-chance AUROC")
    ev.add_argument("--k", type=int, default=0, help="also pass@k from k samples per prompt (0: off)")
    ev.add_argument("--temperature", type=float, default=1.0, help="sampling temperature for pass@k")
    ev.add_argument("--seed", type=int, default=0, help="torch seed for the pass@k samples (default: 0)")
    ev.add_argument("--max-new-tokens", type=int, default=64)
    ev.add_argument("--limit", type=int, default=0, help="evaluate only the first N rows (0: all)")
    ev.add_argument("--out", help="write the summary JSON here and per-sample records beside it (.jsonl)")
    ev.set_defaults(func=_eval)

    an = subparsers.add_parser("analyze", help="plot runs side by side: length, log-prob and D distributions")
    an.add_argument("runs", nargs="+", help="run directories written by `aapa-rl train`")
    an.add_argument("--out", default="analysis", help="directory for the PNGs (default: ./analysis)")
    an.add_argument("--labels", nargs="+", help="names for the runs (default: directory names)")
    an.set_defaults(func=_analyze)


def _train(args: argparse.Namespace) -> int:
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never wait on the hub
    from aapa_rl.local.recipe import RecipeError, load_recipe

    overrides = list(args.overrides) + ([f"out={args.out}"] if args.out else [])
    try:
        recipe = load_recipe(args.config, overrides)
    except RecipeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from aapa_rl.local.trainer import NonFiniteError, RunDirError, Trainer, latest_checkpoint
    from reward_fns.combine import RewardError

    try:
        trainer = Trainer(recipe, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress)
    except (RunDirError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        summary = trainer.fit()
    except NonFiniteError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    except RewardError as exc:  # a reward that broke its contract, or raised, mid-run
        if exc.__cause__ is not None:  # it raised: its traceback points into the user's reward file
            traceback.print_exception(exc.__cause__)
        good = latest_checkpoint(trainer.run_dir)
        # The final eval runs after the last step's row and checkpoint (Trainer._finish): both are kept.
        stopped = (f"the run logged its {trainer.step} steps, then stopped in its final eval"
                   if trainer.step >= recipe.steps else f"the run stopped after {trainer.step} steps")
        print(f"error: {exc}\n{stopped}; last checkpoint: {good or 'none'}"
              + (" (fix the cause, then --resume)" if good else ""), file=sys.stderr)
        return 2
    if summary:
        from aapa_rl.local.evaluation import format_table

        print(format_table({Path(recipe.out).name: summary}, EVAL_COLUMNS))
    print(f"run directory: {recipe.out}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from aapa_rl.local.evaluation import evaluate, format_table, load_reward
    from aapa_rl.local.policy import load_policy, load_tokenizer
    from aapa_rl.local.trainer import load_rows
    from reward_fns.combine import RewardError

    try:
        reward_fn = load_reward(args.reward)
        rows = load_rows(args.data, ("prompt",), ("label",), reward_fn)
    except (ValueError, FileNotFoundError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    checkpoint, problem = Path(args.checkpoint), None
    if not checkpoint.is_dir():
        problem = f"--checkpoint {checkpoint}: no such directory"
    elif (checkpoint / "metrics.jsonl").exists():
        problem = f"--checkpoint {checkpoint} is a run: pass {checkpoint / 'final'} or a checkpoints/step_N"
    elif not (checkpoint / "config.json").exists():
        problem = f"--checkpoint {checkpoint}: not a model directory (no config.json)"
    elif args.limit < 0:
        problem = f"--limit {args.limit}: must be >= 0 (0: all rows)"
    elif args.k and args.temperature <= 0:
        problem = f"--k {args.k} needs --temperature > 0 (greedy samples are all the same)"
    elif args.out and Path(args.out).suffix == ".jsonl":
        problem = f"--out {args.out}: the per-sample records take the .jsonl name; name the summary .json"
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if args.limit:
        rows = rows[: args.limit]
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = load_tokenizer(args.checkpoint)
    model = load_policy(args.checkpoint, tokenizer, device=device)
    discriminator = None
    if args.discriminator:
        from aapa_rl.anchor import load_discriminator

        discriminator = load_discriminator(args.discriminator, force=args.force, device=device)
    torch.manual_seed(args.seed)  # the pass@k samples: the same command gives the same numbers
    try:
        summary, records = evaluate(
            model,
            tokenizer,
            rows,
            reward_fn,
            max_new_tokens=args.max_new_tokens,
            discriminator=discriminator,
            k=args.k,
            temperature=args.temperature,
        )
    except RewardError as exc:  # a reward that broke its contract (reward_fns.combine.call_reward)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    columns = EVAL_COLUMNS + ([(f"pass@{args.k}", f"pass@{args.k}")] if args.k else [])
    print(format_table({Path(args.checkpoint).name: summary}, columns))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(summary, indent=2) + "\n")
        with open(out.with_suffix(".jsonl"), "w") as f:
            for rec in records:
                f.write(json.dumps(rec) + "\n")
        print(f"wrote {out} and {out.with_suffix('.jsonl')}")
    return 0


def _analyze(args: argparse.Namespace) -> int:
    from aapa_rl.local.evaluation import format_table
    from aapa_rl.local.plots import plot_compare, read_log

    runs = [Path(r) for r in args.runs]
    for run in runs:
        if not (run / "metrics.jsonl").exists():
            print(f"error: {run}: not a run directory (no metrics.jsonl)", file=sys.stderr)
            return 2
    if args.labels and len(args.labels) != len(runs):
        print(f"error: {len(args.labels)} labels for {len(runs)} runs", file=sys.stderr)
        return 2
    labels = args.labels or [r.name for r in runs]
    if len(set(labels)) < len(labels):  # the table and the plots key runs by label: one would hide another
        print(f"error: two runs share a label ({', '.join(labels)}); name them with --labels",
              file=sys.stderr)
        return 2
    finals = {}
    for label, run in zip(labels, runs, strict=True):
        evals = [row for row in read_log(run / "metrics.jsonl")
                 if isinstance(row.get("eval/accuracy"), int | float) and math.isfinite(row["eval/accuracy"])]
        finals[label] = {k[5:]: v for k, v in evals[-1].items() if k.startswith("eval/")} if evals else {}
    print(format_table(finals, EVAL_COLUMNS))
    for path in plot_compare(runs, args.out, labels):
        print(f"wrote {path}")
    return 0
