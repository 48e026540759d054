"""`aapa-rl` command line: each feature module registers its own subcommands."""

from __future__ import annotations

import argparse
import importlib
import sys

from aapa_rl.data.rows import DataError
from reward_fns.combine import RewardError

# Modules exposing `add_commands(subparsers)`; each subcommand sets `func(args) -> int`.
COMMAND_MODULES: list[str] = [
    "aapa_rl.data.cli", "aapa_rl.anchor.cli", "aapa_rl.openrlhf_adapter.cli", "aapa_rl.local.cli",
    "aapa_rl.models", "aapa_rl.trl_backend.cli",
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="aapa-rl", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_commands(subparsers)
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except (DataError, FileNotFoundError, RewardError) as e:
        # Bad input data, a missing user path or a reward that broke its contract: its one-line message (file,
        # row, field; the reward), not a traceback. Other exceptions are bugs and keep theirs.
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
