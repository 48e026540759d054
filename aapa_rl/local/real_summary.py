"""The last step of `make example-real` (docs/real-model.md): its report, from the earlier steps' files.

    python -m aapa_rl.local.real_summary --out runs/real

Reads OUT/experts/*.report.json (build-experts), OUT/disc/*/report.json (every discriminator variant),
OUT/start/eval.jsonl (`aapa-rl eval` of the untrained model) and the runs OUT/grpo and OUT/grpo-aapa; writes
OUT/summary.md, OUT/summary.json and OUT/plots/compare_*.png, and prints the summary.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from aapa_rl.data.rows import DataError, read_json, read_rows
from aapa_rl.local.evaluation import format_table

RUNS = {"grpo": "GRPO", "grpo-aapa": "GRPO + AAPA"}
EVAL_COLUMNS = [
    ("instruction_level", "instr."),
    ("prompt_level", "prompt"),
    ("length", "length"),
    ("truncated", "trunc."),
    ("expert_nll_token", "nll/tok"),
    ("d_response", "D(resp)"),
    ("d_expert", "D(exp)"),
]
NEGATIVES = [
    ("all", "all"),
    ("rollout", "rollout"),
    ("truncated", "truncated"),
    ("span_repeated", "repeated"),
    ("reasoning_dropped", "last only"),
    ("sentences_shuffled", "shuffled"),
    ("answer_corrupted", "corrupted"),
    ("filler_appended", "filler"),
    ("other_expert", "other"),
]


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        raise DataError(f"{path}: not found; run `make example-real` (it resumes where it stopped)")
    records = []
    for _, record in read_rows(path):
        if isinstance(record, DataError):  # e.g. a line cut off by a killed run
            raise record
        records.append(record)
    return records


def eval_metrics(records: list[dict], source: Path) -> dict[str, float]:
    """IFEval's strict accuracies over held-out records (one per prompt) and the means of the other columns.
    Instruction-level is IFEval's: followed instructions over all instructions, not a mean over prompts."""
    followed = total = 0.0
    for row, record in enumerate(records, start=1):
        label = record.get("label")
        ids = label.get("instruction_id_list") if isinstance(label, dict) else label
        if not isinstance(ids, list) or "reward/ifeval_strict_instruction" not in record:
            raise DataError(f"{source}: row {row}: field 'label': not an IFEval record (no "
                            "instruction_id_list or no reward/ifeval_strict_instruction)")
        total += len(ids)
        followed += record["reward/ifeval_strict_instruction"] * len(ids)

    def mean(key: str) -> float:
        values = [r[key] for r in records if key in r]
        return sum(values) / len(values) if values else math.nan

    return {
        "n": float(len(records)),
        "instruction_level": followed / total if total else math.nan,
        "prompt_level": mean("reward/ifeval_strict_prompt"),
        **{key: mean(key) for key in ("length", "truncated", "expert_nll_token", "d_response", "d_expert")},
    }


def run_records(run: Path) -> tuple[dict, list[dict], Path]:
    """(summary.json, the final eval's records, their file) of a finished run."""
    summary_path = run / "summary.json"
    if not summary_path.exists():
        raise DataError(f"{run}: no summary.json, the run has not finished; rerun `make example-real`")
    summary = read_json(summary_path, ("steps", "train_seconds"))
    path = run / "eval" / f"step_{summary['steps']:06d}.jsonl"
    return summary, read_jsonl(path), path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/real"))
    args = parser.parse_args(argv)
    out: Path = args.out
    try:
        experts = {split: read_json(out / "experts" / f"{split}.report.json",
                                    ("verified_prompts", "prompts", "coverage", "samples"))
                   for split in ("train", "eval") if (out / "experts" / f"{split}.report.json").exists()}
        held_out = ("heldout.auroc", "heldout.auroc_per_type", "heldout.n", "heldout.positives")
        discs = {path.parent.name: read_json(path, held_out)
                 for path in sorted((out / "disc").glob("*/report.json"))}
        start = out / "start" / "eval.jsonl"
        rows = {"start": eval_metrics(read_jsonl(start), start)}
        steps, seconds = {}, {}
        for name, label in RUNS.items():
            summary, records, path = run_records(out / name)
            rows[label] = eval_metrics(records, path)
            steps[label], seconds[label] = summary["steps"], summary["train_seconds"]
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    from aapa_rl.local.plots import plot_compare

    plots = plot_compare([out / name for name in RUNS], out / "plots", list(RUNS.values()))
    disc_rows = {
        name: {"all": r["heldout"]["auroc"], **r["heldout"]["auroc_per_type"]} for name, r in discs.items()
    }
    lines = ["# SmolLM2-135M-Instruct: GRPO vs GRPO + AAPA on the IFEval-style task (make example-real)", ""]
    for split, report in experts.items():
        lines.append(
            f"Experts for the {split} prompts, the model as its own teacher: {report['verified_prompts']} of "
            f"{report['prompts']} prompts ({report['coverage']:.0%}) have a sample that follows every "
            f"instruction, among {report['samples']} samples."
        )
    name, report = next(iter(discs.items()), ("none", {"heldout": {"n": 0, "positives": 0}}))
    held = report["heldout"]
    lines += [
        "",
        f"Discriminators: held-out AUROC of experts vs all negatives and vs each type ({name}: "
        f"{held['positives']} experts and {held['n'] - held['positives']} negatives;",
        "every variant holds out the same prompts). rollout: the model's own samples; the others are made",
        "from experts (last only: the last sentence alone); '-': none among the held-out prompts.",
        "",
        "```",
        format_table(disc_rows, NEGATIVES),
        "```",
        "",
    ]
    trained = ", ".join(f"{label} {steps[label]} steps in {seconds[label]:.0f} s" for label in RUNS.values())
    deltas = {
        f"{label} - start": {k: rows[label][k] - rows["start"][k] for k, _ in EVAL_COLUMNS}
        for label in RUNS.values()
    }
    lines += [
        f"Held-out prompts ({rows['start']['n']:.0f}), greedy. instr. / prompt: IFEval's strict instruction-",
        "and prompt-level accuracy; length in tokens; trunc.: share of responses cut at the token limit;",
        "nll/tok: expert NLL per token; D: the RL discriminator's score of responses and of experts.",
        f"Training: {trained}.",
        "",
        "```",
        format_table({**rows, **deltas}, EVAL_COLUMNS),
        "```",
        "",
        "Plots: " + ", ".join(str(p.relative_to(out)) for p in plots),
    ]
    times = out / "times.txt"  # GNU time's line per step, appended by make (a resumed step has several)
    if times.exists():
        lines += ["", "Wall time of each step of make example-real (times.txt):", "", "```",
                  times.read_text().rstrip(), "```"]
    text = "\n".join(lines)
    (out / "summary.md").write_text(text + "\n")
    (out / "summary.json").write_text(json.dumps(
        {"experts": experts, "discriminators": disc_rows, "eval": rows, "steps": steps,
         "train_seconds": seconds}, indent=2) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
