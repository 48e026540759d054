"""Math answer reward: 1.0 when the response's final answer is equivalent to the label's answer.

The answer is the last `\\boxed{...}` (or `\\fbox{...}`) of the response; without one, the last number
decides when it and the label are integers, else math-verify reads the whole response and, failing that,
the last number. Answers that match the label exactly (or as integers) are decided in the calling
thread; everything else goes to math-verify in a worker process that is killed after `timeout` seconds
per check (sympy can hang on inputs like `9^{9^{9^{9}}}`), so a hang costs one check its reward, never
the caller its thread. The timeout counts the worker's CPU time
on that check, so a check that only waits for a core on a busy machine is never cut short; a wall limit
(`wall_timeout`) is the safety net. OpenRLHF: `--reward.remote_url
reward_fns/math.py`; label = the answer, or a dict with "answer".
"""

from __future__ import annotations

import atexit
import os
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from reward_fns._common import final_answer, label_field, logger, make_reward_func, wall_limit
from reward_fns._procs import FrameReader, cpu_seconds, die_with_parent, read_frame, write_frame

TIMEOUT_S = 5.0  # CPU seconds of one check
WORKERS = 2
STARTUP_TIMEOUT_S = 120.0  # importing sympy on a loaded machine can take long; not a check's fault
POLL_S = 0.05  # how often a waiting caller reads the worker's CPU clock
METRICS = (
    "math_correct",
    "math_fast_path",
    "math_no_answer",
    "math_timeout",
    "math_wall_timeout",
    "math_error",
    "math_unsimplified",
)

_NUMBER = re.compile(r"-?(?:\d+(?:,\d{3})*(?:\.\d+)?|\.\d+)")
_INTEGER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)")
_BOX = re.compile(r"\\(?:boxed|fbox)\b(\s*)")  # group 1: the spacing before the box's content
_BRACE = re.compile(r"\\.|[{}]")  # a brace, or an escaped character (`\{`, `\}`, `\\`), which is no brace
_TOKEN = re.compile(r"\S+")
_SPACING = re.compile(r"\s+|\\[,;:! ]|\\(?:left|right)(?![A-Za-z])")  # not `\leftarrow`, `\rightarrow`
_DEGREES = re.compile(r"\^(?:\\circ(?![A-Za-z])|\{\\circ\})")  # after _compact: no spacing left
_TEXT = re.compile(r"\\text\{([^{}]*)\}")
# A number as written: integer, decimal, a fraction of two integers, optionally signed or a percentage, in
# at most one pair of parentheses; "x=" before it. Gold and answer are tested alike.
_SIGNED_NUMBER = r"[-+]?(?:\d+(?:,\d{3})*(?:\.\d+)?|\.\d+|\\frac\{[-+]?\d+\}\{[-+]?\d+\}|\d+/\d+)(?:\\?%)?"
_PLAIN_NUMBER = re.compile(rf"(?:[A-Za-z]\w*=)?(?:{_SIGNED_NUMBER}|\({_SIGNED_NUMBER}\))")


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` with balanced braces, or of `\\boxed x` up to whitespace."""
    closing: dict[int, int] = {}  # "{" index -> index of its "}": one pass, so unclosed boxes stay linear
    stack: list[int] = []
    for brace in _BRACE.finditer(text):
        if brace.group() == "{":
            stack.append(brace.start())
        elif brace.group() == "}" and stack:
            closing[stack.pop()] = brace.start()
    for match in reversed(list(_BOX.finditer(text))):
        start = match.end()
        if text.startswith("{", start):
            if start in closing:
                return text[start + 1 : closing[start]]
            continue
        token = _TOKEN.match(text, start) if match.group(1) else None
        if token and token.group().rstrip("$."):
            return token.group().rstrip("$.")
    return None


def extract_answer(text: str) -> tuple[str | None, bool]:
    """(answer, boxed): the last boxed answer, else the last number, else None."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed, True
    numbers = _NUMBER.findall(text)
    return (numbers[-1] if numbers else None), False


def _compact(answer: str) -> str:
    return _SPACING.sub("", answer).strip("$").rstrip(".").replace("\\dfrac", "\\frac")


def _as_written(answer: str) -> str:
    """The answer for the plain-number test: compacted, without degree signs and `\\text{...}` wrappers
    (`5^\\circ`, `\\text{2}` are numbers as much as `5\\text{ cm}`, which math-verify already strips)."""
    return _TEXT.sub(r"\1", _DEGREES.sub("", _compact(answer)))


def _integer_digits(integer: str) -> tuple[bool, str]:
    """(negative, digits) of an integer as written, without int(): past 4,300 digits int() raises."""
    digits = integer.replace(",", "").removeprefix("-").lstrip("0") or "0"
    return integer.startswith("-") and digits != "0", digits


def fast_verdict(answer: str, gold: str) -> bool | None:
    """Decides the cases that need no parser: identical strings, or two integers; else None."""
    answer, gold = _compact(answer), _compact(gold)
    if answer == gold:
        return True
    if _INTEGER.fullmatch(answer) and _INTEGER.fullmatch(gold):
        return _integer_digits(answer) == _integer_digits(gold)
    return None


def check(gold: str, text: str, boxed: bool, _gold_cache: dict | None = None) -> tuple[float, str]:
    """math-verify on one answer, in the current thread and without a timeout: (score, status)."""
    from math_verify import parse, verify

    parsed_gold = _gold_cache.get(gold) if _gold_cache is not None else None
    if parsed_gold is None:
        plain = not any(marker in gold for marker in ("$", "\\boxed", "\\(", "\\["))
        parsed_gold = parse(f"${gold}$" if plain else gold, parsing_timeout=None)
        if _gold_cache is not None:
            _gold_cache[gold] = parsed_gold
    if not parsed_gold:
        return 0.0, "gold_unparsed"
    if boxed:
        parsed = parse(f"\\boxed{{{text}}}", parsing_timeout=None)
    else:
        parsed = parse(text, parsing_timeout=None)
        if not parsed:
            number = extract_answer(text)[0]
            parsed = parse(number, parsing_timeout=None) if number else []
    if not parsed:
        return 0.0, "no_answer"
    # A number asked for must be given as one: an expression equal to it (the question restated, 17*23-387)
    # would make the verifier do the policy's work.
    plain = _PLAIN_NUMBER.fullmatch
    if plain(_as_written(gold)) and not plain(_as_written(str(parsed[-1]))):
        return 0.0, "unsimplified"
    return float(verify(parsed_gold, parsed, timeout_seconds=None)), "ok"


def _worker_main() -> None:
    """Worker process: reads batches of (gold, text, boxed), answers each check as soon as it is done."""
    die_with_parent()
    out = os.dup(1)
    os.dup2(2, 1)  # stray prints must not corrupt the frames
    import logging

    logging.disable(logging.WARNING)  # math-verify warns on every call that its own timeout is off
    try:
        check("1", "1", True)
    except Exception as exc:  # e.g. math-verify missing: tell the parent instead of dying silently
        write_frame(out, ("failed", repr(exc)))
        return
    write_frame(out, ("ready", None))
    cache: dict = {}
    while True:
        try:
            tasks = read_frame(0)
        except EOFError:
            return
        if len(cache) > 4096:
            cache.clear()
        for gold, text, boxed in tasks:
            try:
                write_frame(out, check(gold, text, boxed, cache))
            except Exception:
                write_frame(out, (0.0, "error"))


# Workers die with the thread that started them (PR_SET_PDEATHSIG), so one long-lived thread starts
# them all: the caller's threads may be short-lived executor threads.
_spawner = ThreadPoolExecutor(1, thread_name_prefix="math-worker-spawner")


class _Worker:
    def __init__(self) -> None:
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        boot = "import sys; sys.path.insert(0, sys.argv[1]); import reward_fns.math as m; m._worker_main()"
        self.proc = _spawner.submit(
            subprocess.Popen,
            [sys.executable, "-c", boot, package_root],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            close_fds=True,
        ).result()
        self.reader = FrameReader(self.proc.stdout.fileno())
        self.ready = False

    def alive(self) -> bool:
        return self.proc.poll() is None

    def send(self, tasks: list) -> None:
        write_frame(self.proc.stdin.fileno(), tasks)

    def receive(self, timeout: float, wall_timeout: float) -> tuple[float, str]:
        """The next check's result; TimeoutError("timeout") once the worker has spent `timeout` CPU
        seconds on it, TimeoutError("wall_timeout") after `wall_timeout` seconds of waiting."""
        if not self.ready:
            try:
                status, detail = self.reader.read(STARTUP_TIMEOUT_S)
            except TimeoutError:  # not the check's fault, but it cannot run: an error, not a timeout
                raise EOFError("math worker did not start in time") from None
            if status != "ready":
                raise RuntimeError(f"math worker could not start: {detail}")
            self.ready = True
        started, deadline = self.cpu_seconds(), time.monotonic() + wall_timeout
        while True:
            try:
                return self.reader.read(POLL_S)
            except TimeoutError:
                pass
            if self.cpu_seconds() - started > timeout:
                raise TimeoutError("timeout")
            if time.monotonic() > deadline:
                raise TimeoutError("wall_timeout")

    def cpu_seconds(self) -> float:
        """The worker's CPU time so far; EOFError once it has died."""
        try:
            return cpu_seconds(self.proc.pid)
        except OSError:
            raise EOFError("math worker died") from None

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.proc.stdin.close()
        self.proc.stdout.close()


_pool_lock = threading.Condition()
_idle: list[_Worker] = []
_busy = 0


def _checkout(limit: int) -> _Worker:
    global _busy
    with _pool_lock:
        while not _idle and _busy >= limit:
            _pool_lock.wait()
        _busy += 1
        while _idle:
            worker = _idle.pop()
            if worker.alive():
                return worker
            worker.kill()
    return _Worker()


def _checkin(worker: _Worker | None) -> None:
    global _busy
    with _pool_lock:
        _busy -= 1
        if worker is not None and worker.alive():
            _idle.append(worker)
        _pool_lock.notify()


def _forget_parent_pool() -> None:
    """In a forked child the parent's workers and spawner thread are not ours: start afresh."""
    global _pool_lock, _idle, _busy, _spawner
    _pool_lock, _idle, _busy = threading.Condition(), [], 0
    _spawner = ThreadPoolExecutor(1, thread_name_prefix="math-worker-spawner")


os.register_at_fork(after_in_child=_forget_parent_pool)


@atexit.register
def _shutdown() -> None:
    with _pool_lock:
        for worker in _idle:
            worker.kill()
        _idle.clear()


def run_checks(
    tasks: list[tuple[str, str, bool]], timeout: float, wall_timeout: float, workers: int
) -> list[tuple[float, str]]:
    """One round trip per worker: the batch goes out at once and results stream back; a check that
    runs past `timeout` CPU seconds (or `wall_timeout` seconds) scores 0 ("timeout", "wall_timeout"),
    its worker is killed and replaced, the rest re-sent. A worker that dies costs its check ("error")."""
    parts = min(workers, -(-len(tasks) // 8))
    if parts <= 1:
        return _run_on_worker(tasks, timeout, wall_timeout, workers)
    with ThreadPoolExecutor(parts) as executor:
        answered = list(
            executor.map(
                lambda i: _run_on_worker(tasks[i::parts], timeout, wall_timeout, workers), range(parts)
            )
        )
    results: list = [None] * len(tasks)
    for i, part in enumerate(answered):
        results[i::parts] = part
    return results


def _run_on_worker(
    tasks: list[tuple[str, str, bool]], timeout: float, wall_timeout: float, workers: int
) -> list[tuple[float, str]]:
    results = []
    worker = _checkout(workers)
    try:
        while len(results) < len(tasks):
            pending = tasks[len(results) :]
            worker.send(pending)
            for _ in pending:
                try:
                    results.append(worker.receive(timeout, wall_timeout))
                except (TimeoutError, EOFError) as exc:
                    results.append((0.0, exc.args[0] if isinstance(exc, TimeoutError) else "error"))
                    worker.kill()
                    worker = _Worker()  # starts importing now, off the critical path
                    break
    except BaseException:
        worker.kill()
        worker = None
        raise
    finally:
        _checkin(worker)
    return results


def batch_reward(
    responses: list[str],
    labels: list,
    *,
    timeout: float = TIMEOUT_S,
    wall_timeout: float | None = None,
    answer_only: bool = True,
    workers: int = WORKERS,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Rewards (N,) in {0, 1} and per-sample metrics (N,) named in METRICS.

    labels[i]: the gold answer, or {"answer": ...}. `answer_only`: score only the text after `</think>`.
    `timeout`: CPU seconds a worker may spend on one check; `wall_timeout`: wall seconds waited for one
    check (default `wall_limit`: 10 x timeout, at least 60 s). `workers`: most worker processes this
    call and concurrent ones use together; waiting for one counts against no limit.
    """
    golds = [str(label_field(label, "answer", i)) for i, label in enumerate(labels)]
    if len(golds) != len(responses):
        raise ValueError(f"{len(responses)} responses but {len(golds)} labels")
    n = len(responses)
    rewards = torch.zeros(n)
    metrics = {key: torch.zeros(n) for key in METRICS}
    pending, tasks, wrong_last_number = [], [], set()
    for i, (response, gold) in enumerate(zip(responses, golds, strict=True)):
        text = final_answer(response, answer_only)
        answer, boxed = extract_answer(text)
        verdict = fast_verdict(answer, gold) if answer is not None else None
        if verdict is False and not boxed:
            # Scores 0: accepting math-verify's reading of the whole text (an earlier "the answer is 4")
            # would give a second guess. It still reads it for the metrics (math_unsimplified).
            verdict = None
            wrong_last_number.add(i)
        if verdict is not None:
            rewards[i] = float(verdict)
            metrics["math_fast_path"][i] = 1.0
        elif answer is None and not text.strip():
            metrics["math_no_answer"][i] = 1.0
        else:
            pending.append(i)
            tasks.append((gold, answer if boxed else text, boxed))
    wall_timeout = wall_limit(timeout, wall_timeout)
    for i, (score, status) in zip(pending, run_checks(tasks, timeout, wall_timeout, workers), strict=True):
        rewards[i] = 0.0 if i in wrong_last_number else score
        metrics["math_no_answer"][i] = float(status == "no_answer")
        metrics["math_timeout"][i] = float(status == "timeout")
        metrics["math_wall_timeout"][i] = float(status == "wall_timeout")
        metrics["math_error"][i] = float(status in ("error", "gold_unparsed"))
        metrics["math_unsimplified"][i] = float(status == "unsimplified")
        if status == "gold_unparsed":
            logger.warning("labels[%d]: math-verify cannot parse the gold answer %r; reward 0", i, golds[i])
    metrics["math_correct"] = rewards.clone()
    return rewards, metrics


reward_func = make_reward_func(batch_reward, METRICS, "math_error")
