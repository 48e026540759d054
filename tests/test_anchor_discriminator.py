"""Discriminator variants: ranking, training quality, frozen-ness, bad input, save/load, MiniLM."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from anchor_data import degenerate_rollouts, make_records, same_distribution_rollouts, write_jsonl

from aapa_rl.anchor import (
    DiscriminatorQualityError,
    ExpertBank,
    HashEncoder,
    build_discriminator,
    load_discriminator,
    load_encoder,
    train_discriminator,
)
from aapa_rl.anchor.discriminator import split_sentences
from aapa_rl.anchor.training import GENERIC_NEGATIVES, hard_negatives

torch.set_num_threads(1)
# What each variant can see: the classifier has no expert to compare with (so it cannot tell a wrong
# number or another prompt's expert), and sentence matching is blind to sentence order.
VISIBLE = {
    "cosine": GENERIC_NEGATIVES,
    "pairwise": GENERIC_NEGATIVES,
    "aligned": tuple(t for t in GENERIC_NEGATIVES if t != "sentences_shuffled"),
    "classifier": ("truncated", "span_repeated", "reasoning_dropped", "filler_appended"),
}


def rollouts(rows: list[dict]) -> list[tuple[str, str]]:
    return [(r["prompt"], r["response"]) for r in rows]


@pytest.fixture(scope="module")
def encoder():
    return HashEncoder()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, encoder):
    """One small discriminator per variant, trained on 60 prompts with the generic negatives."""
    tmp = tmp_path_factory.mktemp("trained")
    bank = ExpertBank.load(write_jsonl(tmp / "experts.jsonl", make_records(60)))
    discs = {}
    for variant in VISIBLE:
        disc = build_discriminator(variant, encoder, hidden=64)
        train_discriminator(disc, bank, [], tmp / variant, heldout=0.25, steps=200)
        discs[variant] = disc
    return discs, tmp


@pytest.mark.parametrize("variant", list(VISIBLE))
def test_each_variant_scores_experts_above_their_own_perturbations(trained, variant):
    disc = trained[0][variant]
    fresh = make_records(30, seed=7)  # prompts the head never saw
    rng = random.Random(0)
    for kind in VISIBLE[variant]:
        above = 0
        for k, record in enumerate(fresh):
            expert = record["expert"]
            negative = hard_negatives(expert, fresh[k - 1]["expert"], rng)[kind]
            d_expert, d_negative = disc.score([record["prompt"]] * 2, [expert, negative], [expert] * 2)
            above += bool(d_expert > d_negative)
        assert above >= 0.9 * len(fresh), f"{variant}: expert above {kind} for {above}/{len(fresh)} prompts"


def test_trained_discriminator_reports_high_auroc_when_separable_and_chance_when_not(tmp_path, encoder):
    records = make_records(200)
    bank = ExpertBank.load(write_jsonl(tmp_path / "experts.jsonl", records))
    separable = train_discriminator(build_discriminator("classifier", encoder, hidden=64), bank,
                                    rollouts(degenerate_rollouts(records)), tmp_path / "sep", heldout=0.5,
                                    generic=False, steps=200)
    assert separable["heldout"]["auroc"] > 0.95
    assert separable["heldout"]["auroc_per_type"]["rollout"] > 0.95
    # Rollouts drawn exactly like the experts: nothing to learn, and the report must say so.
    blind = train_discriminator(build_discriminator("classifier", encoder, hidden=64), bank,
                                rollouts(same_distribution_rollouts(records)), tmp_path / "blind",
                                heldout=0.5, generic=False, steps=200)
    assert blind["train"]["auroc"] > 0.9  # it memorises the training prompts ...
    assert 0.35 < blind["heldout"]["auroc"] < 0.65  # ... and generalises to nothing
    with pytest.raises(DiscriminatorQualityError, match=r"held-out AUROC 0\.\d+ < 0.6"):
        load_discriminator(tmp_path / "blind")
    assert load_discriminator(tmp_path / "blind", force=True).variant == "classifier"
    for name in ("config.json", "head.safetensors", "report.json", "report.txt", "scores_hist.png"):
        assert (tmp_path / "sep" / name).stat().st_size > 0


@pytest.mark.parametrize("variant", ["aligned", "aligned-trained"])
def test_aligned_scores_a_repeated_sentence_below_the_clean_response(trained, encoder, variant):
    disc = trained[0]["aligned"] if variant == "aligned-trained" else build_discriminator("aligned", encoder)
    expert = "We add 23 and 45. The ones give 8 and the tens give 6. So the total is 68. The answer is 68."
    repeated = expert.replace("68. The", "68. So the total is 68. The")
    clean, looped = disc.score(["Q"] * 2, [expert, repeated], [expert] * 2)
    assert looped < clean
    precision, recall, f1 = disc.features(["Q"], [repeated], [expert])[0, :3].tolist()
    assert recall == pytest.approx(1.0) and precision == pytest.approx(0.8)  # 4 of 5 sentences matched


@pytest.mark.parametrize("variant", list(VISIBLE))
def test_scoring_is_frozen(trained, variant):
    disc = trained[0][variant]
    before = {k: v.clone() for k, v in disc.state_dict().items()}
    disc.train()  # a caller's stray .train() must not matter
    record = make_records(1, seed=3)[0]
    with torch.enable_grad():
        scores = disc.score([record["prompt"]] * 2, [record["expert"], "It is 1."], [record["expert"]] * 2)
    assert not scores.requires_grad and scores.grad_fn is None
    assert not disc.training and not any(p.requires_grad for p in disc.parameters())
    assert all(torch.equal(before[k], v) for k, v in disc.state_dict().items())


@pytest.mark.parametrize("variant", list(VISIBLE))
def test_bad_responses_get_finite_scores_or_a_clear_error(trained, encoder, variant):
    disc = trained[0][variant]
    expert = make_records(1)[0]["expert"]
    truncated_before = disc.truncated
    weird = ["", "   ", "caf\udcc3\udca9 \ufffd bytes that were not UTF-8.", "The answer is 68. " * 5600]
    assert len(weird[-1]) > 100_000
    scores = disc.score(["Q"] * 4, weird, [expert] * 4)
    assert scores.shape == (4,) and torch.isfinite(scores).all() and (scores > 0).all() and (scores < 1).all()
    assert scores[-1] < disc.score(["Q"], [expert], [expert])[0]
    assert disc.truncated == truncated_before + 1  # the 100k-char response was cut, and counted
    with pytest.raises(TypeError, match=r"responses\[1\] is bytes"):
        disc.score(["Q"] * 2, [expert, b"\xff\xfe"], [expert] * 2)
    if disc.needs_expert:
        with pytest.raises(ValueError, match="needs the expert"):
            disc.score(["Q"], [expert])


@pytest.mark.parametrize("variant", list(VISIBLE))
def test_save_load_round_trip_gives_identical_scores(trained, variant):
    disc, tmp = trained[0][variant], trained[1]
    if variant == "cosine":  # nothing was trained: check that non-default m and tau survive the trip
        disc = build_discriminator("cosine", disc.encoder, margin=0.3, tau=0.05)
        disc.save(tmp / "cosine", json.loads((tmp / "cosine" / "report.json").read_text()))
    loaded = load_discriminator(tmp / variant)
    records = make_records(8, seed=5)
    responses = [r["expert"] for r in records[1:]] + ["The answer is 3. The answer is 3."]
    args = ([r["prompt"] for r in records], responses, [r["expert"] for r in records])
    assert torch.equal(disc.score(*args), loaded.score(*args))
    assert loaded.report["heldout"]["auroc"] == json.loads((tmp / variant / "report.json").read_text())[
        "heldout"]["auroc"]


def test_load_refuses_unreported_or_mismatched_discriminators(tmp_path, encoder):
    disc = build_discriminator("cosine", encoder)
    disc.save(tmp_path / "bare")
    with pytest.raises(DiscriminatorQualityError, match="has no report.json"):
        load_discriminator(tmp_path / "bare")
    config = json.loads((tmp_path / "bare" / "config.json").read_text())
    (tmp_path / "bare" / "config.json").write_text(json.dumps(config | {"encoder_id": "hash-other"}))
    with pytest.raises(ValueError, match="trained with encoder 'hash-other'"):
        load_discriminator(tmp_path / "bare", force=True)
    with pytest.raises(ValueError, match="unknown discriminator variant 'bert'"):
        build_discriminator("bert", encoder)


@pytest.mark.parametrize(
    "file, content, message",
    [
        ("report.json", "{}", r"report.json: field 'heldout': missing or not an object"),
        ("report.json", '{"heldout": {}}', r"report.json: field 'heldout.auroc': missing"),
        ("report.json", '{"heldout": {"auroc": null}}', r"'heldout.auroc': expected a number, got null"),
        ("report.json", '{"heldout": ', r"report.json: not valid JSON \(Expecting value"),
        ("report.json", "[]", r"report.json: expected a JSON object, got list"),
        ("config.json", "{", r"config.json: not valid JSON"),
        ("config.json", "drop tau", r"config.json: field 'tau': missing"),
    ],
)
def test_a_malformed_saved_discriminator_names_the_file_and_field(tmp_path, encoder, file, content, message):
    build_discriminator("cosine", encoder).save(tmp_path, {"heldout": {"auroc": 0.9}})
    if content == "drop tau":
        config = json.loads((tmp_path / file).read_text())
        content = json.dumps({k: v for k, v in config.items() if k != "tau"})
    (tmp_path / file).write_text(content)
    with pytest.raises(ValueError, match=message) as error:
        load_discriminator(tmp_path)
    assert str(tmp_path / file) in str(error.value)


def test_cjk_sentences_end_without_a_following_space():
    assert split_sentences("第一步。第二步！答案是四？好") == ["第一步。", "第二步！", "答案是四？", "好"]
    assert split_sentences("先加。 再乘。\n答案是42。") == ["先加。", "再乘。", "答案是42。"]
    assert split_sentences("Pi is 3.14. Next! e.g.x") == ["Pi is 3.14.", "Next!", "e.g.x"]
    negatives = hard_negatives("先加。再乘。答案是42。", "其他。", random.Random(0))
    assert negatives["reasoning_dropped"] == "答案是42。"
    # Rejoined without spaces, as the expert is: a space would tell every such negative apart.
    assert " " not in negatives["sentences_shuffled"] and " " not in negatives["span_repeated"]
    shuffled = split_sentences(negatives["sentences_shuffled"])
    assert sorted(shuffled) == sorted(split_sentences("先加。再乘。答案是42。"))


def test_minilm_encoder_ranks_perturbations_and_counts_truncation():
    encoder = load_encoder("minilm", device="cpu")
    assert encoder.dim == 384 and encoder.max_tokens == 256
    record = make_records(1, seed=11)[0]
    expert = record["expert"]
    negatives = hard_negatives(expert, make_records(2, seed=12)[1]["expert"], random.Random(0))
    for variant in ("cosine", "aligned"):
        disc = build_discriminator(variant, encoder)
        kinds = [k for k in VISIBLE[variant] if negatives[k] is not None]
        scores = disc.score([record["prompt"]] * (len(kinds) + 1), [expert] + [negatives[k] for k in kinds],
                            [expert] * (len(kinds) + 1))
        assert (scores[0] > scores[1:]).all(), dict(zip(["expert"] + kinds, scores.tolist(), strict=True))
    embeddings = encoder.encode(["The cat sits on the mat.", "A cat is sitting on a mat.", "Stocks fell."])
    assert torch.allclose(embeddings.norm(dim=-1), torch.ones(3), atol=1e-4)
    assert embeddings[0] @ embeddings[1] > 0.8 > 0.3 > embeddings[0] @ embeddings[2]
    before = encoder.truncated
    encoder.encode(["short", "word " * 1000, "\udcff"])
    assert encoder.truncated == before + 1


def test_train_command_is_reproducible_and_refuses_what_it_cannot_learn(tmp_path, capsys):
    """The same seed trains the same head; training prompts without negatives, one prompt and a held-out
    fraction outside (0, 1) are named errors (exit 2), not tracebacks."""
    from aapa_rl import cli
    from aapa_rl.anchor.training import heldout_prompts

    records = make_records(20)
    experts = write_jsonl(tmp_path / "experts.jsonl", records)
    base = ["discriminator", "train", "--encoder", "hash", "--steps", "30"]
    heads = []
    for run in ("a", "b"):
        assert cli.main([*base, "--experts", str(experts), "--out", str(tmp_path / run)]) == 0
        heads.append((tmp_path / run / "head.safetensors").read_bytes())
    assert heads[0] == heads[1]
    capsys.readouterr()

    # Rollouts only for the prompts the split holds out: the head would be fit on experts alone.
    held = heldout_prompts(ExpertBank.load(experts), 0.2, 0)
    rows = [{"prompt": prompt, "response": "No idea."} for prompt in sorted(held)]
    rollouts = write_jsonl(tmp_path / "rollouts.jsonl", rows)
    args = ["--experts", str(experts), "--no-generic", "--rollouts", str(rollouts)]
    assert cli.main([*base, *args, "--out", str(tmp_path / "c")]) == 2
    assert "no negatives among the 16 training prompts" in capsys.readouterr().err
    one = write_jsonl(tmp_path / "one.jsonl", records[:1])
    assert cli.main([*base, "--experts", str(one), "--out", str(tmp_path / "d")]) == 2
    assert "need at least 2 to hold some out" in capsys.readouterr().err
    assert cli.main([*base, "--experts", str(experts), "--out", str(tmp_path / "e"), "--heldout", "0"]) == 2
    assert "--heldout 0.0: the fraction of prompts held out must be in (0, 1)" in capsys.readouterr().err


def test_no_expert_crosses_the_heldout_split(tmp_path, encoder, monkeypatch):
    """The `other_expert` negative of a prompt is drawn from its own side of the split: no held-out expert
    is a training example's text, and no training expert a held-out one's."""
    from aapa_rl.anchor import training

    bank = ExpertBank.load(write_jsonl(tmp_path / "experts.jsonl", make_records(40)))
    seen = []  # the examples featurised: the training set first, then the held-out set
    compute_features = training.compute_features

    def recording(disc, examples):
        seen.append(examples)
        return compute_features(disc, examples)

    monkeypatch.setattr(training, "compute_features", recording)
    train_discriminator(build_discriminator("pairwise", encoder, hidden=16), bank, [], tmp_path / "d",
                        heldout=0.25, steps=5)
    train, held = seen
    assert any(e.kind == "other_expert" for e in train) and any(e.kind == "other_expert" for e in held)
    for ours, theirs in ((train, held), (held, train)):
        their_experts = {e.expert for e in theirs}
        assert not any(e.response in their_experts or e.expert in their_experts for e in ours)


def test_answer_corruption_is_exact_for_numbers_of_any_length():
    big = 10**400 - 1
    corrupted = hard_negatives(f"So the total is {big}.", None, random.Random(0))["answer_corrupted"]
    assert 1 <= int(corrupted.removeprefix("So the total is ").rstrip(".")) - big <= 9


def test_eval_scores_the_example_types_train_scored(tmp_path, capsys):
    """`aligned` cannot see sentence order: train leaves shuffled-sentence negatives out, and so must eval."""
    from aapa_rl import cli

    experts = write_jsonl(tmp_path / "experts.jsonl", make_records(20))
    common = ["--experts", str(experts)]
    assert cli.main(["discriminator", "train", "--variant", "aligned", "--encoder", "hash", *common,
                     "--out", str(tmp_path / "d")]) == 0
    assert cli.main(["discriminator", "eval", "--disc", str(tmp_path / "d"), *common,
                     "--out", str(tmp_path / "e")]) == 0
    for name in ("d", "e"):
        report = json.loads((tmp_path / name / "report.json").read_text())
        assert "sentences_shuffled" not in report["heldout"]["auroc_per_type"], name
        assert report["left_out"]["sentences_shuffled: invisible to the aligned variant"] > 0, name


def test_train_replaces_a_discriminator_only_with_overwrite_and_never_leaves_a_mix(tmp_path, capsys,
                                                                                   monkeypatch):
    from aapa_rl import cli
    from aapa_rl.anchor.discriminator import Discriminator

    experts = write_jsonl(tmp_path / "experts.jsonl", make_records(20))
    base = ["discriminator", "train", "--encoder", "hash", "--steps", "5", "--experts", str(experts),
            "--out", str(tmp_path / "d")]
    assert cli.main([*base, "--variant", "pairwise"]) == 0
    first = {p.name: p.read_bytes() for p in (tmp_path / "d").iterdir() if p.is_file()}
    assert cli.main([*base, "--variant", "cosine"]) == 2
    assert f"--out {tmp_path / 'd'} is not empty; pass --overwrite" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in (tmp_path / "d").iterdir() if p.is_file()} == first

    # A retrain that dies halfway through saving leaves the old discriminator whole.
    def save_config_then_die(self, directory, report=None):
        (Path(directory) / "config.json").write_text("{}")
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(Discriminator, "save", save_config_then_die)
        with pytest.raises(KeyboardInterrupt):
            cli.main([*base, "--variant", "cosine", "--overwrite"])
    assert {p.name: p.read_bytes() for p in (tmp_path / "d").iterdir() if p.is_file()} == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "experts.jsonl"]  # no temporary left

    assert cli.main([*base, "--variant", "cosine", "--overwrite"]) == 0
    assert json.loads((tmp_path / "d" / "config.json").read_text())["variant"] == "cosine"
    assert not (tmp_path / "d" / "head.safetensors").read_bytes() == first["head.safetensors"]
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "keep.txt").write_text("not a discriminator")
    assert cli.main([*base[:-1], str(tmp_path / "data"), "--overwrite"]) == 2
    assert "holds no discriminator (no config.json)" in capsys.readouterr().err
    assert (tmp_path / "data" / "keep.txt").exists()


def test_retraining_in_place_keeps_the_cache_and_survives_a_failed_rename(tmp_path, monkeypatch):
    from aapa_rl import cli

    experts = write_jsonl(tmp_path / "experts.jsonl", make_records(20))
    (tmp_path / "d").mkdir()
    monkeypatch.chdir(tmp_path / "d")
    base = ["discriminator", "train", "--encoder", "hash", "--steps", "5", "--experts", str(experts), "--out"]
    assert cli.main([*base, ".", "--variant", "pairwise"]) == 2  # replaced whole: not the current directory
    monkeypatch.chdir(tmp_path)
    assert cli.main([*base, "d/", "--variant", "pairwise"]) == 0
    assert any((tmp_path / "d" / "embedding_cache").rglob("*.safetensors"))
    (tmp_path / "d" / "embedding_cache" / "marker").touch()
    assert cli.main([*base, "d", "--variant", "cosine", "--overwrite"]) == 0
    assert (tmp_path / "d" / "embedding_cache" / "marker").exists()  # the old cache moved in, not rebuilt
    first = {p.name: p.read_bytes() for p in (tmp_path / "d").iterdir() if p.is_file()}

    real_rename = Path.rename

    def fail_into_place(self, target):
        if Path(target) == tmp_path / "d" and self.name == "new":
            raise OSError("disk gone")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", fail_into_place)
    with pytest.raises(OSError, match="disk gone"):
        cli.main([*base, str(tmp_path / "d"), "--variant", "pairwise", "--overwrite"])
    assert {p.name: p.read_bytes() for p in (tmp_path / "d").iterdir() if p.is_file()} == first


def test_allow_skips_counts_malformed_rollouts_apart_and_lists_every_skipped_row(tmp_path, capsys):
    from aapa_rl import cli

    records = make_records(20)
    experts = write_jsonl(tmp_path / "experts.jsonl", records[:10])
    rows = degenerate_rollouts(records)  # rows 11-20: prompts without an expert, the expected skips
    rows[14] = {"prompt": rows[14]["prompt"], "respons": "typo"}  # but row 15 is malformed
    rollouts = write_jsonl(tmp_path / "rollouts.jsonl", rows)
    assert cli.main(["discriminator", "train", "--encoder", "hash", "--steps", "5", "--experts", str(experts),
                     "--rollouts", str(rollouts), "--allow-skips", "--out", str(tmp_path / "d")]) == 0
    printed = capsys.readouterr()
    assert "rollouts.jsonl: 1 rows skipped, malformed (first: " in printed.err
    assert "rollouts.jsonl: row 15: field 'response': missing" in printed.err
    report = json.loads((tmp_path / "d" / "report.json").read_text())
    assert report["left_out"]["rollout rows skipped, no expert"] == 9
    assert report["left_out"]["rollout rows skipped, malformed"] == 1
    assert len(report["skipped_rows"]) == 10
    assert f"{rollouts}: row 15: field 'response': missing" in report["skipped_rows"]
    assert "left out: rollout rows skipped, malformed: 1" in printed.out


def test_eval_writes_scores_into_a_new_directory(tmp_path):
    from aapa_rl import cli

    experts = write_jsonl(tmp_path / "experts.jsonl", make_records(20))
    assert cli.main(["discriminator", "train", "--variant", "cosine", "--encoder", "hash",
                     "--experts", str(experts), "--out", str(tmp_path / "d")]) == 0
    scores = tmp_path / "new" / "sub" / "scores.jsonl"
    assert cli.main(["discriminator", "eval", "--disc", str(tmp_path / "d"), "--experts", str(experts),
                     "--scores", str(scores)]) == 0
    assert len(scores.read_text().splitlines()) > 20
