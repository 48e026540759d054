"""Weighted sums of the reward functions, built from config.

    build_reward({"math": 1.0, "format": {"weight": 0.1, "pattern": "think"}})
    build_reward([{"name": "math", "weight": 1.0, "timeout": 3}, {"name": "format", "weight": 0.1}])

Each entry names one of REWARDS with a weight and that function's options. The result takes
(responses, labels) like each batch_reward and returns (sum of weight * reward, metrics): every
component's own metrics plus "<name>_reward" (its unweighted reward). For OpenRLHF, a three-line file:

    from reward_fns.combine import reward_func_from_config
    reward_func = reward_func_from_config({"math": 1.0, "format": 0.1})
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable
from typing import Any

import torch

from reward_fns._common import make_reward_func

REWARDS = ("math", "code", "ifeval", "format")


def _entries(config: dict | list) -> list[tuple[str, float, dict[str, Any]]]:
    if isinstance(config, dict):
        config = [
            {"name": name, "weight": spec} if not isinstance(spec, dict) else {"name": name, **spec}
            for name, spec in config.items()
        ]
    if not isinstance(config, list) or not config:
        raise ValueError(f"reward config must be a non-empty dict or list, got {config!r}")
    entries = []
    for i, entry in enumerate(config):
        if not isinstance(entry, dict) or "name" not in entry:
            raise ValueError(f"reward config entry {i}: missing field 'name' (got {entry!r})")
        options = dict(entry)
        name = options.pop("name")
        if name not in REWARDS:
            raise ValueError(f"reward config entry {i}: unknown reward {name!r}; known: {REWARDS}")
        if any(name == other for other, _, _ in entries):
            raise ValueError(f"reward config entry {i}: {name!r} appears twice")
        weight = options.pop("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(weight):
            raise ValueError(f"reward config entry {i} ({name}): 'weight' must be a finite number, "
                             f"got {weight!r}")
        entries.append((name, float(weight), options))
    return entries


def build_reward(
    config: dict | list,
) -> Callable[[list[str], list], tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """A batched reward that is the weighted sum of the configured ones; its `metrics` attribute lists
    the metric names it returns."""
    components = []
    metric_names = ["reward_error"]
    for name, weight, options in _entries(config):
        module = importlib.import_module(f"reward_fns.{name}")
        accepted = [
            p.name
            for p in inspect.signature(module.batch_reward).parameters.values()
            if p.kind == p.KEYWORD_ONLY
        ]
        if unknown := sorted(set(options) - set(accepted)):
            raise ValueError(f"reward config {name!r}: unknown options {unknown}; it accepts {accepted}")
        components.append((name, weight, module.batch_reward, options))
        metric_names += [f"{name}_reward", *module.METRICS]

    def combined(responses: list[str], labels: list) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        total = torch.zeros(len(responses))
        metrics = {"reward_error": torch.zeros(len(responses))}
        for name, weight, batch_reward, options in components:
            rewards, values = batch_reward(responses, labels, **options)
            total += weight * rewards
            metrics[f"{name}_reward"] = rewards
            metrics.update(values)
        return total, metrics

    combined.metrics = tuple(metric_names)
    return combined


def reward_func_from_config(config: dict | list) -> Callable:
    """OpenRLHF's reward_func(queries, prompts, labels) for a weighted sum (see reward_fns._common)."""
    combined = build_reward(config)
    return make_reward_func(combined, combined.metrics, "reward_error")
