"""Runs an untrusted Python program: `run_python` (caller side) and the jail it launches (`__main__`).

Limits count the program's own work: the jail forks the program after its set-up, and a watcher process
(root, outside the program's reach) starts the program's CPU budget and its wall-clock safety net when
the program's interpreter reports that it is up, so neither the jail nor interpreter start nor waiting
for a core on a busy machine costs the program anything. At most CONCURRENCY programs run at once in a
process (`AAPA_CODE_CONCURRENCY`, default: the usable cores); further calls queue, uncounted.

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
import math
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
SETUP_WALL_S = 60.0  # the caller's allowance for jail set-up and interpreter start, on top of the wall limit
STARTUP_CPU_S = 10.0  # CPU an interpreter may use before it reports (only a broken one comes near)
POLL_S = 0.01  # the watcher's period: how far past its CPU budget a program can get

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
    # "exited" (see returncode), "cpu_timeout", "wall_timeout", "output_limit" or "error" (the jail failed
    # or was killed from outside)
    status: str
    returncode: int | None
    stdout: bytes
    stderr: bytes
    cpu_s: float | None = None  # the program's CPU time, from its start to its end (when it was watched)


def _concurrency() -> int:
    value = os.environ.get("AAPA_CODE_CONCURRENCY", "")
    if not value:
        return len(os.sched_getaffinity(0))
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"AAPA_CODE_CONCURRENCY must be a positive integer, got {value!r}")
    return int(value)


CONCURRENCY = _concurrency()
_slots = threading.BoundedSemaphore(CONCURRENCY)


def _fresh_slots() -> None:
    """In a forked child the parent's threads, and the slots they held, are gone."""
    global _slots
    _slots = threading.BoundedSemaphore(CONCURRENCY)


os.register_at_fork(after_in_child=_fresh_slots)

# Runs in the program's interpreter before the program: reports its CPU time so far (interpreter start)
# on the watcher's pipe and closes it, then runs main.py as __main__ the way `python main.py` would.
_LAUNCHER = """\
def _load():
    import os, sys, time
    os.write(int(sys.argv[1]), repr(time.process_time()).encode())
    os.close(int(sys.argv[1]))
    sys.argv[:] = sys.argv[2:]
    del globals()["_load"]
    with open(sys.argv[0], "rb") as file:
        return compile(file.read(), sys.argv[0], "exec")
__file__ = "main.py"
exec(_load())
"""


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


def run_python(
    source: str, stdin: bytes, *, timeout: float, wall_timeout: float, memory_mb: int, isolate: bool
) -> RunResult:
    """Runs `source` as main.py with `stdin` for at most `timeout` seconds of its own CPU time and
    `wall_timeout` seconds from its start (the whole process group is then killed), returning at most
    OUTPUT_BYTES of stdout. Waits for one of CONCURRENCY slots first. `isolate` needs
    isolation_available()."""
    with _slots:
        return _run(source, stdin, timeout, wall_timeout, memory_mb, isolate)


def _run(
    source: str, stdin: bytes, timeout: float, wall_timeout: float, memory_mb: int, isolate: bool
) -> RunResult:
    root = os.geteuid() == 0
    # A random uid per run: its process count, files and signals are this run's alone.
    uid = 10_000_000 + secrets.randbelow(1_000_000_000) if root else None
    if root and not isolate and not all(_traversable(p) for p in _interpreter_paths()):
        uid = None  # the interpreter is unreachable for other users and no mount namespace can fix it
    workdir = tempfile.mkdtemp(prefix="aapa-sandbox-")
    proc = None
    verdict_r, verdict_w = os.pipe()
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
            "cpu_s": timeout,
            "wall_s": wall_timeout,
            "memory_mb": memory_mb,
            "verdict_fd": verdict_w,
        }
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", os.path.abspath(__file__), json.dumps(config)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=workdir,
            env=_environment(workdir),
            start_new_session=True,
            pass_fds=(verdict_w,),
        )
        os.close(verdict_w)
        verdict_w = -1
        result = _collect(proc, time.monotonic() + wall_timeout + SETUP_WALL_S)
        return _with_verdict(result, verdict_r)
    finally:
        os.close(verdict_r)
        if verdict_w >= 0:
            os.close(verdict_w)
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


def _with_verdict(result: RunResult, verdict_fd: int) -> RunResult:
    """The watcher's word on which limit fired; without one, the jail failed or was killed."""
    if result.status != "exited":
        return result
    os.set_blocking(verdict_fd, False)
    try:
        verdict = json.loads(os.read(verdict_fd, 4096))
    except (BlockingIOError, ValueError):
        verdict = None
    if verdict is None or (result.returncode == JAIL_FAILED and result.stderr.startswith(b"aapa-sandbox:")):
        result.status = "error"
    else:
        result.cpu_s = verdict["cpu_s"]
        if verdict["limit"] is not None:
            result.status = f"{verdict['limit']}_timeout"
    return result


def _drain(fd: int) -> tuple[bytes, bool]:
    """What a non-blocking pipe holds now (at most OUTPUT_BYTES + 1), and whether it reached EOF."""
    data = bytearray()
    while len(data) <= OUTPUT_BYTES:
        try:
            chunk = os.read(fd, 1 << 16)
        except BlockingIOError:
            return bytes(data), False
        if not chunk:
            return bytes(data), True
        data += chunk
    return bytes(data), False


def _collect(proc: subprocess.Popen, deadline: float) -> RunResult:
    """stdout/stderr until the jail exits: descendants left behind cannot hold the call open."""
    out_fd, err_fd = proc.stdout.fileno(), proc.stderr.fileno()
    out, err = bytearray(), bytearray()
    exited = os.pidfd_open(proc.pid)  # readable once the jail has exited
    poller = select.poll()
    for fd in (out_fd, err_fd, exited):
        poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
    open_fds = {out_fd, err_fd}
    try:
        for fd in open_fds:
            os.set_blocking(fd, False)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:  # only when set-up itself hangs: the watcher enforces the program's limits
                return RunResult("wall_timeout", None, bytes(out), bytes(err))
            ready = {fd for fd, _ in poller.poll(left * 1000)}
            finished = exited in ready  # what the program wrote before it ended is still in the pipes
            for fd in sorted(open_fds):
                if fd not in ready and not finished:
                    continue
                data, eof = _drain(fd)
                if eof:
                    open_fds.discard(fd)
                    poller.unregister(fd)
                if fd == out_fd:
                    out += data
                    if len(out) > OUTPUT_BYTES:
                        return RunResult("output_limit", None, bytes(out[:OUTPUT_BYTES]), bytes(err))
                else:
                    err += data[: max(0, STDERR_BYTES - len(err))]
            if finished:
                return RunResult("exited", proc.wait(), bytes(out), bytes(err))
    finally:
        os.close(exited)


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
    """Whether this process can run programs in namespaces (checked once, by running one). A probe that
    could not run (disk full, killed) raises OSError and is tried again next time: only a platform that
    refuses namespaces, or a probe that ran and failed, may switch isolation off for good."""
    with _probe_lock:
        if not _probe:
            ok = False
            if os.geteuid() == 0 and sys.platform == "linux":
                result = run_python(
                    "print('ok')", b"", timeout=60, wall_timeout=60, memory_mb=1024, isolate=True
                )
                refused = result.status == "error" and result.stderr.startswith(b"aapa-sandbox:")
                if result.status != "exited" and not refused:
                    raise OSError(f"code sandbox: the isolation probe did not finish: {result}")
                ok = result.status == "exited" and result.returncode == 0 and result.stdout == b"ok\n"
                if not ok:
                    print(f"reward_fns: sandbox namespaces unavailable: {result}", file=sys.stderr)
            if not ok:  # said once per process: from here on, model-written code can reach this machine
                print("reward_fns: model-written code runs WITHOUT isolation (namespaces need root on Linux; "
                      f"euid {os.geteuid()}): it can write files this user can write and reach the network. "
                      "require_isolation=True refuses to run it instead (docs/rewards.md, Limits to know)",
                      file=sys.stderr)
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
        os.set_inheritable(config["verdict_fd"], False)  # for the watcher alone, never the program
        stdin = os.open("stdin", os.O_RDONLY)
        os.dup2(stdin, 0)
        os.close(stdin)
        if config["isolate"]:
            _check(
                libc.unshare(_CLONE_NEWNS | _CLONE_NEWNET | _CLONE_NEWPID | _CLONE_NEWIPC | _CLONE_NEWUTS),
                "unshare",
            )
            # The child is pid 1 of the new pid namespace, and becomes the watcher below: when it exits,
            # the kernel kills whatever is left in the namespace.
            _fork_and_relay()
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            _build_filesystem(libc, config)
        started_r, started_w = os.pipe()
        program = os.fork()  # set-up is done: the program's CPU clock starts at 0 here
        if program == 0:
            _exec_program(libc, config, started_w)
        os.close(started_w)
    except Exception as exc:
        os.write(2, f"aapa-sandbox: {exc!r}\n".encode())
        os._exit(JAIL_FAILED)
    _watch(program, started_r, config)


def _exec_program(libc: ctypes.CDLL, config: dict, started_fd: int) -> None:
    """In the forked child: rlimits, the unprivileged uid, then the program's interpreter."""
    try:
        memory = config["memory_mb"] << 20
        cpu_backstop = math.ceil(config["cpu_s"]) + 2  # the watcher's limit comes first; this holds if not
        for limit, value in (
            (resource.RLIMIT_CPU, (cpu_backstop, cpu_backstop + 1)),
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
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # the watcher's death kills the program
        os.set_inheritable(started_fd, True)
        python = config["python"]
        os.execve(python, [python, "-I", "-c", _LAUNCHER, str(started_fd), "main.py"], dict(os.environ))
    except Exception as exc:
        os.write(2, f"aapa-sandbox: {exc!r}\n".encode())
    os._exit(JAIL_FAILED)


def _watch(program: int, started_fd: int, config: dict) -> None:
    """Kills the program past its CPU budget or wall limit, both counted from the moment its interpreter
    reported; writes the verdict for the caller and exits with the program's status."""
    cpu_clock = (~program << 3) | 2  # Linux's CPU-time clock of another process (all its threads)
    budget, wall_deadline, started_cpu, limit = STARTUP_CPU_S, None, 0.0, None
    while True:
        done, status, usage = os.wait4(program, os.WNOHANG)
        if done:
            break
        if wall_deadline is None and select.select([started_fd], [], [], 0)[0]:
            report = os.read(started_fd, 64)
            if report:  # else the interpreter died before it reported, and its status says why
                started_cpu = float(report)
            budget = started_cpu + config["cpu_s"]
            wall_deadline = time.monotonic() + config["wall_s"]
        try:
            used = time.clock_gettime(cpu_clock)
        except OSError:  # it has just exited
            used = 0.0
        if used > budget:
            limit = "cpu"
        elif wall_deadline is not None and time.monotonic() > wall_deadline:
            limit = "wall"
        if limit is not None:
            os.kill(program, signal.SIGKILL)
            _, status, usage = os.wait4(program, 0)
            break
        time.sleep(POLL_S)
    if limit is None and os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGXCPU:
        limit = "cpu"  # the rlimit backstop fired
    cpu = max(0.0, usage.ru_utime + usage.ru_stime - started_cpu)
    os.write(config["verdict_fd"], json.dumps({"limit": limit, "cpu_s": round(cpu, 3)}).encode())
    code = os.waitstatus_to_exitcode(status)
    os._exit(code if code >= 0 else 128 - code)


if __name__ == "__main__":
    _jail(json.loads(sys.argv[1]))
