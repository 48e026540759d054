"""Throughput and worst-case latency of the reward functions on typical and adversarial inputs.

    .venv/bin/python bench/rewards.py [--repeats 3]

Prints one table row per (function, input, mode): checks per second and the slowest single call.
"in-thread" runs the check in the calling thread with no timeout (what a naive reward function does),
"worker pool" goes through batch_reward's killable workers, "sandbox xK" runs K programs at once
(K = the process-wide limit, AAPA_CODE_CONCURRENCY).
The last lines compare the pool with in-thread math-verify and the 64-answer fast path with the
100 ms budget of a local-trainer step, both measured in this run.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

from test_reward_ifeval import CASES as IFEVAL_CASES  # noqa: E402  (one passing response per id)

from reward_fns import code, ifeval  # noqa: E402
from reward_fns import format as format_reward  # noqa: E402
from reward_fns import math as math_reward  # noqa: E402

ROWS: list[tuple[str, str, str, float, float]] = []


def measure(
    name: str, inputs: str, mode: str, call: Callable[[], object], checks: int, repeats: int
) -> float:
    """Runs `call` `repeats` times (each call makes `checks` checks); returns checks per second."""
    durations = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        durations.append(time.perf_counter() - start)
    rate = checks * repeats / sum(durations)
    ROWS.append((name, inputs, mode, rate, max(durations) * 1000))
    return rate


def math_in_thread(response: str, gold: str) -> float:
    """What batch_reward does for one answer, minus the fast path, the worker and the timeout."""
    answer, boxed = math_reward.extract_answer(response)
    return math_reward.check(gold, answer if boxed else response, boxed)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    repeats = parser.parse_args().repeats

    # ---- math
    logging.disable(logging.WARNING)  # math-verify warns on every in-thread call that its timeout is off
    # Imports, worker start-up and langdetect's profiles happen once, outside the timings.
    math_reward.batch_reward(["\\boxed{0.5}"] * 16, ["1/2"] * 16)
    math_in_thread("\\boxed{0.5}", "1/2")
    ifeval.detect_language("warm up")
    fast = ["7+5=12, 3+4+1=8. \\boxed{82}"] * 32 + ["7+5=12, 3+4=7. \\boxed{72}"] * 32
    fast_rate = measure(
        "math",
        "64 x \\boxed{82} (fast path)",
        "batch",
        lambda: math_reward.batch_reward(fast, ["82"] * 64),
        64,
        repeats,
    )
    typical = [
        ("\\boxed{\\frac{1}{2}}", "0.5"),
        ("\\boxed{(1,2]}", "(1, 2]"),
        ("\\boxed{\\sqrt{8}}", "2\\sqrt{2}"),
        ("the answer is $0.75$", "3/4"),
    ] * 4
    responses, golds = [r for r, _ in typical], [g for _, g in typical]
    thread_rate = measure(
        "math",
        "16 math-verify answers",
        "in-thread",
        lambda: [math_in_thread(r, g) for r, g in typical],
        16,
        repeats,
    )
    pool_rate = measure(
        "math",
        "16 math-verify answers",
        "worker pool",
        lambda: math_reward.batch_reward(responses, golds),
        16,
        repeats,
    )
    long_answer = "Let me think. " + "step " * 2_000 + "so \\boxed{\\frac{2}{4}}"
    measure("math", "10,000-char answer", "in-thread", lambda: math_in_thread(long_answer, "1/2"), 1, repeats)
    measure(
        "math",
        "10,000-char answer",
        "worker pool",
        lambda: math_reward.batch_reward([long_answer], ["1/2"]),
        1,
        repeats,
    )
    measure(
        "math",
        "9^{9^{9^{9}}} (sympy hangs), timeout 2 s",
        "worker pool",
        lambda: math_reward.batch_reward(["\\boxed{9^{9^{9^{9}}}}"], ["\\sqrt{82}"], timeout=2.0),
        1,
        1,
    )
    ROWS.append(("math", "9^{9^{9^{9}}} (sympy hangs)", "in-thread", 0.0, float("inf")))
    unclosed = "\\boxed{" * 8_000  # each unclosed box once scanned to the end of the text: 23 s
    measure(
        "math",
        "56,000-char '\\boxed{' flood, answer",
        "in-thread",
        lambda: math_reward.last_boxed(unclosed),
        1,
        repeats,
    )

    # ---- code
    program = "```python\ndef add(a, b):\n    return a + b\n```"
    tests = "assert add(1, 2) == 3\nassert add(2, 2) == 4\nassert add(-1, 1) == 0"
    measure(
        "code",
        "3 asserts, 8 programs",
        "sandbox x1",
        lambda: [code.batch_reward([program], [tests]) for _ in range(8)],
        8,
        1,
    )
    measure(
        "code",
        "3 asserts, 8 programs",
        f"sandbox x{code.CONCURRENCY}",
        lambda: code.batch_reward([program] * 8, [tests] * 8),
        8,
        1,
    )
    echo = "```python\nprint(sum(map(int, input().split())))\n```"
    cases = {"cases": [{"stdin": f"{i} {i}", "stdout": str(2 * i)} for i in range(4)]}
    measure(
        "code",
        "4 stdin/stdout cases, 4 programs",
        f"sandbox x{code.CONCURRENCY}",
        lambda: code.batch_reward([echo] * 4, [cases] * 4),
        4,
        1,
    )
    hostile = {
        "infinite loop (CPU limit 1 s)": "while True:\n    pass",
        "fork bomb": "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
        "stdout flood": "while True:\n    print('x' * 4096)",
        "memory hog": "x = bytearray(8 << 30)",
    }
    for label, source in hostile.items():
        measure(
            "code",
            label,
            "sandbox x1",
            lambda s=source: code.batch_reward([f"```python\n{s}\n```"], ["assert True"], timeout=1.0),
            1,
            1,
        )

    # ---- ifeval
    ids = sorted(IFEVAL_CASES)
    responses = [IFEVAL_CASES[i][1] for i in ids]
    labels = [{"instruction_id_list": [i], "kwargs": [IFEVAL_CASES[i][0]]} for i in ids]
    measure(
        "ifeval", "25 ids, one each", "in-thread", lambda: ifeval.batch_reward(responses, labels), 25, repeats
    )
    huge = ("WORD word, another Sentence here. " * 3_000).strip()
    every = {
        "instruction_id_list": [label["instruction_id_list"][0] for label in labels],
        "kwargs": [label["kwargs"][0] for label in labels],
    }
    measure(
        "ifeval",
        "100,000-char response, all 25 ids",
        "in-thread",
        lambda: ifeval.batch_reward([huge], [every]),
        1,
        repeats,
    )

    dots = {
        "instruction_id_list": ["length_constraints:number_sentences"],
        "kwargs": [{"num_sentences": 3, "relation": "less than"}],
    }
    measure(  # the sentence regex once backtracked quadratically on a run of dots: 23 s
        "ifeval",
        "30,000 dots, number_sentences",
        "in-thread",
        lambda: ifeval.batch_reward(["." * 30_000 + "x"], [dots]),
        1,
        repeats,
    )

    # ---- format
    measure(
        "format",
        "64 think/boxed responses",
        "in-thread",
        lambda: format_reward.batch_reward(fast, pattern="think_boxed", max_length=4096, overlong_buffer=512),
        64,
        repeats,
    )
    flood = "<think>" + "</think>" * 20_000
    measure(
        "format",
        "160,000-char '</think>' flood",
        "in-thread",
        lambda: format_reward.batch_reward([flood]),
        1,
        repeats,
    )
    boxes = "<think>" + "</think>\\boxed{" * 1_600  # the think_boxed regex took 9 s on this
    measure(
        "format",
        "24,000-char '</think>\\boxed{' flood",
        "think_boxed",
        lambda: format_reward.batch_reward([boxes], pattern="think_boxed"),
        1,
        repeats,
    )

    print(f"{'function':<8} {'input':<44} {'mode':<12} {'checks/s':>10} {'worst ms':>10}")
    for name, inputs, mode, rate, worst in ROWS:
        rate_text = f"{rate:10.1f}" if rate else "         -"
        worst_text = f"{worst:10.1f}" if worst != float("inf") else "     hangs"
        print(f"{name:<8} {inputs:<44} {mode:<12} {rate_text} {worst_text}")
    fast_ms = 64 / fast_rate * 1000
    print(f"\nmath fast path: 64 answers in {fast_ms:.2f} ms = {fast_ms / 100:.3f} x the 100 ms budget")
    print(f"math-verify worker pool vs in-thread: {pool_rate / thread_rate:.2f} x the in-thread throughput")
    print(f"code sandbox isolation active: {bool(code.isolation_available())}")


if __name__ == "__main__":
    main()
