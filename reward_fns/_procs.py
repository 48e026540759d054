"""Process helpers shared by the math worker pool and the code sandbox (stdlib only)."""

from __future__ import annotations

import ctypes
import os
import pickle
import select
import signal
import struct
import time

_PR_SET_PDEATHSIG = 1
_HEADER = struct.Struct("<I")


def die_with_parent() -> None:
    """SIGKILL this process when the thread that started it dies; callers check liveness before reuse."""
    parent = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def cpu_seconds(pid: int) -> float:
    """CPU time used so far by process `pid` (all its threads): Linux's per-process CPU-time clock."""
    return time.clock_gettime((~pid << 3) | 2)


def write_frame(fd: int, obj: object) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    view = memoryview(_HEADER.pack(len(data)) + data)
    while view:
        view = view[os.write(fd, view) :]


def read_exact(fd: int, size: int) -> bytes | None:
    """Blocking read of exactly `size` bytes; None at end of file."""
    chunks, missing = [], size
    while missing:
        chunk = os.read(fd, missing)
        if not chunk:
            return None
        chunks.append(chunk)
        missing -= len(chunk)
    return b"".join(chunks)


def read_frame(fd: int) -> object:
    header = read_exact(fd, _HEADER.size)
    if header is None:
        raise EOFError
    data = read_exact(fd, _HEADER.unpack(header)[0])
    if data is None:
        raise EOFError
    return pickle.loads(data)


class FrameReader:
    """Reads length-prefixed pickles from a pipe with a deadline (the peer may hang mid-task)."""

    def __init__(self, fd: int):
        self.fd = fd
        self.buffer = b""
        self.poller = select.poll()
        self.poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)

    def read(self, timeout: float) -> object:
        deadline = time.monotonic() + timeout
        while True:
            if len(self.buffer) >= _HEADER.size:
                end = _HEADER.size + _HEADER.unpack_from(self.buffer)[0]
                if len(self.buffer) >= end:
                    frame, self.buffer = self.buffer[_HEADER.size : end], self.buffer[end:]
                    return pickle.loads(frame)
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            if not self.poller.poll(left * 1000):
                raise TimeoutError
            chunk = os.read(self.fd, 1 << 16)
            if not chunk:
                raise EOFError
            self.buffer += chunk


def kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
