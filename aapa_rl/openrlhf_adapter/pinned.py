"""Importing this module checks that the installed OpenRLHF is the one the adapter hooks into.

The adapter relies on OpenRLHF internals (see tests/test_openrlhf_contract.py), so the modules that use them
(ppo_trainer, ppo_actor, launch, recipe) refuse any other version; the package itself and its `aapa-rl
launch` command line load without OpenRLHF, so the other `aapa-rl` commands work whatever is installed.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

OPENRLHF_VERSION = "0.11.2"

try:
    _installed = version("openrlhf")
except PackageNotFoundError:
    _installed = None
if _installed != OPENRLHF_VERSION:
    raise ImportError(
        f"aapa-rl's OpenRLHF adapter needs openrlhf=={OPENRLHF_VERSION} exactly "
        "(it hooks into its internals), "
        f"but found {_installed or 'no openrlhf'}. Install it with "
        f"`pip install --no-deps openrlhf=={OPENRLHF_VERSION}` (see README)."
    )
