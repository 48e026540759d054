"""Pieces shared by the reward functions: labels, response clean-up and the OpenRLHF entry point.

OpenRLHF 0.11.2 loads a reward file by path as a module named `reward_func`, so the modules of this
package import each other absolutely (`from reward_fns._common import ...`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch

logger = logging.getLogger("reward_fns")

BatchFn = Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]

# Chat-template end markers that `decode(..., skip_special_tokens=False)` leaves after the response
# (Qwen/Llama `<|...|>`, Mistral `</s>`, Gemma `<eos>`/`<end_of_turn>`).
_END_MARKERS = ("</s>", "<eos>", "<end_of_turn>")


def parse_label(label: Any) -> Any:
    """A label as stored in the data: a plain value, a dict, or a dict serialised as a JSON string."""
    if isinstance(label, str) and label.lstrip().startswith("{"):
        try:
            parsed = json.loads(label)
        except ValueError:
            return label  # e.g. the math answer "{1, 2}" is a set, not JSON
        if isinstance(parsed, dict):
            return parsed
    return label


def label_field(label: Any, field: str, index: int, *, plain_ok: bool = True) -> Any:
    """`label[field]` for a dict label; a plain label stands for `field` itself when `plain_ok`."""
    label = parse_label(label)
    if isinstance(label, dict):
        if label.get(field) is None:
            raise ValueError(f"labels[{index}]: missing field '{field}' (label has fields {sorted(label)})")
        return label[field]
    if not plain_ok or label is None or label == "":
        raise ValueError(
            f"labels[{index}]: missing field '{field}' (got {type(label).__name__} {str(label)[:80]!r}, "
            f"expected a dict with '{field}')"
        )
    return label


def strip_end_markers(text: str) -> str:
    text = text.rstrip()
    while True:
        start = text.rfind("<|") if text.endswith("|>") else -1
        if start >= 0 and not any(c.isspace() for c in text[start:]):
            text = text[:start].rstrip()
        elif text.endswith(_END_MARKERS):
            text = text[: text.rindex("<")].rstrip()
        else:
            return text


def final_answer(text: str, answer_only: bool = True) -> str:
    """The part of a response that is rewarded: without trailing end markers and, when `answer_only`,
    only what follows the last `</think>`; a `<think>` that is never closed leaves no answer."""
    text = strip_end_markers(text)
    if not answer_only:
        return text
    if "</think>" in text:
        return text.rsplit("</think>", 1)[1].strip()
    if "<think>" in text:
        return ""
    return text


def response_from_query(query: str, prompt: str | None) -> str:
    """OpenRLHF passes prompt + response decoded together; keep what follows the prompt."""
    if prompt:
        start = query.find(prompt)
        if start >= 0:
            return query[start + len(prompt) :]
    return query


def wall_limit(timeout: float, wall_timeout: float | None) -> float:
    """The wall-clock safety net behind a CPU-time `timeout` (default: 10 x timeout, at least 60 s). A
    busy machine stretches CPU time into far more wall time, so only a generous net is safe."""
    return max(60.0, 10 * timeout) if wall_timeout is None else wall_timeout


def make_reward_func(batch_fn: BatchFn, metrics: Sequence[str], error_key: str) -> Callable:
    """OpenRLHF's `reward_func(queries, prompts, labels, **kwargs)` around a batched reward.

    It never raises: any error gives reward 0 with `error_key` = 1, and `extra_logs` always has the keys
    `metrics`, as OpenRLHF concatenates them across samples.
    """

    def reward_func(queries: list[str], prompts: list[str], labels: list, **kwargs: Any) -> dict:
        n = len(queries)
        try:
            prompts = list(prompts) if prompts is not None else [None] * n
            responses = [response_from_query(q, p) for q, p in zip(queries, prompts, strict=True)]
            rewards, values = batch_fn(responses, list(labels), **kwargs)
            extra_logs = {key: values[key].float() for key in metrics}
        except Exception as exc:
            name = getattr(batch_fn, "__module__", batch_fn)
            if isinstance(exc, ValueError):  # bad input: the message names the label and field
                logger.error("reward %s: %s; reward 0", name, exc)
            else:
                logger.exception("reward %s failed; reward 0", name)
            rewards = torch.zeros(n)
            extra_logs = {key: torch.zeros(n) for key in metrics}
            extra_logs[error_key] = torch.ones(n)
        return {"rewards": rewards, "scores": rewards.clone(), "extra_logs": extra_logs}

    return reward_func
