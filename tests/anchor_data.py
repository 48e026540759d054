"""A small made-up expert set for the anchor tests: word problems with multi-sentence expert solutions."""

from __future__ import annotations

import json
import random
from pathlib import Path

NAMES = ("Ada", "Ben", "Chen", "Dana", "Eli", "Fay", "Gus", "Hana")
ITEMS = ("apples", "stamps", "marbles", "books", "coins", "shells")
SOLUTIONS = (
    "{n} starts with {a} {i}. Buying {b} more adds {b}. So {n} has {a} + {b} = {s} {i}. The answer is {s}.",
    "We add the two amounts. {a} + {b} = {s}. Therefore {n} now has {s} {i}. The answer is {s}.",
    "First, {n} had {a} {i}. Then {n} got {b} more, for {a} + {b} = {s} in total. The answer is {s}.",
    "The total is the sum {a} + {b}. Adding the tens and ones gives {s}. {n} has {s} {i}. The answer is {s}.",
)


def make_records(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    records = []
    for k in range(n):
        a, b, name, item = rng.randint(10, 99), rng.randint(10, 99), rng.choice(NAMES), rng.choice(ITEMS)
        prompt = f"Problem {k}: {name} has {a} {item} and buys {b} more. How many {item} does {name} have?"
        fill = {"n": name, "a": a, "b": b, "s": a + b, "i": item}
        records.append({"prompt": prompt, "expert": rng.choice(SOLUTIONS).format(**fill), "id": f"p{k}",
                        "fill": fill})
    return records


def same_distribution_rollouts(records: list[dict], seed: int = 1) -> list[dict]:
    """Rollouts drawn like the experts (another template, same answer): indistinguishable from them."""
    rng = random.Random(seed)
    rows = []
    for r in records:
        others = [s.format(**r["fill"]) for s in SOLUTIONS]
        response = rng.choice([o for o in others if o != r["expert"]])
        rows.append({"prompt": r["prompt"], "response": response})
    return rows


def degenerate_rollouts(records: list[dict]) -> list[dict]:
    """Rollouts a drifting policy produces: the answer repeated with no working."""
    return [{"prompt": r["prompt"], "response": f"The answer is {r['fill']['s']}. " * 4} for r in records]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps({k: v for k, v in row.items() if k != "fill"}) + "\n" for row in rows))
    return path
