"""Reading and validating prompt data, expert banks and sample files; atomic writes.

Rows are numbered from 1: for JSONL the row number is the line number, for parquet and `datasets`
directories it is the position in the table. Every error names the file, the row and the field.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

# Label fields the reward functions read (reward_fns label dicts), with the flag that maps each one.
LABEL_FIELDS = ("answer", "tests", "cases", "instruction_id_list", "kwargs")
# A JSON escape of a surrogate code point: json.loads accepts a lone one, which no UTF-8 writer does.
SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


class DataError(ValueError):
    """Bad input; the message names the file, the row and the field."""


class RowError(ValueError):
    """A problem with one field of one row; the caller adds file and row."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"field '{field}': {problem}")


class BadRows:
    """Stops at the first bad row, or, when skipping was allowed explicitly, counts it for the report."""

    def __init__(self, skip: bool):
        self.skip = skip
        self.messages: list[str] = []

    def handle(self, message: str) -> None:
        if not self.skip:
            raise DataError(f"{message} (pass --skip-bad-rows to skip such rows; they are counted)")
        self.messages.append(message)

    def report(self) -> str:
        if not self.messages:
            return "bad rows skipped: 0"
        shown = "\n".join(f"  {m}" for m in self.messages[:20])
        more = f"\n  ... and {len(self.messages) - 20} more" if len(self.messages) > 20 else ""
        return f"bad rows skipped: {len(self.messages)}\n{shown}{more}"


@dataclass(frozen=True)
class PromptRow:
    id: str
    prompt: str
    label: dict[str, Any] = field(default_factory=dict)
    row: int = 0  # row number in the source file, for error messages


def prompt_id(prompt: str) -> str:
    """Id for data without an id column: the same prompt text gets the same id in every command."""
    return hashlib.sha1(prompt.encode("utf-8")).hexdigest()[:16]


def read_rows(path: str | Path, split: str | None = None) -> Iterator[tuple[int, dict | DataError]]:
    """(row number, record) pairs from a JSON Lines file (.jsonl or .json), a .parquet file or a `datasets`
    save_to_disk dir, in file order. A row that is not UTF-8, not JSON, not an object or holds a lone
    surrogate comes as a DataError instead of a record, so that the caller decides whether it stops the run
    or is a counted skip. `split` names a split of a DatasetDict directory; other sources have none."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    if split is not None and not path.is_dir():
        raise DataError(f"{path}: --split {split}: a file has no splits; drop --split")
    if path.is_dir():
        yield from enumerate(_load_dataset_dir(path, split), start=1)
        return
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except pa.ArrowException as e:
            raise DataError(f"{path}: not a readable parquet file ({e})") from None
        yield from enumerate(table.to_pylist(), start=1)
        return
    if path.suffix not in (".jsonl", ".json"):  # .json: JSON Lines too, as OpenRLHF's datasets often are
        raise DataError(f"{path}: unsupported format; expected JSON Lines (.jsonl, .json), .parquet or a "
                        "`datasets` directory")
    with path.open("rb") as fh:
        for row, line in enumerate(fh, start=1):
            if not line.strip():
                continue  # blank lines are not rows
            try:
                record = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError as e:
                yield row, DataError(f"{path}: row {row}: not valid UTF-8 (byte {e.start}: {e.reason})")
                continue
            except json.JSONDecodeError as e:
                yield row, DataError(f"{path}: row {row}: not valid JSON ({e.msg})")
                continue
            if not isinstance(record, dict):
                record = DataError(f"{path}: row {row}: expected a JSON object, got {type(record).__name__}")
            elif SURROGATE_ESCAPE.search(line):  # most often a valid pair (an emoji): only then look closer
                for key, value in record.items():
                    try:
                        json.dumps({key: value}, ensure_ascii=False).encode("utf-8")
                    except UnicodeEncodeError:
                        record = DataError(f"{path}: row {row}: field {key!r}: holds a lone surrogate escape "
                                           "(\\ud800-\\udfff without its pair), not valid Unicode")
                        break
            yield row, record


def read_json(path: str | Path, keys: tuple[str, ...] = ()) -> dict:
    """A JSON object file (a report, a summary) that has `keys` ("a.b": field b of object a); a bad one is a
    DataError naming it."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:  # e.g. cut off by a killed run
        raise DataError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object, got {type(data).__name__}")
    for key in keys:
        value = data
        for part in key.split("."):
            if not isinstance(value, dict) or part not in value:
                raise DataError(f"{path}: field {key!r}: missing")
            value = value[part]
    return data


def read_records(path: str | Path, bad_rows: BadRows, split: str | None = None) -> Iterator[tuple[int, dict]]:
    """read_rows, with unreadable rows handed to `bad_rows` (an error, or a counted skip)."""
    for row, record in read_rows(path, split):
        if isinstance(record, DataError):
            bad_rows.handle(str(record))
            continue
        yield row, record


def _load_dataset_dir(path: Path, split: str | None) -> list[dict]:
    import datasets

    try:
        data = datasets.load_from_disk(str(path))
    except FileNotFoundError as e:
        raise DataError(f"{path}: not a dataset saved with `datasets` save_to_disk ({e})") from e
    if isinstance(data, datasets.DatasetDict):
        if split is None and len(data) == 1:
            split = next(iter(data))
        if split not in data:
            raise DataError(f"{path}: choose a split with --split (this dataset has: {', '.join(data)})")
        data = data[split]
    elif split is not None:
        raise DataError(f"{path}: --split {split}: a single dataset without splits; drop --split")
    return data.to_list()


def text(record: dict, key: str, may_be_empty: bool = False) -> str:
    """A required string field, non-blank unless `may_be_empty`."""
    if key not in record or record[key] is None:
        raise RowError(key, "missing")
    value = record[key]
    if not isinstance(value, str):
        raise RowError(key, f"expected a string, got {type(value).__name__}")
    if not may_be_empty and not value.strip():
        raise RowError(key, "empty text")
    return value


def row_id(record: dict, id_key: str | None, prompt: str) -> str:
    if id_key is None:
        return prompt_id(prompt)
    value = record.get(id_key)
    if value is None:
        raise RowError(id_key, "missing")
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise RowError(id_key, f"expected a string or an integer, got {type(value).__name__}")
    if isinstance(value, str) and not value.strip():
        raise RowError(id_key, "empty text")
    return str(value)


def check_row(path: str | Path, number: int, row: dict | DataError, texts: tuple[str, ...], *,
              may_be_empty: tuple[str, ...] = (), present: tuple[str, ...] = (), id_key: str | None = None
              ) -> dict:
    """A row from read_rows, validated: the `texts` fields are strings (non-blank unless in `may_be_empty`),
    the `present` fields are there (any value), and `id_key`, if the row has it, is a non-blank string or an
    integer. Raises DataError naming the file, row and field."""
    if isinstance(row, DataError):
        raise row
    try:
        for key in texts:
            text(row, key, key in may_be_empty)
        for key in present:
            if row.get(key) is None:
                raise RowError(key, "missing")
        if id_key is not None and row.get(id_key) is not None:
            row_id(row, id_key, "")
    except RowError as e:
        raise DataError(f"{path}: row {number}: {e}") from None
    return row


@dataclass(frozen=True)
class FieldMap:
    """Which source column holds each field (flags --prompt-key, --answer-key, ...)."""

    prompt: str = "prompt"
    prompt_template: str | None = None  # "{prompt}" is replaced by the prompt text
    id: str | None = None
    answer: str | None = None
    answer_after: str | None = None
    tests: str | None = None
    cases: str | None = None
    instruction_id_list: str | None = None
    kwargs: str | None = None

    def label(self, record: dict) -> dict[str, Any]:
        label: dict[str, Any] = {}
        if self.answer is not None:
            label["answer"] = _answer(record, self.answer, self.answer_after)
        if self.tests is not None:
            label["tests"] = text(record, self.tests)
        if self.cases is not None:
            label["cases"] = _cases(record, self.cases)
        if self.instruction_id_list is not None:
            ids = record.get(self.instruction_id_list)
            if not isinstance(ids, list) or not ids or not all(isinstance(i, str) and i for i in ids):
                raise RowError(self.instruction_id_list, "expected a non-empty list of instruction ids")
            label["instruction_id_list"] = ids
        if self.kwargs is not None:
            kwargs = record.get(self.kwargs)
            if not isinstance(kwargs, list) or not all(isinstance(k, dict) for k in kwargs):
                raise RowError(self.kwargs, "expected a list of objects (one per instruction)")
            if "instruction_id_list" in label and len(kwargs) != len(label["instruction_id_list"]):
                raise RowError(self.kwargs, f"has {len(kwargs)} entries for "
                                            f"{len(label['instruction_id_list'])} instructions")
            label["kwargs"] = kwargs
        return label


def _answer(record: dict, key: str, after: str | None) -> str:
    value = record.get(key)
    if value is None:
        raise RowError(key, "missing")
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise RowError(key, f"expected a string or a number, got {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        raise RowError(key, "not a finite number")  # JSON's NaN, Infinity and 1e400 parse as floats
    value = str(value)
    if after is not None:
        if after not in value:
            raise RowError(key, f"has no {after!r} marker (--answer-after)")
        value = value.rsplit(after, 1)[1]
    if not value.strip():
        raise RowError(key, "empty text")
    return value.strip()


def _cases(record: dict, key: str) -> list[dict]:
    cases = record.get(key)
    if not isinstance(cases, list) or not cases:
        raise RowError(key, "expected a non-empty list of {stdin, stdout} objects")
    for i, case in enumerate(cases):
        if not isinstance(case, dict) or not all(isinstance(case.get(k), str) for k in ("stdin", "stdout")):
            raise RowError(key, f"case {i}: expected an object with string 'stdin' and 'stdout'")
    return cases


def add_prompt_args(parser: argparse.ArgumentParser, labels: bool) -> None:
    """Flags naming the prompt data's columns; `labels` adds the reward fields' columns."""
    parser.add_argument("--prompt-key", default="prompt", help="column holding the prompt text")
    parser.add_argument("--prompt-template", metavar="TEMPLATE",
                        help="wrap each prompt: '{prompt}' is replaced by its text (e.g. an answer-format "
                             "instruction); give the same template to every command")
    parser.add_argument("--id-key", help="column holding a unique id (default: a hash of the final prompt)")
    parser.add_argument("--split", help="split to read from a `datasets` DatasetDict directory")
    if labels:
        parser.add_argument("--answer-key", help="column with the reference answer (math)")
        parser.add_argument("--answer-after", metavar="MARKER",
                            help="keep only the text after the last MARKER in the answer (GSM8K: '####')")
        parser.add_argument("--tests-key", help="column with python assert tests (code)")
        parser.add_argument("--cases-key", help="column with a list of {stdin, stdout} cases (code)")
        parser.add_argument("--instruction-ids-key", help="column with IFEval's instruction_id_list")
        parser.add_argument("--kwargs-key", help="column with IFEval's kwargs list")
    parser.add_argument("--skip-bad-rows", action="store_true",
                        help="skip invalid rows (counted and reported) instead of stopping at the first")


def field_map(args: argparse.Namespace) -> FieldMap:
    if args.prompt_template is not None and "{prompt}" not in args.prompt_template:
        raise DataError(f"--prompt-template must contain '{{prompt}}', got {args.prompt_template!r}")
    return FieldMap(
        prompt=args.prompt_key,
        prompt_template=args.prompt_template,
        id=args.id_key,
        answer=getattr(args, "answer_key", None),
        answer_after=getattr(args, "answer_after", None),
        tests=getattr(args, "tests_key", None),
        cases=getattr(args, "cases_key", None),
        instruction_id_list=getattr(args, "instruction_ids_key", None),
        kwargs=getattr(args, "kwargs_key", None),
    )


def read_prompts(path: str | Path, fields: FieldMap, bad_rows: BadRows, split: str | None = None
                 ) -> list[PromptRow]:
    """Validated prompt rows with their reward labels; a duplicate id or a duplicate prompt is a bad row
    (the expert bank and the discriminator key experts by prompt text as well as by id)."""
    rows: list[PromptRow] = []
    first_id: dict[str, int] = {}
    first_prompt: dict[str, int] = {}
    for row, record in read_records(path, bad_rows, split):
        try:
            prompt = text(record, fields.prompt)
            if fields.prompt_template is not None:
                prompt = fields.prompt_template.replace("{prompt}", prompt)
            rid = row_id(record, fields.id, prompt)
            if fields.id is not None and rid in first_id:
                raise RowError(fields.id, f"duplicate id {rid!r} (first at row {first_id[rid]})")
            if prompt in first_prompt:
                raise RowError(fields.prompt, f"duplicate prompt (first at row {first_prompt[prompt]})")
            label = fields.label(record)
        except RowError as e:
            bad_rows.handle(f"{path}: row {row}: {e}")
            continue
        first_id[rid] = first_prompt[prompt] = row
        rows.append(PromptRow(rid, prompt, label, row))
    if not rows:
        raise DataError(f"{path}: no valid rows")
    return rows


@contextlib.contextmanager
def atomic_writer(path: str | Path) -> Iterator[IO[str]]:
    """Write to a temporary file beside `path`, fsync, then rename over it: never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    # mkstemp makes the file 0600; give it the mode open() would: 0666 less the umask (which can only be
    # read by setting it).
    umask = os.umask(0)
    os.umask(umask)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            os.chmod(tmp, 0o666 & ~umask)
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_jsonl(path: str | Path, records: list[dict]) -> None:
    with atomic_writer(path) as fh:
        for record in records:
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")


def write_splits(directory: Path, splits: dict[str, list[dict]]) -> dict[str, Path]:
    """Each split's rows as DIRECTORY/NAME.jsonl; returns the paths by split name."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, rows in splits.items():
        write_jsonl(directory / f"{name}.jsonl", rows)
    return {name: directory / f"{name}.jsonl" for name in splits}


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_writer(path) as fh:
        json.dump(obj, fh, indent=2, ensure_ascii=False)
        fh.write("\n")
