"""Launching: the module entry runs OpenRLHF's real train_ppo_ray up to GPU setup; recipes, dry runs."""

from __future__ import annotations

import json
import os
import re
import runpy
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import openrlhf.utils
import pytest
import ray
import torch
import yaml
from openrlhf.datasets.utils import blending_datasets
from openrlhf.trainer import ppo_trainer
from openrlhf.trainer.ray import ppo_actor
from openrlhf.utils import config
from test_openrlhf_driver import save_discriminator

from aapa_rl import cli
from aapa_rl.anchor import ExpertBank, label_expert
from aapa_rl.local.task import expert_for, prompt_for
from aapa_rl.openrlhf_adapter import launch
from aapa_rl.openrlhf_adapter.ppo_actor import AapaPolicyModelActor
from aapa_rl.openrlhf_adapter.ppo_trainer import AapaPPOTrainer
from aapa_rl.openrlhf_adapter.recipe import DEFAULTS, LAUNCH_MODULE, RecipeError, command, openrlhf_flags
from aapa_rl.openrlhf_adapter.settings import split_argv

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted(REPO.glob("configs/qwen3-*.yaml"))
TWO_NODES = ["--actor.num_nodes", "2", "--ref.num_nodes", "2", "--vllm.num_engines", "16"]


class StoppedBeforeGPU(Exception):
    pass


@pytest.fixture
def stop_at_strategy(monkeypatch):
    """Run train_ppo_ray for real up to `get_strategy`, its first GPU-bound step, and record what it saw."""
    seen = {}

    def get_strategy(args):
        main = sys.modules["__main__"]  # runpy's namespace for train_ppo_ray while it runs
        seen.update(args=args, argv=list(sys.argv), policy_actor=main.PolicyModelActor)
        raise StoppedBeforeGPU

    monkeypatch.setattr(ray, "is_initialized", lambda: True)  # train() would otherwise start a Ray cluster
    monkeypatch.setattr(openrlhf.utils, "get_strategy", get_strategy)
    patched = ((config, "hierarchize"), (ppo_actor, "PolicyModelActor"), (ppo_trainer, "PPOTrainer"))
    for module, name in patched:
        monkeypatch.setattr(module, name, getattr(module, name))  # restored after the test
    monkeypatch.setattr(sys, "argv", ["launch"])
    return seen


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The files the recipes read, as aapa-rl prepare-data writes them, plus a discriminator directory."""
    root = tmp_path_factory.mktemp("data")
    rows = [{"id": f"p{i}", "prompt": prompt_for(10 + i, "+", 20), "expert": expert_for(10 + i, "+", 20)}
            for i in range(6)]
    for name in ("train", "eval"):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(
            {"id": r["id"], "prompt": r["prompt"], "label": {"answer": "x", "expert": r["expert"]}}) + "\n"
            for r in rows))
    (root / "experts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    save_discriminator(root / "disc")
    return root


def data_flags(root: Path, aapa: bool = True) -> list[str]:
    flags = ["--data.prompt_dataset", str(root / "train.jsonl"), "--eval.dataset", str(root / "eval.jsonl")]
    if aapa:
        flags += ["--aapa.discriminator", str(root / "disc"),
                  "--aapa.expert_bank", str(root / "experts.jsonl")]
    return flags


BASE = ["--actor.model_name_or_path", "Qwen/Qwen3-0.6B", "--reward.remote_url", "reward_fns/math.py",
        "--vllm.num_engines", "1", "--algo.advantage.estimator", "group_norm",
        "--rollout.n_samples_per_prompt", "4"]


def aapa_flags(root: Path, stages=None) -> list[str]:
    stages = stages or [{"end_step": 10, "objective": "grpo", "lam": 0.5, "alpha": 0.1, "rho": 0.25}]
    return ["--aapa.discriminator", str(root / "disc"), "--aapa.stages", json.dumps(stages)]


def test_module_entry_strips_aapa_flags_attaches_them_and_injects_classes(stop_at_strategy, data):
    argv = [*BASE[:6], "--aapa.temperature", "0.5", *BASE[6:], *aapa_flags(data), "--aapa.anchor_phi"]
    with pytest.raises(StoppedBeforeGPU):
        launch.main(argv)
    args, seen_argv = stop_at_strategy["args"], stop_at_strategy["argv"]
    assert not [a for a in seen_argv if a.startswith("--aapa")] and "--actor.model_name_or_path" in seen_argv
    assert args.aapa.temperature == 0.5 and args.aapa.anchor_phi is True
    assert args.aapa.stages[0].objective == "grpo" and args.aapa.discriminator == str(data / "disc")
    assert args.aapa_score_on == "actors"
    assert args.actor.model_name_or_path == "Qwen/Qwen3-0.6B"
    assert args.reward.remote_url == ["reward_fns/math.py"]
    assert args.rollout.n_samples_per_prompt == 4  # OpenRLHF's own parsing and fix-ups ran
    assert stop_at_strategy["policy_actor"] is AapaPolicyModelActor  # the class train() will build
    assert ppo_actor.PolicyModelActor is AapaPolicyModelActor and ppo_trainer.PPOTrainer is AapaPPOTrainer

    # What the dry run assumes about OpenRLHF's parser: its flag names and defaults.
    flat = {}

    def walk(node, prefix=""):
        for key, value in vars(node).items():
            if hasattr(value, "__dict__") and not callable(value):
                walk(value, f"{prefix}{key}.")
            else:
                flat[f"{prefix}{key}"] = value

    walk(args)
    flat = {k: v for k, v in flat.items() if not k.startswith("aapa")}
    flags = openrlhf_flags()
    assert set(flat) - {"local_rank", "use_ms"} <= set(flags)
    assert set(flags) - set(flat) == {"actor.muon.no_nesterov", "critic.muon.no_nesterov"}
    assert flags["actor.muon.nesterov"]["default"] is flat["actor.muon.nesterov"] is True
    given = {"actor.model_name_or_path", "reward.remote_url", "vllm.num_engines", "algo.advantage.estimator",
             "rollout.n_samples_per_prompt"}
    defaults = {k: v for k, v in DEFAULTS.items() if k not in given}
    assert {k: flat[k] for k in defaults} == defaults


REFUSED = [("--train.async_enable", None), ("--train.dynamic_batch_enable", None),
           ("--ds.ring_attn_size", "2"), ("--ds.tensor_parallel_size", "2")]


@pytest.mark.parametrize("flag, value", REFUSED)
def test_unsupported_modes_are_refused_before_gpu_work(stop_at_strategy, data, flag, value):
    argv = [*BASE, *aapa_flags(data), flag, *([value] if value else [])]
    with pytest.raises(SystemExit, match=f"{flag} is not supported with AAPA"):
        launch.main(argv)
    assert "args" not in stop_at_strategy


@pytest.mark.parametrize("estimator", ["reinforce", "flash_reinforce", "gae"])
def test_an_sft_stage_needs_a_group_estimator(stop_at_strategy, data, monkeypatch, capsys, estimator):
    """The SFT stage's reward alpha * g(D) needs a group-mean baseline: reinforce whitens it over the batch
    (alpha then has no effect), flash_reinforce uses the batch mean, gae a critic. Refused when launching and
    in the dry run; a stage list without an sft stage keeps the estimator."""
    sft = [{"end_step": 2, "objective": "sft", "lam": 1.0, "alpha": 0.1, "rho": 0.25},
           {"end_step": 10, "objective": "grpo", "lam": 0.5, "alpha": 0.1, "rho": 0.25}]
    flag = ["--algo.advantage.estimator", estimator]
    expected = f"--algo.advantage.estimator {estimator} is not supported with an AAPA sft stage " \
        "(--aapa.stages[0])"
    with pytest.raises(SystemExit, match=re.escape(expected)):
        launch.main([*BASE, *aapa_flags(data, sft), *flag])
    assert "args" not in stop_at_strategy

    monkeypatch.chdir(REPO)
    recipe = REPO / "configs" / "qwen3-0.6b-staged-aapa.yaml"
    assert cli.main(["launch", "--config", str(recipe), "--dry-run", "--", *data_flags(data), *flag]) == 1
    fails = [line for line in capsys.readouterr().out.splitlines() if line.startswith("  FAIL")]
    assert len(fails) == 1 and expected in fails[0], fails

    with pytest.raises(StoppedBeforeGPU):
        launch.main([*BASE, *aapa_flags(data), *flag])


def test_resuming_with_other_stages_is_refused_before_any_model_loads(stop_at_strategy, data, monkeypatch,
                                                                      capsys, tmp_path):
    """The stage list is checked against the checkpoint OpenRLHF would resume (DeepSpeed's `latest` tag under
    --ckpt.path/_actor) by the dry run and by the launcher before GPU work, not after the models load."""
    saved_stages = [{"end_step": 5, "objective": "grpo", "lam": 0.5, "alpha": 0.1, "rho": 0.25}]
    saved = split_argv(aapa_flags(data, saved_stages))[0].schedule().state_dict()
    checkpoint = tmp_path / "ckpt" / "_actor"
    (checkpoint / "global_step3").mkdir(parents=True)
    (checkpoint / "latest").write_text("global_step3")
    torch.save({"module": {"weight": torch.zeros(3)}, "global_step": 3, "dp_world_size": 8,
                "aapa": {"schedule": saved, "counters": {}, "discriminator": str(data / "disc")}},
               checkpoint / "global_step3" / "mp_rank_00_model_states.pt")
    resume = ["--ckpt.path", str(tmp_path / "ckpt"), "--ckpt.load_enable"]
    refusal = f"--aapa.stages differs from the stage list saved in the checkpoint {checkpoint} "
    with pytest.raises(SystemExit) as stopped:
        launch.main([*BASE, *aapa_flags(data), *resume])
    assert refusal in str(stopped.value) and f"saved: {json.dumps(saved['stages'])}" in str(stopped.value)
    assert "args" not in stop_at_strategy

    monkeypatch.chdir(REPO)
    recipe = REPO / "configs" / "qwen3-0.6b-grpo-aapa.yaml"
    assert cli.main(["launch", "--config", str(recipe), "--dry-run", "--", *data_flags(data), *resume]) == 1
    fails = [line for line in capsys.readouterr().out.splitlines() if line.startswith("  FAIL")]
    assert len(fails) == 1 and refusal in fails[0], fails

    with pytest.raises(StoppedBeforeGPU):  # the saved list resumes; so does a path without a checkpoint
        launch.main([*BASE, *aapa_flags(data, saved_stages), *resume])
    # Written by 8 ranks: DeepSpeed would refuse its ZeRO optimizer state on 16, after the models load.
    ranks = f"checkpoint {checkpoint / 'global_step3'} was written by 8 policy ranks and this layout has 16"
    with pytest.raises(SystemExit, match=re.escape(ranks)):
        launch.main([*BASE, *aapa_flags(data, saved_stages), *resume, *TWO_NODES])
    with pytest.raises(StoppedBeforeGPU):
        launch.main([*BASE, *aapa_flags(data), "--ckpt.path", str(tmp_path / "none"), "--ckpt.load_enable"])


def test_bad_aapa_settings_stop_the_launcher(stop_at_strategy, data, tmp_path):
    base = [*BASE, *aapa_flags(data)]
    with pytest.raises(SystemExit, match="unknown AAPA flag --aapa.lamda"):
        launch.main([*base, "--aapa.lamda", "1"])
    with pytest.raises(SystemExit, match="--aapa.anchor_phi takes no value .*, got 'false'"):
        launch.main([*base, "--aapa.anchor_phi", "false"])
    chord = [*aapa_flags(data, [{"end_step": 10, "objective": "chord", "lam": 0.5, "rho": 0.25}])]
    with pytest.raises(SystemExit, match=r"--aapa.chord: chord needs 0 <= valley <= peak <= 1"):
        launch.main([*BASE, *chord, "--aapa.chord", '{"peak": 2}'])
    with pytest.raises(SystemExit, match=r"--aapa: stages\[0\] has lam 0.5 but rho 0: no prompt can be"):
        launch.main([*BASE, *aapa_flags(data, [{"end_step": 5, "objective": "grpo", "lam": 0.5}])])
    with pytest.raises(SystemExit, match=r"--aapa: selection: 'best' is not one of"):
        launch.main([*base, "--aapa.selection", "best"])
    with pytest.raises(SystemExit, match=r"stages\[0\].*rho must be in \[0, 1\]"):
        launch.main([*BASE, *aapa_flags(data, [{"end_step": 5, "objective": "grpo", "rho": 2}])])
    weak = save_discriminator(tmp_path / "weak", auroc=0.52)
    with pytest.raises(SystemExit, match="held-out AUROC 0.520 < 0.6"):
        launch.main([*base, "--aapa.discriminator", weak])
    with pytest.raises(StoppedBeforeGPU):  # forced: goes on to OpenRLHF
        launch.main([*base, "--aapa.discriminator", weak, "--aapa.force_discriminator"])


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_recipes_dry_run_and_parse_with_openrlhf(recipe, data, stop_at_strategy, monkeypatch, capsys):
    monkeypatch.chdir(REPO)  # recipes name reward_fns/... relative to the checkout
    aapa = "aapa:" in recipe.read_text()
    for extra in ([], TWO_NODES):
        flags = [*data_flags(data, aapa), *extra]
        assert cli.main(["launch", "--config", str(recipe), "--dry-run", "--", *flags]) == 0
        out = capsys.readouterr().out
        cmd = command(recipe, flags)
        assert shlex.split(out[: out.index("\n  ok ")]) == cmd  # the printed command, pasteable as is
        assert f"layout: {16 if extra else 8} GPUs" in out and "FAIL" not in out
        # The same command through OpenRLHF's real parser and its own consistency asserts.
        monkeypatch.setattr(sys, "argv", ["train"])
        with pytest.raises(StoppedBeforeGPU):
            if cmd[2] == LAUNCH_MODULE:
                launch.main(cmd[3:])
            else:
                monkeypatch.setattr(sys, "argv", ["train", *cmd[3:]])
                runpy.run_module(cmd[2], run_name="__main__", alter_sys=True)
        args = stop_at_strategy.pop("args")
        assert args.actor.num_nodes == (2 if extra else 1) and hasattr(args, "aapa") == aapa


def test_dry_run_reports_each_problem(data, monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(REPO)
    recipe = REPO / "configs" / "qwen3-0.6b-grpo-aapa.yaml"
    bad_labels = tmp_path / "train.jsonl"
    rows = [{"prompt": prompt_for(10, "+", 20), "label": {"answer": "x", "id": "p0"}},  # expert from the bank
            {"prompt": prompt_for(11, "+", 20), "label": {"answer": "x", "expert": "no"}}]  # disagrees
    bad_labels.write_text("".join(json.dumps(row) + "\n" for row in rows))
    flags = [*data_flags(data), "--data.prompt_dataset", str(bad_labels), "--eval.dataset",
             "missing/eval.jsonl", "--train.batch_size", "100", "--train.async_enable",
             "--actor.learning_rate", "1e-6"]
    assert cli.main(["launch", "--config", str(recipe), "--dry-run", "--", *flags]) == 1
    fails = [line for line in capsys.readouterr().out.splitlines() if line.startswith("  FAIL")]
    expected = ["--actor.learning_rate is not a train_ppo_ray flag", "--train.async_enable is not supported",
                "--eval.dataset missing/eval.jsonl: no such file",
                "1 label experts differ from the expert bank",
                "--train.batch_size 100 must be a multiple of train.micro_batch_size x actor GPUs (4 x 8)",
                "must be a multiple of --train.batch_size 100"]
    for text in expected:
        assert sum(text in line for line in fails) == 1, (text, fails)
    assert len(fails) == len(expected)

    # Launching (not a dry run) refuses the same problems without starting anything.
    monkeypatch.setattr("subprocess.run", lambda cmd: pytest.fail("launched despite problems"))
    assert cli.main(["launch", "--config", str(recipe), "--", *flags]) == 1
    assert "not launching" in capsys.readouterr().out


def test_dry_run_checks_json_lines_labels_and_says_when_it_cannot(data, monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(REPO)
    recipe = str(REPO / "configs" / "qwen3-0.6b-grpo-aapa.yaml")
    rows = [{"prompt": prompt_for(11, "+", 20), "label": {"answer": "x", "expert": "no"}}]  # disagrees
    (tmp_path / "train.json").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (tmp_path / "train.csv").write_text("prompt,label\nq,x\n")
    for name, verdict in (("train.json", "  FAIL"), ("train.csv", "  ok")):
        flags = [*data_flags(data), "--data.prompt_dataset", str(tmp_path / name)]
        cli.main(["launch", "--config", recipe, "--dry-run", "--", *flags])
        out = capsys.readouterr().out
        expected = "1 label experts differ" if name.endswith(".json") else "rows not checked"
        assert any(line.startswith(verdict) and expected in line for line in out.splitlines()), out


@pytest.mark.parametrize("recipe", ["qwen3-0.6b-grpo-aapa", "qwen3-0.6b-grpo"])
def test_dry_run_checks_prompts_and_labels_as_the_other_backends_do(recipe, data, monkeypatch, capsys,
                                                                      tmp_path):
    """Each row needs a prompt at --data.input_key (else OpenRLHF trains on the text "None") and a label the
    reward reads (else its reward is silently 0), checked by the local and TRL backends' own functions; each
    problem names the file, the row and the field, with the count of rows like it."""
    monkeypatch.chdir(REPO)
    train = tmp_path / "train.jsonl"
    rows = [{"prompt": prompt_for(10, "+", 20), "label": {"answer": "x", "id": "p0"}},
            {"prompt": prompt_for(11, "+", 20), "label": {"id": "p1"}},  # reward_fns/math.py needs 'answer'
            {"question": prompt_for(12, "+", 20), "label": {"answer": "x", "id": "p2"}},
            {"prompt": "Unknown?", "label": {"answer": "x"}},  # AAPA: no expert in the label or the bank
            {"prompt": " ", "label": {"answer": "x", "id": "p4"}}]
    train.write_text("".join(json.dumps(row) + "\n" for row in rows))
    flags = [*data_flags(data, recipe.endswith("aapa")), "--data.prompt_dataset", str(train)]
    assert cli.main(["launch", "--config", f"configs/{recipe}.yaml", "--dry-run", "--", *flags]) == 1
    fails = [line for line in capsys.readouterr().out.splitlines() if line.startswith("  FAIL")]
    expected = ["2 bad rows: row 3: field 'prompt': missing; row 5: field 'prompt': empty text",
                "1 labels the reward reward_fns/math.py rejects: row 2: field 'label': missing field "
                "'answer' (label has fields ['id'])"]
    if recipe.endswith("aapa"):
        expected.append("1 rows have no expert (first: row 4): no label 'label' with an 'expert'")
    for text in expected:
        assert sum(line.startswith(f"  FAIL  {train} (5 rows): {text}") for line in fails) == 1, (text, fails)
    assert len(fails) == len(expected), fails


def test_dry_run_loads_the_reward_file_to_check_the_labels(data, monkeypatch, capsys, tmp_path):
    """A reward file is loaded as the other backends load it: one that cannot be loaded is a problem naming
    it, and one that trips on a label names the row. A reward server cannot check labels."""
    monkeypatch.chdir(REPO)
    broken, strict = tmp_path / "broken.py", tmp_path / "strict.py"
    broken.write_text("def reward_func(queries, prompts, labels):\n    pass\n\nraise RuntimeError('boom')\n")
    strict.write_text("def reward_func(queries, prompts, labels):\n"
                      "    return [float(label['answer'] in q) for q, label in zip(queries, labels)]\n")
    train = tmp_path / "train.jsonl"
    rows = [{"prompt": prompt_for(10, "+", 20), "label": {"answer": "x"}}, {"prompt": "Q?", "label": "x"}]
    train.write_text("".join(json.dumps(row) + "\n" for row in rows))
    server = "http://rm:5000/get_reward"
    verdicts = {broken: f"  FAIL  --reward.remote_url: {broken}: cannot be loaded: RuntimeError: boom",
                strict: f"  FAIL  {train} (2 rows): 1 labels the reward {strict} rejects: row 2: field "
                        f"'label': reward '{strict}' raised TypeError: string indices must be integers",
                server: f"  ok    --reward.remote_url {server}: a reward server (labels not checked)"}
    for url, verdict in verdicts.items():
        flags = [*data_flags(data, aapa=False), "--data.prompt_dataset", str(train), "--reward.remote_url",
                 str(url)]
        assert cli.main(["launch", "--config", "configs/qwen3-0.6b-grpo.yaml", "--dry-run", "--", *flags]) \
            == (url != server)
        out = capsys.readouterr().out.splitlines()
        assert any(line.startswith(verdict) for line in out), out
        assert sum(line.startswith("  FAIL") for line in out) == (url != server), out


def test_a_recipe_without_a_label_key_is_refused_when_the_reward_needs_labels(data, monkeypatch, capsys,
                                                                            tmp_path):
    """Without --data.label_key OpenRLHF gives every row the label "", and reward_fns/math.py would score
    every rollout 0 (logging an error per sample) for the whole run."""
    monkeypatch.chdir(REPO)
    recipe = yaml.safe_load((REPO / "configs" / "qwen3-0.6b-grpo.yaml").read_text())
    del recipe["openrlhf"]["data.label_key"]
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    flags = data_flags(data, aapa=False)
    assert cli.main(["launch", "--config", str(tmp_path / "recipe.yaml"), "--dry-run", "--", *flags]) == 1
    fails = [line for line in capsys.readouterr().out.splitlines() if line.startswith("  FAIL")]
    assert len(fails) == 2, fails  # the prompt and the eval dataset
    assert all("no --data.label_key, so OpenRLHF gives every row the label '', which the reward "
               "reward_fns/math.py rejects" in line for line in fails), fails
    assert cli.main(["launch", "--config", str(tmp_path / "recipe.yaml"), "--dry-run", "--", *flags,
                     "--data.label_key", "label"]) == 0


def test_dry_run_finds_experts_as_the_run_does(data, monkeypatch, capsys, tmp_path):
    """A label without an expert finds it in the bank by its id, its raw `prompt`, or else by the prompt
    OpenRLHF builds (after the recipe's input_template), as aapa_rl.anchor.label_expert does at run time."""
    monkeypatch.chdir(REPO)
    recipe = REPO / "configs" / "qwen3-0.6b-grpo-aapa.yaml"
    raw = prompt_for(10, "+", 20)
    template = yaml.safe_load(recipe.read_text())["openrlhf"]["data.input_template"]
    bank = ExpertBank.load(data / "experts.jsonl")
    labels = {"by id": {"answer": "x", "id": "p0"}, "by label prompt": {"answer": "x", "prompt": raw},
              "templated prompt only": {"answer": "x"}, "plain answer": "x"}
    for name, label in labels.items():
        (tmp_path / "train.jsonl").write_text(json.dumps({"prompt": raw, "label": label}) + "\n")
        flags = [*data_flags(data), "--data.prompt_dataset", str(tmp_path / "train.jsonl")]
        found = cli.main(["launch", "--config", str(recipe), "--dry-run", "--", *flags]) == 0
        out = capsys.readouterr().out
        assert found == (label_expert(label, template.format(raw), bank)[1] is not None), (name, out)
        assert found or "1 rows have no expert" in out and "after --data.input_template" in out, (name, out)
        assert found == name.startswith("by "), (name, out)


def test_output_root_keeps_run_outputs_out_of_rays_temporary_copy(data, monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(REPO)
    recipe = REPO / "configs" / "qwen3-0.6b-grpo-aapa.yaml"
    flags = [*data_flags(data), "--logger.tensorboard_dir=tb", "--ckpt.output_dir", "/abs/final"]
    cmd = command(recipe, flags, output_root=str(tmp_path))
    values = {t: cmd[i + 1] for i, t in enumerate(cmd) if t in ("--ckpt.path", "--ckpt.output_dir")}
    assert values["--ckpt.path"] == str(tmp_path / "runs/qwen3-0.6b-grpo-aapa/ckpt")
    assert cmd[cmd.index("--ckpt.output_dir", cmd.index("--ckpt.output_dir") + 1) + 1] == "/abs/final"
    assert f"--logger.tensorboard_dir={tmp_path / 'tb'}" in cmd
    # Ray's job supervisor sets this variable; the job then runs in a temporary copy of the working_dir.
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    assert cli.main(["launch", "--config", str(recipe), "--dry-run", "--", *data_flags(data)]) == 1
    fails = [line for line in capsys.readouterr().out.splitlines() if line.startswith("  FAIL")]
    assert len(fails) == 3 and all("Ray's temporary copy" in line for line in fails), fails
    args = ["launch", "--config", str(recipe), "--output-root", str(tmp_path), "--dry-run", "--"]
    assert cli.main([*args, *data_flags(data)]) == 0, capsys.readouterr().out


def recipe_without(tmp_path: Path, prefix: str) -> Path:
    """configs/qwen3-0.6b-grpo-aapa.yaml without its `prefix*` flags, so that OpenRLHF's defaults apply."""
    recipe = yaml.safe_load((REPO / "configs" / "qwen3-0.6b-grpo-aapa.yaml").read_text())
    recipe["openrlhf"] = {k: v for k, v in recipe["openrlhf"].items() if not k.startswith(prefix)}
    path = tmp_path / f"without-{prefix}yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_a_colocated_reference_model_takes_the_actors_layout_by_default(data, monkeypatch, capsys, tmp_path):
    """Without ref.* flags OpenRLHF's defaults (ints) meet the recipe's actor flags (strings)."""
    monkeypatch.chdir(REPO)
    args = ["launch", "--config", str(recipe_without(tmp_path, "ref.")), "--dry-run", "--", *data_flags(data)]
    assert cli.main(args) == 0, capsys.readouterr().out
    capsys.readouterr()
    assert cli.main([*args, "--ref.num_gpus_per_node", "4"]) == 1
    assert "a colocated reference model needs" in capsys.readouterr().out


MALFORMED = [  # (flags, the dry run's problem)
    (["--ckpt.load_enable", "false"], "--ckpt.load_enable takes no value (a bare flag, which cannot be "
                                      "turned off): OpenRLHF's parser stops on false"),
    (["--eval.steps", "10", "stray"], "--eval.steps takes one value: OpenRLHF's parser stops on stray"),
    (["--rollout.batch_size", "64", "32"],
     "--rollout.batch_size takes one value: OpenRLHF's parser stops on 32"),
    (["--actor.eps_clip_low_high", "0.2"], "argument --actor.eps_clip_low_high: expected 2 arguments"),
    (["--rollout.batch_size", "abc"], "argument --rollout.batch_size: invalid int value: 'abc'"),
]


@pytest.mark.parametrize("extra, problem", MALFORMED, ids=[" ".join(extra) for extra, _ in MALFORMED])
def test_dry_run_rejects_what_openrlhfs_parser_rejects(extra, problem, data, stop_at_strategy, monkeypatch,
                                                       capsys):
    monkeypatch.chdir(REPO)
    recipe = REPO / "configs" / "qwen3-0.6b-grpo-aapa.yaml"
    flags = [*data_flags(data), *extra]
    assert cli.main(["launch", "--config", str(recipe), "--dry-run", "--", *flags]) == 1
    fails = [line for line in capsys.readouterr().out.splitlines() if line.startswith("  FAIL")]
    assert len(fails) == 1 and problem in fails[0], fails
    with pytest.raises(SystemExit) as stopped:  # OpenRLHF's own parser stops with argparse's usage error
        launch.main(command(recipe, flags)[3:])
    assert stopped.value.code == 2 and "args" not in stop_at_strategy


def test_a_recipe_cannot_turn_off_a_flag_that_defaults_to_true(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("openrlhf: {ckpt.load_enable: false, actor.muon.nesterov: false}\n")
    with pytest.raises(RecipeError, match=r"openrlhf.actor.muon.nesterov: false cannot be passed: OpenRLHF's "
                                          r"default is true .*; write `actor.muon.no_nesterov: true`"):
        command(recipe)
    recipe.write_text("openrlhf: {ckpt.load_enable: false, actor.muon.no_nesterov: true}\n")
    assert command(recipe)[3:] == ["--actor.muon.no_nesterov"]  # false leaves out a flag defaulting to false


def test_output_root_also_covers_openrlhfs_default_output_paths(data, monkeypatch, capsys, tmp_path):
    """A recipe without ckpt.* writes where OpenRLHF's relative defaults say: the launchers' --output-root
    covers them, so that the local dry run and the one inside the Ray job agree."""
    monkeypatch.chdir(REPO)
    recipe = recipe_without(tmp_path, "ckpt.")
    cmd = command(recipe, data_flags(data), output_root=str(tmp_path))
    assert cmd[cmd.index("--ckpt.path") + 1] == str(tmp_path / "ckpt" / "checkpoints_ppo_ray")
    assert cmd[cmd.index("--ckpt.output_dir") + 1] == str(tmp_path / "ckpt")
    args = ["launch", "--config", str(recipe), "--output-root", str(tmp_path), "--dry-run", "--"]
    args += data_flags(data)
    assert cli.main(args) == 0, capsys.readouterr().out  # locally, as launchers/submit.sh runs it
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")  # inside the Ray job
    assert cli.main(args) == 0, capsys.readouterr().out


def test_dry_run_checks_each_blended_dataset_and_refuses_an_empty_one(data, monkeypatch, capsys, tmp_path):
    """OpenRLHF's blending_datasets reads `a,b@data_dir` lists; its load_dataset fails on an empty file."""
    monkeypatch.chdir(REPO)
    recipe = str(REPO / "configs" / "qwen3-0.6b-grpo-aapa.yaml")
    blend, empty = f"{data / 'train.jsonl'}, {data / 'eval.jsonl'}@part", tmp_path / "empty.jsonl"
    empty.write_text("")
    flags = [*data_flags(data), "--data.prompt_dataset", blend]
    assert cli.main(["launch", "--config", recipe, "--dry-run", "--", *flags]) == 0, capsys.readouterr().out
    assert f"ok    {data / 'eval.jsonl'} (6 rows): experts for 6 rows" in capsys.readouterr().out
    flags += ["--eval.dataset", f"{data / 'eval.jsonl'},{empty},missing.jsonl"]
    assert cli.main(["launch", "--config", recipe, "--dry-run", "--", *flags]) == 1
    fails = [line for line in capsys.readouterr().out.splitlines() if line.startswith("  FAIL")]
    assert fails == [f"  FAIL  --eval.dataset {empty}: empty file",
                     "  FAIL  --eval.dataset missing.jsonl: no such file or directory"]
    # What OpenRLHF does with both.
    strategy = SimpleNamespace(print=print, is_rank_0=lambda: False, args=SimpleNamespace(use_ms=False))
    assert len(blending_datasets(blend, None, strategy)) == 12
    with pytest.raises(StopIteration):
        blending_datasets(str(empty), None, strategy)


def test_launch_runs_exactly_the_printed_command(data, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    recipe = REPO / "configs" / "qwen3-0.6b-staged-aapa.yaml"
    ran = []
    monkeypatch.setattr("subprocess.run", lambda cmd: ran.append(cmd) or type("Done", (), {"returncode": 0}))
    assert cli.main(["launch", "--config", str(recipe), "--", *data_flags(data)]) == 0
    assert ran == [command(recipe, data_flags(data))]
    assert shlex.split(capsys.readouterr().out) == ran[0]


def test_recipe_errors_name_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("openrlhf: {actor.num_nodes: 1}\naapa: {discriminator: d, lamda: 1}\n")
    with pytest.raises(ValueError, match=r"bad.yaml: aapa.lamda is not an AAPA setting"):
        command(bad)
    bad.write_text("openrlhf: {--actor.num_nodes: 1}\n")
    with pytest.raises(ValueError, match=r"openrlhf.--actor.num_nodes: write a flag as"):
        command(bad)
    bad.write_text("trainer: {}\n")
    with pytest.raises(ValueError, match="found \\['trainer'\\]"):
        command(bad)


def test_launcher_scripts_parse_and_ship_the_plugin():
    scripts = sorted((REPO / "launchers").glob("*.sh")) + [REPO / "launchers" / "slurm.sbatch"]
    assert len(scripts) == 6  # ray_head, ray_worker, single_node, submit, gpu_smoke, slurm
    for script in scripts:
        result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert result.returncode == 0, (script.name, result.stderr)
    env = yaml.safe_load((REPO / "launchers" / "runtime_env.yaml").read_text())
    assert env["working_dir"] == "." and ".venv" in env["excludes"]
    # OpenRLHF's ray.init sets env_vars itself; Ray refuses a job whose runtime env repeats one of the keys.
    assert "env_vars" not in env
    for script, dry_run_and_job in (("submit.sh", 2), ("slurm.sbatch", 1)):  # slurm submits with submit.sh
        text = (REPO / "launchers" / script).read_text()
        assert text.count('--output-root "$PWD"') == dry_run_and_job, script
    # Slurm opens its log before the script runs and cannot create a directory (a fresh clone has no runs/).
    output = re.search(r"^#SBATCH --output=(.+)$", (REPO / "launchers" / "slurm.sbatch").read_text(), re.M)[1]
    assert Path(output).parent == Path("."), output


# A stub interpreter: appends its path and arguments, shell-quoted, as one line to $CALLS; asked by
# slurm.sbatch how many GPUs the Ray cluster has (`-c ...`), it answers $CLUSTER_GPUS (default: plenty).
PYTHON_STUB = '#!/usr/bin/env bash\nprintf "%q " "$0" "$@" >> "$CALLS"; echo >> "$CALLS"\n' \
    '[ "$1" = -c ] && echo "${CLUSTER_GPUS:-1000}"\nexit 0\n'


def run_launcher(script: str, run: Path, checkout: Path = REPO, extra: tuple[str, ...] = (),
                 returncode: int = 0, **env_vars: str):
    """Run a launcher of `checkout` (recipe, then `extra`) with `ray`, `python3` (PYTHON unless env_vars
    say otherwise) and Slurm's commands stubbed: (the environment `ray job submit` ran in, empty if none;
    each python call). Its stderr is in run/stderr."""
    stubs, seen, calls = run / "bin", run / "submit.env", run / "python.calls"
    stubs.mkdir(parents=True)
    record = f'if [ "$1 $2" = "job submit" ]; then env -0 > {seen}; fi'
    for name, body in (("ray", record), ("sleep", ""), ("scontrol", "echo n1; echo n2"),
                       ("srun", "echo 10.0.0.1")):
        (stubs / name).write_text(f"#!/usr/bin/env bash\n{body}\n")
        (stubs / name).chmod(0o755)
    (stubs / "python3").write_text(PYTHON_STUB)
    (stubs / "python3").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # only what the launcher sets
    env.update(PATH=f"{stubs}:{env['PATH']}", PYTHON=str(stubs / "python3"), CALLS=str(calls),
               SLURM_SUBMIT_DIR=str(checkout), SLURM_JOB_NODELIST="n[1-2]")
    env.update(env_vars)
    launcher = checkout / "launchers" / script
    result = subprocess.run(["bash", str(launcher), "configs/qwen3-0.6b-grpo-aapa.yaml", *extra], env=env,
                            capture_output=True, text=True, timeout=60)
    (run / "stderr").write_text(result.stderr)
    assert result.returncode == returncode, (script, result.stderr)
    job = dict(item.split("=", 1) for item in seen.read_text().split("\0") if item) if seen.exists() else {}
    return job, [shlex.split(line) for line in (calls.read_text() if calls.exists() else "").splitlines()]


def test_slurm_spreads_the_recipe_over_every_gpu_of_every_node(data, tmp_path, monkeypatch, capsys):
    _, calls = run_launcher("slurm.sbatch", tmp_path, GPUS_PER_NODE="4", SLURM_JOB_NUM_NODES="2")
    layout = calls[0][calls[0].index("--") + 1:]  # the local dry run: ... --dry-run -- LAYOUT
    monkeypatch.chdir(REPO)
    recipe = str(REPO / "configs" / "qwen3-0.6b-grpo-aapa.yaml")
    assert cli.main(["launch", "--config", recipe, "--dry-run", "--", *layout, *data_flags(data)]) == 0, \
        capsys.readouterr().out
    assert "layout: 8 GPUs" in capsys.readouterr().out


def test_launchers_run_the_checkouts_venv_by_default(tmp_path):
    """After `make install` the project's packages are in .venv, not in the python3 on PATH."""
    checkout = tmp_path / "checkout"
    (checkout / "launchers").mkdir(parents=True)
    (checkout / ".venv" / "bin").mkdir(parents=True)
    (checkout / ".venv" / "bin" / "python").write_text(PYTHON_STUB)
    (checkout / ".venv" / "bin" / "python").chmod(0o755)
    for script in ("submit.sh", "single_node.sh", "slurm.sbatch"):
        shutil.copy(REPO / "launchers" / script, checkout / "launchers")
    for script in ("submit.sh", "single_node.sh", "slurm.sbatch"):
        _, calls = run_launcher(script, tmp_path / script, checkout, PYTHON="")
        assert calls and all(call[0] == ".venv/bin/python" for call in calls), (script, calls)


@pytest.mark.parametrize("script", ["submit.sh", "slurm.sbatch"])
def test_flags_that_ray_job_submit_would_change_are_refused_before_submitting(script, tmp_path):
    """Ray joins the job's command with subprocess.list2cmdline (Windows rules) and runs it with a shell: a
    compact JSON value is split by bash's brace expansion, a template with `|` is a syntax error. Such
    flags stop the launcher, naming the value; plain values, paths with spaces included, go through."""
    def through_ray(args: tuple[str, ...]) -> list[str]:  # as Ray's job supervisor runs it, with bash
        words = "printf '%s\\0' " + subprocess.list2cmdline(args)
        return subprocess.run(["bash", "-c", words], capture_output=True, text=True).stdout.split("\0")[:-1]

    stages = ("--aapa.stages", '[{"end_step":2,"objective":"sft"}]')
    assert through_ray(stages) == ["--aapa.stages", '[\"end_step\":2]', '[\"objective\":\"sft\"]']
    job, _ = run_launcher(script, tmp_path / "json", extra=stages, returncode=2)
    assert not job and "would not reach the job intact" in (tmp_path / "json" / "stderr").read_text()
    safe = ("--ckpt.path", "/shared/my runs/ckpt", "--actor.adam.lr", "1e-6")
    assert through_ray(safe) == list(safe)
    job, _ = run_launcher(script, tmp_path / "safe", extra=safe)
    assert job


def test_slurm_stops_when_a_node_never_joins_the_ray_cluster(tmp_path):
    """OpenRLHF would wait for the missing GPUs until Slurm's --time ran out, holding every node."""
    job, calls = run_launcher("slurm.sbatch", tmp_path, returncode=1, SLURM_JOB_NUM_NODES="2",
                              CLUSTER_GPUS="8")
    assert not job and "the Ray cluster has 8 of 16 GPUs after 5 minutes" in (tmp_path / "stderr").read_text()
    assert sum(call[1] == "-c" for call in calls) == 30


@pytest.mark.parametrize("script", ["submit.sh", "slurm.sbatch"])
def test_ray_job_submit_ships_the_discriminator_and_no_run_outputs(script, tmp_path, monkeypatch):
    """Pack a checkout with Ray's own code, as `ray job submit` does in the environment the launcher gives it:
    Ray leaves out what .gitignore names (runs/) unless RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1."""
    from ray._private.ray_constants import RAY_RUNTIME_ENV_IGNORE_GITIGNORE
    from ray._private.runtime_env.packaging import create_package
    from ray._private.runtime_env.working_dir import upload_working_dir_if_needed

    # As ray/dashboard/modules/dashboard_sdk.py decides for `ray job submit`.
    job, _ = run_launcher(script, tmp_path)
    assert job, script  # it ran `ray job submit`
    include_gitignore = job.get(RAY_RUNTIME_ENV_IGNORE_GITIGNORE, "0") != "1"
    discs = {yaml.safe_load(r.read_text()).get("aapa", {}).get("discriminator") for r in RECIPES} - {None}
    assert discs == {"runs/gsm8k-disc"}  # what every AAPA recipe reads, relative to the working_dir
    checkout = tmp_path / "checkout"
    inputs = ["aapa_rl/__init__.py", "reward_fns/math.py", "configs/qwen3-0.6b-grpo-aapa.yaml",
              "data/prepared/train.jsonl", "data/prepared/experts.jsonl"]
    run = "runs/qwen3-0.6b-grpo-aapa"  # OpenRLHF's outputs, as the recipes name them
    outputs = [f"{run}/ckpt/shard.pt", f"{run}/final/model.safetensors", f"{run}/tensorboard/ev",
               f"{run}.log", "runs/slurm-7.out", "slurm-7.out", "ckpt/shard.pt",
               "runs/bench/runs/r1/checkpoints/step_000120/model.safetensors",
               "runs/bench/start/sft0/discriminator/config.json", "runs/demo/grpo/checkpoints/step_1/m.pt",
               "runs/demo/grpo/tb/ev", "runs/demo/grpo/eval/step_1.jsonl", "runs/demo/grpo/scores.jsonl",
               "runs/trl-qwen3-0.6b-grpo-aapa/checkpoint-20/model.safetensors",  # TRL's output_dir
               "runs/real/model/model.safetensors"]  # make example-real's model (a link into the cache)
    for name in inputs + outputs:
        (checkout / name).parent.mkdir(parents=True, exist_ok=True)
        (checkout / name).write_text("x")
    for name in (".gitignore", "launchers/runtime_env.yaml"):
        (checkout / name).parent.mkdir(parents=True, exist_ok=True)
        (checkout / name).write_text((REPO / name).read_text())
    for disc in discs:
        save_discriminator(checkout / disc)
        (checkout / disc / "embedding_cache").mkdir()
        (checkout / disc / "embedding_cache" / "experts.pt").write_text("x")
    runtime_env = yaml.safe_load((checkout / "launchers/runtime_env.yaml").read_text())
    package = tmp_path / "package.zip"

    def pack(working_dir, excludes, is_file=False):
        create_package(working_dir, package, include_gitignore=include_gitignore, excludes=excludes)

    monkeypatch.chdir(checkout)  # the launchers submit from the checkout, and working_dir is "."
    upload_working_dir_if_needed(runtime_env, include_gitignore=include_gitignore, upload_fn=pack)
    shipped = set(zipfile.ZipFile(package).namelist())
    disc_files = {f"{d}/{f}" for d in discs for f in ("config.json", "head.safetensors", "report.json")}
    assert disc_files | {f"{d}/embedding_cache/experts.pt" for d in discs} <= shipped, sorted(shipped)
    assert set(inputs) <= shipped  # the plugin, the rewards, the recipes and the data reach every node
    assert not shipped & set(outputs), sorted(shipped & set(outputs))  # Ray refuses a package over 512 MiB
