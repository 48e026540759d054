"""The batched hash encoder, response statistics and sentence matching against plain per-item references
(the straightforward loops they replaced), on a fixed set of texts with the awkward cases."""

from __future__ import annotations

import math
import random
import re
from collections import Counter

import numpy as np
import pytest
import torch
from anchor_data import make_records

from aapa_rl.anchor import HashEncoder, build_discriminator
from aapa_rl.anchor.discriminator import MAX_SENTENCES, TERMINAL, TOKEN_RE, split_sentences, text_stats
from aapa_rl.anchor.training import hard_negatives

torch.set_num_threads(1)
LONG = " ".join(f"Step {i}: add {i} to the total." for i in range(80))  # more than MAX_SENTENCES
ODD = ["", "   ", "a", "ab", "no end", "caf\udcc3\udca9 \ufffd bytes that were not UTF-8.", "x" * 5000,
       "Line one\nline two\n\n  line three.  \r\n four", "一。二！三？四", "x. . y", "((( ))) !!! ??",
       "Repeat this. Repeat this. Repeat this. Repeat this.", "tab\tsep\x1cfs\x1d.\x85 next\u2028 line.",
       "ÄÖÜ straße ΣΊΣΥΦΟΣ", LONG, LONG[:3000] + " " + LONG]


def fixed_set() -> tuple[list[str], list[str], list[str]]:
    """(prompts, responses, experts): experts, their generic negatives and odd texts, experts repeated."""
    records, rng = make_records(12), random.Random(0)
    prompts, responses, experts = [], [], []
    for k, record in enumerate(records):
        negatives = hard_negatives(record["expert"], records[k - 1]["expert"], rng)
        for response in [record["expert"], *(n for n in negatives.values() if n is not None)]:
            prompts.append(record["prompt"])
            responses.append(response)
            experts.append(record["expert"])
    for text in ODD:
        for expert in (records[0]["expert"], LONG, "Short."):
            prompts.append("Q")
            responses.append(text)
            experts.append(expert)
    return prompts, responses, experts


def reference_embedding(text: str, encoder: HashEncoder) -> np.ndarray:
    text = " ".join(text.lower().split())[: encoder.max_chars]
    codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), np.uint32).astype(np.uint64)
    grams, h = [], codes
    for n in range(2, encoder.ngrams[-1] + 1):
        h = h[:-1] * np.uint64(0x9E3779B97F4A7C15) + codes[n - 1:]
        if n >= encoder.ngrams[0]:
            grams.append(h)
    h = np.concatenate(grams)
    h ^= h >> np.uint64(31)
    sign = ((h >> np.uint64(40)) & np.uint64(1)).astype(np.float64) * 2 - 1
    vec = np.bincount((h % np.uint64(encoder.dim)).astype(np.int64), weights=sign, minlength=encoder.dim)
    norm = np.linalg.norm(vec)
    return (vec / norm if norm > 0 else vec).astype(np.float32)


def reference_stats(text: str) -> tuple[int, float, float, float]:
    tokens = TOKEN_RE.findall(text.lower())
    trigrams = Counter(zip(tokens, tokens[1:], tokens[2:], strict=False))
    total = max(1, len(tokens) - 2)
    stripped = text.rstrip()
    return (len(text), len(trigrams) / total if trigrams else 1.0,
            sum(c for c in trigrams.values() if c > 1) / total,
            0.0 if stripped and stripped[-1] in TERMINAL else 1.0)


def reference_alignment(response: str, expert: str, encoder: HashEncoder) -> tuple[float, float, float]:
    rs, es = split_sentences(response), split_sentences(expert)
    r_emb = encoder.encode(rs[:MAX_SENTENCES]).numpy()
    e_emb = encoder.encode(es[:MAX_SENTENCES]).numpy()
    sim = np.clip(r_emb @ e_emb.T, 0, 1).reshape(len(r_emb), len(e_emb))
    total = 0.0
    for _ in range(min(sim.shape)):
        i, j = divmod(int(sim.argmax()), sim.shape[1])
        if sim[i, j] <= 0:
            break
        total += float(sim[i, j])
        sim[i, :] = -1
        sim[:, j] = -1
    p, r = total / len(rs) if rs else 0.0, total / len(es) if es else 0.0
    return p, r, 2 * p * r / (p + r) if p + r > 0 else 0.0


def test_batched_hash_encoder_matches_one_text_at_a_time():
    encoder = HashEncoder()
    _, responses, experts = fixed_set()
    texts = responses + experts + [s for t in ODD for s in split_sentences(t)]
    batched = encoder.encode(texts)
    assert encoder.truncated == sum(len(" ".join(t.lower().split())) > encoder.max_chars for t in texts) > 0
    assert torch.equal(batched, torch.from_numpy(np.stack([reference_embedding(t, encoder) for t in texts])))
    assert encoder.encode([]).shape == (0, encoder.dim)


def test_sentence_split_and_statistics_match_the_references():
    _, responses, experts = fixed_set()
    # Latin ends need whitespace after them, CJK ends none.
    reference = re.compile(r"(?<=[.!?])\s+|(?<=[。！？])\s*|\s*\n\s*")
    texts = responses + experts + ODD
    for text in texts:
        assert split_sentences(text) == [s for s in (p.strip() for p in reference.split(text)) if s]
    assert np.array_equal(text_stats(texts), np.array([reference_stats(t) for t in texts], np.float64))
    assert text_stats([]).shape == (0, 4)
    odd = ["İİ x", "a", "x \u00ff\u0130 y"]  # lower() changes the length of "İ"
    assert np.array_equal(text_stats(odd), np.array([reference_stats(t) for t in odd]))


@pytest.mark.parametrize("variant", ["pairwise", "classifier", "aligned"])
def test_features_match_per_item_references(variant):
    encoder = HashEncoder()
    disc = build_discriminator(variant, encoder, hidden=8)
    prompts, responses, experts = fixed_set()
    features = disc.features(prompts, responses, experts if disc.needs_expert else None).numpy()
    expected = []
    for response, expert in zip(responses, experts, strict=True):
        length, distinct, repeated, truncated = reference_stats(response)
        if variant == "classifier":
            expected.append((math.log1p(length) / 10, distinct, repeated, truncated))
            continue
        e_length, e_distinct, e_repeated, e_truncated = reference_stats(expert)
        ratio = max(-3.0, min(3.0, math.log((length + 1) / (e_length + 1))))
        row = (ratio, distinct - e_distinct, repeated - e_repeated, truncated - e_truncated)
        expected.append(reference_alignment(response, expert, encoder) + row if variant == "aligned" else row)
    columns = slice(0, None) if variant == "aligned" else slice(-4, None)
    np.testing.assert_allclose(features[:, columns], np.array(expected, np.float32), rtol=0, atol=1e-6)
    # Every response over the cap counts; an expert counts once, however many responses it is paired with.
    capped = sum(len(split_sentences(t)) > MAX_SENTENCES for t in responses + list(dict.fromkeys(experts)))
    assert variant != "aligned" or disc.capped == capped > 0


def test_statistics_match_the_reference_on_random_repetitive_texts():
    rng = random.Random(1)
    vocab = ["the", "sum", "is", "12", "boxed", "\\", "{", "}", ".", ",", "x_1", "é", "Ω", "ab", "a"]
    spaces = ["", " ", "  ", "\n"]
    texts = ["".join(rng.choice(vocab) + rng.choice(spaces) for _ in range(rng.randint(0, 400)))
             for _ in range(300)]  # up to ~400 tokens: rows of every width up to 512 in one batch
    assert np.array_equal(text_stats(texts), np.array([reference_stats(t) for t in texts], np.float64))
