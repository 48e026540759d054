"""Held-out evaluation: greedy accuracy and pass@k, response length, expert NLL, P(end | expert), D scores."""

from __future__ import annotations

import math

import torch

from aapa_rl.local.policy import autocast, generate, pack, response_log_probs, truncated
from reward_fns.combine import RewardFn, call_reward
from reward_fns.combine import load_reward as load_any_reward


def load_reward(spec, task=None) -> RewardFn:
    """ "arithmetic" (the task's flawed reward), else what reward_fns.combine.load_reward reads: a reward_fns
    module name, a .py file defining batch_reward, or a weighted-sum config."""
    if spec in (None, "arithmetic"):
        if task is None:
            from aapa_rl.local.task import ArithmeticTask

            task = ArithmeticTask()
        return task.reward
    return load_any_reward(spec)


def correctness(rewards: torch.Tensor, extras: dict[str, torch.Tensor]) -> torch.Tensor:
    """Honest correctness per sample: the reward's `correct` / `*_correct` log when it has one (a flawed or
    shaped reward can exceed 1 without being right), IFEval's prompt-level strict flag (every instruction
    followed; its reward is the followed fraction), else reward > 0."""
    for key, value in extras.items():
        if key in ("correct", "ifeval_strict_prompt") or key.endswith("_correct"):
            return value.float()
    return (rewards > 0).float()


def evaluate(
    model,
    tokenizer,
    rows: list[dict],
    reward_fn: RewardFn,
    *,
    max_new_tokens: int,
    dtype: str = "auto",
    discriminator=None,
    k: int = 0,
    temperature: float = 1.0,
    batch_size: int = 256,
) -> tuple[dict[str, float], list[dict]]:
    """Summary metrics and one record per row. Rows: {prompt, label, expert?}; without a top-level expert,
    the label dict's (where prepare-data puts it). With `k` > 0 also pass@k from k samples at
    `temperature`."""
    device = next(model.parameters()).device
    records: list[dict] = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        prompts, labels = [r["prompt"] for r in chunk], [r["label"] for r in chunk]
        batch = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, greedy=True, dtype=dtype)
        rewards, extras = call_reward(reward_fn, batch.texts, labels, prompts)
        correct = correctness(rewards, extras)
        cut = truncated(batch, tokenizer.eos_token_id)
        recs = [
            {
                "prompt": p,
                "label": lab,
                "response": t,
                "reward": float(rewards[i]),
                "correct": float(correct[i]),
                "length": float(batch.response_mask[i].sum()),
                "truncated": float(cut[i]),
                **{f"reward/{key}": float(v[i]) for key, v in extras.items()},
            }
            for i, (p, lab, t) in enumerate(zip(prompts, labels, batch.texts, strict=True))
        ]
        if k > 0:
            sampled = generate(
                model,
                tokenizer,
                prompts,
                n=k,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                dtype=dtype,
            )
            s_rewards, s_extras = call_reward(
                reward_fn,
                sampled.texts,
                [lab for lab in labels for _ in range(k)],
                [p for p in prompts for _ in range(k)],
            )
            hits = correctness(s_rewards, s_extras).view(len(chunk), k)
            for i, rec in enumerate(recs):
                rec[f"pass@{k}"] = float(hits[i].max())
        row_experts = [
            r.get("expert") or (r["label"].get("expert") if isinstance(r["label"], dict) else None)
            for r in chunk
        ]
        with_expert = [i for i, e in enumerate(row_experts) if e]
        if with_expert:
            experts = [row_experts[i] for i in with_expert]
            ebatch = pack(tokenizer, [prompts[i] for i in with_expert], experts, device)
            with torch.no_grad(), autocast(device, dtype):
                lp = response_log_probs(model, ebatch).float()
            mask = ebatch.response_mask
            n_tokens = mask.sum(-1)
            last = (n_tokens - 1).long()  # the eos closing the expert response
            p_end = lp.gather(1, last[:, None]).squeeze(1).exp()
            seq_logp = (lp * mask).sum(-1)
            if discriminator is not None:
                sub = [prompts[i] for i in with_expert]
                d_resp = discriminator.score(sub, [batch.texts[i] for i in with_expert], experts)
                d_exp = discriminator.score(sub, experts, experts, cached=True)
            for j, i in enumerate(with_expert):
                rec = recs[i]
                rec["expert_match"] = float(rec["response"].strip() == experts[j].strip())
                rec["expert_nll_seq"] = float(-seq_logp[j])
                rec["expert_nll_token"] = float(-seq_logp[j] / n_tokens[j])
                rec["p_end_after_expert"] = float(p_end[j])
                if discriminator is not None:
                    rec["d_response"], rec["d_expert"] = float(d_resp[j]), float(d_exp[j])
        records.extend(recs)
    summary: dict[str, float] = {"n": float(len(records))}
    keys = dict.fromkeys(k for r in records for k, v in r.items() if isinstance(v, float) and k != "label")
    for key in keys:
        values = [r[key] for r in records if key in r]
        summary[key] = sum(values) / len(values) if values else math.nan
    summary["accuracy"] = summary.pop("correct", math.nan)
    return summary, records


def format_table(rows: dict[str, dict[str, float]], columns: list[tuple[str, str]]) -> str:
    """A plain-text table: one line per named row, columns given as (key, header)."""
    width = max([len(name) for name in rows] + [4])
    header = f"{'':{width}s}  " + "  ".join(f"{h:>{max(len(h), 7)}s}" for _, h in columns)
    lines = [header, "-" * len(header)]
    for name, values in rows.items():
        cells = []
        for key, h in columns:
            v = values.get(key)
            cells.append(
                f"{v:>{max(len(h), 7)}.3f}" if isinstance(v, (int, float)) else f"{'-':>{max(len(h), 7)}s}"
            )
        lines.append(f"{name:{width}s}  " + "  ".join(cells))
    return "\n".join(lines)
