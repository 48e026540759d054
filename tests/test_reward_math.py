"""Math reward: equivalence through math-verify in killable workers, fast path, timeouts, labels."""

from __future__ import annotations

import os
import signal
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from reward_fns import math as math_reward

EQUIVALENT = [
    ("\\boxed{\\frac{1}{2}}", "0.5"),
    ("so the answer is $0.5$", "\\frac12"),
    ("\\boxed{\\dfrac{3}{4}}", "3/4"),
    ("\\boxed{1,000}", "1000"),
    ("\\boxed{\\sqrt{2}/2}", "\\frac{\\sqrt{2}}{2}"),
    ("\\boxed{(1, 2]}", "(1,2]"),
    ("\\boxed{\\{2, 1\\}}", "\\{1,2\\}"),
    ("\\boxed{x^2+2x+1}", "(x+1)^2"),
    ("The answer is 42.", "42"),
    ("#### 18", "18"),
]
WRONG = [
    ("\\boxed{83}", "82"),
    ("\\boxed{[1, 2)}", "(1,2]"),
    ("\\boxed{\\{1, 3\\}}", "\\{1,2\\}"),
    ("\\boxed{0.51}", "\\frac12"),
    ("no number at all", "7"),
    ("\\boxed{\\frac{1}{", "1/2"),  # malformed LaTeX
    ("\\boxed{\\sqrt{{{2}", "\\sqrt{2}"),
]


def rewards(pairs, **options) -> list[float]:
    responses, golds = zip(*pairs, strict=True)
    return math_reward.batch_reward(list(responses), list(golds), **options)[0].tolist()


def test_equivalent_forms_score_one():
    assert rewards(EQUIVALENT) == [1.0] * len(EQUIVALENT)


def test_wrong_and_malformed_answers_score_zero():
    assert rewards(WRONG) == [0.0] * len(WRONG)


def test_fast_path_needs_no_worker():
    responses = ["2+2 is... \\boxed{4}", "\\boxed{ 4 }", "\\boxed{5}", "\\boxed{-1,234}"]
    scores, metrics = math_reward.batch_reward(responses, ["4", "4", "4", "-1234"])
    assert scores.tolist() == [1.0, 1.0, 0.0, 1.0] and metrics["math_fast_path"].tolist() == [1.0] * 4
    assert math_reward.fast_verdict("1,2", "12") is None  # a pair, not a number: math-verify decides
    assert math_reward.last_boxed("a \\boxed{\\frac{a}{b}} then \\boxed 7$.") == "7"
    assert math_reward.last_boxed("\\fbox{x^{2}}") == "x^{2}"
    assert math_reward.extract_answer("between 3 and 4.5 units") == ("4.5", False)


def test_think_block_and_labels():
    responses = ["<think>maybe \\boxed{3}</think> It is \\boxed{4}", "<think>\\boxed{4} but unfinished"]
    scores, metrics = math_reward.batch_reward(responses, [{"answer": 4}, '{"answer": "4"}'])
    assert scores.tolist() == [1.0, 0.0] and metrics["math_no_answer"].tolist() == [0.0, 1.0]
    assert math_reward.batch_reward(responses[1:], ["4"], answer_only=False)[0].tolist() == [1.0]
    with pytest.raises(ValueError, match=r"labels\[1\]: missing field 'answer'"):
        math_reward.batch_reward(["1", "2"], ["1", {"tests": "assert True"}])
    assert math_reward.batch_reward(["\\boxed{\\{1,2\\}}"], ["{1,2}"])[0].tolist() == [1.0]  # not JSON


def test_long_answer_and_unparseable_gold():
    long = "Let me think. " + "x" * 10_000 + " Therefore \\boxed{\\frac{2}{4}}"
    assert len(long) > 10_000 and rewards([(long, "1/2")]) == [1.0]
    assert rewards([("word " * 2_000, "1/2")]) == [0.0]
    scores, metrics = math_reward.batch_reward(["\\boxed{7}"], ["$ $"])
    assert scores.tolist() == [0.0] and metrics["math_error"].tolist() == [1.0]


def test_a_number_must_be_answered_with_a_number():
    """An expression equal to a numeric gold (the question restated) would let the verifier do the sum."""
    gamed = ["\\boxed{17 \\cdot 23 - 387}", "The answer is 17*23-387", "so $2^{2}$", "\\boxed{3 = 4}"]
    gamed.append("\\boxed{3, 4}")
    scores, metrics = math_reward.batch_reward(gamed, ["4"] * len(gamed))
    assert scores.tolist() == [0.0] * 5 and metrics["math_unsimplified"].tolist() == [1.0] * 5
    honest = ["\\boxed{x = 4}", "\\boxed{4 \\text{ apples}}", "\\boxed{\\frac{8}{2}}", "4.0"]
    honest.append("\\boxed{400\\%}")
    scores, metrics = math_reward.batch_reward(honest, ["4"] * 5)
    assert scores.tolist() == [1.0] * 5 and metrics["math_unsimplified"].tolist() == [0.0] * 5
    # A gold that is itself an expression takes any equal expression.
    assert rewards([("\\boxed{\\sqrt{8}}", "2\\sqrt{2}"), ("\\boxed{1,000}", "1000")]) == [1.0, 1.0]


def test_degrees_and_text_wrapped_numbers_are_numbers():
    honest = ["\\boxed{5^\\circ}", "\\boxed{5^{\\circ}}", "\\boxed{\\text{2}}", "\\boxed{\\text{ 2 }}"]
    honest.append("\\boxed{30}")
    scores, metrics = math_reward.batch_reward(honest, ["5", "5", "2", "2", "30^\\circ"])
    assert scores.tolist() == [1.0] * 5 and metrics["math_unsimplified"].tolist() == [0.0] * 5
    gamed = ["\\boxed{2^\\circ + 3^\\circ}", "\\boxed{\\text{5, 6}}", "\\boxed{\\text{6}}"]
    scores, metrics = math_reward.batch_reward(gamed, ["5"] * 3)
    assert scores.tolist() == [0.0] * 3 and metrics["math_unsimplified"].tolist() == [1.0, 1.0, 0.0]


def test_signed_fractions_plus_signs_and_parentheses_are_numbers():
    """The plain-number test is applied to gold and answer alike: a form it accepts as an answer it also
    recognises in a gold, which then refuses expressions (`2+2` for `+4`) as any numeric gold does."""
    honest = ["\\boxed{\\frac{-1}{2}}", "\\boxed{\\frac{1}{-2}}", "\\boxed{-\\frac{1}{2}}", "\\boxed{+4}"]
    honest += ["\\boxed{(4)}", "\\boxed{\\left(\\frac{1}{2}\\right)}", "\\boxed{x = (-3)}"]
    golds = ["-\\frac{1}{2}", "-\\frac{1}{2}", "\\frac{-1}{2}", "4", "4", "\\frac{1}{2}", "-3"]
    scores, metrics = math_reward.batch_reward(honest, golds)
    assert scores.tolist() == [1.0] * 7 and metrics["math_unsimplified"].tolist() == [0.0] * 7
    gamed = ["\\boxed{2+2}", "\\boxed{\\frac{1}{2} - 1}", "\\boxed{(1)(4)}"]
    scores, metrics = math_reward.batch_reward(gamed, ["+4", "\\frac{-1}{2}", "(4)"])
    assert scores.tolist() == [0.0] * 3 and metrics["math_unsimplified"].tolist() == [1.0] * 3
    # math-verify reads `\text{4 dollars}` as one symbol, `4dollars`, not as a number and a unit (see docs).
    assert rewards([("\\boxed{\\text{4 dollars}}", "4"), ("\\boxed{4 \\text{ dollars}}", "4")]) == [0.0, 1.0]


def test_left_and_right_are_not_the_start_of_arrows():
    assert math_reward.fast_verdict("A \\leftarrow B", "A \\rightarrow B") is None
    assert math_reward.fast_verdict("x \\rightarrow 0", "x \\leftarrow 0") is None
    assert math_reward.fast_verdict("\\left( 1, 2 \\right]", "(1,2]") is True
    assert rewards([("\\boxed{A \\leftarrow B}", "A \\rightarrow B")]) == [0.0]


def test_escaped_braces_do_not_open_or_close_a_box():
    """A one-sided `\\left\\{` (piecewise functions, set-builder notation) must not hide the last box."""
    last = "\\left\\{ x \\mid x > 2 \\right."
    assert math_reward.last_boxed(f"first \\boxed{{7}} then \\boxed{{{last}}}") == last
    assert math_reward.last_boxed("\\boxed{\\{1, 2\\}}") == "\\{1, 2\\}"
    assert math_reward.last_boxed("\\boxed{a \\\\{b}}") == "a \\\\{b}"  # `\\` is a line break, `{b}` a group
    assert rewards([(f"first \\boxed{{7}} then \\boxed{{{last}}}", "7")]) == [0.0]


def test_without_a_box_only_the_last_number_counts():
    """math-verify re-reading the text would accept an earlier "final answer is 4": a second guess."""
    hedged = ["The final answer is 4. Hmm, or maybe 5", "The final answer is 5. Hmm, or maybe 4"]
    scores, metrics = math_reward.batch_reward(hedged, ["4", "4"])
    assert scores.tolist() == [0.0, 1.0] and metrics["math_unsimplified"].tolist() == [0.0, 0.0]


def test_integers_past_python_int_limit():
    """int() refuses more than 4,300 digits; one such answer must not cost the batch its rewards."""
    big = "1" + "0" * 5000
    boxed = f"\\boxed{{{big}}}"
    responses = ["\\boxed{42}", boxed, f"so the answer is {big}", boxed, boxed]
    scores, metrics = math_reward.batch_reward(responses, ["42", "7", "7", big, big[:-1] + "1"])
    assert scores.tolist() == [1.0, 0.0, 0.0, 1.0, 0.0] and metrics["math_error"].tolist() == [0.0] * 5
    assert metrics["math_fast_path"].tolist() == [1.0, 1.0, 0.0, 1.0, 1.0]  # unboxed: math-verify reads it
    out = math_reward.reward_func(responses[:2], ["", ""], ["42", "7"])
    assert out["rewards"].tolist() == [1.0, 0.0] and out["extra_logs"]["math_error"].tolist() == [0.0, 0.0]
    same = [("-0", "0"), ("0,001,000", "1000"), ("-1,000", "-1000")]
    assert all(math_reward.fast_verdict(a, b) for a, b in same)
    assert not any(math_reward.fast_verdict(a, b) for a, b in [("-5", "5"), ("10", "100"), ("5", "-5")])


def test_last_boxed_on_many_unclosed_boxes():
    """Each unclosed box used to be scanned to the end of the text: quadratic (8,000 boxes took 23 s).
    Counted in executed lines rather than seconds, so the test does not depend on the machine's load."""
    n = 300
    assert math_reward.last_boxed("\\boxed{" * n) is None
    assert math_reward.last_boxed("\\boxed{1} " + "\\boxed{" * n) == "1"
    assert math_reward.last_boxed("\\boxed{" * n + "7}") == "7"
    assert math_reward.last_boxed("\\boxed{" * n + "}" * n) == ""
    assert math_reward.last_boxed("\\boxed \\boxed{ \\boxed $. \\boxed{a}{") == "a"
    lines = 0

    def count_lines(frame, event, arg):
        nonlocal lines
        lines += event == "line"
        return count_lines

    previous = sys.gettrace()
    sys.settrace(count_lines)
    try:
        math_reward.last_boxed("\\boxed{" * n)
    finally:
        sys.settrace(previous)
    assert lines < 20 * n  # about 10 per box now; about 2,000 per box when each scanned to the end


def test_pathological_input_times_out_and_worker_is_replaced():
    timeout = 1.5
    scores, metrics = math_reward.batch_reward(
        ["\\boxed{9^{9^{9^{9}}}}", "\\boxed{0.5}"], ["\\sqrt{82}", "1/2"], timeout=timeout, workers=1
    )  # the check after the hung one is re-sent to a fresh worker
    assert scores.tolist() == [0.0, 1.0] and metrics["math_timeout"].tolist() == [1.0, 0.0]
    # The CPU limit fired, not the wall-clock safety net: waiting for a core never costs a check.
    scores, metrics = math_reward.batch_reward(["\\boxed{(x+1)^{100000}}"], ["\\sqrt{82}"], timeout=timeout)
    assert scores.tolist() == [0.0] and metrics["math_timeout"].tolist() == [1.0]
    assert metrics["math_wall_timeout"].tolist() == [0.0]


def test_a_check_off_the_cpu_is_not_cut_short(monkeypatch):
    """A worker stopped (SIGSTOP) for longer than the limit spends no CPU: its check still counts."""
    rewards([("\\boxed{0.5}", "1/2")])  # a warm worker
    real_send = math_reward._Worker.send

    def send_then_pause(self, tasks):
        real_send(self, tasks)
        os.kill(self.proc.pid, signal.SIGSTOP)
        threading.Timer(2.0, os.kill, (self.proc.pid, signal.SIGCONT)).start()

    monkeypatch.setattr(math_reward._Worker, "send", send_then_pause)
    scores, metrics = math_reward.batch_reward(
        ["\\boxed{\\frac{2}{4}}"], ["0.5"], timeout=1.0, wall_timeout=60
    )
    assert scores.tolist() == [1.0] and metrics["math_timeout"].tolist() == [0.0]


def test_worker_killed_mid_batch_costs_its_check_and_the_pool_recovers(monkeypatch):
    rewards([("\\boxed{0.5}", "1/2")])
    real_send = math_reward._Worker.send
    killed = []

    def send_then_die(self, tasks):  # the worker dies (OOM killer, an operator) as the batch arrives
        if not killed:  # stopped first, so that it answers nothing however late the kill comes
            killed.append(self.proc.pid)
            os.kill(self.proc.pid, signal.SIGSTOP)
        real_send(self, tasks)
        if killed == [self.proc.pid]:
            os.kill(self.proc.pid, signal.SIGKILL)

    monkeypatch.setattr(math_reward._Worker, "send", send_then_die)
    scores, metrics = math_reward.batch_reward(
        ["\\boxed{\\frac{1}{2}}", "\\boxed{2.0}", "\\boxed{0.51}"], ["0.5", "2", "1/2"], workers=1
    )
    assert killed and scores.tolist() == [0.0, 1.0, 0.0]  # the rest is re-sent to a fresh worker
    assert metrics["math_error"].tolist() == [1.0, 0.0, 0.0]
    monkeypatch.undo()
    assert rewards(EQUIVALENT[:3]) == [1.0] * 3


def test_reward_func_contract():
    prompt = "<|im_start|>user\nQ: 37+45=?<|im_end|>\n<|im_start|>assistant\n"
    out = math_reward.reward_func([prompt + "7+5=12. \\boxed{82}<|im_end|>"], [prompt], ["82"])
    assert out["rewards"].tolist() == [1.0] and out["scores"].tolist() == [1.0]
    assert set(out["extra_logs"]) == set(math_reward.METRICS)
    broken = math_reward.reward_func(["q"], ["q"], [None])
    assert broken["rewards"].tolist() == [0.0] and broken["extra_logs"]["math_error"].tolist() == [1.0]
    assert set(broken["extra_logs"]) == set(math_reward.METRICS)


def test_eight_threads_match_serial():
    cases = EQUIVALENT[:5] + WRONG[:3]
    serial = [math_reward.reward_func([r], [""], [g])["rewards"].item() for r, g in cases]
    with ThreadPoolExecutor(8) as pool:
        threaded = list(
            pool.map(lambda c: math_reward.reward_func([c[0]], [""], [c[1]])["rewards"].item(), cases * 2)
        )
    assert threaded == serial * 2 == [1.0] * 5 + [0.0] * 3 + [1.0] * 5 + [0.0] * 3
