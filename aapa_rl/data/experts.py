"""`aapa-rl build-experts`: rejection sampling of teacher samples into the expert bank.

For each prompt, the expert is the highest-reward sample whose reward is at least `min_reward` (the first
such sample on ties). Bank rows: {id, prompt, expert, label}, the schema aapa_rl.anchor.ExpertBank reads.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from aapa_rl.data.rows import BadRows, DataError, PromptRow, RowError, read_records, text
from reward_fns.combine import RewardError, RewardFn, call_reward, reward_name
from reward_fns.combine import load_reward as load_any_reward


def load_reward(name: str) -> RewardFn:
    """`batch_reward` of reward_fns.<name> or of a .py file defining it, as data errors."""
    try:
        return load_any_reward(name)
    except ValueError as e:
        raise DataError(str(e)) from e


def read_samples(paths: list[str | Path], prompts: dict[str, PromptRow], bad_rows: BadRows
                 ) -> dict[str, list[str]]:
    """Responses per prompt id, in file order, checked against the prompt data. A sample whose id or prompt
    does not match is a bad row, reported after the others: when no sample matches at all, the commands
    were given different prompt flags, and that is one error instead of a bad row per sample."""
    responses: dict[str, list[str]] = {}
    unmatched: list[str] = []
    for path in paths:
        rows = 0
        for row, record in read_records(path, bad_rows):
            rows += 1
            try:
                sample_id = text(record, "id")
                prompt = text(record, "prompt")
                response = text(record, "response", may_be_empty=True)
            except RowError as e:
                bad_rows.handle(f"{path}: row {row}: {e}")
                continue
            if sample_id not in prompts:
                unmatched.append(f"{path}: row {row}: field 'id': {sample_id!r} is not in the prompt data")
            elif prompt != prompts[sample_id].prompt:
                unmatched.append(f"{path}: row {row}: field 'prompt': differs from the prompt data's prompt "
                                 "with this id")
            else:
                responses.setdefault(sample_id, []).append(response)
        if not rows:  # e.g. a generate run that wrote nothing: the bank would be empty, and overwritten
            raise DataError(f"{path}: no sample rows")
    flags = "--prompt-key, --prompt-template and --id-key as for generate"
    if unmatched and not responses:
        raise DataError(f"none of the {len(unmatched)} sample rows matches one of the {len(prompts)} prompts "
                        f"by id and prompt (first: {unmatched[0]}); give build-experts the same {flags}")
    for message in unmatched:
        bad_rows.handle(f"{message} (give build-experts the same {flags})")
    return responses


def label_problems(reward_fn: RewardFn, labels: list) -> dict[int, str]:
    """Labels the reward cannot use, by position, with its reason. Reward functions check every label before
    scoring and raise ValueError ("labels[i]: ..."), and empty responses cost nothing to score: one call
    checks all labels, and only when it fails is each one checked on its own. A user reward may instead
    trip on a label it cannot read (a TypeError from label["answer"] on a string): that is the label's
    problem too. A reward that breaks its output contract (RewardError) is the reward's fault, not a
    label's: it propagates."""
    try:
        call_reward(reward_fn, [""] * len(labels), labels, [""] * len(labels))
        return {}
    except RewardError:
        raise
    except Exception:  # each label's own call below says which label, and what is wrong with it
        pass
    problems = {}
    for i, label in enumerate(labels):
        try:
            call_reward(reward_fn, [""], [label], [""])
        except RewardError:
            raise
        except ValueError as e:
            problems[i] = str(e).removeprefix("labels[0]: ")
        except Exception as e:  # the caller adds the file, row and field, as for a ValueError
            problems[i] = f"reward {reward_name(reward_fn)!r} raised {type(e).__name__}: {e}"
    return problems


def build_experts(prompts: list[PromptRow], responses: dict[str, list[str]], reward_fn: RewardFn,
                  min_reward: float = 1.0, chunk_size: int = 256, *, bad_rows: BadRows,
                  prompts_path: str | Path) -> tuple[list[dict], dict[str, Any]]:
    """(bank rows in prompt order, report with coverage and the reward distribution). A prompt whose label
    the reward rejects is a bad row of `prompts_path`: an error, or left out with its samples when `bad_rows`
    skips."""
    from tqdm import tqdm

    by_id = {p.id: p for p in prompts}
    ids = list(responses)
    rejected = set()
    for i, problem in label_problems(reward_fn, [by_id[pid].label for pid in ids]).items():
        if not by_id[ids[i]].label:  # no label column was named, so every row would fail alike
            raise DataError(f"the reward needs a label column ({problem}): pass --answer-key (math), "
                            "--tests-key or --cases-key (code), or --instruction-ids-key and "
                            "--kwargs-key (ifeval)")
        bad_rows.handle(f"{prompts_path}: row {by_id[ids[i]].row}: label: {problem}")
        rejected.add(ids[i])
    prompts = [p for p in prompts if p.id not in rejected]
    if not prompts:
        raise DataError(f"{prompts_path}: no row has a label that the reward accepts")
    responses = {pid: rs for pid, rs in responses.items() if pid not in rejected}
    flat = [(pid, response) for pid, rs in responses.items() for response in rs]
    rewards: list[float] = []
    for start in tqdm(range(0, len(flat), chunk_size), desc="reward", unit="chunk"):
        chunk = flat[start:start + chunk_size]
        values, _ = call_reward(reward_fn, [r for _, r in chunk], [by_id[pid].label for pid, _ in chunk],
                                [by_id[pid].prompt for pid, _ in chunk])
        rewards.extend(float(v) for v in values)
    if len(rewards) != len(flat):
        raise DataError(f"the reward function returned {len(rewards)} rewards for {len(flat)} responses")

    best: dict[str, tuple[float, str]] = {}
    passing = Counter()
    for (pid, response), reward in zip(flat, rewards, strict=True):
        if reward >= min_reward and response.strip():
            passing[pid] += 1
            if pid not in best or reward > best[pid][0]:
                best[pid] = (reward, response)
    bank = [{"id": p.id, "prompt": p.prompt, "expert": best[p.id][1], "label": p.label}
            for p in prompts if p.id in best]

    ordered = sorted(rewards)
    quantiles = {"min": 0.0, "p25": 0.25, "median": 0.5, "p75": 0.75, "max": 1.0}
    values = Counter(rewards)
    report = {
        "prompts": len(prompts),
        "prompts_with_samples": len(responses),
        "samples": len(flat),
        "empty_responses": sum(not r.strip() for _, r in flat),
        "min_reward": min_reward,
        "verified_prompts": len(bank),
        "coverage": len(bank) / len(prompts),
        "coverage_of_sampled": len(bank) / len(responses) if responses else 0.0,
        "reward": {"mean": sum(ordered) / len(ordered)} | {
            name: ordered[min(len(ordered) - 1, int(q * len(ordered)))] for name, q in quantiles.items()
        } if ordered else None,
        "reward_values": {str(v): c for v, c in sorted(values.items())} if len(values) <= 20 else None,
        "prompts_by_passing_samples": {str(k): v for k, v in sorted(
            Counter(passing.get(pid, 0) for pid in responses).items())},
    }
    return bank, report


def format_report(report: dict[str, Any]) -> str:
    r = report["reward"]
    lines = [
        f"prompts: {report['prompts']}  with samples: {report['prompts_with_samples']}  "
        f"samples: {report['samples']} (empty: {report['empty_responses']})",
        f"verified experts (reward >= {report['min_reward']}): {report['verified_prompts']}  "
        f"coverage: {report['coverage']:.1%} of all prompts, {report['coverage_of_sampled']:.1%} of sampled",
    ]
    if r is not None:
        lines.append(f"reward: mean {r['mean']:.4g}  min {r['min']:.4g}  p25 {r['p25']:.4g}  "
                     f"median {r['median']:.4g}  p75 {r['p75']:.4g}  max {r['max']:.4g}")
    if report["reward_values"]:
        lines.append("reward values: " + "  ".join(f"{v}: {c}" for v, c in report["reward_values"].items()))
    lines.append("prompts by number of passing samples: "
                 + "  ".join(f"{k}: {v}" for k, v in report["prompts_by_passing_samples"].items()))
    return "\n".join(lines)
