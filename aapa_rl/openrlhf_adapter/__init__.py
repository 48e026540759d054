"""The OpenRLHF adapter: the only package of aapa-rl that imports openrlhf.

It relies on OpenRLHF internals (see tests/test_openrlhf_contract.py), so it refuses to load against any
version other than the one it was written and tested for.
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
