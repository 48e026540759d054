"""Stage schedule for lambda(t), alpha(t), rho, CHORD's mu(t) and the base objective, plus the adaptive-lambda
controller. Every backend reads a step's values from here (aapa_rl.settings.AapaSettings.schedule)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from aapa_rl.objectives import chord_mu

BASE_OBJECTIVES = ("sft", "grpo", "chord")


@dataclass
class Stage:
    """Steps up to (excluding) `end_step` use this stage; `lam` decays linearly to `lam_end` when set."""

    end_step: int
    objective: str
    lam: float = 0.0
    alpha: float = 0.0
    rho: float = 0.0
    lam_end: float | None = None

    def __post_init__(self) -> None:
        if self.objective not in BASE_OBJECTIVES:
            raise ValueError(f"stage objective {self.objective!r} is not one of {BASE_OBJECTIVES}")
        for name in ("lam", "alpha", "lam_end"):  # NaN passes every comparison below
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ValueError(f"stage {name} must be finite, got {value}")
        if not 0.0 <= self.rho <= 1.0:
            raise ValueError(f"stage rho must be in [0, 1], got {self.rho}")
        if self.lam < 0 or self.alpha < 0 or (self.lam_end is not None and self.lam_end < 0):
            raise ValueError("stage lam, lam_end and alpha must be >= 0")


@dataclass
class ScheduleValues:
    stage: int
    stage_step: int  # steps since the stage began (CHORD's mu(t) counts from there)
    objective: str
    lam: float
    alpha: float
    rho: float
    mu: float  # CHORD's expert weight (0 outside chord stages)


class AdaptiveLambda:
    """Raise lambda when the mean anchor gap exceeds the drift budget, lower it when below.

    Multiplicative like OpenRLHF's adaptive KL controller: lam *= (1 + rate) or /= (1 + rate), bounded.
    """

    def __init__(self, target_gap: float, rate: float = 0.1, lam_min: float = 0.0, lam_max: float = 10.0):
        settings = {"target_gap": target_gap, "rate": rate, "lam_min": lam_min, "lam_max": lam_max}
        for name, value in settings.items():  # NaN passes every comparison below
            if not math.isfinite(value):
                raise ValueError(f"adaptive lambda {name} must be finite, got {value}")
        if target_gap <= 0 or rate <= 0 or not 0 <= lam_min <= lam_max:
            raise ValueError("adaptive lambda needs target_gap > 0, rate > 0 and 0 <= lam_min <= lam_max")
        self.target_gap, self.rate, self.lam_min, self.lam_max = target_gap, rate, lam_min, lam_max
        self.lam: float | None = None  # set from the schedule's lambda on first use

    def update(self, gap_mean: float) -> float:
        if self.lam is None:
            raise RuntimeError("AdaptiveLambda.update called before its lambda was initialised")
        if gap_mean > self.target_gap:
            # A lambda of exactly zero could never grow multiplicatively: restart it from a small floor.
            lam = max(self.lam, 1e-3) * (1 + self.rate)
        else:
            lam = self.lam / (1 + self.rate)
        self.lam = min(max(lam, self.lam_min), self.lam_max)
        return self.lam


class StageSchedule:
    """An ordered list of stages; the last stage extends past its end step."""

    def __init__(self, stages: list[Stage], adaptive: AdaptiveLambda | None = None, chord: Any = None):
        """`chord`: CHORD's mu schedule (warmup_steps, decay_steps, peak, valley), needed by chord stages."""
        if not stages:
            raise ValueError("a stage schedule needs at least one stage")
        ends = [s.end_step for s in stages]
        if any(b <= a for a, b in zip(ends, ends[1:], strict=False)) or ends[0] <= 0:
            raise ValueError(f"stage end steps must be positive and strictly increasing, got {ends}")
        if chord is None and any(s.objective == "chord" for s in stages):
            raise ValueError("a chord stage needs CHORD's mu schedule (chord settings)")
        self.stages = stages
        self.adaptive = adaptive
        self.chord = chord

    def _stage_index(self, step: int) -> int:
        for i, stage in enumerate(self.stages):
            if step < stage.end_step:
                return i
        return len(self.stages) - 1

    def at(self, step: int) -> ScheduleValues:
        i = self._stage_index(step)
        stage = self.stages[i]
        start = self.stages[i - 1].end_step if i else 0
        lam = stage.lam
        if stage.lam_end is not None:
            progress = min(max((step - start) / (stage.end_step - start), 0.0), 1.0)
            lam = stage.lam + (stage.lam_end - stage.lam) * progress
        if self.adaptive is not None:
            if self.adaptive.lam is None:
                self.adaptive.lam = lam
            lam = self.adaptive.lam
        mu = 0.0
        if stage.objective == "chord":  # counted from the stage's start, like lambda's decay
            c = self.chord
            mu = chord_mu(step - start, c.warmup_steps, c.decay_steps, c.peak, c.valley)
        return ScheduleValues(stage=i, stage_step=step - start, objective=stage.objective, lam=lam,
                              alpha=stage.alpha, rho=stage.rho, mu=mu)

    def observe(self, gap_mean: float) -> None:
        """Adaptive lambda's step on a batch's mean gap; a NaN gap (no prompt of the batch has an expert)
        leaves lambda as it is."""
        if self.adaptive is not None and self.adaptive.lam is not None and math.isfinite(gap_mean):
            self.adaptive.update(gap_mean)

    def state_dict(self) -> dict:
        return {
            "stages": [asdict(s) for s in self.stages],
            "adaptive_lam": None if self.adaptive is None else self.adaptive.lam,
        }

    def load_state_dict(self, state: dict) -> None:
        if state["stages"] != [asdict(s) for s in self.stages]:
            raise ValueError("checkpoint was written with a different stage schedule; refusing to resume")
        if self.adaptive is not None:
            self.adaptive.lam = state["adaptive_lam"]
