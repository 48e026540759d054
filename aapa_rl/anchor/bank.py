"""Expert bank: prompt -> expert response pairs read from JSONL, parquet or a `datasets` directory
(aapa_rl.data.rows.read_rows: rows numbered from 1).

Every bad row raises an error naming the file, row and field; with `allow_skips=True` it is skipped
instead, and every skip is counted and kept in `bank.skipped` (one message per skipped row).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aapa_rl.data.rows import DataError, check_row, read_rows


@dataclass(frozen=True)
class ExpertRecord:
    prompt: str
    expert: str
    id: str | None
    label: Any
    row: int


class ExpertBank:
    """Expert responses looked up by prompt text or id. One record may have several ids (exact duplicate rows
    with different ids): `ids` maps each to its record; by default each record's own id."""

    def __init__(self, records: list[ExpertRecord], source: str = "<memory>",
                 skipped: list[str] | None = None, ids: dict[str, ExpertRecord] | None = None):
        self.records = records
        self.source = source
        self.skipped = skipped or []
        self._by_prompt = {r.prompt: r for r in records}
        self._by_id = ids if ids is not None else {r.id: r for r in records if r.id is not None}

    @classmethod
    def load(cls, path: str | Path, *, allow_skips: bool = False) -> ExpertBank:
        path = Path(path)
        records: dict[str, ExpertRecord] = {}
        ids: dict[str, ExpertRecord] = {}
        skipped: list[str] = []
        for number, row in read_rows(path):
            try:
                row = check_row(path, number, row, ("prompt", "expert"), id_key="id")
                prompt, expert = row["prompt"], row["expert"]
                id_ = None if row.get("id") is None else str(row["id"])
                seen = records.get(prompt)
                if seen is not None and seen.expert != expert:
                    raise DataError(
                        f"{path}: row {number}: field 'expert': the prompt already has a different expert "
                        f"(row {seen.row})"
                    )
                if id_ is not None and id_ in ids and ids[id_].prompt != prompt:
                    raise DataError(
                        f"{path}: row {number}: field 'id': {id_!r} already names another prompt "
                        f"(row {ids[id_].row})"
                    )
            except DataError as e:
                if not allow_skips:
                    raise
                skipped.append(str(e))
                continue
            if seen is not None:
                message = f"{path}: row {number}: duplicate of row {seen.row} (same prompt and expert)"
                if id_ is not None and id_ not in ids:  # the row adds no record, but a label may use its id
                    ids[id_] = seen
                    message += f"; its id {id_!r} names row {seen.row}"
                skipped.append(message)
                continue
            records[prompt] = ExpertRecord(prompt, expert, id_, row.get("label"), number)
            if id_ is not None:
                ids[id_] = records[prompt]
        if not records:
            raise DataError(f"{path}: no usable rows" + (f" ({len(skipped)} skipped)" if skipped else ""))
        if skipped:
            print(f"expert bank {path}: {len(records)} rows kept, {len(skipped)} skipped "
                  f"(first: {skipped[0]})", file=sys.stderr)
        return cls(list(records.values()), str(path), skipped, ids)

    def expert_for(self, prompt: str | None = None, id: str | None = None) -> str | None:
        """The expert for this prompt text (or id); None when the bank has none."""
        if (prompt is None) == (id is None):
            raise ValueError("expert_for takes exactly one of prompt= or id=")
        record = self._by_prompt.get(prompt) if prompt is not None else self._by_id.get(str(id))
        return None if record is None else record.expert

    def __len__(self) -> int:
        return len(self.records)


def label_expert(label: Any, prompt: str, bank: ExpertBank | None) -> tuple[str, str | None]:
    """(the prompt the discriminator sees, the expert) for one sample, the one rule every backend and the
    dry run use: the label dict's `expert`, else the bank by the label's `id`, else by the label's `prompt`
    (the raw prompt, before any chat template: what the discriminator was trained on), else by `prompt`.
    A blank or non-string `expert` in the label counts as none; no expert found gives None."""
    if not isinstance(label, dict):
        return prompt, None if bank is None else bank.expert_for(prompt=prompt)
    disc_prompt = label.get("prompt") or prompt
    expert = label.get("expert")
    if isinstance(expert, str) and expert.strip():
        return disc_prompt, expert
    if bank is None:
        return disc_prompt, None
    expert = None if label.get("id") is None else bank.expert_for(id=label["id"])
    for text in (label.get("prompt"), prompt):
        if expert is None and isinstance(text, str):
            expert = bank.expert_for(prompt=text)
    return disc_prompt, expert
