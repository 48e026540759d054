"""Loading rewards (`load_reward`: the one way every command does it) and weighted sums of them.

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
import importlib.util
import inspect
import math
import pkgutil
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from reward_fns._common import make_reward_func

REWARDS = ("math", "code", "ifeval", "format")
RewardFn = Callable[[list[str], list], tuple[torch.Tensor, dict[str, torch.Tensor]]]
SLOW_REWARD_NOTICE_S = 300.0  # a reward call running longer is named on stderr (it may hang)


class RewardError(ValueError):
    """A reward's output broke the contract (one finite reward per response): the message names the reward."""


def load_reward(spec: str | dict | list) -> RewardFn:
    """A batched reward `(responses, labels) -> (rewards, metrics)` from a reward_fns module name, a path to a
    .py file, or a weighted-sum config (build_reward). A file defines `batch_reward(responses, labels)`, or
    OpenRLHF's `reward_func(queries, prompts, labels)` exactly as for `--reward.remote_url`; call the result
    with `call_reward`, which gives the latter its prompts. Errors are ValueErrors that name the spec."""
    if isinstance(spec, dict | list):
        return build_reward(spec)
    if spec.endswith(".py"):
        if not Path(spec).is_file():
            raise ValueError(f"{spec}: no such reward file")
        loader = importlib.util.spec_from_file_location(Path(spec).stem, spec)
        module = importlib.util.module_from_spec(loader)
        try:
            loader.loader.exec_module(module)
        except Exception as exc:  # a SyntaxError, or whatever the file raises at import
            raise ValueError(f"{spec}: cannot be loaded: {type(exc).__name__}: {exc}") from exc
    else:
        module = _module(spec)
    if callable(getattr(module, "batch_reward", None)):
        return module.batch_reward
    if callable(getattr(module, "reward_func", None)):
        return _from_reward_func(module.reward_func, spec)
    raise ValueError(f"reward {spec!r} defines neither batch_reward(responses, labels) nor "
                     "reward_func(queries, prompts, labels)")


def call_reward(
    reward: RewardFn, responses: list[str], labels: list, prompts: list[str]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(rewards, metrics) of a loaded reward; one adapted from a `reward_func` also gets the prompts. The
    local and TRL backends call rewards here (OpenRLHF calls its own), so the output is checked here: one
    finite float32 reward per response and metrics of the same length, else a RewardError (a ValueError)
    naming the reward and the count or the sample."""
    name = reward_name(reward)
    # A reward that hangs never returns and nothing else would name it: say which, without stopping it.
    notice = threading.Timer(SLOW_REWARD_NOTICE_S, print, [
        f"reward {name!r}: no result after {SLOW_REWARD_NOTICE_S:.0f} s for {len(responses)} responses; if "
        "it hangs, stop the run (a resume continues from its last checkpoint)"], {"file": sys.stderr})
    notice.daemon = True
    notice.start()
    try:
        if getattr(reward, "takes_prompts", False):
            out = reward(responses, labels, prompts=prompts)
        else:
            out = reward(responses, labels)
    finally:
        notice.cancel()
    if not isinstance(out, tuple | list) or len(out) != 2 or not isinstance(out[1], dict):
        raise RewardError(f"reward {name!r}: returned {type(out).__name__}, expected (rewards, metrics dict)")
    rewards = _per_sample(out[0], len(responses), f"reward {name!r}", "rewards")
    bad = (~rewards.isfinite()).nonzero().reshape(-1)
    if len(bad):
        i = int(bad[0])
        raise RewardError(f"reward {name!r}: non-finite reward {rewards[i].item()} for sample {i} "
                         f"({len(bad)} of {len(responses)})")
    metrics = {key: _per_sample(value, len(responses), f"reward {name!r}: metric {key!r}", "values")
               for key, value in out[1].items()}
    return rewards, metrics


def stopping_reward(reward: RewardFn, where: str) -> RewardFn:
    """`reward`, with an exception it raises (the user's code) turned into a RewardError naming it, the
    exception and `where` ("at step 3"): every backend stops a run on it as on a broken output (its CLI
    prints the traceback, then the last checkpoint)."""
    name = reward_name(reward)

    def scored(*args, **kwargs):
        try:
            return reward(*args, **kwargs)
        except RewardError:
            raise
        except Exception as exc:
            raise RewardError(f"reward {name!r} raised {type(exc).__name__} {where}: {exc}") from exc

    # What call_reward reads: the name errors give, and whether the reward takes the prompts.
    scored.reward_name, scored.takes_prompts = name, getattr(reward, "takes_prompts", False)
    return scored


def reward_name(reward: RewardFn) -> str:
    """How errors name a reward: its spec (set by the wrappers load_reward builds), else the file and name
    of the function."""
    if name := getattr(reward, "reward_name", None):
        return name
    func = getattr(reward, "__func__", reward)  # a bound method: the task's reward
    code = getattr(func, "__code__", None)
    qualname = getattr(func, "__qualname__", type(reward).__name__)
    return f"{code.co_filename}:{qualname}" if code else qualname


def _per_sample(values: Any, n: int, what: str, unit: str) -> torch.Tensor:
    """`values` as a float32 1-D tensor of `n` (one per response): the one rule for every reward's output."""
    try:
        values = torch.as_tensor(values, dtype=torch.float32).reshape(-1)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise RewardError(f"{what}: {unit} are not numbers ({type(exc).__name__}: {exc})") from None
    if len(values) != n:
        raise RewardError(f"{what}: {len(values)} {unit} for {n} responses")
    return values


def _from_reward_func(reward_func: Callable, name: str) -> RewardFn:
    """OpenRLHF's `reward_func(queries, prompts, labels)` as a batched reward (a query: prompt + response).
    call_reward converts and checks what it returns."""

    def batched(responses: list[str], labels: list, *, prompts: list[str]):
        queries = [p + r for p, r in zip(prompts, responses, strict=True)]
        out = reward_func(queries, list(prompts), list(labels))
        rewards, logs = out, {}
        if isinstance(out, dict):  # OpenRLHF's format: {"rewards", "scores", "extra_logs"}
            rewards, logs = out.get("rewards"), out.get("extra_logs") or {}
        if rewards is None:
            raise RewardError(f"reward {name!r}: reward_func returned a dict without 'rewards'")
        return rewards, logs

    batched.takes_prompts = True
    batched.reward_name = name
    return batched


def _module(name: str):
    try:
        return importlib.import_module(f"reward_fns.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"reward_fns.{name}":
            raise  # the module exists but one of its imports does not
        import reward_fns

        modules = pkgutil.iter_modules(reward_fns.__path__)
        known = sorted(m.name for m in modules if m.name[0] != "_" and m.name != "combine")
        raise ValueError(f"unknown reward function {name!r}; available: {', '.join(known)} "
                         "or a path to a .py file defining batch_reward") from e


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


def build_reward(config: dict | list) -> RewardFn:
    """A batched reward that is the weighted sum of the configured ones; its `metrics` attribute lists
    the metric names it returns."""
    components = []
    metric_names = ["reward_error"]
    for name, weight, options in _entries(config):
        module = _module(name)
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
    combined.reward_name = "+".join(name for name, _, _, _ in components)
    return combined


def reward_func_from_config(config: dict | list) -> Callable:
    """OpenRLHF's reward_func(queries, prompts, labels) for a weighted sum (see reward_fns._common)."""
    combined = build_reward(config)
    return make_reward_func(combined, combined.metrics, "reward_error")
