"""Bad rows stop the data commands with an error naming file, row and field, or, with --skip-bad-rows,
are skipped, counted and reported; outputs are written atomically."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from aapa_rl.cli import main
from aapa_rl.data.experts import read_samples
from aapa_rl.data.prepare import read_bank
from aapa_rl.data.rows import (
    BadRows,
    DataError,
    FieldMap,
    atomic_writer,
    prompt_id,
    read_prompts,
    write_jsonl,
)

FIELDS = FieldMap(prompt="question", id="uid", answer="answer", answer_after="####")
GOOD = {"uid": "a", "question": "What is 1+1?", "answer": "1+1=2 #### 2"}


def _write(path: Path, rows: list) -> Path:
    """Rows as JSON lines; str and bytes rows are written as they are (broken lines)."""
    lines = [
        r if isinstance(r, bytes) else (r if isinstance(r, str) else json.dumps(r)).encode() for r in rows
    ]
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"uid": "b", "answer": "#### 1"}, "row 2: field 'question': missing"),
        (
            {"uid": "b", "question": 7, "answer": "#### 1"},
            "row 2: field 'question': expected a string, got int",
        ),
        ({"uid": "b", "question": " \n", "answer": "#### 1"}, "row 2: field 'question': empty text"),
        (
            {"uid": "a", "question": "Other?", "answer": "#### 1"},
            "row 2: field 'uid': duplicate id 'a' (first at row 1)",
        ),
        # Ids do not make the same prompt text twice acceptable: the expert bank is keyed by prompt too.
        (dict(GOOD, uid="b"), "row 2: field 'question': duplicate prompt (first at row 1)"),
        (
            {"uid": [1], "question": "Q?", "answer": "#### 1"},
            "row 2: field 'uid': expected a string or an integer",
        ),
        ({"uid": "b", "question": "Q?", "answer": "2"}, "row 2: field 'answer': has no '####' marker"),
        ({"uid": "b", "question": "Q?", "answer": "#### "}, "row 2: field 'answer': empty text"),
        (
            {"uid": "b", "question": "Q?", "answer": {"x": 1}},
            "row 2: field 'answer': expected a string or a number",
        ),
        ('{"uid": "b", "question": ', "row 2: not valid JSON"),
        ("[1, 2]", "row 2: expected a JSON object, got list"),
        (b'{"question": "caf\xe9"}', "row 2: not valid UTF-8"),
    ],
)
def test_prompt_row_errors_name_file_row_and_field(tmp_path, bad, message):
    path = _write(tmp_path / "data.jsonl", [GOOD, bad])
    with pytest.raises(DataError) as err:
        read_prompts(path, FIELDS, BadRows(skip=False))
    assert str(err.value).startswith(f"{path}: {message}")
    assert "--skip-bad-rows" in str(err.value)


def test_duplicate_prompt_without_ids(tmp_path):
    path = _write(tmp_path / "data.jsonl", [{"q": "Same?"}, {"q": "Other?"}, {"q": "Same?"}])
    with pytest.raises(DataError, match=r"row 3: field 'q': duplicate prompt \(first at row 1\)"):
        read_prompts(path, FieldMap(prompt="q"), BadRows(skip=False))


@pytest.mark.parametrize(
    "fields, bad, message",
    [
        (
            FieldMap(instruction_id_list="ids"),
            {"ids": "punctuation:no_comma"},
            "field 'ids': expected a non-empty list",
        ),
        (
            FieldMap(instruction_id_list="ids", kwargs="kw"),
            {"ids": ["a", "b"], "kw": [{}]},
            "field 'kw': has 1 entries",
        ),
        (FieldMap(cases="cases"), {"cases": [{"stdin": "1"}]}, "field 'cases': case 0: expected an object"),
        (FieldMap(tests="tests"), {"tests": ""}, "field 'tests': empty text"),
    ],
)
def test_label_field_errors(tmp_path, fields, bad, message):
    path = _write(tmp_path / "data.jsonl", [{"prompt": "P?", **bad}])
    with pytest.raises(DataError, match=f"{path}: row 1: {message}"):
        read_prompts(path, fields, BadRows(skip=False))


def test_a_reward_that_trips_on_a_label_names_file_row_and_field(tmp_path, capsys):
    """A user reward whose label check raises something other than ValueError (label["answer"] on a string
    label, a TypeError) is a label problem like any other: the local and TRL backends (load_rows) and
    build-experts name the file, the row and the field instead of showing a traceback."""
    from aapa_rl.local.trainer import load_rows
    from reward_fns.combine import load_reward

    reward = tmp_path / "reward.py"
    reward.write_text(
        "def batch_reward(responses, labels):\n"
        "    return [float(len(r) == label['answer'] + 0) for r, label in zip(responses, labels)], {}\n"
    )
    name = f"'{reward}:batch_reward'"
    rows = [{"prompt": "P?", "label": {"answer": 1}}, {"prompt": "Q?", "label": "1"}]
    path = _write(tmp_path / "data.jsonl", rows)
    with pytest.raises(DataError) as err:
        load_rows(path, ("prompt",), ("label",), load_reward(str(reward)))
    assert str(err.value) == (f"{path}: row 2: field 'label': reward {name} raised TypeError: string indices "
                              "must be integers, not 'str'")

    # build-experts: its labels are dicts of strings ({"answer": "1"}), which this reward cannot add 0 to.
    prompts = _write(tmp_path / "prompts.jsonl", [{"prompt": "P?", "answer": "1"}])
    samples = _write(tmp_path / "samples.jsonl", [{"id": prompt_id("P?"), "prompt": "P?", "response": "r"}])
    args = ["build-experts", "--prompts", str(prompts), "--samples", str(samples), "--reward", str(reward),
            "--answer-key", "answer", "--output", str(tmp_path / "bank.jsonl")]
    assert main(args) == 2
    assert (f"error: {prompts}: row 1: label: reward {name} raised TypeError: can only concatenate str "
            '(not "int") to str') in capsys.readouterr().err


def test_bank_and_sample_errors(tmp_path):
    bank = _write(tmp_path / "bank.jsonl", [{"prompt": "P?", "expert": "E"}, {"prompt": "Q?"}])
    with pytest.raises(DataError, match=f"{bank}: row 2: field 'expert': missing"):
        read_bank(bank, BadRows(skip=False))
    bank = _write(
        tmp_path / "bank.jsonl",
        [{"id": 1, "prompt": "P?", "expert": "E"}, {"id": 1, "prompt": "Q?", "expert": "F"}],
    )
    with pytest.raises(DataError, match=f"{bank}: row 2: field 'id': duplicate id '1'"):
        read_bank(bank, BadRows(skip=False))

    prompts = {
        p.id: p for p in read_prompts(_write(tmp_path / "p.jsonl", [GOOD]), FIELDS, BadRows(skip=False))
    }
    cases = [
        ({"id": "zz", "prompt": "P?", "response": "r"}, "row 1: field 'id': 'zz' is not in the prompt data"),
        (
            {"id": "a", "prompt": "Changed?", "response": "r"},
            "row 1: field 'prompt': differs from the prompt data",
        ),
        ({"id": "a", "prompt": GOOD["question"], "response": None}, "row 1: field 'response': missing"),
        (
            {"id": "a", "prompt": GOOD["question"], "response": 3},
            "row 1: field 'response': expected a string, got int",
        ),
    ]
    for row, message in cases:
        samples = _write(tmp_path / "s.jsonl", [row])
        with pytest.raises(DataError, match=f"{samples}: {message}"):
            read_samples([samples], prompts, BadRows(skip=False))


def test_skipped_rows_are_counted_and_reported(tmp_path, capsys):
    rows = [
        GOOD,
        {"uid": "b", "answer": "#### 1"},
        dict(GOOD, uid="c", question="Q3?"),
        "not json",
        dict(GOOD, uid="a"),
    ]
    src = _write(tmp_path / "data.jsonl", rows)
    out = tmp_path / "out"
    args = [
        "prepare-data",
        "--prompts",
        str(src),
        "--out-dir",
        str(out),
        "--prompt-key",
        "question",
        "--id-key",
        "uid",
    ]
    args += ["--answer-key", "answer", "--answer-after", "####", "--eval-size", "0"]
    assert main(args) == 2
    assert f"error: {src}: row 2: field 'question': missing" in capsys.readouterr().err
    assert not out.exists()

    assert main([*args, "--skip-bad-rows"]) == 0
    printed = capsys.readouterr().out
    assert "bad rows skipped: 3" in printed
    for message in [
        "row 2: field 'question': missing",
        "row 4: not valid JSON",
        "row 5: field 'uid': duplicate id 'a'",
    ]:
        assert f"{src}: {message}" in printed
    assert [json.loads(line)["id"] for line in (out / "train.jsonl").read_text().splitlines()] == ["a", "c"]
    report = json.loads((out / "report.json").read_text())
    assert report["bad_rows_skipped"] == 3 and len(report["bad_rows"]) == 3


@pytest.mark.parametrize("field, id_args", [("question", []), ("uid", ["--id-key", "uid"])])
def test_lone_surrogate_is_a_bad_row(tmp_path, capsys, field, id_args):
    # json.loads accepts the escape of a lone surrogate, which hashing the prompt or writing the id cannot
    # encode.
    bad = dict(GOOD, uid="b", question="Q: 1+1=?")
    bad[field] = "\ud800 " + bad[field]
    src = _write(tmp_path / "data.jsonl", [GOOD, bad])  # json.dumps writes it as the escape \ud800
    out = tmp_path / "out"
    args = ["prepare-data", "--prompts", str(src), "--out-dir", str(out), "--prompt-key", "question"]
    args += ["--answer-key", "answer", "--answer-after", "####", "--eval-size", "0", *id_args]
    assert main(args) == 2
    assert f"error: {src}: row 2: field '{field}': holds a lone surrogate escape" in capsys.readouterr().err
    assert main([*args, "--skip-bad-rows"]) == 0
    assert "bad rows skipped: 1" in capsys.readouterr().out
    assert [json.loads(line)["prompt"] for line in (out / "train.jsonl").read_text().splitlines()] == [
        GOOD["question"]
    ]


def test_generate_names_bad_prompt_rows(tmp_path, capsys):
    src = _write(tmp_path / "p.jsonl", [{"prompt": "ok"}, {"prompt": ""}])
    code = main(
        ["generate", "--model", str(tmp_path), "--prompts", str(src), "--output", str(tmp_path / "o.jsonl")]
    )
    assert code == 2 and f"{src}: row 2: field 'prompt': empty text" in capsys.readouterr().err


def test_unsupported_input_and_missing_split(tmp_path):
    (tmp_path / "data.csv").write_text("prompt\nx\n")
    with pytest.raises(DataError, match="unsupported format"):
        read_prompts(tmp_path / "data.csv", FieldMap(), BadRows(skip=False))
    import datasets

    rows = [{"prompt": "a"}]
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(rows), "test": datasets.Dataset.from_list(rows)}
    ).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match=r"choose a split with --split \(this dataset has: train, test\)"):
        read_prompts(tmp_path / "dd", FieldMap(), BadRows(skip=False))
    assert read_prompts(tmp_path / "dd", FieldMap(), BadRows(skip=False), split="test")[0].id == prompt_id(
        "a"
    )


def test_split_needs_a_source_with_splits(tmp_path):
    import datasets

    rows = [{"prompt": "a"}]
    jsonl = _write(tmp_path / "data.jsonl", rows)
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "data.parquet"))
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    for source, problem in [
        (jsonl, "a file has no splits"),
        (tmp_path / "data.parquet", "a file has no splits"),
        (tmp_path / "ds", "a single dataset without splits"),
    ]:
        with pytest.raises(DataError, match=f"{source}: --split test: {problem}; drop --split"):
            read_prompts(source, FieldMap(), BadRows(skip=False), split="test")


def test_atomic_write_leaves_old_file_on_crash(tmp_path):
    path = tmp_path / "bank.jsonl"
    path.write_text("old\n")
    with pytest.raises(RuntimeError), atomic_writer(path) as fh:
        fh.write("half of the new")
        raise RuntimeError("crash mid-write")
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["bank.jsonl"]  # no temporary file left behind
    with atomic_writer(path) as fh:
        fh.write("new\n")
    assert path.read_text() == "new\n"


def test_atomic_write_gives_the_mode_open_would(tmp_path):
    path = tmp_path / "bank.jsonl"
    old = os.umask(0o027)
    try:
        write_jsonl(path, [{"a": 1}])
        assert path.stat().st_mode & 0o777 == 0o640
        os.umask(0o002)
        write_jsonl(path, [{"a": 2}])  # a rewrite, as generate's resume does
        assert path.stat().st_mode & 0o777 == 0o664
    finally:
        os.umask(old)


def test_prompt_template_wraps_prompts_and_is_checked(tmp_path, capsys):
    path = _write(tmp_path / "data.jsonl", [{"prompt": "1+1?"}])
    fields = FieldMap(prompt_template="{prompt}\nPut the final answer in \\boxed{}.")
    [row] = read_prompts(path, fields, BadRows(skip=False))
    assert row.prompt == "1+1?\nPut the final answer in \\boxed{}." and row.id == prompt_id(row.prompt)
    out = tmp_path / "out"
    assert (
        main(["prepare-data", "--prompts", str(path), "--out-dir", str(out), "--prompt-template", "Q: {}"])
        == 2
    )
    assert "--prompt-template must contain '{prompt}'" in capsys.readouterr().err


@pytest.mark.parametrize("answer", ["NaN", "Infinity", "-Infinity", "1e400"])
def test_non_finite_answer_is_a_bad_row(tmp_path, answer):
    path = tmp_path / "data.jsonl"
    path.write_text(f'{{"prompt": "P?", "answer": {answer}}}\n')
    with pytest.raises(DataError, match=f"{path}: row 1: field 'answer': not a finite number"):
        read_prompts(path, FieldMap(answer="answer"), BadRows(skip=False))


def test_corrupt_parquet_names_the_file(tmp_path, capsys):
    path = tmp_path / "data.parquet"
    path.write_bytes(b"not parquet")
    with pytest.raises(DataError, match=f"{path}: not a readable parquet file"):
        read_prompts(path, FieldMap(), BadRows(skip=False))
    assert main(["prepare-data", "--prompts", str(path), "--out-dir", str(tmp_path / "out")]) == 2
    assert f"error: {path}: not a readable parquet file" in capsys.readouterr().err
