"""The drift bench's two main arms through TRL: GRPO and GRPO + AAPA from the drift bench's SFT start, with
the same task, flawed reward, discriminator and hyper-parameters (bench/drift.yaml), trained by
`aapa-rl trl` (TRL 1.16.0's GRPOTrainer) instead of the local trainer.

    .venv/bin/python bench/trl_drift.py [--starts 0 1 2] [--seeds 1] [--out runs/bench] [--publish]

1. The SFT starts and their discriminators: bench/drift.py's (OUT/start/sftN, reused when unchanged).
2. For each (start, RL seed) pair (default: the config's 3 starts, seed 1), both arms side by side (one
   torch thread each, so that they share the machine's load alike), each saving a checkpoint every
   `eval_every` steps. The GRPO arm is the same trainer with every AAPA term off (no discriminator, no
   expert rows): TRL's own GRPO step plus a reward column of zeros. A pair whose two runs finished with the
   same configs from the same starts is reused (bench/drift.py's rule), only whole: its step times compare.
3. Every checkpoint evaluated greedily on the held-out prompts (aapa_rl.local.evaluation.evaluate, as the
   local bench does), judged by bench/drift.yaml's verdict; a comparison counts only where TRL's GRPO
   drifted in the same pair. Overhead two ways: the step-time ratio AAPA / GRPO of the side-by-side arms
   (median over steps, the first 5 dropped), and AAPA's own work inside its step (scoring, H, the expert
   rows' forward) as a share of that step, which the machine's load cannot skew between arms.
4. summary.json, table.md and curves.png to OUT/results/trl-NAME, NAME the config's file name (drift.yaml:
   trl-drift; --publish: bench/results/trl-NAME, not with --starts or --seeds), the pairs that finished when
   another failed too.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import drift  # noqa: E402

ARMS = {"grpo": "TRL GRPO", "aapa": "TRL GRPO + AAPA"}


def trl_config(cfg: dict, arm: str, seed: int, start: Path, out: Path) -> dict:
    """The `aapa-rl trl` YAML of an arm: bench/drift.yaml's rl section and arm, in TRL's words."""
    rl, stage = cfg["rl"], cfg["arms"][arm]["aapa"]["stages"][-1]
    steps, r = stage["end_step"], rl["rollout"]
    aapa = {**rl.get("aapa", {}), "stages": [stage]}
    if arm != "grpo":
        aapa["discriminator"] = str(start / "discriminator")
    assert rl["loss"] == {"estimator": "group_norm", "clip_low": 0.2, "clip_high": 0.2, "agg": "token-mean"}
    return {
        "model": str(start / "sft" / "final"),
        "task": cfg["task"],
        "reward": "arithmetic",
        "threads": 1,
        "aapa": aapa,
        "trl": {
            "output_dir": str(out),
            "use_cpu": True,
            "bf16": False,
            "seed": seed,
            "max_steps": steps,
            "learning_rate": rl["optim"]["lr"],
            "lr_scheduler_type": "constant",
            "max_grad_norm": rl["optim"]["grad_clip"],
            "per_device_train_batch_size": r["prompts_per_step"] * r["group_size"],
            "num_generations": r["group_size"],
            "max_completion_length": r["max_new_tokens"],
            "temperature": r["temperature"],
            "scale_rewards": "group",  # group_norm
            "loss_type": "dapo",  # token mean over the batch
            "epsilon": 0.2,
            "beta": 0.0,
            "logging_steps": 1,
            "save_steps": rl["log"]["eval_every"],
            "report_to": [],
            "disable_tqdm": True,
        },
    }


def train(config: Path) -> tuple[int, float]:
    """One `aapa-rl trl` process (output in CONFIG.log); returns its exit code and wall time."""
    return drift.run_cli(["trl", "--config", str(config)], config.with_suffix(".log"))


def evaluate_checkpoints(run: Path, cfg: dict, start: Path) -> list[dict]:
    """Greedy held-out metrics of every checkpoint (the last one is the final step), by step."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from aapa_rl.anchor import load_discriminator
    from aapa_rl.local.evaluation import evaluate, load_reward
    from aapa_rl.local.task import ArithmeticTask
    from aapa_rl.local.trainer import load_rows
    from aapa_rl.settings import build

    torch.set_num_threads(1)
    reward = load_reward("arithmetic", build(ArithmeticTask, cfg["task"], "task"))
    rows = load_rows(run / "data" / "eval.jsonl", ("prompt",), ("label",))[: cfg["rl"]["log"]["eval_samples"]]
    disc = load_discriminator(
        start / "discriminator", force=cfg["rl"].get("aapa", {}).get("force_discriminator", False)
    )
    tokenizer = AutoTokenizer.from_pretrained(run / "final")
    points = []
    for ckpt in sorted(run.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1])):
        model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
        summary, _ = evaluate(
            model,
            tokenizer,
            rows,
            reward,
            max_new_tokens=cfg["rl"]["rollout"]["max_new_tokens"],
            discriminator=disc,
        )
        points.append({"step": int(ckpt.name.split("-")[1]), **{k: round(v, 4) for k, v in summary.items()}})
    return points


def run_seed(cfg: dict, seed: int, start: Path, started: dict, runs: Path) -> tuple[dict, list[str]]:
    """Both arms of one RL seed side by side (or both reused), then their evaluation: ({arm: record}, the
    failures; no records when an arm failed)."""
    dirs = {arm: runs / f"{arm}-sft{started['sft_seed']}-seed{seed}" for arm in ARMS}
    recipes = {arm: trl_config(cfg, arm, seed, start, dirs[arm]) for arm in ARMS}
    # Reused only both at once: the step-time ratio holds for arms that ran side by side
    if all(drift.reusable(dirs[arm], recipes[arm], started, "metrics.jsonl") for arm in ARMS):
        done = {arm: (0, math.nan) for arm in ARMS}
    else:
        configs = []
        for arm in ARMS:
            shutil.rmtree(dirs[arm], ignore_errors=True)  # TRL refuses to train over an old run's checkpoints
            configs.append(drift.write_run_config(dirs[arm], recipes[arm], started))
        with ThreadPoolExecutor(len(ARMS)) as pool:
            done = dict(zip(ARMS, pool.map(train, configs), strict=True))
    failed = [
        f"{dirs[arm].name}: exit {code}, see {dirs[arm]}.log" for arm, (code, _) in done.items() if code
    ]
    if failed:
        return {}, failed
    v, records = cfg["verdict"], {}
    for arm, label in ARMS.items():
        run = dirs[arm]
        history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        steps = [row for row in history if "step_time" in row]
        curve = [{"step": 0, **started["eval"]}] + evaluate_checkpoints(run, cfg, start)
        # AAPA's own work inside its step: scoring + H, and the expert rows' forward (backward not separable)
        aapa_seconds = [
            row.get("aapa/time_critic", 0.0) + row.get("aapa/time_expert_forward", 0.0) for row in steps
        ]
        records[arm] = {
            "label": label,
            "seed": seed,
            "wall_seconds": round(done[arm][1], 1) if math.isfinite(done[arm][1]) else None,  # None: reused
            "median_step_seconds": statistics.median(row["step_time"] for row in steps[5:]),
            "median_aapa_seconds": statistics.median(aapa_seconds[5:]),
            "final": curve[-1],
            "eval_curve": curve,
            "drifted": curve[-1][v["metric"]] < v["drift_below"],
            "held": curve[-1][v["metric"]] >= v["hold_at_least"],
            "train_curve": {
                k: [row.get(k) for row in steps]
                for k in ("reward/flaw_bonus", "reward/format", "aapa/gap_mean", "aapa/anchor_loss")
            },
        }
    return records, []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", type=Path, default=ROOT / "bench" / "drift.yaml")
    parser.add_argument(
        "--starts", type=int, nargs="+", help="SFT seeds of the starts (default: the config's)"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[1], help="RL seeds (default: 1)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench"))
    parser.add_argument("--publish", action="store_true", help="results to the committed bench/results/")
    args = parser.parse_args(argv)
    if args.publish and (args.starts or args.seeds != parser.get_default("seeds")):
        raise SystemExit(
            "--publish: the default runs only, not --starts or --seeds; their results stay in --out"
        )
    args.seeds = list(dict.fromkeys(args.seeds))  # a repeated seed would train the same runs twice
    from aapa_rl.local.demo import machine, pin_cpu_kernels

    pin_cpu_kernels()
    cfg = drift.load_config(args.config, quick=False)
    starts = {}
    for sft_seed in args.starts or cfg["starts"]:
        path = args.out / "start" / f"sft{sft_seed}"
        starts[sft_seed] = {**drift.prepare_start(cfg, path, sft_seed), "sft_seed": sft_seed, "path": path}
    runs = args.out / "trl-runs"
    runs.mkdir(parents=True, exist_ok=True)
    pairs = [(st, seed) for st in starts for seed in args.seeds]
    print(
        f"through TRL: {list(ARMS)} side by side from starts {list(starts)}, RL seeds {args.seeds}; logs in "
        f"{runs}/*.log",
        flush=True,
    )
    by_pair, failed = {}, []
    for st, seed in tqdm(pairs, desc="(start, seed) pairs"):  # a failed pair stops none of the others
        records, failures = run_seed(cfg, seed, starts[st]["path"], starts[st], runs)
        failed += failures
        if records:
            by_pair[st, seed] = records

    columns = [c for c in drift.COLUMNS if c[0] in starts[pairs[0][0]]["eval"]]
    lines = [
        "| arm | start | seed | drifted | held | " + " | ".join(h for _, h in columns) + " |",
        "|---" * (len(columns) + 5) + "|",
    ]
    for st, started in starts.items():
        lines.append(
            f"| SFT start | {st} | - | - | - | "
            + " | ".join(f"{started['eval'][k]:.3f}" for k, _ in columns)
            + " |"
        )
    for arm in ARMS:
        for (st, seed), records in by_pair.items():
            rec = records[arm]
            note = (
                "" if arm == "grpo" or records["grpo"]["drifted"] else " (GRPO did not drift: not evidence)"
            )
            lines.append(
                f"| {rec['label']} | {st} | {seed} | {rec['drifted']} | {rec['held']}{note} | "
                + " | ".join(f"{rec['final'][k]:.3f}" for k, _ in columns)
                + " |"
            )
    # A failed pair is in no row of the table: named under it
    table = "\n".join(lines) + "".join(f"\n\nFAILED: {f}" for f in failed)
    ratios = [r["aapa"]["median_step_seconds"] / r["grpo"]["median_step_seconds"] for r in by_pair.values()]
    shares = [r["aapa"]["median_aapa_seconds"] / r["aapa"]["median_step_seconds"] for r in by_pair.values()]
    name = f"trl-{args.config.stem}"  # another config's runs never replace the bench's
    results = (ROOT / "bench" / "results" if args.publish else args.out / "results") / name
    shutil.rmtree(results, ignore_errors=True)
    results.mkdir(parents=True)
    command = " ".join(["python bench/trl_drift.py"] + (argv if argv is not None else sys.argv[1:]))
    summary = {
        "command": command,
        "machine": machine(),
        "starts": {st: {"eval": v["eval"], "fingerprint": v["fingerprint"]} for st, v in starts.items()},
        "seeds": args.seeds,
        "failed": failed,
        "step_time_ratio_aapa_over_grpo": [round(x, 3) for x in ratios],
        "aapa_share_of_aapa_step": [round(x, 3) for x in shares],
        "runs": {
            f"{arm}-sft{st}-seed{seed}": records[arm]
            for (st, seed), records in by_pair.items()
            for arm in ARMS
        },
    }
    (results / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (results / "table.md").write_text(table + "\n")
    plot(by_pair, results / "curves.png")
    print(f"\nHeld-out greedy metrics through TRL, {command}:")
    print(table)
    print(
        "step time TRL GRPO + AAPA / TRL GRPO per (start, seed) (median over steps, the arms side by side): "
        + ", ".join(f"{x:.2f}" for x in ratios)
    )
    print(
        "AAPA's own work (scoring + H + expert-row forward) as a share of the AAPA step: "
        + ", ".join(f"{x:.1%}" for x in shares)
    )
    print(f"results in {results}")
    if failed:
        print("FAILED runs: " + "; ".join(failed))
        return 1
    return 0


def plot(by_pair: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("reward/format", "held-out greedy format"),
        ("accuracy", "held-out accuracy"),
        ("reward/boxes", "boxes / response"),
        ("d_response", "D(response)"),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(18, 4))
    for ax, (key, title) in zip(axes, panels, strict=True):
        for i, arm in enumerate(ARMS):
            for j, ((st, seed), records) in enumerate(by_pair.items()):
                curve = records[arm]["eval_curve"]
                ax.plot(
                    [p["step"] for p in curve],
                    [p.get(key) for p in curve],
                    "o-",
                    color=f"C{i}",
                    alpha=max(0.25, 1.0 - 0.25 * j),  # from the 5th pair on, all alike
                    label=f"{records[arm]['label']}, start {st} seed {seed}",
                )
        ax.set_title(title)
        ax.set_xlabel("step")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
