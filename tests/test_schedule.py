"""aapa_rl.schedule: stage boundaries, lambda decay, the adaptive controller and checkpoint state."""

from __future__ import annotations

import pytest

from aapa_rl.schedule import AdaptiveLambda, Stage, StageSchedule


def staged() -> StageSchedule:
    return StageSchedule(
        [
            Stage(end_step=10, objective="sft", lam=1.0, alpha=0.1, rho=0.5),
            Stage(end_step=30, objective="grpo", lam=2.0, lam_end=0.5, alpha=0.05, rho=0.25),
        ]
    )


def test_stage_transitions_at_boundaries():
    schedule = staged()
    assert schedule.at(0).objective == "sft" and schedule.at(9).stage == 0
    v = schedule.at(10)
    assert (v.stage, v.objective, v.alpha, v.rho) == (1, "grpo", 0.05, 0.25)
    assert v.lam == pytest.approx(2.0)
    assert schedule.at(20).lam == pytest.approx(1.25)  # halfway through the linear decay
    assert schedule.at(30).lam == pytest.approx(0.5)  # the last stage holds its floor past its end
    assert schedule.at(500).objective == "grpo" and schedule.at(500).lam == pytest.approx(0.5)
    assert schedule.at(5).lam == 1.0
    # Steps since the stage began: what CHORD's mu(t) counts, in both trainers.
    assert [schedule.at(step).stage_step for step in (0, 9, 10, 25, 500)] == [0, 9, 0, 15, 490]


def test_invalid_schedules_are_refused():
    with pytest.raises(ValueError, match="increasing"):
        StageSchedule([Stage(10, "sft"), Stage(10, "grpo")])
    with pytest.raises(ValueError, match="objective"):
        Stage(10, "dpo")
    with pytest.raises(ValueError, match="rho"):
        Stage(10, "grpo", rho=2.0)
    with pytest.raises(ValueError, match="at least one"):
        StageSchedule([])


def test_adaptive_lambda_moves_in_the_right_direction_within_bounds():
    controller = AdaptiveLambda(target_gap=0.5, rate=0.5, lam_min=0.1, lam_max=2.0)
    schedule = StageSchedule([Stage(100, "grpo", lam=1.0, rho=0.25)], adaptive=controller)
    assert schedule.at(0).lam == 1.0
    schedule.observe(gap_mean=1.0)  # drifting more than the budget: raise
    assert schedule.at(1).lam == pytest.approx(1.5)
    schedule.observe(gap_mean=float("nan"))  # a batch without experts: no step, whichever backend calls
    assert schedule.at(1).lam == pytest.approx(1.5)
    for _ in range(5):
        schedule.observe(gap_mean=3.0)
    assert schedule.at(2).lam == 2.0  # upper bound
    for _ in range(20):
        schedule.observe(gap_mean=0.0)  # within budget: lower
    assert schedule.at(3).lam == pytest.approx(0.1)  # lower bound
    with pytest.raises(ValueError):
        AdaptiveLambda(target_gap=0.0)


def test_adaptive_lambda_restarts_from_zero():
    controller = AdaptiveLambda(target_gap=0.1, rate=1.0)
    schedule = StageSchedule([Stage(10, "grpo", lam=0.0)], adaptive=controller)
    assert schedule.at(0).lam == 0.0
    schedule.observe(1.0)
    assert schedule.at(1).lam > 0.0


def test_adaptive_lambda_lowers_below_the_restart_floor():
    """The 1e-3 floor restarts a raise from (near) zero; a lowering step must never raise lambda."""
    controller = AdaptiveLambda(target_gap=1.0, rate=0.1)
    for lam in (1e-4, 0.0):
        controller.lam = lam
        assert controller.update(0.0) == pytest.approx(lam / 1.1)
    controller.lam = 1e-4
    assert controller.update(2.0) == pytest.approx(1.1e-3)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_values_are_refused_naming_the_key(bad):
    for key in ("lam", "alpha", "lam_end"):
        with pytest.raises(ValueError, match=f"stage {key} must be finite, got {bad}"):
            Stage(10, "grpo", rho=0.5, **{key: bad})
    with pytest.raises(ValueError, match="rho must be in"):
        Stage(10, "grpo", rho=bad)
    for key in ("target_gap", "rate", "lam_min", "lam_max"):
        with pytest.raises(ValueError, match=f"adaptive lambda {key} must be finite, got {bad}"):
            AdaptiveLambda(**{"target_gap": 0.5, key: bad})


def test_state_dict_round_trip():
    make = lambda: StageSchedule(  # noqa: E731
        [Stage(5, "sft", lam=1.0), Stage(50, "grpo", lam=0.5)], adaptive=AdaptiveLambda(0.2, rate=0.3)
    )
    schedule = make()
    schedule.at(0)
    for gap in (1.0, 1.0, 0.0):
        schedule.observe(gap)
    state = schedule.state_dict()
    restored = make()
    restored.load_state_dict(state)
    assert restored.at(7) == schedule.at(7)
    assert restored.state_dict() == state
    other = StageSchedule([Stage(6, "sft", lam=1.0)])
    with pytest.raises(ValueError, match="different stage schedule"):
        other.load_state_dict(state)
