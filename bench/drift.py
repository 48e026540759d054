"""Drift benchmark: GRPO, CHORD and their AAPA variants on the embedded arithmetic task with a flawed reward.

    .venv/bin/python bench/drift.py [--config bench/drift.yaml] [--quick] [--arms A B] [--out runs/bench]
                                    [--publish]

1. SFT-warm the tiny Qwen3 once per SFT seed in `starts` (a fraction of its demonstrations carry the
   reward's flaw) and train a frozen discriminator on each start's rollouts; both are kept in
   OUT/start/sftN and reused while the config's task, sft and discriminator sections are unchanged.
2. Run every arm x start x RL seed of the config through `aapa-rl train`, a start's runs as soon as it is
   built; starts and runs share `workers` slots (one torch thread each). Run directories go to OUT/runs
   (--quick: OUT/runs-quick); a finished run whose recipe (RUN.yaml) and start (RUN.start: the start's
   config and weights fingerprint) are unchanged is reused, so a bench run again after an interruption only
   trains what is missing.
3. Judge every run by the config's `verdict` (drifted: final greedy format below `drift_below`; held: at
   least `hold_at_least`); a comparison with the baseline counts only in the (start, seed) pairs where the
   baseline drifted, and is marked "not evidence" elsewhere.
4. Write one JSON per run, summary.json, table.md and PNG curves to OUT/results/NAME, NAME the config's
   file name (drift.yaml: drift) with -quick for --quick (with --publish: to the committed
   bench/results/NAME instead; not for a subset: --arms, --starts, --seeds), and print the table (mean +- std
   over all runs of an arm; failed runs counted), the drift and hold counts and the targets of issues 8 and
   17, met or not (incomplete when a run failed).

Runs are bit-for-bit repeatable on one machine, not across CPUs: see docs/benchmarks.md, "What reproduces
where". The entry point pins torch's CPU kernels to AVX2 where the CPU has it (aapa_rl.local.demo).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, ThreadPoolExecutor, wait
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
COLUMNS = [  # (eval summary key, header)
    ("accuracy", "accuracy"),
    ("reward/format", "format"),
    ("reward/boxes", "boxes"),
    ("length", "length"),
    ("expert_nll_token", "nll/tok"),
    ("expert_nll_seq", "nll/seq"),
    ("p_end_after_expert", "P(end)"),
    ("reward", "flawed reward"),
    ("d_response", "D(resp)"),
]
TRAIN_KEYS = [  # per-step training metrics kept in each run's JSON
    "reward/raw",
    "reward/correct",
    "reward/flaw_bonus",
    "reward/format",
    "response/length",
    "aapa/d_rollout_mean",
    "aapa/gap_mean",
    "lambda",
    "loss/anchor",
    "aapa/anchor_budget",
    "aapa/hard_precision",
    "aapa/hard_recall",
    "aapa/gap_auroc",
    "time/step",
]


def load_config(path: Path, quick: bool) -> dict:
    """The config; with `base: OTHER.yaml` (relative to this file), OTHER's with this file's top-level
    sections replacing its own, so that a variant shares the base's SFT start (OTHER may have a base too)."""
    cfg, where = yaml.safe_load(path.read_text()), path
    while "base" in cfg:
        where = where.parent / cfg.pop("base")
        cfg = {**yaml.safe_load(where.read_text()), **cfg}
    for key in ("task", "sft", "discriminator", "rl", "starts", "seeds", "workers", "arms", "verdict"):
        if key not in cfg:
            raise SystemExit(f"{path}: missing key {key!r}")
    if cfg["verdict"]["baseline"] not in cfg["arms"]:
        raise SystemExit(f"{path}: verdict.baseline names no arm of the config")
    if quick:
        q = cfg.get("quick") or {}
        unknown = [a for a in q.get("arms", []) if a not in cfg["arms"]]
        if unknown:
            raise SystemExit(f"{path}: quick.arms names unknown arms {unknown}")
        cfg["arms"] = {a: cfg["arms"][a] for a in q.get("arms", cfg["arms"])}
        cfg["rl"] = merge(cfg["rl"], q.get("rl", {}))
        cfg["starts"] = q.get("starts", cfg["starts"])
        cfg["seeds"] = q.get("seeds", cfg["seeds"][:1])
        if "steps" in q:  # every run stops there: the first steps of the full bench's runs
            cfg["steps"] = q["steps"]
    return cfg


def merge(base: dict, extra: dict) -> dict:
    """`base` with `extra` merged in (nested mappings merged key by key)."""
    out = dict(base)
    for key, value in extra.items():
        out[key] = (
            merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        )
    return out


def prepare_start(cfg: dict, start: Path, sft_seed: int) -> dict:
    """The SFT model of seed `sft_seed` (start/sft/final), its discriminator (start/discriminator), the
    start's eval and a fingerprint of its weights (equal fingerprints: bit-identical starts); rebuilt only
    when the config's task, sft or discriminator section or the seed changed."""
    key = {**{k: cfg[k] for k in ("task", "sft", "discriminator")}, "sft_seed": sft_seed}
    marker = start / "start.json"
    if marker.exists():
        done = json.loads(marker.read_text())
        if done["key"] == key:
            print(f"SFT start and discriminator: reusing {start}")
            return {**done, "rebuilt": False}
    shutil.rmtree(start, ignore_errors=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    import transformers

    from aapa_rl.local.recipe import load_recipe
    from aapa_rl.local.start import build_start

    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(cfg["sft"].get("threads", 1) or 1)
    recipe = load_recipe(
        None, base={**cfg["sft"], "seed": sft_seed, "out": str(start / "sft"), "task": cfg["task"]}
    )
    d = cfg["discriminator"]
    built = build_start(
        recipe,
        start,
        rollout_prompts=d["rollout_prompts"],
        samples=d["samples"],
        variant=d["variant"],
        encoder=d["encoder"],
        steps=d["steps"],
    )
    done = {
        "key": key,
        "eval": built.eval,
        "discriminator": built.report["heldout"],
        "fingerprint": built.fingerprint,
        "seconds": built.seconds,
    }
    marker.write_text(json.dumps(done, indent=2) + "\n")
    return {**done, "rebuilt": True}


def arm_recipe(cfg: dict, name: str, seed: int, run_dir: Path, start: Path) -> dict:
    arm = {k: v for k, v in cfg["arms"][name].items() if k != "label"}
    recipe = merge(cfg["rl"], arm)
    recipe["aapa"] = {**recipe.get("aapa", {}), "discriminator": str(start / "discriminator")}
    recipe.update(
        out=str(run_dir),
        seed=seed,
        steps=cfg.get("steps", arm["aapa"]["stages"][-1]["end_step"]),
        task=cfg["task"],
        model={"path": str(start / "sft" / "final")},
    )
    return recipe


def reusable(run_dir: Path, recipe: dict, start: dict, last: str = "summary.json") -> bool:
    """Whether a finished run (`last`: the file a run writes last) has this recipe (RUN.yaml) and was trained
    from this start (RUN.start: its config and weights fingerprint): it would come out bit-identical on this
    machine, so it is reused instead of trained again."""
    config_path, start_path = run_dir.with_suffix(".yaml"), run_dir.with_suffix(".start")
    return (
        (run_dir / last).exists()
        and config_path.exists()
        and start_path.exists()
        and yaml.safe_load(config_path.read_text()) == recipe
        and json.loads(start_path.read_text()) == {"key": start["key"], "fingerprint": start["fingerprint"]}
    )


def write_run_config(run_dir: Path, recipe: dict, start: dict) -> Path:
    """RUN.yaml and RUN.start of a run about to train; returns RUN.yaml. The run's old summary.json goes
    first: should the bench stop before the run trains, its old result must not pass for the new recipe."""
    (run_dir / "summary.json").unlink(missing_ok=True)
    config_path = run_dir.with_suffix(".yaml")
    config_path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    start_id = {"key": start["key"], "fingerprint": start["fingerprint"]}
    run_dir.with_suffix(".start").write_text(json.dumps(start_id) + "\n")
    return config_path


def results_dir(args: argparse.Namespace) -> Path:
    """--results, else OUT/results/NAME or with --publish the committed bench/results/NAME, NAME the config's
    file name with -quick for --quick: a variant's results never replace the bench's. Only the config's
    runs are published, not a subset of them."""
    if args.publish and (args.arms or args.starts or args.seeds):
        raise SystemExit("--publish: not with --arms, --starts or --seeds (a subset); use --results")
    name = args.config.stem + ("-quick" if args.quick else "")
    return args.results or (ROOT / "bench" / "results" if args.publish else args.out / "results") / name


def run_cli(args: list[str], log: Path) -> tuple[int, float]:
    """One `aapa-rl ARGS` process on one torch thread, output in `log`; returns exit code and wall time."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    with open(log, "w") as out:
        code = subprocess.run(
            [sys.executable, "-m", "aapa_rl.cli", *args], stdout=out, stderr=subprocess.STDOUT, env=env
        ).returncode
    return code, time.perf_counter() - t0


def train(config_path: Path, run_dir: Path) -> tuple[int, float]:
    """One `aapa-rl train` process (output in RUN.log); returns its exit code and wall time."""
    args = ["train", "--config", str(config_path), "--overwrite", "--no-progress"]
    return run_cli(args, run_dir.with_suffix(".log"))


def _round(v):
    return round(v, 4) if isinstance(v, float) and math.isfinite(v) else v


def run_record(
    cfg: dict, name: str, start: int, seed: int, run_dir: Path, start_eval: dict, wall: float
) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    summary = json.loads((run_dir / "summary.json").read_text())
    curve = [{"step": 0, **{k: _round(start_eval[k]) for k, _ in COLUMNS if k in start_eval}}]
    for r in rows:
        if "eval/accuracy" in r:
            curve.append(
                {"step": r["step"] + 1, **{k: _round(r[f"eval/{k}"]) for k, _ in COLUMNS if f"eval/{k}" in r}}
            )
    return {
        "arm": name,
        "label": cfg["arms"][name]["label"],
        "start": start,  # the SFT seed
        "seed": seed,
        "arm_config": {k: v for k, v in cfg["arms"][name].items() if k != "label"},
        "steps": summary["steps"],
        "train_seconds": round(summary["train_seconds"], 1),
        "wall_seconds": round(wall, 1) if math.isfinite(wall) else None,  # None: reused from an earlier bench
        "final": {k: _round(v) for k, v in summary["eval"].items()},
        "eval_curve": curve,
        "train_curve": {"step": [r["step"] for r in rows]}
        | {k: [_round(r.get(k)) for r in rows] for k in TRAIN_KEYS if any(k in r for r in rows)},
    }


def mean_std(values: list[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return m, sd


def judge(records: list[dict], cfg: dict) -> None:
    """Mark every run `drifted` and `held` by the config's verdict, and `evidence`: whether the baseline
    drifted in the same (start, seed) pair (None for the baseline's own runs)."""
    v = cfg["verdict"]
    base_drifted = {
        (r["start"], r["seed"]): r["final"][v["metric"]] < v["drift_below"]
        for r in records
        if r["arm"] == v["baseline"]
    }
    for r in records:
        value = r["final"][v["metric"]]
        r["drifted"] = value < v["drift_below"]
        r["held"] = value >= v["hold_at_least"]
        r["evidence"] = (
            None if r["arm"] == v["baseline"] else base_drifted.get((r["start"], r["seed"]), False)
        )


def table(start_evals: dict[int, dict], records: list[dict], cfg: dict) -> tuple[dict, str]:
    """Per arm over all its finished (start, seed) runs: mean and std of every column, how many runs failed,
    drifted and held, and how many held where the baseline drifted; and a markdown table (the SFT starts
    first)."""
    v = cfg["verdict"]
    base = cfg["arms"].get(v["baseline"], {}).get("label", v["baseline"])  # --arms may leave it out
    expected = len(cfg["starts"]) * len(cfg["seeds"])
    stats: dict = {}
    for name in cfg["arms"]:
        runs = [r for r in records if r["arm"] == name]
        if runs:
            evidence = [r for r in runs if r["evidence"]]
            stats[name] = {
                "label": runs[0]["label"],
                "runs": [[r["start"], r["seed"]] for r in runs],
                "failed": expected - len(runs),
                "drifted": sum(r["drifted"] for r in runs),
                "held": sum(r["held"] for r in runs),
                # None for the baseline; else runs whose baseline drifted, and how many of those held
                "evidence": None if runs[0]["evidence"] is None else len(evidence),
                "held_where_baseline_drifted": sum(r["held"] for r in evidence),
                **{k: mean_std([r["final"][k] for r in runs]) for k, _ in COLUMNS if k in runs[0]["final"]},
            }
    headers = ["arm", "runs", "drifted", "held", f"held where {base} drifted"] + [h for _, h in COLUMNS]
    lines = ["| " + " | ".join(headers) + " |", "|---" * len(headers) + "|"]
    starts = list(start_evals.values())
    cells = [
        f"{mean_std([e[k] for e in starts])[0]:.3f} +- {mean_std([e[k] for e in starts])[1]:.3f}"
        if all(k in e for e in starts)
        else "-"
        for k, _ in COLUMNS
    ]
    lines.append(f"| SFT starts | {len(starts)} | - | - | - | " + " | ".join(cells) + " |")
    for s in stats.values():
        n = len(s["runs"])
        if s["evidence"] is None:
            evidence = "-"
        else:
            evidence = f"{s['held_where_baseline_drifted']}/{s['evidence']}"
            if s["evidence"] < n:
                evidence += f" ({n - s['evidence']} not evidence)"
        cells = [f"{s[k][0]:.3f} +- {s[k][1]:.3f}" if k in s else "-" for k, _ in COLUMNS]
        runs = f"{n}/{expected}, {s['failed']} failed" if s["failed"] else f"{n}"
        lines.append(
            f"| {s['label']} | {runs} | {s['drifted']}/{n} | {s['held']}/{n} | {evidence} | "
            + " | ".join(cells)
            + " |"
        )
    return stats, "\n".join(lines)


def check_targets(start_evals: dict[int, dict], stats: dict, records: list[dict], cfg: dict) -> list[dict]:
    """The targets of issues 17 and 8, met or not, with the numbers. Comparisons between arms use only the
    (start, seed) pairs where the baseline drifted; every target is marked incomplete when a run failed."""
    out = []
    base = cfg["verdict"]["baseline"]
    if base in stats:
        s = stats[base]
        rate = s["drifted"] / len(s["runs"])
        out.append(
            {
                "target": f"plain {s['label']} drifts in >= 90% of (start, seed) runs",
                "value": f"{s['drifted']}/{len(s['runs'])}",
                "met": rate >= 0.9,
            }
        )
        out.append(
            {
                "target": f"plain {s['label']} ends below 0.3 format (mean; issue 8)",
                "value": s["reward/format"][0],
                "met": s["reward/format"][0] < 0.3,
            }
        )
    # The spec's default, with the bounded shaping option, and the smaller-alpha analysis (drift-variants).
    # Only runs whose baseline drifted are evidence: one where nothing drifts would count as held and lend
    # its accuracy to the arm.
    for arm in ("aapa", "aapa_floor", "alpha_small"):
        if arm not in stats:
            continue
        s = stats[arm]
        evidence = [r for r in records if r["arm"] == arm and r["evidence"]]
        out.append(
            {
                "target": f"{s['label']} holds greedy format >= 0.9 in >= 90% of its runs where the baseline "
                f"drifted ({len(evidence)} of {len(s['runs'])})",
                "value": f"{s['held_where_baseline_drifted']}/{len(evidence)}",
                "met": bool(evidence) and s["held_where_baseline_drifted"] >= 0.9 * len(evidence),
            }
        )
        accuracy = mean_std([r["final"]["accuracy"] for r in evidence] or [math.nan])[0]
        # the starts of those runs' (start, seed) pairs, not of all pairs
        start_acc = mean_std([start_evals[r["start"]]["accuracy"] for r in evidence] or [math.nan])[0]
        out.append(
            {
                "target": f"{s['label']} mean accuracy in those runs within 3 points of their starts' "
                f"({start_acc:.3f})",
                "value": accuracy,
                "met": accuracy >= start_acc - 0.03,
            }
        )
    if "anchor" in stats and "random_anchor" in stats:
        stage = cfg["arms"]["anchor"]["aapa"]["stages"][-1]
        target = (
            f"discriminator-chosen anchor beats the random anchor on format at rho = {stage['rho']}, "
            f"lam = {stage['lam']} (runs whose baseline drifted)"
        )
        formats = {
            arm: [r["final"]["reward/format"] for r in records if r["arm"] == arm and r["evidence"]]
            for arm in ("anchor", "random_anchor")
        }
        if not formats["anchor"] or not formats["random_anchor"]:
            out.append({"target": target, "value": "no drift in these runs: not evidence", "met": False})
        else:
            means = [mean_std(formats[a])[0] for a in ("anchor", "random_anchor")]
            out.append({"target": target, "value": means, "met": means[0] > means[1]})
    expected = len(cfg["arms"]) * len(cfg["starts"]) * len(cfg["seeds"])
    if len(records) < expected:  # the failed runs are missing from every count above
        for t in out:
            t["incomplete"] = f"{expected - len(records)} of {expected} runs failed"
    return out


def plot(records: list[dict], start_evals: dict[int, dict], cfg: dict, out: Path) -> list[Path]:
    """Held-out metrics against steps (mean over an arm's runs, band = +- std; each curve starts at its own
    SFT start) and training curves; the dotted line is the starts' mean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    colors = plt.get_cmap("tab10")
    arms = [a for a in cfg["arms"] if any(r["arm"] == a for r in records)]
    paths = []
    panels = [
        ("reward/format", "greedy format"),
        ("accuracy", "honest accuracy"),
        ("reward/boxes", "boxes / response"),
        ("length", "response length"),
        ("expert_nll_seq", "expert NLL / sequence"),
        ("p_end_after_expert", "P(end | expert)"),
    ]
    fig, axes = plt.subplots(2, 3, figsize=(16, 8.5))
    for ax, (key, title) in zip(axes.flat, panels, strict=True):
        for i, arm in enumerate(arms):
            runs = [r for r in records if r["arm"] == arm]
            steps = [p["step"] for p in runs[0]["eval_curve"]]
            ys = np.array(
                [
                    [p.get(key, np.nan) for p in r["eval_curve"]]
                    for r in runs
                    if len(r["eval_curve"]) == len(steps)
                ]
            )
            m = ys.mean(0)
            sd = ys.std(0, ddof=1) if len(ys) > 1 else np.zeros_like(m)  # the table's sample std
            style = "o-" if i < 10 else "s--"  # tab10 has ten colours; later arms repeat them dashed
            ax.plot(steps, m, style, color=colors(i % 10), markersize=3, label=runs[0]["label"])
            ax.fill_between(steps, m - sd, m + sd, color=colors(i % 10), alpha=0.12)
        ax.axhline(np.mean([e.get(key, np.nan) for e in start_evals.values()]), color="grey", ls=":", lw=1)
        ax.set_title(f"held-out {title}")
        ax.set_xlabel("RL step (staged AAPA: incl. its SFT stage)")
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    paths.append(out / "eval_curves.png")
    fig.savefig(paths[-1], dpi=90)
    plt.close(fig)

    panels = [
        ("reward/flaw_bonus", "flaw bonus (training rollouts)"),
        ("response/length", "rollout length"),
        ("aapa/d_rollout_mean", "D of rollouts"),
        ("lambda", "lambda"),
    ]
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.5))
    for ax, (key, title) in zip(axes.flat, panels, strict=True):
        for i, arm in enumerate(arms):
            runs = [r for r in records if r["arm"] == arm and key in r["train_curve"]]
            if not runs:
                continue
            n = min(len(r["train_curve"][key]) for r in runs)
            ys = np.array(
                [[np.nan if v is None else v for v in r["train_curve"][key][:n]] for r in runs], dtype=float
            )
            counts = (~np.isnan(ys)).sum(0)  # no value at a step (staged AAPA's SFT steps): a gap
            y = np.where(counts > 0, np.nansum(ys, 0) / np.maximum(counts, 1), np.nan)
            w = 5  # moving average over steps
            y = np.convolve(np.pad(y, (w - 1, 0), mode="edge"), np.ones(w) / w, mode="valid")
            x = runs[0]["train_curve"]["step"][:n]
            ax.plot(x, y, color=colors(i % 10), ls="-" if i < 10 else "--", label=runs[0]["label"])
        ax.set_title(f"{title}, mean over runs")
        ax.set_xlabel("step")
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    paths.append(out / "train_curves.png")
    fig.savefig(paths[-1], dpi=90)
    plt.close(fig)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", type=Path, default=ROOT / "bench" / "drift.yaml")
    parser.add_argument("--quick", action="store_true", help="the config's `quick` subset (one RL seed)")
    parser.add_argument(
        "--out", type=Path, default=Path("runs/bench"), help="run directories and results (not committed)"
    )
    parser.add_argument("--starts", type=int, nargs="+", help="these SFT seeds instead of the config's")
    parser.add_argument("--seeds", type=int, nargs="+", help="these RL seeds instead of the config's")
    parser.add_argument("--arms", nargs="+", help="only these arms of the config")
    parser.add_argument("--results", type=Path, help="JSON and PNG (default OUT/results/CONFIG[-quick])")
    parser.add_argument(
        "--publish", action="store_true", help="write the results to the committed bench/results/ instead"
    )
    args = parser.parse_args(argv)
    args.out = args.out.resolve()  # run recipes hold paths: runs stay reusable however OUT is spelled
    results = results_dir(args)
    from aapa_rl.local.demo import machine, pin_cpu_kernels

    pin_cpu_kernels()  # before torch loads, in this process and the `aapa-rl train` ones it starts
    cfg = load_config(args.config, args.quick)
    # Without duplicates: a repeated seed would train the same run directory twice at once
    cfg["starts"] = list(dict.fromkeys(args.starts or cfg["starts"]))
    cfg["seeds"] = list(dict.fromkeys(args.seeds or cfg["seeds"]))
    if args.arms:
        unknown = [a for a in args.arms if a not in cfg["arms"]]
        if unknown:
            raise SystemExit(f"--arms: unknown arms {unknown}")
        cfg["arms"] = {a: cfg["arms"][a] for a in cfg["arms"] if a in args.arms}
    started = time.perf_counter()

    from tqdm import tqdm

    from aapa_rl.local.recipe import load_recipe

    # Starts and runs share the `workers` slots, starts first: a start's runs queue as soon as it is built,
    # so no core idles while the last start builds. Starts build in spawned processes (one torch thread
    # each, set before torch starts its pools); runs are `aapa-rl train` processes.
    # A finished run with the same recipe from an unchanged start is reused (bit-identical on the same
    # machine), so an interrupted bench picks up where it stopped.
    runs_dir = args.out / ("runs-quick" if args.quick else "runs")  # quick runs are shorter: their own
    runs_dir.mkdir(parents=True, exist_ok=True)
    start_dirs = {s: args.out / "start" / f"sft{s}" for s in cfg["starts"]}
    starts, records, failed, reused = {}, [], [], 0
    runs_of_a_start = [(arm, seed) for arm in cfg["arms"] for seed in cfg["seeds"]]  # arm by arm
    total = len(runs_of_a_start) * len(cfg["starts"])
    print(
        f"{len(cfg['starts'])} SFT starts, then {total} runs ({len(cfg['arms'])} arms x {len(cfg['starts'])} "
        f"starts x {len(cfg['seeds'])} seeds), {cfg['workers']} at a time; logs in {runs_dir}/*.log",
        flush=True,
    )
    spawn = multiprocessing.get_context("spawn")
    with (
        ProcessPoolExecutor(cfg["workers"], mp_context=spawn) as builders,
        ThreadPoolExecutor(cfg["workers"]) as slots,
        tqdm(total=total, desc="drift runs", dynamic_ncols=True) as bar,
    ):

        def build(sft_seed: int) -> dict:
            return builders.submit(prepare_start, cfg, start_dirs[sft_seed], sft_seed).result()

        pending = {slots.submit(build, s): (s, None, None, None) for s in cfg["starts"]}
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                sft_seed, arm, seed, run_dir = pending.pop(future)
                if arm is None:  # a start: queue its runs
                    start = starts[sft_seed] = future.result()
                    bar.write(
                        f"SFT start {sft_seed}: accuracy {start['eval']['accuracy']:.3f}, "
                        f"format {start['eval']['reward/format']:.3f}; discriminator held-out AUROC "
                        f"{start['discriminator']['auroc']:.3f}; weights {start['fingerprint']}"
                    )
                    for arm, seed in runs_of_a_start:
                        run_dir = runs_dir / f"{arm}-sft{sft_seed}-seed{seed}"
                        recipe = arm_recipe(cfg, arm, seed, run_dir, start_dirs[sft_seed])
                        if reusable(run_dir, recipe, start):
                            rec = run_record(cfg, arm, sft_seed, seed, run_dir, start["eval"], math.nan)
                            records.append(rec)
                            reused += 1
                            bar.update()
                            continue
                        config_path = write_run_config(run_dir, recipe, start)
                        load_recipe(config_path)  # a bad arm fails here, before it runs
                        pending[slots.submit(train, config_path, run_dir)] = (sft_seed, arm, seed, run_dir)
                    continue
                code, wall = future.result()
                bar.update()
                if code != 0:
                    failed.append(f"{run_dir.name} (exit {code}, see {run_dir}.log)")
                    continue
                records.append(run_record(cfg, arm, sft_seed, seed, run_dir, starts[sft_seed]["eval"], wall))
                bar.write(
                    f"{run_dir.name}: format {records[-1]['final']['reward/format']:.3f}, "
                    f"accuracy {records[-1]['final']['accuracy']:.3f} ({wall:.0f}s)"
                )
    if reused:
        print(f"{reused} of the {total} runs finished earlier and were reused")
    starts = {s: starts[s] for s in cfg["starts"]}  # in the config's order, not the order they finished
    start_evals = {s: start["eval"] for s, start in starts.items()}

    shutil.rmtree(results, ignore_errors=True)
    results.mkdir(parents=True)
    order = {arm: i for i, arm in enumerate(cfg["arms"])}
    records.sort(key=lambda r: (order[r["arm"]], r["start"], r["seed"]))
    judge(records, cfg)
    for rec in records:
        (results / f"{rec['arm']}-sft{rec['start']}-seed{rec['seed']}.json").write_text(
            json.dumps(rec, separators=(",", ":")) + "\n"
        )
    stats, text = table(start_evals, records, cfg)
    targets = check_targets(start_evals, stats, records, cfg)
    plots = plot(records, start_evals, cfg, results) if records else []
    wall = time.perf_counter() - started
    command = " ".join(["python bench/drift.py"] + (argv if argv is not None else sys.argv[1:]))
    summary = {
        "command": command,
        "machine": machine(),
        "config": cfg,
        "starts": starts,
        "arms": stats,
        "targets": targets,
        "failed": failed,
        "wall_seconds": round(wall, 1),  # this invocation, reused runs not included
        "reused_runs": [
            f"{r['arm']}-sft{r['start']}-seed{r['seed']}" for r in records if r["wall_seconds"] is None
        ],
        "plots": [p.name for p in plots],
    }
    (results / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    # A failed run is in no row of the table: named under it
    (results / "table.md").write_text(text + "\n" + "".join(f"\nFAILED: {f}\n" for f in failed))
    v = cfg["verdict"]
    print()
    print(
        f"Held-out greedy metrics after RL (mean +- std over {len(cfg['starts'])} SFT starts x "
        f"{len(cfg['seeds'])} RL seeds), {command}:"
    )
    print(text)
    print(
        f"drifted: final greedy format < {v['drift_below']}; held: >= {v['hold_at_least']}. A run whose "
        f"baseline ({v['baseline']}, same start and seed) did not drift is not evidence for or against "
        "an arm."
    )
    for t in targets:
        incomplete = f", incomplete: {t['incomplete']}" if "incomplete" in t else ""
        print(f"  [{'met' if t['met'] else 'NOT met'}{incomplete}] {t['target']}: {t['value']}")
    print(f"wall time {wall / 60:.1f} min; results in {results}")
    if failed:
        print("FAILED runs: " + "; ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
