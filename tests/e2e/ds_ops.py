"""Build DeepSpeed's CPU ops (shm comm, fused Adam) once per venv into a private extensions directory.

DeepSpeed JIT-compiles them on first use inside every Ray worker. A compile killed midway leaves torch's
`lock` file behind and every later build waits on it forever, so builds run here first, serialised by an
flock (released by the kernel if a builder dies), and a stale `lock` found while holding it is removed.

    python tests/e2e/ds_ops.py [DIR]      # the e2e fixture calls build_ops(); this is the same, by hand
"""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
from pathlib import Path

OPS = ("ShareMemCommBuilder", "FusedAdamBuilder")
BUILD_TIMEOUT_S = 1800  # ~5 min on 2 idle cores; generous because CI machines are shared
# Loads each op with DeepSpeed's own builder, exactly as the training processes will.
BUILD_SCRIPT = """
import sys
from deepspeed.accelerator import get_accelerator
for name in sys.argv[1:]:
    get_accelerator().create_op_builder(name).load(verbose=False)
    print("built", name, flush=True)
"""


def default_dir() -> Path:
    """Next to the venv's interpreter: the ops' build flags hold the venv's paths, so another venv (a CI
    clone, new torch/deepspeed) would rebuild them anyway, and must not overwrite this one's."""
    return Path(sys.prefix) / "torch_extensions"


def build_ops(directory: Path | None = None, timeout_s: float = BUILD_TIMEOUT_S) -> Path:
    """Make sure the ops are built in `directory`; returns it (to pass on as TORCH_EXTENSIONS_DIR)."""
    directory = Path(directory or default_dir()).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    done = directory / ".built"
    with open(directory / ".build.flock", "w") as flock:
        fcntl.flock(flock, fcntl.LOCK_EX)  # another session building: wait for it, then reuse its build
        if done.exists():
            return directory
        for stale in directory.rglob("lock"):  # we hold the flock, so no live build owns these
            stale.unlink()
        print(f"building DeepSpeed CPU ops {OPS} into {directory} (once per venv; ~5 min on 2 cores)",
              file=sys.stderr, flush=True)
        env = {**os.environ, "DS_ACCELERATOR": "cpu", "TORCH_EXTENSIONS_DIR": str(directory)}
        # Its own session, so a timeout stops the compilers too, not only the Python that started them.
        proc = subprocess.Popen([sys.executable, "-c", BUILD_SCRIPT, *OPS], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            output, _ = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired as e:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            for stale in directory.rglob("lock"):
                stale.unlink()
            raise RuntimeError(
                f"building DeepSpeed's CPU ops took over {timeout_s:.0f} s and was stopped; rerun, or build "
                f"by hand with `python tests/e2e/ds_ops.py {directory}` to see the compiler") from e
        if proc.returncode != 0:
            raise RuntimeError(f"building DeepSpeed's CPU ops failed (exit {proc.returncode}); output:\n"
                               f"{output[-6000:]}")
        done.write_text(output)
    return directory


if __name__ == "__main__":
    print(build_ops(Path(sys.argv[1]) if len(sys.argv) > 1 else None))
