"""The policy on one device: loading, sampling with `generate`, and per-token log-probabilities of responses.

Every batch uses one layout: prompts left-padded to a common length, responses right-padded after it, so
the response tokens of all rows start at the same column and one slice gives their log-probabilities.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch

from aapa_rl.objectives import token_log_probs


class NonFiniteLogits(RuntimeError):
    """Sampling met NaN or infinite logits, which torch's sampler cannot draw from."""


def _refuse_nonfinite(input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
    """A logits processor: the scores as they are, or NonFiniteLogits where sampling cannot draw from them."""
    if not torch.isfinite(scores.softmax(-1)).all():  # NaN where a logit is NaN or +inf, or all are -inf
        raise NonFiniteLogits("non-finite logits while sampling")
    return scores


def load_tokenizer(source: str | None):
    """ "char" (or None) is the embedded character tokenizer; anything else a Hugging Face directory."""
    if source in (None, "char"):
        from aapa_rl.local.task import char_tokenizer

        return char_tokenizer()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_policy(path: str | None, tokenizer, *, seed: int = 0, device: str | torch.device = "cpu"):
    """A causal LM from a Hugging Face directory, or the tiny Qwen3 built from config (fp32 weights)."""
    if path is None:
        from aapa_rl.local.task import tiny_qwen3

        model = tiny_qwen3(len(tokenizer), seed)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(Path(path), dtype=torch.float32)
    return model.to(device)


def autocast(device: torch.device, dtype: str):
    """bf16 autocast on GPU (fp32 master weights stay in the optimizer); a no-op on CPU or for float32."""
    if device.type == "cuda" and dtype in ("auto", "bfloat16"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, Lp + Lr)
    attention_mask: torch.Tensor  # (B, Lp + Lr)
    prompt_len: int  # Lp: response tokens start at this column
    response_mask: torch.Tensor  # (B, Lr) float: response tokens incl. the closing eos
    texts: list[str]  # decoded responses (special tokens dropped)

    @property
    def response_ids(self) -> torch.Tensor:
        return self.input_ids[:, self.prompt_len :]

    def rows(self, index: slice | torch.Tensor) -> Batch:
        texts = (
            [self.texts[i] for i in range(len(self.texts))[index]]
            if isinstance(index, slice)
            else [self.texts[i] for i in index.tolist()]
        )
        return Batch(
            self.input_ids[index],
            self.attention_mask[index],
            self.prompt_len,
            self.response_mask[index],
            texts,
        )


def encode_prompts(tokenizer, prompts: list[str]) -> list[list[int]]:
    return tokenizer(prompts)["input_ids"]


def pack(tokenizer, prompts: list[str], responses: list[str], device: torch.device) -> Batch:
    """Prompt + response + eos rows in the common layout (used for expert responses)."""
    prompt_ids = encode_prompts(tokenizer, prompts)
    response_ids = [
        ids + [tokenizer.eos_token_id] for ids in tokenizer(responses, add_special_tokens=False)["input_ids"]
    ]
    lp, lr = max(map(len, prompt_ids)), max(map(len, response_ids))
    pad = tokenizer.pad_token_id
    ids = torch.full((len(prompts), lp + lr), pad, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for i, (p, r) in enumerate(zip(prompt_ids, response_ids, strict=True)):
        ids[i, lp - len(p) : lp] = torch.tensor(p)
        ids[i, lp : lp + len(r)] = torch.tensor(r)
        attn[i, lp - len(p) : lp + len(r)] = 1
    return Batch(ids.to(device), attn.to(device), lp, attn[:, lp:].float().to(device), list(responses))


def generate(
    model,
    tokenizer,
    prompts: list[str],
    *,
    n: int = 1,
    max_new_tokens: int,
    greedy: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    dtype: str = "auto",
) -> Batch:
    """`n` responses per prompt (rows grouped per prompt), sampled with the KV cache. Sampling from NaN or
    infinite logits raises NonFiniteLogits."""
    from transformers import LogitsProcessorList

    device = next(model.parameters()).device
    prompt_ids = [ids for ids in encode_prompts(tokenizer, prompts) for _ in range(n)]
    lp, pad, eos = max(map(len, prompt_ids)), tokenizer.pad_token_id, tokenizer.eos_token_id
    ids = torch.full((len(prompt_ids), lp), pad, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for i, p in enumerate(prompt_ids):
        ids[i, lp - len(p) :] = torch.tensor(p)
        attn[i, lp - len(p) :] = 1
    sampling = (
        {"do_sample": False}
        if greedy
        else {
            "do_sample": True,
            "temperature": temperature,
            "top_p": top_p,
            "top_k": top_k,
            "logits_processor": LogitsProcessorList([_refuse_nonfinite]),
        }
    )
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), autocast(device, dtype):
            out = model.generate(
                input_ids=ids.to(device),
                attention_mask=attn.to(device),
                max_new_tokens=max_new_tokens,
                eos_token_id=eos,
                pad_token_id=pad,
                use_cache=True,
                **sampling,
            )
    finally:  # NonFiniteLogits is survivable (the trainer skips the step): the model keeps its mode
        model.train(was_training)
    out = out.clone()  # outside inference mode: an ordinary tensor that autograd may use
    response = out[:, lp:]
    # Keep tokens up to and including the first eos; a response without one was truncated.
    is_eos = response == eos
    after_eos = (is_eos.cumsum(-1) - is_eos.long()) > 0
    response_mask = (~after_eos).float()
    texts = tokenizer.batch_decode(response.masked_fill(after_eos | is_eos, pad), skip_special_tokens=True)
    full_attn = torch.cat([attn.to(device), response_mask.long()], dim=-1)
    return Batch(out, full_attn, lp, response_mask, texts)


def truncated(batch: Batch, eos_token_id: int) -> torch.Tensor:
    """(B,) bool: the response never closed with eos."""
    return ~((batch.response_ids == eos_token_id) & (batch.response_mask > 0)).any(-1)


def response_logits(model, batch: Batch) -> torch.Tensor:
    """(B, Lr, V) the logits that predict each response token (temperature 1)."""
    position_ids = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
    return model(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=position_ids
    ).logits[:, batch.prompt_len - 1 : -1]


def response_log_probs(model, batch: Batch, temperature: float = 1.0) -> torch.Tensor:
    """(B, Lr) log pi(response token | prefix); positions outside the response mask are meaningless."""
    logits = response_logits(model, batch)
    if temperature != 1.0:
        logits = logits / temperature
    return token_log_probs(logits, batch.response_ids)
