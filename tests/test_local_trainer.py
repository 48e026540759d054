"""The local trainer on the tiny model: each objective with and without AAPA, SFT learning, guards, resume."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from local_helpers import base_recipe, discriminator_dir, metrics, warm_run

from aapa_rl import objectives as obj
from aapa_rl.local import plots
from aapa_rl.local.policy import load_policy, pack, response_log_probs
from aapa_rl.local.recipe import RecipeError, load_recipe
from aapa_rl.local.trainer import NonFiniteError, RunDirError, Stream, Trainer, checkpoints
from reward_fns.combine import RewardError

REPO = Path(__file__).resolve().parents[1]
AAPA = {"alpha": 0.5, "lam": 1.0, "rho": 0.5}
SCHEDULES = {
    "sft": [{"end_step": 2, "objective": "sft"}],
    "grpo": [{"end_step": 2, "objective": "grpo"}],
    "chord": [{"end_step": 2, "objective": "chord"}],
    "staged": [{"end_step": 1, "objective": "sft"}, {"end_step": 3, "objective": "grpo"}],
}


def _recipe(out: Path, stages: list[dict], aapa: bool, settings: dict | None = None, **extra):
    """A recipe from the warmed model; `aapa` adds the discriminator and AAPA coefficients, `settings` more
    keys of the `aapa:` section."""
    if aapa:
        stages = [
            {**s, **AAPA, **({"lam_end": 0.2} if i == len(stages) - 1 and len(stages) > 1 else {})}
            for i, s in enumerate(stages)
        ]
    disc = {"discriminator": str(discriminator_dir())} if aapa else {}
    data = base_recipe(
        out,
        steps=stages[-1]["end_step"],
        stages=stages,
        aapa={**disc, **(settings or {})},
        model={"path": str(warm_run() / "final")},
        **extra,
    )
    return load_recipe(None, base=data)


def test_sft_loss_falls_over_30_steps():
    rows = metrics(warm_run())
    losses = [r["loss/sft"] for r in rows]
    assert rows[0]["objective"] == "sft" and len(losses) == 40
    assert sum(losses[25:30]) / 5 < 0.6 * losses[0], losses[:30]


@pytest.mark.parametrize("aapa", [False, True], ids=["plain", "aapa"])
@pytest.mark.parametrize("objective", list(SCHEDULES))
def test_objective_smoke(tmp_path, objective, aapa):
    recipe = _recipe(tmp_path / "run", SCHEDULES[objective], aapa)
    trainer = Trainer(recipe, progress=False)
    task_reward = trainer.reward_fn

    def varied(texts, labels):
        # The barely-warmed model is rarely right, so every group would tie at 0 and give no gradient;
        # a small length-dependent term keeps the task reward's logs and makes the advantages non-zero.
        rewards, logs = task_reward(texts, labels)
        return rewards + torch.tensor([len(t) % 3 / 10 for t in texts]), logs

    trainer.reward_fn = varied
    before = [p.detach().clone() for p in trainer.policy.parameters()]
    trainer.fit()
    rows = metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == list(range(recipe.steps))
    assert all(r["nonfinite_skipped"] == 0 and r["grad_norm"] > 0 for r in rows)
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.policy.parameters(), strict=True))
    stages = {s["objective"] for s in SCHEDULES[objective]}
    if "sft" in stages or "chord" in stages:
        assert any(r["loss/sft"] > 0 for r in rows)
    if stages & {"grpo", "chord"}:
        assert all("reward/raw" in r and r["response/length"] > 0 for r in rows if r["objective"] != "sft")
    if objective == "chord":
        assert all(0 <= r["mu"] <= 1 for r in rows)
    if aapa:
        # Every logged AAPA quantity is there, and the anchor term was active on a non-empty hard set.
        for key in (
            "aapa/gap_mean",
            "aapa/gap_max",
            "aapa/hard_set_size",
            "aapa/shaping_mean",
            "aapa/shaping_std",
            "aapa/d_rollout_mean",
            "aapa/d_expert_mean",
            "logp/expert",
            "logp/rollout",
            "reward/shaped",
            "lambda",
            "alpha",
            "stage",
        ):
            assert all(key in r for r in rows), key
        assert any(r["aapa/hard_set_size"] > 0 and r["loss/anchor"] > 0 for r in rows)
        scores = [json.loads(line) for line in (tmp_path / "run" / "scores.jsonl").read_text().splitlines()]
        assert scores and all(0 < d < 1 for s in scores for d in s["d_rollout"] + s["d_expert"])
    else:
        assert all("aapa/gap_mean" not in r and r["loss/anchor"] == 0 for r in rows)
    if objective == "staged":
        assert [r["stage"] for r in rows] == [0, 1, 1]
        if aapa:  # lambda decays linearly to lam_end over the second stage
            assert rows[1]["lambda"] == pytest.approx(1.0) and rows[2]["lambda"] == pytest.approx(0.6)
            # The SFT stage samples rollouts for the critic but never scores them: no reward/raw (it was 0.0),
            # and the reward curve draws the rows that have it.
            assert "reward/raw" not in rows[0] and "reward/shaped" in rows[0] and "reward/raw" in rows[1]
            assert tmp_path / "run" / "plots" / "reward.png" in plots.plot_run(tmp_path / "run")
    assert (tmp_path / "run" / "final" / "trainer_state.pt").exists()


def test_grpo_variants_kl_and_micro_batches(tmp_path):
    """rloo + KL to the reference + seq-mean aggregation + micro-batches, with adaptive lambda."""
    recipe = _recipe(
        tmp_path / "run",
        [{"end_step": 2, "objective": "grpo"}],
        True,
        loss={"estimator": "rloo", "kl_coef": 0.1, "agg": "seq-mean-token-mean"},
        settings={"adaptive": {"target_gap": 0.01, "rate": 0.5}},
        optim={"lr": 1e-3, "micro_batch_size": 5},
    )
    Trainer(recipe, progress=False).fit()
    rows = metrics(tmp_path / "run")
    assert all(r["loss/kl"] >= 0 for r in rows) and rows[1]["loss/kl"] > 0  # policy moved off the reference
    # The controller raised lambda because the gap exceeds the tiny target.
    assert rows[1]["lambda"] > rows[0]["lambda"]


def test_micro_batches_accumulate_the_same_gradient(tmp_path):
    """Splitting a step into micro-batches must give the gradient of the whole batch."""
    grads = []
    for size in (0, 3):
        recipe = _recipe(
            tmp_path / f"run{size}",
            [{"end_step": 1, "objective": "chord"}],
            True,
            optim={"lr": 1e-3, "micro_batch_size": size},
            loss={"kl_coef": 0.05, "sft_batch_size": 8},
        )
        trainer = Trainer(recipe, progress=False)
        trainer.optimizer.step = lambda: None  # keep the gradient, skip the update
        trainer.train_step(0)
        grads.append(torch.cat([p.grad.flatten() for p in trainer.policy.parameters() if p.grad is not None]))
        trainer.close()
    assert torch.allclose(grads[0], grads[1], atol=1e-5, rtol=1e-4)


def test_chord_weighs_the_kl_term_with_the_rl_loss(tmp_path):
    """Spec: chord = (1 - mu) * L_grpo (its KL term included) + mu * L_sft_phi. At mu = 1 the KL term has no
    weight, so the gradient is the same with and without a KL coefficient."""
    grads = []
    for kl_coef in (0.0, 0.5):
        recipe = _recipe(
            tmp_path / f"run{kl_coef}",
            [{"end_step": 1, "objective": "chord"}],
            False,
            settings={"chord": {"peak": 1.0, "valley": 1.0}},
            loss={"kl_coef": kl_coef, "sft_batch_size": 8},
        )
        trainer = Trainer(recipe, progress=False)
        torch.manual_seed(0)
        with torch.no_grad():  # move the policy off its KL reference, or the KL gradient would be zero
            for p in trainer.policy.parameters():
                p.add_(0.05 * torch.randn_like(p))
        trainer.optimizer.step = lambda: None  # keep the gradient, skip the update
        metrics_row, _ = trainer.train_step(0)
        assert metrics_row["mu"] == 1.0 and (kl_coef == 0 or metrics_row["loss/kl"] > 0)
        grads.append(torch.cat([p.grad.flatten() for p in trainer.policy.parameters() if p.grad is not None]))
        trainer.close()
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_nonfinite_steps_are_skipped_then_abort(tmp_path):
    recipe = _recipe(
        tmp_path / "run",
        [{"end_step": 6, "objective": "sft"}],
        False,
        max_nonfinite=2,
        log={"save_every": 1, "eval_every": 0, "plots": False},
    )
    trainer = Trainer(recipe, progress=False)
    original = trainer.train_step

    def poisoned(step):
        if step >= 3:  # from step 3 on, every forward gives NaN logits
            trainer.policy.lm_head.register_forward_hook(lambda mod, inp, out: out * float("nan"))
        return original(step)

    trainer.train_step = poisoned
    with pytest.raises(NonFiniteError, match="step_000003"):
        trainer.fit()
    rows = metrics(tmp_path / "run")
    assert [r["nonfinite_skipped"] for r in rows] == [0, 0, 0, 1, 1]
    checkpoints = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert checkpoints == ["step_000001", "step_000002", "step_000003"]  # nothing saved after the NaNs


def test_run_dir_is_never_overwritten_silently(tmp_path):
    recipe = _recipe(tmp_path / "run", [{"end_step": 1, "objective": "sft"}], False)
    Trainer(recipe, progress=False).fit()
    with pytest.raises(RunDirError, match="--resume.*--overwrite"):
        Trainer(recipe, progress=False)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    other = _recipe(tmp_path / "other", [{"end_step": 1, "objective": "sft"}], False)
    with pytest.raises(RunDirError, match="not an empty directory"):
        Trainer(other, overwrite=True, progress=False)
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"
    trainer = Trainer(recipe, overwrite=True, progress=False)
    trainer.close()
    assert not (tmp_path / "run" / "metrics.jsonl").read_text()


def test_only_a_run_or_a_failed_start_is_ever_deleted(tmp_path, monkeypatch):
    """A directory that merely holds a config.yaml (the recipe itself: `--config exp1/config.yaml` into exp1,
    or `--out .`) is never deleted, with or without --overwrite; what a start that failed before training
    wrote (config.yaml, data/) is cleared without it; --overwrite replaces only a run directory."""
    from aapa_rl.local.recipe import recipe_dict
    from aapa_rl.local.rundir import prepare

    def config(out: Path) -> dict:
        return recipe_dict(load_recipe(None, base=base_recipe(out)))

    exp1 = tmp_path / "exp1"
    (exp1 / "mydata").mkdir(parents=True)
    (exp1 / "mydata" / "rows.jsonl").write_text("{}\n")
    (exp1 / "notes.txt").write_text("mine")
    (exp1 / "config.yaml").write_text(yaml.safe_dump(base_recipe(exp1)))  # the user's recipe
    for overwrite in (False, True):
        with pytest.raises(RunDirError, match="not an empty directory or a run directory"):
            prepare(exp1, config(exp1), resume=False, overwrite=overwrite)
        assert sorted(p.name for p in exp1.iterdir()) == ["config.yaml", "mydata", "notes.txt"]
    (exp1 / "notes.txt").unlink()
    shutil.rmtree(exp1 / "mydata")
    with pytest.raises(RunDirError, match="not an empty directory or a run directory"):
        prepare(exp1, config(exp1), resume=False, overwrite=False)  # its own recipe is not rewritten
    assert yaml.safe_load((exp1 / "config.yaml").read_text()) == base_recipe(exp1)

    monkeypatch.chdir(exp1)  # --out . in a directory of one's own
    (exp1 / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match="not an empty directory or a run directory"):
        prepare(Path("."), config(Path(".")), resume=False, overwrite=False)
    assert (exp1 / "notes.txt").read_text() == "mine"

    # A failed start (config.yaml and the task's data/, nothing else) is cleared; the same --out takes the
    # fixed recipe, and the directory itself stays (it may be the working directory).
    start = tmp_path / "start"
    prepare(start, config(start), resume=False, overwrite=False)
    (start / "data").mkdir()
    (start / "data" / "train.jsonl").write_text("{}\n")
    monkeypatch.chdir(start)
    assert prepare(Path("."), config(Path(".")), resume=False, overwrite=False) == []
    assert [p.name for p in start.iterdir()] == ["config.yaml"] and Path.cwd() == start
    # ...but not with a file of one's own beside it
    (start / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match="not an empty directory or a run directory"):
        prepare(start, config(start), resume=False, overwrite=False)
    assert (start / "notes.txt").read_text() == "mine"

    # --overwrite replaces a run (config.yaml and its metrics or checkpoints), not a directory that only
    # happens to hold a metrics.jsonl
    other = tmp_path / "other"
    other.mkdir()
    (other / "metrics.jsonl").write_text("")
    with pytest.raises(RunDirError, match="not an empty directory or a run directory"):
        prepare(other, config(other), resume=False, overwrite=True)
    assert (other / "metrics.jsonl").exists()


def test_a_start_killed_writing_its_config_is_a_failed_start(tmp_path):
    """A fresh start killed inside config.yaml's write leaves only config.yaml.tmp (and data/ does not come
    before config.yaml): the same --out takes the recipe (it used to be refused, even with --overwrite)."""
    from aapa_rl.local.recipe import recipe_dict
    from aapa_rl.local.rundir import prepare

    run = tmp_path / "run"
    config = recipe_dict(load_recipe(None, base=base_recipe(run)))
    for leftover in (["config.yaml.tmp"], ["config.yaml.tmp", "data"]):
        run.mkdir()
        (run / "config.yaml.tmp").write_text("out: ")  # cut off
        if "data" in leftover:
            (run / "data").mkdir()
            (run / "data" / "train.jsonl").write_text("{}\n")
        assert prepare(run, config, resume=False, overwrite=False) == []
        assert [p.name for p in run.iterdir()] == ["config.yaml"]
        assert yaml.safe_load((run / "config.yaml").read_text()) == yaml.safe_load(yaml.safe_dump(config))
        shutil.rmtree(run)
    # data/ alone (no config.yaml, nor its .tmp) may be one's own: kept
    (run / "data").mkdir(parents=True)
    with pytest.raises(RunDirError, match="not an empty directory or a run directory"):
        prepare(run, config, resume=False, overwrite=True)
    assert [p.name for p in run.iterdir()] == ["data"]


def _train_cmd(config: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "aapa_rl.cli", "train", "--config", str(config), "--no-progress", *extra]


def test_resume_after_sigkill_continues_identically(tmp_path):
    """A run killed mid-way (SIGKILL) and resumed logs the same steps as one that never stopped."""
    steps = 6
    data = base_recipe(
        tmp_path / "x",
        steps=steps,
        stages=[{"end_step": steps, "objective": "grpo", **AAPA}],
        model={"path": str(warm_run() / "final")},
        aapa={"discriminator": str(discriminator_dir()), "adaptive": {"target_gap": 0.5, "rate": 0.2}},
        log={"save_every": 2, "eval_every": 0, "eval_samples": 8, "plots": False},
    )
    config = tmp_path / "recipe.yaml"
    config.write_text(yaml.safe_dump(data))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    Trainer(load_recipe(config, [f"out={tmp_path / 'ref'}"]), progress=False).fit()  # never interrupted

    # Killed by the run itself as step 4's checkpoint begins (steps 2 and 3 logged after the last one), not
    # by a poll from here, which a loaded machine can delay until the run has finished.
    run = tmp_path / "killed"
    argv = ["train", "--config", str(config), "--no-progress", "--out", str(run)]
    killed = subprocess.run([sys.executable, "-c", SIGKILL_AT_STEP_4, *argv], env=env, cwd=REPO)
    assert killed.returncode == -signal.SIGKILL
    assert [d.name for d in checkpoints(run)] == ["step_000002"]
    assert [r["step"] for r in metrics(run)] == list(range(4))
    resumed = subprocess.run(
        _train_cmd(config, "--out", str(run), "--resume"), env=env, cwd=REPO, capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout

    ref_rows, got_rows = metrics(tmp_path / "ref"), metrics(run)
    assert [r["step"] for r in got_rows] == list(range(steps))
    drop = ("time/", "eval/")
    for a, b in zip(ref_rows, got_rows, strict=True):
        a = {k: v for k, v in a.items() if not k.startswith(drop)}
        b = {k: v for k, v in b.items() if not k.startswith(drop)}
        assert a.keys() == b.keys()
        for key in a:
            assert b[key] == (
                a[key] if isinstance(a[key], str) else pytest.approx(a[key], rel=1e-5, abs=1e-6, nan_ok=True)
            ), (a["step"], key)
    ref_state = torch.load(tmp_path / "ref" / "final" / "trainer_state.pt", weights_only=False)
    got_state = torch.load(run / "final" / "trainer_state.pt", weights_only=False)
    assert ref_state["schedule"] == got_state["schedule"] and ref_state["streams"] == got_state["streams"]
    from safetensors.torch import load_file

    ref_w, got_w = (
        load_file(tmp_path / "ref" / "final" / "model.safetensors"),
        load_file(run / "final" / "model.safetensors"),
    )
    assert all(torch.allclose(ref_w[k], got_w[k], atol=1e-6) for k in ref_w)


# Runs the trainer's CLI and SIGKILLs it at the first file of step 4's checkpoint.
SIGKILL_AT_STEP_4 = r"""
import os, signal, sys, torch
from aapa_rl.cli import main

real_save = torch.save

def save(obj, path, *args, **kwargs):
    if "step_000004" in str(path):
        os.kill(os.getpid(), signal.SIGKILL)
    real_save(obj, path, *args, **kwargs)

torch.save = save
sys.exit(main(sys.argv[1:]))
"""


# Runs the trainer's CLI with torch.save cut short at step 4's trainer state: half the bytes written, then
# SIGTERM, as a scheduler's stop would arrive mid-write.
SIGTERM_MID_SAVE = r"""
import io, os, signal, sys, torch
from aapa_rl.cli import main

real_save = torch.save

def save(obj, path, *args, **kwargs):
    if "step_000004" in str(path):
        buffer = io.BytesIO()
        real_save(obj, buffer)
        with open(path, "wb") as file:
            file.write(buffer.getvalue()[: buffer.tell() // 2])
            file.flush()
            os.kill(os.getpid(), signal.SIGTERM)
    real_save(obj, path, *args, **kwargs)

torch.save = save
sys.exit(main(sys.argv[1:]))
"""


def _six_step_recipe(tmp_path: Path) -> Path:
    data = base_recipe(
        tmp_path / "unused",
        steps=6,
        stages=[{"end_step": 6, "objective": "grpo"}],
        model={"path": str(warm_run() / "final")},
        log={"save_every": 2, "eval_every": 0, "eval_samples": 8, "plots": False},
    )
    config = tmp_path / "recipe.yaml"
    config.write_text(yaml.safe_dump(data))
    return config


def test_sigterm_during_a_checkpoint_write_keeps_the_previous_one(tmp_path):
    config, run = _six_step_recipe(tmp_path), tmp_path / "run"
    argv = ["train", "--config", str(config), "--no-progress", "--out", str(run)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    killed = subprocess.run([sys.executable, "-c", SIGTERM_MID_SAVE, *argv], env=env, cwd=REPO)
    assert killed.returncode == -signal.SIGTERM
    assert (run / "checkpoints" / "step_000004.tmp" / "trainer_state.pt").exists()  # the half-written one
    assert [d.name for d in checkpoints(run)] == ["step_000002"]

    Trainer(load_recipe(config, [f"out={run}"]), resume=True, progress=False).fit()
    assert [r["step"] for r in metrics(run)] == list(range(6))
    assert [d.name for d in checkpoints(run)] == ["step_000006", "step_000004", "step_000002"]
    assert os.readlink(run / "final") == "checkpoints/step_000006"


def test_damaged_checkpoint_on_resume_is_named_and_the_one_before_used(tmp_path, capsys):
    config, run = _six_step_recipe(tmp_path), tmp_path / "run"
    Trainer(load_recipe(config, [f"out={run}"]), progress=False).fit()
    weights = run / "checkpoints" / "step_000006" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # a copy cut short

    Trainer(load_recipe(config, [f"out={run}"]), resume=True, progress=False).fit()  # steps 4 and 5 again
    out = capsys.readouterr()
    assert f"warning: {run / 'checkpoints' / 'step_000006'} cannot be loaded: SafetensorError" in out.err
    assert f"resumed from {run / 'checkpoints' / 'step_000004'} at step 4" in out.out
    assert [r["step"] for r in metrics(run)] == list(range(6))
    assert load_policy(str(run / "final"), None) is not None  # rewritten whole

    for checkpoint in checkpoints(run):
        (checkpoint / "trainer_state.pt").write_bytes(b"")
    with pytest.raises(
        RunDirError,
        match=r"no checkpoint can be loaded \(.*step_000006 cannot be loaded.*"
        r"step_000002 cannot be loaded.*\); start over with --overwrite",
    ):
        Trainer(load_recipe(config, [f"out={run}"]), resume=True, progress=False)


def test_every_selection_spends_its_anchor_budget(tmp_path):
    """gap anchors H; random and oracle ceil(rho * P) prompts, oracle first those with an exploiting rollout;
    all every prompt at weight rho. aapa/anchor_budget = lam x the weighted expert tokens of the anchors."""
    runs, P = {}, 4
    for selection in obj.SELECTIONS:
        stages = [{"end_step": 2, "objective": "grpo"}]
        recipe = _recipe(tmp_path / selection, stages, True, {"selection": selection})
        trainer = Trainer(recipe, progress=False)

        def flagged(texts, labels, task_reward=trainer.reward_fn):
            # The warmed model rarely repeats its box: mark a length-based subset of rollouts as exploiting.
            rewards, logs = task_reward(texts, labels)
            logs["flaw_bonus"] = torch.tensor([0.5 if len(t) % 5 == 0 else 0.0 for t in texts])
            return rewards + logs["flaw_bonus"], logs

        trainer.reward_fn = flagged
        # The expert tokens of step 0's prompts (the train stream does not depend on the selection).
        rows = [trainer.train_rows[i] for i in Stream(len(trainer.train_rows), recipe.seed + 2).take(P)]
        prompts, experts = trainer.experts(rows)
        tokens = pack(trainer.tokenizer, prompts, experts, "cpu").response_mask.sum(-1).tolist()
        trainer.fit()
        runs[selection] = metrics(tmp_path / selection)
    lam, rho = AAPA["lam"], AAPA["rho"]
    assert all(r["aapa/anchor_rows"] == r["aapa/hard_set_size"] for r in runs["gap"])
    for selection in ("random", "oracle"):
        # ceil(0.5 * 4) anchors, whose expert tokens are two of step 0's
        assert all(r["aapa/anchor_rows"] == 2 and r["loss/anchor"] > 0 for r in runs[selection])
        pairs = {lam * (x + y) for i, x in enumerate(tokens) for y in tokens[i + 1 :]}
        assert runs[selection][0]["aapa/anchor_budget"] in pairs
    for r in runs["oracle"]:
        if r["aapa/exploiting_prompts"] >= 2:
            assert r["aapa/hard_precision"] == 1.0
        elif r["aapa/exploiting_prompts"] > 0:
            assert r["aapa/hard_recall"] == 1.0
    assert all(r["aapa/anchor_rows"] == P for r in runs["all"])
    assert runs["all"][0]["aapa/anchor_budget"] == pytest.approx(lam * rho * sum(tokens))


def test_critic_diagnostics_against_the_prompts_that_exploit_the_flaw(tmp_path):
    """With a per-sample `flaw_bonus` from the reward, each step logs the hard set's precision and recall and
    the gap's AUROC against the prompts with an exploiting rollout: the values selection_diagnostics gives
    for the logged D scores."""
    recipe = _recipe(tmp_path / "run", [{"end_step": 2, "objective": "grpo"}], True)
    trainer = Trainer(recipe, progress=False)
    task_reward, flags = trainer.reward_fn, []

    def flagged(texts, labels):
        # The warmed model rarely repeats its box: mark a length-based subset of rollouts as exploiting.
        rewards, logs = task_reward(texts, labels)
        logs["flaw_bonus"] = torch.tensor([0.5 if len(t) % 5 == 0 else 0.0 for t in texts])
        flags.append(logs["flaw_bonus"])
        return rewards + logs["flaw_bonus"], logs

    trainer.reward_fn = flagged
    trainer.fit()
    P, G = recipe.rollout.prompts_per_step, recipe.rollout.group_size
    steps = [json.loads(line) for line in (tmp_path / "run" / "scores.jsonl").read_text().splitlines()]
    flags = flags[: recipe.steps]  # the training steps' calls; the final eval calls the reward too
    for row, step, flaw_bonus in zip(metrics(tmp_path / "run"), steps, flags, strict=True):
        gaps = obj.anchor_gaps(torch.tensor(step["d_rollout"]).view(P, G), torch.tensor(step["d_expert"]))
        hard, _ = obj.choose_hard_set(gaps, AAPA["rho"])
        expected = obj.selection_diagnostics(gaps, hard, (flaw_bonus.view(P, G) > 0).any(-1))
        logged = {k: row[f"aapa/{k}"] for k in expected}
        assert logged == pytest.approx(expected, nan_ok=True)
        assert 0 <= logged["exploiting_prompts"] <= P
        for key in ("hard_precision", "hard_recall", "gap_auroc"):
            assert math.isnan(logged[key]) or 0 <= logged[key] <= 1, (key, logged)


def _data_recipe(tmp_path: Path, data: dict, *, stages: list | None = None, aapa: dict | None = None):
    """A recipe on data files with the math reward, from the warmed model."""
    recipe = base_recipe(
        tmp_path / "run",
        stages=stages,
        aapa=aapa,
        data=data,
        reward="math",
        model={"path": str(warm_run() / "final")},
    )
    del recipe["task"]
    return load_recipe(None, base=recipe)


def test_labels_are_checked_by_the_reward_at_startup(tmp_path):
    """A label the reward cannot read stops the run before any training, naming the file row (not a batch
    position), whether it is in the train or the eval file."""
    from aapa_rl.data.rows import DataError

    good = json.dumps({"prompt": "Q: 1+1=?\nA: ", "label": "2"}) + "\n"
    bad = json.dumps({"prompt": "Q: 2+2=?\nA: ", "label": {"answr": "4"}}) + "\n"
    (tmp_path / "good.jsonl").write_text(good)
    (tmp_path / "bad.jsonl").write_text(good + "\n" + bad)  # the blank line is not a row but counts
    for split in ("train", "eval"):
        data = {"train": str(tmp_path / "good.jsonl"), split: str(tmp_path / "bad.jsonl")}
        with pytest.raises(DataError, match=r"bad.jsonl: row 3: field 'label': missing field 'answer'"):
            Trainer(_data_recipe(tmp_path, data), progress=False)
    # A start that failed leaves no run to protect: the fixed recipe starts without --overwrite.
    Trainer(_data_recipe(tmp_path, {"train": str(tmp_path / "good.jsonl")}), progress=False).close()


def test_a_reward_that_breaks_its_contract_at_startup_is_named_not_blamed_on_the_labels(tmp_path):
    from reward_fns.combine import RewardError

    (tmp_path / "good.jsonl").write_text(json.dumps({"prompt": "Q: 1+1=?\nA: ", "label": "2"}) + "\n")
    (tmp_path / "nan_reward.py").write_text(
        "def batch_reward(responses, labels):\n    return [float('nan')] * len(responses), {}\n")
    recipe = base_recipe(tmp_path / "run", data={"train": str(tmp_path / "good.jsonl")},
                         reward=str(tmp_path / "nan_reward.py"), model={"path": str(warm_run() / "final")})
    del recipe["task"]
    with pytest.raises(RewardError, match=r"nan_reward.py:batch_reward': non-finite reward nan for sample 0"):
        Trainer(load_recipe(None, base=recipe), progress=False)


def test_final_checkpoint_is_saved_before_the_final_eval(tmp_path):
    recipe = _recipe(tmp_path / "run", [{"end_step": 1, "objective": "sft"}], False)
    trainer = Trainer(recipe, progress=False)

    def broken():
        raise RuntimeError("eval broke")

    trainer.evaluate = broken
    with pytest.raises(RuntimeError, match="eval broke"):
        trainer.fit()
    assert (tmp_path / "run" / "final" / "trainer_state.pt").exists()


def test_a_run_killed_in_its_final_eval_finishes_on_resume(tmp_path, capsys):
    """A run stopped in its final eval keeps its last step's row (it was written after the eval), and
    --resume runs the final eval, plots and summary.json it missed (it used to say the run had finished)."""
    run = tmp_path / "run"
    log = {"eval_every": 0, "eval_samples": 4, "save_every": 0, "plots": True}
    recipe = _recipe(run, [{"end_step": 2, "objective": "sft"}], False, log=log)

    def killed_in_final_eval(recipe, resume: bool) -> None:
        trainer = Trainer(recipe, resume=resume, progress=False)

        def killed():
            raise KeyboardInterrupt  # as a kill arrives: nothing after it runs

        trainer.evaluate = killed
        with pytest.raises(KeyboardInterrupt):
            trainer.fit()

    killed_in_final_eval(recipe, resume=False)
    assert [r["step"] for r in metrics(run)] == [0, 1]
    assert not (run / "summary.json").exists() and not (run / "plots" / "accuracy.png").exists()

    summary = Trainer(recipe, resume=True, progress=False).fit()
    assert "trained its 2 steps but stopped before its final eval" in capsys.readouterr().out
    rows = metrics(run)
    assert [r["step"] for r in rows] == [0, 1] and "loss/sft" in rows[1]
    assert summary["n"] == 4 and rows[1]["eval/accuracy"] == summary["accuracy"]
    assert (run / "eval" / "step_000002.jsonl").exists() and (run / "plots" / "accuracy.png").exists()
    done = json.loads((run / "summary.json").read_text())
    assert done["eval"] == summary and done["steps"] == 2 and done["final"] == "checkpoints/step_000002"

    # Extended by a step and killed in its final eval again: the first end's summary.json is not this one's.
    longer = dataclasses.replace(recipe, steps=3)
    killed_in_final_eval(longer, resume=True)
    summary = Trainer(longer, resume=True, progress=False).fit()
    assert "trained its 3 steps but stopped before its final eval" in capsys.readouterr().out
    rows = metrics(run)
    assert [r["step"] for r in rows] == [0, 1, 2] and rows[2]["eval/accuracy"] == summary["accuracy"]
    assert json.loads((run / "summary.json").read_text())["steps"] == 3

def test_aapa_prompt_without_expert_is_named_at_startup(tmp_path):
    from aapa_rl.data.rows import DataError

    rows = (warm_run() / "data" / "train.jsonl").read_text().splitlines()[:2]
    rows.append(json.dumps({"prompt": "Q: 1+1=?\nA: ", "label": "2"}))  # no expert in the task's bank
    (tmp_path / "train.jsonl").write_text("\n".join(rows) + "\n")
    data = {"train": str(tmp_path / "train.jsonl")}
    stages = [{"end_step": 2, "objective": "grpo", **AAPA}]
    aapa = {
        "discriminator": str(discriminator_dir()),
        "expert_bank": str(warm_run() / "data" / "experts.jsonl"),
    }
    with pytest.raises(DataError, match=r"train.jsonl: row 3: .*no expert.*aapa.missing_expert"):
        Trainer(_data_recipe(tmp_path, data, stages=stages, aapa=aapa), progress=False)
    skip = {**aapa, "missing_expert": "skip"}
    Trainer(_data_recipe(tmp_path, data, stages=stages, aapa=skip), overwrite=True, progress=False).close()


def test_a_step_without_any_expert_trains_and_logs(tmp_path):
    """With missing_expert: skip a step may draw only prompts without an expert: D and the gaps are NaN,
    logged as such (TensorBoard gets no histogram of nothing), and the step trains on the reward alone."""
    (tmp_path / "train.jsonl").write_text(json.dumps({"prompt": "Q: 1+1=?\nA: ", "label": "2"}) + "\n")
    aapa = {
        "discriminator": str(discriminator_dir()),
        "expert_bank": str(warm_run() / "data" / "experts.jsonl"),
        "missing_expert": "skip",
    }
    stages = [{"end_step": 2, "objective": "grpo", **AAPA}]
    Trainer(_data_recipe(tmp_path, {"train": str(tmp_path / "train.jsonl")}, stages=stages, aapa=aapa),
            progress=False).fit()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(math.isnan(r["aapa/d_rollout_mean"]) for r in rows)
    assert all(r["nonfinite_skipped"] == 0 and r["aapa/hard_set_size"] == 0 for r in rows)


def test_resume_drops_a_cut_off_last_log_line(tmp_path, capsys):
    """A run killed while writing a log line resumes without it; any other bad line names file and line."""
    from aapa_rl.data.rows import DataError

    run = tmp_path / "run"
    recipe = _recipe(
        run,
        [{"end_step": 2, "objective": "grpo"}],
        False,
        log={"save_every": 1, "eval_samples": 8, "plots": False},
    )
    Trainer(recipe, progress=False).fit()
    shutil.rmtree(run / "checkpoints" / "step_000002")  # killed while writing step 1's scores
    (run / "final").unlink()
    scores = run / "scores.jsonl"
    text = scores.read_text()
    scores.write_text(text[: len(text) - 20])
    Trainer(recipe, resume=True, progress=False).fit()
    assert "scores.jsonl: line 2 was cut off" in capsys.readouterr().err
    assert [json.loads(line)["step"] for line in scores.read_text().splitlines()] == [0, 1]

    scores.write_text("{not json\n" + scores.read_text())
    with pytest.raises(DataError, match=r"scores.jsonl: line 1: "):
        Trainer(recipe, resume=True, progress=False)


def test_nonfinite_steps_are_counted_and_a_run_without_final_fails(tmp_path):
    def poison(trainer, steps):
        original = trainer.train_step

        def train_step(step):
            if step not in steps:
                return original(step)
            hook = trainer.policy.lm_head.register_forward_hook(lambda mod, inp, out: out * float("nan"))
            try:
                return original(step)
            finally:
                hook.remove()

        trainer.train_step = train_step

    recipe = _recipe(tmp_path / "some", [{"end_step": 3, "objective": "sft"}], False, max_nonfinite=5)
    trainer = Trainer(recipe, progress=False)
    poison(trainer, {0})
    trainer.fit()
    summary = json.loads((tmp_path / "some" / "summary.json").read_text())
    assert summary["nonfinite_skipped"] == 1 and summary["final"] == "checkpoints/step_000003"
    # The skipped step's losses are NaN, not a perfect-looking 0.0; the plots leave them out.
    rows = metrics(tmp_path / "some")
    assert all(math.isnan(rows[0][f"loss/{k}"]) for k in ("policy", "kl", "sft", "anchor"))
    assert rows[1]["loss/sft"] > 0 and rows[1]["loss/anchor"] == 0.0
    assert tmp_path / "some" / "plots" / "lambda.png" in plots.plot_run(tmp_path / "some")

    recipe = _recipe(tmp_path / "all", [{"end_step": 3, "objective": "sft"}], False, max_nonfinite=5)
    trainer = Trainer(recipe, progress=False)
    poison(trainer, {0, 1, 2})
    with pytest.raises(NonFiniteError, match="no final checkpoint"):
        trainer.fit()
    summary = json.loads((tmp_path / "all" / "summary.json").read_text())
    assert summary["nonfinite_skipped"] == 3 and summary["final"] is None
    assert not (tmp_path / "all" / "final").exists()


def test_reward_from_the_users_own_file(tmp_path):
    """`reward:` takes a .py file defining batch_reward(responses, labels), or OpenRLHF's
    reward_func(queries, prompts, labels) as `--reward.remote_url` calls it (query = prompt + response)."""
    user = tmp_path / "user_reward.py"
    user.write_text(
        "import torch\n"
        "def reward_func(queries, prompts, labels, **kwargs):\n"
        "    starts = [float(q.startswith(p) and len(q) > len(p)) for q, p in zip(queries, prompts)]\n"
        "    triples = zip(queries, prompts, labels)\n"
        "    r = torch.tensor([float(str(lab) in q[len(p):]) for q, p, lab in triples])\n"
        "    return {'rewards': r, 'scores': r, 'extra_logs': {'query_has_prompt': torch.tensor(starts)}}\n"
    )
    batched = tmp_path / "batched_reward.py"
    batched.write_text(
        "import torch\n"
        "def batch_reward(responses, labels):\n"
        "    return torch.full((len(responses),), 0.25), {'n': torch.ones(len(responses))}\n"
    )
    for path, check in [(user, "reward/query_has_prompt"), (batched, "reward/n")]:
        recipe = base_recipe(
            tmp_path / path.stem,
            data={"train": str(warm_run() / "data" / "train.jsonl")},
            reward=str(path),
            model={"path": str(warm_run() / "final")},
            steps=1,
            stages=[{"end_step": 1, "objective": "grpo"}],
        )
        del recipe["task"]
        Trainer(load_recipe(None, base=recipe), progress=False).fit()
        row = metrics(tmp_path / path.stem)[0]
        assert row[check] == 1.0, row
        assert path is user or row["reward/raw"] == 0.25

    bad = tmp_path / "no_reward.py"
    bad.write_text("x = 1\n")
    with pytest.raises(RecipeError, match=r"reward: reward '.*no_reward.py' defines neither batch_reward"):
        load_recipe(None, base={**recipe, "reward": str(bad)})


def test_reward_output_is_checked_where_every_backend_calls_it(tmp_path):
    """call_reward (the local trainer, eval, TRL and prepare-data all call rewards through it) turns what a
    reward returns into a float32 tensor of one finite reward per response, metrics of the same length, or
    a ValueError naming the reward file and the count or the first bad sample."""
    from reward_fns.combine import call_reward, load_reward

    responses, labels, prompts = ["a", "b", "c"], ["1", "2", "3"], ["p", "q", "r"]

    def reward(stem: str, body: str):
        path = tmp_path / f"{stem}.py"
        path.write_text(f"import torch\ndef batch_reward(responses, labels):\n    return {body}\n")
        return path, load_reward(str(path))

    path, listed = reward("listed", "[1, 0, True], {'n': [1, 1, 1]}")
    rewards, extras = call_reward(listed, responses, labels, prompts)
    assert rewards.dtype == torch.float32 and rewards.tolist() == [1.0, 0.0, 1.0]
    assert extras["n"].dtype == torch.float32 and extras["n"].shape == (3,)
    for stem, body, message in [
        ("long", "torch.zeros(len(responses) + 4), {}", r"7 rewards for 3 responses"),
        ("short", "torch.ones(len(responses) - 1), {}", r"2 rewards for 3 responses"),
        ("bare", "torch.ones(len(responses))", r"returned Tensor, expected \(rewards, metrics dict\)"),
        ("nan", "torch.tensor([1.0, float('nan'), float('inf')]), {}",
         r"non-finite reward nan for sample 1 \(2 of 3\)"),
        ("metric", "torch.ones(3), {'x': torch.ones(2)}", r"metric 'x': 2 values for 3 responses"),
        ("words", "['yes', 'no', 'no'], {}", r"rewards are not numbers"),
    ]:
        path, fn = reward(stem, body)
        with pytest.raises(ValueError, match=rf"reward '{path}:batch_reward': {message}"):
            call_reward(fn, responses, labels, prompts)
    # OpenRLHF's reward_func files keep the rule they had, now call_reward's
    path = tmp_path / "func.py"
    path.write_text("def reward_func(queries, prompts, labels):\n    return {'rewards': [1.0] * 5}\n")
    with pytest.raises(ValueError, match=rf"reward '{path}': 5 rewards for 3 responses"):
        call_reward(load_reward(str(path)), responses, labels, prompts)


def test_a_reward_still_running_after_the_notice_time_is_named_and_left_running(monkeypatch):
    """A reward that hangs never returns: call_reward names it on stderr after SLOW_REWARD_NOTICE_S, without
    stopping it (a slow reward still finishes and counts). The reward below returns only once the notice was
    written, so the test does not depend on timing."""
    import io
    import threading

    from reward_fns import combine

    noticed = threading.Event()

    class Stderr(io.StringIO):
        def write(self, text: str) -> int:
            if "no result after" in text:
                noticed.set()
            return super().write(text)

    def slow_reward(responses, labels):
        assert noticed.wait(timeout=60), "no notice while the reward ran"
        return [1.0] * len(responses), {}

    stderr = Stderr()
    monkeypatch.setattr(combine, "SLOW_REWARD_NOTICE_S", 0.01)
    monkeypatch.setattr(combine.sys, "stderr", stderr)
    rewards, _ = combine.call_reward(slow_reward, ["a", "b"], ["1", "2"], ["p", "q"])
    assert rewards.tolist() == [1.0, 1.0]
    notice = ".slow_reward': no result after 0 s for 2 responses; if it hangs, stop the run"
    assert f"reward '{__file__}:" in stderr.getvalue() and notice in stderr.getvalue()


def _killed_while_writing(name: str):
    """Path.write_text that, for the file `name` (or the name.tmp it is replaced from), writes half the text
    and stops as a kill would (KeyboardInterrupt: nothing after it runs)."""
    write_text = Path.write_text

    def write(self, data, *args, **kwargs):
        if self.name in (name, name + ".tmp"):
            write_text(self, data[: len(data) // 2])
            raise KeyboardInterrupt
        return write_text(self, data, *args, **kwargs)

    return write


def test_a_kill_while_a_resume_rewrites_its_logs_loses_no_row(tmp_path, monkeypatch):
    """A resume rewrites metrics.jsonl and scores.jsonl without the rows after its checkpoint. Rewritten in
    place, a kill lost the rows not yet written again, for good (steps [0, 2] here)."""
    run = tmp_path / "run"
    recipe = _recipe(run, [{"end_step": 2, "objective": "sft"}], False, log={"save_every": 1, "plots": False})
    Trainer(recipe, progress=False).fit()
    longer = dataclasses.replace(recipe, steps=3)
    with monkeypatch.context() as patch:
        patch.setattr(Path, "write_text", _killed_while_writing("metrics.jsonl"))
        with pytest.raises(KeyboardInterrupt):
            Trainer(longer, resume=True, progress=False)
    Trainer(longer, resume=True, progress=False).fit()
    assert [r["step"] for r in metrics(run)] == [0, 1, 2]


def test_config_yaml_is_replaced_whole_and_the_checkpoint_keeps_the_recipe(tmp_path, monkeypatch):
    """A kill while a resume rewrites config.yaml leaves the old one; and a resume of a run whose config.yaml
    is unreadable is checked against the recipe its checkpoint keeps (it was taken whatever it changed)."""
    run = tmp_path / "run"
    recipe = _recipe(run, [{"end_step": 1, "objective": "sft"}], False, log={"save_every": 1, "plots": False})
    Trainer(recipe, progress=False).fit()
    written = (run / "config.yaml").read_text()
    with monkeypatch.context() as patch:
        patch.setattr(Path, "write_text", _killed_while_writing("config.yaml"))
        with pytest.raises(KeyboardInterrupt):
            Trainer(dataclasses.replace(recipe, steps=2), resume=True, progress=False)
    assert (run / "config.yaml").read_text() == written

    (run / "config.yaml").write_text("steps: [\n")  # damaged some other way
    other = dataclasses.replace(recipe, steps=2, seed=7, optim=dataclasses.replace(recipe.optim, lr=0.05))
    with pytest.raises(RunDirError, match="differs from the run's recipe in step_000001") as refused:
        Trainer(other, resume=True, progress=False)
    assert "\n  seed: 0 -> 7\n  optim.lr: 0.001 -> 0.05\n" in str(refused.value)
    Trainer(dataclasses.replace(recipe, steps=2), resume=True, progress=False).fit()
    assert yaml.safe_load((run / "config.yaml").read_text())["steps"] == 2


def test_a_resume_that_only_finishes_links_final(tmp_path):
    """RUN/final and summary.json's "final" name the last step's checkpoint also when the resume has no
    step left to train: killed between the last checkpoint and its link, or `steps` lowered to the newest
    checkpoint's (both used to finish with exit 0, no link and "final": null)."""
    run = tmp_path / "run"
    log = {"save_every": 2, "eval_samples": 0, "plots": False}
    recipe = _recipe(run, [{"end_step": 3, "objective": "sft"}], False, log=log)
    Trainer(recipe, progress=False).fit()
    (run / "final").unlink()  # killed after checkpoints/step_000003 was complete
    (run / "summary.json").unlink()
    Trainer(recipe, resume=True, progress=False).fit()
    assert os.readlink(run / "final") == "checkpoints/step_000003"
    assert json.loads((run / "summary.json").read_text())["final"] == "checkpoints/step_000003"

    shutil.rmtree(run / "checkpoints" / "step_000003")  # killed before it, then ended at step 2
    Trainer(dataclasses.replace(recipe, steps=2), resume=True, progress=False).fit()
    assert os.readlink(run / "final") == "checkpoints/step_000002"
    assert json.loads((run / "summary.json").read_text())["final"] == "checkpoints/step_000002"


@pytest.mark.parametrize(
    "setting, message",
    [
        ("optim.warmup_steps=-4", "optim.warmup_steps must be >= 0, got -4"),
        ("optim.weight_decay=-1", "optim.weight_decay must be >= 0, got -1.0"),
        ("optim.beta1=1.5", "optim.beta1 must be in [0, 1), got 1.5"),
        ("optim.beta2=-0.1", "optim.beta2 must be in [0, 1), got -0.1"),
        ("loss.kl_coef=-0.5", "loss.kl_coef must be a finite number >= 0, got -0.5"),
        ("loss.clip_low=-1", "loss.clip_low must be in [0, 1), got -1.0"),
        ("loss.clip_low=1", "loss.clip_low must be in [0, 1), got 1.0"),
        ("loss.clip_high=-0.2", "loss.clip_high must be >= 0, got -0.2"),
        ("threads=-1", "threads must be >= 0 (0: torch's default), got -1"),
        ("log.eval_samples=-6", "log.eval_samples must be >= 0 (0: no eval), got -6"),
    ],
)
def test_out_of_range_settings_are_named_before_any_work(tmp_path, setting, message):
    """Each used to train silently (a negative warm-up gave a negative learning rate) or fail with torch's
    words, after the run directory was written."""
    config = tmp_path / "recipe.yaml"
    config.write_text(yaml.safe_dump(base_recipe(tmp_path / "run")))
    with pytest.raises(RecipeError) as refused:
        load_recipe(config, [setting])
    assert str(refused.value) == f"{config}: {message}"
    assert not (tmp_path / "run").exists()


def test_oracle_selection_needs_a_flaw_bonus_to_select_by(tmp_path):
    """`aapa.selection: oracle` is refused at validation with an SFT stage that anchors (the reward does not
    score its rollouts), and at startup with a reward that logs no flaw_bonus, leaving a failed start, not
    a run (both used to fail at step 0 with a bare ValueError, leaving a run to --overwrite)."""
    aapa = {"selection": "oracle", "discriminator": str(discriminator_dir())}
    staged = [{"end_step": 1, "objective": "grpo"}, {"end_step": 2, "objective": "sft", **AAPA}]
    with pytest.raises(RecipeError, match=r"aapa.selection: oracle .* aapa.stages.1 \(sft with lam"):
        load_recipe(None, base=base_recipe(tmp_path / "run", stages=staged, aapa=aapa))

    plain = tmp_path / "plain.py"
    plain.write_text(
        "import torch\ndef batch_reward(responses, labels):\n    return torch.ones(len(responses)), {}\n"
    )
    stages = [{"end_step": 2, "objective": "grpo", **AAPA}]
    recipe = base_recipe(tmp_path / "run", stages=stages, aapa=aapa, reward=str(plain))
    with pytest.raises(RewardError, match=rf"reward '{plain}:batch_reward' logs no per-sample 'flaw_bonus'"):
        Trainer(load_recipe(None, base=recipe), progress=False)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["config.yaml", "data"]


def test_nonfinite_logits_in_the_rollout_skip_the_step(tmp_path):
    """NaN logits while sampling (say a bf16 overflow in the generation path only) skip and count the step,
    as a non-finite loss does, and the policy trains on afterwards (it used to stop the run with torch's
    multinomial error)."""
    recipe = _recipe(tmp_path / "run", [{"end_step": 3, "objective": "grpo"}], False)
    trainer = Trainer(recipe, progress=False)
    original = trainer.train_step

    def train_step(step):
        if step != 1:
            return original(step)
        hook = trainer.policy.lm_head.register_forward_hook(
            lambda mod, inp, out: None if torch.is_grad_enabled() else out * float("nan")
        )
        try:
            return original(step)
        finally:
            hook.remove()

    trainer.train_step = train_step
    trainer.fit()
    rows = metrics(tmp_path / "run")
    assert [r["nonfinite_skipped"] for r in rows] == [0, 1, 0] and math.isnan(rows[1]["loss/policy"])
    assert "logp/rollout" in rows[2] and trainer.policy.training  # the sampling after it ran


def test_rollout_log_probs_are_logged_at_temperature_1_like_the_experts(tmp_path):
    """logp/rollout and logp/expert are plotted together: both are under the policy at temperature 1, while
    the loss keeps the sampling temperature (logp/rollout used to be tempered)."""
    rollout = {"prompts_per_step": 4, "group_size": 4, "max_new_tokens": 40, "temperature": 0.5}
    trainer = Trainer(_recipe(tmp_path / "run", SCHEDULES["grpo"], False, rollout=rollout), progress=False)
    original, plain = trainer.policy_gradient, []

    def policy_gradient(values, batch, advantages):
        with torch.no_grad():
            lp = response_log_probs(trainer.policy, batch)
        plain.append(((lp * batch.response_mask).sum(-1) / batch.response_mask.sum(-1)).tolist())
        return original(values, batch, advantages)

    trainer.policy_gradient = policy_gradient
    row, scores = trainer.train_step(0)
    trainer.close()
    assert scores["logp_rollout"] == pytest.approx(plain[0], abs=1e-5)
    assert row["logp/rollout"] == pytest.approx(sum(plain[0]) / len(plain[0]), abs=1e-5)

