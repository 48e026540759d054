"""The code of `make example-real` (docs/real-model.md) on small stand-ins: its two RL recipes, the held-out
eval's experts and IFEval accuracies, and its summary. The real model itself is tests/test_real_model.py's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from aapa_rl.local.evaluation import correctness, evaluate
from aapa_rl.local.policy import load_policy, load_tokenizer
from aapa_rl.local.real_summary import main
from aapa_rl.local.recipe import load_recipe, recipe_dict
from reward_fns.ifeval import batch_reward

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
NO_COMMA = {"instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}
TWO = {"instruction_id_list": ["punctuation:no_comma", "change_case:english_lowercase"], "kwargs": [{}, {}]}


def test_the_two_runs_share_everything_but_the_aapa_terms(tmp_path):
    files = {"model.path": tmp_path / "model", "aapa.discriminator": tmp_path / "disc"}
    for key in ("data.train", "data.eval", "aapa.expert_bank"):
        files[key] = tmp_path / f"{key}.jsonl"
    for path in files.values():
        path.mkdir() if path.suffix == "" else path.write_text("")
    sets = [f"{key}={path}" for key, path in files.items()]
    grpo, aapa = (
        recipe_dict(load_recipe(CONFIGS / f"real-{name}.yaml", sets)) for name in ("grpo", "grpo-aapa")
    )
    assert grpo.pop("out") == "runs/real/grpo" and aapa.pop("out") == "runs/real/grpo-aapa"
    grpo_stages, aapa_stages = grpo["aapa"].pop("stages"), aapa["aapa"].pop("stages")
    assert aapa["aapa"].pop("shaping_floor") == -2.0 and grpo["aapa"].pop("shaping_floor") is None
    assert grpo == aapa  # same start, seed, data, rollouts, optimiser and discriminator
    assert [(s["lam"], s["alpha"]) for s in grpo_stages] == [(0.0, 0.0)]  # the baseline only monitors D
    assert [(s["lam"], s["alpha"], s["rho"]) for s in aapa_stages] == [(0.5, 0.5, 0.25)]


def test_the_held_out_experts_come_from_the_labels_and_accuracy_is_prompt_level():
    tokenizer = load_tokenizer("char")
    rows = [  # as prepare-data writes them: the expert inside the label, or null without one
        {"prompt": "Say hi: ", "label": {**TWO, "prompt": "Say hi: ", "expert": "hi there"}},
        {"prompt": "Say yo: ", "label": {**NO_COMMA, "prompt": "Say yo: ", "expert": None}},
    ]
    _, records = evaluate(load_policy(None, tokenizer), tokenizer, rows, batch_reward, max_new_tokens=4)
    assert records[0]["expert_nll_token"] > 0 and "expert_nll_token" not in records[1]
    assert [r["correct"] for r in records] == [r["reward/ifeval_strict_prompt"] for r in records]
    # Half the instructions followed is a reward of 0.5 but not a correct response.
    fraction, every = torch.tensor([0.5, 1.0]), torch.tensor([0.0, 1.0])
    extras = {"ifeval_strict_instruction": fraction, "ifeval_strict_prompt": every}
    assert correctness(fraction, extras).tolist() == [0.0, 1.0]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _records(instruction: list[float], prompt: list[float]) -> list[dict]:
    """Held-out records: the first prompt has two instructions, the others one."""
    return [
        {"label": TWO if i == 0 else NO_COMMA, "reward/ifeval_strict_instruction": a,
         "reward/ifeval_strict_prompt": p, "length": 10.0, "truncated": 0.0, "expert_nll_token": 1.0,
         "d_response": 0.5, "d_expert": 0.9}
        for i, (a, p) in enumerate(zip(instruction, prompt, strict=True))
    ]


def _example(out: Path) -> None:
    (out / "experts").mkdir(parents=True)
    (out / "experts" / "train.report.json").write_text(
        json.dumps({"verified_prompts": 3, "prompts": 8, "coverage": 0.375, "samples": 32})
    )
    per_type = {"rollout": 0.6, "truncated": 0.95}
    disc = {"heldout": {"n": 5, "positives": 2, "auroc": 0.9, "auroc_per_type": per_type}}
    (out / "disc" / "minilm-pairwise").mkdir(parents=True)
    (out / "disc" / "minilm-pairwise" / "report.json").write_text(json.dumps(disc))
    _write_jsonl(out / "start" / "eval.jsonl", _records([0.5, 1.0], [0.0, 1.0]))
    for run in ("grpo", "grpo-aapa"):
        (out / run).mkdir()
        (out / run / "summary.json").write_text(json.dumps({"steps": 2, "train_seconds": 12.0}))
        _write_jsonl(out / run / "eval" / "step_000002.jsonl", _records([1.0, 1.0], [1.0, 1.0]))
        _write_jsonl(out / run / "metrics.jsonl", [{"step": s, "reward/raw": 0.5 + s / 10} for s in range(2)])


def test_summary_tables_the_discriminators_and_the_three_models(tmp_path, capsys):
    _example(tmp_path)
    assert main(["--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    # IFEval's instruction level counts instructions: 1 + 1 of 3 followed (a mean over prompts gives 0.75).
    assert summary["eval"]["start"]["instruction_level"] == pytest.approx(2 / 3)
    assert summary["eval"]["start"]["prompt_level"] == 0.5 and summary["eval"]["GRPO"]["prompt_level"] == 1.0
    assert summary["discriminators"]["minilm-pairwise"] == {"all": 0.9, "rollout": 0.6, "truncated": 0.95}
    text = (tmp_path / "summary.md").read_text()
    assert "3 of 8 prompts (38%) have a sample that follows every instruction" in text
    assert "GRPO + AAPA - start" in text and "(minilm-pairwise: 2 experts and 3 negatives;" in text
    assert (tmp_path / "plots" / "compare_reward.png").exists()
    assert text in capsys.readouterr().out


def test_summary_names_an_unfinished_run_and_a_bad_record(tmp_path, capsys):
    _example(tmp_path)
    (tmp_path / "grpo-aapa" / "summary.json").unlink()
    assert main(["--out", str(tmp_path)]) == 2
    assert "grpo-aapa: no summary.json, the run has not finished" in capsys.readouterr().err
    _write_jsonl(tmp_path / "start" / "eval.jsonl", [{"label": "2", "reward": 1.0}])
    assert main(["--out", str(tmp_path)]) == 2
    assert "start/eval.jsonl: row 1: field 'label': not an IFEval record" in capsys.readouterr().err


def test_a_cut_off_eval_file_is_a_named_error(tmp_path):
    from aapa_rl.data.rows import DataError
    from aapa_rl.local.real_summary import read_jsonl

    path = tmp_path / "eval.jsonl"
    path.write_text('{"label": {"instruction_id_list": []}}\n{"label": {"instr')
    with pytest.raises(DataError, match=r"eval.jsonl: row 2: not valid JSON"):
        read_jsonl(path)


@pytest.mark.parametrize("name", ["disc/minilm-pairwise/report.json", "grpo/summary.json",
                                  "experts/train.report.json"])
def test_summary_names_a_malformed_json_file(tmp_path, capsys, name):
    _example(tmp_path)
    (tmp_path / name).write_text('{"heldout": {"n": 5')  # cut off by a killed run
    assert main(["--out", str(tmp_path)]) == 2
    assert f"error: {tmp_path / name}: not valid JSON (" in capsys.readouterr().err
    (tmp_path / name).write_text("{}")
    assert main(["--out", str(tmp_path)]) == 2
    assert f"error: {tmp_path / name}: field " in capsys.readouterr().err
    if name.endswith("report.json") and "disc" in name:  # a field it reads inside the held-out report
        (tmp_path / name).write_text('{"heldout": {}}')
        assert main(["--out", str(tmp_path)]) == 2
        assert f"error: {tmp_path / name}: field 'heldout.auroc': missing" in capsys.readouterr().err


def test_docs_quote_the_committed_real_model_bench_output():
    """docs/real-model.md's bench block is bench/real_model.py's committed printout, no numbers of its own."""
    root = CONFIGS.parent
    doc = (root / "docs" / "real-model.md").read_text()
    printout = (root / "bench" / "results" / "real-model-xeon.txt").read_text().splitlines()
    block = doc.split("(../bench/results/real-model-xeon.txt):", 1)[1].split("```")[1]
    assert block.strip().splitlines() == [line for line in printout if not line.startswith("#")]
