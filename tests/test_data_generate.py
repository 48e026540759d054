"""`aapa-rl generate`: CPU path on a tiny Qwen3, resume after an interrupted run, chat templates, recipes,
and the arguments the vLLM adapter passes (vllm's LLM class stubbed here only)."""

from __future__ import annotations

import json
import sys
import types
from collections import Counter
from pathlib import Path

import pytest
import torch

from aapa_rl.cli import main
from aapa_rl.data import generate as gen
from aapa_rl.data.rows import DataError, prompt_id

# A Qwen3-style template: the thinking switch inserts an empty think block, as Qwen3's own does.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
    "{% endif %}"
)
PROMPTS = ["Q: 12+34=?\nA: ", "Q: 50-7=?\nA: ", "Q: 21*3=?\nA: ", "Q: 99+1=?\nA: ", "Q: 40-40=?\nA: "]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from aapa_rl.local.task import char_tokenizer, tiny_qwen3

    torch.set_num_threads(1)
    path = tmp_path_factory.mktemp("tiny_model")
    tokenizer = char_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(path)
    tiny_qwen3(len(tokenizer), seed=0).save_pretrained(path)
    return path


@pytest.fixture
def prompt_file(tmp_path) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"problem": p, "uid": f"p{i}"}) + "\n" for i, p in enumerate(PROMPTS)))
    return path


def _run(model_dir: Path, prompt_file: Path, output: Path, *extra: str) -> int:
    return main(
        [
            "generate",
            "--model",
            str(model_dir),
            "--prompts",
            str(prompt_file),
            "--output",
            str(output),
            "--prompt-key",
            "problem",
            "--id-key",
            "uid",
            "--engine",
            "hf",
            "--no-chat-template",
            "-n",
            "2",
            "--max-new-tokens",
            "6",
            "--batch-size",
            "2",
            "--seed",
            "3",
            *extra,
        ]
    )


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_generate_on_tiny_model_writes_k_samples_per_prompt(model_dir, prompt_file, tmp_path):
    out = tmp_path / "samples.jsonl"
    assert _run(model_dir, prompt_file, out) == 0
    rows = _rows(out)
    assert Counter(r["id"] for r in rows) == {f"p{i}": 2 for i in range(len(PROMPTS))}
    for row in rows:
        assert set(row) == {"id", "prompt", "response", "model", "params"}
        assert row["prompt"] == PROMPTS[int(row["id"][1:])]
        assert isinstance(row["response"], str)
        assert row["model"] == str(model_dir)
        assert row["params"] == {
            "n": 2,
            "temperature": 1.0,
            "top_p": 1.0,
            "top_k": -1,
            "max_new_tokens": 6,
            "seed": 3,
            "chat_template": False,
            "enable_thinking": None,
            "engine": "hf",
        }
    # Sampled, not greedy: a random tiny model gives varied 6-token continuations.
    assert len({r["response"] for r in rows}) > 1
    # Rerunning finds everything done and samples nothing.
    before = out.read_bytes()
    assert _run(model_dir, prompt_file, out) == 0
    assert out.read_bytes() == before


def test_resume_after_interrupted_run(model_dir, prompt_file, tmp_path, monkeypatch):
    out = tmp_path / "samples.jsonl"
    real_generate = gen.TransformersEngine.generate
    calls: list[int] = []

    def killed_after_first_batch(self, prompt_ids):
        calls.append(len(prompt_ids))
        if len(calls) == 2:
            raise KeyboardInterrupt  # the run dies while the second batch is in flight
        return real_generate(self, prompt_ids)

    monkeypatch.setattr(gen.TransformersEngine, "generate", killed_after_first_batch)
    with pytest.raises(KeyboardInterrupt):
        _run(model_dir, prompt_file, out)
    first = _rows(out)
    assert Counter(r["id"] for r in first) == {"p0": 2, "p1": 2}  # only the in-flight batch was lost

    # A kill in the middle of a batch write: one complete row of p2 and a cut-off line.
    partial = dict(first[0], id="p2", prompt=PROMPTS[2], response="PARTIAL")
    with out.open("a") as fh:
        fh.write(json.dumps(partial) + "\n" + json.dumps(partial)[:25])

    calls.clear()
    monkeypatch.setattr(
        gen.TransformersEngine,
        "generate",
        lambda self, ids: calls.append(len(ids)) or real_generate(self, ids),
    )
    assert _run(model_dir, prompt_file, out) == 0
    assert calls == [2, 1]  # only p2, p3, p4 were sampled again
    rows = _rows(out)
    assert Counter(r["id"] for r in rows) == {f"p{i}": 2 for i in range(len(PROMPTS))}
    assert rows[:4] == first  # finished batches are kept as they were
    assert all(r["response"] != "PARTIAL" for r in rows)


def test_resume_refuses_other_settings(model_dir, prompt_file, tmp_path, capsys):
    out = tmp_path / "samples.jsonl"
    out.write_text(
        json.dumps(
            {
                "id": "p0",
                "prompt": PROMPTS[0],
                "response": "x",
                "model": str(model_dir),
                "params": {"n": 2, "temperature": 0.5},
            }
        )
        + "\n"
    )
    assert _run(model_dir, prompt_file, out) == 2
    err = capsys.readouterr().err
    assert f"{out}: row 1: field 'params'" in err and "temperature" in err


def test_chat_template_and_thinking_switch(model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    [default], [no_think], [raw] = (
        gen.render_prompts(tokenizer, ["hi"], chat, thinking)
        for chat, thinking in [(True, None), (True, False), (False, None)]
    )
    assert tokenizer.decode(default) == "<|user|>hi\n<|assistant|>"
    assert tokenizer.decode(no_think) == "<|user|>hi\n<|assistant|><think>\n\n</think>\n\n"
    assert tokenizer.decode(raw) == "hi"
    tokenizer.chat_template = None
    with pytest.raises(DataError, match="no chat template; pass --no-chat-template"):
        gen.render_prompts(tokenizer, ["hi"], True, None)


def test_recipe_then_flags(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "generate:\n  n: 4\n  temperature: 0.6\n  top_k: 20\n  enable_thinking: false\n  batch_size: 8\n"
    )
    params = gen.sampling_params({"temperature": 0.9, "max_new_tokens": None}, str(recipe))
    assert params == {
        "n": 4,
        "temperature": 0.9,
        "top_p": 1.0,
        "top_k": 20,
        "max_new_tokens": 1024,
        "seed": 0,
        "chat_template": True,
        "enable_thinking": False,
        "batch_size": 8,
    }
    recipe.write_text("n: 2\ntemprature: 0.6\n")
    with pytest.raises(DataError, match="key 'temprature': unknown"):
        gen.sampling_params({}, str(recipe))
    recipe.write_text("n: true\n")
    with pytest.raises(DataError, match="key 'n': expected int, got bool"):
        gen.sampling_params({}, str(recipe))
    with pytest.raises(DataError, match="n > 1 needs temperature > 0"):
        gen.sampling_params({"n": 3, "temperature": 0.0}, None)


@pytest.mark.parametrize(
    "flags, message",
    [
        ({"temperature": -1.0, "n": 2}, r"temperature must be >= 0 \(0 is greedy\), got -1.0"),
        ({"temperature": -0.5}, "temperature must be >= 0"),  # not greedy decoding in disguise
        ({"temperature": float("nan")}, "temperature must be >= 0"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\], got 0.0"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\], got 1.5"),
        ({"batch_size": 0}, "batch_size must be >= 1, got 0"),  # not the default 32
        ({"top_k": 0}, r"top_k must be -1 \(off\) or >= 1, got 0"),  # off for transformers, not for vLLM
        ({"top_k": -5}, r"top_k must be -1 \(off\) or >= 1, got -5"),
    ],
)
def test_out_of_range_sampling_values_are_named(flags, message):
    with pytest.raises(DataError, match=message):
        gen.sampling_params(flags, None)


def test_negative_temperature_stops_before_loading_the_model(model_dir, prompt_file, tmp_path, capsys):
    assert _run(model_dir, prompt_file, tmp_path / "samples.jsonl", "--temperature", "-1") == 2
    assert "error: temperature must be >= 0 (0 is greedy), got -1.0" in capsys.readouterr().err


def test_vllm_adapter_arguments(model_dir, prompt_file, tmp_path, monkeypatch):
    """The vLLM branch gets the same token ids as the transformers one and the flags' sampling params."""
    seen: dict = {}

    class FakeLLM:
        def __init__(self, **kwargs):
            seen["llm"] = kwargs

        def generate(self, prompts, sampling_params, use_tqdm=True):
            seen.setdefault("prompts", []).extend(prompts)
            seen["use_tqdm"] = use_tqdm
            n = sampling_params.kwargs["n"]
            return [
                types.SimpleNamespace(outputs=[types.SimpleNamespace(text=f"out{k}") for k in range(n)])
                for _ in prompts
            ]

    class FakeSamplingParams:
        def __init__(self, **kwargs):
            self.kwargs = kwargs
            seen["sampling"] = kwargs

    monkeypatch.setitem(
        sys.modules, "vllm", types.SimpleNamespace(LLM=FakeLLM, SamplingParams=FakeSamplingParams)
    )
    out = tmp_path / "samples.jsonl"
    assert (
        main(
            [
                "generate",
                "--model",
                str(model_dir),
                "--prompts",
                str(prompt_file),
                "--output",
                str(out),
                "--prompt-key",
                "problem",
                "--engine",
                "vllm",
                "-n",
                "3",
                "--temperature",
                "0.7",
                "--top-p",
                "0.9",
                "--top-k",
                "20",
                "--max-new-tokens",
                "16",
                "--seed",
                "5",
                "--tensor-parallel-size",
                "2",
                "--no-enable-thinking",
                "--batch-size",
                "4",
            ]
        )
        == 0
    )

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert seen["llm"] == {
        "model": str(model_dir),
        "tokenizer": str(model_dir),
        "seed": 5,
        "tensor_parallel_size": 2,
    }
    assert seen["sampling"] == {"n": 3, "temperature": 0.7, "top_p": 0.9, "top_k": 20, "max_tokens": 16}
    expected_ids = gen.render_prompts(tokenizer, PROMPTS, True, False)
    assert seen["prompts"] == [{"prompt_token_ids": ids} for ids in expected_ids]
    assert seen["use_tqdm"] is False
    assert tokenizer.decode(expected_ids[0]).endswith("<|assistant|><think>\n\n</think>\n\n")
    rows = _rows(out)
    assert [r["id"] for r in rows] == [prompt_id(p) for p in PROMPTS for _ in range(3)]
    assert [r["response"] for r in rows[:3]] == ["out0", "out1", "out2"]
    assert rows[0]["params"]["engine"] == "vllm" and rows[0]["params"]["enable_thinking"] is False


def test_auto_engine_is_transformers_without_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gen.pick_engine("auto") == "hf"
    assert gen.pick_engine("vllm") == "vllm"


@pytest.mark.parametrize("tail", [b"", b'{"id": "p2", "prompt": "caf\xc3'])
def test_resume_drops_an_unterminated_last_line(model_dir, prompt_file, tmp_path, tail):
    out = tmp_path / "samples.jsonl"
    assert _run(model_dir, prompt_file, out) == 0
    done = out.read_bytes().split(b"\n")[:4]  # p0 and p1, both samples
    # b"": a complete last row whose newline was lost; else a row cut inside a multi-byte character.
    out.write_bytes(b"\n".join(done) + (b"\n" + tail if tail else b""))
    assert _run(model_dir, prompt_file, out) == 0
    assert out.read_bytes().endswith(b"\n")
    assert Counter(r["id"] for r in _rows(out)) == {f"p{i}": 2 for i in range(len(PROMPTS))}


def test_missing_model_and_bad_recipe_are_named(model_dir, prompt_file, tmp_path, capsys):
    out = tmp_path / "samples.jsonl"
    assert _run(tmp_path / "nope", prompt_file, out) == 2
    assert f"error: --model {tmp_path / 'nope'}: no such model directory" in capsys.readouterr().err
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("n: [1\n")
    assert _run(model_dir, prompt_file, out, "--recipe", str(recipe)) == 2
    assert f"error: {recipe}: not valid YAML" in capsys.readouterr().err
    assert _run(model_dir, prompt_file, out, "--recipe", str(tmp_path / "nope.yaml")) == 2
    assert "nope.yaml" in capsys.readouterr().err
