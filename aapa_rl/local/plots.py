"""PNG plots of one run (plot_run) and of several runs side by side (plot_compare, `aapa-rl analyze`)."""

from __future__ import annotations

import fnmatch
import json
import sys
from pathlib import Path

import numpy as np

from aapa_rl.data.rows import DataError


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def read_log(path: Path) -> list[dict]:
    """The rows of a run's log (metrics.jsonl, scores.jsonl). A last line that is cut off (no newline, not
    JSON) is the row being written when the run was killed: it is dropped with a warning. Any other bad
    line is a DataError naming the file and line."""
    if not path.exists():
        return []
    lines = path.read_text().splitlines(True)
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            if number == len(lines) and not line.endswith("\n"):
                print(
                    f"warning: {path}: line {number} was cut off (the run stopped while writing it); "
                    "dropping it",
                    file=sys.stderr,
                )
                continue
            raise DataError(f"{path}: line {number}: not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            raise DataError(f"{path}: line {number}: expected a JSON object with an integer 'step'")
        rows.append(row)
    return rows


def series(rows: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and r[key] == r[key]]
    return (
        (np.array([p[0] for p in pts]), np.array([p[1] for p in pts], dtype=float))
        if pts
        else (np.array([]),) * 2
    )


def smooth(y: np.ndarray) -> np.ndarray:
    window = max(1, len(y) // 25)
    if window == 1:
        return y
    return np.convolve(np.pad(y, (window - 1, 0), mode="edge"), np.ones(window) / window, mode="valid")


def _expand(rows: list[dict], keys: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The (key, name) pairs with each pattern (a key with `*`) replaced by the logged keys it matches, named
    `name` with `*` filled in: "reward/*_correct" finds reward/math_correct for any reward's correctness."""
    out = []
    for key, name in keys:
        if "*" not in key:
            out.append((key, name))
            continue
        logged = dict.fromkeys(k for row in rows for k in row if fnmatch.fnmatchcase(k, key))
        prefix, suffix = key.split("*")
        out += [(k, name.replace("*", k[len(prefix) : len(k) - len(suffix)])) for k in logged]
    return out


def _lines(ax, runs: dict[str, list[dict]], keys: list[tuple[str, str]], title: str) -> bool:
    drawn = False
    for label, rows in runs.items():
        for key, name in _expand(rows, keys):
            x, y = series(rows, key)
            if not len(x):
                continue
            tag = f"{label}: {name}" if len(runs) > 1 else name
            if key.startswith("eval/"):
                ax.plot(x, y, "o-", label=tag, markersize=4)
            else:
                ax.plot(x, smooth(y), label=tag)
            drawn = True
    ax.set_title(title)
    ax.set_xlabel("step")
    if drawn:
        ax.legend(fontsize=7)
    return drawn


def _figure(path: Path, runs: dict[str, list[dict]], keys: list[tuple[str, str]], title: str) -> Path | None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    drawn = _lines(ax, runs, keys, title)
    if drawn:
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    plt.close(fig)
    return path if drawn else None


def _late(scores: list[dict], key: str, fraction: float = 0.2, first: bool = False) -> np.ndarray:
    rows = [s for s in scores if s.get(key)]
    if not rows:
        return np.array([])
    n = max(1, int(len(rows) * fraction))
    picked = rows[:n] if first else rows[-n:]
    values = np.array([v for s in picked for v in s[key]], dtype=float)
    return values[np.isfinite(values)]  # NaN: a prompt without an expert, or a failed score


CURVES = {
    "reward": (
        [
            ("reward/raw", "reward (raw)"),
            ("reward/shaped", "reward (shaped)"),
            ("eval/reward", "eval reward"),
        ],
        "reward",
    ),
    "accuracy": (
        [
            ("reward/correct", "train correct"),
            ("reward/*_correct", "train *_correct"),  # a reward_fns module's correctness (math_correct)
            ("reward/format", "train format"),
            ("reward/ifeval_strict_prompt", "train prompt-level"),  # IFEval: every instruction followed
            ("eval/accuracy", "eval accuracy"),
            ("eval/reward/format", "eval format"),
            ("eval/reward/ifeval_strict_instruction", "eval instructions followed (mean per prompt)"),
        ],
        "accuracy and format",
    ),
    "length": (
        [("response/length", "train length"), ("eval/length", "eval length")],
        "response length (tokens)",
    ),
    "anchor_gap": ([("aapa/gap_mean", "gap mean"), ("aapa/gap_max", "gap max")], "anchor gap"),
    "lambda": ([("lambda", "lambda"), ("alpha", "alpha"), ("mu", "CHORD mu")], "schedule"),
    "logp": (
        [("logp/rollout", "rollouts"), ("logp/expert", "experts")],
        "mean log-prob per token under the policy",
    ),
}


def plot_run(run_dir: str | Path) -> list[Path]:
    """reward, accuracy, length, anchor gap, lambda and log-prob curves, and the D histogram, as PNGs."""
    run_dir = Path(run_dir)
    out = run_dir / "plots"
    out.mkdir(exist_ok=True)
    rows = read_log(run_dir / "metrics.jsonl")
    made = [
        _figure(out / f"{name}.png", {run_dir.name: rows}, keys, title)
        for name, (keys, title) in CURVES.items()
    ]
    scores = read_log(run_dir / "scores.jsonl")
    made.append(histograms(out / "disc_hist.png", {run_dir.name: scores}, "d", "D(x, y)"))
    return [p for p in made if p is not None]


def histograms(path: Path, runs: dict[str, list[dict]], kind: str, xlabel: str) -> Path | None:
    """Per run: rollouts early vs late in training against the experts, for D scores or log-probs."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(runs), figsize=(5.5 * len(runs), 3.8), squeeze=False)
    drawn = False
    for ax, (label, scores) in zip(axes[0], runs.items(), strict=True):
        groups = {
            "rollouts, first 20% of steps": _late(scores, f"{kind}_rollout", first=True),
            "rollouts, last 20% of steps": _late(scores, f"{kind}_rollout"),
            "experts, last 20% of steps": _late(scores, f"{kind}_expert"),
        }
        values = (
            np.concatenate([v for v in groups.values() if len(v)])
            if any(len(v) for v in groups.values())
            else np.array([])
        )
        if not len(values):
            ax.set_title(f"{label}: no data")
            continue
        bins = np.linspace(0, 1, 41) if kind == "d" else np.linspace(values.min(), values.max() + 1e-9, 41)
        for name, v in groups.items():
            if len(v):
                ax.hist(
                    v,
                    bins=bins,
                    histtype="step",
                    density=True,
                    linewidth=2 if "expert" in name else 1.2,
                    label=f"{name} ({len(v)})",
                )
        ax.set_title(label)
        ax.set_xlabel(xlabel)
        ax.legend(fontsize=7)
        drawn = True
    if drawn:
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    plt.close(fig)
    return path if drawn else None


def plot_compare(run_dirs: list[str | Path], out: str | Path, labels: list[str] | None = None) -> list[Path]:
    """The paper's analyses side by side: curves of every run on shared axes, and per-run distributions of
    rollout vs expert log-probabilities and of discriminator scores."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    labels = labels or [Path(d).name for d in run_dirs]
    metrics = {lab: read_log(Path(d) / "metrics.jsonl") for lab, d in zip(labels, run_dirs, strict=True)}
    scores = {lab: read_log(Path(d) / "scores.jsonl") for lab, d in zip(labels, run_dirs, strict=True)}
    made = [
        _figure(out / f"compare_{name}.png", metrics, keys, title) for name, (keys, title) in CURVES.items()
    ]
    made.append(histograms(out / "compare_logp_hist.png", scores, "logp", "mean log-prob per token"))
    made.append(histograms(out / "compare_disc_hist.png", scores, "d", "D(x, y)"))
    return [p for p in made if p is not None]
