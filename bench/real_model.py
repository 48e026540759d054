"""Throughput of the real model on CPU (SmolLM2-135M-Instruct, `aapa-rl model get`): generation, training
and the critic's share of a GRPO + AAPA step, measured in one run.

    .venv/bin/python bench/real_model.py [--prompts 8] [--group 4] [--new-tokens 64] [--threads 2]

Prints, each timed in this run: generation tokens per second unbatched (1 sequence) and batched (prompts x
group sequences) and their ratio; training tokens per second (forward + backward over the batched rollouts);
the MiniLM pairwise critic's time for the same rollouts as a share of the step (generation + training +
critic); and the process's peak resident memory.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

QUESTIONS = [
    "What is 12 plus 7?",
    "Name three primary colours.",
    "Write a haiku about rain.",
    "What is 30 minus 4?",
    "Give one synonym for happy.",
    "How many days are in a week?",
    "Spell the word cat backwards.",
    "What is the capital of France?",
    "Translate 'thank you' into French.",
    "What is 6 times 7?",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from aapa_rl.anchor import AnchorCritic, build_discriminator, load_encoder
    from aapa_rl.local.policy import generate, load_policy, load_tokenizer, response_log_probs
    from aapa_rl.models import get_model

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    path = str(get_model("smollm2-135m-instruct"))
    tokenizer = load_tokenizer(path)
    model = load_policy(path, tokenizer)
    prompts = [
        f"<|im_start|>user\n{QUESTIONS[i % len(QUESTIONS)]}<|im_end|>\n<|im_start|>assistant\n"
        for i in range(args.prompts)
    ]

    def timed(call):
        start = time.perf_counter()
        result = call()
        return result, time.perf_counter() - start

    with torch.no_grad():
        single, t_single = timed(
            lambda: generate(model, tokenizer, prompts[:1], max_new_tokens=args.new_tokens)
        )
        batch, t_batch = timed(
            lambda: generate(model, tokenizer, prompts, n=args.group, max_new_tokens=args.new_tokens)
        )
    single_rate = float(single.response_mask.sum()) / t_single
    batch_rate = float(batch.response_mask.sum()) / t_batch

    model.train()
    _, t_train = timed(lambda: (response_log_probs(model, batch) * batch.response_mask).sum().backward())
    train_rate = float(batch.response_mask.sum()) / t_train

    encoder = load_encoder("minilm")
    critic = AnchorCritic(build_discriminator("pairwise", encoder), missing_expert="skip")
    rollouts = [batch.texts[i * args.group : (i + 1) * args.group] for i in range(args.prompts)]
    experts = [texts[0] for texts in rollouts]  # any text: the cost is the encoder's, not the answer's
    critic.score(prompts, experts, rollouts)  # warm-up: loads the encoder, caches the experts
    _, t_critic = timed(lambda: critic.score(prompts, experts, rollouts))
    step = t_batch + t_train + t_critic
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    n = args.prompts * args.group
    print(
        f"SmolLM2-135M-Instruct, float32, {args.threads} torch threads; {args.prompts} prompts x "
        f"{args.group}, at most {args.new_tokens} new tokens; load average {os.getloadavg()[0]:.1f}"
    )
    print(f"generation, 1 sequence:        {single_rate:8.1f} tokens/s ({t_single:.1f} s)")
    print(
        f"generation, {n} sequences:     {batch_rate:8.1f} tokens/s ({t_batch:.1f} s), "
        f"{batch_rate / single_rate:.1f}x the single sequence's rate"
    )
    print(f"training (forward + backward): {train_rate:8.1f} tokens/s ({t_train:.1f} s)")
    print(
        f"critic (MiniLM pairwise):      {t_critic:8.2f} s = {t_critic / step:.1%} of "
        "generation + training + critic"
    )
    print(f"peak resident memory:          {peak_mb:8.0f} MB")


if __name__ == "__main__":
    main()
