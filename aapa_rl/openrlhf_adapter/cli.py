"""`aapa-rl launch --config configs/RECIPE.yaml [--dry-run] [-- extra OpenRLHF/--aapa.* flags]`."""

from __future__ import annotations

import argparse


def add_commands(subparsers) -> None:
    p = subparsers.add_parser(
        "launch",
        help="run OpenRLHF's train_ppo_ray with AAPA from a recipe (on this machine; several nodes: "
        "launchers/submit.sh)",
        description="Build the OpenRLHF command from a recipe, check it (files, GPU layout, batch sizes, "
        "discriminator AUROC) and run it. Flags after `--` are appended and override the recipe.")
    p.add_argument("--config", required=True, help="recipe YAML, e.g. configs/qwen3-0.6b-grpo-aapa.yaml")
    p.add_argument("--dry-run", action="store_true", help="print the command and the checks; start nothing")
    p.add_argument("--output-root", metavar="DIR",
                   help="make the recipe's relative checkpoint, final-model and TensorBoard paths absolute "
                        "under DIR (needed under `ray job submit`, which runs in a temporary copy of the "
                        "working_dir; the launchers pass the checkout)")
    p.add_argument("extra", nargs=argparse.REMAINDER, help="-- then flags appended to the command")
    p.set_defaults(func=launch)


def launch(args: argparse.Namespace) -> int:
    import shlex
    import subprocess

    import yaml

    try:
        from .recipe import RecipeError, check, command, dry_run
    except ImportError as e:  # OpenRLHF missing or another version: the other commands still work
        print(f"aapa-rl: {e}")
        return 2

    extra = list(args.extra)
    if extra[:1] == ["--"]:
        extra = extra[1:]
    if "--dry-run" in extra:  # `aapa-rl launch --config X -- ... --dry-run` still means ours
        extra.remove("--dry-run")
        args.dry_run = True
    try:
        if args.dry_run:
            return dry_run(args.config, extra, args.output_root)
        cmd = command(args.config, extra, args.output_root)
    except (RecipeError, OSError, yaml.YAMLError) as e:
        print(f"aapa-rl: {e}")
        return 2
    _, problems = check(cmd)
    if problems:
        print("aapa-rl: not launching:\n  " + "\n  ".join(problems))
        return 1
    print(shlex.join(cmd), flush=True)
    return subprocess.run(cmd).returncode
