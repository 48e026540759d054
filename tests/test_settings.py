"""The AAPA settings are one schema: every backend spells the same keys with the same defaults, and the docs
list them all."""

from __future__ import annotations

import dataclasses
import json
import re
import typing
from pathlib import Path

import pytest

from aapa_rl.local.recipe import Recipe, load_recipe
from aapa_rl.openrlhf_adapter.settings import parser, split_argv
from aapa_rl.schedule import Stage
from aapa_rl.settings import AapaSettings, ConfigError, build

ROOT = Path(__file__).resolve().parents[1]
FIELDS = [f.name for f in dataclasses.fields(AapaSettings)]


def test_every_backend_spells_the_same_settings(tmp_path):
    assert typing.get_type_hints(Recipe)["aapa"] is AapaSettings  # the local recipe's `aapa:` section
    flags = [a.dest.removeprefix("aapa.") for a in parser()._actions]
    assert flags == [*FIELDS, "score_on"]  # OpenRLHF: one --aapa.<key> per field, plus its own score_on

    stages = [{"end_step": 5, "objective": "grpo", "alpha": 0.5}]
    from_flags, score_on, _ = split_argv(["--aapa.discriminator", str(tmp_path), "--aapa.stages",
                                          json.dumps(stages)])
    recipe = {"out": str(tmp_path / "run"), "steps": 5, "task": {},
              "aapa": {"stages": stages, "discriminator": str(tmp_path)}}
    from_recipe = load_recipe(None, base=recipe).aapa
    expected = AapaSettings(stages=[Stage(5, "grpo", alpha=0.5)], discriminator=str(tmp_path))
    assert from_flags == from_recipe == expected and score_on == "actors"


def test_the_docs_list_every_setting():
    text = (ROOT / "docs" / "settings.md").read_text()
    table = text[text.index("| key | default | meaning |") : text.index("Backend-only settings")]
    assert re.findall(r"^\| `(\w+)` \|", table, re.M) == FIELDS


def test_shaping_floor_must_be_negative():
    stages = [Stage(5, "grpo", alpha=0.5)]
    assert AapaSettings(stages=stages, shaping_floor=-2.0).shaping_floor == -2.0
    for bad in (0.0, 1.0):
        with pytest.raises(ValueError, match="shaping_floor must be < 0"):
            AapaSettings(stages=stages, shaping_floor=bad)


@pytest.mark.parametrize(
    "aapa, message",
    [
        ({"temperature": float("nan")}, r"^aapa: temperature must be finite, got nan"),
        ({"temperature": float("inf")}, r"^aapa: temperature must be finite, got inf"),
        ({"shaping_floor": float("nan")}, r"^aapa: shaping_floor must be finite, got nan"),
        ({"shaping_floor": float("-inf")}, r"^aapa: shaping_floor must be finite, got -inf"),
        ({"eps": float("nan")}, r"^aapa: eps must be finite, got nan"),
        ({"adaptive": {"target_gap": float("nan")}}, r"^aapa.adaptive: .* target_gap must be finite"),
        ({"adaptive": {"target_gap": 0.5, "lam_max": float("inf")}}, r"^aapa.adaptive: .* lam_max must be"),
        ({"stages": [{"end_step": 5, "objective": "grpo", "lam": float("nan"), "rho": 0.5}]},
         r"^aapa.stages\[0\]: stage lam must be finite, got nan"),
        ({"stages": [{"end_step": 5, "objective": "grpo", "alpha": float("inf")}]},
         r"^aapa.stages\[0\]: stage alpha must be finite, got inf"),
    ],
)
def test_non_finite_settings_are_refused_naming_the_key(aapa, message):
    """NaN passes every range check (all its comparisons are false), so it is refused by name first."""
    data = {"stages": [{"end_step": 5, "objective": "grpo", "alpha": 0.5}]} | aapa
    with pytest.raises(ConfigError, match=message):
        build(AapaSettings, data, "aapa")


def test_openrlhf_refuses_the_oracle_selection(tmp_path):
    """The oracle needs the reward's per-sample flaw_bonus when it selects; only the local trainer has it."""
    stages = json.dumps([{"end_step": 5, "objective": "grpo", "lam": 0.5, "rho": 0.25}])
    flags = ["--aapa.discriminator", str(tmp_path), "--aapa.stages", stages, "--aapa.selection"]
    assert split_argv([*flags, "all"])[0].selection == "all"
    with pytest.raises(ValueError, match="oracle needs a reward that reports a per-sample `flaw_bonus`"):
        split_argv([*flags, "oracle"])
