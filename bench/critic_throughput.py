"""Rollouts per second through the critic's part of a step (AnchorCritic.score and anchor_step, experts
cached) vs the encoder's raw throughput.

Raw = encoder.encode on the texts the critic embeds, measured in the same run, interleaved with the
critic runs (best of --repeats for both, so a busy shared machine hurts both alike). Target: ratio >= 0.8.
Those texts are the rollouts, except for `aligned`, which embeds each rollout's sentences instead (its
encoder work, however the encoder batches it); its ratio against encoding whole rollouts is printed too.
Rates are rollouts per second either way. Rollouts are ~230 characters (~60 word/punctuation tokens).

On top of the encoder, the critic computes the response statistics (trained variants), runs the head, and
for `aligned` splits sentences and matches them. The last columns split the critic's time per batch: the
encoder's share (the raw timing), the statistics, the head, and the rest (feature assembly, sentence split
and matching, bookkeeping). The target leaves the non-encoder parts a quarter of the encoder's time.

glibc returns freed memory to the OS and page-faults it back on the next call; on this VM each page costs
~1 us, and how often it happens depends on the heap's history, not on the code (hash encoder: 10 to 35 us
per rollout between runs). So the bench keeps freed memory (mallopt) for both sides; --malloc-defaults
measures without that.

    .venv/bin/python bench/critic_throughput.py [--prompts 32] [--group 8] [--encoders hash minilm]
"""

from __future__ import annotations

import argparse
import ctypes
import random
import time

import torch

from aapa_rl.anchor import (
    AnchorCritic,
    ExpertBank,
    ExpertRecord,
    anchor_step,
    build_discriminator,
    load_encoder,
)
from aapa_rl.anchor.discriminator import MAX_SENTENCES, split_sentences, text_stats
from aapa_rl.schedule import ScheduleValues, Stage
from aapa_rl.settings import AapaSettings

STEPS = (
    "We start from the numbers {a} and {b}.",
    "Adding the ones digits gives {o}.",
    "Adding the tens digits and the carry gives {t}.",
    "Checking by subtraction, {s} - {b} = {a}.",
    "So the sum of {a} and {b} is {s}.",
    "The final answer is \\boxed{{{s}}}.",
)


def make_batch(num_prompts: int, group: int, seed: int = 0):
    rng = random.Random(seed)
    records, rollouts = [], []
    for k in range(num_prompts):
        a, b = rng.randint(100, 999), rng.randint(100, 999)
        fill = {"a": a, "b": b, "s": a + b, "o": a % 10 + b % 10, "t": a // 10 + b // 10}
        expert = " ".join(s.format(**fill) for s in STEPS)
        records.append(ExpertRecord(f"Problem {k}: what is {a} + {b}?", expert, str(k), None, k))
        # Rollouts: the expert with steps dropped, repeated or its answer changed, ~80-160 tokens each.
        group_rollouts = []
        for _ in range(group):
            steps = [s.format(**fill) for s in STEPS if rng.random() > 0.2]
            steps += [steps[-1]] * rng.randint(0, 3) if steps else []
            group_rollouts.append(" ".join(steps).replace(str(a + b), str(a + b + rng.randint(0, 1))))
        rollouts.append(group_rollouts)
    return ExpertBank(records), [r.prompt for r in records], rollouts


def keep_freed_memory() -> bool:
    """Turn off glibc's trimming of the heap and mmap for blocks up to 32 MiB (False where not glibc)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_trim_threshold, 1 << 30)) and bool(libc.mallopt(m_mmap_threshold, 32 << 20))


def seconds(loops: int, fn, *args, **kwargs) -> float:
    """Mean wall time of `loops` calls."""
    start = time.perf_counter()
    for _ in range(loops):
        fn(*args, **kwargs)
    return (time.perf_counter() - start) / loops


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--encoders", nargs="+", default=["hash", "minilm"])
    parser.add_argument("--variants", nargs="+", default=["cosine", "pairwise", "classifier", "aligned"])
    parser.add_argument("--device", default=None)
    parser.add_argument(
        "--threads", type=int, default=2, help="torch threads (2: this machine's cores; numpy uses one)"
    )
    parser.add_argument(
        "--malloc-defaults",
        action="store_true",
        help="leave glibc's malloc settings alone (freed memory goes back to the OS)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    malloc = (
        "glibc defaults"
        if args.malloc_defaults
        else ("freed memory kept" if keep_freed_memory() else "defaults (not glibc)")
    )

    bank, prompts, rollouts = make_batch(args.prompts, args.group)
    flat = [y for group in rollouts for y in group]
    sentences = [s for y in flat for s in split_sentences(y)[:MAX_SENTENCES]]  # what `aligned` embeds
    flat_prompts = [p for p in prompts for _ in range(args.group)]
    flat_experts = [bank.expert_for(prompt=p) for p in flat_prompts]
    rewards = torch.zeros(args.prompts, args.group)
    experts = [bank.expert_for(prompt=p) for p in prompts]
    values = ScheduleValues(0, 0, "grpo", lam=1.0, alpha=0.1, rho=0.25, mu=0.0)
    settings = AapaSettings(stages=[Stage(1, "grpo", lam=1.0, rho=0.25)])
    print(
        f"{len(flat)} rollouts per batch ({args.prompts} prompts x {args.group}, {len(sentences)} "
        f"sentences), torch threads {torch.get_num_threads()}, best of {args.repeats}, malloc: {malloc}"
    )
    print(
        f"{'encoder':8s} {'variant':11s} {'raw input':>10s} {'raw enc/s':>10s} {'critic/s':>10s} "
        f"{'ratio':>6s} {'':12s} | ms per batch: {'encoder':>7s} {'stats':>6s} {'head':>6s} {'rest':>6s}"
    )
    for spec in args.encoders:
        encoder = load_encoder(spec, args.device)
        # Warm-up (allocations, lazy init, kernels for these shapes); fast encoders loop to >= 0.3 s a timing.
        loops = max(1, round(0.3 / seconds(1, encoder.encode, flat)))
        for variant in args.variants:
            disc = build_discriminator(variant, encoder)
            critic = AnchorCritic(disc)

            def critic_step(critic=critic):
                return anchor_step(values, settings, critic.score(prompts, experts, rollouts), rewards)

            critic_step()  # caches experts and prompts
            features = disc.features(flat_prompts, flat, flat_experts if disc.needs_expert else None)
            texts = sentences if variant == "aligned" else flat
            raw, whole, scored, stats, head = [], [], [], [], []
            for _ in range(args.repeats):  # interleaved so load changes hit all alike
                raw.append(seconds(loops, encoder.encode, texts))
                scored.append(seconds(loops, critic_step))
                if texts is sentences:
                    whole.append(seconds(loops, encoder.encode, flat))
                stats.append(seconds(loops, text_stats, flat) if disc.trainable else 0.0)
                head.append(seconds(loops, disc.score_features, features))
            raw_rate, critic_rate = len(flat) / min(raw), len(flat) / min(scored)
            verdict = "ok" if critic_rate >= 0.8 * raw_rate else "BELOW TARGET"
            ms = [1000 * min(t) for t in (raw, scored, stats, head)]
            print(
                f"{spec:8s} {variant:11s} {'sentences' if texts is sentences else 'rollouts':>10s} "
                f"{raw_rate:10.1f} {critic_rate:10.1f} {critic_rate / raw_rate:6.2f} {verdict:12s} | "
                f"{'':14s} {ms[0]:7.2f} {ms[2]:6.2f} {ms[3]:6.2f} {ms[1] - ms[0] - ms[2] - ms[3]:6.2f}",
                flush=True,
            )
            if whole:
                whole_rate = len(flat) / min(whole)
                print(
                    f"{'':20s} {'(rollouts':>10s} {whole_rate:10.1f} {critic_rate:10.1f} "
                    f"{critic_rate / whole_rate:6.2f} for reference)",
                    flush=True,
                )


if __name__ == "__main__":
    main()
