"""Smoke test of bench/drift.py and bench/overhead.py: the real config, shrunk to a few steps and rows."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import drift  # noqa: E402
import overhead  # noqa: E402


def tiny_drift_config() -> dict:
    """bench/drift.yaml shrunk to a few SFT steps, rows and tokens."""
    cfg = yaml.safe_load((BENCH / "drift.yaml").read_text())
    cfg["task"].update(n_sft=200, n_train=64, n_eval=8)
    cfg["sft"].update(steps=3, aapa={"stages": [{"end_step": 3, "objective": "sft"}]})
    cfg["sft"]["log"]["eval_samples"] = 8
    cfg["discriminator"].update(rollout_prompts=8, steps=20)
    cfg["rl"]["rollout"].update(prompts_per_step=2, group_size=2, max_new_tokens=24)
    cfg["rl"]["log"].update(eval_every=1, eval_samples=8)
    cfg["rl"]["aapa"] = {"force_discriminator": True}  # a 3-step SFT model's discriminator is near chance
    return cfg


def test_drift_and_overhead_write_results_and_tables(tmp_path, capsys, monkeypatch):
    cfg = tiny_drift_config()
    cfg["starts"], cfg["seeds"], cfg["workers"] = [0], [1], 2
    cfg["arms"] = {name: cfg["arms"][name] for name in ("grpo", "aapa")}
    for arm in cfg["arms"].values():
        arm["aapa"]["stages"][-1]["end_step"] = 2
    config = tmp_path / "drift.yaml"
    config.write_text(yaml.safe_dump(cfg))

    # Results go under --out by default: running the bench never rewrites the committed bench/results/.
    assert drift.main(["--config", str(config), "--out", str(tmp_path / "runs")]) == 0
    results = tmp_path / "runs" / "results" / "drift"
    printed = capsys.readouterr().out
    assert "| GRPO + AAPA | 1 |" in printed and "plain GRPO drifts in >= 90%" in printed
    run = json.loads((results / "aapa-sft0-seed1.json").read_text())
    assert run["start"] == 0 and run["seed"] == 1 and isinstance(run["evidence"], bool)
    assert run["steps"] == 2 and [p["step"] for p in run["eval_curve"]] == [0, 1, 2]
    assert {"accuracy", "reward/format", "expert_nll_seq", "p_end_after_expert", "d_response"} <= set(
        run["final"]
    )
    assert run["train_curve"]["lambda"] == [0.5, 0.5]
    summary = json.loads((results / "summary.json").read_text())
    assert set(summary["arms"]) == {"grpo", "aapa"} and not summary["failed"]
    assert summary["starts"]["0"]["fingerprint"] and summary["machine"]["torch_cpu_capability"]
    assert {"eval_curves.png", "train_curves.png"} <= {p.name for p in results.iterdir()}
    # Run again, OUT spelled relative to the working directory: the start and both runs are reused, and the
    # results come out the same.
    monkeypatch.chdir(tmp_path)
    assert drift.main(["--config", str(config), "--out", "runs"]) == 0
    assert "2 of the 2 runs finished earlier and were reused" in capsys.readouterr().out
    assert json.loads((results / "aapa-sft0-seed1.json").read_text())["final"] == run["final"]

    out = tmp_path / "overhead.json"
    args = ["--config", str(config), "--out", str(tmp_path / "runs"), "--results", str(out), "--steps", "1"]
    assert overhead.main([*args, "--warmup", "0"]) == 0
    report = json.loads(out.read_text())
    assert set(report["step_ratio"]) == {"GRPO", "CHORD"}
    assert report["median_seconds"]["GRPO"]["discriminator"] == 0.0
    assert "anchor fwd/bwd" in report["median_seconds"]["GRPO + AAPA"]
    assert report["median_seconds"]["CHORD"]["expert SFT fwd/bwd"] > 0
    assert "step time GRPO + AAPA / GRPO" in capsys.readouterr().out


def test_threshold_config_takes_everything_but_seeds_and_arms_from_its_base():
    base = drift.load_config(BENCH / "drift.yaml", quick=False)
    variant = drift.load_config(BENCH / "drift-threshold.yaml", quick=False)
    assert "base" not in variant and variant["seeds"] == [1] and len(variant["arms"]) == 5
    assert variant["arms"]["grpo"] == base["arms"]["grpo"]  # the same runs as the bench's baseline
    assert {k: v for k, v in variant.items() if k not in ("seeds", "arms")} == {
        k: v for k, v in base.items() if k not in ("seeds", "arms")
    }
    variants = drift.load_config(BENCH / "drift-variants.yaml", quick=False)
    assert variants["arms"]["grpo"] == base["arms"]["grpo"] and variants["starts"] == base["starts"]


def test_a_base_may_have_a_base_of_its_own():
    selection = drift.load_config(BENCH / "selection.yaml", quick=False)
    k2 = drift.load_config(BENCH / "selection-k2.yaml", quick=False)
    assert "base" not in k2 and k2["budgets"] == [[0.25, 0.125]] and k2["selections"] == ["gap", "random"]
    # everything else from selection.yaml, whose task, sft, rl, ... come from drift.yaml
    assert {k: v for k, v in k2.items() if k not in ("budgets", "selections")} == {
        k: v for k, v in selection.items() if k not in ("budgets", "selections")
    }
    assert k2["task"] == drift.load_config(BENCH / "drift.yaml", quick=False)["task"]


def test_quick_runs_are_the_first_steps_of_the_full_benchs_runs(tmp_path):
    full = drift.load_config(BENCH / "drift.yaml", quick=False)
    quick = drift.load_config(BENCH / "drift.yaml", quick=True)
    f, q = (drift.arm_recipe(cfg, "aapa", 1, tmp_path / "run", tmp_path / "start") for cfg in (full, quick))
    assert q["steps"] == 60 and f["steps"] == 120
    assert q["aapa"] == f["aapa"]  # the same stages, so the same schedule up to step 60
    assert q["log"]["eval_every"] == 0  # the final eval only
    same = {k: v for k, v in f.items() if k not in ("steps", "log")}
    assert {k: v for k, v in q.items() if k not in ("steps", "log")} == same


def test_a_comparison_counts_only_where_the_baseline_drifted():
    cfg = drift.load_config(BENCH / "drift.yaml", quick=True)

    def run(arm: str, start: int, fmt: float) -> dict:
        final = {k: 0.9 for k, _ in drift.COLUMNS} | {"reward/format": fmt}
        return {"arm": arm, "label": cfg["arms"][arm]["label"], "start": start, "seed": 1, "final": final}

    # start 0: GRPO drifted, AAPA held; start 1: GRPO kept the format, so AAPA's 1.0 there is not evidence
    records = [run("grpo", 0, 0.2), run("grpo", 1, 0.95), run("aapa", 0, 1.0), run("aapa", 1, 1.0)]
    drift.judge(records, cfg)
    assert [r["evidence"] for r in records] == [None, None, True, False]
    starts = {0: {k: 0.95 for k, _ in drift.COLUMNS}, 1: {k: 0.95 for k, _ in drift.COLUMNS}}
    stats, text = drift.table(starts, records, cfg)
    assert stats["grpo"]["drifted"] == 1 and stats["aapa"]["held_where_baseline_drifted"] == 1
    assert "| GRPO + AAPA | 2 | 0/2 | 2/2 | 1/1 (1 not evidence) |" in text
    targets = {t["target"]: t for t in drift.check_targets(starts, stats, records, cfg)}
    assert targets["plain GRPO drifts in >= 90% of (start, seed) runs"] == {
        "target": "plain GRPO drifts in >= 90% of (start, seed) runs",
        "value": "1/2",
        "met": False,
    }


def test_trl_drift_runs_both_arms_through_trl_and_writes_results(tmp_path, capsys):
    import trl_drift

    cfg = tiny_drift_config()
    for arm in cfg["arms"].values():
        arm["aapa"]["stages"][-1]["end_step"] = 7  # TRL's median step time drops the first 5 steps
    config = tmp_path / "drift.yaml"
    config.write_text(yaml.safe_dump(cfg))

    assert trl_drift.main(["--config", str(config), "--out", str(tmp_path / "runs"), "--starts", "0"]) == 0
    results = tmp_path / "runs" / "results" / "trl-drift"
    summary = json.loads((results / "summary.json").read_text())
    assert set(summary["runs"]) == {"grpo-sft0-seed1", "aapa-sft0-seed1"}
    aapa = summary["runs"]["aapa-sft0-seed1"]
    assert [p["step"] for p in aapa["eval_curve"]] == list(range(8)) and aapa["median_aapa_seconds"] > 0
    assert summary["runs"]["grpo-sft0-seed1"]["median_aapa_seconds"] == 0
    assert len(summary["step_time_ratio_aapa_over_grpo"]) == 1 and (results / "curves.png").exists()
    assert "| TRL GRPO + AAPA | 0 | 1 |" in capsys.readouterr().out


def test_selection_config_declares_the_sweep_on_the_drift_bench():
    import selection

    base = drift.load_config(BENCH / "drift.yaml", quick=False)
    cfg = drift.load_config(BENCH / "selection.yaml", quick=False)
    assert {k: cfg[k] for k in ("task", "sft", "discriminator", "rl")} == {
        k: base[k] for k in ("task", "sft", "discriminator", "rl")
    }
    assert cfg["selections"] == ["gap", "random", "oracle", "all"] and len(cfg["budgets"]) == 5
    assert cfg["flaws"]["repeat_on_mul"]["task"] == {}  # the drift bench's SFT starts, reused as they are
    arms = selection.anchor_arms(cfg)
    assert list(arms)[0] == "grpo" and len(arms) == 1 + 4 * 5
    stages = [arm["aapa"]["stages"] for name, arm in arms.items() if name != "grpo"]
    # alpha = 0 (absent): the anchor alone, for the run length of the baseline
    assert all(len(s) == 1 and set(s[0]) == {"end_step", "objective", "lam", "rho"} for s in stages)
    assert {s[0]["end_step"] for s in stages} == {120}


def test_the_selection_target_counts_only_the_runs_whose_baseline_drifted():
    import selection

    cfg = {"verdict": {"baseline": "grpo"}, "selections": ["gap", "random"]}
    cfg["budgets"] = [[0.125, 0.25], [0.25, 0.5]]
    cfg["arms"] = {"grpo": {"label": "GRPO", "aapa": {"stages": [{"end_step": 10, "objective": "grpo"}]}}}
    cfg["arms"] = selection.anchor_arms(cfg)

    def runs(arm: str, held: tuple[bool, bool], accuracy: tuple[float, float]) -> list[dict]:
        # Start 0's baseline drifted (evidence); start 1's did not, and its runs must not count either way.
        return [
            {"arm": arm, "evidence": s == 0, "drifted": False, "held": h, "final": {
                **{k: 0.5 for k, _ in selection.COLUMNS}, "accuracy": a}}
            for s, (h, a) in enumerate(zip(held, accuracy, strict=True))
        ]

    def target(gap_accuracy: float) -> dict:
        records = [
            *runs("gap-rho0_125-lam0_25", (True, False), (gap_accuracy, 0.99)),
            *runs("gap-rho0_25-lam0_5", (True, True), (0.9, 0.99)),
            *runs("random-rho0_125-lam0_25", (False, True), (0.7, 0.99)),
            *runs("random-rho0_25-lam0_5", (True, True), (0.9, 0.99)),
        ]
        result = selection.summarize(records, cfg, {0: {"accuracy": 0.9}, 1: {"accuracy": 0.96}})
        assert result["smallest_holding_budget"] == {"gap": [0.125, 0.25], "random": [0.25, 0.5]}
        return result["targets"][-1]

    assert target(0.91)["met"] and target(0.91)["value"]["gap_accuracy"] == 0.91  # not start 1's 0.99
    assert not target(0.89)["met"]  # the line: 3 points under the starts' mean, 0.93


def test_selection_runs_each_selection_at_a_budget_and_writes_results(tmp_path, capsys):
    import selection

    cfg = tiny_drift_config()
    declared = yaml.safe_load((BENCH / "selection.yaml").read_text())
    cfg.update({k: declared[k] for k in ("verdict", "quick")})
    cfg.update(flaws={"repeat_on_mul": declared["flaws"]["repeat_on_mul"]}, selections=["gap", "oracle"])
    cfg.update(budgets=[[0.5, 0.5]], starts=[0], seeds=[1], workers=2)
    cfg["arms"] = {"grpo": {"label": "GRPO", "aapa": {"stages": [{"end_step": 2, "objective": "grpo"}]}}}
    config = tmp_path / "selection.yaml"
    config.write_text(yaml.safe_dump(cfg))
    args = ["--config", str(config), "--out", str(tmp_path / "runs")]

    assert selection.main(args) == 0
    results = tmp_path / "runs" / "results" / "selection"
    printed = capsys.readouterr().out
    assert "## repeat_on_mul" in printed and "smallest budget (rho, lam) holding every run where" in printed
    assert "holds the flawed subset at <= half the budget random needs" not in printed  # no random arm
    summary = json.loads((results / "summary.json").read_text())
    arms = summary["flaws"]["repeat_on_mul"]["arms"]
    assert list(arms) == ["grpo", "gap-rho0_5-lam0_5", "oracle-rho0_5-lam0_5"] and not summary["failed"]
    assert arms["grpo"]["anchor_budget"][0] == 0 and arms["oracle-rho0_5-lam0_5"]["anchor_budget"][0] > 0
    assert 0 <= summary["starts"]["repeat_on_mul-sft0"]["eval"]["reward/flawed_subset"] <= 1
    run = json.loads((results / "repeat_on_mul-oracle-rho0_5-lam0_5-sft0-seed1.json").read_text())
    assert run["flaw"] == "repeat_on_mul" and run["arm_config"]["aapa"]["selection"] == "oracle"
    assert {"format_on_subset", "format_elsewhere", "hard_precision", "gap_auroc"} <= set(run["final"])
    assert (results / "repeat_on_mul.png").exists() and "| oracle, rho 0.5, lam 0.5 | 0.25 | 1 |" in (
        results / "table.md"
    ).read_text()

    assert selection.main(args) == 0  # unchanged recipes and start: every run is reused
    assert "3 runs (1 flaws x 3 arms x 1 starts x 1 seeds), 3 finished earlier" in capsys.readouterr().out
