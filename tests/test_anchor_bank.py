"""Expert bank: formats, lookup, and validation errors that name the file, row and field."""

from __future__ import annotations

import json

import pytest
from anchor_data import make_records, write_jsonl

from aapa_rl.anchor import DataError, ExpertBank, label_expert
from aapa_rl.anchor.training import read_rollouts


def test_jsonl_parquet_and_datasets_dir_load_the_same_bank(tmp_path):
    import datasets

    records = make_records(5)
    rows = [{k: v for k, v in r.items() if k != "fill"} | {"label": str(r["fill"]["s"])} for r in records]
    jsonl = write_jsonl(tmp_path / "experts.jsonl", rows)
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "experts.parquet"))
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "experts_ds"))
    for path in (jsonl, tmp_path / "experts.parquet", tmp_path / "experts_ds"):
        bank = ExpertBank.load(path)
        assert len(bank) == 5 and not bank.skipped
        assert bank.expert_for(prompt=records[3]["prompt"]) == records[3]["expert"]
        assert bank.expert_for(id="p2") == records[2]["expert"]
        assert bank.expert_for(prompt="unknown prompt") is None
        assert bank.records[1].label == str(records[1]["fill"]["s"])
        assert [r.row for r in bank.records] == [1, 2, 3, 4, 5]  # every format numbers rows from 1


def test_bad_parquet_row_and_unknown_format_are_named(tmp_path):
    import datasets

    rows = [{"prompt": "a", "expert": "x."}, {"prompt": "b", "expert": ""}]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "bank.parquet"))
    with pytest.raises(DataError, match=r"bank.parquet: row 2: field 'expert': empty text"):
        ExpertBank.load(tmp_path / "bank.parquet")
    (tmp_path / "bank.csv").write_text("prompt,expert\n")
    with pytest.raises(DataError, match=r"bank.csv: unsupported format"):
        ExpertBank.load(tmp_path / "bank.csv")


@pytest.mark.parametrize(
    "row, message",
    [
        ({"prompt": "q"}, "row 2: field 'expert': missing"),
        ({"prompt": "q", "expert": "  "}, "row 2: field 'expert': empty text"),
        ({"prompt": "q", "expert": 3}, "row 2: field 'expert': expected a string, got int"),
        ({"prompt": ["q"], "expert": "a"}, "row 2: field 'prompt': expected a string, got list"),
        ({"prompt": "first", "expert": "another answer"}, "row 2: field 'expert': the prompt already has a "
                                                          "different expert (row 1)"),
        ({"prompt": "q", "expert": "a", "id": "one"}, "row 2: field 'id': 'one' already names another"),
        ({"prompt": "q", "expert": "a", "id": True}, "row 2: field 'id': expected a string or an integer"),
        ({"prompt": "q", "expert": "a", "id": " "}, "row 2: field 'id': empty text"),
    ],
)
def test_bad_rows_name_file_row_and_field(tmp_path, row, message):
    path = write_jsonl(tmp_path / "bank.jsonl", [{"prompt": "first", "expert": "answer.", "id": "one"}, row])
    with pytest.raises(DataError) as error:
        ExpertBank.load(path)
    assert str(path) in str(error.value) and message in str(error.value)


def test_non_utf8_and_bad_json_rows_are_named_and_skips_are_counted(tmp_path, capsys):
    path = tmp_path / "bank.jsonl"
    path.write_bytes(b'{"prompt": "a", "expert": "x."}\n{"prompt": "b\xff\xfe", "expert": "y."}\n'
                     b"not json\n\n" + json.dumps({"prompt": "c", "expert": "z."}).encode() + b"\n"
                     + json.dumps({"prompt": "c", "expert": "z."}).encode() + b"\n")
    with pytest.raises(DataError, match=r"bank.jsonl: row 2: not valid UTF-8"):
        ExpertBank.load(path)
    bank = ExpertBank.load(path, allow_skips=True)
    assert len(bank) == 2 and len(bank.skipped) == 3
    assert "row 2: not valid UTF-8" in bank.skipped[0]
    assert "row 3: not valid JSON" in bank.skipped[1]
    assert "row 6: duplicate of row 5" in bank.skipped[2]
    assert "2 rows kept, 3 skipped" in capsys.readouterr().err


def test_rollouts_need_an_expert_for_their_prompt(tmp_path):
    bank = ExpertBank.load(write_jsonl(tmp_path / "bank.jsonl", [{"prompt": "a", "expert": "x."}]))
    path = write_jsonl(tmp_path / "rollouts.jsonl", [{"prompt": "a", "response": ""},
                                                     {"prompt": "b", "response": "y."},
                                                     {"prompt": "a"}])
    with pytest.raises(DataError, match=r"rollouts.jsonl: row 2: field 'prompt': no expert for it in"):
        read_rollouts(path, bank)
    rows, skipped = read_rollouts(path, bank, allow_skips=True)
    assert rows == [("a", "")]  # an empty response is a legitimate (bad) rollout
    # A malformed row is told apart from the expected skips of prompts without an expert.
    assert [len(skipped["no expert"]), len(skipped["malformed"])] == [1, 1]
    assert "row 2: field 'prompt': no expert for it" in skipped["no expert"][0]
    assert "row 3: field 'response': missing" in skipped["malformed"][0]


def test_an_empty_rollouts_file_is_a_named_error(tmp_path):
    bank = ExpertBank.load(write_jsonl(tmp_path / "bank.jsonl", [{"prompt": "a", "expert": "x."}]))
    (tmp_path / "rollouts.jsonl").write_text("\n")
    for allow_skips in (False, True):
        with pytest.raises(DataError, match=r"rollouts.jsonl: no rows"):
            read_rollouts(tmp_path / "rollouts.jsonl", bank, allow_skips=allow_skips)


def test_a_duplicate_row_with_a_new_id_still_finds_the_kept_row(tmp_path, capsys):
    path = write_jsonl(tmp_path / "bank.jsonl", [{"prompt": "P", "expert": "E.", "id": "a"},
                                                 {"prompt": "P", "expert": "E.", "id": "b"},
                                                 {"prompt": "P", "expert": "E.", "id": "a"}])
    bank = ExpertBank.load(path)
    assert len(bank) == 1 and bank.expert_for(id="a") == bank.expert_for(id="b") == "E."
    assert "row 2: duplicate of row 1 (same prompt and expert); its id 'b' names row 1" in bank.skipped[0]
    assert bank.skipped[1].endswith("row 3: duplicate of row 1 (same prompt and expert)")
    assert label_expert({"id": "b"}, "a chat-templated prompt", bank) == ("a chat-templated prompt", "E.")


def test_label_expert_falls_back_from_id_to_label_prompt_to_row_prompt(tmp_path):
    bank = ExpertBank.load(write_jsonl(tmp_path / "bank.jsonl", [{"prompt": "P", "expert": "E.", "id": "a"},
                                                                 {"prompt": "Q", "expert": "F.", "id": "b"}]))
    assert label_expert({"expert": "Own.", "id": "a"}, "P", bank) == ("P", "Own.")
    assert label_expert({"id": "b", "prompt": "P"}, "P", bank) == ("P", "F.")  # the id comes first
    assert label_expert({"id": "zzz", "prompt": "P"}, "templated", bank) == ("P", "E.")
    assert label_expert({"id": "zzz"}, "Q", bank) == ("Q", "F.")
    assert label_expert({"id": "zzz", "prompt": "unknown"}, "Q", bank) == ("unknown", "F.")
    assert label_expert({"id": "zzz"}, "unknown", bank) == ("unknown", None)
    assert label_expert("4", "P", bank) == ("P", "E.") and label_expert({}, "P", None) == ("P", None)


@pytest.mark.parametrize("expert", ["", "   \n", 7, ["E."]])
def test_a_blank_or_non_string_label_expert_counts_as_none(tmp_path, expert):
    bank = ExpertBank.load(write_jsonl(tmp_path / "bank.jsonl", [{"prompt": "P", "expert": "E.", "id": "a"}]))
    assert label_expert({"expert": expert, "id": "a"}, "templated", bank) == ("templated", "E.")
    assert label_expert({"expert": expert}, "unknown", bank) == ("unknown", None)
    assert label_expert({"expert": expert}, "P", None) == ("P", None)
