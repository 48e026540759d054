"""AnchorCritic contract, missing experts, the expert-embedding cache, and the discriminator CLI."""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest
import torch
from anchor_data import degenerate_rollouts, make_records, write_jsonl

from aapa_rl.anchor import AnchorCritic, ExpertBank, HashEncoder, build_discriminator, load_discriminator
from aapa_rl.cli import main
from aapa_rl.objectives import anchor_gaps, select_hard_set

torch.set_num_threads(1)


class CountingEncoder(HashEncoder):
    """Records every text it embeds."""

    def __init__(self):
        super().__init__()
        self.seen: Counter = Counter()

    def encode(self, texts):
        self.seen.update(texts)
        return super().encode(texts)


def batch(records, group=3):
    """Per prompt: the expert, a truncated copy and an unrelated answer."""
    prompts = [r["prompt"] for r in records]
    rollouts = [[r["expert"], r["expert"][:25], "I like turtles."][:group] for r in records]
    return prompts, rollouts, torch.arange(len(records) * group, dtype=torch.float32).view(-1, group)


@pytest.fixture()
def bank(tmp_path):
    return ExpertBank.load(write_jsonl(tmp_path / "experts.jsonl", make_records(6)))


@pytest.mark.parametrize("variant", ["cosine", "aligned", "classifier"])
def test_evaluate_follows_the_contract(bank, variant):
    disc = build_discriminator(variant, HashEncoder())
    critic = AnchorCritic(disc, bank, temperature=0.5)
    records = make_records(6)[:4]
    prompts, rollouts, rewards = batch(records)
    result = critic.evaluate(prompts, rollouts, rewards, alpha=0.1, rho=0.5)

    experts = [r["expert"] for r in records]
    flat = disc.score([p for p in prompts for _ in range(3)], [y for g in rollouts for y in g],
                      [e for e in experts for _ in range(3)])
    assert torch.equal(result.scores, flat.view(4, 3))
    assert torch.equal(result.expert_scores, disc.score(prompts, experts, experts))
    assert torch.allclose(result.shaping, torch.log(result.scores.clamp(min=1e-6)))
    assert torch.allclose(result.shaped_rewards, rewards + 0.1 * result.shaping)
    assert torch.allclose(result.gaps, anchor_gaps(result.scores, result.expert_scores))
    hard, weights = select_hard_set(result.gaps, 0.5, 0.5)
    assert torch.equal(result.hard_set, hard) and torch.allclose(result.hard_weights, weights)
    assert result.hard_set.dtype == torch.long and len(result.hard_set) <= 2
    assert result.hard_weights.sum().item() == pytest.approx(len(result.hard_set))
    if variant != "classifier":  # an untrained classifier is random; the others see worse rollouts
        assert len(result.hard_set) == 2 and (result.gaps > 0).all()
    assert result.experts == experts
    m = result.metrics
    assert m["hard_set_size"] == len(result.hard_set) and m["missing_experts"] == 0 and m["truncations"] == 0
    assert m["gap_max"] == pytest.approx(result.gaps.max().item())
    assert m["d_rollout_mean"] == pytest.approx(result.scores.mean().item())
    assert m["d_expert_mean"] == pytest.approx(result.expert_scores.mean().item())
    assert all(isinstance(v, float) and math.isfinite(v) for v in m.values())


def test_missing_expert_is_an_error_or_a_counted_skip(bank):
    disc = build_discriminator("cosine", HashEncoder())
    records = make_records(6)[:3]
    prompts, rollouts, rewards = batch(records)
    prompts[1] = "A prompt the bank has never seen"
    with pytest.raises(KeyError, match=r"1 of 3 prompts have no expert .* first: prompt 1 'A prompt the"):
        AnchorCritic(disc, bank).evaluate(prompts, rollouts, rewards, alpha=0.1, rho=1.0)
    critic = AnchorCritic(disc, bank, missing_expert="skip")
    result = critic.evaluate(prompts, rollouts, rewards, alpha=0.1, rho=1.0)
    assert result.experts[1] is None and result.metrics["missing_experts"] == 1
    assert result.scores[1].isnan().all() and result.gaps[1].isnan() and result.expert_scores[1].isnan()
    assert (result.shaping[1] == 0).all() and torch.equal(result.shaped_rewards[1], rewards[1])
    assert 1 not in result.hard_set.tolist() and set(result.hard_set.tolist()) == {0, 2}
    assert math.isfinite(result.metrics["gap_mean"]) and math.isfinite(result.metrics["d_rollout_mean"])


def test_bad_batch_shapes_are_rejected(bank):
    critic = AnchorCritic(build_discriminator("cosine", HashEncoder()), bank)
    prompts, rollouts, rewards = batch(make_records(6)[:2])
    with pytest.raises(ValueError, match=r"groups \(sizes \[2, 3\]\)"):
        critic.evaluate(prompts, [rollouts[0], rollouts[1][:2]], rewards, alpha=0.1, rho=0.5)


@pytest.mark.parametrize("variant", ["pairwise", "aligned"])
def test_each_expert_is_embedded_once_per_run_and_reused_from_disk(bank, tmp_path, variant):
    records = make_records(6)
    prompts, rollouts, rewards = batch(records)
    rollouts = [["I like turtles.", "The answer is 7."] for _ in records]  # no text shared with experts
    rewards = torch.zeros(6, 2)
    encoder = CountingEncoder()
    critic = AnchorCritic(build_discriminator(variant, encoder, hidden=8, cache_dir=tmp_path / "cache"), bank)
    for _ in range(3):
        critic.evaluate(prompts, rollouts, rewards, alpha=0.1, rho=0.5)
    cached = [r["expert"] for r in records] + [r["prompt"] for r in records]
    if variant == "aligned":  # the sentence matcher embeds the experts' sentences instead
        from aapa_rl.anchor.discriminator import split_sentences

        cached = [s for r in records for s in split_sentences(r["expert"])]
    assert max(encoder.seen[t] for t in cached) == 1
    assert encoder.seen["I like turtles."] == 3 * 6  # rollouts are new every step: never cached
    assert critic.discriminator.cache.hits > 0

    fresh = CountingEncoder()  # a new run: the experts come from the disk cache
    AnchorCritic(build_discriminator(variant, fresh, hidden=8, cache_dir=tmp_path / "cache"), bank).evaluate(
        prompts, rollouts, rewards, alpha=0.1, rho=0.5)
    assert not any(fresh.seen[t] for t in cached)
    assert list((tmp_path / "cache").glob("hash-*/*.safetensors"))


def test_cli_trains_evaluates_and_hands_over_a_discriminator(tmp_path, capsys):
    records = make_records(40)
    experts = write_jsonl(tmp_path / "experts.jsonl", records)
    samples = write_jsonl(tmp_path / "rollouts.jsonl", degenerate_rollouts(records))
    out = tmp_path / "disc"
    assert main(["discriminator", "train", "--experts", str(experts), "--rollouts", str(samples),
                 "--encoder", "hash", "--variant", "pairwise", "--out", str(out), "--steps", "100"]) == 0
    printed = capsys.readouterr().out
    assert "AUROC" in printed and "span_repeated" in printed and "rollout" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["heldout"]["auroc"] > 0.9 and report["examples"]["per_type"]["expert"] == 40
    assert {"config.json", "head.safetensors", "report.txt", "scores_hist.png", "embedding_cache"} <= {
        p.name for p in out.iterdir()}
    assert json.loads((out / "config.json").read_text())["encoder"] == "hash"

    scores = tmp_path / "scores.jsonl"
    assert main(["discriminator", "eval", "--disc", str(out), "--experts", str(experts), "--rollouts",
                 str(samples), "--out", str(tmp_path / "eval"), "--scores", str(scores)]) == 0
    assert "evaluated examples" in capsys.readouterr().out
    rows = [json.loads(line) for line in scores.read_text().splitlines()]
    assert {r["kind"] for r in rows} >= {"expert", "rollout", "truncated"}
    assert (tmp_path / "eval" / "scores_hist.png").exists()

    disc = load_discriminator(out)
    critic = AnchorCritic(disc, ExpertBank.load(experts))
    result = critic.evaluate([records[0]["prompt"]], [[records[0]["expert"], "The answer is 5. " * 4]],
                             torch.zeros(1, 2), alpha=1.0, rho=1.0)
    assert result.scores[0, 0] > result.scores[0, 1]


def test_cli_reports_bad_input_without_traceback(tmp_path, capsys):
    records = make_records(4)
    experts = write_jsonl(tmp_path / "experts.jsonl", [*records[:3], {**records[3], "expert": 7}])
    assert main(["discriminator", "train", "--experts", str(experts), "--encoder", "hash",
                 "--out", str(tmp_path / "disc")]) == 2
    assert f"error: {experts}: row 4: field 'expert': expected a string" in capsys.readouterr().err
    good = write_jsonl(tmp_path / "good.jsonl", records)
    assert main(["discriminator", "eval", "--disc", str(tmp_path / "nope"), "--experts", str(good)]) == 2
    assert f"error: {tmp_path / 'nope'}: not a discriminator directory" in capsys.readouterr().err
