"""`aapa-rl generate`: K samples per prompt from a model directory, appended to a resumable JSONL.

Output rows: {id, prompt, response, model, params}. Each batch is appended, flushed and fsynced, so a
killed run loses at most the batch in flight; rerunning the same command skips the prompts already done.
Both engines receive the same token ids (chat template applied here), so their outputs are comparable.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from collections import Counter
from pathlib import Path
from typing import Any

from aapa_rl.data.rows import DataError, PromptRow, write_jsonl

# Sampling parameters (flag dest -> default); a recipe may set these and `batch_size`, flags override both.
SAMPLING_DEFAULTS: dict[str, Any] = {
    "n": 1,
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": -1,  # -1: no top-k
    "max_new_tokens": 1024,
    "seed": 0,
    "chat_template": True,
    "enable_thinking": None,  # None: the template's default (Qwen3: thinking on)
}
# Types a recipe may give each key (bool is refused where a number is expected).
RECIPE_TYPES: dict[str, tuple[type, ...]] = {
    "n": (int,), "temperature": (int, float), "top_p": (int, float), "top_k": (int,),
    "max_new_tokens": (int,), "seed": (int,), "chat_template": (bool,), "enable_thinking": (bool, type(None)),
    "batch_size": (int,),
}


def sampling_params(flags: dict[str, Any], recipe_path: str | None) -> dict[str, Any]:
    """Defaults, overridden by the recipe (its `generate:` section when present), overridden by flags."""
    recipe: dict[str, Any] = {}
    if recipe_path:
        import yaml

        try:
            loaded = yaml.safe_load(Path(recipe_path).read_text(encoding="utf-8")) or {}
        except (UnicodeDecodeError, yaml.YAMLError) as e:
            raise DataError(f"{recipe_path}: not valid YAML: {e}") from None
        recipe = loaded.get("generate", loaded) if isinstance(loaded, dict) else loaded
        if not isinstance(recipe, dict):
            raise DataError(f"{recipe_path}: expected a mapping of sampling parameters")
        for key, value in recipe.items():
            if key not in RECIPE_TYPES:
                raise DataError(f"{recipe_path}: key '{key}': unknown; allowed: {', '.join(RECIPE_TYPES)}")
            types = RECIPE_TYPES[key]
            if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
                expected = " or ".join(t.__name__ for t in types)
                got = type(value).__name__
                raise DataError(f"{recipe_path}: key '{key}': expected {expected}, got {got}")
    params = {key: recipe.get(key, default) for key, default in SAMPLING_DEFAULTS.items()}
    params.update({key: value for key, value in flags.items() if value is not None and key in params})
    params["temperature"] = float(params["temperature"])
    params["top_p"] = float(params["top_p"])
    batch_size = flags.get("batch_size")
    params["batch_size"] = batch_size if batch_size is not None else recipe.get("batch_size", 32)
    for key in ("n", "max_new_tokens", "batch_size"):
        if params[key] < 1:
            raise DataError(f"{key} must be >= 1, got {params[key]}")
    # A flag may be nan: the checks are written so that it fails them.
    if not (math.isfinite(params["temperature"]) and params["temperature"] >= 0):
        raise DataError(f"temperature must be >= 0 (0 is greedy), got {params['temperature']}")
    if not 0 < params["top_p"] <= 1:
        raise DataError(f"top_p must be in (0, 1], got {params['top_p']}")
    # -1 is "off" for both engines; vLLM refuses other values below 1, transformers reads 0 as off.
    if params["top_k"] != -1 and params["top_k"] < 1:
        raise DataError(f"top_k must be -1 (off) or >= 1, got {params['top_k']}")
    if params["n"] > 1 and params["temperature"] == 0:
        raise DataError("n > 1 needs temperature > 0 (greedy decoding gives identical samples)")
    return params


def pick_engine(engine: str) -> str:
    """vLLM when it is installed and a GPU is visible, else transformers."""
    if engine != "auto":
        return engine
    import torch

    return "vllm" if torch.cuda.is_available() and importlib.util.find_spec("vllm") else "hf"


def render_prompts(tokenizer, prompts: list[str], chat_template: bool, enable_thinking: bool | None
                   ) -> list[list[int]]:
    """Token ids of each prompt, through the model's chat template when asked."""
    if not chat_template:
        return [tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]
    if not tokenizer.chat_template:
        raise DataError("the model's tokenizer has no chat template; pass --no-chat-template")
    extra = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                      add_generation_prompt=True, **extra)
        for p in prompts
    ]
    # The template already wrote the special tokens (BOS etc.).
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


class VllmEngine:
    """Thin adapter over vLLM's offline engine."""

    def __init__(self, model: str, params: dict[str, Any], tensor_parallel_size: int):
        try:
            from vllm import LLM, SamplingParams
        except ImportError as e:
            raise DataError(f"--engine vllm: vLLM cannot be imported ({e}); it is a GPU extra "
                            "(pip install 'aapa-rl[gpu]'), or use --engine transformers") from None

        self.llm = LLM(model=model, tokenizer=model, seed=params["seed"],
                       tensor_parallel_size=tensor_parallel_size)
        self.sampling = SamplingParams(
            n=params["n"], temperature=params["temperature"], top_p=params["top_p"],
            top_k=params["top_k"], max_tokens=params["max_new_tokens"],
        )

    def generate(self, prompt_ids: list[list[int]]) -> list[list[str]]:
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], self.sampling,
                                    use_tqdm=False)
        return [[completion.text for completion in out.outputs] for out in outputs]


class TransformersEngine:
    """`model.generate` with left padding; bf16 on GPU, fp32 on CPU."""

    def __init__(self, model: str, tokenizer, params: dict[str, Any]):
        import torch
        from transformers import AutoModelForCausalLM

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.bfloat16 if self.device == "cuda" else torch.float32
        self.model = AutoModelForCausalLM.from_pretrained(model, dtype=dtype).to(self.device).eval()
        self.tokenizer = tokenizer
        self.params = params
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if self.pad_id is None:
            raise DataError(f"{model}: the tokenizer has neither a pad nor an eos token")
        torch.manual_seed(params["seed"])

    def generate(self, prompt_ids: list[list[int]]) -> list[list[str]]:
        import torch

        p = self.params
        width = max(len(ids) for ids in prompt_ids)
        input_ids = torch.tensor([[self.pad_id] * (width - len(ids)) + ids for ids in prompt_ids])
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in prompt_ids])
        sampling = p["temperature"] > 0
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device),
                max_new_tokens=p["max_new_tokens"], do_sample=sampling, num_return_sequences=p["n"],
                temperature=p["temperature"] if sampling else None,
                top_p=p["top_p"] if sampling else None,
                top_k=(p["top_k"] if p["top_k"] > 0 else 0) if sampling else None,
                pad_token_id=self.pad_id,
            )
        texts = self.tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
        return [texts[i * p["n"]:(i + 1) * p["n"]] for i in range(len(prompt_ids))]


def completed_ids(output: Path, model: str, params: dict[str, Any]) -> set[str]:
    """Ids already fully sampled in `output`; removes the partial batch a killed run may have left."""
    if not output.exists():
        return set()
    kept, counts = [], Counter()
    *lines, tail = output.read_bytes().split(b"\n")
    # A last line without its newline is a write cut short (complete JSON or not, maybe inside a multi-byte
    # character): it is dropped, and the rewrite below ends the file with a newline before new rows go on.
    dropped = 1 if tail else 0
    for row, line in enumerate(lines, start=1):
        try:
            record = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise DataError(f"{output}: row {row}: not valid UTF-8 (byte {e.start}: {e.reason})") from e
        except json.JSONDecodeError as e:
            raise DataError(f"{output}: row {row}: not valid JSON ({e.msg})") from e
        if not isinstance(record, dict) or not isinstance(record.get("id"), str):
            raise DataError(f"{output}: row {row}: field 'id': missing; not a `generate` output file")
        old = record.get("params") if isinstance(record.get("params"), dict) else {}
        changed = [f"{k}: {old.get(k)!r} then, {v!r} now" for k, v in params.items()
                   if k != "engine" and old.get(k) != v]  # the engine does not change what is sampled
        if _norm(record.get("model")) != _norm(model):
            raise DataError(f"{output}: row {row}: field 'model': {record.get('model')!r}, not {model!r}; "
                            "use another --output or the same model")
        if changed:
            raise DataError(f"{output}: row {row}: field 'params': made with other settings "
                            f"({'; '.join(changed)}); use another --output or the same settings")
        kept.append(record)
        counts[record["id"]] += 1
    n = params["n"]
    over = [i for i, c in counts.items() if c > n]
    if over:
        raise DataError(f"{output}: field 'id': {over[0]!r} has {counts[over[0]]} samples, more than n={n}")
    partial = {i for i, c in counts.items() if c < n}
    if dropped or partial:
        write_jsonl(output, [r for r in kept if r["id"] not in partial])
        print(f"resume: removed the unfinished batch of the last run ({len(partial)} prompts, "
              f"{sum(counts[i] for i in partial) + dropped} rows); they are sampled again")
    return {i for i, c in counts.items() if c == n}


def _norm(model: Any) -> str:
    return os.path.realpath(model) if isinstance(model, str) and os.path.exists(model) else str(model)


def generate(prompts: list[PromptRow], model: str, output: str | Path, params: dict[str, Any],
             engine: str = "auto", tensor_parallel_size: int = 1) -> dict[str, int]:
    """Sample `params['n']` responses for every prompt not yet in `output`; returns counts."""
    from tqdm import tqdm
    from transformers import AutoTokenizer

    output = Path(output)
    engine = pick_engine(engine)
    batch_size = params["batch_size"]
    recorded = {k: v for k, v in params.items() if k != "batch_size"} | {"engine": engine}
    done = completed_ids(output, model, recorded)
    todo = [p for p in prompts if p.id not in done]
    counts = {"prompts": len(prompts), "sampled": len(todo), "skipped_done": len(prompts) - len(todo)}
    print(f"generate: {len(prompts)} prompts, {counts['skipped_done']} already done, {len(todo)} to sample "
          f"x {params['n']} with {engine}")
    if not todo:
        return counts

    try:
        tokenizer = AutoTokenizer.from_pretrained(model)
    except OSError as e:
        if os.path.exists(model):
            raise
        # --model may also name a Hub model, so a missing directory only shows up as a failed load.
        raise DataError(f"--model {model}: no such model directory ({e})") from None
    if engine == "vllm":
        llm: VllmEngine | TransformersEngine = VllmEngine(model, params, tensor_parallel_size)
    else:
        llm = TransformersEngine(model, tokenizer, params)
    output.parent.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(todo), desc="generate", unit="prompt")
    with output.open("a", encoding="utf-8") as fh, bar:
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            ids = render_prompts(tokenizer, [p.prompt for p in batch], params["chat_template"],
                                 params["enable_thinking"])
            responses = llm.generate(ids)
            lines = [
                json.dumps({"id": p.id, "prompt": p.prompt, "response": r, "model": model,
                            "params": recorded}, ensure_ascii=False) + "\n"
                for p, rs in zip(batch, responses, strict=True) for r in rs
            ]
            fh.write("".join(lines))
            fh.flush()
            os.fsync(fh.fileno())
            bar.update(len(batch))
    return counts
