"""Code reward: the fraction of tests that the response's program passes, run in a sandbox.

The program is the last fenced ```python block of the response (the last unlabelled block if none is
labelled python). Labels: {"tests": "<python with assert statements>"} (a plain string means the same)
or {"cases": [{"stdin": ..., "stdout": ...}, ...]} (a plain list means the same).
- tests: each top-level `assert` is one test, other top-level statements are setup run in order; a
  block without top-level asserts is one test, and must call something (HumanEval's `test` needs
  `check(<entry_point>)` appended): one that only defines functions is refused. Program and tests run
  in one sandboxed process, which refuses the program a look into the interpreter (frames, object
  graph, tracing, ctypes, its memory) and keeps it from changing what the tests and their libraries
  call (its globals named like a builtin are not the tests', loaded modules are checked after each test).
- cases: the program runs once per case with that stdin; it passes when it exits 0 and its stdout
  equals the expected one up to trailing whitespace on each line ("\r" included) and blank lines at the
  ends; leading whitespace and line breaks other than "\n" count.
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
from pathlib import Path
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
    "code_untrusted_compare",
)

_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)```", re.DOTALL)

# Runs in the sandbox as main.py; it reads the task from stdin and prints the token of each test that passed.
_HARNESS = (Path(__file__).parent / "_code_harness.py").read_text(encoding="utf-8")
# Calls whose verdict a program-defined __bool__ or __instancecheck__ could forge, and their guards.
_GUARDED_CALLS = {"isinstance": "__aapa_isinstance__", "all": "__aapa_all__", "any": "__aapa_any__",
                  "bool": "__aapa_truth__"}


def _call(name: str, *args: ast.expr) -> ast.Call:
    return ast.Call(ast.Name(name, ast.Load()), list(args), [])


class _GuardTests(ast.NodeTransformer):
    """Rewrites test code so that the harness's guards, not the program's own methods, judge what the
    program returned: comparisons, truth tests, arithmetic operators, abs, isinstance, all, any, bool."""

    def truth(self, node: ast.expr) -> ast.expr:
        # A value used only for its truth: and/or decide by each operand's truth, so guard each one.
        if isinstance(node, ast.BoolOp):
            return ast.BoolOp(node.op, [self.truth(value) for value in node.values])
        return _call("__aapa_truth__", node)

    def visit_Compare(self, node: ast.Compare) -> ast.expr:
        self.generic_visit(node)
        ops = tuple(type(op).__name__ for op in node.ops)
        if set(ops) <= {"Is", "IsNot"}:  # identity cannot be forged
            return node
        return _call("__aapa_compare__", ast.Constant(ops), node.left, *node.comparators)

    def visit_BinOp(self, node: ast.BinOp) -> ast.expr:
        self.generic_visit(node)
        return _call("__aapa_arith__", ast.Constant(type(node.op).__name__), node.left, node.right)

    def visit_UnaryOp(self, node: ast.UnaryOp) -> ast.expr:
        self.generic_visit(node)
        if isinstance(node.op, ast.Not):
            return ast.UnaryOp(ast.Not(), self.truth(node.operand))
        return _call("__aapa_arith__", ast.Constant(type(node.op).__name__), node.operand)

    def visit_Call(self, node: ast.Call) -> ast.expr:
        self.generic_visit(node)
        if isinstance(node.func, ast.Name) and not node.keywords:
            if node.func.id == "abs" and len(node.args) == 1:
                return _call("__aapa_arith__", ast.Constant("abs"), node.args[0])
            if node.func.id in _GUARDED_CALLS:
                node.func = ast.Name(_GUARDED_CALLS[node.func.id], ast.Load())
        return node

    def visit_Assert(self, node: ast.Assert) -> ast.Assert:
        self.generic_visit(node)
        node.test = self.truth(node.test)
        return node

    def visit_If(self, node: ast.If | ast.While | ast.IfExp) -> ast.AST:
        self.generic_visit(node)
        node.test = self.truth(node.test)
        return node

    visit_While = visit_IfExp = visit_If

    def visit_comprehension(self, node: ast.comprehension) -> ast.comprehension:
        self.generic_visit(node)
        node.ifs = [self.truth(test) for test in node.ifs]
        return node


def _guarded(node: ast.AST) -> str:
    return ast.unparse(ast.fix_missing_locations(_GuardTests().visit(node)))


def extract_program(text: str) -> str | None:
    """The last fenced python block, else the last unlabelled one."""
    blocks = _FENCE.findall(text)
    for wanted in (("python", "py", "python3"), ("",)):
        for language, body in reversed(blocks):
            if language.lower() in wanted:
                return body
    return None


def _checks_something(module: ast.Module) -> bool:
    """Whether the block asserts or calls anything when it runs, outside the functions it only defines."""
    todo: list[ast.AST] = list(module.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.Assert, ast.Call)):
            return True
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            todo.extend(ast.iter_child_nodes(node))
    return False


def _split_tests(tests: str, index: int) -> tuple[list[tuple[str, bool]], list[str]]:
    """The guarded statements (source, is_test) and the modules the tests import."""
    try:
        module = ast.parse(tests)
    except SyntaxError as exc:
        raise ValueError(f"labels[{index}]: field 'tests' is not valid Python: {exc}") from exc
    nodes = list(ast.walk(module))
    imports = [alias.name for node in nodes if isinstance(node, ast.Import) for alias in node.names]
    imports += [node.module for node in nodes if isinstance(node, ast.ImportFrom) and node.level == 0]
    if not any(isinstance(node, ast.Assert) for node in module.body):
        if not _checks_something(module):  # e.g. HumanEval's `test`, which defines check() and never calls it
            raise ValueError(
                f"labels[{index}]: field 'tests' checks nothing: no top-level assert and no call outside "
                "its functions, so every program would pass; call its checks (for HumanEval's `test`, "
                "append `check(<entry_point>)`)"
            )
        return [(_guarded(module), True)], imports
    return [(_guarded(node), isinstance(node, ast.Assert)) for node in module.body], imports


def parse_code_label(label: Any, index: int) -> tuple[str, Any]:
    """("tests", ([(statement, is_test), ...], imports)) or ("cases", [(stdin, stdout), ...])."""
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
    """What a case compares: the lines (split at "\n" only) less their trailing whitespace, which takes a
    "\r" too, and less blank lines at both ends. Leading whitespace counts, on the first line as on others."""
    return "\n".join(line.rstrip() for line in text.split("\n")).strip("\n")


def _score(program: str, kind: str, spec: Any, strict: bool, limits: dict) -> tuple[int, int, set[str]]:
    """(passed, total, the statuses of its sandboxed runs, plus "untrusted" when a test refused a value)."""
    if kind == "tests":
        statements, imports = spec
        # Two tokens per statement, so that a line seen (say, by a program that took over stdout) tells
        # nothing about any other verdict.
        passed, refused = ([secrets.token_hex(16) for _ in statements] for _ in range(2))
        task = {"program": program, "statements": statements, "imports": imports, "pass": passed,
                "refused": refused}
        result = run_python(_HARNESS, (json.dumps(task) + "\n").encode(), **limits)
        lines = set(result.stdout.decode(errors="replace").splitlines())
        # Each test counts once, so the reward stays in [0, 1] whatever was written.
        tests = [i for i, (_, is_test) in enumerate(statements) if is_test]
        statuses = {result.status} | ({"untrusted"} if lines & set(refused) else set())
        return sum(passed[i] in lines for i in tests), len(tests), statuses
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
        metrics["code_untrusted_compare"][i] = float("untrusted" in statuses)
    metrics["code_isolated"][:] = float(bool(isolate))
    rewards = (metrics["code_all_passed"] if strict else metrics["code_pass_rate"]).clone()
    return rewards, metrics


reward_func = make_reward_func(batch_reward, METRICS, "code_error")
