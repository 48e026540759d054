"""Architecture rules that code review alone would let slip."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ADAPTER = ROOT / "aapa_rl" / "openrlhf_adapter"


def _imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_only_the_adapter_imports_openrlhf():
    offenders = [
        str(path.relative_to(ROOT))
        for folder in ("aapa_rl", "reward_fns", "bench")
        for path in (ROOT / folder).rglob("*.py")
        if ADAPTER not in path.parents
        and any(name.split(".")[0] == "openrlhf" for name in _imported_modules(path))
    ]
    assert not offenders, f"only aapa_rl/openrlhf_adapter may import openrlhf: {offenders}"


def test_core_modules_load_without_openrlhf():
    code = (
        "import sys, aapa_rl.objectives, aapa_rl.schedule, aapa_rl.cli; "
        "print(any(m.split('.')[0] == 'openrlhf' for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
