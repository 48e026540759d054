"""Runs an untrusted Python program: `run_python` (caller side) and the jail it launches (`__main__`).

As root the jail unshares mount, network, pid, IPC and UTS namespaces, hides everything but a fresh
tmpfs working directory behind a read-only view of the filesystem, then runs the program as a random
unprivileged uid with rlimits and no_new_privs. The uid matters: RLIMIT_NPROC never binds root, and a
root program could kill or write anything. Without namespaces (not root, or a container that forbids
them) only the rlimits, the process group and (as root) the uid apply, and `isolation_available()` says
so. This file runs as the jail with `python -I -S`, so it imports the standard library only.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

FILE_SIZE_MB = 16
PROCESSES = 8  # RLIMIT_AS is per process: a program may hold up to PROCESSES * memory_mb
OPEN_FILES = 64
TMPFS_MB = 64
OUTPUT_BYTES = 1 << 20
STDERR_BYTES = 8 << 10
JAIL_FAILED = 125  # exit status of the jail itself when it cannot set up

_CLONE_NEWNS, _CLONE_NEWUTS, _CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
_CLONE_NEWPID, _CLONE_NEWNET = 0x20000000, 0x40000000
_MS_NOSUID, _MS_NODEV, _MS_NOEXEC, _MS_BIND, _MS_MOVE, _MS_REC, _MS_PRIVATE = (
    2,
    4,
    8,
    4096,
    8192,
    16384,
    1 << 18,
)
_SYS_MOUNT_SETATTR, _AT_FDCWD, _AT_RECURSIVE = 442, -100, 0x8000
_MOUNT_ATTR_RDONLY, _MOUNT_ATTR_NOSUID = 1, 2
_PR_SET_PDEATHSIG, _PR_SET_NO_NEW_PRIVS = 1, 38


@dataclass
class RunResult:
    status: str  # "exited" (see returncode), "timeout", "output_limit" or "error" (the jail failed)
    returncode: int | None
    stdout: bytes
    stderr: bytes


def _environment(workdir: str) -> dict[str, str]:
    """The whole environment of the program: nothing of the caller's is passed on."""
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "HOME": workdir,
        "TMPDIR": workdir,
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


# Programs run on the base interpreter (standard library only), not the virtual environment: a venv may
# live under /tmp, which the jail hides, and model-written code has no business importing our packages.
PYTHON = os.path.realpath(sys.executable)


def _interpreter_paths() -> list[str]:
    """Directories the program's interpreter needs, which the jail makes reachable for its uid."""
    paths = sorted({sys.base_prefix, os.path.dirname(PYTHON)})
    return [p for p in paths if not any(p != q and p.startswith(q + os.sep) for q in paths)]


def _traversable(path: str) -> bool:
    """Whether every directory on the way to `path` lets any user through."""
    parts = os.path.realpath(path).split(os.sep)
    return all(os.stat(os.sep.join(parts[:i]) or os.sep).st_mode & 0o001 for i in range(1, len(parts) + 1))


def run_python(source: str, stdin: bytes, *, timeout: float, memory_mb: int, isolate: bool) -> RunResult:
    """Runs `source` as main.py with `stdin`, at most `timeout` wall seconds (the whole process group
    is then killed), returning at most OUTPUT_BYTES of stdout. `isolate` needs isolation_available()."""
    root = os.geteuid() == 0
    # A random uid per run: its process count, files and signals are this run's alone.
    uid = 10_000_000 + secrets.randbelow(1_000_000_000) if root else None
    if root and not isolate and not all(_traversable(p) for p in _interpreter_paths()):
        uid = None  # the interpreter is unreachable for other users and no mount namespace can fix it
    workdir = tempfile.mkdtemp(prefix="aapa-sandbox-")
    proc = None
    try:
        with open(os.path.join(workdir, "main.py"), "w", encoding="utf-8") as file:
            file.write(source)
        with open(os.path.join(workdir, "stdin"), "wb") as file:
            file.write(stdin)
        if uid is not None and not isolate:
            os.chown(workdir, uid, uid)
        config = {
            "isolate": isolate,
            "uid": uid,
            "python": PYTHON,
            "expose": _interpreter_paths(),
            "cpu_s": int(timeout) + 1,
            "memory_mb": memory_mb,
        }
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", os.path.abspath(__file__), json.dumps(config)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=workdir,
            env=_environment(workdir),
            start_new_session=True,
        )
        return _collect(proc, time.monotonic() + timeout)
    finally:
        if proc is not None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
            proc.stdout.close()
            proc.stderr.close()
        if uid is not None and not isolate:
            _kill_uid(uid)  # descendants that left the process group
        shutil.rmtree(workdir, ignore_errors=True)


def _collect(proc: subprocess.Popen, deadline: float) -> RunResult:
    out_fd, err_fd = proc.stdout.fileno(), proc.stderr.fileno()
    out, err = bytearray(), bytearray()
    poller = select.poll()
    for fd in (out_fd, err_fd):
        poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
    open_fds = 2
    while open_fds:
        left = deadline - time.monotonic()
        if left <= 0:
            return RunResult("timeout", None, bytes(out), bytes(err))
        for fd, _ in poller.poll(left * 1000):
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                poller.unregister(fd)
                open_fds -= 1
            elif fd == out_fd:
                out += chunk
                if len(out) > OUTPUT_BYTES:
                    return RunResult("output_limit", None, bytes(out[:OUTPUT_BYTES]), bytes(err))
            else:
                err += chunk[: max(0, STDERR_BYTES - len(err))]
    try:
        returncode = proc.wait(max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        return RunResult("timeout", None, bytes(out), bytes(err))
    if returncode == JAIL_FAILED and err.startswith(b"aapa-sandbox:"):
        return RunResult("error", returncode, bytes(out), bytes(err))
    return RunResult("exited", returncode, bytes(out), bytes(err))


def _kill_uid(uid: int) -> None:
    """SIGKILL every process of `uid`: kill(-1) from that uid reaches all of them atomically."""
    subprocess.run(
        [sys.executable, "-I", "-S", os.path.abspath(__file__), json.dumps({"sweep_uid": uid})],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={},
        timeout=60,
    )


_probe_lock = threading.Lock()
_probe: list[bool] = []


def isolation_available() -> bool:
    """Whether this process can run programs in namespaces (checked once, by running one)."""
    with _probe_lock:
        if not _probe:
            ok = False
            if os.geteuid() == 0 and sys.platform == "linux":
                result = run_python("print('ok')", b"", timeout=60, memory_mb=1024, isolate=True)
                ok = result.status == "exited" and result.returncode == 0 and result.stdout == b"ok\n"
                if not ok:
                    print(f"reward_fns: sandbox namespaces unavailable: {result}", file=sys.stderr)
            _probe.append(ok)
        return _probe[0]


# ---------------------------------------------------------------------------------------------- jail


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def _fork_and_relay() -> None:
    """Returns in the child; the parent waits for it and exits with its status."""
    pid = os.fork()
    if pid == 0:
        return
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    os._exit(code if code >= 0 else 128 - code)


def _mount(
    libc: ctypes.CDLL, source: str | None, target: str, fstype: str | None, flags: int, data: str = ""
) -> None:
    encode = lambda s: s.encode() if s is not None else None  # noqa: E731
    _check(
        libc.mount(encode(source), encode(target), encode(fstype), flags, encode(data) if data else None),
        f"mount {target}",
    )


def _set_mount_attr(libc: ctypes.CDLL, path: str, flags: int, set_attr: int, clear_attr: int) -> None:
    attr = (ctypes.c_uint64 * 4)(set_attr, clear_attr, 0, 0)
    result = libc.syscall(
        _SYS_MOUNT_SETATTR, _AT_FDCWD, path.encode(), flags, ctypes.byref(attr), ctypes.sizeof(attr)
    )
    _check(result, f"mount_setattr {path}")


def _build_filesystem(libc: ctypes.CDLL, config: dict) -> None:
    """Private mounts; interpreter reachable; fresh /proc, scratch dirs and tmpfs cwd; the rest read-only."""
    workdir = os.getcwd()
    _mount(libc, None, "/", None, _MS_REC | _MS_PRIVATE)
    moves = []
    for i, path in enumerate(config["expose"]):
        parts = path.split(os.sep)
        ancestors = [os.sep.join(parts[:k]) or os.sep for k in range(2, len(parts) + 1)]
        blocker = next((a for a in ancestors if not os.stat(a).st_mode & 0o001), None)
        if blocker is not None:
            stage = os.path.join(workdir, f".expose{i}")
            os.mkdir(stage)
            _mount(libc, path, stage, None, _MS_BIND | _MS_REC)
            moves.append((blocker, path, stage))
    for blocker in dict.fromkeys(blocker for blocker, _, _ in moves):
        _mount(libc, "tmpfs", blocker, "tmpfs", _MS_NOSUID | _MS_NODEV, "mode=755,size=1m")
    for _, path, stage in moves:
        os.makedirs(path, exist_ok=True)
        _mount(libc, stage, path, None, _MS_MOVE)
    _mount(libc, "proc", "/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)
    with open("main.py", "rb") as file:
        source = file.read()
    # Fresh, empty scratch directories hide the host's files and Unix sockets there (Ray's, Docker's):
    # a read-only mount does not stop connect() on a socket.
    for scratch in ("/tmp", "/var/tmp", "/dev/shm", "/run"):
        if os.path.isdir(scratch) and not os.path.islink(scratch):
            _mount(libc, "tmpfs", scratch, "tmpfs", _MS_NOSUID | _MS_NODEV, "mode=1777,size=1m")
    os.makedirs(workdir, exist_ok=True)  # when it lived under a scratch directory it is gone from view
    _mount(libc, "tmpfs", workdir, "tmpfs", _MS_NOSUID | _MS_NODEV, f"size={TMPFS_MB}m,mode=700")
    os.chdir(workdir)
    with open("main.py", "wb") as file:
        file.write(source)
    if config["uid"] is not None:
        for path in (workdir, "main.py"):
            os.chown(path, config["uid"], config["uid"])
    _set_mount_attr(libc, "/", _AT_RECURSIVE, _MOUNT_ATTR_RDONLY | _MOUNT_ATTR_NOSUID, 0)
    _set_mount_attr(libc, workdir, 0, 0, _MOUNT_ATTR_RDONLY)


def _jail(config: dict) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if "sweep_uid" in config:
        os.setgroups([])
        os.setresgid(config["sweep_uid"], config["sweep_uid"], config["sweep_uid"])
        os.setresuid(config["sweep_uid"], config["sweep_uid"], config["sweep_uid"])
        os.kill(-1, signal.SIGKILL)  # every process of this uid but the caller
        return
    try:
        stdin = os.open("stdin", os.O_RDONLY)
        os.dup2(stdin, 0)
        os.close(stdin)
        if config["isolate"]:
            _check(
                libc.unshare(_CLONE_NEWNS | _CLONE_NEWNET | _CLONE_NEWPID | _CLONE_NEWIPC | _CLONE_NEWUTS),
                "unshare",
            )
            _fork_and_relay()  # the child is pid 1 of the new pid namespace
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            _build_filesystem(libc, config)
            _fork_and_relay()  # when pid 1 exits, the kernel kills whatever is left in the namespace
        memory = config["memory_mb"] << 20
        for limit, value in (
            (resource.RLIMIT_CPU, (config["cpu_s"], config["cpu_s"] + 1)),
            (resource.RLIMIT_AS, (memory, memory)),
            (resource.RLIMIT_FSIZE, (FILE_SIZE_MB << 20,) * 2),
            (resource.RLIMIT_NPROC, (PROCESSES, PROCESSES)),
            (resource.RLIMIT_NOFILE, (OPEN_FILES, OPEN_FILES)),
            (resource.RLIMIT_CORE, (0, 0)),
        ):
            resource.setrlimit(limit, value)
        uid = config["uid"]
        if uid is not None:
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
        _check(libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except Exception as exc:
        os.write(2, f"aapa-sandbox: {exc!r}\n".encode())
        os._exit(JAIL_FAILED)
    os.execve(config["python"], [config["python"], "-I", "main.py"], dict(os.environ))


if __name__ == "__main__":
    _jail(json.loads(sys.argv[1]))
