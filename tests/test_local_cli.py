"""`aapa-rl eval` and `aapa-rl analyze` on the warmed tiny model."""

from __future__ import annotations

import json

import pytest
from local_helpers import base_recipe, discriminator_dir, warm_run

from aapa_rl.cli import main


def test_eval_reports_accuracy_pass_at_k_nll_and_d(tmp_path, capsys):
    out = tmp_path / "eval.json"
    code = main(
        [
            "eval",
            "--checkpoint",
            str(warm_run() / "final"),
            "--data",
            str(warm_run() / "data" / "eval.jsonl"),
            "--reward",
            "arithmetic",
            "--discriminator",
            str(discriminator_dir()),
            "--k",
            "2",
            "--limit",
            "6",
            "--max-new-tokens",
            "40",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    summary = json.loads(out.read_text())
    records = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
    assert summary["n"] == 6 and len(records) == 6
    for key in (
        "accuracy",
        "pass@2",
        "length",
        "expert_nll_token",
        "expert_nll_seq",
        "p_end_after_expert",
        "d_response",
        "d_expert",
        "reward/format",
        "reward/boxes",
    ):
        assert key in summary, key
    assert 0 <= summary["pass@2"] <= 1 and 0 < summary["p_end_after_expert"] < 1
    assert summary["expert_nll_seq"] > summary["expert_nll_token"] > 0
    assert summary["accuracy"] == sum(r["correct"] for r in records) / 6
    assert "accuracy" in capsys.readouterr().out


def test_eval_names_a_bad_data_row(tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text(
        json.dumps({"prompt": "Q: 1+1=?\nA: ", "label": "2"}) + "\n" + json.dumps({"prompt": "x"}) + "\n"
    )
    code = main(
        ["eval", "--checkpoint", str(warm_run() / "final"), "--data", str(data), "--reward", "arithmetic"]
    )
    assert code == 2
    assert "bad.jsonl: row 2: field 'label': missing" in capsys.readouterr().err


def test_analyze_draws_runs_side_by_side(tmp_path, capsys):
    from aapa_rl.local.recipe import load_recipe
    from aapa_rl.local.trainer import Trainer

    rl = tmp_path / "rl"
    recipe = base_recipe(
        rl,
        model={"path": str(warm_run() / "final")},
        aapa={"discriminator": str(discriminator_dir())},
        stages=[{"end_step": 2, "objective": "grpo", "alpha": 0.5, "lam": 1.0, "rho": 0.5}],
    )
    Trainer(load_recipe(None, base=recipe), progress=False).fit()
    assert (
        main(
            [
                "analyze",
                str(warm_run()),
                str(rl),
                "--labels",
                "sft",
                "rl",
                "--out",
                str(tmp_path / "analysis"),
            ]
        )
        == 0
    )
    made = {p.name for p in (tmp_path / "analysis").iterdir()}
    assert {
        "compare_length.png",
        "compare_reward.png",
        "compare_accuracy.png",
        "compare_anchor_gap.png",
        "compare_lambda.png",
        "compare_logp_hist.png",
        "compare_disc_hist.png",
    } <= made
    assert "sft" in capsys.readouterr().out
    assert main(["analyze", str(tmp_path / "analysis")]) == 2
    assert "not a run directory" in capsys.readouterr().err


def test_local_data_rows_that_are_not_utf8_name_the_file_and_row(tmp_path):
    from aapa_rl.data.rows import DataError
    from aapa_rl.local.trainer import load_rows

    path = tmp_path / "train.jsonl"
    path.write_bytes(b'{"prompt": "Q1", "label": "1"}\n{"prompt": "Q\xff", "label": "2"}\n')
    with pytest.raises(DataError, match=r"train.jsonl: row 2: not valid UTF-8"):
        load_rows(path, ("prompt",), ("label",))


def test_analyze_skips_a_cut_off_last_line(tmp_path, capsys):
    """A run killed while writing its logs can still be analysed; a bad line elsewhere names file and line."""
    from aapa_rl.data.rows import DataError
    from aapa_rl.local.plots import read_log

    run = tmp_path / "run"
    run.mkdir()
    rows = [{"step": 0, "reward/raw": 0.5}, {"step": 1, "reward/raw": 0.7}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 2, "rew')
    assert main(["analyze", str(run), "--out", str(tmp_path / "analysis")]) == 0
    assert "metrics.jsonl: line 3 was cut off" in capsys.readouterr().err
    assert (tmp_path / "analysis" / "compare_reward.png").exists()
    (run / "metrics.jsonl").write_text('{"step": 0}\n{"step": 1, "rew\n{"step": 2}\n')
    with pytest.raises(DataError, match=r"metrics.jsonl: line 2: not valid JSON"):
        read_log(run / "metrics.jsonl")


def test_eval_names_a_missing_checkpoint(tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"prompt": "Q: 1+1=?\nA: ", "label": "2"}) + "\n")
    missing = tmp_path / "runs" / "step_9"
    assert main(["eval", "--checkpoint", str(missing), "--data", str(data), "--reward", "arithmetic"]) == 2
    assert f"error: --checkpoint {missing}: no such directory" in capsys.readouterr().err
