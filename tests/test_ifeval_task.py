"""The instruction-following task: labels the IFEval checker accepts, every template gradeable both ways, a
deterministic split by base request, and the rows through build-experts and prepare-data."""

from __future__ import annotations

import json
import random

import pytest

from aapa_rl.cli import main
from aapa_rl.data.rows import prompt_id
from aapa_rl.local.ifeval_task import (
    CONSTRAINT_IDS,
    END_PHRASES,
    FORBIDDEN_WORDS,
    INCOMPATIBLE,
    REQUESTS,
    IFEvalTask,
    render,
)
from reward_fns.ifeval import CHECKS, batch_reward, parse_ifeval_label

SPLITS = IFEvalTask().make_splits()


def _request(prompt: str) -> str:
    return next(request for request, _ in REQUESTS if prompt.startswith(request + " "))


def _responses(instruction_id: str, kwargs: dict) -> tuple[str, str]:
    """(a response that follows the instruction, one that breaks it), written for its kwargs."""
    if instruction_id == "punctuation:no_comma":
        return "I like it a lot.", "Yes, I like it."
    if instruction_id == "change_case:english_lowercase":
        text = "our cat is lost and we miss her. please call us if you see her in your garden."
        return text, text.capitalize()
    if instruction_id == "change_case:english_capital":
        text = "our cat is lost and we miss her. please call us if you see her in your garden."
        return text.upper(), text
    if instruction_id == "length_constraints:number_words":
        return "A short answer.", " ".join(["word"] * kwargs["num_words"])
    if instruction_id == "length_constraints:number_sentences":
        return "Only one sentence here.", "One sentence. " * kwargs["num_sentences"]
    if instruction_id == "keywords:existence":
        return f"It is about the {kwargs['keywords'][0]} today.", "Nothing relevant here."
    if instruction_id == "keywords:forbidden_words":
        return "A plain answer.", f"It is {kwargs['forbidden_words'][1]} nice."
    if instruction_id == "startend:end_checker":
        return f"Some text. {kwargs['end_phrase']}", f"{kwargs['end_phrase']} Some text after it."
    if instruction_id == "startend:quotation":
        return '"A quoted answer."', "A quoted answer."
    if instruction_id == "detectable_format:title":
        return "<<a day out>>\nWe went out.", "A day out\nWe went out."
    if instruction_id == "detectable_content:postscript":
        return f"We went out.\n{kwargs['postscript_marker']} Bring a coat.", "We went out. Bring a coat."
    if instruction_id == "detectable_format:number_bullet_lists":
        bullets = [f"* point {i}" for i in range(kwargs["num_bullets"] + 1)]
        return "\n".join(bullets[:-1]), "\n".join(bullets)
    if instruction_id == "detectable_format:number_highlighted_sections":
        return " and ".join(f"*part {i}*" for i in range(kwargs["num_highlights"])), "No highlights here."
    raise AssertionError(f"no responses written for {instruction_id}")


def test_every_label_parses_and_uses_the_checkers_ids():
    used = set()
    for row in SPLITS["train"] + SPLITS["eval"]:
        assert row["label"] == {"instruction_id_list": row["instruction_id_list"], "kwargs": row["kwargs"]}
        parsed = parse_ifeval_label(row["label"], 0)
        assert [instruction for instruction, _, _ in parsed] == row["label"]["instruction_id_list"]
        used.update(row["label"]["instruction_id_list"])
    assert used == set(CONSTRAINT_IDS) and used <= set(CHECKS)
    assert all(set(pair) <= set(CONSTRAINT_IDS) for pair in INCOMPATIBLE)


@pytest.mark.parametrize("instruction_id", CONSTRAINT_IDS)
def test_every_template_grades_a_compliant_and_a_violating_response(instruction_id):
    for seed in range(12):  # enough draws to meet every kwargs option
        text, kwargs = render(instruction_id, random.Random(seed), ("cat", "garden"))
        assert text.endswith(".") and text[0].isupper()
        label = {"instruction_id_list": [instruction_id], "kwargs": [kwargs]}
        good, bad = _responses(instruction_id, kwargs)
        rewards, _ = batch_reward([good, bad], [label, label])
        assert rewards.tolist() == [1.0, 0.0], (kwargs, good, bad)


def test_the_same_seed_gives_the_same_rows_and_another_seed_others():
    assert IFEvalTask().make_splits() == SPLITS
    assert IFEvalTask(seed=1).make_splits()["train"] != SPLITS["train"]


def test_sizes_and_the_split_by_base_request():
    assert (len(SPLITS["train"]), len(SPLITS["eval"])) == (256, 64)
    train_requests = {_request(r["prompt"]) for r in SPLITS["train"]}
    eval_requests = {_request(r["prompt"]) for r in SPLITS["eval"]}
    assert (len(train_requests), len(eval_requests)) == (32, 8) and not train_requests & eval_requests
    for rows in SPLITS.values():
        assert len({r["prompt"] for r in rows}) == len(rows)  # prepare-data rejects duplicate prompts
        counts = [len(r["label"]["instruction_id_list"]) for r in rows]
        assert counts.count(1) == counts.count(2) == len(rows) // 2

    small = IFEvalTask(seed=3, eval_requests=10, per_request=5).make_splits()
    assert (len(small["train"]), len(small["eval"])) == (150, 50)


def test_no_prompt_combines_contradicting_constraints():
    for row in SPLITS["train"] + SPLITS["eval"]:
        ids = row["label"]["instruction_id_list"]
        assert len(set(ids)) == len(ids) and frozenset(ids) not in INCOMPATIBLE
    keywords = {word for _, words in REQUESTS for word in words}
    end_words = {word.strip(".").lower() for phrase in END_PHRASES for word in phrase.split()}
    assert not set(FORBIDDEN_WORDS) & (keywords | end_words)


def test_bad_sizes_and_unknown_ids_are_named():
    with pytest.raises(ValueError, match="eval_requests must be in"):
        IFEvalTask(eval_requests=len(REQUESTS))
    with pytest.raises(ValueError, match="per_request must be in"):
        IFEvalTask(per_request=0)
    with pytest.raises(ValueError, match="no template for instruction id 'language:response_language'"):
        render("language:response_language", random.Random(0), ("cat",))


def test_rows_go_through_build_experts_and_prepare_data(tmp_path):
    paths = IFEvalTask().write(tmp_path / "task")
    train = [json.loads(line) for line in paths["train"].read_text().splitlines()]
    assert train == SPLITS["train"]
    wanted = ("punctuation:no_comma", "startend:quotation", "length_constraints:number_words")
    rows = [next(r for r in train if r["instruction_id_list"] == [i]) for i in wanted]
    answers = [_responses(r["instruction_id_list"][0], r["kwargs"][0]) for r in rows]
    # Teacher samples: row 0 passes on its second sample, row 1 on its first, row 2 never.
    samples = {0: [answers[0][1], answers[0][0]], 1: [answers[1][0], answers[1][1]], 2: [answers[2][1]]}
    prompts, teacher = tmp_path / "prompts.jsonl", tmp_path / "teacher.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    teacher.write_text(
        "".join(
            json.dumps(
                {"id": prompt_id(rows[i]["prompt"]), "prompt": rows[i]["prompt"], "response": response}
            )
            + "\n"
            for i, responses in samples.items()
            for response in responses
        )
    )
    label_keys = ["--instruction-ids-key", "instruction_id_list", "--kwargs-key", "kwargs"]
    bank = tmp_path / "experts.jsonl"
    args = ["build-experts", "--samples", str(teacher), "--prompts", str(prompts), "--output", str(bank)]
    assert main([*args, "--reward", "ifeval", *label_keys]) == 0
    kept = [json.loads(line) for line in bank.read_text().splitlines()]
    assert [(b["prompt"], b["expert"], b["label"]) for b in kept] == [
        (rows[i]["prompt"], answers[i][0], rows[i]["label"]) for i in (0, 1)
    ]

    out = tmp_path / "prepared"
    args = ["prepare-data", "--prompts", str(prompts), "--experts", str(bank), "--out-dir", str(out)]
    assert main([*args, "--eval-size", "0", "--missing-expert", "drop", *label_keys]) == 0
    prepared = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    assert [r["label"] for r in prepared] == [
        {**rows[i]["label"], "prompt": rows[i]["prompt"], "expert": answers[i][0]} for i in (0, 1)
    ]
    rewards, _ = batch_reward([answers[0][0], answers[1][0]], [r["label"] for r in prepared])
    assert rewards.tolist() == [1.0, 1.0]
