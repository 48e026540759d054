"""Stand-ins for the GPU-only packages `vllm` and `flash_attn`, only when they are not installed.

OpenRLHF imports them at module level; on a GPU machine the real packages are used and the same
suite runs unchanged. Never stand in for openrlhf, torch, deepspeed or ray.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import types
from importlib.machinery import ModuleSpec
from unittest.mock import MagicMock

import pytest

GPU_ONLY_MODULES = {
    "vllm": ["vllm", "vllm.inputs", "vllm.utils"],
    "flash_attn": [
        "flash_attn",
        "flash_attn.bert_padding",
        "flash_attn.utils",
        "flash_attn.utils.distributed",
    ],
}


def _stand_in(name: str) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__spec__ = ModuleSpec(name, None)
    module.__path__ = []
    module.__stand_in__ = True
    module.__getattr__ = lambda attr: MagicMock(name=f"{name}.{attr}")
    return module


for package, names in GPU_ONLY_MODULES.items():
    if importlib.util.find_spec(package) is None:
        for name in names:
            sys.modules.setdefault(name, _stand_in(name))


@contextlib.contextmanager
def gpu_stand_ins_hidden():
    """Hide the stand-ins while a library that probes for vLLM or flash-attn as it loads (TRL) is imported:
    it must find them absent, as on a CPU machine, not half-present."""
    hidden = {
        name: sys.modules.pop(name)
        for name in [n for n, m in sys.modules.items() if getattr(m, "__dict__", {}).get("__stand_in__")]
    }
    try:
        yield
    finally:
        sys.modules.update(hidden)


@pytest.fixture(autouse=True)
def environment_restored():
    """What a test sets in os.environ in-process (the bench entry points pin torch's CPU kernels) must not
    reach the subprocesses of the next tests in the same worker: on an AVX-512 CPU they would round apart."""
    saved = os.environ.copy()
    yield
    if os.environ != saved:
        os.environ.clear()
        os.environ.update(saved)
