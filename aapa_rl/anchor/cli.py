"""`aapa-rl discriminator train|eval`: fit the frozen discriminator offline and report how well it separates
experts from negatives."""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

VARIANTS = ("cosine", "pairwise", "classifier", "aligned")  # as in discriminator.py, without importing torch


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("discriminator", help="train or evaluate the frozen AAPA discriminator")
    commands = parser.add_subparsers(dest="discriminator_command", required=True)

    train = commands.add_parser("train", help="fit a discriminator: experts vs rollouts and hard negatives")
    train.add_argument("--variant", default="pairwise", choices=VARIANTS)
    train.add_argument("--encoder", default="minilm", help='"minilm" (bundled all-MiniLM-L6-v2, default), '
                       '"hash" (model-free), or a sentence-transformers path/name')
    train.add_argument("--out", required=True, type=Path, help="output directory (new or empty)")
    train.add_argument("--overwrite", action="store_true",
                       help="replace the discriminator already in --out (a directory with config.json)")
    train.add_argument("--heldout", type=float, default=0.2, help="fraction of prompts held out (0.2)")
    train.add_argument("--steps", type=int, default=600, help="Adam steps on the head (600)")
    train.add_argument("--lr", type=float, default=3e-3)
    train.add_argument("--margin", type=float, default=0.5, help="m in sigmoid((sim - m) / tau), 0.5")
    train.add_argument("--tau", type=float, default=0.1, help="tau in sigmoid((sim - m) / tau), 0.1")
    train.set_defaults(func=_train)

    evaluate = commands.add_parser("eval", help="score samples with a saved discriminator, print its report")
    evaluate.add_argument("--disc", required=True, type=Path, help="a `discriminator train` output directory")
    evaluate.add_argument("--out", type=Path, help="write report.json, report.txt and scores_hist.png here")
    evaluate.add_argument("--scores", type=Path, help="write every scored example with its D to this JSONL")
    evaluate.set_defaults(func=_evaluate)

    for command in (train, evaluate):
        command.add_argument("--experts", required=True, help="expert bank: JSONL, parquet or datasets dir")
        command.add_argument("--rollouts", help="reference-policy samples (prompt, response): JSONL/parquet")
        command.add_argument("--no-generic", action="store_true", help="leave out the generic hard negatives")
        command.add_argument("--allow-skips", action="store_true",
                             help="skip bad rows and rollouts of prompts without an expert, not fail (each "
                                  "kind counted, every row listed in report.json)")
        command.add_argument("--seed", type=int, default=0)
        command.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
        command.add_argument("--cache-dir", type=Path,
                             help="expert embedding cache (default: <discriminator dir>/embedding_cache)")


def _load_data(args: argparse.Namespace):
    from .bank import ExpertBank
    from .training import read_rollouts

    bank = ExpertBank.load(args.experts, allow_skips=args.allow_skips)
    rollouts, skipped = [], {}
    if args.rollouts:
        rollouts, skipped = read_rollouts(args.rollouts, bank, allow_skips=args.allow_skips)
    left_out = {}
    if bank.skipped:
        left_out["expert bank rows skipped"] = len(bank.skipped)
    for kind, messages in skipped.items():
        if messages:
            left_out[f"rollout rows skipped, {kind}"] = len(messages)
            print(f"{args.rollouts}: {len(messages)} rows skipped, {kind} (first: {messages[0]})",
                  file=sys.stderr)
    return bank, rollouts, left_out, bank.skipped + [m for messages in skipped.values() for m in messages]


def _train(args: argparse.Namespace) -> int:
    import torch

    from .discriminator import MIN_AUROC, build_discriminator
    from .training import format_report, train_discriminator

    if not 0 < args.heldout < 1:
        print(f"error: --heldout {args.heldout}: the fraction of prompts held out must be in (0, 1)",
              file=sys.stderr)
        return 2
    out = args.out.resolve()  # a symlink means its target
    if out in (Path.cwd(), *Path.cwd().parents):  # --out is replaced whole: not from under our feet
        print(f"error: --out {args.out} is the current directory or holds it; run from elsewhere or choose "
              "another --out", file=sys.stderr)
        return 2
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        if not args.overwrite:
            print(f"error: --out {out} is not empty; pass --overwrite to replace the discriminator in it, or "
                  "choose another --out", file=sys.stderr)
            return 2
        if not (out / "config.json").is_file():  # --overwrite deletes it: only ever a discriminator
            print(f"error: --out {out} holds no discriminator (no config.json), so --overwrite does not "
                  "replace it; choose another --out", file=sys.stderr)
            return 2
    bank, rollouts, left_out, skipped_rows = _load_data(args)
    torch.manual_seed(args.seed)  # the MLP head's initial weights: the same seed trains the same head
    out.parent.mkdir(parents=True, exist_ok=True)
    # Written beside --out, then renamed into place: a kill leaves the old discriminator, the new one or
    # (between the two renames) none, never a mix of both.
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        new, old = Path(tmp) / "new", Path(tmp) / "old"  # old is deleted with tmp
        # Keyed by text, the old discriminator's embedding cache serves the new one (MiniLM's slow part): used
        # in place while training, then moved into the new directory.
        reused = not args.cache_dir and (out / "embedding_cache").is_dir()
        cache = args.cache_dir or (out if reused else new) / "embedding_cache"
        disc = build_discriminator(args.variant, args.encoder, device=args.device, margin=args.margin,
                                   tau=args.tau, cache_dir=cache)
        report = train_discriminator(disc, bank, rollouts, new, heldout=args.heldout, seed=args.seed,
                                     generic=not args.no_generic, steps=args.steps, lr=args.lr,
                                     left_out=left_out, skipped_rows=skipped_rows)
        if reused:
            cache.rename(new / "embedding_cache")
        if out.exists():
            out.rename(old)
        try:
            new.rename(out)
        except BaseException:  # put the old one back, or tmp's cleanup would delete both
            if old.exists():
                old.rename(out)
            raise
    print(format_report(report))
    print(f"saved to {args.out} (config.json, head.safetensors, report.json, report.txt, scores_hist.png)")
    if not report["heldout"]["auroc"] >= MIN_AUROC:
        why = "undefined: the held-out prompts have no negatives" if math.isnan(report["heldout"]["auroc"]) \
            else f"below {MIN_AUROC}"
        print(f"warning: held-out AUROC {why}; RL will refuse this discriminator unless forced",
              file=sys.stderr)
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    import json

    from .discriminator import load_discriminator
    from .training import build_examples, evaluate_discriminator, format_report, write_scores

    bank, rollouts, left_out, skipped_rows = _load_data(args)
    disc = load_discriminator(args.disc, force=True, device=args.device, cache_dir=args.cache_dir)
    examples, dropped = build_examples(bank, rollouts, disc.variant, generic=not args.no_generic,
                                       seed=args.seed)
    heldout, scores = evaluate_discriminator(disc, examples, args.out)
    report = {"variant": disc.variant, "encoder": disc.encoder.spec, "split": "evaluated",
              "examples": {"evaluated": len(examples)}, "left_out": {**left_out, **dropped},
              "skipped_rows": skipped_rows, "heldout": heldout}
    print(format_report(report))
    if args.out:
        (args.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        (args.out / "report.txt").write_text(format_report(report) + "\n")
    if args.scores:
        write_scores(args.scores, examples, scores)
    return 0
