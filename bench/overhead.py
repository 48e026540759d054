"""What AAPA costs per step: GRPO + AAPA against GRPO, and CHORD + AAPA against CHORD, in one run.

    .venv/bin/python bench/overhead.py [--steps 20] [--warmup 2] [--quick] [--config bench/drift.yaml]
                                       [--out runs/bench] [--results FILE] [--publish]

Every trainer starts from the same SFT model with the same seed, so they draw the same prompts at each
step; their steps are interleaved (A, B, A, B, ...) so that the load of this shared machine falls on both
alike. Reported: the median time of each phase of a step (rollout, reward, discriminator scoring, policy
gradient forward/backward, CHORD's expert SFT term, anchor forward/backward, optimizer, the rest), the
ratio of median step times, the discriminator's share of the AAPA step, and the anchor's cost per anchor
token at rho = 2/8, 4/8 and 8/8 (cost proportional to tokens: about the same per token). The SFT start and
the discriminator are bench/drift.py's first start, OUT/start/sftN (built here if missing). Results:
OUT/results/overhead[-quick].json, or with --publish the committed bench/results/overhead[-quick].json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from drift import ROOT, load_config, merge, prepare_start  # noqa: E402

PHASES = [  # (metrics key, name)
    ("time/rollout", "rollout"),
    ("time/reward", "reward"),
    ("time/critic", "discriminator"),
    ("time/policy", "policy fwd/bwd"),
    ("time/sft", "expert SFT fwd/bwd"),
    ("time/anchor", "anchor fwd/bwd"),
    ("time/optimizer", "optimizer"),
]
AAPA = {"alpha": 0.5, "lam": 0.5, "rho": 0.25}  # the drift bench's AAPA setting
PAIRS = {  # baseline, with AAPA
    "GRPO": ({"objective": "grpo"}, {"objective": "grpo", **AAPA}),
    "CHORD": ({"objective": "chord"}, {"objective": "chord", **AAPA}),
}
RHOS = [0.25, 0.5, 1.0]  # the anchor's cost against its tokens (GRPO + AAPA)


def build(cfg: dict, start: Path, out: Path, name: str, stage: dict, steps: int):
    from aapa_rl.local.recipe import load_recipe
    from aapa_rl.local.trainer import Trainer

    aapa = stage.get("lam", 0) > 0 or stage.get("alpha", 0) > 0
    recipe = merge(
        cfg["rl"],
        {
            "out": str(out / name),
            "steps": steps,
            "seed": 1,
            "task": cfg["task"],
            "model": {"path": str(start / "sft" / "final")},
            # The baselines run without a discriminator: plain GRPO / CHORD pay nothing for AAPA.
            "aapa": {
                "discriminator": str(start / "discriminator") if aapa else None,
                "chord": {"decay_steps": steps},
                "stages": [{"end_step": steps, **stage}],
            },
        },
    )
    return Trainer(load_recipe(None, base=recipe), overwrite=True, progress=False)


def measure(trainers: dict, steps: int, warmup: int) -> dict[str, list[dict]]:
    """Interleaved steps of every trainer; the first `warmup` steps are dropped."""
    from tqdm import tqdm

    rows: dict[str, list[dict]] = {name: [] for name in trainers}
    for step in tqdm(range(warmup + steps), desc="overhead steps", dynamic_ncols=True):
        for name, trainer in trainers.items():
            m, _ = trainer.train_step(step)
            if step >= warmup:
                rows[name].append(m)
    return rows


def phases(rows: list[dict]) -> dict[str, float]:
    """Median seconds per phase ("other" = step minus the timed phases, per step) and per step."""
    out = {name: statistics.median(r.get(key, 0.0) for r in rows) for key, name in PHASES}
    out["other"] = statistics.median(r["time/step"] - sum(r.get(k, 0.0) for k, _ in PHASES) for r in rows)
    out["step"] = statistics.median(r["time/step"] for r in rows)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", type=Path, default=ROOT / "bench" / "drift.yaml")
    parser.add_argument("--steps", type=int, help="measured steps per trainer (default 20, quick 6)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("runs/bench"))
    parser.add_argument("--results", type=Path, help="default OUT/results/overhead[-quick].json")
    parser.add_argument(
        "--publish", action="store_true", help="write the results to the committed bench/results/ instead"
    )
    args = parser.parse_args(argv)
    steps = args.steps or (6 if args.quick else 20)
    name = f"overhead{'-quick' if args.quick else ''}.json"
    results = args.results or (ROOT / "bench" / "results" if args.publish else args.out / "results") / name
    from aapa_rl.local.demo import machine, pin_cpu_kernels

    pin_cpu_kernels()  # before torch loads
    cfg = load_config(args.config, quick=False)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sft_seed = cfg["starts"][0]
    start = args.out / "start" / f"sft{sft_seed}"
    prepare_start(cfg, start, sft_seed)
    import torch

    torch.set_num_threads(1)
    out = args.out / "overhead"
    shutil.rmtree(out, ignore_errors=True)
    total = args.warmup + steps
    trainers = {}
    for base, (plain, with_aapa) in PAIRS.items():
        trainers[base] = build(cfg, start, out, base.lower(), plain, total)
        trainers[f"{base} + AAPA"] = build(cfg, start, out, f"{base.lower()}_aapa", with_aapa, total)
    for rho in RHOS[1:]:
        trainers[f"GRPO + AAPA rho={rho}"] = build(
            cfg, start, out, f"grpo_aapa_rho{rho}", {"objective": "grpo", **AAPA, "rho": rho}, total
        )
    started = time.perf_counter()
    rows = measure(trainers, steps, args.warmup)
    for trainer in trainers.values():
        trainer.close()
    med = {name: phases(r) for name, r in rows.items()}

    names = [name for _, name in PHASES] + ["other", "step"]
    lines = [f"{'median ms':22s}" + "".join(f"{n[:14]:>15s}" for n in names)]
    for name, m in med.items():
        lines.append(f"{name:22s}" + "".join(f"{1000 * m[n]:15.1f}" for n in names))
    ratios = {base: med[f"{base} + AAPA"]["step"] / med[base]["step"] for base in PAIRS}
    disc_share = {
        f"{b} + AAPA": med[f"{b} + AAPA"]["discriminator"] / med[f"{b} + AAPA"]["step"] for b in PAIRS
    }
    anchor = {}
    for rho in RHOS:
        name = "GRPO + AAPA" if rho == RHOS[0] else f"GRPO + AAPA rho={rho}"
        tokens = statistics.median(r.get("aapa/anchor_tokens", 0) for r in rows[name])
        anchor[str(rho)] = {
            "anchor_ms": 1000 * med[name]["anchor fwd/bwd"],
            "anchor_tokens": tokens,
            "us_per_token": 1e6 * med[name]["anchor fwd/bwd"] / tokens if tokens else math.nan,
        }
    lines.append("")
    for base, ratio in ratios.items():
        lines.append(f"step time {base} + AAPA / {base}: {ratio:.3f}")
    for name, share in disc_share.items():
        lines.append(f"discriminator scoring in {name}: {share:.1%} of the step (target <= 10%)")
    for rho, a in anchor.items():
        lines.append(
            f"anchor at rho={rho}: {a['anchor_ms']:.1f} ms for {a['anchor_tokens']:.0f} expert tokens "
            f"= {a['us_per_token']:.0f} us/token"
        )
    text = "\n".join(lines)
    command = " ".join(["python bench/overhead.py"] + (argv if argv is not None else sys.argv[1:]))
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(
        json.dumps(
            {
                "command": command,
                "machine": machine(),
                "steps": steps,
                "warmup": args.warmup,
                "threads": 1,
                "median_seconds": med,
                "step_ratio": ratios,
                "discriminator_share": disc_share,
                "anchor_per_token": anchor,
                "wall_seconds": round(time.perf_counter() - started, 1),
            },
            indent=1,
        )
        + "\n"
    )
    print(f"\nPer-phase median step times over {steps} interleaved steps (1 torch thread), {command}:")
    print(text)
    print(f"results in {results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
