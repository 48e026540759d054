"""CPU stand-in for the vLLM 0.29 surface OpenRLHF 0.11.2 touches (e2e tests only; never installed).

OpenRLHF's own RolloutRayActor drives it unchanged: `AsyncLLMEngine.from_engine_args(AsyncEngineArgs(...))`,
then generate / collective_rpc / sleep / wake_up / reset_prefix_cache. Generation is HF `generate` on CPU.
Weights arrive through OpenRLHF's real WorkerWrap.init_process_group and a gloo stand-in of PyNccl; only
update_weight is re-stated, because the original allocates its receive buffer on "cuda".

For the tests it records, under $AAPA_E2E_PROBE_DIR, the engine's full state dict after every weight sync,
and it refuses to generate or take weights while asleep (what the real engine would corrupt silently).
"""

from __future__ import annotations

import importlib
import itertools
import os
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch

__version__ = "0.29.0"


@dataclass
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_tokens: int | None = 16
    min_tokens: int = 0
    skip_special_tokens: bool = True
    logprobs: int | None = None


class AsyncEngineArgs:
    def __init__(self, **kwargs):
        self.kwargs = kwargs


@dataclass
class CompletionOutput:
    token_ids: list[int]
    text: str
    finish_reason: str
    logprobs: list | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = True


class CpuWorkerMixin:
    """The parts of a vLLM GPU worker that OpenRLHF's WorkerWrap relies on, on CPU."""

    def __init__(self, model, engine):
        self.device = torch.device("cpu")
        self.model_config = SimpleNamespace(dtype=model.dtype)
        self.model_runner = SimpleNamespace(model=SimpleNamespace(load_weights=self._load_weights))
        self.engine, self.model, self.synced = engine, model, set()
        self.syncs = itertools.count(1)

    def _load_weights(self, weights):
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, tensor in weights:
                params[name].copy_(tensor)  # a KeyError here is a real name mismatch
                self.synced.add(name)

    def update_weight(self, name, dtype, shape, empty_cache=False):
        # WorkerWrap.update_weight with the receive buffer on CPU (the original hard-codes "cuda").
        if "weights" in self.engine.asleep:
            raise RuntimeError(f"weight {name} sent to a sleeping engine (wake_up(['weights']) missing)")
        assert dtype == self.model_config.dtype, f"mismatch dtype: src {dtype}, dst {self.model_config.dtype}"
        weight = torch.empty(shape, dtype=dtype)
        self._model_update_group.broadcast(weight, src=0, stream=None)
        self.model_runner.model.load_weights(weights=[(name, weight)])
        if empty_cache:  # OpenRLHF sets it on the last parameter of a sync
            self.record_sync()

    def record_sync(self):
        missing = {n for n, _ in self.model.named_parameters()} - self.synced
        if missing:
            raise RuntimeError(f"weight sync left parameters untouched: {sorted(missing)}")
        self.synced = set()
        probe = os.environ.get("AAPA_E2E_PROBE_DIR")
        if probe:
            state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            torch.save(state, os.path.join(probe, f"engine{self.engine.seed}-sync{next(self.syncs)}.pt"))


class AsyncLLMEngine:
    def __init__(self, args: AsyncEngineArgs):
        from transformers import AutoModelForCausalLM

        kw = args.kwargs
        dtype = getattr(torch, kw.get("dtype", "float32"))
        self.seed = int(kw.get("seed", 0))
        self.model = AutoModelForCausalLM.from_pretrained(kw["model"], dtype=dtype).eval()
        self.generator_seed = itertools.count(self.seed * 100_000)
        self.asleep: set[str] = set()
        # vLLM mixes the worker extension (OpenRLHF's WorkerWrap) into its worker class; so does this.
        module, _, name = kw["worker_extension_cls"].rpartition(".")
        extension = getattr(importlib.import_module(module), name)
        self.worker = type("CpuWorker", (CpuWorkerMixin, extension), {})(self.model, self)
        self.output_processor = SimpleNamespace(get_num_unfinished_requests=lambda: 0)
        if not torch.distributed.is_initialized():
            # A vLLM worker always has a default group (its TP group); WorkerWrap reads its rank from it.
            torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0,
                                                 world_size=1)

    @classmethod
    def from_engine_args(cls, args: AsyncEngineArgs) -> AsyncLLMEngine:
        return cls(args)

    async def is_sleeping(self) -> bool:
        return bool(self.asleep)

    async def sleep(self, level: int = 1):
        self.asleep = {"weights", "kv_cache"}

    async def wake_up(self, tags=None):
        self.asleep -= set(tags or ["weights", "kv_cache"])

    async def reset_prefix_cache(self):
        pass

    async def collective_rpc(self, method, args=(), kwargs=None):
        return [getattr(self.worker, method)(*args, **(kwargs or {}))]

    async def generate(self, prompt, sampling_params: SamplingParams, request_id: str):
        if self.asleep:
            raise RuntimeError(f"generate called on a sleeping engine ({sorted(self.asleep)} asleep)")
        ids = torch.tensor([list(prompt["prompt_token_ids"])])
        sp, config = sampling_params, self.model.config
        torch.manual_seed(next(self.generator_seed))
        with torch.no_grad():
            out = self.model.generate(
                ids, attention_mask=torch.ones_like(ids), do_sample=sp.temperature > 0,
                temperature=max(sp.temperature, 1e-5), top_p=sp.top_p,
                top_k=None if sp.top_k in (-1, None) else sp.top_k, max_new_tokens=sp.max_tokens,
                min_new_tokens=sp.min_tokens or 0, eos_token_id=config.eos_token_id,
                pad_token_id=config.pad_token_id, output_scores=sp.logprobs is not None,
                return_dict_in_generate=True)
        new = out.sequences[0, ids.shape[1]:].tolist()
        finish = "stop" if new and new[-1] == config.eos_token_id else "length"
        logprobs = None
        if sp.logprobs is not None:
            steps = [torch.log_softmax(s[0].float(), -1) for s in out.scores]
            logprobs = [{t: SimpleNamespace(logprob=lp[t].item())} for t, lp in zip(new, steps, strict=False)]
        yield RequestOutput(request_id, ids[0].tolist(), [CompletionOutput(new, "", finish, logprobs)])
