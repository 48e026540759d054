"""The demo's verdict: a run where plain GRPO kept the format is flagged, never read as AAPA's win."""

from __future__ import annotations

from pathlib import Path

import yaml

from aapa_rl.local.demo import DRIFT_BELOW, HOLD_AT_LEAST, verdict

REPO = Path(__file__).resolve().parent.parent


def test_no_baseline_drift_is_flagged_as_not_evidence():
    assert verdict(grpo_format=1.0, aapa_format=1.0).startswith("NO DRIFT IN THIS RUN: NOT EVIDENCE")
    assert verdict(grpo_format=DRIFT_BELOW, aapa_format=1.0).startswith("NO DRIFT")
    assert "held it" in verdict(grpo_format=0.3, aapa_format=0.95)
    assert "did not hold" in verdict(grpo_format=0.3, aapa_format=0.5)


def test_demo_uses_the_drift_bench_definitions():
    v = yaml.safe_load((REPO / "bench" / "drift.yaml").read_text())["verdict"]
    assert (v["drift_below"], v["hold_at_least"]) == (DRIFT_BELOW, HOLD_AT_LEAST)
