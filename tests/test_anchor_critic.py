"""AnchorCritic.score and anchor_step's contract, missing experts, the expert-embedding cache, and the
discriminator CLI."""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path

import pytest
import torch
from anchor_data import degenerate_rollouts, make_records, write_jsonl

from aapa_rl.anchor import (
    AnchorCritic,
    ExpertBank,
    HashEncoder,
    anchor_step,
    build_discriminator,
    load_discriminator,
)
from aapa_rl.anchor.discriminator import MAX_SENTENCES
from aapa_rl.cli import main
from aapa_rl.objectives import anchor_gaps, select_hard_set
from aapa_rl.schedule import ScheduleValues, Stage
from aapa_rl.settings import AapaSettings

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]


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


def evaluate(critic, bank, prompts, rollouts, rewards, *, alpha, rho, temperature=None, objective="grpo"):
    """What a backend does per step: the bank's experts, the critic's scores, the core's anchor step."""
    experts = [bank.expert_for(prompt=p) for p in prompts]
    scored = critic.score(prompts, experts, rollouts)
    values = ScheduleValues(0, 0, objective, lam=0.0, alpha=alpha, rho=rho, mu=0.0)
    settings = AapaSettings(stages=[Stage(1, objective)], temperature=temperature)
    return experts, scored, anchor_step(values, settings, scored, rewards)


@pytest.fixture()
def bank(tmp_path):
    return ExpertBank.load(write_jsonl(tmp_path / "experts.jsonl", make_records(6)))


@pytest.mark.parametrize("variant", ["cosine", "aligned", "classifier"])
def test_evaluate_follows_the_contract(bank, variant):
    disc = build_discriminator(variant, HashEncoder())
    critic = AnchorCritic(disc)
    records = make_records(6)[:4]
    prompts, rollouts, rewards = batch(records)
    experts, scored, step = evaluate(
        critic, bank, prompts, rollouts, rewards, alpha=0.1, rho=0.5, temperature=0.5
    )

    assert experts == [r["expert"] for r in records]
    flat = disc.score([p for p in prompts for _ in range(3)], [y for g in rollouts for y in g],
                      [e for e in experts for _ in range(3)])
    assert torch.equal(scored.scores, flat.view(4, 3))
    assert torch.equal(scored.expert_scores, disc.score(prompts, experts, experts))
    assert torch.allclose(scored.gaps, anchor_gaps(scored.scores, scored.expert_scores))
    assert torch.allclose(step.shaping, torch.log(scored.scores.clamp(min=1e-6)))
    assert torch.allclose(step.shaped_rewards, rewards + 0.1 * step.shaping)
    hard, weights = select_hard_set(scored.gaps, 0.5, 0.5)
    assert torch.equal(step.hard_set, hard) and torch.allclose(step.hard_weights, weights)
    assert step.hard_set.dtype == torch.long and len(step.hard_set) <= 2
    assert step.hard_weights.sum().item() == pytest.approx(len(step.hard_set))
    if variant != "classifier":  # an untrained classifier is random; the others see worse rollouts
        assert len(step.hard_set) == 2 and (scored.gaps > 0).all()
    m = step.metrics
    assert m["hard_set_size"] == len(step.hard_set) and m["missing_experts"] == 0
    assert m["encoder_truncations"] == 0 and m["reward_raw_mean"] == pytest.approx(rewards.mean().item())
    assert m["gap_max"] == pytest.approx(scored.gaps.max().item())
    assert m["d_rollout_mean"] == pytest.approx(scored.scores.mean().item())
    assert m["d_expert_mean"] == pytest.approx(scored.expert_scores.mean().item())
    assert all(isinstance(v, float) and math.isfinite(v) for v in m.values())
    # In an SFT stage the rollouts carry the shaping alone.
    _, _, sft = evaluate(critic, bank, prompts, rollouts, rewards, alpha=0.1, rho=0.5, objective="sft")
    assert torch.allclose(sft.shaped_rewards, 0.1 * sft.shaping)


def test_random_selection_spends_the_same_budget_blind_to_the_gaps(bank):
    critic = AnchorCritic(build_discriminator("cosine", HashEncoder()), missing_expert="skip")
    prompts, rollouts, rewards = batch(make_records(6))
    prompts[2] = "A prompt the bank has never seen"
    values = ScheduleValues(0, 0, "grpo", lam=1.0, alpha=0.0, rho=0.5, mu=0.0)
    settings = AapaSettings(stages=[Stage(1, "grpo", lam=1.0, rho=0.5)], selection="random")
    scored = critic.score(prompts, [bank.expert_for(prompt=p) for p in prompts], rollouts)
    chosen = set()
    for seed in range(20):
        torch.manual_seed(seed)
        step = anchor_step(values, settings, scored, rewards)
        assert len(step.hard_set) == 3 and 2 not in step.hard_set.tolist() and (step.hard_weights == 1).all()
        chosen |= set(step.hard_set.tolist())
    assert chosen == {0, 1, 3, 4, 5}


def test_missing_expert_is_an_error_or_a_counted_skip(bank):
    disc = build_discriminator("cosine", HashEncoder())
    records = make_records(6)[:3]
    prompts, rollouts, rewards = batch(records)
    prompts[1] = "A prompt the bank has never seen"
    with pytest.raises(KeyError, match=r"1 of 3 prompts have no expert, first: prompt 1 'A prompt the"):
        evaluate(AnchorCritic(disc), bank, prompts, rollouts, rewards, alpha=0.1, rho=1.0)
    critic = AnchorCritic(disc, missing_expert="skip")
    experts, scored, step = evaluate(critic, bank, prompts, rollouts, rewards, alpha=0.1, rho=1.0)
    assert experts[1] is None and step.metrics["missing_experts"] == 1
    assert scored.scores[1].isnan().all() and scored.gaps[1].isnan() and scored.expert_scores[1].isnan()
    assert (step.shaping[1] == 0).all() and torch.equal(step.shaped_rewards[1], rewards[1])
    assert 1 not in step.hard_set.tolist() and set(step.hard_set.tolist()) == {0, 2}
    assert math.isfinite(step.metrics["gap_mean"]) and math.isfinite(step.metrics["d_rollout_mean"])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_score_is_an_error_not_a_missing_expert(bank, monkeypatch, bad):
    """NaN marks a missing expert; a broken D must not pass for one (shaping 0, prompt out of hard set)."""
    disc = build_discriminator("cosine", HashEncoder())
    real_score = disc.score
    broken = {"cached": None}  # which call returns a non-finite D: rollouts (False) or experts (True)

    def score(prompts, responses, experts=None, *, cached=False):
        d = real_score(prompts, responses, experts, cached=cached)
        if cached == broken["cached"]:
            d[-2] = bad  # a rollout of prompt 2, or the expert of prompt 1 (prompt 0 has none)
        return d

    monkeypatch.setattr(disc, "score", score)
    prompts, rollouts, rewards = batch(make_records(6)[:3])
    prompts[0] = "A prompt the bank has never seen"  # a genuine missing expert, skipped
    critic = AnchorCritic(disc, missing_expert="skip")
    broken["cached"] = False
    with pytest.raises(RuntimeError, match=r"non-finite score for 1 of 6 rollouts, first: prompt 2 "):
        evaluate(critic, bank, prompts, rollouts, rewards, alpha=0.1, rho=1.0)
    broken["cached"] = True
    with pytest.raises(RuntimeError, match=r"non-finite score for 1 of 2 experts, first: prompt 1 "):
        evaluate(critic, bank, prompts, rollouts, rewards, alpha=0.1, rho=1.0)
    broken["cached"] = None
    _, scored, step = evaluate(critic, bank, prompts, rollouts, rewards, alpha=0.1, rho=1.0)
    assert scored.scores[0].isnan().all() and scored.scores[1:].isfinite().all()
    assert scored.expert_scores[1:].isfinite().all() and step.metrics["missing_experts"] == 1


def test_bad_batches_are_rejected_naming_the_prompt_and_rollout(bank):
    """Checked before the batch is flattened for the discriminator, so no error names a flat position."""
    critic = AnchorCritic(build_discriminator("cosine", HashEncoder()))
    prompts, rollouts, _ = batch(make_records(6)[:2])
    experts = [bank.expert_for(prompt=p) for p in prompts]
    with pytest.raises(ValueError, match=r"prompt 1 has 2 rollouts but prompt 0 has 3: every group must"):
        critic.score(prompts, experts, [rollouts[0], rollouts[1][:2]])
    with pytest.raises(ValueError, match=r"got 2 prompts, 1 experts and 2 groups"):
        critic.score(prompts, experts[:1], rollouts)
    # A flat list of strings is not P groups (each string would be scored character by character).
    with pytest.raises(TypeError, match=r"the rollouts of prompt 0 are str, expected a list of str"):
        critic.score(prompts, experts, ["ab", "cd"])
    with pytest.raises(TypeError, match=r"prompt 1, rollout 2 is NoneType, expected str"):
        critic.score(prompts, experts, [rollouts[0], [*rollouts[1][:2], None]])
    with pytest.raises(TypeError, match=r"the expert of prompt 1 is int, expected str or None"):
        critic.score(prompts, [experts[0], 7], rollouts)
    with pytest.raises(TypeError, match=r"prompt 0 is bytes, expected str"):
        critic.score([b"x", prompts[1]], experts, rollouts)
    assert critic.score(prompts, experts, [tuple(g) for g in rollouts]).scores.shape == (2, 3)


@pytest.mark.parametrize("blank", ["", "  \n "])
def test_a_blank_expert_is_a_missing_one(bank, blank):
    disc = build_discriminator("cosine", HashEncoder())
    prompts, rollouts, rewards = batch(make_records(6)[:3])
    experts = [bank.expert_for(prompt=p) for p in prompts]
    experts[1] = blank
    with pytest.raises(KeyError, match=r"1 of 3 prompts have no expert, first: prompt 1 .*blank expert"):
        AnchorCritic(disc).score(prompts, experts, rollouts)
    scored = AnchorCritic(disc, missing_expert="skip").score(prompts, experts, rollouts)
    assert scored.missing_experts == 1 and scored.gaps[1].isnan() and scored.scores[1].isnan().all()
    values = ScheduleValues(0, 0, "grpo", lam=1.0, alpha=0.1, rho=1.0, mu=0.0)
    step = anchor_step(values, AapaSettings(stages=[Stage(1, "grpo", lam=1.0, rho=1.0)]), scored, rewards)
    assert 1 not in step.hard_set.tolist() and torch.equal(step.shaped_rewards[1], rewards[1])


def test_an_expert_over_the_sentence_cap_is_one_truncation_per_run(bank):
    """Rollouts over the cap count on every call; the expert once, when first split (not once per pair)."""
    critic = AnchorCritic(build_discriminator("aligned", HashEncoder()))
    long_expert = " ".join(f"Sentence number {i}." for i in range(MAX_SENTENCES + 10))
    long_rollout = " ".join(f"Step {i}." for i in range(MAX_SENTENCES + 1))
    rollouts = [["Short answer."] * 7 + [long_rollout]]
    assert critic.score(["Q"], [long_expert], rollouts).truncations == 1 + 1
    assert critic.score(["Q"], [long_expert], rollouts).truncations == 1
    assert critic.score(["Q2"], [long_expert], rollouts).truncations == 1  # a new pair, the same expert


def test_the_api_snippet_in_the_docs_runs(tmp_path, monkeypatch):
    text = (ROOT / "docs" / "anchor.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    records = make_records(4)
    write_jsonl(tmp_path / "experts.jsonl", records)
    build_discriminator("cosine", HashEncoder()).save(tmp_path / "runs" / "disc", {"heldout": {"auroc": 0.9}})
    prompts, rollouts, rewards = batch(records)
    env = {"prompts": prompts, "rollouts": rollouts, "rewards": rewards}
    exec(code, env)
    step = env["step"]
    assert step.shaped_rewards.shape == (4, 3) and step.hard_set.numel() == 1
    # Every metric anchor_step logs is the one the docs name (x_mean/std stands for x_mean and x_std).
    documented = re.sub(r"`(\w+)_mean/std`", r"`\1_mean`, `\1_std`", text)
    assert [key for key in step.metrics if f"`{key}`" not in documented] == []


@pytest.mark.parametrize("variant", ["pairwise", "aligned"])
def test_each_expert_is_embedded_once_per_run_and_reused_from_disk(bank, tmp_path, variant):
    records = make_records(6)
    prompts, rollouts, rewards = batch(records)
    rollouts = [["I like turtles.", "The answer is 7."] for _ in records]  # no text shared with experts
    rewards = torch.zeros(6, 2)
    encoder = CountingEncoder()
    critic = AnchorCritic(build_discriminator(variant, encoder, hidden=8, cache_dir=tmp_path / "cache"))
    for _ in range(3):
        evaluate(critic, bank, prompts, rollouts, rewards, alpha=0.1, rho=0.5)
    cached = [r["expert"] for r in records] + [r["prompt"] for r in records]
    if variant == "aligned":  # the sentence matcher embeds the experts' sentences instead
        from aapa_rl.anchor.discriminator import split_sentences

        cached = [s for r in records for s in split_sentences(r["expert"])]
    assert max(encoder.seen[t] for t in cached) == 1
    assert encoder.seen["I like turtles."] == 3 * 6  # rollouts are new every step: never cached
    assert critic.discriminator.cache.hits > 0

    fresh = CountingEncoder()  # a new run: the experts come from the disk cache
    fresh_critic = AnchorCritic(build_discriminator(variant, fresh, hidden=8, cache_dir=tmp_path / "cache"))
    evaluate(fresh_critic, bank, prompts, rollouts, rewards, alpha=0.1, rho=0.5)
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
    scored = AnchorCritic(disc).score([records[0]["prompt"]], [records[0]["expert"]],
                                      [[records[0]["expert"], "The answer is 5. " * 4]])
    assert scored.scores[0, 0] > scored.scores[0, 1]


def test_cli_reports_bad_input_without_traceback(tmp_path, capsys):
    records = make_records(4)
    experts = write_jsonl(tmp_path / "experts.jsonl", [*records[:3], {**records[3], "expert": 7}])
    assert main(["discriminator", "train", "--experts", str(experts), "--encoder", "hash",
                 "--out", str(tmp_path / "disc")]) == 2
    assert f"error: {experts}: row 4: field 'expert': expected a string" in capsys.readouterr().err
    good = write_jsonl(tmp_path / "good.jsonl", records)
    assert main(["discriminator", "eval", "--disc", str(tmp_path / "nope"), "--experts", str(good)]) == 2
    assert f"error: {tmp_path / 'nope'}: not a discriminator directory" in capsys.readouterr().err
