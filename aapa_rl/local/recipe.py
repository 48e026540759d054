"""Training recipes: YAML validated in full (unknown keys, wrong types, missing files) before any work."""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from aapa_rl.local.task import ArithmeticTask
from aapa_rl.objectives import ADVANTAGE_ESTIMATORS, EXPERT_OBJECTIVES, KL_ESTIMATORS, LOSS_AGGREGATIONS
from aapa_rl.schedule import Stage
from aapa_rl.settings import AapaSettings, ConfigError, build

# Keys renamed when the AAPA settings became one schema for every backend (aapa_rl/settings.py): old recipes
# keep working for one release, with a message naming the new key.
RENAMED = {
    "stages": "aapa.stages",
    "adaptive": "aapa.adaptive",
    "data.expert_bank": "aapa.expert_bank",
    "aapa.force": "aapa.force_discriminator",
    "loss.anchor_phi": "aapa.anchor_phi",
    "loss.chord_warmup_steps": "aapa.chord.warmup_steps",
    "loss.chord_decay_steps": "aapa.chord.decay_steps",
    "loss.chord_peak": "aapa.chord.peak",
    "loss.chord_valley": "aapa.chord.valley",
    "loss.chord_phi": "aapa.chord.phi",
}


class RecipeError(ConfigError):
    """A recipe problem; the message names the file and the key."""


@dataclass
class ModelConfig:
    path: str | None = None  # Hugging Face directory; None builds the tiny Qwen3 with the char tokenizer
    tokenizer: str | None = None  # defaults to `path`; "char" is the embedded character tokenizer
    dtype: str = "auto"  # auto: bfloat16 on GPU, float32 on CPU


@dataclass
class DataConfig:
    sft: str | None = None  # JSONL {prompt, expert}: the SFT stream (sft objective, CHORD's expert part)
    train: str | None = None  # JSONL {prompt, label}: RL prompts
    eval: str | None = None  # JSONL {prompt, label, expert?}: held-out prompts


@dataclass
class RolloutConfig:
    prompts_per_step: int = 8
    group_size: int = 8
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0


@dataclass
class OptimConfig:
    lr: float = 1e-5  # a safe start for real models; the tiny-model recipes set their own
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    grad_clip: float = 1.0
    warmup_steps: int = 0  # linear learning-rate warm-up
    lr_schedule: str = "constant"  # or "cosine": decay to 0 at the last step
    micro_batch_size: int = 0  # sequences per forward/backward; gradients accumulate (0: all at once)


@dataclass
class LossConfig:
    estimator: str = "group_norm"
    clip_low: float = 0.2
    clip_high: float = 0.2
    agg: str = "token-mean"
    kl_coef: float = 0.0  # > 0 keeps a frozen copy of the initial policy as the KL reference
    kl_estimator: str = "k3"
    sft_batch_size: int = 32  # expert rows per step for sft and for CHORD's expert part


@dataclass
class LogConfig:
    eval_every: int = 0  # 0: evaluate only at the end
    eval_samples: int = 200
    save_every: int = 50
    plots: bool = True


@dataclass
class Recipe:
    out: str
    steps: int
    aapa: AapaSettings  # the stage schedule and every AAPA setting (aapa_rl/settings.py)
    seed: int = 0
    threads: int = 0  # torch CPU threads (0: torch's default)
    max_nonfinite: int = 3  # this many non-finite steps in a row abort the run
    task: ArithmeticTask | None = None  # the embedded arithmetic task; generates data (and its own reward)
    # "arithmetic" (the task's), a reward_fns module name, a .py file or a combine config; with a task, any
    # of these replaces the task's reward (a flaw of your own on the task's data)
    reward: str | dict | list | None = None
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    log: LogConfig = field(default_factory=LogConfig)

    @property
    def stages(self) -> list[Stage]:
        return self.aapa.stages

    @property
    def uses_rollouts(self) -> bool:
        return any(s.objective != "sft" or s.alpha > 0 or s.lam > 0 for s in self.stages)

    @property
    def uses_sft_data(self) -> bool:
        return any(s.objective in EXPERT_OBJECTIVES for s in self.stages)


def _migrate(data: dict) -> None:
    """Move renamed keys to their new place, saying so once per key."""
    for old, new in RENAMED.items():
        *parents, leaf = old.split(".")
        node = data
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or leaf not in node:
            continue
        value = node.pop(leaf)
        *new_parents, new_leaf = new.split(".")
        target = data
        for part in new_parents:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise RecipeError(f"{'.'.join(new_parents)}: expected a mapping for the renamed key {old}")
        if new_leaf in target:
            raise RecipeError(f"{old} and {new} are the same setting; keep only {new}")
        target[new_leaf] = value
        print(f"deprecated: recipe key {old} is now {new}; the old name works until the next release",
              file=sys.stderr)


def _apply_override(data: dict, assignment: str) -> None:
    """`a.b.0.c=value`: the value is parsed as YAML (numbers, booleans, null, lists) and set at the path."""
    if "=" not in assignment:
        raise RecipeError(f"--set {assignment!r}: expected key=value")
    key, raw = assignment.split("=", 1)
    parts = key.strip().split(".")
    node = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise RecipeError(f"--set {key}: {part!r} is not an index of {'.'.join(parts[:i])}")
            part = int(part)
        elif isinstance(node, dict):
            if not last and node.get(part) is None:
                node[part] = {}
        else:
            raise RecipeError(f"--set {key}: {'.'.join(parts[:i])} is not a mapping or a list")
        if last:
            try:
                node[part] = yaml.safe_load(raw)
            except yaml.YAMLError as exc:
                raise RecipeError(f"--set {assignment!r}: the value is not valid YAML: {exc}") from None
        else:
            node = node[part]


def load_recipe(
    path: str | Path | None, overrides: list[str] | None = None, *, base: dict | None = None
) -> Recipe:
    """Read, override (`key=value`) and validate a recipe. Relative file paths resolve against the cwd."""
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise RecipeError(f"recipe file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, yaml.YAMLError) as exc:
            raise RecipeError(f"{path}: not valid YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise RecipeError(f"{path}: the recipe must be a mapping at the top level")
    else:
        data = dict(base or {})
    try:
        for assignment in overrides or []:
            _apply_override(data, assignment)
        _migrate(data)
        recipe = build(Recipe, data, "")
        _check(recipe)
    except ConfigError as exc:
        raise RecipeError(f"{path or 'recipe'}: {exc}") from None
    return recipe


def recipe_dict(recipe: Recipe) -> dict:
    return dataclasses.asdict(recipe)


def _check(r: Recipe) -> None:
    """Cross-field checks and file existence, so a bad recipe fails before the model is built."""

    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise RecipeError(msg)

    need(r.steps > 0, f"steps must be > 0, got {r.steps}")
    need(
        r.loss.estimator in ADVANTAGE_ESTIMATORS,
        f"loss.estimator: {r.loss.estimator!r} is not one of {ADVANTAGE_ESTIMATORS}",
    )
    need(r.loss.agg in LOSS_AGGREGATIONS, f"loss.agg: {r.loss.agg!r} is not one of {LOSS_AGGREGATIONS}")
    need(
        r.loss.kl_estimator in KL_ESTIMATORS,
        f"loss.kl_estimator: {r.loss.kl_estimator!r} is not one of {KL_ESTIMATORS}",
    )
    need(
        r.model.dtype in ("auto", "float32", "bfloat16"),
        f"model.dtype: {r.model.dtype!r} is not auto, float32 or bfloat16",
    )
    need(r.rollout.group_size >= 2, f"rollout.group_size must be >= 2, got {r.rollout.group_size}")
    need(r.rollout.prompts_per_step >= 1, "rollout.prompts_per_step must be >= 1")
    need(r.rollout.max_new_tokens >= 1, "rollout.max_new_tokens must be >= 1")
    need(r.rollout.temperature > 0, "rollout.temperature must be > 0")
    need(0 < r.rollout.top_p <= 1, f"rollout.top_p must be in (0, 1], got {r.rollout.top_p}")
    need(r.rollout.top_k >= 0, f"rollout.top_k must be >= 0 (0: off), got {r.rollout.top_k}")
    # NaN fails every comparison, so these also catch a NaN from --set optim.lr=.nan
    need(0 < r.optim.lr < math.inf, f"optim.lr must be a finite number > 0, got {r.optim.lr}")
    need(r.optim.grad_clip >= 0, f"optim.grad_clip must be >= 0 (0: no clipping), got {r.optim.grad_clip}")
    need(
        r.optim.lr_schedule in ("constant", "cosine"),
        f"optim.lr_schedule: {r.optim.lr_schedule!r} is not constant or cosine",
    )
    need(r.optim.micro_batch_size >= 0, "optim.micro_batch_size must be >= 0")
    need(r.optim.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {r.optim.warmup_steps}")
    need(r.optim.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {r.optim.weight_decay}")
    for key in ("beta1", "beta2"):
        beta = getattr(r.optim, key)
        need(0 <= beta < 1, f"optim.{key} must be in [0, 1), got {beta}")
    need(0 <= r.loss.kl_coef < math.inf, f"loss.kl_coef must be a finite number >= 0, got {r.loss.kl_coef}")
    need(0 <= r.loss.clip_low < 1, f"loss.clip_low must be in [0, 1), got {r.loss.clip_low}")
    need(r.loss.clip_high >= 0, f"loss.clip_high must be >= 0, got {r.loss.clip_high}")
    need(r.loss.sft_batch_size >= 1, "loss.sft_batch_size must be >= 1")
    need(r.max_nonfinite >= 1, "max_nonfinite must be >= 1")
    need(r.threads >= 0, f"threads must be >= 0 (0: torch's default), got {r.threads}")
    need(r.log.save_every >= 0 and r.log.eval_every >= 0, "log.save_every and log.eval_every must be >= 0")
    need(r.log.eval_samples >= 0, f"log.eval_samples must be >= 0 (0: no eval), got {r.log.eval_samples}")

    if r.task is not None:
        given = [k for k, v in dataclasses.asdict(r.data).items() if v is not None]
        need(
            not given,
            f"data.{given[0] if given else ''}: the arithmetic task generates its own data; "
            "remove the data section or the task section",
        )
    else:
        need(r.reward != "arithmetic", "reward: 'arithmetic' needs the task section (task: {...})")
        if r.uses_rollouts:
            need(r.data.train is not None, "data.train: RL stages need a prompt file")
            need(r.reward is not None, "reward: RL stages need a reward function")
        if r.uses_sft_data:
            need(
                r.data.sft is not None, "data.sft: sft/chord stages need an SFT file ({prompt, expert} JSONL)"
            )
    if r.model.path is None:
        need(
            r.model.tokenizer in (None, "char"),
            "model.tokenizer: without model.path the tiny model needs 'char'",
        )
    if r.aapa.selection == "oracle":
        for i, stage in enumerate(r.stages):
            # The critic of an SFT stage with lam or alpha > 0 selects among rollouts the reward never scores.
            need(
                stage.objective != "sft" or stage.lam == stage.alpha == 0,
                f"aapa.selection: oracle selects by the reward's flaw_bonus, and the reward does not score "
                f"the rollouts of aapa.stages.{i} (sft with lam or alpha > 0); use gap, random or all",
            )
    if r.aapa.uses_critic:
        need(
            r.aapa.discriminator is not None,
            "aapa.discriminator: stages with lam > 0 or alpha > 0 (or adaptive lambda) need one",
        )
    if r.aapa.discriminator is not None:
        need(
            r.task is not None or r.aapa.expert_bank is not None,
            "aapa.expert_bank: a discriminator needs an expert bank to compare with",
        )
    need(
        r.task is None or r.aapa.expert_bank is None,
        "aapa.expert_bank: the arithmetic task writes its own expert bank; remove the key or the task",
    )
    files = {f"data.{k}": v for k, v in dataclasses.asdict(r.data).items()}
    files["model.path"] = r.model.path
    files["aapa.discriminator"] = r.aapa.discriminator
    files["aapa.expert_bank"] = r.aapa.expert_bank
    if r.model.tokenizer not in (None, "char"):
        files["model.tokenizer"] = r.model.tokenizer
    for key, value in files.items():
        need(value is None or Path(value).exists(), f"{key}: file or directory not found: {value}")
    if r.reward not in (None, "arithmetic"):
        from reward_fns.combine import load_reward

        try:
            load_reward(r.reward)
        except ValueError as exc:  # its message names the reward
            raise RecipeError(f"reward: {exc}") from None
        except Exception as exc:  # whatever else loading it raises (an import it lacks)
            raise RecipeError(f"reward: {r.reward}: cannot be loaded: {type(exc).__name__}: {exc}") from None
