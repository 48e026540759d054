"""Offline discriminator training and its report (held-out AUROC, accuracy, ECE, AUROC per negative type).

Positives are the experts; negatives are reference-policy rollouts plus generic hard negatives made from
the experts. Held-out examples come from prompts never seen in training.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from aapa_rl.data.rows import DataError, check_row, read_rows

from .bank import ExpertBank
from .discriminator import Discriminator, split_sentences

GENERIC_NEGATIVES = ("truncated", "span_repeated", "reasoning_dropped", "sentences_shuffled",
                     "answer_corrupted", "filler_appended", "other_expert")
FILLERS = (
    "I hope this helps! Let me know if you have any other questions.",
    "In summary, the answer is as stated above, and this concludes the solution.",
    "Note that this was checked carefully and should be correct. Thank you for reading!",
)
NUMBER_RE = re.compile(r"\d+(?:\.\d+)?")


@dataclass(frozen=True)
class Example:
    prompt: str
    response: str
    expert: str
    kind: str  # "expert" for positives, else the negative type

    @property
    def label(self) -> int:
        return int(self.kind == "expert")


def hard_negatives(expert: str, other_expert: str | None, rng: random.Random) -> dict[str, str | None]:
    """The generic negatives of one expert; None where a type does not apply (e.g. one sentence)."""
    sentences = split_sentences(expert)
    # Rejoined as the expert joins them: a space would mark every shuffled or repeated CJK negative.
    sep = " " if " " in expert else ""
    cut = max(1, int(len(expert) * rng.uniform(0.3, 0.7)))
    space = expert.rfind(" ", 0, cut)
    repeated = rng.choice(sentences) if sentences else None
    span_repeated = None
    if repeated:
        end = expert.find(repeated) + len(repeated)
        span_repeated = expert[:end] + f"{sep}{repeated}" * rng.randint(2, 3) + expert[end:]
    shuffled = sentences[:]
    rng.shuffle(shuffled)
    if shuffled == sentences and len(set(sentences)) > 1:
        shuffled = shuffled[1:] + shuffled[:1]
    numbers = list(NUMBER_RE.finditer(expert))
    corrupted = None
    if numbers:
        last = numbers[-1]
        wrong = str(int(Decimal(last.group())) + rng.randint(1, 9))  # exact for numbers of any length
        corrupted = expert[: last.start()] + wrong + expert[last.end():]
    return {
        "truncated": expert[: space if space > 0 else cut].rstrip(),
        "span_repeated": span_repeated,
        "reasoning_dropped": sentences[-1] if len(sentences) > 1 else None,
        "sentences_shuffled": sep.join(shuffled),
        "answer_corrupted": corrupted,
        "filler_appended": f"{expert.rstrip()} {rng.choice(FILLERS)}",
        "other_expert": other_expert,
    }


def read_rollouts(path: str | Path, bank: ExpertBank, *, allow_skips: bool = False
                  ) -> tuple[list[tuple[str, str]], dict[str, list[str]]]:
    """(prompt, response) rows of a JSONL/parquet/datasets file; each prompt must have an expert. With
    `allow_skips`, the skipped rows' messages by kind: "no expert" (expected when only some prompts have
    one) apart from "malformed", so that a bad row is not lost among the expected skips."""
    path = Path(path)
    rows, skipped = [], {"no expert": [], "malformed": []}
    for number, row in read_rows(path):
        kind = "malformed"
        try:
            row = check_row(path, number, row, ("prompt", "response"), may_be_empty=("response",))
            kind = "no expert"
            if bank.expert_for(prompt=row["prompt"]) is None:
                raise DataError(f"{path}: row {number}: field 'prompt': no expert for it in {bank.source}")
        except DataError as e:
            if not allow_skips:
                raise
            skipped[kind].append(str(e))
            continue
        rows.append((row["prompt"], row["response"]))
    if not rows and not any(skipped.values()):  # a sampling run that wrote nothing: no rollout negatives
        raise DataError(f"{path}: no rows")
    return rows, skipped


def build_examples(bank: ExpertBank, rollouts: list[tuple[str, str]], variant: str, *, generic: bool = True,
                   seed: int = 0, held: Collection[str] = ()) -> tuple[list[Example], Counter]:
    """Positives, rollout negatives and generic negatives for a discriminator `variant`; the Counter holds
    what was left out and why. A prompt's `other_expert` negative comes from its own side of the split
    (`held`: the held-out prompts), so no expert is seen on both sides."""
    rng = random.Random(seed)
    left_out: Counter = Counter()
    examples = []
    experts = {side: [r.expert for r in bank.records if (r.prompt in held) == side] for side in (False, True)}
    for record in bank.records:
        examples.append(Example(record.prompt, record.expert, record.expert, "expert"))
        if not generic:
            continue
        pool = experts[record.prompt in held]
        others = [e for e in rng.sample(pool, min(len(pool), 4)) if e != record.expert]
        for kind, text in hard_negatives(record.expert, others[0] if others else None, rng).items():
            if text is None or text.strip() == record.expert.strip():
                left_out[f"{kind}: not applicable"] += 1
            else:
                examples.append(Example(record.prompt, text, record.expert, kind))
    for prompt, response in rollouts:
        expert = bank.expert_for(prompt=prompt)
        if response.strip() == expert.strip():
            left_out["rollout: identical to the expert"] += 1
        else:
            examples.append(Example(prompt, response, expert, "rollout"))
    if variant == "aligned":  # order-free matching gives shuffled sentences the expert's features
        left_out["sentences_shuffled: invisible to the aligned variant"] = sum(
            e.kind == "sentences_shuffled" for e in examples)
        examples = [e for e in examples if e.kind != "sentences_shuffled"]
    return examples, left_out


def heldout_prompts(bank: ExpertBank, fraction: float, seed: int) -> set[str]:
    """The prompts held out of training: a seeded `fraction` of the bank's, at least one, never all."""
    prompts = sorted({r.prompt for r in bank.records})
    if len(prompts) < 2:
        raise DataError(f"{len(prompts)} prompt(s) with examples: need at least 2 to hold some out")
    random.Random(seed).shuffle(prompts)
    return set(prompts[: min(len(prompts) - 1, max(1, round(fraction * len(prompts))))])


def compute_features(disc: Discriminator, examples: list[Example], batch_size: int = 256) -> torch.Tensor:
    chunks = []
    for start in tqdm(range(0, len(examples), batch_size), desc="features", leave=False):
        batch = examples[start: start + batch_size]
        chunks.append(disc.features([e.prompt for e in batch], [e.response for e in batch],
                                    [e.expert for e in batch]))
    return torch.cat(chunks)


def fit_head(disc: Discriminator, features: torch.Tensor, labels: torch.Tensor, *, steps: int = 600,
             lr: float = 3e-3, batch_size: int = 256, seed: int = 0) -> None:
    """BCE on the head only, frozen again afterwards: the aligned variant's logistic link is a convex fit
    (full-batch L-BFGS to convergence); the MLP heads take `steps` minibatch Adam steps."""
    head = disc.head.train().requires_grad_(True)
    labels = labels.float().to(features.device)
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    if isinstance(head, torch.nn.Linear):
        optimizer = torch.optim.LBFGS(head.parameters(), max_iter=500, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = bce(head(features).squeeze(-1), labels) + 1e-4 * head.weight.square().sum()
            loss.backward()
            return loss

        optimizer.step(closure)
    else:
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        optimizer = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=1e-4)
        for _ in tqdm(range(steps), desc="train head", leave=False):
            idx = torch.randint(len(features), (min(batch_size, len(features)),), generator=generator)
            loss = bce(head(features[idx]).squeeze(-1), labels[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    head.requires_grad_(False)
    disc.eval()


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Probability that a random positive outscores a random negative (ties count half)."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    _, inverse, counts = np.unique(np.concatenate([pos, neg]), return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2)[inverse]
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def expected_calibration_error(scores: np.ndarray, labels: np.ndarray, bins: int = 10) -> float:
    which = np.minimum((scores * bins).astype(int), bins - 1)
    return float(sum(abs(labels[which == b].mean() - scores[which == b].mean()) * (which == b).mean()
                     for b in range(bins) if (which == b).any()))


def metrics(scores: np.ndarray, examples: list[Example]) -> dict:
    labels = np.array([e.label for e in examples])
    kinds = np.array([e.kind for e in examples])
    pos = labels == 1
    return {
        "n": len(examples),
        "positives": int(pos.sum()),
        "auroc": auroc(scores, labels),
        "accuracy": float(((scores >= 0.5) == pos).mean()),
        "ece": expected_calibration_error(scores, labels),
        "auroc_per_type": {k: auroc(np.concatenate([scores[pos], scores[kinds == k]]),
                                    np.concatenate([labels[pos], labels[kinds == k]]))
                           for k in sorted(set(kinds) - {"expert"})},
        "mean_score": {k: float(scores[kinds == k].mean()) for k in sorted(set(kinds))},
    }


def plot_histogram(scores: np.ndarray, examples: list[Example], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = np.array([e.kind for e in examples])
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for kind in ["expert"] + sorted(set(kinds) - {"expert"}):
        ax.hist(scores[kinds == kind], bins=40, range=(0, 1), histtype="step", density=True,
                linewidth=2.5 if kind == "expert" else 1.2, label=f"{kind} ({(kinds == kind).sum()})")
    ax.set_xlabel("D(x, y)")
    ax.set_ylabel("density")
    ax.set_title("held-out discriminator scores")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_report(report: dict) -> str:
    held = report["heldout"]
    split = report.get("split", "held-out")
    lines = [f"discriminator {report['variant']} on {report['encoder']}: {held['n']} {split} examples "
             f"({held['positives']} experts)",
             f"  AUROC {held['auroc']:.3f}   accuracy {held['accuracy']:.3f}   ECE {held['ece']:.3f}"]
    if "train" in report:
        train = report["train"]
        lines.append(f"  train AUROC {train['auroc']:.3f}, accuracy {train['accuracy']:.3f}")
    lines.append("  per negative type: AUROC vs experts, mean D")
    for kind, value in held["auroc_per_type"].items():
        lines.append(f"    {kind:20s} {value:.3f}   {held['mean_score'][kind]:.3f}")
    lines.append(f"    {'expert':20s}   -     {held['mean_score']['expert']:.3f}")
    for reason, count in report["left_out"].items():
        lines.append(f"  left out: {reason}: {count}")
    return "\n".join(lines)


def evaluate_discriminator(disc: Discriminator, examples: list[Example], out_dir: str | Path | None = None,
                           ) -> tuple[dict, np.ndarray]:
    """Score labelled examples; returns the held-out metrics and the scores (histogram PNG in out_dir)."""
    scores = disc.score_features(compute_features(disc, examples)).cpu().numpy()
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        plot_histogram(scores, examples, Path(out_dir) / "scores_hist.png")
    return metrics(scores, examples), scores


def train_discriminator(disc: Discriminator, bank: ExpertBank, rollouts: list[tuple[str, str]],
                        out_dir: str | Path, *, heldout: float = 0.2, generic: bool = True, seed: int = 0,
                        steps: int = 600, lr: float = 3e-3, left_out: dict | None = None,
                        skipped_rows: list[str] = ()) -> dict:
    """Fit the head (nothing to fit for cosine), evaluate on held-out prompts, save weights and report
    (with `skipped_rows`: the input rows left out, each with its file, row and reason)."""
    held_prompts = heldout_prompts(bank, heldout, seed)
    examples, dropped = build_examples(bank, rollouts, disc.variant, generic=generic, seed=seed,
                                       held=held_prompts)
    train = [e for e in examples if e.prompt not in held_prompts]
    held = [e for e in examples if e.prompt in held_prompts]
    if not any(e.label == 0 for e in train):  # a head fit on experts alone scores everything alike
        raise DataError(f"no negatives among the {len({e.prompt for e in train})} training prompts: give "
                        "reference rollouts for them, or keep the generic negatives")
    report = {"variant": disc.variant, "encoder": disc.encoder.spec,
              "examples": {"train": len(train), "heldout": len(held),
                           "per_type": dict(Counter(e.kind for e in examples))},
              "left_out": {**(left_out or {}), **dropped}, "skipped_rows": list(skipped_rows)}
    if disc.trainable:
        features = compute_features(disc, train)
        fit_head(disc, features, torch.tensor([e.label for e in train]), steps=steps, lr=lr, seed=seed)
        train_scores = disc.score_features(features).cpu().numpy()
        labels = np.array([e.label for e in train])
        report["train"] = {"auroc": auroc(train_scores, labels),
                           "accuracy": float(((train_scores >= 0.5) == labels).mean())}
    report["heldout"], _ = evaluate_discriminator(disc, held, out_dir)
    disc.save(out_dir, report)
    (Path(out_dir) / "report.txt").write_text(format_report(report) + "\n")
    return report


def write_scores(path: str | Path, examples: list[Example], scores: np.ndarray) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for e, s in zip(examples, scores, strict=True):
            f.write(json.dumps({"prompt": e.prompt, "response": e.response, "kind": e.kind,
                                "score": float(s)}, ensure_ascii=False) + "\n")
