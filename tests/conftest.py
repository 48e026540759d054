"""Stand-ins for the GPU-only packages `vllm` and `flash_attn`, only when they are not installed.

OpenRLHF imports them at module level; on a GPU machine the real packages are used and the same
suite runs unchanged. Never stand in for openrlhf, torch, deepspeed or ray.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from importlib.machinery import ModuleSpec
from unittest.mock import MagicMock

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
    module.__getattr__ = lambda attr: MagicMock(name=f"{name}.{attr}")
    return module


for package, names in GPU_ONLY_MODULES.items():
    if importlib.util.find_spec(package) is None:
        for name in names:
            sys.modules.setdefault(name, _stand_in(name))
