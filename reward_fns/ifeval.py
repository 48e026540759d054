"""Instruction-following reward with the 25 IFEval instruction ids, strict and loose, fully offline.

Label (IFEval's schema): {"instruction_id_list": [...], "kwargs": [{...}, ...]} (kwargs[i] belongs to
instruction i; None values are ignored) or a plain list of ids that take no arguments. Strict checks
the response as is; loose passes an instruction when any of IFEval's 8 variants of the response
(first/last line removed, `*` removed) passes. Reward: the fraction of instructions followed
(`mode` "strict" or "loose"), or 1/0 for all of them with `all_instructions=True`.

Differences from the reference checker (lm-eval / google-research), which needs NLTK data at import:
sentences are counted by a rule-based splitter that approximates NLTK's English Punkt model, words
for `change_case:capital_word_frequency` by a Treebank-like split; keywords are matched literally
(the reference treats them as regular expressions); language detection uses langdetect with a fixed
seed (the reference leaves it unseeded). OpenRLHF: `--reward.remote_url reward_fns/ifeval.py`.
"""

from __future__ import annotations

import collections
import inspect
import json
import re
import threading
from collections.abc import Callable
from typing import Any

import torch

from reward_fns._common import final_answer, label_field, make_reward_func, parse_label

METRICS = (
    "ifeval_strict_instruction",
    "ifeval_strict_prompt",
    "ifeval_loose_instruction",
    "ifeval_loose_prompt",
    "ifeval_error",
)
RELATIONS = ("less than", "at least")
CONSTRAINED_RESPONSES = ("My answer is yes.", "My answer is no.", "My answer is maybe.")

# ----------------------------------------------------------------------------- text helpers

_TITLES = frozenset("mr mrs ms dr prof sr jr st capt col gen lt sgt rev mt".split())  # a name follows
_ABBREVIATIONS = frozenset(
    "vs etc e.g i.e cf inc ltd co corp fig figs al approx dept jan feb mar apr jun jul aug sep sept oct "
    "nov dec ave blvd".split()
)
# (word, punctuation) of a word that ends a sentence. The punctuation starts after a non-punctuation
# character, so a long run of dots is tried once, not once per dot (which was quadratic).
_SENTENCE_END = re.compile(r"(?<!\S)(\S*?)(?<![.?!])([.?!]+)[\"'”’)\]]*(?=\s|$)")
_WORD_CHAR = re.compile(r"\w")
_NEXT_CHAR = re.compile(r"\s*(\S)")
_CONTRACTION = re.compile(r"(?i)^(.+?)(n't|'s|'re|'ve|'ll|'d|'m)$")
_WORD_SEPARATORS = re.compile(r"[\s,;:!?()\[\]{}<>\"“”]+")


def count_words(text: str) -> int:
    return len(re.findall(r"\w+", text))


def count_sentences(text: str) -> int:
    """Sentences as NLTK's English Punkt model splits them, approximately: a break after `?`, `!` and
    `.` followed by whitespace, but not after a title (Mr.), an initial or acronym (J., U.S.), an
    abbreviation (etc.) or an ellipsis unless the next word is capitalised."""
    count, searched = 0, 0  # no word character between the last break and `searched`
    for match in _SENTENCE_END.finditer(text):
        if set(match.group(2)) == {"."}:
            word = match.group(1).lower().lstrip("(\"'“‘")
            following = _NEXT_CHAR.match(text, match.end())
            capitalised = following is not None and following.group(1).isupper()
            if word in _TITLES or re.fullmatch(r"[a-z]|(?:[a-z]\.)+[a-z]", word):
                continue
            if (word in _ABBREVIATIONS or len(match.group(2)) > 1) and not capitalised:
                continue
        if _WORD_CHAR.search(text, searched, match.end()):
            count += 1
        searched = match.end()  # so "! ! ! ..." is searched once, not from the last break at every "!"
    return count + bool(_WORD_CHAR.search(text, searched))


def count_capital_words(text: str) -> int:
    """Tokens in all capitals, tokenised like NLTK's word_tokenize (contractions split off)."""
    count = 0
    for chunk in _WORD_SEPARATORS.split(text):
        word = chunk.strip(".'`*")
        if word:
            match = _CONTRACTION.match(word)
            count += sum(part.isupper() for part in (match.groups() if match else (word,)))
    return count


_language_lock = threading.Lock()
_language_factory: list = []


def detect_language(text: str) -> str | None:
    """langdetect's ISO 639-1 code, deterministic (seed 0) and thread-safe; None when undetectable."""
    from langdetect import DetectorFactory, LangDetectException
    from langdetect.detector_factory import PROFILES_DIRECTORY

    with _language_lock:
        if not _language_factory:
            factory = DetectorFactory()
            factory.load_profile(PROFILES_DIRECTORY)
            factory.set_seed(0)
            _language_factory.append(factory)
    detector = _language_factory[0].create()
    detector.append(text)
    try:
        return detector.detect()
    except LangDetectException:
        return None


def _compare(count: int, relation: str, threshold: int) -> bool:
    return count < threshold if relation == "less than" else count >= threshold


# ----------------------------------------------------------------------------- the 25 checks
# Each takes the response and the instruction's kwargs; IFEval counts an undetectable language as
# followed.


def _keywords_existence(text: str, keywords: list[str]) -> bool:
    return all(re.search(re.escape(keyword), text, re.IGNORECASE) for keyword in keywords)


def _keywords_frequency(text: str, keyword: str, frequency: int, relation: str) -> bool:
    return _compare(len(re.findall(re.escape(keyword.strip()), text, re.IGNORECASE)), relation, frequency)


def _forbidden_words(text: str, forbidden_words: list[str]) -> bool:
    return not any(re.search(rf"\b{re.escape(word)}\b", text, re.IGNORECASE) for word in forbidden_words)


def _letter_frequency(text: str, letter: str, let_frequency: int, let_relation: str) -> bool:
    return _compare(collections.Counter(text.lower())[letter.strip().lower()], let_relation, let_frequency)


def _response_language(text: str, language: str) -> bool:
    detected = detect_language(text)
    return detected is None or detected == language


def _number_sentences(text: str, num_sentences: int, relation: str) -> bool:
    return _compare(count_sentences(text), relation, num_sentences)


def _number_paragraphs(text: str, num_paragraphs: int) -> bool:
    paragraphs = re.split(r"\s?\*\*\*\s?", text)
    count = len(paragraphs)
    for i, paragraph in enumerate(paragraphs):
        if not paragraph.strip():
            if 0 < i < len(paragraphs) - 1:
                return False  # an empty paragraph between two dividers
            count -= 1
    return count == num_paragraphs


def _number_words(text: str, num_words: int, relation: str) -> bool:
    return _compare(count_words(text), relation, num_words)


def _nth_paragraph_first_word(text: str, num_paragraphs: int, nth_paragraph: int, first_word: str) -> bool:
    paragraphs = text.split("\n\n")
    count = sum(1 for paragraph in paragraphs if paragraph.strip())
    if nth_paragraph > count or not paragraphs[nth_paragraph - 1].strip():
        return False
    word = paragraphs[nth_paragraph - 1].split()[0].strip().lstrip("'").lstrip('"')
    found = ""
    for char in word:
        if char in ".,?!'\"":
            break
        found += char.lower()
    return count == num_paragraphs and found == first_word.lower()


def _number_placeholders(text: str, num_placeholders: int) -> bool:
    return len(re.findall(r"\[.*?\]", text)) >= num_placeholders


def _postscript(text: str, postscript_marker: str) -> bool:
    marker = postscript_marker.strip()
    if marker == "P.P.S":
        pattern = r"p\.\s?p\.\s?s"
    elif marker == "P.S.":
        pattern = r"p\.\s?s\."
    else:
        pattern = re.escape(marker.lower())
    # IFEval's pattern is "\s*" + this + ".*$" (re.MULTILINE); both ends can match empty, so searching for
    # the marker alone gives the same verdict without the quadratic "\s*" on long runs of whitespace.
    return re.search(pattern, text.lower()) is not None


def _number_bullet_lists(text: str, num_bullets: int) -> bool:
    stars = re.findall(r"^\s*\*[^\*].*$", text, re.MULTILINE)
    dashes = re.findall(r"^\s*-.*$", text, re.MULTILINE)
    return len(stars) + len(dashes) == num_bullets


def _constrained_response(text: str) -> bool:
    return any(option in text.strip() for option in CONSTRAINED_RESPONSES)


def _number_highlighted_sections(text: str, num_highlights: int) -> bool:
    single = [h for h in re.findall(r"\*[^\n\*]*\*", text) if h.strip("*").strip()]
    double = [h for h in re.findall(r"\*\*[^\n\*]*\*\*", text) if h[2:-2].strip()]
    return len(single) + len(double) >= num_highlights


def _multiple_sections(text: str, section_spliter: str, num_sections: int) -> bool:
    sections = re.split(r"\s?" + re.escape(section_spliter.strip()) + r"\s?\d+\s?", text)
    return len(sections) - 1 >= num_sections


def _json_format(text: str) -> bool:
    text = text.strip()
    for fence in ("```json", "```Json", "```JSON", "```"):
        text = text.removeprefix(fence)
    try:
        json.loads(text.removesuffix("```").strip())
    except ValueError:
        return False
    return True


def _title(text: str) -> bool:
    return any(title.lstrip("<").rstrip(">").strip() for title in re.findall(r"<<[^\n]+>>", text))


def _two_responses(text: str) -> bool:
    parts = text.split("******")
    kept = []
    for i, part in enumerate(parts):
        if part.strip():
            kept.append(part.strip())
        elif 0 < i < len(parts) - 1:
            return False
    return len(kept) == 2 and kept[0] != kept[1]


def _repeat_prompt(text: str, prompt_to_repeat: str) -> bool:
    return text.strip().lower().startswith(prompt_to_repeat.strip().lower())


def _end_checker(text: str, end_phrase: str) -> bool:
    return text.strip().strip('"').lower().endswith(end_phrase.strip().lower())


def _capital_word_frequency(text: str, capital_frequency: int, capital_relation: str) -> bool:
    return _compare(count_capital_words(text), capital_relation, capital_frequency)


def _english_capital(text: str) -> bool:
    detected = detect_language(text) if text.isupper() else "not upper"
    return detected is None or detected == "en"


def _english_lowercase(text: str) -> bool:
    detected = detect_language(text) if text.islower() else "not lower"
    return detected is None or detected == "en"


def _no_comma(text: str) -> bool:
    return "," not in text


def _quotation(text: str) -> bool:
    text = text.strip()
    return len(text) > 1 and text[0] == '"' and text[-1] == '"'


CHECKS: dict[str, Callable[..., bool]] = {
    "keywords:existence": _keywords_existence,
    "keywords:frequency": _keywords_frequency,
    "keywords:forbidden_words": _forbidden_words,
    "keywords:letter_frequency": _letter_frequency,
    "language:response_language": _response_language,
    "length_constraints:number_sentences": _number_sentences,
    "length_constraints:number_paragraphs": _number_paragraphs,
    "length_constraints:number_words": _number_words,
    "length_constraints:nth_paragraph_first_word": _nth_paragraph_first_word,
    "detectable_content:number_placeholders": _number_placeholders,
    "detectable_content:postscript": _postscript,
    "detectable_format:number_bullet_lists": _number_bullet_lists,
    "detectable_format:constrained_response": _constrained_response,
    "detectable_format:number_highlighted_sections": _number_highlighted_sections,
    "detectable_format:multiple_sections": _multiple_sections,
    "detectable_format:json_format": _json_format,
    "detectable_format:title": _title,
    "combination:two_responses": _two_responses,
    "combination:repeat_prompt": _repeat_prompt,
    "startend:end_checker": _end_checker,
    "change_case:capital_word_frequency": _capital_word_frequency,
    "change_case:english_capital": _english_capital,
    "change_case:english_lowercase": _english_lowercase,
    "punctuation:no_comma": _no_comma,
    "startend:quotation": _quotation,
}

_INTEGER_ARGS = {
    "frequency",
    "let_frequency",
    "num_sentences",
    "num_paragraphs",
    "num_words",
    "nth_paragraph",
    "num_placeholders",
    "num_bullets",
    "num_highlights",
    "num_sections",
    "capital_frequency",
}
_RELATION_ARGS = {"relation", "let_relation", "capital_relation"}


_LIST_ARGS = {"keywords", "forbidden_words"}


def _arguments(check: Callable[..., bool]) -> list[str]:
    return list(inspect.signature(check).parameters)[1:]


def parse_ifeval_label(label: Any, index: int) -> list[tuple[str, Callable[..., bool], dict[str, Any]]]:
    """[(instruction id, check, kwargs)] with every id known and every argument present and valid."""
    label = parse_label(label)
    if isinstance(label, list):
        ids, all_kwargs = label, [{}] * len(label)
    else:
        ids = label_field(label, "instruction_id_list", index, plain_ok=False)
        if not isinstance(ids, list):
            raise ValueError(f"labels[{index}]: field 'instruction_id_list' must be a list, got {ids!r:.80}")
        all_kwargs = label["kwargs"] if label.get("kwargs") is not None else [{}] * len(ids)
    if not isinstance(all_kwargs, list) or len(all_kwargs) != len(ids):
        raise ValueError(f"labels[{index}]: 'instruction_id_list' and 'kwargs' must be lists of equal length")
    if not ids:  # no instruction would be a reward of 1 for any response, the empty one included
        raise ValueError(f"labels[{index}]: field 'instruction_id_list' is empty")
    parsed = []
    for k, (instruction, raw) in enumerate(zip(ids, all_kwargs, strict=True)):
        where = f"labels[{index}]: instruction {k} ({instruction!r})"
        if not isinstance(instruction, str) or instruction not in CHECKS:
            raise ValueError(f"{where}: unknown instruction id; known: {sorted(CHECKS)}")
        if raw is not None and not isinstance(raw, dict):
            raise ValueError(f"{where}: kwargs[{k}] must be a dict, got {raw!r:.80}")
        given = {key: value for key, value in (raw or {}).items() if value is not None}
        wanted = _arguments(CHECKS[instruction])
        if unexpected := sorted(set(given) - set(wanted)):
            raise ValueError(f"{where}: unexpected kwargs {unexpected}; it takes {wanted}")
        if missing := [key for key in wanted if key not in given]:
            raise ValueError(f"{where}: missing field 'kwargs.{missing[0]}'")
        for key in wanted:
            value = given[key]
            if key in _INTEGER_ARGS:
                # A count below 0 is met by any response or by none (IFEval replaces all but capital_frequency
                # by a random count); 0 is kept, as in IFEval.
                if (
                    isinstance(value, bool) or not isinstance(value, int | float) or value < 0
                    or (isinstance(value, float) and not value.is_integer())
                ):
                    raise ValueError(f"{where}: kwargs.{key} must be an integer >= 0, got {value!r}")
                given[key] = int(value)
            elif key in _RELATION_ARGS and value not in RELATIONS:
                raise ValueError(f"{where}: kwargs.{key} must be one of {RELATIONS}, got {value!r}")
            elif key in _LIST_ARGS and not (
                isinstance(value, list) and value and all(isinstance(v, str) and v.strip() for v in value)
            ):
                raise ValueError(f"{where}: kwargs.{key} must be a non-empty list of strings, got {value!r}")
            elif key not in _INTEGER_ARGS | _LIST_ARGS and not isinstance(value, str):
                raise ValueError(f"{where}: kwargs.{key} must be a string, got {value!r}")
        # Arguments IFEval replaces by a random one, as no response could fail (or pass) the check with them.
        if "letter" in given and len(given["letter"]) != 1:
            raise ValueError(f"{where}: kwargs.letter must be one character, got {given['letter']!r}")
        if "keyword" in given and not given["keyword"].strip():
            raise ValueError(f"{where}: kwargs.keyword is empty")
        if "nth_paragraph" in given and not 1 <= given["nth_paragraph"] <= given["num_paragraphs"]:
            raise ValueError(
                f"{where}: kwargs.nth_paragraph must be from 1 to kwargs.num_paragraphs "
                f"({given['num_paragraphs']}), got {given['nth_paragraph']}"
            )
        parsed.append((instruction, CHECKS[instruction], given))
    return parsed


def loose_variants(text: str) -> list[str]:
    """IFEval's loose variants: the response with its first and/or last line removed, with and without `*`."""
    lines = text.split("\n")
    trimmed = ["\n".join(lines[1:]).strip(), "\n".join(lines[:-1]).strip(), "\n".join(lines[1:-1]).strip()]
    variants = [text, text.replace("*", ""), *trimmed, *(t.replace("*", "") for t in trimmed)]
    return list(dict.fromkeys(variants))


def follows(text: str, instructions: list) -> tuple[list[bool], list[bool]]:
    """(strict, loose) per instruction."""
    variants = [v for v in loose_variants(text) if v.strip()]
    strict = [bool(text.strip()) and check(text, **kwargs) for _, check, kwargs in instructions]
    loose = [
        s or any(check(v, **kwargs) for v in variants)
        for s, (_, check, kwargs) in zip(strict, instructions, strict=True)
    ]
    return strict, loose


def batch_reward(
    responses: list[str],
    labels: list,
    *,
    mode: str = "strict",
    all_instructions: bool = False,
    answer_only: bool = True,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Rewards (N,) in [0, 1] and per-sample metrics (N,) named in METRICS."""
    if mode not in ("strict", "loose"):
        raise ValueError(f"mode must be 'strict' or 'loose', got {mode!r}")
    if len(labels) != len(responses):
        raise ValueError(f"{len(responses)} responses but {len(labels)} labels")
    parsed = [parse_ifeval_label(label, i) for i, label in enumerate(labels)]
    n = len(responses)
    metrics = {key: torch.zeros(n) for key in METRICS}
    for i, (response, instructions) in enumerate(zip(responses, parsed, strict=True)):
        strict, loose = follows(final_answer(response, answer_only), instructions)
        for name, flags in (("strict", strict), ("loose", loose)):
            metrics[f"ifeval_{name}_instruction"][i] = sum(flags) / len(flags)
            metrics[f"ifeval_{name}_prompt"][i] = float(all(flags))
    rewards = metrics[f"ifeval_{mode}_{'prompt' if all_instructions else 'instruction'}"].clone()
    return rewards, metrics


reward_func = make_reward_func(batch_reward, METRICS, "ifeval_error")
