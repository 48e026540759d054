"""build-experts (rejection sampling, coverage) and prepare-data (OpenRLHF round trip, held-out split,
parquet / `datasets` inputs) on a GSM8K-style set, through the `aapa-rl` command line."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from aapa_rl.cli import main
from aapa_rl.data.rows import prompt_id

GSM = [
    ("Ann has 3 apples and buys 4 more. How many?", "3 + 4 = <<3+4=7>>7\n#### 7"),
    ("A box holds 6 eggs. How many eggs in 5 boxes?", "6 * 5 = <<6*5=30>>30\n#### 30"),
    ("Tom had 20 dollars and spent 8. How many left?", "20 - 8 = <<20-8=12>>12\n#### 12"),
    ("Half of 50 is?", "50 / 2 = <<50/2=25>>25\n#### 25"),
    ("What is 9 squared?", "9 * 9 = <<9*9=81>>81\n#### 81"),
    ("Sam reads 10 pages a day for 3 days. Pages?", "10 * 3 = <<10*3=30>>30\n#### 30"),
]
# Teacher samples per question: (response, verified?). Question 4 has no correct sample.
SAMPLES = {
    0: [("3 + 4 = 8. \\boxed{8}", False), ("3 + 4 = 7, so the answer is \\boxed{7}.", True)],
    1: [("6 times 5 is 30. \\boxed{30}", True), ("\\boxed{30}", True)],
    2: [("20 - 8 = 12. \\boxed{12}", True)],
    3: [("50 / 2 = 25. \\boxed{25}", True), ("", False)],
    4: [("9 * 9 = 18. \\boxed{18}", False), ("\\boxed{91}", False)],
    5: [("10 * 3 = 30. \\boxed{30}", True)],
}
MAP = ["--prompt-key", "question", "--answer-key", "answer", "--answer-after", "####"]


@pytest.fixture
def gsm(tmp_path) -> SimpleNamespace:
    prompts = tmp_path / "gsm.jsonl"
    prompts.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in GSM))
    samples = tmp_path / "teacher.jsonl"
    samples.write_text(
        "".join(
            json.dumps(
                {
                    "id": prompt_id(GSM[i][0]),
                    "prompt": GSM[i][0],
                    "response": response,
                    "model": "teacher",
                    "params": {"n": 2},
                }
            )
            + "\n"
            for i, rows in SAMPLES.items()
            for response, _ in rows
        )
    )
    return SimpleNamespace(dir=tmp_path, prompts=prompts, samples=samples, bank=tmp_path / "experts.jsonl")


def _build(gsm, *extra: str) -> int:
    return main(
        [
            "build-experts",
            "--samples",
            str(gsm.samples),
            "--prompts",
            str(gsm.prompts),
            "--output",
            str(gsm.bank),
            *MAP,
            *extra,
        ]
    )


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_build_experts_keeps_only_verified_responses_and_reports_coverage(gsm, capsys):
    assert _build(gsm, "--reward", "math") == 0
    bank = _jsonl(gsm.bank)
    first_verified = {
        i: next(r for r, ok in rows if ok) for i, rows in SAMPLES.items() if any(ok for _, ok in rows)
    }
    assert [(b["prompt"], b["expert"]) for b in bank] == [(GSM[i][0], r) for i, r in first_verified.items()]
    assert all(set(b) == {"id", "prompt", "expert", "label"} for b in bank)
    assert bank[0]["label"] == {"answer": "7"} and bank[0]["id"] == prompt_id(GSM[0][0])

    report = json.loads((gsm.dir / "experts.report.json").read_text())
    n_samples = sum(len(rows) for rows in SAMPLES.values())
    n_ok = sum(ok for rows in SAMPLES.values() for _, ok in rows)
    assert report["prompts"] == 6 and report["samples"] == n_samples and report["verified_prompts"] == 5
    assert report["coverage"] == pytest.approx(5 / 6)
    assert report["reward_values"] == {"0.0": n_samples - n_ok, "1.0": n_ok}
    assert report["prompts_by_passing_samples"] == {"0": 1, "1": 4, "2": 1}
    assert report["empty_responses"] == 1
    out = capsys.readouterr().out
    assert "coverage: 83.3% of all prompts" in out and "reward: mean" in out

    from aapa_rl.anchor import ExpertBank

    loaded = ExpertBank.load(gsm.bank)
    assert len(loaded) == 5 and loaded.expert_for(prompt=GSM[2][0]) == first_verified[2]


def test_build_experts_picks_the_best_passing_sample(gsm, tmp_path):
    """A graded reward: the highest reward at or above --min-reward wins, the first sample on ties, and an
    empty response never, even when the reward passes it."""
    graded = {
        SAMPLES[0][0][0]: 0.6,
        SAMPLES[0][1][0]: 0.9,
        SAMPLES[1][0][0]: 0.8,
        SAMPLES[1][1][0]: 0.8,
        "": 1.0,
        SAMPLES[4][0][0]: 0.3,
        SAMPLES[4][1][0]: 0.4,
    }
    reward = tmp_path / "graded_reward.py"
    reward.write_text(
        f"import torch\nGRADED = {graded!r}\n"
        "def batch_reward(responses, labels):\n"
        "    assert all(isinstance(label, dict) and 'answer' in label for label in labels)\n"
        "    return torch.tensor([GRADED.get(r, 0.7) for r in responses]), {}\n"
    )
    assert _build(gsm, "--reward", str(reward), "--min-reward", "0.5") == 0
    experts = {b["prompt"]: b["expert"] for b in _jsonl(gsm.bank)}
    assert experts == {
        GSM[0][0]: SAMPLES[0][1][0],  # 0.9 beats 0.6
        GSM[1][0]: SAMPLES[1][0][0],  # a tie: the first
        GSM[2][0]: SAMPLES[2][0][0],
        GSM[3][0]: SAMPLES[3][0][0],  # not the empty response
        GSM[5][0]: SAMPLES[5][0][0],
    }  # question 4: both below --min-reward
    report = json.loads((gsm.dir / "experts.report.json").read_text())
    assert report["reward"]["max"] == 1.0 and report["reward"]["min"] == pytest.approx(0.3)


def test_build_experts_refuses_to_overwrite_its_input(gsm, capsys):
    """--output, or the report written beside it, naming a --samples or --prompts file stops the command
    before anything is written (the samples are the pipeline's most expensive file)."""
    samples, prompts = gsm.samples.read_bytes(), gsm.prompts.read_bytes()
    report_named = gsm.dir / "bank.report.json"  # JSON Lines too: a samples file build-experts can read
    report_named.write_bytes(samples)
    for output, written, flag, source in ((gsm.samples, "teacher.jsonl", "--samples", gsm.samples),
                                          (gsm.prompts, "gsm.jsonl", "--prompts", gsm.prompts),
                                          (gsm.dir / "bank.jsonl", "bank.report.json", "--samples",
                                           report_named)):
        assert main(["build-experts", "--samples", str(gsm.samples), str(report_named), "--prompts",
                     str(gsm.prompts), "--output", str(output), "--reward", "math", *MAP]) == 2
        assert (f"error: --output {output}: writes {written}, which is the input {flag} {source}; "
                "choose another --output") in capsys.readouterr().err
    assert gsm.samples.read_bytes() == samples and gsm.prompts.read_bytes() == prompts
    assert report_named.read_bytes() == samples and not (gsm.dir / "bank.jsonl").exists()


def test_build_experts_names_an_empty_samples_file(gsm, capsys):
    assert _build(gsm, "--reward", "math") == 0
    bank = gsm.bank.read_bytes()
    gsm.samples.write_text("\n")
    assert _build(gsm, "--reward", "math") == 2
    assert f"error: {gsm.samples}: no sample rows" in capsys.readouterr().err
    assert gsm.bank.read_bytes() == bank  # not replaced by an empty bank


def test_unknown_reward_is_named(gsm, capsys):
    assert _build(gsm, "--reward", "nosuchreward") == 2
    assert "unknown reward function 'nosuchreward'" in capsys.readouterr().err


def test_build_experts_without_a_label_column_names_the_flag(gsm, capsys):
    args = ["build-experts", "--samples", str(gsm.samples), "--prompts", str(gsm.prompts), "--output",
            str(gsm.bank), "--prompt-key", "question", "--reward", "math"]  # no --answer-key
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "missing field 'answer'" in err and "pass --answer-key (math)" in err
    assert not gsm.bank.exists()


def test_build_experts_names_or_skips_a_label_the_reward_rejects(tmp_path, capsys):
    tests = ["assert f(1) == 2", "assert f(1) ==", "assert f(2) == 3"]  # row 2 is not valid Python
    prompts, samples = tmp_path / "code.jsonl", tmp_path / "samples.jsonl"
    prompts.write_text("".join(json.dumps({"question": f"Write f {i}", "test": t}) + "\n"
                               for i, t in enumerate(tests)))
    samples.write_text("".join(json.dumps({"id": prompt_id(f"Write f {i}"), "prompt": f"Write f {i}",
                                           "response": "```python\ndef f(x):\n    return x + 1\n```"}) + "\n"
                               for i in range(3)))
    args = ["build-experts", "--samples", str(samples), "--prompts", str(prompts), "--prompt-key", "question",
            "--tests-key", "test", "--reward", "code", "--output", str(tmp_path / "bank.jsonl")]
    assert main(args) == 2
    assert "row 2: label: field 'tests' is not valid Python" in capsys.readouterr().err

    # With skipping, as for --skip-bad-rows: that prompt and its samples are left out and counted.
    from aapa_rl.data.experts import build_experts, load_reward, read_samples
    from aapa_rl.data.rows import BadRows, FieldMap, read_prompts

    bad_rows = BadRows(skip=True)
    rows = read_prompts(prompts, FieldMap(prompt="question", tests="test"), bad_rows)
    responses = read_samples([samples], {p.id: p for p in rows}, bad_rows)
    reward_fn = load_reward("code")
    bank, report = build_experts(rows, responses, reward_fn, bad_rows=bad_rows, prompts_path=prompts)
    assert [m.split(": invalid")[0] for m in bad_rows.messages] == [
        f"{prompts}: row 2: label: field 'tests' is not valid Python"
    ]
    assert [b["prompt"] for b in bank] == ["Write f 0", "Write f 2"]
    assert report["prompts"] == 2 and report["samples"] == 2 and report["coverage"] == 1.0


def test_build_experts_names_a_reward_that_breaks_its_contract(gsm, tmp_path, capsys):
    """A reward file whose output is not one reward per response: a one-line error naming the reward, not
    every row's label and not a traceback."""
    reward = tmp_path / "short_reward.py"
    reward.write_text("def batch_reward(responses, labels):\n    return [1.0] * (len(responses) - 1), {}\n")
    args = ["build-experts", "--samples", str(gsm.samples), "--prompts", str(gsm.prompts), "--output",
            str(gsm.bank), "--prompt-key", "question", "--answer-key", "answer", "--reward", str(reward)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"reward '{reward}:batch_reward'" in err and "label" not in err and "Traceback" not in err
    assert not gsm.bank.exists()


def _strategy(apply_chat_template: bool = False) -> SimpleNamespace:
    data = SimpleNamespace(input_key="prompt", label_key="label", apply_chat_template=apply_chat_template)
    return SimpleNamespace(
        args=SimpleNamespace(data=data, use_ms=False), is_rank_0=lambda: True, print=lambda *a, **k: None
    )


def test_prepare_data_round_trip_through_openrlhf_prompt_dataset(gsm, capsys):
    from openrlhf.datasets import PromptDataset
    from openrlhf.datasets.utils import blending_datasets

    gsm.bank.write_text(
        "".join(
            json.dumps({"id": prompt_id(GSM[i][0]), "prompt": GSM[i][0], "expert": f"expert {i}"}) + "\n"
            for i in (0, 1, 2, 3, 5)
        )
    )
    out = gsm.dir / "prepared"
    args = [
        "prepare-data",
        "--prompts",
        str(gsm.prompts),
        "--experts",
        str(gsm.bank),
        "--out-dir",
        str(out),
        *MAP,
        "--eval-size",
        "1",
        "--seed",
        "1",
    ]
    assert main(args) == 2  # question 4 has no expert and the default is to stop
    assert f"{gsm.prompts}: row 5: field 'expert': no expert for id" in capsys.readouterr().err
    assert not out.exists()

    assert main([*args, "--missing-expert", "drop"]) == 0
    report = json.loads((out / "report.json").read_text())
    train, held_out = _jsonl(out / "train.jsonl"), _jsonl(out / "eval.jsonl")
    assert [r["prompt"] for r in held_out] == [GSM[1][0]]  # seed 1 holds out the second question
    assert [r["prompt"] for r in train] == [GSM[i][0] for i in (0, 2, 3, 5)]  # question 4 dropped: no expert
    assert report["train_without_expert_dropped"] == 1 and report["eval_with_expert"] == 1
    assert "--data.prompt_dataset" in capsys.readouterr().out

    strategy = _strategy()
    dataset = PromptDataset(blending_datasets(str(out / "train.jsonl"), None, strategy), None, strategy)
    assert len(dataset) == len(train)
    answers = {q: a.rsplit("####", 1)[1].strip() for q, a in GSM}
    for i in range(len(dataset)):
        _, prompt, label, _ = dataset[i]
        expert = f"expert {[q for q, _ in GSM].index(prompt)}"
        assert label == {"answer": answers[prompt], "prompt": prompt, "expert": expert}
    eval_set = PromptDataset(blending_datasets(str(out / "eval.jsonl"), None, strategy), None, strategy)
    assert eval_set[0][1] == held_out[0]["prompt"]
    assert eval_set[0][2] == {"answer": "30", "prompt": held_out[0]["prompt"], "expert": "expert 1"}
    assert held_out[0]["expert"] == "expert 1"

    # The expert bank and SFT data of the training split, for the discriminator and the local trainer.
    bank = _jsonl(out / "experts.jsonl")
    assert [b["prompt"] for b in bank] == [r["prompt"] for r in train]
    assert bank[0]["label"] == {"answer": answers[bank[0]["prompt"]]}
    assert _jsonl(out / "sft.jsonl") == [
        {"id": b["id"], "prompt": b["prompt"], "expert": b["expert"]} for b in bank
    ]


def test_prepare_data_reads_parquet_and_datasets_dirs_alike(gsm, tmp_path):
    import datasets

    rows = [{"question": q, "answer": a, "uid": i} for i, (q, a) in enumerate(GSM)]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "gsm.parquet"))
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(rows), "test": datasets.Dataset.from_list(rows[:2])}
    ).save_to_disk(str(tmp_path / "gsm_dir"))
    outputs = []
    for source, extra in [("gsm.parquet", []), ("gsm_dir", ["--split", "train"])]:
        out = tmp_path / f"out_{source}"
        assert (
            main(
                [
                    "prepare-data",
                    "--prompts",
                    str(tmp_path / source),
                    "--out-dir",
                    str(out),
                    *MAP,
                    "--id-key",
                    "uid",
                    "--eval-size",
                    "0.34",
                    *extra,
                ]
            )
            == 0
        )
        outputs.append((_jsonl(out / "train.jsonl"), _jsonl(out / "eval.jsonl")))
    assert outputs[0] == outputs[1]
    train, held_out = outputs[0]
    assert len(held_out) == 2 and len(train) == 4  # round(0.34 * 6)
    assert sorted(r["id"] for r in train + held_out) == [str(i) for i in range(6)]
    assert all(set(r["label"]) == {"answer", "prompt"} for r in train)  # no bank given: no expert field
    assert not (tmp_path / "out_gsm.parquet" / "experts.jsonl").exists()


def test_prepare_data_keeps_ifeval_and_code_label_fields(tmp_path):
    rows = [
        {
            "key": 1,
            "prompt": "Write two words.",
            "instruction_id_list": ["length_constraints:number_words"],
            "kwargs": [{"relation": "less than", "num_words": 3}],
            "tests": "assert True",
            "cases": [{"stdin": "1\n", "stdout": "1\n"}],
        },
        {
            "key": 2,
            "prompt": "Shout.",
            "instruction_id_list": ["change_case:english_capital"],
            "kwargs": [{}],
            "tests": "assert 1",
            "cases": [{"stdin": "", "stdout": "A"}],
        },
    ]
    src = tmp_path / "mixed.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    bank = tmp_path / "bank.jsonl"
    bank.write_text(
        "".join(json.dumps({"id": r["key"], "prompt": r["prompt"], "expert": "OK"}) + "\n" for r in rows)
    )
    assert (
        main(
            [
                "prepare-data",
                "--prompts",
                str(src),
                "--experts",
                str(bank),
                "--out-dir",
                str(tmp_path / "o"),
                "--id-key",
                "key",
                "--instruction-ids-key",
                "instruction_id_list",
                "--kwargs-key",
                "kwargs",
                "--tests-key",
                "tests",
                "--cases-key",
                "cases",
                "--eval-size",
                "0",
            ]
        )
        == 0
    )
    train = _jsonl(tmp_path / "o" / "train.jsonl")
    assert train[0]["label"] == {
        "prompt": rows[0]["prompt"],
        "instruction_id_list": rows[0]["instruction_id_list"],
        "kwargs": rows[0]["kwargs"],
        "tests": "assert True",
        "cases": rows[0]["cases"],
        "expert": "OK",
    }
    assert [r["id"] for r in train] == ["1", "2"]


def _prepare(gsm, out: Path, *extra: str) -> int:
    return main(["prepare-data", "--prompts", str(gsm.prompts), "--out-dir", str(out), *MAP, *extra])


def test_prepare_data_refuses_to_overwrite_its_input(gsm, capsys):
    assert _build(gsm, "--reward", "math") == 0
    bank = gsm.bank.read_bytes()
    link = gsm.dir / "link"  # the same directory under another name
    link.symlink_to(gsm.dir)
    assert _prepare(gsm, link, "--experts", str(gsm.bank), "--missing-expert", "drop") == 2
    err = capsys.readouterr().err
    assert f"error: --out-dir {link}: writes experts.jsonl, which is the input --experts {gsm.bank}" in err
    assert gsm.bank.read_bytes() == bank
    prompts = gsm.dir / "train.jsonl"
    prompts.write_bytes(gsm.prompts.read_bytes())
    gsm.prompts = prompts
    assert _prepare(gsm, gsm.dir) == 2
    assert f"writes train.jsonl, which is the input --prompts {prompts}" in capsys.readouterr().err


def test_prepare_data_writes_no_empty_eval_split(gsm, capsys):
    # OpenRLHF's load_dataset fails on an empty eval file, so none is written or suggested.
    out = gsm.dir / "prepared"
    assert _prepare(gsm, out) == 0  # the default 5% of 6 prompts rounds to 0
    printed = capsys.readouterr().out
    assert "no held-out rows (--eval-size 0.05 of 6 prompts): eval.jsonl not written" in printed
    assert f"OpenRLHF: --data.prompt_dataset {out / 'train.jsonl'} --data.input_key" in printed
    assert not (out / "eval.jsonl").exists()
    assert json.loads((out / "report.json").read_text())["eval"] == 0
    assert len(_jsonl(out / "train.jsonl")) == 6


def test_prepare_data_refuses_to_leave_stale_outputs(gsm, capsys):
    assert _build(gsm, "--reward", "math") == 0
    out = gsm.dir / "prepared"
    assert _prepare(gsm, out, "--experts", str(gsm.bank), "--missing-expert", "drop", "--eval-size", "1") == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    # Without --experts, experts.jsonl and sft.jsonl of the first run would be read with the new train.jsonl.
    assert _prepare(gsm, out, "--eval-size", "1") == 2
    err = capsys.readouterr().err
    assert f"error: {out}: experts.jsonl, sft.jsonl from an earlier run would be left" in err
    assert _prepare(gsm, out, "--experts", str(gsm.bank), "--missing-expert", "drop", "--eval-size", "0") == 2
    assert f"error: {out}: eval.jsonl from an earlier run" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing written, nothing removed


def test_prompt_template_mismatch_is_named_with_counts(gsm, capsys):
    assert _build(gsm, "--reward", "math") == 0
    capsys.readouterr()
    template = ["--prompt-template", "{prompt} Think."]
    bank = gsm.bank.read_bytes()
    for skip in ([], ["--skip-bad-rows"]):  # skipping every sample would write an empty bank
        assert _build(gsm, "--reward", "math", *template, *skip) == 2
        err = capsys.readouterr().err
        assert "error: none of the 10 sample rows matches one of the 6 prompts by id and prompt" in err
        assert "--prompt-template" in err and "--skip-bad-rows" not in err
    assert gsm.bank.read_bytes() == bank

    out = gsm.dir / "prepared"
    assert _prepare(gsm, out, "--experts", str(gsm.bank), "--missing-expert", "drop", *template) == 2
    err = capsys.readouterr().err
    assert f"error: {gsm.bank}: none of its 5 rows matches one of the 6 prompts" in err
    assert "--prompt-template" in err

    # Only the held-out prompt has an expert (seed 1 holds out question 1).
    gsm.bank.write_text(json.dumps({"prompt": GSM[1][0], "expert": "E"}) + "\n")
    args = ["--experts", str(gsm.bank), "--missing-expert", "drop", "--eval-size", "1", "--seed", "1"]
    assert _prepare(gsm, out, *args) == 2
    err = capsys.readouterr().err
    assert f"no training rows left: all 5 training prompts have no expert in {gsm.bank}" in err
    assert "and 0 of its 1 rows match no prompt; was it built with another --prompt-template" in err
