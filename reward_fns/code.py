"""Code reward: the fraction of tests that the response's program passes, run in a sandbox.

The program is the last fenced ```python block of the response (the last unlabelled block if none is
labelled python). Labels: {"tests": "<python with assert statements>"} (a plain string means the same)
or {"cases": [{"stdin": ..., "stdout": ...}, ...]} (a plain list means the same).
- tests: each top-level `assert` is one test, other top-level statements are setup run in order; a
  block without top-level asserts is one test. Program and tests run in one sandboxed process, which
  refuses the program a look into the interpreter (frames, object graph, tracing, ctypes, its memory).
- cases: the program runs once per case with that stdin; it passes when it exits 0 and its stdout
  equals the expected one up to trailing whitespace on each line and blank lines at the ends.
`strict`: reward 1 only when every test passes (cases stop at the first failure).
Sandbox: see reward_fns/_sandbox.py; `code_isolated` in the metrics says whether namespaces were used,
and `require_isolation=True` turns their absence into an error (reward 0, `code_error` 1).
OpenRLHF: `--reward.remote_url reward_fns/code.py`.
"""

from __future__ import annotations

import ast
import json
import os
import re
import secrets
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from reward_fns._common import final_answer, logger, make_reward_func, parse_label, wall_limit
from reward_fns._sandbox import CONCURRENCY, isolation_available, run_python

TIMEOUT_S = 5.0  # CPU seconds of the program's own work
MEMORY_MB = 1024
METRICS = (
    "code_pass_rate",
    "code_all_passed",
    "code_no_program",
    "code_timeout",
    "code_wall_timeout",
    "code_error",
    "code_isolated",
)

_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)```", re.DOTALL)

# Runs in the sandbox. The task arrives on stdin with a random token that signs each passed test on stdout,
# so the program must not get at the token, nor at the exec/compile/write the harness calls after it ran.
_HARNESS = """\
import ctypes, json, os, sys, threading


def run(exec=exec, compile=compile, write=os.write):
    # Defaults are bound here, before the program may replace builtins or module attributes.
    task = json.loads(sys.stdin.readline())
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    try:
        os.unlink("stdin")  # without a mount namespace the task file stays readable in the working directory
    except FileNotFoundError:
        pass
    report, line = os.dup(1), b"\\n%s pass %%d\\n" % task["token"].encode()
    statements = list(enumerate(task["statements"]))

    def refuse(event, args):
        # Ways to look into this interpreter, where the token and the tests are: frames, the object graph,
        # tracing, audit hooks of its own (they see each test's source), hand-made bytecode, ctypes and
        # CPython's test modules.
        frame = event == "object.__getattr__" and args[1] in ("tb_frame", "gi_frame", "cr_frame", "ag_frame")
        native = event == "import" and args[0].startswith(("ctypes", "_ctypes", "_test"))
        if frame or native or event in (
            "sys._getframe", "sys._current_frames", "sys.settrace", "sys.setprofile", "sys.addaudithook",
            "gc.get_objects", "gc.get_referrers", "gc.get_referents", "code.__new__",
        ):
            raise ValueError(event + " is not allowed in the code sandbox")

    sys.addaudithook(refuse)
    namespace = {"__name__": "solution"}
    try:
        exec(compile(task["program"], "solution.py", "exec"), namespace)
    except BaseException:
        return
    for i, (source, is_test) in statements:
        try:
            exec(compile(source, "test_%d.py" % i, "exec"), namespace)
        except BaseException:
            continue
        if is_test:
            write(report, line % i)


# Not dumpable: /proc/<pid>/mem and the like then belong to root, even for this process. ctypes goes after
# that (its memmove is not audited), and `refuse` keeps it from being imported again.
ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE
del ctypes
for module in [module for module in sys.modules if module.startswith(("ctypes", "_ctypes"))]:
    del sys.modules[module]
# Signal handlers are handed the frame they interrupt, but run in the main thread and can only be set from
# it: the program runs in another one.
thread = threading.Thread(target=run)
try:
    thread.start()
except RuntimeError:  # without a uid of its own, RLIMIT_NPROC counts all of the user's threads
    run()
else:
    thread.join()
"""


def extract_program(text: str) -> str | None:
    """The last fenced python block, else the last unlabelled one."""
    blocks = _FENCE.findall(text)
    for wanted in (("python", "py", "python3"), ("",)):
        for language, body in reversed(blocks):
            if language.lower() in wanted:
                return body
    return None


def _split_tests(tests: str, index: int) -> list[tuple[str, bool]]:
    try:
        module = ast.parse(tests)
    except SyntaxError as exc:
        raise ValueError(f"labels[{index}]: field 'tests' is not valid Python: {exc}") from exc
    statements = [(ast.unparse(node), isinstance(node, ast.Assert)) for node in module.body]
    if not any(is_test for _, is_test in statements):
        return [(tests, True)]
    return statements


def parse_code_label(label: Any, index: int) -> tuple[str, Any]:
    """("tests", [(statement, is_test), ...]) or ("cases", [(stdin, stdout), ...])."""
    label = parse_label(label)
    if isinstance(label, dict):
        if label.get("tests") is not None:
            label = label["tests"]
        elif label.get("cases") is not None:
            label = label["cases"]
        else:
            raise ValueError(
                f"labels[{index}]: missing field 'tests' or 'cases' (label has fields {sorted(label)})"
            )
    if isinstance(label, str) and label.strip():
        return "tests", _split_tests(label, index)
    if isinstance(label, list) and label:
        cases = []
        for k, case in enumerate(label):
            if not isinstance(case, dict) or not isinstance(case.get("stdout"), str):
                raise ValueError(f"labels[{index}]: cases[{k}]: missing field 'stdout' (a string)")
            if not isinstance(case.get("stdin", ""), str):
                raise ValueError(f"labels[{index}]: cases[{k}]: field 'stdin' must be a string")
            cases.append((case.get("stdin", ""), case["stdout"]))
        return "cases", cases
    raise ValueError(
        f"labels[{index}]: missing field 'tests' or 'cases' (got {type(label).__name__} {label!r:.80})"
    )


def _normalise_output(text: str) -> str:
    return "\n".join(line.rstrip() for line in text.strip("\n").splitlines()).strip()


def _score(program: str, kind: str, spec: list, strict: bool, limits: dict) -> tuple[int, int, set[str]]:
    """(passed, total, the statuses of its sandboxed runs) for one program."""
    if kind == "tests":
        token = secrets.token_hex(16)
        task = json.dumps({"token": token, "program": program, "statements": spec}) + "\n"
        result = run_python(_HARNESS, task.encode(), **limits)
        prefix = f"{token} pass ".encode()
        reported = {line[len(prefix) :] for line in result.stdout.splitlines() if line.startswith(prefix)}
        # Only the indices of tests count, each once, so the reward stays in [0, 1] whatever was written.
        tests = [b"%d" % i for i, (_, is_test) in enumerate(spec) if is_test]
        return sum(index in reported for index in tests), len(tests), {result.status}
    passed, statuses = 0, set()
    for stdin, expected in spec:
        result = run_python(program, stdin.encode(), **limits)
        statuses.add(result.status)
        ok = result.status == "exited" and result.returncode == 0
        if ok and _normalise_output(result.stdout.decode(errors="replace")) == _normalise_output(expected):
            passed += 1
        elif strict:
            break
    return passed, len(spec), statuses


def batch_reward(
    responses: list[str],
    labels: list,
    *,
    strict: bool = False,
    timeout: float = TIMEOUT_S,
    wall_timeout: float | None = None,
    memory_mb: int = MEMORY_MB,
    require_isolation: bool = False,
    answer_only: bool = True,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Rewards (N,) in [0, 1] and per-sample metrics (N,) named in METRICS.

    `timeout`: CPU seconds of the program's own work per sandboxed run (one per sample for tests, one
    per case for cases); `wall_timeout`: wall seconds per run from the program's start (default
    `wall_limit`: 10 x timeout, at least 60 s), a safety net for programs that sleep or block;
    `memory_mb`: address space per process. Runs queue for the process-wide CONCURRENCY slots; neither
    queueing nor sandbox set-up counts against a limit.
    """
    if len(labels) != len(responses):
        raise ValueError(f"{len(responses)} responses but {len(labels)} labels")
    specs = [parse_code_label(label, i) for i, label in enumerate(labels)]
    try:
        isolate = isolation_available()
    except OSError:  # the sandbox cannot start at all (disk full, say): no sample can run
        logger.exception("code sandbox cannot start; reward 0 for every program of this batch")
        isolate = None
    if require_isolation and isolate is False:
        raise RuntimeError(
            "code sandbox: require_isolation=True but Linux namespaces are unavailable "
            f"(euid {os.geteuid()}; they need root and a platform that permits unshare)"
        )
    programs = [extract_program(final_answer(response, answer_only)) for response in responses]
    limits = {
        "timeout": timeout,
        "wall_timeout": wall_limit(timeout, wall_timeout),
        "memory_mb": memory_mb,
        "isolate": isolate,
    }

    def score(i: int) -> tuple[int, int, set[str]]:
        if programs[i] is None:
            return 0, 1, set()
        if isolate is None:
            return 0, 1, {"error"}
        kind, spec = specs[i]
        try:
            return _score(programs[i], kind, spec, strict, limits)
        except OSError:  # the sandbox could not start (out of processes, disk full...): this sample only
            logger.exception("code sandbox failed for response %d; reward 0", i)
            return 0, 1, {"error"}

    with ThreadPoolExecutor(max(1, min(CONCURRENCY, len(responses)))) as executor:
        outcomes = list(executor.map(score, range(len(responses))))
    n = len(responses)
    metrics = {key: torch.zeros(n) for key in METRICS}
    for i, (passed, total, statuses) in enumerate(outcomes):
        metrics["code_pass_rate"][i] = passed / total
        metrics["code_all_passed"][i] = float(passed == total)
        metrics["code_no_program"][i] = float(programs[i] is None)
        metrics["code_timeout"][i] = float("cpu_timeout" in statuses)
        metrics["code_wall_timeout"][i] = float("wall_timeout" in statuses)
        metrics["code_error"][i] = float("error" in statuses)
    metrics["code_isolated"][:] = float(bool(isolate))
    rewards = (metrics["code_all_passed"] if strict else metrics["code_pass_rate"]).clone()
    return rewards, metrics


reward_func = make_reward_func(batch_reward, METRICS, "code_error")
