"""Recipes (YAML) -> the exact OpenRLHF command, and the dry-run checks that need no GPU.

A recipe has two sections: `openrlhf:` (stock train_ppo_ray flags without the leading `--`; `true` is a bare
flag, `false` leaves it out, a list gives several values) and, for AAPA runs, `aapa:` (the `--aapa.*` flags).
Flags given after `--` on the command line come last, so they override the recipe's values (argparse keeps
the last one; a bare flag cannot be turned off).
"""

from __future__ import annotations

from . import pinned  # noqa: F401  (refuses another OpenRLHF version before using its internals)

# isort: split

import argparse
import ast
import contextlib
import importlib.util
import json
import os
import re
import shlex
import sys
from collections.abc import Callable
from pathlib import Path

import yaml

from aapa_rl.objectives import hard_set_budget
from aapa_rl.settings import AapaSettings
from reward_fns.combine import RewardError, RewardFn, load_reward

from .settings import GROUP_ESTIMATORS, AapaConfigError, check_files, dests, refused, split_argv

LAUNCH_MODULE = "aapa_rl.openrlhf_adapter.launch"
STOCK_MODULE = "openrlhf.cli.train_ppo_ray"
DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".arrow", ".txt")
OUTPUT_FLAGS = ("ckpt.path", "ckpt.output_dir", "logger.tensorboard_dir")
# OpenRLHF 0.11.2's defaults (cli/train_ppo_ray.py) for the flags the checks read; a test compares them with
# the values its real parser produces.
DEFAULTS = {
    "actor.num_nodes": 1, "actor.num_gpus_per_node": 8, "ref.num_nodes": 1, "ref.num_gpus_per_node": 8,
    "critic.num_nodes": 1, "critic.num_gpus_per_node": 8, "reward.num_nodes": 1,
    "reward.num_gpus_per_node": 8,
    "vllm.num_engines": None, "vllm.tensor_parallel_size": 1, "train.batch_size": 128,
    "train.micro_batch_size": 1, "rollout.batch_size": 1024, "rollout.micro_batch_size": 1,
    "rollout.n_samples_per_prompt": 1, "algo.kl.init_coef": 0.01, "algo.advantage.estimator": "gae",
    "ds.ring_attn_size": 1, "ds.tensor_parallel_size": 1, "train.async_enable": False,
    "train.dynamic_batch_enable": False, "train.colocate_all": False, "train.colocate_actor_ref": False,
    "train.colocate_critic_reward": False, "data.input_key": "input", "data.label_key": None,
    "data.prompt_dataset": None, "actor.model_name_or_path": None, "reward.remote_url": None,
    "eval.dataset": None, "data.input_template": None, "data.apply_chat_template": False,
    "ckpt.path": "./ckpt/checkpoints_ppo_ray", "ckpt.load_enable": False, "ckpt.output_dir": "./ckpt",
    "ds.zero_stage": 2, "ds.use_universal_ckpt": False,
    "logger.tensorboard_dir": None,
}


class RecipeError(ValueError):
    """A recipe entry that cannot become a command; the message names the file and key."""


def openrlhf_flags() -> dict[str, dict]:
    """Every flag train_ppo_ray.py defines, read from its source (importing it needs vLLM): name -> the
    literal `action`, `nargs`, `default` and the `type` (int, float or str) of its add_argument call, which
    the dry run's parser copies."""
    package = Path(importlib.util.find_spec("openrlhf").submodule_search_locations[0])
    flags = {}
    for call in ast.walk(ast.parse((package / "cli" / "train_ppo_ray.py").read_text())):
        if not (isinstance(call, ast.Call) and getattr(call.func, "attr", None) == "add_argument"):
            continue
        spec = {}
        for keyword in call.keywords:
            if keyword.arg == "type" and getattr(keyword.value, "id", None) in ("int", "float", "str"):
                spec["type"] = {"int": int, "float": float, "str": str}[keyword.value.id]
            elif keyword.arg in ("action", "nargs", "default"):
                with contextlib.suppress(ValueError):  # a computed default (a date, a per-prefix rate)
                    spec[keyword.arg] = ast.literal_eval(keyword.value)
        # '--ref.num_nodes', or f'--{prefix}.optim' for the flags it adds for both actor and critic
        name = ast.unparse(call.args[0]).removeprefix("f").strip("'\"").removeprefix("--")
        flags.update({name.replace("{prefix}", prefix): spec for prefix in ("actor", "critic")})
    return flags


def _flag_tokens(key: str, value) -> list[str]:
    if value is None or value is False:
        return []
    if value is True:
        return [f"--{key}"]
    if isinstance(value, list):
        return [f"--{key}", *map(str, value)]
    return [f"--{key}", str(value)]


def command(path: str | Path, extra: list[str] | None = None, output_root: str | None = None) -> list[str]:
    """The exact command a recipe runs: `python -m <launcher> <flags> [extra]`. With `output_root`, relative
    output paths (OUTPUT_FLAGS) are made absolute under it: a job started by `ray job submit` runs in Ray's
    temporary copy of its working_dir, where checkpoints would be lost and a resume would find none."""
    path = Path(path)
    recipe = yaml.safe_load(path.read_text())
    if not isinstance(recipe, dict) or set(recipe) - {"openrlhf", "aapa"} or \
            not isinstance(recipe.get("openrlhf"), dict):
        found = sorted(recipe) if isinstance(recipe, dict) else type(recipe).__name__
        raise RecipeError(f"{path}: a recipe is a mapping with an `openrlhf:` section and an optional "
                          f"`aapa:` section; found {found}")
    argv = []
    for key, value in recipe["openrlhf"].items():
        if isinstance(value, dict) or str(key).startswith("-"):
            raise RecipeError(f"{path}: openrlhf.{key}: write a flag as `section.name: value` (no dashes)")
        # `false` leaves a bare flag out, which cannot turn off one whose default is true.
        if value is False and openrlhf_flags().get(key, {}).get("default") is True:
            negation = "{}.no_{}".format(*key.rpartition(".")[::2])
            instead = f"; write `{negation}: true`" if negation in openrlhf_flags() else ""
            raise RecipeError(f"{path}: openrlhf.{key}: false cannot be passed: OpenRLHF's default is true "
                              f"and --{key} can only turn it on{instead}")
        argv += _flag_tokens(key, value)
    aapa = recipe.get("aapa")
    if aapa is not None:
        known = dests()
        for key, value in aapa.items():
            if key not in known:
                raise RecipeError(f"{path}: aapa.{key} is not an AAPA setting; known: {sorted(known)}")
            structured = isinstance(value, dict | list)
            argv += [f"--aapa.{key}", json.dumps(value)] if structured else _flag_tokens(f"aapa.{key}", value)
    module = STOCK_MODULE if aapa is None else LAUNCH_MODULE
    argv += extra or []
    if output_root is not None:
        root = Path(output_root).resolve()
        for i, token in enumerate(argv):
            key, has_value, value = token[2:].partition("=")
            if not token.startswith("--") or key not in OUTPUT_FLAGS:
                continue
            if has_value and not Path(value).is_absolute():
                argv[i] = f"--{key}={root / value}"
            elif not has_value and i + 1 < len(argv) and not Path(argv[i + 1]).is_absolute():
                argv[i + 1] = str(root / argv[i + 1])
        # OpenRLHF's own defaults are relative too: without these the run would write into Ray's copy.
        given = {token[2:].partition("=")[0] for token in argv if token.startswith("--")}
        argv += [token for name in OUTPUT_FLAGS if name not in given and DEFAULTS[name] is not None
                 for token in (f"--{name}", str(root / DEFAULTS[name]))]
    return [sys.executable, "-m", module, *argv]


def parse_flags(tokens: list[str]) -> tuple[dict, list[str]]:
    """The given flags' values as train_ppo_ray's parser reads them (of its types: numbers, strings, lists,
    True for a bare flag), and a problem naming the flag for each token that parser stops on: an unknown
    flag, a missing value or type, a value after a bare flag, one value too many."""
    flags = openrlhf_flags()
    parser = argparse.ArgumentParser(allow_abbrev=False, exit_on_error=False,
                                     argument_default=argparse.SUPPRESS)
    for name, spec in flags.items():
        parser.add_argument(f"--{name}", **{k: v for k, v in spec.items() if k != "default"})
    values, problems = argparse.Namespace(), []
    if tokens and not tokens[0].startswith("--"):
        problems.append(f"value {tokens[0]!r} does not follow a flag")
    starts = [i for i, token in enumerate(tokens) if token.startswith("--")]
    # One flag and the tokens up to the next at a time, so that each problem names its flag.
    for start, end in zip(starts, [*starts[1:], len(tokens)], strict=True):
        name, group = tokens[start][2:].partition("=")[0], tokens[start:end]
        if name not in flags:
            problems.append(f"--{name} is not a train_ppo_ray flag of OpenRLHF 0.11.2")
            continue
        try:
            _, extra = parser.parse_known_args(group, values)
        except argparse.ArgumentError as e:
            problems.append(f"{e} (OpenRLHF's parser stops on it)")
            continue
        if extra:
            spec = flags[name]
            takes = ("no value (a bare flag, which cannot be turned off)" if "action" in spec
                     else f"{spec['nargs']} values" if "nargs" in spec else "one value")
            problems.append(f"--{name} takes {takes}: OpenRLHF's parser stops on {shlex.join(extra)} "
                            "(unrecognized arguments)")
    return vars(values), problems


def check(cmd: list[str]) -> tuple[list[str], list[str]]:
    """Validate a command without a GPU: (lines that passed or describe the run, problems)."""
    aapa, args = None, cmd[3:]
    if cmd[2] == LAUNCH_MODULE:
        try:
            aapa, _, args = split_argv(args)
        except AapaConfigError as e:
            return [], [str(e)]
    flags, bad = parse_flags(args)

    def get(name: str):
        return flags.get(name, DEFAULTS[name])

    ok = [] if bad else [f"{len(flags)} OpenRLHF flags, all known to train_ppo_ray 0.11.2"]
    if aapa is not None:
        bad += refused(get, aapa)
    _check_files(get, aapa, ok, bad)
    if os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):  # set by Ray's job supervisor: cwd is a temporary copy
        bad += [f"--{name} {get(name)}: a relative path inside a Ray job is written to Ray's temporary copy "
                "of the working_dir and lost; pass --output-root (launchers/submit.sh does) or an absolute "
                "path" for name in OUTPUT_FLAGS if get(name) and not Path(get(name)).is_absolute()]
    _check_layout(get, ok, bad)
    _check_batches(get, ok, bad)
    if aapa is not None:
        prompts = get("rollout.batch_size")
        for i, stage in enumerate(aapa.stages):
            decay = "" if stage.lam_end is None else f" -> {stage.lam_end}"
            ok.append(f"AAPA stage {i}, steps < {stage.end_step}: {stage.objective}, lam {stage.lam}{decay}, "
                      f"alpha {stage.alpha}, rho {stage.rho} "
                      f"(|H| <= {hard_set_budget(stage.rho, prompts)} of {prompts} prompts)")
        if aapa.adaptive is not None:
            ok.append(f"adaptive lambda: target gap {aapa.adaptive.target_gap}, rate {aapa.adaptive.rate}")
    return ok, bad


def _is_hub_id(name: str) -> bool:
    return re.fullmatch(r"[\w.-]+/[\w.-]+", name) is not None and not name.endswith(DATA_SUFFIXES)


def _check_files(get: Callable, aapa: AapaSettings | None, ok: list[str], bad: list[str]) -> None:
    prompt_files = []
    for name in ("actor.model_name_or_path", "data.prompt_dataset", "eval.dataset"):
        value = get(name)
        if value is None:
            if name != "eval.dataset":
                bad.append(f"--{name} is required")
            continue
        # OpenRLHF's blending_datasets reads a comma-separated list of datasets, each `path` or `path@dir`.
        parts = [value] if name.startswith("actor.") else [p.split("@")[0].strip() for p in value.split(",")]
        for part in parts:
            path = Path(part)
            # load_dataset fails on a file without rows (StopIteration on an empty JSONL); only a small file
            # can be blank.
            if path.is_file() and path.stat().st_size < 4096 and not path.read_bytes().strip():
                bad.append(f"--{name} {part}: empty file")
            elif path.exists():
                ok.append(f"--{name} {part}: found")
                if name != "actor.model_name_or_path":
                    prompt_files.append((name, part))
            elif _is_hub_id(part):
                ok.append(f"--{name} {part}: no such local path, taken as a Hugging Face hub id "
                          "(not checked)")
            else:
                bad.append(f"--{name} {part}: no such file or directory")
    rewards = {}  # the .py rewards by path: the prompt rows' labels are checked against each
    for url in (get("reward.remote_url") or "").split(","):
        if not url.endswith(".py"):
            if url:
                ok.append(f"--reward.remote_url {url}: a reward server (labels not checked)")
            continue
        if not Path(url).is_file():
            bad.append(f"--reward.remote_url {url}: no such file")
        elif not re.search(r"^(def reward_func\(|reward_func\s*=)", Path(url).read_text(), re.M):
            bad.append(f"--reward.remote_url {url}: defines no reward_func(queries, prompts, labels)")
        else:
            try:
                rewards[url] = load_reward(url)
                ok.append(f"--reward.remote_url {url}: found, defines reward_func")
            except ValueError as e:
                bad.append(f"--reward.remote_url: {e}")
    expert_settings = None  # with AAPA: the settings whose expert bank the training rows are checked against
    if aapa is not None:
        problems = check_files(aapa)
        bad += problems
        if not any(p.startswith("--aapa.discriminator") for p in problems):
            from aapa_rl.anchor.discriminator import heldout_auroc

            auroc = heldout_auroc(aapa.discriminator)
            ok.append(f"--aapa.discriminator {aapa.discriminator}: held-out AUROC {auroc}")
        if get("data.label_key") is None:
            bad.append("--data.label_key is required with AAPA: the label dicts carry the expert responses")
        elif not any(p.startswith("--aapa.expert_bank") for p in problems):
            expert_settings = aapa
    for name, data in prompt_files:
        _check_rows(data, get, rewards, expert_settings if name == "data.prompt_dataset" else None, ok, bad)


def _check_rows(data: str, get: Callable, rewards: dict[str, RewardFn], aapa: AapaSettings | None,
                ok: list[str], bad: list[str]) -> None:
    """The rows of a prompt file as the other backends check theirs when they start (check_row, then
    label_problems for each reward): a prompt at --data.input_key, and a label at --data.label_key that the
    reward accepts. With `aapa`, every row must also lead to an expert that agrees with the expert bank,
    found as the run finds it (aapa_rl.anchor.label_expert) from the prompt OpenRLHF builds (after
    --data.input_template; a chat template needs the tokenizer, so rows that depend on it count as missing
    here). Each kind of problem is one line: its count and its first rows."""
    from aapa_rl.anchor.bank import ExpertBank, label_expert
    from aapa_rl.data.experts import label_problems
    from aapa_rl.data.rows import DataError, check_row, read_rows

    input_key, label_key = get("data.input_key"), get("data.label_key")
    template, chat = get("data.input_template"), get("data.apply_chat_template")
    bank = ExpertBank.load(aapa.expert_bank) if aapa is not None and aapa.expert_bank else None
    rows, numbers, labels, bad_rows, missing, disagree = 0, [], [], [], [], []
    try:
        for number, row in read_rows(data):
            rows += 1
            # With a chat template OpenRLHF also takes a list of messages there (its preprocess_data).
            messages = chat and isinstance(row, dict) and isinstance(row.get(input_key), list)
            try:
                check_row(data, number, row, () if messages else (input_key,))
            except DataError as e:
                bad_rows.append(str(e))
                continue
            numbers.append(number)
            labels.append(row.get(label_key) if label_key is not None else None)
            if aapa is None:
                continue
            label = labels[-1]
            built = None if chat else row[input_key]  # the prompt OpenRLHF builds
            if template and "{}" in template and isinstance(built, str):
                built = template.format(built)
            _, at_run = label_expert(label, built if isinstance(built, str) else "", bank)
            label = label if isinstance(label, dict) else {}
            # The bank's expert for the raw prompt (or id), to compare with an expert the label carries.
            raw = label.get("prompt") or row.get(input_key)
            by_data = None
            if bank is not None and label.get("id") is not None:
                by_data = bank.expert_for(id=label["id"])
            elif bank is not None and isinstance(raw, str):
                by_data = bank.expert_for(prompt=raw)
            if not at_run:
                missing.append(number)
            if label.get("expert") and by_data and label["expert"] != by_data:
                disagree.append(number)
    except DataError as e:  # a format read_rows does not read (OpenRLHF reads more): say so, do not fail
        ok.append(f"{data}: rows not checked ({e})")
        return

    def first(problems: list[str]) -> str:
        return "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")

    where = f"{data} ({rows} rows)"
    if bad_rows:
        bad.append(f"{where}: {len(bad_rows)} bad rows: "
                   + first([problem.removeprefix(f"{data}: ") for problem in bad_rows]))
    if label_key is None:  # OpenRLHF gives every row the label "": a reward that needs labels scores 0
        for url, reward in rewards.items():
            try:
                problem = label_problems(reward, [""]).get(0)
            except RewardError as e:
                problem = str(e)
            if problem:
                bad.append(f"{where}: no --data.label_key, so OpenRLHF gives every row the label '', which "
                           f"the reward {url} rejects ({problem}); set --data.label_key")
        rewards = {}
    for url, reward in rewards.items():
        try:
            problems = label_problems(reward, labels)
        except RewardError as e:  # the reward broke its output contract, whatever the labels
            bad.append(f"--reward.remote_url {url}: {e}")
            continue
        if problems:
            bad.append(f"{where}: {len(problems)} labels the reward {url} rejects: " + first(
                [f"row {numbers[i]}: field '{label_key}': {problem}" for i, problem in problems.items()]))
        else:
            ok.append(f"{where}: the reward {url} reads every label '{label_key}'")
    if aapa is None:
        return
    if missing and aapa.missing_expert == "error":
        built = " (the prompt after the chat template, which the dry run cannot build)" if chat else \
            " (the prompt after --data.input_template)" if template else ""
        bad.append(f"{where}: {len(missing)} rows have no expert (first: row {missing[0]}): no label "
                   f"'{label_key}' with an 'expert', and the expert bank has none for the label's 'id' or "
                   f"'prompt' or the row's prompt{built}; put the raw 'prompt' or the 'id' in the label, or "
                   "set aapa.missing_expert: skip")
    if disagree:
        bad.append(f"{where}: {len(disagree)} label experts differ from the expert bank {aapa.expert_bank} "
                   f"(first: row {disagree[0]})")
    if not (missing and aapa.missing_expert == "error") and not disagree:
        skipped = f", {len(missing)} without one (skipped from H)" if missing else ""
        ok.append(f"{where}: experts for {len(numbers) - len(missing)} rows{skipped}")


def _check_layout(get: Callable, ok: list[str], bad: list[str]) -> None:
    def gpus(group: str) -> int:
        return get(f"{group}.num_nodes") * get(f"{group}.num_gpus_per_node")

    actor = gpus("actor")
    engines, tp = get("vllm.num_engines") or 0, get("vllm.tensor_parallel_size")
    uses_ref = get("algo.kl.init_coef") > 0
    colocate_all, colocate_ref = bool(get("train.colocate_all")), bool(get("train.colocate_actor_ref"))
    uses_critic = get("algo.advantage.estimator") == "gae"
    if engines < 1:
        bad.append("--vllm.num_engines must be >= 1: rollouts are generated by vLLM")
    if colocate_all and engines * tp != actor:
        bad.append(f"--train.colocate_all needs vllm.num_engines x vllm.tensor_parallel_size "
                   f"({engines} x {tp}) == actor GPUs ({actor})")
    same_layout = all(get(f"ref.{k}") == get(f"actor.{k}") for k in ("num_nodes", "num_gpus_per_node"))
    if uses_ref and (colocate_all or colocate_ref) and not same_layout:
        bad.append("a colocated reference model needs --ref.num_nodes / --ref.num_gpus_per_node equal to the "
                   "actor's")
    total = actor
    if not colocate_all:
        total += engines * tp + (gpus("ref") if uses_ref and not colocate_ref else 0)
        total += gpus("critic") if uses_critic else 0
        if not get("reward.remote_url") and not (uses_critic and get("train.colocate_critic_reward")):
            total += gpus("reward")
    mode = "hybrid engine: everything colocated" if colocate_all else "separate GPU groups"
    ok.append(f"layout: {total} GPUs ({mode}); actor {get('actor.num_nodes')} node(s) x "
              f"{get('actor.num_gpus_per_node')} GPUs, {engines} vLLM engine(s) x TP {tp}, "
              f"reference model {'on' if uses_ref else 'off'}")


def _check_batches(get: Callable, ok: list[str], bad: list[str]) -> None:
    # Every rank must get the same number of micro-batches, or its collectives wait for ever.
    actor = get("actor.num_nodes") * get("actor.num_gpus_per_node")
    n, prompts = get("rollout.n_samples_per_prompt"), get("rollout.batch_size")
    rollouts, train_bs = prompts * n, get("train.batch_size")
    micro, rollout_micro = get("train.micro_batch_size"), get("rollout.micro_batch_size")
    problems = []
    if actor < 1 or train_bs % (micro * actor):
        problems.append(f"--train.batch_size {train_bs} must be a multiple of train.micro_batch_size x actor "
                        f"GPUs ({micro} x {actor})")
    if rollouts % train_bs:
        problems.append(f"rollout.batch_size x n_samples_per_prompt ({prompts} x {n}) must be a multiple of "
                        f"--train.batch_size {train_bs}")
    if rollouts % rollout_micro or (rollouts // rollout_micro) % max(actor, 1):
        problems.append(f"{rollouts} rollouts in micro-batches of --rollout.micro_batch_size {rollout_micro} "
                        f"must split evenly over {actor} actor GPUs")
    estimator = get("algo.advantage.estimator")
    if estimator in GROUP_ESTIMATORS and n < 2:
        problems.append(f"--algo.advantage.estimator {estimator} needs --rollout.n_samples_per_prompt > 1")
    bad += problems
    if not problems:
        ok.append(f"batches: {prompts} prompts x {n} samples = {rollouts} rollouts per step, "
                  f"{rollouts // train_bs} optimizer step(s) of {train_bs}, "
                  f"gradient accumulation {train_bs // (micro * actor)}")


def dry_run(path: str | Path, extra: list[str] | None = None, output_root: str | None = None) -> int:
    cmd = command(path, extra, output_root)
    print(shlex.join(cmd))
    ok, bad = check(cmd)
    for line in ok:
        print(f"  ok    {line}")
    for line in bad:
        print(f"  FAIL  {line}")
    print(f"dry run: {len(bad)} problem(s); nothing was started" if bad
          else "dry run: the recipe is consistent; nothing was started")
    return 1 if bad else 0
