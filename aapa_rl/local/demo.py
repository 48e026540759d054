"""The demo (`make demo`): the whole AAPA loop on the embedded arithmetic task, on CPU, in one run directory.

1. SFT-warm the tiny Qwen3 (configs/demo-sft.yaml); 10% of its demonstrations carry the reward's flaw.
2. Sample reference rollouts from the SFT model.
3. Train the frozen discriminator (pairwise, hashing encoder) on experts vs rollouts and generic negatives.
   (Steps 1-3 are aapa_rl.local.start.build_start, which the drift bench calls too.)
4. Run GRPO (configs/demo-grpo.yaml) and GRPO + AAPA (configs/demo-grpo-aapa.yaml) from the same start.
5. Evaluate the SFT start and both runs on held-out prompts; write plots and print a summary table.
   When plain GRPO did not leave the expert format, the summary says so ("no drift in this run: not
   evidence") above the table instead of reading it as AAPA's win.

Usage: python -m aapa_rl.local.demo --out runs/demo [--overwrite] [--threads 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import re
import shutil
import sys
import time
from pathlib import Path

MARKER = "demo.json"
# The drift bench's verdict (bench/drift.yaml, `verdict`): GRPO drifted when its final greedy format is
# below DRIFT_BELOW; AAPA held when its format is at least HOLD_AT_LEAST.
DRIFT_BELOW, HOLD_AT_LEAST = 0.5, 0.9
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


def pin_cpu_kernels() -> None:
    """Make torch take its AVX2 kernels on every x86 CPU that has AVX2: on an AVX-512 CPU it would take
    others, which round differently, and RL amplifies such differences into other outcomes. Free here
    (AVX2 is this machine type's default). Acts only before torch is imported; a value already set wins."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists() and re.search(r"\bavx2\b", cpuinfo.read_text()):
        os.environ.setdefault("ATEN_CPU_CAPABILITY", "avx2")


def machine() -> dict:
    """What decides the numerics of a run: CPU, torch's kernel choice, MKL's branch, library versions."""
    import torch
    import transformers

    cpuinfo = Path("/proc/cpuinfo")
    text = cpuinfo.read_text() if cpuinfo.exists() else ""
    model = re.search(r"^model name\s*:\s*(.*)$", text, re.M)
    flag_line = re.search(r"^flags\s*:\s*(.*)$", text, re.M)
    flags = set(flag_line.group(1).split()) if flag_line else set()
    return {
        "cpu": model.group(1) if model else platform.processor(),
        # "model name" can be as vague as "AMD EPYC"; family/model tell the generation (25/1: Zen 3)
        "cpu_family_model": "/".join(re.findall(r"^(?:cpu family|model)\s*:\s*(\d+)$", text, re.M)[:2]),
        "cpus": os.cpu_count(),
        "avx2": "avx2" in flags,
        "avx512f": "avx512f" in flags,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "env": {k: os.environ.get(k) for k in ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "OMP_NUM_THREADS")},
    }


def verdict(grpo_format: float, aapa_format: float) -> str:
    """The demo's reading of its two runs, by the drift bench's definitions."""
    if not grpo_format < DRIFT_BELOW:
        return (
            f"NO DRIFT IN THIS RUN: NOT EVIDENCE. Plain GRPO kept the expert format ({grpo_format:.0%} of "
            f"greedy responses; drift means below {DRIFT_BELOW:.0%}), so the table cannot show AAPA "
            "preventing anything. The drift bench (docs/benchmarks.md) measures how often it happens."
        )
    if aapa_format >= HOLD_AT_LEAST:
        return (
            f"Plain GRPO drifted ({grpo_format:.0%} of greedy responses in the expert format) and "
            f"GRPO + AAPA held it ({aapa_format:.0%})."
        )
    return (
        f"Plain GRPO drifted ({grpo_format:.0%} in the expert format), and GRPO + AAPA did not hold the "
        f"format either ({aapa_format:.0%}; holding means at least {HOLD_AT_LEAST:.0%})."
    )


def _task_overrides(task) -> list[str]:
    return [f"task.{k}={json.dumps(v)}" for k, v in dataclasses.asdict(task).items()]


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
    pin_cpu_kernels()
    out: Path = args.out
    if not _prepare(out, args.overwrite):
        print((out / "summary.md").read_text())
        print(f"(finished demo found in {out}; pass --overwrite to run it again)")
        return 0

    import torch
    import transformers

    from aapa_rl.local.evaluation import format_table
    from aapa_rl.local.plots import plot_compare
    from aapa_rl.local.recipe import load_recipe
    from aapa_rl.local.start import build_start
    from aapa_rl.local.trainer import Trainer

    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    seconds: dict[str, float] = {}

    print(f"[1/3] SFT start -> {out / 'sft'}: warm-up, reference rollouts, discriminator, eval", flush=True)
    sft_recipe = load_recipe(
        args.configs / "demo-sft.yaml", [f"out={out / 'sft'}", f"threads={args.threads}"]
    )
    start = build_start(
        sft_recipe,
        out,
        rollout_prompts=args.rollout_prompts,
        samples=2,
        variant="pairwise",
        encoder="hash",
        steps=300,
    )
    seconds.update(start.seconds)
    print(
        f"discriminator: held-out AUROC {start.report['heldout']['auroc']:.3f} "
        f"({start.report['examples']['heldout']} examples); report in {out / 'discriminator' / 'report.txt'}"
    )

    summaries = {"SFT start": start.eval}
    for step, (name, (label, config)) in enumerate(ARMS.items(), 2):
        print(f"[{step}/3] {label} from the SFT start -> {out / name}", flush=True)
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
    grpo_fmt = summaries["GRPO"].get("reward/format", float("nan"))
    aapa_fmt = summaries["GRPO + AAPA"].get("reward/format", float("nan"))
    reading = verdict(grpo_fmt, aapa_fmt)
    info = machine()
    timing = "  ".join(f"{k}: {v:.0f}s" for k, v in seconds.items())
    text = "\n".join(
        [
            "# aapa-rl demo: GRPO vs GRPO + AAPA on arithmetic with a flawed reward",
            "",
            "The reward pays extra for repeating the boxed answer; "
            f"{sft_recipe.task.flawed_fraction:.0%} of the SFT data shows that habit.",
            "format = exactly the expert template (two column steps, one box); boxes = boxes per response;",
            "bonus = the flawed reward's extra credit; nll/seq = expert NLL per sequence; P(end) = the",
            "probability of stopping right after the expert response; D(resp) = discriminator score.",
            "",
            reading,
            "",
            "```",
            table,
            "```",
            "",
            "One SFT start on one CPU: exact values vary with the CPU (kernels round differently and RL",
            "amplifies it); the spread across starts is in docs/benchmarks.md. This run: "
            f"{info['cpu']}, torch {info['torch']} with {info['torch_cpu_capability']} kernels; SFT start "
            f"weights {start.fingerprint} (equal on another machine: bit-identical start).",
            "",
            f"Wall time ({args.threads} torch thread{'s' if args.threads > 1 else ''}): {timing}",
            "",
            "Files: " + ", ".join(str(p.relative_to(out)) for p in plots),
        ]
    )
    (out / "summary.md").write_text(text + "\n")
    (out / "summary.json").write_text(
        json.dumps(
            {
                "eval": summaries,
                "verdict": reading,
                "grpo_drifted": grpo_fmt < DRIFT_BELOW,
                "sft_fingerprint": start.fingerprint,
                "machine": info,
                "seconds": seconds,
                "discriminator": start.report["heldout"],
            },
            indent=2,
        )
        + "\n"
    )
    print()
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
