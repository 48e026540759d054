"""What the code reward's guarded comparisons cost: this checkout against the code reward at another commit.

    .venv/bin/python bench/code_guard_cost.py [--before 4050b77] [--repeats 12]

Scores one correct program under three test shapes with both versions, alternating calls so that both see
the same load, and prints the median wall time per call and the ratio. The other commit's
reward_fns/code.py is read with `git show` and runs on this checkout's sandbox.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from reward_fns import code  # noqa: E402

PROGRAM = "```python\ndef add(a, b):\n    return a + b\n```"
TESTS = {
    "3 asserts": "assert add(1, 2) == 3\nassert add(-1, 1) == 0\nassert add(5, 5) == 10\n",
    "10,000 comparisons in one assert": "assert all(add(i, i) == 2 * i for i in range(10000))\n",
    "one 10,000-element list compared": "assert [add(i, 1) for i in range(10000)] == list(range(1, 10001))\n",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before", default="4050b77", help="commit of the code reward to compare against")
    parser.add_argument("--repeats", type=int, default=12)
    args = parser.parse_args()
    show = ["git", "show", f"{args.before}:reward_fns/code.py"]
    source = subprocess.run(show, cwd=ROOT, check=True, capture_output=True, text=True).stdout
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as file:
        file.write(source)
    spec = importlib.util.spec_from_file_location("code_before", file.name)
    before = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(before)
    os.unlink(file.name)
    print(f"{'tests':36s} {args.before + ' ms':>12s} {'this ms':>9s} {'ratio':>6s}")
    for name, tests in TESTS.items():
        times: dict[str, list[float]] = {"before": [], "after": []}
        for _ in range(args.repeats):
            for label, module in (("before", before), ("after", code)):
                start = time.perf_counter()
                assert module.batch_reward([PROGRAM], [tests])[0].item() == 1.0, (label, name)
                times[label].append(time.perf_counter() - start)
        old, new = (statistics.median(times[label]) * 1000 for label in ("before", "after"))
        print(f"{name:36s} {old:12.1f} {new:9.1f} {new / old:6.2f}")


if __name__ == "__main__":
    main()
