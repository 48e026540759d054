"""The AAPA settings: one schema, one set of names, one validation, for every backend.

The local recipe's `aapa:` section, OpenRLHF's `--aapa.*` flags and the TRL config are spellings of the
fields of `AapaSettings` (a dotted flag is a YAML key: `--aapa.chord '{"decay_steps": 100}'` is
`aapa: {chord: {decay_steps: 100}}`). `build` turns a mapping into checked dataclasses and names the key of
any problem; the schedule, CHORD's mu and the hard-set selection are read from these settings only.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field

from aapa_rl.objectives import SELECTIONS, SHAPING_TRANSFORMS
from aapa_rl.schedule import AdaptiveLambda, Stage, StageSchedule

FLOAT_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
MISSING_EXPERT = ("error", "skip")


class ConfigError(ValueError):
    """A bad setting; the message names its key."""


@dataclass
class ChordSettings:
    """CHORD's mu(t) for `chord` stages (counted from the stage's start) and its phi weighting."""

    warmup_steps: int = 0
    decay_steps: int = 200
    peak: float = 0.9
    valley: float = 0.05
    phi: bool = True  # weight the expert tokens by p(1-p) (CHORD-phi)

    def __post_init__(self) -> None:
        if self.warmup_steps < 0 or self.decay_steps <= 0:
            raise ValueError("chord.warmup_steps must be >= 0 and chord.decay_steps > 0")
        if not 0 <= self.valley <= self.peak <= 1:
            raise ValueError(f"chord needs 0 <= valley <= peak <= 1, got {self.valley} and {self.peak}")


@dataclass
class AdaptiveSettings:
    """Adaptive lambda: raise it while the mean anchor gap exceeds `target_gap`, lower it below."""

    target_gap: float
    rate: float = 0.1
    lam_min: float = 0.0
    lam_max: float = 10.0

    def __post_init__(self) -> None:
        AdaptiveLambda(**dataclasses.asdict(self))  # its checks


def _setting(default=None, help: str = "", **kwargs):
    return field(default=default, metadata={"help": help}, **kwargs)


@dataclass
class AapaSettings:
    stages: list[Stage] = field(
        metadata={
            "help": 'the stage schedule: [{"end_step": 50, "objective": "sft", "lam": 1.0, '
            '"alpha": 0.1, "rho": 0.25, "lam_end": null}, ...] (objective sft, grpo or chord)'
        }
    )
    discriminator: str | None = _setting(help="directory written by `aapa-rl discriminator train`")
    expert_bank: str | None = _setting(
        help="expert bank (JSONL/parquet/datasets dir) for prompts whose labels carry no `expert`"
    )
    adaptive: AdaptiveSettings | None = _setting(
        help='adaptive lambda: {"target_gap": 0.5, "rate": 0.1, "lam_min": 0, "lam_max": 10}; it starts from '
        "the first step's lambda and then replaces every stage's lam and lam_end (docs/settings.md)"
    )
    chord: ChordSettings = field(
        default_factory=ChordSettings,
        metadata={
            "help": 'CHORD for chord stages: {"warmup_steps": 0, "decay_steps": 200, "peak": 0.9, '
            '"valley": 0.05, "phi": true}'
        },
    )
    temperature: float | None = _setting(help="softmax temperature of the hard-set weights (null: uniform)")
    transform: str = _setting("log", help=f"shaping s = g(D), one of {SHAPING_TRANSFORMS}")
    eps: float = _setting(1e-6, help="floor on D inside logs")
    shaping_floor: float | None = _setting(help="lower bound on the shaping signal s = g(D); null: none")
    anchor_phi: bool = _setting(False, help="weight anchor tokens by p(1-p) (CHORD-style)")
    missing_expert: str = _setting(
        "error", help="a prompt without an expert: stop (error), or leave it out of H and count it (skip)"
    )
    selection: str = _setting(
        "gap",
        help="gap: the spec's hard set; random: as many anchor prompts, blind to the gaps (a control); "
        "oracle: the prompts whose rollouts exploit the reward's flaw (needs its per-sample flaw_bonus: "
        "local trainer only); all: every prompt at weight rho",
    )
    force_discriminator: bool = _setting(False, help="use a discriminator whose held-out AUROC is below 0.6")

    def __post_init__(self) -> None:
        if not self.stages:
            raise ValueError("stages: at least one stage is required")
        choices = {"transform": SHAPING_TRANSFORMS, "missing_expert": MISSING_EXPERT, "selection": SELECTIONS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}: {getattr(self, name)!r} is not one of {allowed}")
        for name in ("temperature", "eps", "shaping_floor"):  # NaN passes every comparison below
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ValueError(f"{name} must be finite, got {value}")
        if not 0 < self.eps < 0.5 or (self.temperature is not None and self.temperature <= 0):
            raise ValueError("eps must be in (0, 0.5) and temperature > 0 (or null)")
        # The floor bounds the negative tail (log and logit reach log(eps)); at or above 0 it would turn every
        # `log` signal (s <= 0) into one constant.
        if self.shaping_floor is not None and self.shaping_floor >= 0:
            raise ValueError(f"shaping_floor must be < 0 (or null), got {self.shaping_floor}")
        for i, stage in enumerate(self.stages):
            if stage.lam > 0 and stage.rho == 0:
                raise ValueError(f"stages[{i}] has lam {stage.lam} but rho 0: no prompt can be anchored")
        self.schedule()  # end steps positive and increasing

    @property
    def uses_critic(self) -> bool:
        """Whether any stage needs the discriminator's scores (shaping, anchors or adaptive lambda)."""
        return any(s.lam > 0 or s.alpha > 0 for s in self.stages) or self.adaptive is not None

    def schedule(self) -> StageSchedule:
        """A fresh stage schedule (it holds the adaptive lambda's state)."""
        adaptive = AdaptiveLambda(**dataclasses.asdict(self.adaptive)) if self.adaptive else None
        return StageSchedule(list(self.stages), adaptive, self.chord)


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp)).replace("NoneType", "null")


def convert(value, tp, where: str):
    """Check `value` against the annotation `tp`, building nested dataclasses; raise naming `where`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return convert(value, option, where)
            except ConfigError as exc:
                errors.append(str(exc))
        names = " or ".join(_type_name(o) for o in options)
        if len(errors) == 1:
            raise ConfigError(errors[0])
        raise ConfigError(f"{where}: expected {names}, got {type(value).__name__} {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        (item,) = typing.get_args(tp)
        return [convert(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return build(tp, value, where)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str) and FLOAT_RE.fullmatch(value.strip()):
        return float(value)  # PyYAML reads `1e-4` (no dot) as a string
    if tp in (dict, list) and isinstance(value, tp):
        return value
    if tp in (int, str, bool, float) and type(value) is tp:
        return value
    raise ConfigError(f"{where}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")


def build(cls, data, where: str):
    """`cls` from a mapping: unknown, missing and ill-typed keys are errors naming `where.key`."""
    at = f"{where}: " if where else ""  # the top level has no name of its own
    if not isinstance(data, dict):
        raise ConfigError(f"{at}expected a mapping, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{at}unknown key(s) {unknown}; allowed: {sorted(fields)}")
    missing = [
        name
        for name, f in fields.items()
        if name not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{at}missing required key(s) {missing}")
    kwargs = {k: convert(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{where or 'recipe'}: {exc}") from exc
