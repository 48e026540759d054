"""Reward verdicts under load: a burst of concurrent callers on a busy machine against a serial run.

    .venv/bin/python bench/reward_load.py [--threads 32] [--calls 4] [--burners 3] [--functions code math]

For each reward function and time limit (the default and 1 s where the function has one): the same
threads x calls single-sample inputs are scored once serially on a quiet machine (the reference), then
by `--threads` threads at once, each calling `reward_func` `--calls` times (as OpenRLHF's engines do),
while `--burners` processes spin on the CPU. A row reports throughput, per-call latency (p50/p99/max),
how often each limit fired, and the verdicts (rewards) that differ from the serial run: the target is 0.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

from test_reward_ifeval import CASES as IFEVAL_CASES  # noqa: E402  (one passing response per id)

from reward_fns import code, ifeval  # noqa: E402
from reward_fns import format as format_reward  # noqa: E402
from reward_fns import math as math_reward  # noqa: E402


def fenced(program: str) -> str:
    return f"```python\n{program}\n```"


ADD_TESTS = "assert add(1, 2) == 3\nassert add(-1, 1) == 0\nassert add(5, 5) == 10"
# Correct and incorrect programs; `busy` passes after ~0.1-0.3 s of its own CPU time, the kind of program
# that a wall-clock limit fails when it only waits for a core; `loop` must hit the limit every time.
CODE_INPUTS = [
    (fenced("def add(a, b):\n    return a + b"), ADD_TESTS),
    (fenced("def add(a, b):\n    return 3"), ADD_TESTS),
    (fenced("s = sum(range(3_000_000))\ndef add(a, b):\n    return a + b"), ADD_TESTS),
    (fenced("print(sum(map(int, input().split())))"), {"cases": [{"stdin": "2 3", "stdout": "5"}]}),
    (fenced("print(int(input()) * 2)"), {"cases": [{"stdin": "2", "stdout": "5"}]}),
    (fenced("def add(a, b:"), ADD_TESTS),
    (fenced("s = sum(range(3_000_000))\ndef add(a, b):\n    return a - b"), ADD_TESTS),
    (fenced("while True:\n    pass"), "assert True"),
]
MATH_INPUTS = [  # fast-path, math-verify right and wrong, and one in 16 that sympy works on until the limit
    ("7+5=12, 3+4+1=8. \\boxed{82}", "82"),
    ("\\boxed{\\frac{1}{2}}", "0.5"),
    ("so the answer is $0.75$", "3/4"),
    ("\\boxed{\\sqrt{2}/2}", "\\frac{\\sqrt{2}}{2}"),
    ("\\boxed{(1, 2]}", "[1,2)"),
    ("\\boxed{x^2+2x+1}", "(x+1)^2"),
    ("\\boxed{0.51}", "\\frac12"),
    ("\\boxed{9^{9^{9^{9}}}}", "\\sqrt{82}"),  # a numeric gold would refuse it unchecked
    ("7+5=12, 3+4=7. \\boxed{72}", "82"),
    ("\\boxed{\\dfrac{3}{4}}", "3/4"),
    ("\\boxed{\\{2, 1\\}}", "\\{1,2\\}"),
    ("The answer is 42.", "42"),
    ("\\boxed{[1, 2)}", "(1,2]"),
    ("\\boxed{1,000}", "1000"),
    ("\\boxed{50\\%}", "0.5"),
    ("no number at all", "7"),
]
IFEVAL_INPUTS = [  # a response that follows each instruction and one that does not
    (response, {"instruction_id_list": [name], "kwargs": [kwargs]})
    for name, (kwargs, *responses) in sorted(IFEVAL_CASES.items())
    for response in responses
]
FORMAT_INPUTS = [("<think>a</think> \\boxed{1}", None), ("no think block", None)]

# function -> (reward_func, inputs, the time limits to run, the metrics that say a limit fired)
FUNCTIONS: dict[str, tuple[Callable, list, list, tuple[str, ...]]] = {
    "code": (code.reward_func, CODE_INPUTS, [None, 1.0], ("code_timeout", "code_wall_timeout")),
    "math": (math_reward.reward_func, MATH_INPUTS, [None, 1.0], ("math_timeout", "math_wall_timeout")),
    "ifeval": (ifeval.reward_func, IFEVAL_INPUTS, [None], ()),
    "format": (format_reward.reward_func, FORMAT_INPUTS, [None], ()),
}


def start_burners(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def stop(burners: list[subprocess.Popen]) -> None:
    for proc in burners:  # by PID, never by name
        proc.kill()
        proc.wait()


def call(reward_func: Callable, response: str, label) -> tuple[float, dict, float]:
    start = time.perf_counter()
    out = reward_func([response], [""], [label])
    seconds = time.perf_counter() - start
    return out["rewards"].item(), {k: v.item() for k, v in out["extra_logs"].items()}, seconds


def fired(results: list, key: str) -> int:
    return int(sum(logs.get(key, 0.0) for _, logs, _ in results))


def run(name: str, limit: float | None, args: argparse.Namespace) -> dict:
    reward_func, inputs, _, limit_keys = FUNCTIONS[name]
    if limit is not None:
        reward_func = partial(reward_func, timeout=limit)
    n = args.threads * args.calls
    samples = [inputs[i % len(inputs)] for i in range(n)]
    serial = [call(reward_func, *sample) for sample in samples]

    burners = start_burners(args.burners)
    try:
        time.sleep(0.5)  # the burners are running before the burst starts
        start = time.perf_counter()
        with ThreadPoolExecutor(args.threads) as pool:
            # thread t makes calls t, t + threads, ...: every thread calls `calls` times
            results = list(pool.map(lambda sample: call(reward_func, *sample), samples))
        wall = time.perf_counter() - start
    finally:
        stop(burners)
    latencies = sorted(seconds for _, _, seconds in results)
    return {
        "function": name,
        "limit": "default" if limit is None else f"{limit:g} s",
        "samples": n,
        "per_s": n / wall,
        "p50": statistics.median(latencies),
        "p99": latencies[min(n - 1, round(0.99 * (n - 1)))],
        "max": latencies[-1],
        "fired": {
            key: (fired(serial, key), fired(results, key)) for key in limit_keys
        },
        "wrong": sum(got[0] != ref[0] for got, ref in zip(results, serial, strict=True)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=32)
    parser.add_argument("--calls", type=int, default=4, help="calls per thread, one sample each")
    parser.add_argument("--burners", type=int, default=3, help="CPU-spinning processes during the burst")
    parser.add_argument("--functions", nargs="+", default=list(FUNCTIONS), choices=list(FUNCTIONS))
    args = parser.parse_args()
    print(
        f"{args.threads} threads x {args.calls} calls, {args.burners} CPU burners, {os.cpu_count()} cores, "
        f"code sandboxes at once: {getattr(code, 'CONCURRENCY', 'n/a')}",
        flush=True,
    )
    print(f"{'function':<8} {'limit':<8} {'samples':>7} {'per s':>7} {'p50 s':>7} {'p99 s':>7} {'max s':>7}")
    rows = []
    for name in args.functions:
        for limit in FUNCTIONS[name][2]:
            rows.append(run(name, limit, args))
            row = rows[-1]
            limits = ", ".join(f"{k} {a} serial / {b} loaded" for k, (a, b) in row["fired"].items())
            print(
                f"{row['function']:<8} {row['limit']:<8} {row['samples']:>7} {row['per_s']:>7.1f} "
                f"{row['p50']:>7.2f} {row['p99']:>7.2f} {row['max']:>7.2f}  wrong {row['wrong']:>3}  "
                f"limits fired: {limits or '-'}",
                flush=True,
            )
    total = sum(row["wrong"] for row in rows)
    print(f"\nwrong verdicts under load: {total} of {sum(row['samples'] for row in rows)}")


if __name__ == "__main__":
    main()
