"""Format reward: 1 when the response matches a template or regex, plus an optional overlong penalty.

`pattern` is a template name from TEMPLATES or a regular expression that must match the whole
response (re.DOTALL). By default the whole response is checked (`answer_only=False`), since the
templates are about the reasoning block. `max_length` adds DAPO's soft overlong penalty, measured in
characters (the reward function sees text only): 0 up to `max_length - overlong_buffer`, falling
linearly to -1 at `max_length`, -1 beyond. Labels are not used. OpenRLHF: `--reward.remote_url
reward_fns/format.py` (the "think" template).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

from reward_fns._common import final_answer, make_reward_func

TEMPLATES = {
    "think": r"\s*<think>.*?</think>\s*\S.*",  # a reasoning block, then a non-empty answer
    "boxed": r".*\\boxed\{.+\}.*",  # a boxed final answer somewhere
    "think_boxed": r"\s*<think>.*?</think>.*\\boxed\{.+\}.*",
}
METRICS = ("format_match", "format_overlong_penalty", "format_error")


def _boxed(text: str) -> bool:
    """TEMPLATES["boxed"] without the regex's backtracking (quadratic on many unclosed boxes): a
    `\\boxed{`, then at least one character, then a `}` somewhere after it."""
    box = text.find("\\boxed{")
    return box >= 0 and text.rfind("}", box + len("\\boxed{") + 1) >= 0


def _think_boxed(text: str) -> bool:
    """TEMPLATES["think_boxed"] in linear time (the regex is about cubic on many `</think>\\boxed{`):
    the first `</think>` after the opening `<think>` leaves the most room for the box."""
    text = text.lstrip()
    end = text.find("</think>", len("<think>"))
    return text.startswith("<think>") and end >= 0 and _boxed(text[end + len("</think>") :])


# Templates checked by a function of the same verdict as their regex, which can be slow.
_CHECKS = {"boxed": _boxed, "think_boxed": _think_boxed}


def overlong_penalty(lengths: Sequence[int] | torch.Tensor, max_length: int, buffer: int) -> torch.Tensor:
    """DAPO's soft overlong punishment per sample: 0 for length <= max_length - buffer, then linearly
    down to -1 at max_length, and -1 beyond (a step at max_length when buffer is 0)."""
    if buffer < 0 or buffer > max_length:
        raise ValueError(f"overlong buffer must be in [0, max_length={max_length}], got {buffer}")
    lengths = torch.as_tensor(lengths, dtype=torch.float32)
    if buffer == 0:
        return -(lengths > max_length).float()
    return ((max_length - buffer - lengths) / buffer).clamp(-1.0, 0.0)


def batch_reward(
    responses: list[str],
    labels: list | None = None,
    *,
    pattern: str = "think",
    max_length: int | None = None,
    overlong_buffer: int = 0,
    answer_only: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Rewards (N,) = match (0/1) + overlong penalty (in [-1, 0]); per-sample metrics named in METRICS."""
    if labels is not None and len(labels) != len(responses):
        raise ValueError(f"{len(responses)} responses but {len(labels)} labels")
    regex = re.compile(TEMPLATES.get(pattern, pattern), re.DOTALL)
    matches = _CHECKS.get(pattern, lambda text: regex.fullmatch(text) is not None)
    texts = [final_answer(response, answer_only) for response in responses]
    match = torch.tensor([float(matches(text)) for text in texts])
    penalty = torch.zeros(len(texts))
    if max_length is not None:
        penalty = overlong_penalty([len(text) for text in texts], max_length, overlong_buffer)
    metrics = {
        "format_match": match,
        "format_overlong_penalty": penalty,
        "format_error": torch.zeros(len(texts)),
    }
    return match + penalty, metrics


reward_func = make_reward_func(batch_reward, METRICS, "format_error")
