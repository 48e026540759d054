"""IFEval reward: every instruction id with a hand-made passing and failing response, strict vs loose."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import pytest

from reward_fns import ifeval

ENGLISH = "The quick brown fox jumps over the lazy dog while the farmer watches from the porch."
FRENCH = "Le renard brun rapide saute par-dessus le chien paresseux pendant que le fermier regarde."

# id: (kwargs, passing response, failing response)
CASES = {
    "keywords:existence": ({"keywords": ["fox", "porch"]}, ENGLISH, "A fox, but no house part."),
    "keywords:frequency": (
        {"keyword": "cat", "frequency": 3, "relation": "at least"},
        "Cat one, cat two and CAT three.",
        "Cat one and cat two.",
    ),
    "keywords:forbidden_words": ({"forbidden_words": ["fox"]}, "A foxglove grows here.", "The Fox ran."),
    "keywords:letter_frequency": (
        {"letter": "z", "let_frequency": 2, "let_relation": "less than"},
        "Lazy days.",
        "Zany zebras.",
    ),
    "language:response_language": ({"language": "fr"}, FRENCH, ENGLISH),
    "length_constraints:number_sentences": (
        {"num_sentences": 3, "relation": "less than"},
        "One sentence here. Mr. Smith wrote a second one!",
        "First. Second. Third one?",
    ),
    "length_constraints:number_paragraphs": (
        {"num_paragraphs": 2},
        "First paragraph.\n***\nSecond paragraph.",
        "First.\n***\n***\nSecond.",
    ),
    "length_constraints:number_words": (
        {"num_words": 5, "relation": "at least"},
        "one two three four five",
        "one two three four",
    ),
    "length_constraints:nth_paragraph_first_word": (
        {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "However"},
        'It rains.\n\n"However, the sun returns.',
        "It rains.\n\nThe sun returns.",
    ),
    "detectable_content:number_placeholders": (
        {"num_placeholders": 2},
        "Dear [name], see you at [place].",
        "Dear [name], see you there.",
    ),
    "detectable_content:postscript": (
        {"postscript_marker": "P.S."},
        "Thanks for reading.\np.s. bring snacks.",
        "Thanks for reading. PS bring snacks.",
    ),
    "detectable_format:number_bullet_lists": (
        {"num_bullets": 2},
        "Items:\n* apples\n- pears",
        "Items:\n* apples\n* pears\n* plums",
    ),
    "detectable_format:constrained_response": (
        {},
        "I thought about it. My answer is maybe.",
        "My answer is perhaps.",
    ),
    "detectable_format:number_highlighted_sections": (
        {"num_highlights": 2},
        "Some *first* and **second** highlights.",
        "Only *one* highlight and an empty ** pair.",
    ),
    "detectable_format:multiple_sections": (
        {"section_spliter": "Section", "num_sections": 2},
        "Section 1\nIntro.\nSection 2\nBody.",
        "Section 1\nEverything in one.",
    ),
    "detectable_format:json_format": ({}, '```json\n{"a": [1, 2]}\n```', "{'a': 1}"),
    "detectable_format:title": ({}, "<<A Poem of Joy>>\nRoses are red.", "<< >>\nRoses are red."),
    "combination:two_responses": ({}, "Answer one.\n******\nAnswer two.", "Same.\n******\nSame."),
    "combination:repeat_prompt": (
        {"prompt_to_repeat": "Write a haiku about rain."},
        "write a haiku about rain. Drops fall on the roof.",
        "Here is a haiku about rain.",
    ),
    "startend:end_checker": (
        {"end_phrase": "Any other questions?"},
        '"Rain is wet. Any other questions?"',
        "Any other questions? Rain is wet.",
    ),
    "change_case:capital_word_frequency": (
        {"capital_frequency": 3, "capital_relation": "at least"},
        "I DON'T like RAIN.",  # I, DO, N'T, RAIN
        "I like Rain and NOT snow.",
    ),
    "change_case:english_capital": ({}, ENGLISH.upper(), ENGLISH),
    "change_case:english_lowercase": ({}, ENGLISH.lower(), FRENCH.lower()),
    "punctuation:no_comma": ({}, "No commas here.", "One, two."),
    "startend:quotation": ({}, '  "All wrapped up."  ', '"Not closed.'),
}


NO_COMMA, LETTER = "punctuation:no_comma", "keywords:letter_frequency"
WORDS, NTH = "length_constraints:number_words", "length_constraints:nth_paragraph_first_word"


def label(instruction: str, kwargs: dict) -> dict:
    return {"instruction_id_list": [instruction], "kwargs": [kwargs]}


def test_all_25_ids_are_covered():
    assert len(ifeval.CHECKS) == 25 and set(CASES) == set(ifeval.CHECKS)


@pytest.mark.parametrize("instruction", sorted(CASES))
def test_instruction_passes_and_fails(instruction):
    kwargs, passing, failing = CASES[instruction]
    rewards, metrics = ifeval.batch_reward([passing, failing], [label(instruction, kwargs)] * 2)
    assert rewards.tolist() == [1.0, 0.0]
    assert metrics["ifeval_strict_prompt"].tolist() == [1.0, 0.0]


def test_loose_forgives_a_first_line_and_asterisks():
    fenced_json = 'Sure here it is:\n{"a": 1}'
    both = {
        "instruction_id_list": ["detectable_format:json_format", "punctuation:no_comma"],
        "kwargs": [{}, {}],
    }
    rewards, metrics = ifeval.batch_reward([fenced_json], [both])
    assert rewards.item() == 0.5 and metrics["ifeval_strict_prompt"].item() == 0.0
    assert metrics["ifeval_loose_instruction"].item() == 1.0 and metrics["ifeval_loose_prompt"].item() == 1.0
    assert ifeval.batch_reward([fenced_json], [both], mode="loose")[0].item() == 1.0
    assert ifeval.batch_reward([fenced_json], [both], all_instructions=True)[0].item() == 0.0
    starred = '**"Bold quote"**'  # loose removes the asterisks
    strict, loose = ifeval.follows(starred, ifeval.parse_ifeval_label(label("startend:quotation", {}), 0))
    assert strict == [False] and loose == [True]


def test_empty_response_follows_nothing():
    assert ifeval.batch_reward(["  "], [label("punctuation:no_comma", {})])[0].item() == 0.0


def test_text_helpers():
    assert ifeval.count_words("It's 3 o'clock, isn't it?") == 8
    text = "Dr. Who met J. Smith in the U.S. today. Tools, etc. are here... and there. Done! Really? Yes"
    assert ifeval.count_sentences(text) == 5
    assert ifeval.count_sentences("Lists help, etc. They do.") == 2
    assert ifeval.count_sentences("") == 0 and ifeval.count_sentences("* no\n* stops") == 1
    assert ifeval.count_capital_words("WE CAN'T (STOP) U.S.A. well-Known OK-DONE a1 A1") == 7
    assert ifeval.detect_language("¿?!") is None


def test_sentences_and_postscript_on_long_runs():
    """Runs of dots, "! ! !" and spaces used to cost quadratic time (30,000 dots: 23 s); the results stay
    those of the original scan (its regex is kept here as the reference). Timings: bench/rewards.py."""
    reference = re.compile(r"(?<!\S)(\S*?)([.?!]+)[\"'”’)\]]*(?=\s|$)")
    texts = ['Wait... what?! (Yes.) "Done." a.b.c. x!? ...', "Etc.. ok!!) e.g. ...Next ... hm)."]
    for text in texts:
        spans = [(m.span(), m.groups()) for m in reference.finditer(text)]
        assert [(m.span(), m.groups()) for m in ifeval._SENTENCE_END.finditer(text)] == spans
    assert ifeval.count_sentences("." * 2000 + "x") == 1 and ifeval.count_sentences("! " * 2000) == 0
    story = "Sure, here it is\nThe story goes on" + "." * 2000 + "and on\n*The end*"
    assert ifeval.count_sentences(story) == 1 and ifeval.count_sentences("A. " + "! " * 2000 + "B") == 2
    spaces = "a" + " " * 5000
    assert not ifeval._postscript(spaces + "b", "P.S.") and ifeval._postscript(spaces + "P.S. b", "P.S.")
    assert ifeval._postscript(spaces + "p. p. s", "P.P.S") and ifeval._postscript(spaces + "NB: x", "NB:")


def test_labels_json_string_plain_list_and_none_kwargs():
    as_json = json.dumps({"instruction_id_list": ["punctuation:no_comma"], "kwargs": [{"num_words": None}]})
    assert ifeval.batch_reward(["ok", "a, b"], [as_json, ["punctuation:no_comma"]])[0].tolist() == [1.0, 0.0]


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"kwargs": [{}]}, r"labels\[0\]: missing field 'instruction_id_list'"),
        ("just text", r"labels\[0\]: missing field 'instruction_id_list'"),
        (label("keywords:nope", {}), "unknown instruction id"),
        (label("length_constraints:number_words", {"num_words": 5}), r"missing field 'kwargs.relation'"),
        (label("length_constraints:number_words", {"num_words": 5, "relation": "more"}), "must be one of"),
        (label("length_constraints:number_words", {"num_words": "5", "relation": "at least"}), "integer"),
        (label("keywords:existence", {"keywords": "fox"}), "list of strings"),
        (label("punctuation:no_comma", {"keywords": ["x"]}), "unexpected kwargs"),
        ({"instruction_id_list": ["punctuation:no_comma"], "kwargs": []}, "equal length"),
        # Ill-typed: a ValueError naming the label, the instruction and the kwargs entry, not a TypeError.
        ({"instruction_id_list": [NO_COMMA], "kwargs": ["oops"]}, r"instruction 0 .* kwargs\[0\] must be a"),
        ({"instruction_id_list": [NO_COMMA], "kwargs": [[1]]}, r"kwargs\[0\] must be a dict"),
        ({"instruction_id_list": [[NO_COMMA]], "kwargs": [{}]}, "unknown instruction id"),
        ({"instruction_id_list": 5}, "'instruction_id_list' must be a list"),
        # No instruction, or arguments no response could fail (or pass): IFEval's data has none of these.
        ([], "'instruction_id_list' is empty"),
        ({"instruction_id_list": [], "kwargs": []}, "'instruction_id_list' is empty"),
        (label(LETTER, {"letter": "ab", "let_frequency": 2, "let_relation": "less than"}), "one character"),
        (label("keywords:existence", {"keywords": []}), "non-empty list of strings"),
        (label("keywords:existence", {"keywords": [""]}), "non-empty list of strings"),
        (label("keywords:forbidden_words", {"forbidden_words": []}), "non-empty list of strings"),
        (label("keywords:frequency", {"keyword": " ", "frequency": 1, "relation": "at least"}), "is empty"),
        (label(WORDS, {"num_words": -5, "relation": "at least"}), "integer >= 0"),
        (label(WORDS, {"num_words": float("inf"), "relation": "at least"}), "integer >= 0"),
        (label(NTH, {"num_paragraphs": 2, "nth_paragraph": 0, "first_word": "x"}), "from 1 to kwargs.num_"),
        (label(NTH, {"num_paragraphs": 2, "nth_paragraph": 3, "first_word": "x"}), "from 1 to kwargs.num_"),
    ],
)
def test_label_errors(bad, message):
    with pytest.raises(ValueError, match=message):
        ifeval.batch_reward(["text"], [bad])


def test_bad_labels_are_named_by_the_data_layer():
    from aapa_rl.data.experts import label_problems, load_reward

    good = label(NO_COMMA, {})
    bad = {"instruction_id_list": [NO_COMMA], "kwargs": ["oops"]}
    assert label_problems(load_reward("ifeval"), [good, bad, []]) == {
        1: "instruction 0 ('punctuation:no_comma'): kwargs[0] must be a dict, got 'oops'",
        2: "field 'instruction_id_list' is empty",
    }


def test_arguments_at_the_edges_of_ifevals_data_are_accepted():
    # IFEval's data counts a non-letter ("#"), asks for the last paragraph, and IFEval keeps a count of 0.
    edges = [
        label(LETTER, {"letter": "#", "let_frequency": 2, "let_relation": "at least"}),
        label(NTH, {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "then"}),
        label("detectable_format:number_bullet_lists", {"num_bullets": 0}),
    ]
    assert ifeval.batch_reward(["#1 #2", "First.\n\nThen.", "No bullets."], edges)[0].tolist() == [1.0] * 3


def test_reward_func_and_threads():
    prompt = "Write two words without commas.\n"
    queries = [
        prompt + response for response in ("hello world", "hello, world", "<think>a, b</think>fine words")
    ]
    one = label("punctuation:no_comma", {})
    serial = [ifeval.reward_func([q], [prompt], [one])["rewards"].item() for q in queries]
    assert serial == [1.0, 0.0, 1.0]
    cases = [(CASES[i][1], label(i, CASES[i][0])) for i in sorted(CASES)] * 2
    expected = [ifeval.batch_reward([r], [lab])[0].item() for r, lab in cases]
    with ThreadPoolExecutor(8) as pool:
        threaded = list(pool.map(lambda case: ifeval.batch_reward([case[0]], [case[1]])[0].item(), cases))
    assert threaded == expected == [1.0] * len(cases)
    broken = ifeval.reward_func(["x"], ["x"], [{"nothing": 1}])
    assert broken["extra_logs"]["ifeval_error"].item() == 1.0 and set(broken["extra_logs"]) == set(
        ifeval.METRICS
    )
