"""The frozen sentence-level discriminator D(x, y) in (0, 1): variants cosine, pairwise, classifier, aligned.

Each variant maps (prompt, response, expert) to a feature vector; a small head maps features to a logit.
Training (training.py) fits only the head on precomputed features; the encoder never changes.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .encoders import EmbeddingCache, HashEncoder, SentenceEncoder, check_texts, load_encoder

VARIANTS = ("cosine", "pairwise", "classifier", "aligned")
MIN_AUROC = 0.6
N_STATS = 4
MAX_SENTENCES = 64  # sentences per text that get embedded; the rest count as unmatched
TERMINAL = set(".!?;:)]}>\"'`*|。！？")
TOKEN_RE = re.compile(r"\w+|[^\w\s]")
# A Latin sentence ends at .!? followed by whitespace (so "3.14" stays whole); CJK text puts no space after
# 。！？, so they end one anyway. split_sentences strips what is around a split.
SENTENCE_END_RE = re.compile(r"(?<=[.!?])\s+|(?<=[。！？])\s*|\n")


class DiscriminatorQualityError(RuntimeError):
    """The discriminator cannot tell experts from negatives on held-out data."""


def split_sentences(text: str) -> list[str]:
    return [s for s in (p.strip() for p in SENTENCE_END_RE.split(text)) if s]


def text_stats(texts: list[str]) -> np.ndarray:
    """(N, 4) per text: length in chars, distinct rate of token trigrams, share of trigram positions inside
    a repeated span (a trigram seen twice or more), and 1 if the text does not end like a finished answer.
    Tokens are TOKEN_RE's (\\w+ or one other non-space char) on the lower-cased text. All texts at once in
    numpy (per-text Python cost more than the hash encoder): tokens and trigrams are compared by 64-bit
    polynomial hashes, so the values equal the plain definition unless two of them collide."""
    n = len(texts)
    lowered = [text.lower() for text in texts]
    lengths = np.fromiter(map(len, lowered), np.int64, count=n)
    text_starts = np.cumsum(lengths) - lengths
    codes = np.frombuffer("".join(lowered).encode("utf-32-le", "surrogatepass"), np.uint32)
    kind = _char_kinds(codes)
    word = kind == 1
    continues = np.zeros(len(codes), bool)  # a word char right after a word char of the same text
    continues[1:] = word[1:] & word[:-1]
    continues[text_starts[text_starts < len(codes)]] = False
    starts = np.flatnonzero((kind > 0) & ~continues)
    first_token = np.searchsorted(starts, text_starts)
    n_tokens = np.diff(np.append(first_token, len(starts)))
    owner = np.repeat(np.arange(n), n_tokens)
    # Token hash: sum of (code + 1) * B^(i - start) over its chars, from prefix sums of (code + 1) * B^i
    # where whitespace adds 0, so each token's sum may run on to the next token's start.
    powers, inverse = _powers(len(codes) + 1)
    prefix = np.zeros(len(codes) + 1, np.uint64)
    np.cumsum((codes + np.uint64(1)) * powers[: len(codes)] * (kind > 0), out=prefix[1:])
    token = (prefix[np.append(starts[1:], len(codes))] - prefix[starts]) * inverse[starts]
    inside = owner[:-2] == owner[2:]  # trigrams that lie in one text
    trigram = ((token[:-2] * _MIX + token[1:-1]) * _MIX + token[2:]) * _MIX  # high bits depend on all three
    distinct, once = _distinct_and_once(trigram[inside] >> np.uint64(1), np.maximum(n_tokens - 2, 0))
    total = np.maximum(1, n_tokens - 2)
    has_trigrams = n_tokens >= 3
    # A text ends like an answer when its last non-space char is in TERMINAL: then it is its last token,
    # as no TERMINAL char is a word char.
    last_kind = kind[starts[np.maximum(first_token + n_tokens - 1, 0)]] if len(starts) else np.zeros(n)
    stats = np.empty((n, N_STATS))
    stats[:, 0] = np.fromiter(map(len, texts), np.int64, count=n)
    stats[:, 1] = np.where(has_trigrams, distinct / total, 1.0)
    stats[:, 2] = np.where(has_trigrams, (n_tokens - 2 - once) / total, 0.0)
    stats[:, 3] = (n_tokens == 0) | (last_kind != 3)
    return stats


def _distinct_and_once(keys: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per text, given its keys (contiguous, counts[i] of them, all below 2^63): how many are distinct and
    how many occur once. Sorting finds equal keys; each text is a row of a padded 2-D array, texts bucketed
    by power-of-two width, because numpy sorts rows of up to 256 values ~15x faster per value (sorting
    networks) than one long array."""
    distinct, once = np.zeros(len(counts), np.int64), np.zeros(len(counts), np.int64)
    offsets = np.cumsum(counts) - counts
    widths = np.left_shift(1, np.ceil(np.log2(np.maximum(counts, 16))).astype(np.int64))
    for width in np.unique(widths[counts > 0]).tolist():
        rows = np.flatnonzero((widths == width) & (counts > 0))
        column = np.arange(width)
        valid = column < counts[rows, None]
        index = np.minimum(offsets[rows, None] + column, len(keys) - 1)
        padded = np.where(valid, keys[index], np.uint64(2**64 - 1))  # the pad differs from every key
        padded.sort(axis=1)
        new = np.ones_like(valid)  # the first of a run of equal keys
        new[:, 1:] = padded[:, 1:] != padded[:, :-1]
        last = np.ones_like(valid)  # the last of its run (a pad always starts a new one)
        last[:, :-1] = new[:, 1:]
        distinct[rows] = (new & valid).sum(1)
        once[rows] = (new & last & valid).sum(1)
    return distinct, once


# Per code point: 0 whitespace (\\s), 1 word (\\w), 2 other, 3 other in TERMINAL; -1 not classified yet.
_KIND = np.full(0x110000, -1, np.int8)
_BASE = 0x100000001B3  # odd, so it has an inverse mod 2^64
_MIX = np.uint64(0x9E3779B97F4A7C15)
_POWERS = (np.ones(0, np.uint64), np.ones(0, np.uint64))  # B^i and B^-i mod 2^64, grown on demand


def _char_kinds(codes: np.ndarray) -> np.ndarray:
    kind = _KIND[codes]
    if (kind < 0).any():  # classify new code points with the regex itself, once per process
        for code in np.unique(codes[kind < 0]).tolist():
            char = chr(code)
            other = 3 if char in TERMINAL else 2
            _KIND[code] = 1 if re.match(r"\w", char) else 0 if re.match(r"\s", char) else other
        kind = _KIND[codes]
    return kind


def _powers(n: int) -> tuple[np.ndarray, np.ndarray]:
    global _POWERS
    if len(_POWERS[0]) < n:
        size = max(n, 2 * len(_POWERS[0]), 1 << 16)
        grown = []
        for base in (_BASE, pow(_BASE, -1, 1 << 64)):
            steps = np.full(size, base, np.uint64)
            steps[0] = 1
            grown.append(np.cumprod(steps))  # uint64 wraps: powers mod 2^64
        _POWERS = (grown[0], grown[1])
    return _POWERS


class Discriminator(nn.Module):
    """D(x, y) = sigmoid(head(features(x, y, y*))); always scores in eval mode without gradients."""

    def __init__(self, variant: str, encoder: HashEncoder | SentenceEncoder, *, margin: float = 0.5,
                 tau: float = 0.1, hidden: int = 128, cache_dir: str | Path | None = None):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown discriminator variant {variant!r}; choose one of {VARIANTS}")
        self.variant = variant
        self.encoder = encoder
        self.cache = EmbeddingCache(encoder, cache_dir)
        self.needs_expert = variant != "classifier"
        self.config = {"variant": variant, "encoder": encoder.spec, "encoder_id": encoder.id,
                       "margin": margin, "tau": tau, "hidden": hidden}
        self._expert_stats: dict[str, tuple] = {}  # per expert: text_stats, computed once
        self._expert_sentences: dict[str, list[str]] = {}  # per expert: split_sentences, computed once
        self.report: dict | None = None  # the training report, when loaded from a directory
        self.capped = 0  # texts with more than MAX_SENTENCES sentences (aligned)
        d = encoder.dim
        if variant in ("cosine", "aligned"):
            # Untrained, D = sigmoid((similarity - m) / tau); training the aligned link starts from it.
            self.head = nn.Linear(1 if variant == "cosine" else 3 + N_STATS, 1)
            with torch.no_grad():
                self.head.weight.zero_()
                self.head.weight[0, -1 if variant == "cosine" else 2] = 1 / tau
                self.head.bias.fill_(-margin / tau)
        else:
            n_in = (4 * d if variant == "pairwise" else 2 * d) + N_STATS
            self.head = nn.Sequential(nn.Linear(n_in, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        self.head.requires_grad_(False)
        self.to(encoder.device).eval()

    @property
    def trainable(self) -> bool:
        return self.variant != "cosine"

    @property
    def truncated(self) -> int:
        """Texts cut so far: past the encoder's input limit, or past MAX_SENTENCES sentences."""
        return self.encoder.truncated + self.capped

    def _stats(self, responses: list[str], experts: list[str] | None) -> torch.Tensor:
        y = text_stats(responses)
        if experts is None:  # classifier: absolute statistics, no expert needed
            y[:, 0] = np.log1p(y[:, 0]) / 10
        else:
            new = [e for e in dict.fromkeys(experts) if e not in self._expert_stats]
            if new:
                self._expert_stats.update(zip(new, text_stats(new), strict=True))
            e = np.array([self._expert_stats[expert] for expert in experts], np.float64).reshape(-1, N_STATS)
            y[:, 0] = np.clip(np.log((y[:, 0] + 1) / (e[:, 0] + 1)), -3.0, 3.0)
            y[:, 1:] -= e[:, 1:]
        return torch.from_numpy(y.astype(np.float32)).to(self.encoder.device)

    def _recurring_sentences(self, texts: list[str]) -> list[list[str]]:
        """split_sentences of recurring texts (experts), each split once per run; one over MAX_SENTENCES
        counts as one truncation when first split, not on every pair and call that reuses it."""
        for text in dict.fromkeys(texts):
            if text not in self._expert_sentences:
                self._expert_sentences[text] = split_sentences(text)
                self.capped += len(self._expert_sentences[text]) > MAX_SENTENCES
        return [self._expert_sentences[text] for text in texts]

    def _alignment(self, responses: list[str], experts: list[str], cached: bool) -> torch.Tensor:
        """(precision, recall, F) of a one-to-one greedy matching of response and expert sentences. All
        pairs at once: similarities fill a (pair, response sentence, expert sentence) array padded with -1,
        and each greedy step takes every pair's best remaining cell, then retires its row and column."""
        unique = list(dict.fromkeys(experts))  # a group shares its expert: embed its sentences once
        e_sents = self._recurring_sentences(unique)
        if cached:  # recurring texts (experts scored as responses): split, and counted, once like experts
            r_sents = self._recurring_sentences(responses)
        else:
            r_sents = [split_sentences(r) for r in responses]
            self.capped += sum(len(ss) > MAX_SENTENCES for ss in r_sents)
        embed = self.cache.embed if cached else self.encoder.encode
        r_emb = embed([s for ss in r_sents for s in ss[:MAX_SENTENCES]]).cpu().numpy()
        e_emb = self.cache.embed([s for ss in e_sents for s in ss[:MAX_SENTENCES]]).cpu().numpy()

        index = {e: u for u, e in enumerate(unique)}
        pair_expert = np.array([index[e] for e in experts], np.int64)
        r_len = np.array([len(ss) for ss in r_sents], np.int64)
        e_len = np.array([len(ss) for ss in e_sents], np.int64)
        r_n, e_n = np.minimum(r_len, MAX_SENTENCES), np.minimum(e_len, MAX_SENTENCES)
        e_start = np.cumsum(e_n) - e_n
        row_pair = np.repeat(np.arange(len(responses)), r_n)  # row of r_emb -> (pair, sentence number)
        row_k = np.arange(len(row_pair)) - np.repeat(np.cumsum(r_n) - r_n, r_n)
        row_expert = pair_expert[row_pair]
        sims = np.full((len(responses), r_n.max(initial=0), e_n.max(initial=0)), -1, np.float32)
        for u in range(len(unique)):  # one matmul per expert, for the sentences of all its responses
            rows = np.flatnonzero(row_expert == u)
            block = r_emb[rows] @ e_emb[e_start[u]: e_start[u] + e_n[u]].T
            sims[row_pair[rows], row_k[rows], : e_n[u]] = np.clip(block, 0, 1)
        total, pairs = np.zeros(len(responses)), np.arange(len(responses))
        for _ in range(min(sims.shape[1:])):
            i, j = np.divmod(sims.reshape(len(responses), -1).argmax(1), sims.shape[2])
            best = sims[pairs, i, j]
            if not (best > 0).any():
                break
            total += np.where(best > 0, best, 0)  # a best of 0 (or padding) means nothing left to match
            sims[pairs, i, :] = -1
            sims[pairs, :, j] = -1
        pair_e_len = e_len[pair_expert]  # all sentences count, matched or not (also those past the cap)
        p = np.divide(total, r_len, out=np.zeros_like(total), where=r_len > 0)
        r = np.divide(total, pair_e_len, out=np.zeros_like(total), where=pair_e_len > 0)
        f = np.divide(2 * p * r, p + r, out=np.zeros_like(total), where=p + r > 0)
        return torch.from_numpy(np.stack([p, r, f], -1).astype(np.float32)).to(self.encoder.device)

    def features(self, prompts: list[str], responses: list[str], experts: list[str] | None = None,
                 *, cached: bool = False) -> torch.Tensor:
        """(N, F) features; `cached=True` embeds the responses through the cache too (for recurring
        texts such as experts scored as responses)."""
        check_texts(prompts, "prompts")
        check_texts(responses, "responses")
        if len(prompts) != len(responses) or (experts is not None and len(experts) != len(responses)):
            raise ValueError(f"{len(prompts)} prompts, {len(responses)} responses and "
                             f"{len(experts) if experts is not None else 'no'} experts: lengths must match")
        if self.needs_expert:
            if experts is None:
                raise ValueError(f"the {self.variant} discriminator needs the expert of every prompt")
            check_texts(experts, "experts")
        with torch.no_grad():
            if self.variant == "aligned":
                alignment = self._alignment(responses, experts, cached)
                return torch.cat([alignment, self._stats(responses, experts)], -1)
            e_y = self.cache.embed(responses) if cached else self.encoder.encode(responses)
            if self.variant == "classifier":
                return torch.cat([self.cache.embed(prompts), e_y, self._stats(responses, None)], -1)
            e_star = self.cache.embed(experts)
            if self.variant == "cosine":
                return (e_y * e_star).sum(-1, keepdim=True)
            return torch.cat([self.cache.embed(prompts), e_y, e_y * e_star, (e_y - e_star).abs(),
                              self._stats(responses, experts)], -1)

    def score_features(self, features: torch.Tensor) -> torch.Tensor:
        self.eval()
        with torch.no_grad():
            return torch.sigmoid(self.head(features).squeeze(-1).float()).clamp(1e-7, 1 - 1e-7)

    def score(self, prompts: list[str], responses: list[str], experts: list[str] | None = None,
              *, cached: bool = False) -> torch.Tensor:
        """D for each (prompt, response, expert): (N,) in (0, 1), no gradient, parameters untouched."""
        return self.score_features(self.features(prompts, responses, experts, cached=cached))

    def save(self, directory: str | Path, report: dict | None = None) -> None:
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "config.json").write_text(json.dumps(self.config, indent=2) + "\n")
        save_file({k: v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()},
                  str(directory / "head.safetensors"))
        if report is not None:
            (directory / "report.json").write_text(json.dumps(report, indent=2) + "\n")


def build_discriminator(variant: str, encoder: HashEncoder | SentenceEncoder | str = "minilm", *,
                        device: str | None = None, **options) -> Discriminator:
    """A fresh discriminator; `encoder` is an encoder or a load_encoder spec. Options: margin, tau
    (cosine, and the aligned link's starting point), hidden (MLP width), cache_dir."""
    if isinstance(encoder, str):
        encoder = load_encoder(encoder, device)
    return Discriminator(variant, encoder, **options)


def _read_json(path: Path) -> dict:
    """A saved discriminator's JSON file (config.json, report.json); a bad one is an error naming it."""
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def heldout_auroc(path: str | Path) -> float | None:
    """Held-out AUROC from a saved discriminator's report.json (NaN: undefined); None when it has no report.
    A report without a numeric `heldout.auroc` is an error naming the file and the field."""
    report_path = Path(path) / "report.json"
    if not report_path.exists():
        return None
    heldout = _read_json(report_path).get("heldout")
    if not isinstance(heldout, dict):
        raise ValueError(f"{report_path}: field 'heldout': missing or not an object (the held-out metrics)")
    if "auroc" not in heldout:
        raise ValueError(f"{report_path}: field 'heldout.auroc': missing")
    auroc = heldout["auroc"]
    if isinstance(auroc, bool) or not isinstance(auroc, int | float):
        raise ValueError(f"{report_path}: field 'heldout.auroc': expected a number, got {json.dumps(auroc)}")
    return float(auroc)


def quality_problem(path: str | Path) -> str | None:
    """Why a saved discriminator is unfit for RL (no report, held-out AUROC below 0.6 or NaN); None if fit."""
    auroc = heldout_auroc(path)
    if auroc is None:
        return "has no report.json"
    return None if auroc >= MIN_AUROC else f"has held-out AUROC {auroc:.3f} < {MIN_AUROC}"


def load_discriminator(path: str | Path, *, force: bool = False, device: str | None = None,
                       cache_dir: str | Path | None = None) -> Discriminator:
    """Load a saved discriminator for RL. Fails unless its report shows held-out AUROC >= 0.6 (force=True
    loads it anyway). Expert embeddings are cached on disk in `cache_dir` (default <path>/embedding_cache)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path}: not a discriminator directory (no config.json)")
    config = _read_json(path / "config.json")
    for key in ("variant", "encoder", "encoder_id", "margin", "tau", "hidden"):
        if key not in config:
            raise ValueError(f"{path / 'config.json'}: field {key!r}: missing")
    report_path = path / "report.json"
    found = None if force else quality_problem(path)
    if found:
        raise DiscriminatorQualityError(
            f"{path} {found}: it cannot be trusted to tell expert responses from negatives. Retrain it "
            "(aapa-rl discriminator train) with harder negatives, or load it anyway with force=True.")
    encoder = load_encoder(config["encoder"], device)
    if encoder.id != config["encoder_id"]:
        raise ValueError(f"{path}: trained with encoder {config['encoder_id']!r}, but "
                         f"{config['encoder']!r} now loads {encoder.id!r}")
    disc = Discriminator(config["variant"], encoder, margin=config["margin"], tau=config["tau"],
                         hidden=config["hidden"], cache_dir=cache_dir or path / "embedding_cache")
    disc.head.load_state_dict(load_file(str(path / "head.safetensors"), device=str(encoder.device)))
    disc.report = _read_json(report_path) if report_path.exists() else None
    return disc
