"""The instruction-following task: everyday writing requests, each with 1 or 2 verifiable constraints.

A prompt is a base request written by the project plus the constraints' instructions, e.g. `Describe your
favourite fruit. Answer in fewer than 40 words. Do not use any commas in your answer.`; its label is in
IFEval's schema ({"instruction_id_list": [...], "kwargs": [{...}, ...]}) so that `reward_fns/ifeval.py`
grades the responses. The constraints are ones a 135M-parameter instruct model can meet in a short answer.
Train and held-out prompts come from disjoint base requests.

    python -m aapa_rl.local.ifeval_task --out data/ifeval    # writes train.jsonl and eval.jsonl
"""

from __future__ import annotations

import argparse
import itertools
import random
from dataclasses import dataclass
from pathlib import Path

from aapa_rl.data.rows import write_splits

# (request, words that fit it): keywords:existence asks for one of them.
REQUESTS: tuple[tuple[str, tuple[str, str]], ...] = (
    ("Write a short note to a neighbour about a lost cat.", ("cat", "garden")),
    ("Describe your favourite fruit.", ("taste", "sweet")),
    ("Write a thank-you message to a friend who helped you move house.", ("boxes", "friend")),
    ("Explain how to make a cup of tea.", ("water", "cup")),
    ("Describe a rainy afternoon in a city.", ("rain", "street")),
    ("Write a short invitation to a birthday picnic in the park.", ("park", "cake")),
    ("Give advice to someone starting to learn the guitar.", ("practice", "chords")),
    ("Describe what you see from a train window.", ("fields", "train")),
    ("Write a short review of a cafe you like.", ("coffee", "staff")),
    ("Explain why sleep is important.", ("rest", "body")),
    ("Write a message asking a colleague to move a meeting to Friday.", ("meeting", "time")),
    ("Describe a walk along a beach at sunset.", ("sand", "waves")),
    ("Write a note reminding your family to water the plants.", ("plants", "water")),
    ("Suggest some things to do on a snowy day.", ("snow", "warm")),
    ("Describe your ideal weekend breakfast.", ("eggs", "bread")),
    ("Write a short apology for arriving late to a dinner.", ("sorry", "dinner")),
    ("Explain how to plant a tomato seed.", ("soil", "sun")),
    ("Describe an old bicycle.", ("wheels", "rust")),
    ("Write a welcome message for a new member of a book club.", ("books", "welcome")),
    ("Give tips for keeping a small kitchen tidy.", ("shelves", "clean")),
    ("Describe the sounds of a forest in the morning.", ("birds", "trees")),
    ("Write a postcard to a grandparent from a holiday by a lake.", ("lake", "swim")),
    ("Explain how to fold a paper airplane.", ("paper", "fold")),
    ("Describe a busy market on a Saturday.", ("stalls", "people")),
    ("Write a short note to a teacher thanking them for a good year.", ("class", "thanks")),
    ("Give advice on packing for a weekend camping trip.", ("tent", "jacket")),
    ("Describe how fresh bread smells when it comes out of the oven.", ("oven", "warm")),
    ("Write a message to a friend recommending a film.", ("film", "story")),
    ("Explain why people enjoy gardening.", ("flowers", "outdoors")),
    ("Describe a dog playing in the snow.", ("dog", "snow")),
    ("Write a short announcement that the library will close early on Monday.", ("library", "early")),
    ("Give tips for staying calm before an exam.", ("breathe", "study")),
    ("Describe your favourite season.", ("weather", "season")),
    ("Write a note to a roommate about buying groceries.", ("milk", "list")),
    ("Explain how to look after a houseplant.", ("light", "leaves")),
    ("Describe a quiet evening at home.", ("lamp", "tea")),
    ("Write a short message congratulating a friend on a new job.", ("job", "proud")),
    ("Give advice for a first day at a new school.", ("smile", "teacher")),
    ("Describe a visit to a museum.", ("paintings", "museum")),
    ("Write a note asking a neighbour to feed your fish while you are away.", ("fish", "food")),
)
WORD_LIMITS = (30, 40, 50)
SENTENCE_LIMITS = (3, 4)
BULLET_COUNTS = (2, 3)
HIGHLIGHT_COUNTS = (1, 2)
# Filler words, none of them a request's keyword or part of an end phrase.
FORBIDDEN_WORDS = ("very", "really", "just", "thing", "great", "also", "lot", "always")
END_PHRASES = ("Thank you.", "See you soon.", "Take care.", "Best wishes.", "That is all.")
POSTSCRIPT_MARKERS = ("P.S.", "P.P.S")
CONSTRAINT_IDS = (
    "punctuation:no_comma",
    "change_case:english_lowercase",
    "change_case:english_capital",
    "length_constraints:number_words",
    "length_constraints:number_sentences",
    "keywords:existence",
    "keywords:forbidden_words",
    "startend:end_checker",
    "startend:quotation",
    "detectable_format:title",
    "detectable_content:postscript",
    "detectable_format:number_bullet_lists",
    "detectable_format:number_highlighted_sections",
)
# Pairs whose checks or instructions contradict each other (a capitalised end phrase in a lowercase answer,
# a closing quote after the end phrase, a `*` bullet read as a highlight, ...).
INCOMPATIBLE = frozenset(
    frozenset(pair)
    for pair in (
        ("change_case:english_lowercase", "change_case:english_capital"),
        ("change_case:english_lowercase", "startend:end_checker"),
        ("change_case:english_lowercase", "detectable_content:postscript"),
        ("change_case:english_capital", "startend:end_checker"),
        ("startend:quotation", "startend:end_checker"),
        ("startend:quotation", "detectable_content:postscript"),
        ("startend:quotation", "detectable_format:number_bullet_lists"),
        ("detectable_content:postscript", "startend:end_checker"),
        ("detectable_format:number_bullet_lists", "detectable_format:number_highlighted_sections"),
        ("detectable_format:number_bullet_lists", "length_constraints:number_sentences"),
    )
)


def render(instruction_id: str, rng: random.Random, keywords: tuple[str, ...]) -> tuple[str, dict]:
    """(the instruction's text, its kwargs in IFEval's schema), the kwargs drawn with `rng`; `keywords` are
    the request's own words, for keywords:existence."""
    if instruction_id == "punctuation:no_comma":
        return "Do not use any commas in your answer.", {}
    if instruction_id == "change_case:english_lowercase":
        return "Write your entire answer in English, in lowercase letters only; no capital letters.", {}
    if instruction_id == "change_case:english_capital":
        return "Write your entire answer in English, in capital letters only.", {}
    if instruction_id == "length_constraints:number_words":
        limit = rng.choice(WORD_LIMITS)
        return f"Answer in fewer than {limit} words.", {"relation": "less than", "num_words": limit}
    if instruction_id == "length_constraints:number_sentences":
        limit = rng.choice(SENTENCE_LIMITS)
        return f"Use at most {limit - 1} sentences.", {"relation": "less than", "num_sentences": limit}
    if instruction_id == "keywords:existence":
        keyword = rng.choice(keywords)
        return f'Use the word "{keyword}" in your answer.', {"keywords": [keyword]}
    if instruction_id == "keywords:forbidden_words":
        words = rng.sample(FORBIDDEN_WORDS, 2)
        return f'Do not use the words "{words[0]}" or "{words[1]}".', {"forbidden_words": words}
    if instruction_id == "startend:end_checker":
        phrase = rng.choice(END_PHRASES)
        return f'End your answer with the exact phrase "{phrase}" and nothing after it.', {
            "end_phrase": phrase
        }
    if instruction_id == "startend:quotation":
        return "Wrap your entire answer in double quotation marks.", {}
    if instruction_id == "detectable_format:title":
        return "Give your answer a title wrapped in double angular brackets, such as <<my title>>.", {}
    if instruction_id == "detectable_content:postscript":
        marker = rng.choice(POSTSCRIPT_MARKERS)
        return f"Add a postscript starting with {marker} at the end of your answer.", {
            "postscript_marker": marker
        }
    if instruction_id == "detectable_format:number_bullet_lists":
        count = rng.choice(BULLET_COUNTS)
        return f'Answer with exactly {count} bullet points, each on its own line starting with "* ".', {
            "num_bullets": count
        }
    if instruction_id == "detectable_format:number_highlighted_sections":
        count = rng.choice(HIGHLIGHT_COUNTS)
        parts = "part" if count == 1 else "parts"
        return f"Highlight at least {count} {parts} of your answer with markdown, like *this*.", {
            "num_highlights": count
        }
    raise ValueError(f"no template for instruction id {instruction_id!r}; templates: {list(CONSTRAINT_IDS)}")


def constraint_sets() -> tuple[list[tuple[str]], list[tuple[str, str]]]:
    """(every single constraint, every compatible pair)."""
    pairs = [p for p in itertools.combinations(CONSTRAINT_IDS, 2) if frozenset(p) not in INCOMPATIBLE]
    return [(c,) for c in CONSTRAINT_IDS], pairs


@dataclass(frozen=True)
class IFEvalTask:
    """`per_request` prompts for each base request, half with one constraint and half with two (all distinct);
    `eval_requests` requests are held out. Defaults: 32 x 8 = 256 train rows, 8 x 8 = 64 held-out rows."""

    seed: int = 0
    eval_requests: int = 8
    per_request: int = 8

    def __post_init__(self) -> None:
        if not 1 <= self.eval_requests < len(REQUESTS):
            raise ValueError(f"eval_requests must be in [1, {len(REQUESTS) - 1}], got {self.eval_requests}")
        singles, _ = constraint_sets()
        if not 1 <= self.per_request <= 2 * len(singles):
            raise ValueError(f"per_request must be in [1, {2 * len(singles)}], got {self.per_request}")

    def prompts_for(self, request: str, keywords: tuple[str, ...], rng: random.Random) -> list[dict]:
        singles, pairs = constraint_sets()
        n_single = self.per_request // 2
        rows = []
        for drawn in rng.sample(singles, n_single) + rng.sample(pairs, self.per_request - n_single):
            ids = rng.sample(drawn, len(drawn))  # either order of a pair's instructions
            rendered = [render(i, rng, keywords) for i in ids]
            label = {"instruction_id_list": list(ids), "kwargs": [kwargs for _, kwargs in rendered]}
            prompt = " ".join([request, *(text for text, _ in rendered)])
            # The label's two fields also at the top level, as in IFEval's data: the data pipeline reads them
            # there (--instruction-ids-key instruction_id_list --kwargs-key kwargs).
            rows.append({"prompt": prompt, "label": label, **label})
        return rows

    def make_splits(self) -> dict[str, list[dict]]:
        """Rows {prompt, label, instruction_id_list, kwargs} for train and eval (held-out requests)."""
        rng = random.Random(self.seed)
        requests = rng.sample(REQUESTS, len(REQUESTS))
        held_out, train = requests[: self.eval_requests], requests[self.eval_requests :]
        splits = {
            "train": [row for request, words in train for row in self.prompts_for(request, words, rng)],
            "eval": [row for request, words in held_out for row in self.prompts_for(request, words, rng)],
        }
        # Mixed requests in file order: a trainer that reads only the first rows still sees many requests.
        return {name: rng.sample(rows, len(rows)) for name, rows in splits.items()}

    def write(self, directory: Path) -> dict[str, Path]:
        """Write train.jsonl and eval.jsonl under `directory`; returns their paths by split name."""
        return write_splits(directory, self.make_splits())


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Write the instruction-following task's JSONL splits.")
    parser.add_argument("--out", required=True, type=Path, help="directory for train.jsonl and eval.jsonl")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-requests", type=int, default=8, help="base requests held out")
    parser.add_argument("--per-request", type=int, default=8, help="prompts per base request")
    args = parser.parse_args()
    try:
        task = IFEvalTask(seed=args.seed, eval_requests=args.eval_requests, per_request=args.per_request)
    except ValueError as e:
        parser.error(str(e))
    for split, path in task.write(args.out).items():
        print(f"{split}: {len(path.read_text().splitlines())} rows in {path}")
