"""Recipe validation: every problem is reported, naming the key or the path, before any work starts."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from aapa_rl.local.recipe import RecipeError, load_recipe

REPO = Path(__file__).resolve().parents[1]
MINIMAL = {"out": "runs/x", "steps": 3, "task": {}, "aapa": {"stages": [{"end_step": 3, "objective": "sft"}]}}
GRPO = {"stages": [{"end_step": 3, "objective": "grpo"}]}


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_minimal_recipe_and_overrides(tmp_path):
    recipe = load_recipe(
        _write(tmp_path, MINIMAL),
        [
            "optim.lr=2e-4",
            "aapa.stages.0.rho=0.5",
            "rollout.top_k=5",
            "aapa.temperature=null",
            "log.plots=false",
        ],
    )
    assert recipe.optim.lr == 2e-4 and recipe.stages[0].rho == 0.5 and recipe.rollout.top_k == 5
    assert recipe.task.flawed_fraction == 0.05 and recipe.log.plots is False
    assert recipe.optim.beta1 == 0.9  # defaults filled in


@pytest.mark.parametrize(
    "data,overrides,message",
    [
        ({**MINIMAL, "optimizer": {}}, [], r"recipe.yaml: unknown key\(s\) \['optimizer'\]"),  # no ": :"
        (MINIMAL, ["optim.learning_rate=1"], r"optim: unknown key\(s\) \['learning_rate'\]"),
        (MINIMAL, ["optim.lr=fast"], r"optim.lr: expected float, got str 'fast'"),
        (MINIMAL, ["steps=2.5"], r"steps: expected int, got float"),
        (MINIMAL, ["rollout=8"], r"rollout: expected a mapping"),
        (MINIMAL, ["aapa.stages.0.objective=ppo"], r"aapa.stages\[0\]: stage objective 'ppo' is not one of"),
        (MINIMAL, ["aapa.stages.3.lam=1"], r"'3' is not an index of aapa.stages"),
        (MINIMAL, ["aapa.stages.0.end_step"], r"expected key=value"),
        ({k: v for k, v in MINIMAL.items() if k != "steps"}, [], r"missing required key\(s\) \['steps'\]"),
        (
            MINIMAL,
            ["aapa.stages.0.alpha=0.5"],
            r"aapa.discriminator: stages with lam > 0 or alpha > 0 .*need one",
        ),
        (MINIMAL, ["model.path=/no/such/model"], r"model.path: file or directory not found: /no/such/model"),
        (
            MINIMAL,
            ["aapa.discriminator=/no/such/disc", "aapa.stages.0.lam=1", "aapa.stages.0.rho=0.5"],
            r"aapa.discriminator: .*not found",
        ),
        (
            MINIMAL,
            ["aapa.stages.0.lam=1"],
            r"aapa: stages\[0\] has lam 1.0 but rho 0: no prompt can be anchored",
        ),
        (
            MINIMAL,
            ["aapa.selection=best"],
            r"aapa: selection: 'best' is not one of \('gap', 'random', 'oracle', 'all'\)",
        ),
        (MINIMAL, ["aapa.chord.peak=2"], r"aapa.chord: chord needs 0 <= valley <= peak <= 1"),
        (MINIMAL, ["data.train=/no/such.jsonl"], r"data.train: the arithmetic task generates its own data"),
        (MINIMAL, ["task.flaw=typo"], r"task: task.flaw must be one of"),
        (MINIMAL, ["loss.estimator=gae"], r"loss.estimator: 'gae' is not one of"),
        (MINIMAL, ["rollout.group_size=1"], r"rollout.group_size must be >= 2"),
        (MINIMAL, ["rollout.top_k=-1"], r"rollout.top_k must be >= 0 \(0: off\), got -1"),
        (MINIMAL, ["rollout.top_p=0"], r"rollout.top_p must be in \(0, 1\], got 0"),
        (MINIMAL, ["rollout.top_p=1.5"], r"rollout.top_p must be in \(0, 1\], got 1.5"),
        (MINIMAL, ["optim.grad_clip=-1.0"], r"optim.grad_clip must be >= 0 \(0: no clipping\), got -1.0"),
        (MINIMAL, ["optim.grad_clip=.nan"], r"optim.grad_clip must be >= 0 .*got nan"),
        (MINIMAL, ["optim.lr=0.0"], r"optim.lr must be a finite number > 0, got 0.0"),
        (MINIMAL, ["optim.lr=-1e-4"], r"optim.lr must be a finite number > 0, got -0.0001"),
        (MINIMAL, ["optim.lr=.nan"], r"optim.lr must be a finite number > 0, got nan"),
        (
            {**MINIMAL, "task": None, "reward": "math", "aapa": GRPO},
            [],
            r"data.train: RL stages need a prompt file",
        ),
        (
            {
                **MINIMAL,
                "task": None,
                "data": {"train": "/no/such.jsonl"},
                "reward": "math",
                "aapa": GRPO,
            },
            [],
            r"data.train: file or directory not found",
        ),
        (
            {**MINIMAL, "task": None, "data": {"sft": __file__}, "reward": "no_such_reward"},
            [],
            r"reward: unknown reward function .no_such_reward.; available: code, format, ifeval, math",
        ),
        (
            MINIMAL,
            ["aapa.stages=[{end_step: 3, objective: sft}, {end_step: 2, objective: grpo}]"],
            r"aapa: stage end steps must be positive and strictly increasing, got \[3, 2\]",
        ),
    ],
)
def test_bad_recipes_name_the_key(tmp_path, data, overrides, message):
    path = _write(tmp_path, data)
    with pytest.raises(RecipeError, match=message) as err:
        load_recipe(path, overrides)
    assert str(path) in str(err.value)


def test_every_selection_and_a_reward_file_on_the_task_are_accepted(tmp_path):
    for selection in ("gap", "random", "oracle", "all"):
        recipe = load_recipe(_write(tmp_path, MINIMAL), [f"aapa.selection={selection}"])
        assert recipe.aapa.selection == selection
    # The task writes the data; a reward file of one's own replaces the task's reward (bench/flaws).
    reward = str(REPO / "bench" / "flaws" / "repeat_on_mul.py")
    assert load_recipe(_write(tmp_path, {**MINIMAL, "reward": reward, "aapa": GRPO})).reward == reward


def test_a_reward_file_that_fails_to_import_is_named(tmp_path, capsys):
    """Whatever a reward file raises at import (not only ValueError/ImportError) is a recipe error naming
    the file and the exception, not a traceback."""
    from aapa_rl.cli import main

    for stem, source, message in [
        ("raises", "raise RuntimeError('boom at import')\n", r"RuntimeError: boom at import"),
        ("syntax", "def batch_reward(responses, labels)\n    return 1\n", r"SyntaxError: .*syntax.py"),
        ("keyerror", "{}['x']\n", r"KeyError: 'x'"),
    ]:
        reward = tmp_path / f"{stem}.py"
        reward.write_text(source)
        path = _write(tmp_path, {**MINIMAL, "reward": str(reward), "aapa": GRPO})
        with pytest.raises(RecipeError, match=rf"reward: {reward}: cannot be loaded: {message}"):
            load_recipe(path)
        assert main(["train", "--config", str(path)]) == 2
        err = capsys.readouterr().err
        assert f"{reward}: cannot be loaded" in err and "Traceback" not in err


def test_renamed_keys_still_work_with_a_message(tmp_path, capsys):
    old = {
        **{k: v for k, v in MINIMAL.items() if k != "aapa"},
        "stages": [{"end_step": 3, "objective": "chord"}],
        "adaptive": {"target_gap": 1.0},
        "loss": {"chord_peak": 0.5, "chord_phi": False, "anchor_phi": True},
        "aapa": {"force": True, "discriminator": str(tmp_path)},
    }
    recipe = load_recipe(_write(tmp_path, old))
    a = recipe.aapa
    assert a.stages[0].objective == "chord" and a.adaptive.target_gap == 1.0 and a.force_discriminator
    assert a.chord.peak == 0.5 and a.chord.phi is False and a.anchor_phi is True
    err = capsys.readouterr().err
    for old_key, new_key in [
        ("stages", "aapa.stages"),
        ("loss.chord_peak", "aapa.chord.peak"),
        ("aapa.force", "aapa.force_discriminator"),
    ]:
        assert f"deprecated: recipe key {old_key} is now {new_key}" in err
    both = {**MINIMAL, "stages": MINIMAL["aapa"]["stages"]}
    with pytest.raises(
        RecipeError, match="stages and aapa.stages are the same setting; keep only aapa.stages"
    ):
        load_recipe(_write(tmp_path, both))


def test_missing_or_broken_recipe_file(tmp_path):
    with pytest.raises(RecipeError, match="recipe file not found: .*nope.yaml"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [1,\n")
    with pytest.raises(RecipeError, match="bad.yaml: not valid YAML"):
        load_recipe(bad)


def test_shipped_demo_recipes_validate(tmp_path):
    load_recipe(REPO / "configs" / "demo-sft.yaml")
    (tmp_path / "disc").mkdir()
    (tmp_path / "model").mkdir()
    for name in ("demo-grpo.yaml", "demo-grpo-aapa.yaml"):
        recipe = load_recipe(
            REPO / "configs" / name,
            [f"model.path={tmp_path / 'model'}", f"aapa.discriminator={tmp_path / 'disc'}"],
        )
        assert recipe.stages[-1].objective == "grpo" and recipe.aapa.discriminator


def test_cli_reports_recipe_errors_without_traceback(tmp_path, capsys):
    from aapa_rl.cli import main

    path = _write(tmp_path, {**MINIMAL, "optimizer": {}})
    assert main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "unknown key(s) ['optimizer']" in err and "Traceback" not in err


def test_bad_override_value_or_encoding_names_the_source(tmp_path, capsys):
    path = _write(tmp_path, MINIMAL)
    with pytest.raises(RecipeError, match=r"--set 'optim.lr=\[': the value is not valid YAML"):
        load_recipe(path, ["optim.lr=["])
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(b"steps: 3\n# caf\xe9\n")
    with pytest.raises(RecipeError, match="latin1.yaml: not valid YAML: 'utf-8' codec can't decode"):
        load_recipe(latin1)
    from aapa_rl.cli import main

    assert main(["train", "--config", str(path), "--set", "optim.lr=["]) == 2
    assert "--set 'optim.lr=['" in capsys.readouterr().err
