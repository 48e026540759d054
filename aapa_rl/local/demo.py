"""The demo (`make demo`): the whole AAPA loop on the embedded arithmetic task, on CPU, in one run directory.

1. SFT-warm the tiny Qwen3 (configs/demo-sft.yaml); ~5% of its demonstrations carry the reward's flaw.
2. Sample reference rollouts from the SFT model.
3. Train the frozen discriminator (pairwise, hashing encoder) on experts vs rollouts and generic negatives.
4. Run GRPO (configs/demo-grpo.yaml) and GRPO + AAPA (configs/demo-grpo-aapa.yaml) from the same start.
5. Evaluate the SFT start and both runs on held-out prompts; write plots and print a summary table.

Usage: python -m aapa_rl.local.demo --out runs/demo [--overwrite] [--threads 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path

MARKER = "demo.json"
ARMS = {"grpo": ("GRPO", "demo-grpo.yaml"), "grpo_aapa": ("GRPO + AAPA", "demo-grpo-aapa.yaml")}
COLUMNS = [
    ("accuracy", "accuracy"),
    ("reward/format", "format"),
    ("reward/boxes", "boxes"),
    ("reward/flaw_bonus", "bonus"),
    ("length", "length"),
    ("expert_nll_seq", "nll/seq"),
    ("p_end_after_expert", "P(end)"),
    ("d_response", "D(resp)"),
]


def _prepare(out: Path, overwrite: bool) -> bool:
    """True to run; False when a finished demo is there (re-running `make demo` just shows it)."""
    if out.exists() and any(out.iterdir()):
        marker = out / MARKER
        if not marker.exists():
            raise SystemExit(f"error: {out} exists and was not written by the demo; choose another --out")
        if (out / "summary.json").exists() and not overwrite:
            return False
        shutil.rmtree(out)  # our own unfinished (or to-be-replaced) demo
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text(json.dumps({"started": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")
    return True


def _task_overrides(task) -> list[str]:
    return [f"task.{k}={json.dumps(v)}" for k, v in dataclasses.asdict(task).items()]


def train_reference_discriminator(
    sft, rows: list[dict], samples: int, out: Path, variant: str, encoder: str, *, steps: int
) -> tuple:
    """Sample `samples` reference rollouts per prompt from the SFT trainer's policy (written to
    out/reference_rollouts.jsonl) and train the frozen discriminator in out/discriminator.

    It learns from the experts of the sampled prompts (positives and generic negatives) and the rollouts;
    its report holds out 20% of those prompts. Fewer experts keep the features small. Returns (disc, report).
    """
    from aapa_rl.anchor import ExpertBank, build_discriminator, train_discriminator
    from aapa_rl.local.policy import generate

    prompts = [r["prompt"] for r in rows]
    max_new_tokens = sft.recipe.rollout.max_new_tokens
    batch = generate(sft.policy, sft.tokenizer, prompts, n=samples, max_new_tokens=max_new_tokens)
    pairs = [(prompts[i // samples], text) for i, text in enumerate(batch.texts)]
    with open(out / "reference_rollouts.jsonl", "w") as f:
        for prompt, response in pairs:
            f.write(json.dumps({"prompt": prompt, "response": response}) + "\n")
    full_bank = ExpertBank.load(Path(sft.recipe.out) / "data" / "experts.jsonl")
    sampled = set(prompts)
    bank = ExpertBank([x for x in full_bank.records if x.prompt in sampled], source=full_bank.source)
    disc_dir = out / "discriminator"
    disc = build_discriminator(variant, encoder, cache_dir=disc_dir / "embedding_cache")
    return disc, train_discriminator(disc, bank, pairs, disc_dir, steps=steps, seed=0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("runs/demo"))
    parser.add_argument(
        "--configs", type=Path, default=Path("configs"), help="where the demo-*.yaml recipes are"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="run again even if a finished demo is in --out"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument(
        "--rollout-prompts", type=int, default=256, help="prompts for reference rollouts (x2 samples)"
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out: Path = args.out
    if not _prepare(out, args.overwrite):
        print((out / "summary.md").read_text())
        print(f"(finished demo found in {out}; pass --overwrite to run it again)")
        return 0

    import torch
    import transformers

    from aapa_rl.local.evaluation import evaluate, format_table
    from aapa_rl.local.plots import plot_compare
    from aapa_rl.local.recipe import load_recipe
    from aapa_rl.local.trainer import Trainer, load_rows

    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    seconds: dict[str, float] = {}

    print(f"[1/5] SFT warm-up of the tiny Qwen3 -> {out / 'sft'}", flush=True)
    t0 = time.perf_counter()
    sft_recipe = load_recipe(
        args.configs / "demo-sft.yaml", [f"out={out / 'sft'}", f"threads={args.threads}"]
    )
    sft = Trainer(sft_recipe)
    sft.fit()
    seconds["sft"] = time.perf_counter() - t0

    print("[2/5] reference rollouts and the discriminator", flush=True)
    t0 = time.perf_counter()
    rows = load_rows(out / "sft" / "data" / "train.jsonl", ("prompt",), ("label",))[: args.rollout_prompts]
    disc, report = train_reference_discriminator(sft, rows, 2, out, "pairwise", "hash", steps=300)
    print(
        f"discriminator: held-out AUROC {report['heldout']['auroc']:.3f} "
        f"({report['examples']['heldout']} examples); report in {out / 'discriminator' / 'report.txt'}"
    )
    seconds["reference rollouts + discriminator"] = time.perf_counter() - t0

    print("[3/5] held-out evaluation of the SFT start", flush=True)
    t0 = time.perf_counter()
    eval_rows = load_rows(out / "sft" / "data" / "eval.jsonl", ("prompt",), ("label",))
    eval_rows = eval_rows[: sft_recipe.log.eval_samples]
    start_summary, _ = evaluate(
        sft.policy,
        sft.tokenizer,
        eval_rows,
        sft_recipe.task.reward,
        max_new_tokens=sft_recipe.rollout.max_new_tokens,
        discriminator=disc,
    )
    seconds["eval of the SFT start"] = time.perf_counter() - t0

    summaries = {"SFT start": start_summary}
    for step, (name, (label, config)) in enumerate(ARMS.items(), 4):
        print(f"[{step}/5] {label} from the SFT start -> {out / name}", flush=True)
        t0 = time.perf_counter()
        recipe = load_recipe(
            args.configs / config,
            [
                f"out={out / name}",
                f"model.path={out / 'sft' / 'final'}",
                f"aapa.discriminator={out / 'discriminator'}",
                f"threads={args.threads}",
                *_task_overrides(sft_recipe.task),
            ],
        )
        summaries[label] = Trainer(recipe).fit()
        seconds[label] = time.perf_counter() - t0

    plots = plot_compare([out / name for name in ARMS], out / "plots", [label for label, _ in ARMS.values()])
    seconds["total"] = time.perf_counter() - started
    table = format_table(summaries, COLUMNS)
    start_fmt = start_summary.get("reward/format", float("nan"))
    grpo_fmt = summaries["GRPO"].get("reward/format", float("nan"))
    aapa_fmt = summaries["GRPO + AAPA"].get("reward/format", float("nan"))
    reading = (
        f"Held-out greedy responses in the expert format: SFT start {start_fmt:.0%}, "
        f"GRPO {grpo_fmt:.0%}, GRPO + AAPA {aapa_fmt:.0%}."
    )
    timing = "  ".join(f"{k}: {v:.0f}s" for k, v in seconds.items())
    text = "\n".join(
        [
            "# aapa-rl demo: GRPO vs GRPO + AAPA on arithmetic with a flawed reward",
            "",
            "The reward pays extra for repeating the boxed answer; ~5% of the SFT data shows that habit.",
            "format = exactly the expert template (two column steps, one box); boxes = boxes per response;",
            "bonus = the flawed reward's extra credit; nll/seq = expert NLL per sequence; P(end) = the",
            "probability of stopping right after the expert response; D(resp) = discriminator score.",
            "",
            "```",
            table,
            "```",
            "",
            reading,
            "",
            f"Wall time ({args.threads} torch thread{'s' if args.threads > 1 else ''}): {timing}",
            "",
            "Files: " + ", ".join(str(p.relative_to(out)) for p in plots),
        ]
    )
    (out / "summary.md").write_text(text + "\n")
    (out / "summary.json").write_text(
        json.dumps({"eval": summaries, "seconds": seconds, "discriminator": report["heldout"]}, indent=2)
        + "\n"
    )
    print()
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
