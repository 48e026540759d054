"""`aapa-rl prepare-data`: prompt data + expert bank -> the files both trainers read.

Into OUT_DIR (each written atomically):
  train.jsonl    {id, prompt, label}: OpenRLHF's prompt dataset (--data.input_key prompt
                 --data.label_key label); label = {answer / tests / cases / instruction_id_list / kwargs as
                 mapped, expert}
  eval.jsonl     {id, prompt, label, expert}: the held-out split (--eval.dataset); experts, when known, are in
                 the label and, for the local trainer's eval, at the top level; not written when the split is
                 empty (--eval-size 0, or a fraction of few prompts), as OpenRLHF cannot load an empty file
  experts.jsonl  {id, prompt, expert, label}: the expert bank of the training split (discriminator, critic)
  sft.jsonl      {id, prompt, expert}: the SFT data of the training split (local trainer's SFT stage)
  report.json    the counts printed at the end
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from aapa_rl.data.rows import (
    BadRows,
    DataError,
    PromptRow,
    RowError,
    prompt_id,
    read_records,
    row_id,
    text,
    write_json,
    write_jsonl,
)

MISSING_EXPERT = ("error", "drop", "keep")
# Everything prepare-data may write into --out-dir.
OUTPUTS = ("train.jsonl", "eval.jsonl", "experts.jsonl", "sft.jsonl", "report.json")


def read_bank(path: str | Path, bad_rows: BadRows) -> dict[str, tuple[int, str, str]]:
    """id -> (row, prompt, expert); rows without an id get the prompt-hash id, as in the prompt data."""
    bank: dict[str, tuple[int, str, str]] = {}
    for row, record in read_records(path, bad_rows):
        try:
            prompt = text(record, "prompt")
            expert = text(record, "expert")
            rid = row_id(record, "id", prompt) if record.get("id") is not None else prompt_id(prompt)
            if rid in bank:
                raise RowError("id", f"duplicate id {rid!r} (first at row {bank[rid][0]})")
        except RowError as e:
            bad_rows.handle(f"{path}: row {row}: {e}")
            continue
        bank[rid] = (row, prompt, expert)
    return bank


def split_sizes(n: int, eval_size: float) -> int:
    """Held-out rows: a fraction when eval_size < 1, else a count."""
    if eval_size < 0 or (eval_size >= 1 and eval_size != int(eval_size)):
        raise DataError(f"--eval-size must be a fraction in [0, 1) or a whole count, got {eval_size}")
    n_eval = round(eval_size * n) if eval_size < 1 else int(eval_size)
    if n_eval >= n:
        raise DataError(f"--eval-size {eval_size} leaves no training rows out of {n}")
    return n_eval


def prepare(prompts: list[PromptRow], bank: dict[str, tuple[int, str, str]] | None, *, eval_size: float,
            seed: int, missing_expert: str, prompts_path: str, bank_path: str | None, bad_rows: BadRows
            ) -> tuple[dict[str, list[dict]], dict[str, Any]]:
    """(rows per output file name, report)."""
    if missing_expert not in MISSING_EXPERT:
        raise DataError(f"--missing-expert must be one of {MISSING_EXPERT}, got {missing_expert!r}")
    held_out = set(random.Random(seed).sample(range(len(prompts)), split_sizes(len(prompts), eval_size)))
    experts: dict[str, str] = {}
    if bank is not None:
        by_id = {p.id: p for p in prompts}
        differ = []
        for rid, (row, prompt, expert) in bank.items():
            if rid in by_id and by_id[rid].prompt != prompt:
                differ.append(f"{bank_path}: row {row}: field 'prompt': differs from {prompts_path} row "
                              f"{by_id[rid].row} with the same id {rid!r}")
            elif rid in by_id:
                experts[rid] = expert
        # No match at all is a mismatch of the commands' flags, not a few bad rows.
        if not experts:
            first = f" (first: {differ[0]})" if differ else ""
            raise DataError(f"{bank_path}: none of its {len(bank)} rows matches one of the {len(prompts)} "
                            f"prompts of {prompts_path} by id and prompt{first}; was it built with another "
                            "--prompt-template, --prompt-key or --id-key? Give every command the same ones")
        for message in differ:
            bad_rows.handle(message)
    out: dict[str, list[dict]] = {"train": [], "eval": []}
    dropped = 0
    for i, p in enumerate(prompts):
        # The raw prompt rides along: with a chat template, OpenRLHF's prompt differs from the one the
        # discriminator was trained on, and the adapter scores with this one.
        label = {**p.label, "prompt": p.prompt}
        if bank is not None:
            label["expert"] = experts.get(p.id)
        if i in held_out:
            # The local trainer's eval reads the expert (for expert NLL) at the top level.
            extra = {"expert": label["expert"]} if bank is not None else {}
            out["eval"].append({"id": p.id, "prompt": p.prompt, "label": label, **extra})
            continue
        if bank is not None and p.id not in experts:
            if missing_expert == "error":
                raise DataError(f"{prompts_path}: row {p.row}: field 'expert': no expert for id {p.id!r} in "
                                f"{bank_path} (pass --missing-expert drop or keep)")
            if missing_expert == "drop":
                dropped += 1
                continue
        out["train"].append({"id": p.id, "prompt": p.prompt, "label": label})
    if not out["train"]:  # only --missing-expert drop empties it, when the bank matches held-out rows only
        raise DataError(f"{prompts_path}: no training rows left: all {dropped} training prompts have no "
                        f"expert in {bank_path} (--missing-expert drop), and {len(bank) - len(experts)} of "
                        f"its {len(bank)} rows match no prompt; was it built with another --prompt-template "
                        "or --prompt-key?")
    if bank is not None:
        train_experts = [r for r in out["train"] if r["label"]["expert"] is not None]
        out["experts"] = [
            {"id": r["id"], "prompt": r["prompt"], "expert": r["label"]["expert"],
             "label": {k: v for k, v in r["label"].items() if k not in ("expert", "prompt")}}
            for r in train_experts
        ]
        out["sft"] = [{"id": r["id"], "prompt": r["prompt"], "expert": r["label"]["expert"]}
                      for r in train_experts]
    report = {
        "prompts": len(prompts),
        "train": len(out["train"]),
        "eval": len(out["eval"]),
        "label_fields": sorted(prompts[0].label) + (["expert"] if bank is not None else []),
        "bad_rows_skipped": len(bad_rows.messages),
    }
    if bank is not None:
        report |= {
            "bank_rows": len(bank),
            "bank_rows_unused": len(bank) - len(experts),
            "train_with_expert": len(out["experts"]),
            "train_without_expert_kept": len(out["train"]) - len(out["experts"]),
            "train_without_expert_dropped": dropped,
            "eval_with_expert": sum(r["label"]["expert"] is not None for r in out["eval"]),
        }
    if not out["eval"]:
        del out["eval"]
    return out, report


def write_outputs(out_dir: str | Path, files: dict[str, list[dict]], report: dict[str, Any]) -> None:
    """The files as OUT_DIR/NAME.jsonl and report.json. Stops, before writing, when an output of an earlier
    run is there that this run does not rewrite: read beside the new files it would mix two runs, and
    removing it could delete a file put there by hand."""
    out_dir = Path(out_dir)
    written = {f"{name}.jsonl" for name in files} | {"report.json"}
    stale = [name for name in OUTPUTS if name not in written and (out_dir / name).exists()]
    if stale:
        raise DataError(f"{out_dir}: {', '.join(stale)} from an earlier run would be left beside this run's "
                        "outputs; delete them or choose another --out-dir")
    for name, rows in files.items():
        write_jsonl(out_dir / f"{name}.jsonl", rows)
    write_json(out_dir / "report.json", report)
