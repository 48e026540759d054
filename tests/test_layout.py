"""Architecture rules that code review alone would let slip."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LOCAL_COMMANDS = (
    "train",
    "eval",
    "analyze",
    "discriminator",
    "generate",
    "build-experts",
    "prepare-data",
    "launch",
    "trl",
)


def _imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("framework, backend", [("openrlhf", "openrlhf_adapter"), ("trl", "trl_backend")])
def test_only_its_backend_imports_a_framework(framework, backend):
    offenders = [
        str(path.relative_to(ROOT))
        for folder in ("aapa_rl", "reward_fns", "bench")
        for path in (ROOT / folder).rglob("*.py")
        if ROOT / "aapa_rl" / backend not in path.parents
        and any(name.split(".")[0] == framework for name in _imported_modules(path))
    ]
    assert not offenders, f"only aapa_rl/{backend} may import {framework}: {offenders}"


def test_core_modules_load_without_the_frameworks():
    code = (
        "import sys, aapa_rl.objectives, aapa_rl.schedule, aapa_rl.cli; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'openrlhf', 'trl'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _fake_openrlhf(site: Path, kind: str) -> None:
    """An `openrlhf` earlier on sys.path: one that cannot be imported, or an installed other version."""
    (site / "openrlhf").mkdir(parents=True)
    if kind == "unimportable":
        (site / "openrlhf" / "__init__.py").write_text("raise ModuleNotFoundError('no openrlhf here')\n")
    else:
        (site / "openrlhf" / "__init__.py").write_text("")
        (site / "openrlhf-0.10.0.dist-info").mkdir()
        (site / "openrlhf-0.10.0.dist-info" / "METADATA").write_text("Name: openrlhf\nVersion: 0.10.0\n")


@pytest.mark.parametrize("kind", ["unimportable", "another version"])
def test_local_commands_work_without_the_pinned_openrlhf(tmp_path, kind):
    """The local trainer, data pipeline and discriminator never need OpenRLHF; `launch` says what is wrong."""
    site = tmp_path / "site"
    _fake_openrlhf(site, kind)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(site), str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }

    def aapa_rl(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "aapa_rl.cli", *args],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
        )

    # Every command's --help in one process (each would pay the imports again).
    helps = [["--help"], *[[name, "--help"] for name in LOCAL_COMMANDS]]
    code = (
        "import contextlib, io\nfrom aapa_rl.cli import main\n"
        f"for command in {helps!r}:\n"
        "    out = io.StringIO()\n"
        "    with contextlib.redirect_stdout(out):\n"
        "        try:\n            main(command)\n"
        "        except SystemExit as e:\n            assert e.code == 0, (command, e.code)\n"
        "    assert 'usage:' in out.getvalue(), command\n"
        "print('all helps')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert result.returncode == 0 and "all helps" in result.stdout, result.stderr[-2000:]
    recipe = ROOT / "configs" / "demo-sft.yaml"
    overrides = ["steps=1", "aapa.stages.0.end_step=1", "task.n_sft=64", "task.n_train=8", "task.n_eval=4",
                 "log.eval_samples=4", "log.plots=false"]
    sets = [token for item in overrides for token in ("--set", item)]
    result = aapa_rl("train", "--config", str(recipe), "--out", str(tmp_path / "run"), "--no-progress", *sets)
    assert result.returncode == 0 and (tmp_path / "run" / "summary.json").exists(), result.stderr[-2000:]
    result = aapa_rl("launch", "--config", str(ROOT / "configs" / "qwen3-0.6b-grpo.yaml"), "--dry-run")
    expected = "openrlhf/cli/train_ppo_ray.py" if kind == "unimportable" else "needs openrlhf==0.11.2"
    assert result.returncode == 2 and expected in result.stdout + result.stderr  # a message, not a traceback
    assert "Traceback" not in result.stdout + result.stderr
