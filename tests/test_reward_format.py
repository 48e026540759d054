"""Format reward, overlong penalty, the combinator, and the shared response/label handling."""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from reward_fns import combine
from reward_fns import format as format_reward
from reward_fns._common import final_answer, label_field, parse_label, response_from_query, strip_end_markers


def test_templates_and_regex():
    responses = [
        "<think>plan</think>\nThe answer is \\boxed{4}.",
        "The answer is \\boxed{4}.",
        "<think>plan</think>  ",
    ]
    assert format_reward.batch_reward(responses)[0].tolist() == [1.0, 0.0, 0.0]
    assert format_reward.batch_reward(responses, pattern="boxed")[0].tolist() == [1.0, 1.0, 0.0]
    assert format_reward.batch_reward(responses, pattern="think_boxed")[0].tolist() == [1.0, 0.0, 0.0]
    assert format_reward.batch_reward(["Answer: 12", "answer 12"], pattern=r"Answer: \d+")[0].tolist() == [
        1.0,
        0.0,
    ]
    # The end-of-turn marker a decoded query keeps does not break a full match.
    assert format_reward.batch_reward(["<think>a</think>b<|im_end|>"])[0].tolist() == [1.0]


def test_boxed_templates_without_backtracking():
    """The boxed templates are checked by linear code with the verdict of their regex, which is about cubic
    on many `</think>\\boxed{` (1,600 of them: 9 s). Timings: bench/rewards.py."""
    think, box = "<think></think>", "\\boxed"
    texts = [f"<think>a</think>{box}{{4}}", f" {think}{box}{{}}}}", f"{think}{box}{{}}", f"{box}{{4}}"]
    texts += [f"<think>{box}{{4}}</think>", f"{think}{box}{{{{", f"x{think}{box}{{4}}", f"{box}{{{{", think]
    texts += [f"</think>{think}{box}{{1}}", f"{think}\n{box}\n{{4}}{box}{{5}}"]
    for pattern in ("boxed", "think_boxed"):
        regex = re.compile(format_reward.TEMPLATES[pattern], re.DOTALL)
        expected = [float(regex.fullmatch(text) is not None) for text in texts]
        assert format_reward.batch_reward(texts, pattern=pattern)[0].tolist() == expected
    flood = "<think>" + "</think>\\boxed{" * 200
    floods = [flood, flood + "x}", "\\boxed{" * 2000]
    assert format_reward.batch_reward(floods, pattern="think_boxed")[0].tolist() == [0.0, 1.0, 0.0]
    assert format_reward.batch_reward(floods, pattern="boxed")[0].tolist() == [0.0, 1.0, 0.0]


def test_overlong_penalty():
    penalty = format_reward.overlong_penalty([10, 80, 90, 95, 100, 150], max_length=100, buffer=20)
    assert penalty.tolist() == pytest.approx([0.0, 0.0, -0.5, -0.75, -1.0, -1.0])
    assert format_reward.overlong_penalty([100, 101], 100, 0).tolist() == [0.0, -1.0]
    with pytest.raises(ValueError, match="buffer"):
        format_reward.overlong_penalty([1], 10, 11)
    text = "<think>x</think>" + "y" * 64  # 80 characters: (100 - 40 - 80) / 40 = -0.5
    rewards, metrics = format_reward.batch_reward([text], max_length=100, overlong_buffer=40)
    assert rewards.item() == pytest.approx(1.0 - 0.5) and metrics["format_overlong_penalty"].item() == -0.5


def test_combine_weighted_sum_and_metrics():
    reward = combine.build_reward({"ifeval": 0.5, "format": {"weight": 0.25, "pattern": "boxed"}})
    labels = [{"instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}], "answer": "4"}] * 2
    total, metrics = reward(["It is \\boxed{4}", "It is, 4"], labels)
    assert total.tolist() == [0.75, 0.0]
    assert metrics["ifeval_reward"].tolist() == [1.0, 0.0] and metrics["format_reward"].tolist() == [1.0, 0.0]
    assert set(metrics) == set(reward.metrics)
    same = combine.build_reward(
        [{"name": "ifeval", "weight": 0.5}, {"name": "format", "weight": 0.25, "pattern": "boxed"}]
    )
    assert torch.equal(same(["It is \\boxed{4}"], labels[:1])[0], total[:1])


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"maths": 1.0}, "unknown reward 'maths'"),
        ([{"weight": 1.0}], "missing field 'name'"),
        ({"format": {"weight": "high"}}, "'weight' must be a finite number"),
        ({"format": {"weight": float("nan")}}, "'weight' must be a finite number, got nan"),
        ({"format": {"weight": 1.0, "patern": "x"}}, r"unknown options \['patern'\]"),
        ([{"name": "format"}, {"name": "format"}], "appears twice"),
        ([], "non-empty"),
    ],
)
def test_combine_config_errors(config, message):
    with pytest.raises(ValueError, match=message):
        combine.build_reward(config)


def test_combined_reward_func_never_raises():
    reward_func = combine.reward_func_from_config({"math": 1.0, "format": 0.5})
    prompt = "Q: 2+2=?\nA: "
    ok = reward_func([prompt + "<think>add</think> \\boxed{4}"], [prompt], [{"answer": "4"}])
    assert ok["rewards"].tolist() == [1.5] and ok["extra_logs"]["reward_error"].tolist() == [0.0]
    broken = reward_func([prompt + "4"], [prompt], [{"tests": "assert True"}])  # no 'answer' for math
    assert broken["rewards"].tolist() == [0.0] and broken["extra_logs"]["reward_error"].tolist() == [1.0]
    assert set(ok["extra_logs"]) == set(broken["extra_logs"])


def test_response_and_label_helpers():
    assert response_from_query("PROMPT and answer", "PROMPT") == " and answer"
    assert response_from_query("re-tokenised prompt + answer", "PROMPT") == "re-tokenised prompt + answer"
    assert strip_end_markers("answer <|im_end|>\n<|endoftext|>") == "answer"
    assert (
        strip_end_markers("x</s>") == "x" and strip_end_markers("a <|not a marker|>") == "a <|not a marker|>"
    )
    assert final_answer("<think>a</think>\n b ") == "b" and final_answer("<think>a") == ""
    assert final_answer("<think>a</think> b", answer_only=False) == "<think>a</think> b"
    assert parse_label('{"answer": 3}') == {"answer": 3} and parse_label("{1, 2}") == "{1, 2}"
    assert label_field(7, "answer", 0) == 7
    with pytest.raises(ValueError, match=r"labels\[2\]: missing field 'answer'"):
        label_field("", "answer", 2)
    with pytest.raises(ValueError, match=r"labels\[0\]: missing field 'instruction_id_list'"):
        label_field("x", "instruction_id_list", 0, plain_ok=False)


def test_format_threads_match_serial():
    responses = ["<think>a</think>b", "b", "<think>a</think>", "<think>x</think>\\boxed{1}"] * 4
    serial = [format_reward.reward_func([r], [""], [""])["rewards"].item() for r in responses]
    with ThreadPoolExecutor(8) as pool:
        threaded = list(
            pool.map(lambda r: format_reward.reward_func([r], [""], [""])["rewards"].item(), responses)
        )
    assert threaded == serial == [1.0, 0.0, 0.0, 1.0] * 4
