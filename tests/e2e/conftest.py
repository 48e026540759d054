"""Session fixtures of the e2e suite: DeepSpeed's CPU ops, the tiny assets, a Ray cluster, the runs.

Ray starts here with logical GPUs (OpenRLHF asks for `num_gpus=1` per rank and engine; nothing uses a
device) and every process it or a launch starts carries a session marker in its environment, so teardown
finds leftovers by PID and fails the session if any survives.
"""

from __future__ import annotations

import os
import shutil
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402
from ds_ops import build_ops  # noqa: E402


@pytest.fixture(scope="session")
def extensions_dir() -> Path:
    return build_ops(os.environ.get("AAPA_E2E_EXTENSIONS_DIR"))


@pytest.fixture(scope="session")
def assets(tmp_path_factory) -> harness.Assets:
    return harness.build_assets(tmp_path_factory.mktemp("assets"))


@pytest.fixture(scope="session")
def ray_address(extensions_dir: Path) -> Iterator[str]:
    import ray

    marker = uuid.uuid4().hex
    saved = dict(os.environ)
    # The daemons inherit this environment, and every worker theirs: stand-ins, CPU ops, the marker.
    os.environ.update(harness.worker_env(marker, extensions_dir))
    os.environ.pop("RAY_ADDRESS", None)  # a cluster of its own, not another job's
    try:
        context = ray.init(
            address="local", num_cpus=16, num_gpus=8, include_dashboard=False, log_to_driver=False
        )
        yield context.address_info["gcs_address"]
    finally:
        ray.shutdown()
        os.environ.clear()
        os.environ.update(saved)
        harness.kill_pids(harness.marked_pids(marker))
        left = [pid for pid in harness.marked_pids(marker) if harness.alive(pid)]
        assert not left, f"processes outlived the e2e session: {left}"


@pytest.fixture(scope="session")
def run_layout(ray_address: str, assets: harness.Assets, tmp_path_factory) -> Callable[..., harness.Run]:
    """`run_layout(layout, *extra, name=..., resume=run)`: launch once per name in the session, then reuse
    the result. `resume` starts from a copy of that run's checkpoints, which stay as they were."""
    done: dict[str, harness.Run] = {}

    def run(layout: str, *extra: str, name: str | None = None,
            resume: harness.Run | None = None) -> harness.Run:
        name = name or layout
        if name not in done:
            out = tmp_path_factory.mktemp(name)
            flags = [*assets.flags(), *harness.LAYOUTS[layout], *extra]
            if resume is not None:
                shutil.copytree(resume.ckpt, out / "ckpt")
                flags.append("--ckpt.load_enable")
            done[name] = harness.launch(out, ray_address, flags)
            result = done[name]
            print(f"\n[e2e] {name}: exit {result.returncode} in {result.seconds:.0f} s, log {out}/launch.log")
        return done[name]

    return run
