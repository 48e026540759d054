"""`aapa-rl eval` and `aapa-rl analyze` on the warmed tiny model."""

from __future__ import annotations

import json
import re

import pytest
from local_helpers import RAISING_REWARD, base_recipe, discriminator_dir, warm_run

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
    # Each stops before the model loads, naming what to pass instead.
    final = str(warm_run() / "final")
    for flags, message in [
        (["--checkpoint", str(warm_run())], f"--checkpoint {warm_run()} is a run: pass {final}"),
        (["--checkpoint", str(tmp_path)], "not a model directory (no config.json)"),
        (["--checkpoint", final, "--limit", "-1"], "--limit -1: must be >= 0"),
        (["--checkpoint", final, "--k", "2", "--temperature", "0"], "--k 2 needs --temperature > 0"),
        (["--checkpoint", final, "--out", str(tmp_path / "x.jsonl")], "name the summary .json"),
    ]:
        assert main(["eval", *flags, "--data", str(data), "--reward", "arithmetic"]) == 2
        assert message in capsys.readouterr().err


def test_analyze_refuses_runs_that_share_a_label_and_skips_a_nan_final_eval(tmp_path, capsys):
    run = tmp_path / "a" / "grpo"
    run.mkdir(parents=True)
    rows = [{"step": 0, "eval/accuracy": 0.5}, {"step": 1, "eval/accuracy": float("nan")}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "b").mkdir()
    twin = tmp_path / "b" / "grpo"
    twin.mkdir()
    (twin / "metrics.jsonl").write_text((run / "metrics.jsonl").read_text())
    assert main(["analyze", str(run), str(twin), "--out", str(tmp_path / "out")]) == 2
    assert "two runs share a label (grpo, grpo)" in capsys.readouterr().err
    assert main(["analyze", str(run), str(twin), "--labels", "a", "b", "--out", str(tmp_path / "out")]) == 0
    table = capsys.readouterr().out
    assert "0.500" in table and "nan" not in table


def test_histograms_leave_out_nan_scores():
    from aapa_rl.local.plots import _late

    scores = [{"step": 0, "logp_rollout": [-1.0, float("nan"), -2.0]}]
    assert _late(scores, "logp_rollout").tolist() == [-1.0, -2.0]


def _reward_recipe(tmp_path, reward, steps: int = 3, eval_every: int | None = None):
    """A recipe file: GRPO from the warmed model on its train rows, scored by `reward`, saved every step;
    with `eval_every`, also evaluated on 5 of its eval rows (then, and after the last step)."""
    import yaml

    data = {"train": str(warm_run() / "data" / "train.jsonl")}
    if eval_every is not None:
        data["eval"] = str(warm_run() / "data" / "eval.jsonl")
    recipe = base_recipe(
        tmp_path / reward.stem,
        steps=steps,
        stages=[{"end_step": steps, "objective": "grpo"}],
        data=data,
        reward=str(reward),
        model={"path": str(warm_run() / "final")},
        log={"save_every": 1, "eval_samples": 5, "eval_every": eval_every or 0, "plots": False},
    )
    del recipe["task"]
    path = tmp_path / f"{reward.stem}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_a_reward_that_breaks_its_contract_is_named_and_the_checkpoints_kept(tmp_path, capsys):
    """Too many rewards no longer train silently on misaligned rewards, and a NaN reward mid-run is named
    (not 'non-finite loss or gradient'): an error naming the file, exit code 2, the checkpoints kept."""
    long = tmp_path / "long.py"  # found by the label check at startup, before any training
    long.write_text("import torch\ndef batch_reward(responses, labels):\n"
                    "    return torch.zeros(len(responses) + 4), {}\n")
    assert main(["train", "--config", str(_reward_recipe(tmp_path, long)), "--no-progress"]) == 2
    err = capsys.readouterr().err
    named = rf"error: reward '{re.escape(str(long))}:batch_reward': (\d+) rewards for (\d+) responses"
    counts = re.search(named, err)
    assert counts and int(counts[1]) == int(counts[2]) + 4, err  # the reward's fault, not a label's
    assert "label" not in err and "Traceback" not in err

    late = tmp_path / "late.py"  # NaN from the third step's rollouts on (the label check scores "")
    late.write_text(
        "import torch\nCALLS = []\n"
        "def batch_reward(responses, labels):\n"
        "    CALLS.extend([1] if any(responses) else [])\n"
        "    r = torch.ones(len(responses))\n"
        "    r[1] = float('nan') if len(CALLS) >= 3 else 1.0\n"
        "    return r, {}\n"
    )
    assert main(["train", "--config", str(_reward_recipe(tmp_path, late)), "--no-progress"]) == 2
    err = capsys.readouterr().err
    run = tmp_path / "late"
    assert f"reward '{late}:batch_reward': non-finite reward nan for sample 1 (1 of 16)" in err
    assert f"the run stopped after 2 steps; last checkpoint: {run / 'checkpoints' / 'step_000002'}" in err
    assert "Traceback" not in err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000001", "step_000002"]


def test_a_reward_that_raises_mid_run_stops_it_like_a_broken_one(tmp_path, capsys):
    """A reward that raises mid-run: its traceback (the user's aid), then the error naming the file, the
    exception and the step, and the last checkpoint, exit code 2 (it used to end in a traceback, exit 1)."""
    raising = tmp_path / "raising.py"
    raising.write_text(RAISING_REWARD)
    assert main(["train", "--config", str(_reward_recipe(tmp_path, raising)), "--no-progress"]) == 2
    err = capsys.readouterr().err
    last = tmp_path / "raising" / "checkpoints" / "step_000002"
    assert f'File "{raising}", line 6, in batch_reward' in err and "KeyError: 'no such label'" in err
    assert f"error: reward '{raising}:batch_reward' raised KeyError at step 2: 'no such label'" in err
    assert f"the run stopped after 2 steps; last checkpoint: {last} (fix the cause, then --resume)" in err


def test_a_reward_that_raises_in_an_eval_stops_the_run_the_same_way(tmp_path, capsys):
    """A reward that raises only in an eval, mid-run (log.eval_every) or the final one, is named with the
    eval and step, exit code 2, as in the rollouts (it used to end in a bare traceback, exit 1); the final
    eval's message says the steps are kept."""
    raising = tmp_path / "raising.py"  # an eval scores its 5 rows at once; rollouts 16, label checks 64, 16
    raising.write_text(
        "import torch\n"
        "def batch_reward(responses, labels):\n"
        "    if len(responses) == 5:\n"
        "        raise KeyError('no such label')\n"
        "    return torch.ones(len(responses)), {}\n"
    )
    named = f"error: reward '{raising}:batch_reward' raised KeyError in the"
    mid, final = tmp_path / "mid", tmp_path / "final"
    mid.mkdir()
    final.mkdir()

    assert main(["train", "--config", str(_reward_recipe(mid, raising, eval_every=2)), "--no-progress"]) == 2
    err = capsys.readouterr().err
    last = mid / "raising" / "checkpoints" / "step_000001"
    assert f'File "{raising}", line 4, in batch_reward' in err and "KeyError: 'no such label'" in err
    assert f"{named} eval after step 1: 'no such label'" in err
    assert f"the run stopped after 2 steps; last checkpoint: {last} (fix the cause, then --resume)" in err

    config = _reward_recipe(final, raising, steps=2, eval_every=0)  # only the final eval
    assert main(["train", "--config", str(config), "--no-progress"]) == 2
    err = capsys.readouterr().err
    last = final / "raising" / "checkpoints" / "step_000002"
    assert f"{named} final eval after step 1: 'no such label'" in err
    assert f"the run logged its 2 steps, then stopped in its final eval; last checkpoint: {last} (fix" in err


def test_accuracy_plot_draws_any_rewards_correctness(tmp_path):
    """A `reward: math` run logs reward/math_correct: its accuracy plot draws it, as eval's accuracy
    (evaluation.correctness) reads any *_correct log."""
    from aapa_rl.local import plots

    run = tmp_path / "run"
    run.mkdir()
    rows = [{"step": s, "reward/math_correct": s / 4, "reward/raw": s / 4} for s in range(4)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert run / "plots" / "accuracy.png" in plots.plot_run(run)
    keys = [("reward/correct", "train correct"), ("reward/*_correct", "train *_correct")]
    assert plots._expand(rows, keys) == [
        ("reward/correct", "train correct"),
        ("reward/math_correct", "train math_correct"),
    ]


def test_eval_pass_at_k_is_reproducible_with_a_seed(tmp_path, monkeypatch):
    """`--seed` (default 0) seeds the pass@k samples: the same command samples the same responses
    whatever ran before it in the process."""
    import torch

    from aapa_rl.local import evaluation

    sampled = []

    def spy(*args, **kwargs):
        batch = generate(*args, **kwargs)
        if kwargs.get("n", 1) > 1:
            sampled.append(batch.texts)
        return batch

    generate = evaluation.generate
    monkeypatch.setattr(evaluation, "generate", spy)
    data = warm_run() / "data" / "eval.jsonl"
    args = ["eval", "--checkpoint", str(warm_run() / "final"), "--data", str(data), "--reward", "arithmetic",
            "--k", "4", "--temperature", "1.5", "--limit", "8", "--max-new-tokens", "40"]
    for before in (1, 2):
        torch.manual_seed(before)  # whatever state an earlier command left
        assert main([*args, "--out", str(tmp_path / f"eval{before}.json")]) == 0
    assert len(sampled) == 2 and sampled[0] == sampled[1]
    first, second = ((tmp_path / f"eval{i}.jsonl").read_text() for i in (1, 2))
    assert first == second


def test_train_into_the_recipes_own_directory_deletes_nothing(tmp_path, capsys):
    """`aapa-rl train --config exp1/config.yaml --out exp1` with files of one's own in exp1: refused, and
    exp1 kept as it was (it used to be deleted because it held a config.yaml)."""
    import yaml

    exp1 = tmp_path / "exp1"
    (exp1 / "mydata").mkdir(parents=True)
    (exp1 / "notes.txt").write_text("mine")
    recipe = base_recipe(exp1, steps=1, stages=[{"end_step": 1, "objective": "sft"}])
    (exp1 / "config.yaml").write_text(yaml.safe_dump(recipe))
    for extra in ([], ["--overwrite"]):
        code = main(["train", "--config", str(exp1 / "config.yaml"), "--out", str(exp1), "--no-progress",
                     *extra])
        assert code == 2
        assert "not an empty directory or a run directory" in capsys.readouterr().err
        assert sorted(p.name for p in exp1.iterdir()) == ["config.yaml", "mydata", "notes.txt"]
        assert yaml.safe_load((exp1 / "config.yaml").read_text()) == recipe


def test_resume_refuses_a_changed_recipe_and_records_a_longer_run(tmp_path, capsys):
    """--resume with a recipe that trains something else is refused, naming every changed key with its old
    and new value (it used to be taken silently, leaving config.yaml describing another run); more steps
    and other logging resume, and config.yaml is rewritten to say so."""
    import yaml

    run = tmp_path / "run"
    recipe = base_recipe(run, steps=1, stages=[{"end_step": 1, "objective": "sft"}],
                         model={"path": str(warm_run() / "final")})
    config = tmp_path / "recipe.yaml"
    config.write_text(yaml.safe_dump(recipe))
    train = ["train", "--config", str(config), "--no-progress"]
    assert main(train) == 0
    written = (run / "config.yaml").read_text()
    capsys.readouterr()

    changed = ["--set", "optim.lr=0.01", "--set", "loss.sft_batch_size=4", "--set", "model.path=null",
               "--set", "aapa.stages.0.objective=chord", "--set", "steps=2"]
    assert main([*train, "--resume", *changed]) == 2
    err = capsys.readouterr().err
    for line in (
        "optim.lr: 0.001 -> 0.01",
        "loss.sft_batch_size: 8 -> 4",
        "aapa.stages.0.objective: 'sft' -> 'chord'",
        f"model.path: '{warm_run() / 'final'}' -> None",
    ):
        assert f"\n  {line}" in err, err
    assert "steps:" not in err and "start a new run (another --out) or replace this one (--overwrite)" in err
    assert (run / "config.yaml").read_text() == written

    assert main([*train, "--resume", "--set", "steps=2", "--set", "log.eval_samples=4"]) == 0
    out = capsys.readouterr().out
    assert "resuming with steps: 1 -> 2" in out and "resuming with log.eval_samples: 8 -> 4" in out
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["steps"] == 2 and saved["log"]["eval_samples"] == 4
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [0, 1]
