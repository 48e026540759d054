"""Selection benchmark: the hard set chosen by the discriminator, at random, by an oracle, or all prompts, at
equal anchor budgets, on flaws that pay on a subset of the prompts only (issue 18).

    .venv/bin/python bench/selection.py [--config bench/selection.yaml] [--quick] [--flaws F ...]
                                        [--starts S ...] [--seeds R ...] [--arms A ...]
                                        [--out runs/bench] [--results DIR] [--publish]

1. Per flaw, the SFT starts and discriminators of bench/drift.py (prepare_start) with the flaw's task keys:
   a flaw that changes none shares the drift bench's OUT/start/sftN, the others get OUT/start/sftN-FLAW.
2. Per flaw, start and RL seed: plain GRPO, and every selection at every (rho, lam) of the budget grid with
   alpha = 0, graded by the flaw's reward file; runs go to OUT/runs/FLAW-ARM-sftN-seedR and are reused
   while their recipe and start are unchanged (bench/drift.py's rule).
3. Judge each run on the flawed subset (format_on_subset = held-out format_flawed / flawed_subset) by the
   config's verdict, and write one JSON per run, summary.json, table.md and FLAW.png (format on the subset
   against the anchor tokens spent) to OUT/results/NAME, NAME the config's file name with -quick for
   --quick (with --publish: to the committed bench/results/NAME instead, refused for --arms, --starts,
   --seeds, or --flaws other than the published ones); print per flaw the table, the smallest budget at
   which each selection holds every run where the baseline drifted, and the issue's target, met or not
   (incomplete when a run failed).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import drift  # noqa: E402

ROOT = drift.ROOT
COLUMNS = [  # (key of a run's final values, header), mean +- std over its runs
    ("format_on_subset", "format on flawed subset"),
    ("format_elsewhere", "format elsewhere"),
    ("accuracy", "accuracy"),
    ("hard_precision", "hard precision"),
    ("hard_recall", "hard recall"),
    ("gap_auroc", "gap AUROC"),
    ("anchor_budget", "anchor budget"),
]
DIAGNOSTICS = ("hard_precision", "hard_recall", "gap_auroc")  # the critic's, averaged over a run's steps


def subset_formats(values: dict) -> dict:
    """Format on the flawed subset and elsewhere, from held-out means of format, format_flawed (format on
    the subset, 0 elsewhere) and flawed_subset (its share of the prompts)."""
    share, fmt, on = values["reward/flawed_subset"], values["reward/format"], values["reward/format_flawed"]
    return {
        "format_on_subset": on / share if share > 0 else math.nan,
        "format_elsewhere": (fmt - on) / (1 - share) if share < 1 else math.nan,
    }


def start_eval(start: Path, done: dict, reward: Path) -> dict:
    """The start's held-out eval, with its greedy responses (the SFT run's final eval) re-scored by the
    flaw's reward: the format on the subset that RL starts from."""
    from aapa_rl.local.evaluation import load_reward
    from reward_fns.combine import call_reward

    last = sorted((start / "sft" / "eval").glob("step_*.jsonl"))[-1]
    records = [json.loads(line) for line in last.read_text().splitlines() if line.strip()]
    _, logs = call_reward(
        load_reward(str(reward)),
        [r["response"] for r in records],
        [r["label"] for r in records],
        [r["prompt"] for r in records],
    )
    values = {**done["eval"], **{f"reward/{k}": float(v.float().mean()) for k, v in logs.items()}}
    return {**values, **subset_formats(values)}


def anchor_arms(cfg: dict) -> dict:
    """The config's baseline arm, then one arm per budget and selection (alpha = 0), weak to strong."""
    steps = cfg["arms"][cfg["verdict"]["baseline"]]["aapa"]["stages"][-1]["end_step"]
    arms = dict(cfg["arms"])
    for rho, lam in cfg["budgets"]:
        for selection in cfg["selections"]:
            # No dots in the name: RUN.yaml, RUN.start and RUN.log are named with Path.with_suffix.
            arms[f"{selection}-rho{rho}-lam{lam}".replace(".", "_")] = {
                "label": f"{selection}, rho {rho}, lam {lam}",
                "aapa": {
                    "selection": selection,
                    "stages": [{"end_step": steps, "objective": "grpo", "lam": lam, "rho": rho}],
                },
            }
    return arms


def complete(record: dict, flaw: str) -> dict:
    """A drift.run_record with the flaw, the formats on and off the subset, the anchor tokens spent over the
    run and the critic's diagnostics averaged over its steps (NaN steps left out)."""
    record["flaw"] = flaw
    record["final"].update(subset_formats(record["final"]))
    curve = record["train_curve"]
    record["final"]["anchor_budget"] = sum(v or 0.0 for v in curve.get("aapa/anchor_budget", []))
    for key in DIAGNOSTICS:
        values = [v for v in curve.get(f"aapa/{key}", []) if v is not None and math.isfinite(v)]
        record["final"][key] = sum(values) / len(values) if values else math.nan
    return record


def summarize(records: list[dict], cfg: dict, start_evals: dict[int, dict]) -> dict:
    """Per arm: runs, failed, drifted, held, held where the baseline drifted, and mean +- std of COLUMNS; per
    selection the smallest budget rho x lam at which every evidence run held; and the issue's targets
    (incomplete when a run failed)."""
    v = cfg["verdict"]
    expected = len(start_evals) * len(cfg["seeds"])
    arms = {}
    for name, arm in cfg["arms"].items():
        runs = [r for r in records if r["arm"] == name]
        if not runs:
            continue
        evidence = [r for r in runs if r["evidence"]]
        anchored, stage = name != v["baseline"], arm["aapa"]["stages"][-1]
        arms[name] = {
            "label": arm["label"],
            "selection": arm["aapa"].get("selection", "gap") if anchored else None,
            "budget": [stage["rho"], stage["lam"]] if anchored else None,
            "runs": len(runs),
            "failed": expected - len(runs),
            "drifted": sum(r["drifted"] for r in runs),
            "held": sum(r["held"] for r in runs),
            "evidence": None if name == v["baseline"] else len(evidence),
            "held_where_baseline_drifted": sum(r["held"] for r in evidence),
            **{
                k: drift.mean_std([r["final"][k] for r in runs if math.isfinite(r["final"][k])] or [math.nan])
                for k, _ in COLUMNS
            },
        }
    # Only runs whose baseline drifted are evidence (issue 17): a start that never drifts would count as held
    # and lend its accuracy to every arm.
    smallest = {}
    for selection in cfg["selections"]:
        mine = [a for a in arms.values() if a["selection"] == selection and a["evidence"]]
        held = [a["budget"] for a in mine if a["held_where_baseline_drifted"] == a["evidence"]]
        smallest[selection] = min(held, key=lambda b: b[0] * b[1]) if held else None
    targets = []
    base = arms.get(v["baseline"])
    if base:
        targets.append(
            {
                "target": f"plain {base['label']} drifts on the flawed subset in >= 90% of runs",
                "value": f"{base['drifted']}/{base['runs']}",
                "met": base["drifted"] >= 0.9 * base["runs"],
            }
        )
    if "gap" in smallest and "random" in smallest:
        # Random holding nowhere in the grid needs more than its largest budget.
        largest = max(b[0] * b[1] for b in cfg["budgets"])
        gap, rand = smallest["gap"], smallest["random"]
        need = rand[0] * rand[1] if rand else largest
        gap_arm = next((n for n, a in arms.items() if a["selection"] == "gap" and a["budget"] == gap), None)
        evidence = [r for r in records if r["arm"] == gap_arm and r["evidence"]]
        accuracy = drift.mean_std([r["final"]["accuracy"] for r in evidence] or [math.nan])[0]
        # the starts of those runs' (start, seed) pairs, not of all pairs
        starts = [start_evals[r["start"]]["accuracy"] for r in evidence]
        starts_accuracy = drift.mean_std(starts or [math.nan])[0]
        targets.append(
            {
                "target": "gap selection holds the flawed subset at <= half the budget random needs, with "
                f"accuracy within 3 points of their SFT starts' ({starts_accuracy:.3f}), in the "
                f"{len(evidence)} runs where the baseline drifted",
                "value": {"gap": gap, "random": rand, "gap_accuracy": accuracy},
                "met": gap is not None and 2 * gap[0] * gap[1] <= need and accuracy >= starts_accuracy - 0.03,
            }
        )
    missing = len(cfg["arms"]) * expected - len(records)
    if missing:  # the failed runs are missing from every count above
        for t in targets:
            t["incomplete"] = f"{missing} of {len(cfg['arms']) * expected} runs failed"
    return {"arms": arms, "smallest_holding_budget": smallest, "targets": targets}


def table(result: dict, cfg: dict, start_evals: dict[int, dict]) -> str:
    """A markdown table: the SFT starts, then one row per arm."""
    baseline = cfg["verdict"]["baseline"]
    base = cfg["arms"].get(baseline, {}).get("label", baseline)  # --arms may leave it out
    headers = ["arm", "b = rho x lam", "runs", "drifted", "held", f"held where {base} drifted"]
    headers += [h for _, h in COLUMNS]
    lines = ["| " + " | ".join(headers) + " |", "|---" * len(headers) + "|"]

    def cells(stats: dict) -> str:
        return " | ".join(
            f"{stats[k][0]:.3f} +- {stats[k][1]:.3f}" if math.isfinite(stats[k][0]) else "-"
            for k, _ in COLUMNS
        )

    starts = {
        k: drift.mean_std([e[k] for e in start_evals.values()])
        for k in ("format_on_subset", "format_elsewhere", "accuracy")
    }
    starts.update({k: (math.nan, math.nan) for k, _ in COLUMNS if k not in starts})
    lines.append(f"| SFT starts | - | {len(start_evals)} | - | - | - | {cells(starts)} |")
    for a in result["arms"].values():
        budget = f"{a['budget'][0] * a['budget'][1]:g}" if a["budget"] else "0"
        evidence = "-" if a["evidence"] is None else f"{a['held_where_baseline_drifted']}/{a['evidence']}"
        runs = f"{a['runs']}/{a['runs'] + a['failed']}, {a['failed']} failed" if a["failed"] else a["runs"]
        lines.append(
            f"| {a['label']} | {budget} | {runs} | {a['drifted']}/{a['runs']} | "
            f"{a['held']}/{a['runs']} | {evidence} | {cells(a)} |"
        )
    return "\n".join(lines)


def plot(result: dict, cfg: dict, flaw: str, path: Path) -> None:
    """Format on the flawed subset against the anchor tokens a run spent: one line per selection over the
    budget grid (mean, band +- std over runs), the baseline and the hold threshold as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7, 4.5))
    drawn = False
    for i, selection in enumerate(cfg["selections"]):
        # Points a log axis can show: some tokens spent, and a flawed subset in the eval to measure.
        points = sorted(
            (a["anchor_budget"][0], *a["format_on_subset"])
            for a in result["arms"].values()
            if a["selection"] == selection
            and a["anchor_budget"][0] > 0
            and math.isfinite(a["format_on_subset"][0])
        )
        if points:
            x, m, sd = (np.array(c) for c in zip(*points, strict=True))
            ax.plot(x, m, "o-", color=f"C{i}", label=selection)
            ax.fill_between(x, m - sd, m + sd, color=f"C{i}", alpha=0.15)
            drawn = True
    base = result["arms"].get(cfg["verdict"]["baseline"])
    if base and math.isfinite(base["format_on_subset"][0]):
        ax.axhline(base["format_on_subset"][0], color="grey", ls="--", lw=1, label=base["label"])
    ax.axhline(cfg["verdict"]["hold_at_least"], color="grey", ls=":", lw=1)
    if drawn:
        ax.set_xscale("log")
    ax.set_xlabel("anchor tokens spent over the run (lam x weighted expert tokens)")
    ax.set_ylabel("held-out format on the flawed subset")
    ax.set_title(flaw)
    if drawn:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", type=Path, default=ROOT / "bench" / "selection.yaml")
    parser.add_argument("--quick", action="store_true", help="the config's `quick` subset")
    parser.add_argument(
        "--out", type=Path, default=Path("runs/bench"), help="run directories and results (not committed)"
    )
    parser.add_argument("--flaws", nargs="+", help="only these flaws of the config")
    parser.add_argument("--starts", type=int, nargs="+", help="these SFT seeds instead of the config's")
    parser.add_argument("--seeds", type=int, nargs="+", help="these RL seeds instead of the config's")
    parser.add_argument("--arms", nargs="+", help="only these arms (e.g. grpo: the baselines' drift check)")
    parser.add_argument("--results", type=Path, help="JSON and PNG (default OUT/results/CONFIG[-quick])")
    parser.add_argument(
        "--publish", action="store_true", help="write the results to the committed bench/results/ instead"
    )
    args = parser.parse_args(argv)
    args.out = args.out.resolve()  # run recipes hold paths: runs stay reusable however OUT is spelled
    results = drift.results_dir(args)
    from aapa_rl.local.demo import machine, pin_cpu_kernels

    pin_cpu_kernels()  # before torch loads, in this process and the `aapa-rl train` ones it starts
    cfg = drift.load_config(args.config, args.quick)
    for key in ("flaws", "selections", "budgets"):
        if key not in cfg:
            raise SystemExit(f"{args.config}: missing key {key!r}")
    if args.quick:
        cfg["budgets"] = cfg.get("quick", {}).get("budgets", cfg["budgets"])
    # Without duplicates: a repeated seed would train the same run directory twice at once
    cfg["starts"] = list(dict.fromkeys(args.starts or cfg["starts"]))
    cfg["seeds"] = list(dict.fromkeys(args.seeds or cfg["seeds"]))
    unknown = sorted(set(args.flaws or []) - set(cfg["flaws"]))
    if unknown:
        raise SystemExit(f"--flaws: unknown flaws {unknown}")
    flaws = {f: cfg["flaws"][f] for f in cfg["flaws"] if not args.flaws or f in args.flaws}
    if args.publish and (results / "summary.json").exists():
        # --flaws picks some of the config's flaws: others than the published ones would replace them
        published = list(json.loads((results / "summary.json").read_text())["flaws"])
        if sorted(published) != sorted(flaws):
            raise SystemExit(
                f"--publish: {results} holds the flaws {published}; use --results for {list(flaws)}"
            )
    cfg["arms"] = anchor_arms(cfg)
    unknown = sorted(set(args.arms or []) - set(cfg["arms"]))
    if unknown:
        raise SystemExit(f"--arms: unknown arms {unknown}")
    cfg["arms"] = {a: spec for a, spec in cfg["arms"].items() if not args.arms or a in args.arms}
    started = time.perf_counter()

    # A flaw's config is the bench's with its task keys; a flaw that changes none shares the drift starts.
    flaw_cfgs = {f: {**cfg, "task": drift.merge(cfg["task"], spec["task"])} for f, spec in flaws.items()}

    def start_dir(flaw: str, sft_seed: int) -> Path:
        return args.out / "start" / (f"sft{sft_seed}-{flaw}" if flaws[flaw]["task"] else f"sft{sft_seed}")

    # Built side by side as in bench/drift.py, once per directory (flaws without task keys share one).
    spawn = multiprocessing.get_context("spawn")
    pairs = [(f, s) for f in flaws for s in cfg["starts"]]
    dirs = {start_dir(f, s): (f, s) for f, s in pairs}
    with ProcessPoolExecutor(min(cfg["workers"], len(dirs)), mp_context=spawn) as pool:
        built = {d: pool.submit(drift.prepare_start, flaw_cfgs[f], d, s) for d, (f, s) in dirs.items()}
        starts = {(f, s): built[start_dir(f, s)].result() for f, s in pairs}
    start_evals = {
        (f, s): start_eval(start_dir(f, s), starts[f, s], ROOT / flaws[f]["reward"]) for f, s in pairs
    }
    for (f, s), e in start_evals.items():
        print(
            f"{f} SFT start {s}: accuracy {e['accuracy']:.3f}, format on the flawed subset "
            f"{e['format_on_subset']:.3f}, elsewhere {e['format_elsewhere']:.3f}; discriminator held-out "
            f"AUROC {starts[f, s]['discriminator']['auroc']:.3f}",
            flush=True,
        )

    from tqdm import tqdm

    from aapa_rl.local.recipe import load_recipe

    runs_dir = args.out / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    jobs, finished, failed = [], [], []  # finished: (flaw, arm, start, seed, run directory), wall seconds
    # Flaw by flaw and arm by arm, weak budgets first: a sweep cut short still has whole arms.
    for flaw in flaws:
        for arm in cfg["arms"]:
            for sft_seed in cfg["starts"]:
                for seed in cfg["seeds"]:
                    run_dir = runs_dir / f"{flaw}-{arm}-sft{sft_seed}-seed{seed}"
                    start = start_dir(flaw, sft_seed)
                    recipe = drift.arm_recipe(flaw_cfgs[flaw], arm, seed, run_dir, start)
                    recipe["reward"] = str(ROOT / flaws[flaw]["reward"])
                    job = (flaw, arm, sft_seed, seed, run_dir)
                    if drift.reusable(run_dir, recipe, starts[flaw, sft_seed]):
                        finished.append((job, math.nan))
                        continue
                    # a bad arm fails here, before anything runs
                    load_recipe(drift.write_run_config(run_dir, recipe, starts[flaw, sft_seed]))
                    jobs.append(job)
    print(
        f"{len(jobs) + len(finished)} runs ({len(flaws)} flaws x {len(cfg['arms'])} arms x "
        f"{len(cfg['starts'])} starts x {len(cfg['seeds'])} seeds), {len(finished)} finished earlier; "
        f"{cfg['workers']} at a time; logs in {runs_dir}/*.log",
        flush=True,
    )
    with ThreadPoolExecutor(cfg["workers"]) as pool:
        futures = {pool.submit(drift.train, job[-1].with_suffix(".yaml"), job[-1]): job for job in jobs}
        for future in tqdm(
            as_completed(futures), total=len(futures), desc="selection runs", dynamic_ncols=True
        ):
            job = futures[future]
            code, wall = future.result()
            if code != 0:
                failed.append(f"{job[-1].name} (exit {code}, see {job[-1]}.log)")
                continue
            finished.append((job, wall))
            tqdm.write(f"{job[-1].name}: done ({wall:.0f}s)")
    records = [
        complete(drift.run_record(cfg, arm, s, seed, run_dir, start_evals[flaw, s], wall), flaw)
        for (flaw, arm, s, seed, run_dir), wall in finished
    ]

    shutil.rmtree(results, ignore_errors=True)
    results.mkdir(parents=True)
    order = {arm: i for i, arm in enumerate(cfg["arms"])}
    records.sort(key=lambda r: (list(flaws).index(r["flaw"]), order[r["arm"]], r["start"], r["seed"]))
    by_flaw, tables = {}, []
    for flaw in flaws:
        mine = [r for r in records if r["flaw"] == flaw]
        drift.judge(mine, cfg)  # per flaw: the baseline of the same (flaw, start, seed)
        evals = {s: start_evals[flaw, s] for s in cfg["starts"]}
        by_flaw[flaw] = summarize(mine, cfg, evals)
        tables.append(f"## {flaw}\n\n{table(by_flaw[flaw], cfg, evals)}")
        if mine:
            plot(by_flaw[flaw], cfg, flaw, results / f"{flaw}.png")
    for rec in records:
        (results / f"{rec['flaw']}-{rec['arm']}-sft{rec['start']}-seed{rec['seed']}.json").write_text(
            json.dumps(rec, separators=(",", ":")) + "\n"
        )
    wall = time.perf_counter() - started
    command = " ".join(["python bench/selection.py"] + (argv if argv is not None else sys.argv[1:]))
    summary = {
        "command": command,
        "machine": machine(),
        "config": cfg,
        "starts": {f"{f}-sft{s}": {**starts[f, s], "eval": start_evals[f, s]} for f, s in pairs},
        "flaws": by_flaw,
        "failed": failed,
        "wall_seconds": round(wall, 1),  # this invocation, reused runs not included
        "reused_runs": [
            f"{r['flaw']}-{r['arm']}-sft{r['start']}-seed{r['seed']}"
            for r in records
            if r["wall_seconds"] is None
        ],
    }
    (results / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    # A failed run is in no row of the tables: named under them
    (results / "table.md").write_text(
        "\n\n".join(tables) + "\n" + "".join(f"\nFAILED: {f}\n" for f in failed)
    )
    v = cfg["verdict"]
    print(
        f"\nHeld-out greedy metrics after RL (mean +- std over {len(cfg['starts'])} SFT starts x "
        f"{len(cfg['seeds'])} RL seeds), {command}; drifted: format on the flawed subset < "
        f"{v['drift_below']}, held: >= {v['hold_at_least']}; anchor budget: lam x weighted expert tokens, "
        "summed over the run."
    )
    for flaw, text in zip(flaws, tables, strict=True):
        print(f"\n{text}\n")
        smallest = by_flaw[flaw]["smallest_holding_budget"]
        print(
            "smallest budget (rho, lam) holding every run where the baseline drifted: "
            + ", ".join(f"{s} {b if b else 'none in the grid'}" for s, b in smallest.items())
        )
        for t in by_flaw[flaw]["targets"]:
            incomplete = f", incomplete: {t['incomplete']}" if "incomplete" in t else ""
            print(f"  [{'met' if t['met'] else 'NOT met'}{incomplete}] {t['target']}: {t['value']}")
    print(f"wall time {wall / 60:.1f} min; results in {results}")
    if failed:
        print("FAILED runs: " + "; ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
