"""The SFT start that a drift comparison begins from, with its frozen reference discriminator: the demo and
bench/drift.py build it with `build_start`.

1. SFT-warm the model with `recipe` (its arithmetic task writes the data into recipe.out/data).
2. Sample reference rollouts for the first training prompts and train the discriminator on them, on their
   prompts' experts and on generic negatives (its report holds out 20% of those prompts).
3. Evaluate the start greedily on the held-out prompts, with the discriminator's scores.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

from aapa_rl.local.recipe import Recipe


@dataclass
class Start:
    sft: object  # the finished SFT Trainer: its policy, tokenizer and recipe
    discriminator: object
    report: dict  # the discriminator's training report
    eval: dict  # the start's held-out greedy evaluation, D included
    fingerprint: str  # of the start's weights: equal fingerprints mean bit-identical starts
    seconds: dict[str, float]


def build_start(
    recipe: Recipe, out: Path, *, rollout_prompts: int, samples: int, variant: str, encoder: str, steps: int
) -> Start:
    """Train the SFT start (recipe.out) and the discriminator (out/discriminator; rollouts in
    out/reference_rollouts.jsonl), then evaluate the start."""
    from aapa_rl.local.evaluation import evaluate
    from aapa_rl.local.trainer import Trainer, load_rows

    seconds = {}
    t0 = time.perf_counter()
    sft = Trainer(recipe)
    sft.fit()
    seconds["sft"] = time.perf_counter() - t0
    weights = hashlib.sha256(b"".join(p.detach().cpu().numpy().tobytes() for p in sft.policy.parameters()))

    t0 = time.perf_counter()
    data = Path(recipe.out) / "data"
    rows = load_rows(data / "train.jsonl", ("prompt",), ("label",))[:rollout_prompts]
    disc, report = train_reference_discriminator(sft, rows, samples, out, variant, encoder, steps=steps)
    seconds["reference rollouts + discriminator"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    eval_rows = load_rows(data / "eval.jsonl", ("prompt",), ("label",))[: recipe.log.eval_samples]
    summary, _ = evaluate(
        sft.policy,
        sft.tokenizer,
        eval_rows,
        recipe.task.reward,
        max_new_tokens=recipe.rollout.max_new_tokens,
        discriminator=disc,
    )
    seconds["eval of the SFT start"] = time.perf_counter() - t0
    return Start(sft, disc, report, summary, weights.hexdigest()[:16], seconds)


def train_reference_discriminator(
    sft, rows: list[dict], samples: int, out: Path, variant: str, encoder: str, *, steps: int
) -> tuple:
    """Sample `samples` reference rollouts per prompt from the SFT trainer's policy (written to
    out/reference_rollouts.jsonl) and train the frozen discriminator in out/discriminator.

    It learns from the experts of the sampled prompts (positives and generic negatives) and the rollouts;
    its report holds out 20% of those prompts. Fewer experts keep the features small. Returns (disc, report).
    """
    from aapa_rl.anchor import ExpertBank, build_discriminator, train_discriminator
    from aapa_rl.local.policy import generate

    prompts = [r["prompt"] for r in rows]
    max_new_tokens = sft.recipe.rollout.max_new_tokens
    batch = generate(sft.policy, sft.tokenizer, prompts, n=samples, max_new_tokens=max_new_tokens)
    pairs = [(prompts[i // samples], text) for i, text in enumerate(batch.texts)]
    with open(out / "reference_rollouts.jsonl", "w") as f:
        for prompt, response in pairs:
            f.write(json.dumps({"prompt": prompt, "response": response}) + "\n")
    full_bank = ExpertBank.load(Path(sft.recipe.out) / "data" / "experts.jsonl")
    sampled = set(prompts)
    bank = ExpertBank([x for x in full_bank.records if x.prompt in sampled], source=full_bank.source)
    disc_dir = out / "discriminator"
    disc = build_discriminator(variant, encoder, cache_dir=disc_dir / "embedding_cache")
    return disc, train_discriminator(disc, bank, pairs, disc_dir, steps=steps, seed=0)
