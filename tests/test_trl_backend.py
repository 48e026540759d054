"""The TRL backend for real: TRL 1.16.0's GRPOTrainer with AAPA on the SFT-warmed tiny model, on CPU.

`aapa-rl trl` end to end (anchor loss, shaped rewards, hard set, weights updated, checkpoint + resume with the
schedule's state), the anchor term's gradient under gradient accumulation 1 and 4, and the same AAPA terms as
the local trainer for the same batch.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import gpu_stand_ins_hidden
from local_helpers import RAISING_REWARD, TASK, base_recipe, discriminator_dir, warm_run

if sys.version_info < (3, 11):  # pyproject's `trl` extra is not installed there: nothing to test
    pytest.skip("TRL 1.16.0 needs Python >= 3.11", allow_module_level=True)

with gpu_stand_ins_hidden():  # TRL looks for vLLM as it loads: it must find it absent, as on this machine
    import trl.trainer.grpo_trainer  # noqa: F401

from aapa_rl.cli import main as cli_main  # noqa: E402
from aapa_rl.settings import ConfigError  # noqa: E402
from aapa_rl.trl_backend.cli import check, load  # noqa: E402

STAGE = {"end_step": 100, "objective": "grpo", "alpha": 0.5, "lam": 1.0, "rho": 0.5}
PLAIN = {"stages": [{"end_step": 10, "objective": "grpo"}], "discriminator": None}  # TRL's GRPO alone


def write_config(tmp_path: Path, *, aapa: dict | None = None, **trl) -> Path:
    config = {
        "model": str(warm_run() / "final"),
        "task": dict(TASK),
        "reward": "arithmetic",
        "threads": 1,
        "aapa": {"stages": [STAGE], "discriminator": str(discriminator_dir()), **(aapa or {})},
        "trl": {
            "output_dir": str(tmp_path / "out"),
            "use_cpu": True,
            "bf16": False,
            "seed": 1,
            "max_steps": 3,
            "learning_rate": 1e-3,
            "per_device_train_batch_size": 16,  # 4 prompts x 4 completions
            "num_generations": 4,
            "max_completion_length": 40,
            "logging_steps": 1,
            "save_steps": 2,
            "report_to": [],
            "disable_tqdm": True,
            **trl,
        },
    }
    path = tmp_path / "trl.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def history(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path / "model.safetensors")


def test_aapa_rl_trl_trains_checkpoints_and_resumes_with_the_schedule_state(tmp_path):
    # Adaptive lambda: its state lives only in the plugin's checkpoint state, so resuming must restore it.
    aapa = {"adaptive": {"target_gap": 0.01, "rate": 0.5, "lam_min": 0.0, "lam_max": 100.0}}
    config = write_config(tmp_path, aapa=aapa)
    assert cli_main(["trl", "--config", str(config)]) == 0
    out = tmp_path / "out"
    steps = [row for row in history(out) if "aapa/lambda" in row]
    assert [row["step"] for row in steps] == [1, 2, 3]
    for row in steps:
        assert row["aapa/hard_set_size"] == 2  # ceil(0.5 x 4 prompts)
        assert row["aapa/anchor_loss"] > 0 and row["aapa/anchor_tokens"] > 0
        assert row["rewards/aapa_shaping/mean"] < 0  # alpha * log D with D < 1
        # TRL's reward is the shaped one: r + alpha * s, as the core computes it
        assert row["reward"] == pytest.approx(row["aapa/reward_shaped_mean"], abs=1e-5)
        assert "reward/format" in row and "aapa/gap_mean" in row
        # the spec's log-probabilities under the policy: TRL's rollouts and the expert rows trained on
        assert row["aapa/rollout_logp_mean"] < 0 and row["aapa/expert_logp_mean"] < 0
    lams = [row["aapa/lambda"] for row in steps]
    assert lams[0] == 1.0 and lams[1] == pytest.approx(1.5) and lams[2] == pytest.approx(2.25)  # gap > target

    assert (out / "curves.png").stat().st_size > 10_000  # the training curves, as a PNG beside the metrics
    assert (out / "disc_hist.png").stat().st_size > 10_000  # D of the rollouts against the experts'
    scores = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert [row["step"] for row in scores] == [0, 1, 2] and len(scores[0]["d_rollout"]) == 16
    start, final = weights(warm_run() / "final"), weights(out / "final")
    assert any(not torch.equal(start[k], final[k]) for k in start)  # the policy moved
    state = json.loads((out / "checkpoint-2" / "aapa_state.json").read_text())
    assert state["schedule"]["adaptive_lam"] == pytest.approx(2.25) and state["anchors_total"] == 4

    # Resume from the last checkpoint (step 3) for 2 more steps: the schedule continues, lambda included.
    resumed = yaml.safe_load(config.read_text())
    resumed["trl"]["max_steps"] = 5
    config.write_text(yaml.safe_dump(resumed))
    assert cli_main(["trl", "--config", str(config)]) == 2  # refuses to start afresh over checkpoints
    assert cli_main(["trl", "--config", str(config), "--resume"]) == 0
    later = [row for row in history(out) if "aapa/lambda" in row]
    assert [row["step"] for row in later] == [1, 2, 3, 4, 5]  # the checkpoint's history, then steps 4 and 5
    assert later[3]["aapa/lambda"] == pytest.approx(1.5**3)  # raised after each of steps 1-3
    assert later[-1]["aapa/anchors_total"] == 10
    scores = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert [row["step"] for row in scores] == [0, 1, 2, 3, 4]  # the checkpoint (step 3) was the last one


def test_resume_without_a_checkpoint_is_a_named_error(tmp_path, capsys):
    config = write_config(tmp_path)
    assert cli_main(["trl", "--config", str(config), "--resume"]) == 2
    assert "holds no complete checkpoint-* to resume from" in capsys.readouterr().out


def test_a_checkpoint_whose_save_was_cut_short_is_skipped_on_resume(tmp_path, capsys):
    """A kill mid-save leaves the newest checkpoint without trainer_state.json (the Trainer's last file) or,
    from earlier versions, aapa_state.json: resuming names each and starts from the newest complete one (it
    used to fail on the newest, whatever it held)."""
    config = write_config(tmp_path, max_steps=3, save_steps=1)
    assert cli_main(["trl", "--config", str(config)]) == 0
    out = tmp_path / "out"
    (out / "checkpoint-3" / "aapa_state.json").unlink()
    (out / "checkpoint-2" / "trainer_state.json").unlink()
    capsys.readouterr()
    assert cli_main(["trl", "--config", str(config), "--resume"]) == 0
    err = capsys.readouterr().err
    assert f"warning: {out / 'checkpoint-3'} is incomplete (no aapa_state.json: a save cut short)" in err
    assert f"warning: {out / 'checkpoint-2'} is incomplete (no trainer_state.json: a save cut short)" in err
    for step in (2, 3):  # steps 2 and 3 trained again from checkpoint-1, and saved whole
        assert (out / f"checkpoint-{step}" / "trainer_state.json").exists()
        assert (out / f"checkpoint-{step}" / "aapa_state.json").exists()
    assert [row["step"] for row in history(out) if "aapa/lambda" in row] == [1, 2, 3]
    scores = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert [row["step"] for row in scores] == [0, 1, 2]  # from checkpoint-1 on, each step once


def test_a_kill_once_old_checkpoints_are_deleted_leaves_the_new_one_complete(tmp_path, monkeypatch):
    """The Trainer deletes checkpoints beyond save_total_limit at the end of a save: the AAPA state must be in
    the new checkpoint by then, else a kill there leaves no checkpoint to resume from."""
    import transformers.trainer

    class Killed(BaseException):
        pass

    rotate = transformers.trainer.rotate_checkpoints

    def killed_after_the_second(*args, **kwargs):
        rotate(*args, **kwargs)
        if (tmp_path / "out" / "checkpoint-2").exists():
            raise Killed

    monkeypatch.setattr(transformers.trainer, "rotate_checkpoints", killed_after_the_second)
    config = write_config(tmp_path, max_steps=3, save_steps=1, save_total_limit=1)
    with pytest.raises(Killed):
        cli_main(["trl", "--config", str(config)])
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    assert (out / "checkpoint-2" / "trainer_state.json").exists()
    assert (out / "checkpoint-2" / "aapa_state.json").exists()


def test_an_evaluation_between_reused_batches_keeps_the_aapa_terms(tmp_path):
    """With num_iterations 2, TRL trains twice on each generation batch; an evaluation between the two
    optimizer steps must not drop the anchor term of the second one."""
    from aapa_rl.local.task import ArithmeticTask

    eval_file = ArithmeticTask(**TASK).write(tmp_path / "data")["eval"]
    config = write_config(tmp_path, num_iterations=2, max_steps=4, eval_strategy="steps", eval_steps=1,
                          per_device_eval_batch_size=16)
    with_eval = {**yaml.safe_load(config.read_text()), "data": {"eval": str(eval_file)}}
    config.write_text(yaml.safe_dump(with_eval))
    assert cli_main(["trl", "--config", str(config)]) == 0
    steps = [row for row in history(tmp_path / "out") if "aapa/anchor_loss" in row]
    assert [row["step"] for row in steps] == [1, 2, 3, 4]
    assert any("eval_loss" in row for row in history(tmp_path / "out"))


def test_a_non_finite_loss_stops_the_run_with_a_named_error(tmp_path, monkeypatch):
    """TRL's loss or an expert term: the expert forward (prompt + expert) can overflow when TRL's does not."""
    from trl import GRPOTrainer

    import aapa_rl.trl_backend.trainer as backend

    trainer = _trainer(tmp_path)
    trainer.model.train()
    trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    with monkeypatch.context() as patch:
        patch.setattr(backend, "anchor_loss", lambda *a, **k: torch.tensor(float("nan")))
        with pytest.raises(FloatingPointError, match="non-finite loss nan at step 0"):
            trainer.compute_loss(trainer.model, trainer._buffered_inputs[0])
    monkeypatch.setattr(GRPOTrainer, "compute_loss", lambda *a, **k: torch.tensor(float("nan")))
    with pytest.raises(FloatingPointError, match="non-finite loss nan at step 0"):
        trainer.compute_loss(trainer.model, trainer._buffered_inputs[0])


def test_a_reward_that_raises_mid_run_stops_it_with_a_named_error(tmp_path, capsys):
    """As in the local trainer: the reward's traceback (the user's aid), then the error naming the reward, the
    exception and the step, and the last checkpoint, exit code 2 (it used to end in a bare traceback)."""
    raising = tmp_path / "raising.py"
    raising.write_text(RAISING_REWARD)
    config = write_config(tmp_path, max_steps=3, save_steps=2)
    config.write_text(yaml.safe_dump({**yaml.safe_load(config.read_text()), "reward": str(raising)}))
    assert cli_main(["trl", "--config", str(config)]) == 2
    printed = capsys.readouterr()
    assert f'File "{raising}", line 6, in batch_reward' in printed.err
    assert "KeyError: 'no such label'" in printed.err
    last = tmp_path / "out" / "checkpoint-2"
    assert f"aapa-rl trl: reward '{raising}:batch_reward' raised KeyError at step 2: 'no such label'\n" \
        f"last checkpoint: {last} (fix the cause, then --resume)" in printed.out


@pytest.mark.parametrize("aapa", [PLAIN, None], ids=["plain", "aapa"])
def test_unscorable_completions_keep_trls_zero_advantage(tmp_path, aapa):
    """A completion for which every reward function returns None is unscorable: TRL takes it out of the group
    baseline with advantage 0. The shaping column must not make it scorable (plain stage; AAPA's, default)."""
    trainer = _trainer(tmp_path, aapa=aapa)
    trainer.model.train()
    trainer.reward_funcs[0] = lambda completions, **_: [i % 2 or None for i in range(len(completions))]
    output = trainer._generate_and_score_completions(next(iter(trainer.get_train_dataloader())))
    assert output["advantages"][::2].eq(0).all()  # the even rows: unscorable
    if aapa is None:  # with AAPA: the critic's shaping is filled in, and NaN for those rows again
        assert trainer.aapa_batch["columns"][::2, -1].isnan().all()
        # and the task reward's mean leaves them out, as TRL's `reward` does (it read 0 for them: 0.5)
        assert trainer.aapa_batch["anchor"].metrics["reward_raw_mean"] == 1.0


def test_the_callers_config_is_left_as_it_was_and_environments_are_refused(tmp_path):
    from aapa_rl.trl_backend.cli import build_trainer

    run = load(write_config(tmp_path, reward_weights=[1.0]))
    _, bad, loaded = check(run)
    assert not bad, bad
    assert build_trainer(run, loaded).reward_weights.tolist() == [1.0, 1.0]  # the task's, then the shaping's
    assert run.config.reward_weights == [1.0]
    assert build_trainer(run, loaded).reward_weights.tolist() == [1.0, 1.0]  # a second trainer, same config
    with pytest.raises(ValueError, match="environment_factory is not supported"):
        from aapa_rl.trl_backend.trainer import AapaGRPOTrainer

        AapaGRPOTrainer(model=run.model, args=run.config, aapa=run.aapa, environment_factory=object)


def test_a_changed_stage_schedule_is_refused_on_resume(tmp_path, capsys):
    config = write_config(tmp_path, max_steps=2, save_steps=2)
    assert cli_main(["trl", "--config", str(config)]) == 0
    changed = yaml.safe_load(config.read_text())
    changed["aapa"]["stages"][0]["lam"] = 2.0
    changed["trl"]["max_steps"] = 3
    config.write_text(yaml.safe_dump(changed))
    assert cli_main(["trl", "--config", str(config), "--resume"]) == 2
    printed = capsys.readouterr().out
    assert "aapa_state.json: checkpoint was written with a different stage schedule" in printed


def _trainer(tmp_path: Path, aapa: dict | None = None, reward: str | None = None, **trl):
    """An AapaGRPOTrainer built as `aapa-rl trl` builds it, without training."""
    from aapa_rl.trl_backend.cli import build_trainer

    config = write_config(tmp_path, aapa=aapa, **trl)
    if reward is not None:
        config.write_text(yaml.safe_dump({**yaml.safe_load(config.read_text()), "reward": reward}))
    run = load(config)
    ok, bad, loaded = check(run)
    assert not bad, bad
    trainer = build_trainer(run, loaded)
    # What TRL's training loop sets before its micro-steps; these tests call them one by one.
    trainer.current_gradient_accumulation_steps = run.config.gradient_accumulation_steps
    return trainer


def _accumulated_grads(trainer, lam: float) -> dict[str, torch.Tensor]:
    """The gradient of one optimizer step's micro-steps over the buffered generation batch, at this lambda."""
    trainer.model.zero_grad(set_to_none=True)
    trainer._aapa_values.lam = lam
    for j, inputs in enumerate(trainer._buffered_inputs):
        trainer._step = j
        trainer.compute_loss(trainer.model, inputs).backward()
    return {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("accumulation", [1, 4])
def test_the_anchor_gradient_is_lam_times_the_gradient_of_l_anchor(tmp_path, accumulation):
    from aapa_rl.local.policy import pack, response_log_probs
    from aapa_rl.objectives import anchor_loss

    torch.manual_seed(0)
    trainer = _trainer(
        tmp_path, gradient_accumulation_steps=accumulation, per_device_train_batch_size=16 // accumulation
    )
    trainer.model.train()
    batch = next(iter(trainer.get_train_dataloader()))
    trainer._prepare_inputs(batch)  # rollout, reward, critic, H: this step's generation batch
    assert len(trainer._buffered_inputs) == accumulation
    batch = trainer.aapa_batch
    anchor, experts = batch["anchor"], batch["experts"]
    assert len(anchor.hard_set) == 2

    lam = 0.7
    with_anchor = _accumulated_grads(trainer, lam)
    without = _accumulated_grads(trainer, 0.0)

    # L_anchor over H computed independently: the local trainer's packing and log-probs, the core's loss.
    prompts = [batch["prompts"][i] for i in anchor.hard_set.tolist()]
    hard_experts = [experts[i] for i in anchor.hard_set.tolist()]
    trainer.model.zero_grad(set_to_none=True)
    rows = pack(trainer.processing_class, prompts, hard_experts, torch.device("cpu"))
    log_probs = response_log_probs(trainer.model, rows)
    anchor_loss(log_probs, rows.response_mask, anchor.hard_weights).backward()
    direct = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}

    for name, grad in direct.items():
        torch.testing.assert_close(with_anchor[name] - without[name], lam * grad, rtol=1e-4, atol=1e-6)


def test_a_chord_stage_mixes_trls_loss_with_the_phi_weighted_expert_nll_and_the_anchor(tmp_path):
    """chord: grad = (1 - mu) grad L_trl + mu grad L_sft_phi(the batch's experts) + lam grad L_anchor(H),
    under gradient accumulation 2; mu is CHORD's, counted from the stage's start."""
    from trl import GRPOTrainer

    from aapa_rl.local.policy import pack, response_log_probs
    from aapa_rl.objectives import anchor_loss, sft_loss

    stages = [{"end_step": 100, "objective": "chord", "alpha": 0.5, "lam": 0.8, "rho": 0.5}]
    chord = {"warmup_steps": 0, "decay_steps": 10, "peak": 0.9, "valley": 0.1, "phi": True}
    torch.manual_seed(0)
    trainer = _trainer(tmp_path, aapa={"stages": stages, "chord": chord}, gradient_accumulation_steps=2,
                       per_device_train_batch_size=8)
    trainer.model.train()
    trainer.state.global_step = 3  # mu(3) on the cosine from 0.9 to 0.1 over 10 steps
    trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    values, batch = trainer._aapa_values, trainer.aapa_batch
    assert values.objective == "chord" and 0.1 < values.mu < 0.9

    def grads(loss_of) -> dict[str, torch.Tensor]:
        trainer.model.zero_grad(set_to_none=True)
        for j, inputs in enumerate(trainer._buffered_inputs):
            trainer._step = j
            loss_of(inputs).backward()
        return {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}

    total = grads(lambda inputs: trainer.compute_loss(trainer.model, inputs))
    host = grads(lambda inputs: GRPOTrainer.compute_loss(trainer, trainer.model, inputs))

    def direct(rows: list[int], loss_of) -> dict[str, torch.Tensor]:
        trainer.model.zero_grad(set_to_none=True)
        packed = pack(trainer.processing_class, [batch["prompts"][i] for i in rows],
                      [batch["experts"][i] for i in rows], torch.device("cpu"))
        loss_of(response_log_probs(trainer.model, packed), packed.response_mask).backward()
        return {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}

    anchor = batch["anchor"]
    expert_nll = direct(list(range(len(batch["experts"]))), lambda lp, m: sft_loss(lp, m, phi=True))
    anchored = direct(anchor.hard_set.tolist(), lambda lp, m: anchor_loss(lp, m, anchor.hard_weights))
    for name, grad in total.items():
        expected = (1 - values.mu) * host[name] + values.mu * expert_nll[name] + values.lam * anchored[name]
        torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-6)


def test_an_sft_stage_shapes_alone_with_the_group_mean_and_trains_on_the_experts(tmp_path):
    stages = [{"end_step": 1, "objective": "sft", "alpha": 0.5, "lam": 0.5, "rho": 0.5},
              {"end_step": 100, "objective": "grpo", "alpha": 0.5, "lam": 0.5, "rho": 0.5}]
    config = write_config(tmp_path, aapa={"stages": stages}, max_steps=2)
    assert cli_main(["trl", "--config", str(config)]) == 0
    first, second = [row for row in history(tmp_path / "out") if "aapa/lambda" in row]
    assert first["aapa/stage"] == 0 and first["rewards/arithmetic/mean"] == 0
    assert "reward/format" not in first  # the task reward is not even computed in an SFT stage
    assert first["aapa/sft_loss"] > 0 and first["aapa/anchor_loss"] > 0
    assert first["reward"] == pytest.approx(first["rewards/aapa_shaping/mean"], abs=1e-6)
    assert second["aapa/stage"] == 1 and "reward/format" in second and "aapa/sft_loss" not in second


def test_lam_zero_leaves_trls_own_loss(tmp_path):
    from trl import GRPOTrainer

    trainer = _trainer(tmp_path, aapa={"stages": [{**STAGE, "lam": 0.0, "rho": 0.5}]})
    trainer.model.train()
    trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    assert trainer._aapa_chunks == []  # lam = 0 in a GRPO stage: no expert rows, no forward
    inputs = trainer._buffered_inputs[0]
    torch.testing.assert_close(
        trainer.compute_loss(trainer.model, inputs), GRPOTrainer.compute_loss(trainer, trainer.model, inputs)
    )


def test_the_trl_backend_and_the_local_trainer_compute_the_same_aapa_terms(tmp_path):
    """The same batch (prompts, completions, task rewards) through both backends: equal schedule values,
    shaped rewards, hard set and weights, and L_anchor."""
    from aapa_rl.local.recipe import load_recipe
    from aapa_rl.local.trainer import Trainer

    trainer = _trainer(tmp_path, aapa={"temperature": 0.5})
    trainer.model.train()
    trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    batch = trainer.aapa_batch
    anchor, experts, prompts = batch["anchor"], batch["experts"], batch["prompts"]
    values = trainer._aapa_values
    trl_loss = _trl_anchor_loss(trainer)

    recipe = base_recipe(
        tmp_path / "local",
        model={"path": str(warm_run() / "final")},
        stages=[STAGE],
        aapa={"discriminator": str(discriminator_dir()), "temperature": 0.5},
        rollout={"prompts_per_step": 4, "group_size": 4, "max_new_tokens": 40},
    )
    local = Trainer(load_recipe(None, base=recipe), progress=False)
    assert local.schedule.at(0) == values
    local_anchor, _, _ = local.score(values, prompts, experts, batch["texts"], batch["rewards"].reshape(-1))
    torch.testing.assert_close(local_anchor.shaped_rewards, anchor.shaped_rewards)
    assert local_anchor.hard_set.tolist() == anchor.hard_set.tolist()
    torch.testing.assert_close(local_anchor.hard_weights, anchor.hard_weights)
    # TRL's reward columns sum to the shaped reward that the core computes
    summed = (batch["columns"] * trainer.reward_weights).nansum(1).view(-1, trainer.num_generations)
    torch.testing.assert_close(summed, anchor.shaped_rewards)
    _, local_loss, _ = local.anchor_term(values, prompts, experts, local_anchor)
    assert local_loss == pytest.approx(trl_loss, rel=1e-5)
    local.close()


def test_trls_grpo_step_and_the_local_trainers_give_the_same_gradient_for_the_same_batch(tmp_path):
    """The base objective too: TRL's loss (dapo: token mean over the batch, on-policy) and the core's
    clipped surrogate with token-mean, on TRL's batch and advantages, move the weights alike."""
    from trl import GRPOTrainer

    from aapa_rl.local.policy import Batch, response_log_probs
    from aapa_rl.objectives import policy_loss

    by_length = tmp_path / "by_length.py"  # the warm tiny model is rarely right: a reward that always varies
    by_length.write_text("import torch\n\ndef batch_reward(responses, labels):\n"
                         "    return torch.tensor([len(r) / 40 for r in responses]), {}\n")
    trainer = _trainer(tmp_path, aapa=PLAIN, reward=str(by_length))
    trainer.model.train()
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    assert (inputs["advantages"] != 0).any()

    def grads(loss) -> dict[str, torch.Tensor]:
        trainer.model.zero_grad(set_to_none=True)
        loss.backward()
        return {n: p.grad.clone() for n, p in trainer.model.named_parameters()}

    trl_grads = grads(GRPOTrainer.compute_loss(trainer, trainer.model, inputs))
    batch = Batch(
        torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1),
        torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1),
        inputs["prompt_ids"].shape[1],
        inputs["completion_mask"].float(),
        [],
    )
    log_probs = response_log_probs(trainer.model, batch)
    core_grads = grads(policy_loss(log_probs, log_probs.detach(), inputs["advantages"], batch.response_mask))
    for name, grad in trl_grads.items():
        torch.testing.assert_close(grad, core_grads[name], rtol=1e-4, atol=1e-7)


def test_l_anchor_counts_every_expert_of_h_even_one_whose_softmax_weight_underflows(tmp_path):
    """At a small temperature, softmax(g / T) underflows for an expert of H (the core floors its weight, which
    the backend reads as membership): its tokens still count in L_anchor's denominator and anchor_tokens."""
    from aapa_rl.local.policy import pack, response_log_probs
    from aapa_rl.objectives import anchor_loss

    torch.manual_seed(0)
    trainer = _trainer(tmp_path, aapa={"temperature": 1e-4})
    trainer.model.train()
    trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    batch, anchor = trainer.aapa_batch, trainer.aapa_batch["anchor"]
    assert len(anchor.hard_set) == 2 and (anchor.hard_weights < 1e-30).any()
    trl_loss = _trl_anchor_loss(trainer)
    hard = anchor.hard_set.tolist()
    prompts, experts = [batch["prompts"][i] for i in hard], [batch["experts"][i] for i in hard]
    rows = pack(trainer.processing_class, prompts, experts, torch.device("cpu"))
    with torch.no_grad():
        core = anchor_loss(response_log_probs(trainer.model, rows), rows.response_mask, anchor.hard_weights)
    assert trl_loss == pytest.approx(float(core), rel=1e-5)
    assert trainer._metrics["train"]["aapa/anchor_tokens"][-1] == rows.response_mask.sum()


def test_the_stage_and_the_anchor_count_are_not_averaged_over_the_logging_window(tmp_path):
    """TRL's log() averages each metric's list over logging_steps: the stage and the running total must be
    the latest values."""
    stages = [{"end_step": 1, "objective": "sft", "alpha": 0.5, "lam": 0.5, "rho": 0.5},
              {"end_step": 100, "objective": "grpo", "alpha": 0.5, "lam": 0.5, "rho": 0.5}]
    trainer = _trainer(tmp_path, aapa={"stages": stages}, logging_steps=2)
    trainer.model.train()
    anchors = 0
    for step in (0, 1):
        trainer.state.global_step = step
        trainer._generate_and_score_completions(next(iter(trainer.get_train_dataloader())))
        anchors += len(trainer.aapa_batch["anchor"].hard_set)
    trainer.log({})
    logged = trainer.state.log_history[-1]
    assert logged["aapa/stage"] == 1 and logged["aapa/anchors_total"] == anchors > 0


def test_resuming_with_another_discriminator_warns(tmp_path, caplog):
    """As the OpenRLHF adapter: allowed (a copy or a retrained one), but said."""
    from aapa_rl.trl_backend.trainer import STATE_FILE

    trainer = _trainer(tmp_path)
    checkpoint = tmp_path / "out" / "checkpoint-2"
    checkpoint.mkdir(parents=True)
    state = {**trainer.aapa_state_dict(), "discriminator": "/elsewhere"}
    (checkpoint / STATE_FILE).write_text(json.dumps(state))
    with caplog.at_level("WARNING"):
        trainer._load_optimizer_and_scheduler(str(checkpoint))
    said = f"checkpoint was trained with discriminator /elsewhere, resuming with {discriminator_dir()}"
    assert said in caplog.text


def test_one_reward_processing_class_per_reward_function_is_accepted(tmp_path):
    from transformers import AutoTokenizer

    from aapa_rl.trl_backend.cli import dataset
    from aapa_rl.trl_backend.trainer import AapaGRPOTrainer

    run = load(write_config(tmp_path, aapa=PLAIN))
    _, _, loaded = check(run)
    tokenizer = AutoTokenizer.from_pretrained(run.model)
    trainer = AapaGRPOTrainer(
        model=run.model, reward_funcs=[lambda completions, **_: [0.0] * len(completions)], args=run.config,
        reward_processing_classes=[tokenizer], train_dataset=dataset(loaded["train"], False), aapa=run.aapa,
    )
    assert trainer.reward_processing_classes == [tokenizer, None]  # the shaping column's: none


def _trl_anchor_loss(trainer) -> float:
    for j, inputs in enumerate(trainer._buffered_inputs):
        trainer._step = j
        trainer.compute_loss(trainer.model, inputs)
    return trainer._metrics["train"]["aapa/anchor_loss"][-1]  # logged after the window's last micro-step


def test_reward_fns_serve_as_trl_reward_functions(tmp_path):
    from aapa_rl.trl_backend.trainer import trl_reward
    from reward_fns.combine import load_reward

    logged = {}
    math_reward = trl_reward(load_reward("math"), "math")
    out = math_reward(
        prompts=["What is 2+2?", "What is 3+3?"],
        completions=["The answer is \\boxed{4}", [{"role": "assistant", "content": "\\boxed{7}"}]],
        label_json=[json.dumps("4"), json.dumps("6")],
        log_metric=lambda name, value: logged.setdefault(name, value),
    )
    assert out == [1.0, 0.0] and math_reward.__name__ == "math"
    assert any(name.startswith("reward/") for name in logged)

    own = tmp_path / "my_reward.py"  # OpenRLHF's reward_func(queries, prompts, labels): queries = p + r
    own.write_text("def reward_func(queries, prompts, labels):\n"
                   "    return [float(q.endswith(l)) for q, l in zip(queries, labels)]\n")
    mine = trl_reward(load_reward(str(own)), "mine")
    assert mine(prompts=["a", "b"], completions=["xy", "z"], label=["y", "q"]) == [1.0, 0.0]


def test_the_dry_run_names_each_problem(tmp_path, capsys):
    config = write_config(
        tmp_path,
        aapa={"discriminator": str(tmp_path / "nowhere")},
        gradient_accumulation_steps=2,
        steps_per_generation=4,
        per_device_train_batch_size=8,
    )
    assert cli_main(["trl", "--config", str(config), "--dry-run"]) == 1
    printed = capsys.readouterr().out
    assert "FAIL  aapa.discriminator" in printed and "does not exist" in printed
    assert "trl.steps_per_generation (4) must equal gradient_accumulation_steps (2)" in printed
    assert "nothing was trained" in printed

    # adaptive lambda lifts a lam of 0 at run time: its anchor term needs the same one-batch-per-step rule
    adaptive = yaml.safe_load(config.read_text())
    adaptive["aapa"] = {"stages": [{**STAGE, "lam": 0.0}], "discriminator": str(discriminator_dir()),
                        "adaptive": {"target_gap": 0.01, "rate": 0.5, "lam_min": 0.0, "lam_max": 100.0}}
    config.write_text(yaml.safe_dump(adaptive))
    assert cli_main(["trl", "--config", str(config), "--dry-run"]) == 1
    assert "trl.steps_per_generation (4) must equal" in capsys.readouterr().out

    bad = yaml.safe_load(config.read_text())
    bad["aapa"]["stages"][0]["rho"] = 2
    config.write_text(yaml.safe_dump(bad))
    assert cli_main(["trl", "--config", str(config), "--dry-run"]) == 2
    assert "trl.yaml: aapa.stages[0]: stage rho must be in [0, 1], got 2.0" in capsys.readouterr().out

    good = write_config(tmp_path)
    assert cli_main(["trl", "--config", str(good), "--dry-run"]) == 0
    assert "dry run: the config is consistent" in capsys.readouterr().out


@pytest.mark.parametrize(("change", "message"), [
    ({"threads": "two"}, "threads: expected int, got str 'two'"),
    ({"data": "train.jsonl"}, "data: expected a mapping, got str 'train.jsonl'"),
    ({"data": {"chat_template": "false"}}, "data.chat_template: expected bool, got str 'false'"),
    ({"trl": None}, "trl: expected dict, got NoneType None"),
    ({"trl": [1, 2]}, "trl: expected dict, got list"),
    ({"trl": {"num_generations": "four"}}, "trl.num_generations: expected int, got str 'four'"),
    ({"model": None}, "model: expected str, got NoneType None"),
    ({"reward": 5}, "reward: expected str or dict or list or null, got int 5"),
    (None, "expected a mapping of sections, got list"),
])
def test_a_bad_section_or_field_is_a_config_error_naming_file_and_field(tmp_path, change, message):
    config = write_config(tmp_path)
    raw = yaml.safe_load(config.read_text())
    for key, value in (change or {}).items():  # a mapping is merged into the section (trl's fields)
        raw[key] = {**raw[key], **value} if isinstance(value, dict) and key in raw else value
    if change is None:
        raw = [raw]
    config.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=f"trl.yaml: {message}"):
        load(config)


def test_a_missing_section_is_named(tmp_path):
    config = write_config(tmp_path)
    raw = yaml.safe_load(config.read_text())
    del raw["aapa"]
    config.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as error:
        load(config)
    assert str(error.value) == f"{config}: missing required key(s) ['aapa']"


def test_a_value_trl_takes_beyond_its_type_hint_is_passed_on(tmp_path):
    config = write_config(tmp_path)
    raw = yaml.safe_load(config.read_text())
    raw["trl"]["scale_rewards"] = False  # hinted str; TRL maps False to "none"
    config.write_text(yaml.safe_dump(raw))
    assert load(config).config.scale_rewards == "none"


def test_a_model_that_is_neither_a_directory_nor_a_hub_id_is_named(tmp_path):
    config, missing = write_config(tmp_path), str(tmp_path / "no" / "dir")
    config.write_text(yaml.safe_dump({**yaml.safe_load(config.read_text()), "model": missing}))
    _, bad, _ = check(load(config))
    assert bad == [f"model '{missing}': no such directory, and not a hub id"]


def test_the_trl_config_spells_the_same_aapa_settings(tmp_path):
    from aapa_rl.local.recipe import load_recipe

    run = load(write_config(tmp_path))
    recipe = base_recipe(tmp_path / "local", stages=[STAGE], aapa={"discriminator": str(discriminator_dir())})
    assert run.aapa == load_recipe(None, base=recipe).aapa
    assert math.isclose(run.config.learning_rate, 1e-3)


def test_two_processes_share_one_hard_set_and_normalise_the_anchor_over_both(tmp_path):
    """torchrun with 2 CPU processes (gloo): 3 prompts x 8 completions, 12 per process, so one group spans
    both. The whole batch is scored on each, H is process 0's, the expert rows are split between them."""
    import os
    import subprocess
    import sys

    config = write_config(tmp_path, per_device_train_batch_size=12, num_generations=8, max_steps=2)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "aapa_rl.cli", "trl", "--config", str(config)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    steps = [row for row in history(tmp_path / "out") if "aapa/lambda" in row]
    assert [row["step"] for row in steps] == [1, 2]
    for row in steps:
        assert row["aapa/hard_set_size"] <= 2  # ceil(0.5 x 3 prompts), fewer when gaps are not positive
        assert row["reward"] == pytest.approx(row["aapa/reward_shaped_mean"], abs=1e-5)
    assert steps[-1]["aapa/anchors_total"] == sum(row["aapa/hard_set_size"] for row in steps)
    assert any(row.get("aapa/anchor_tokens", 0) > 0 for row in steps)


def test_every_trl_recipe_passes_its_own_checks_up_to_the_files_it_needs(tmp_path):
    """Each configs/trl-*.yaml loads (GPU recipes as for a dry run here); what fails is only the data,
    experts and discriminator that this machine does not have."""
    for path in sorted((Path(__file__).resolve().parents[1] / "configs").glob("trl-*.yaml")):
        run = load(path, for_dry_run=True)
        assert run.aapa.stages and run.config.num_generations > 1, path
        from aapa_rl.trl_backend.trainer import check_trainer_config

        assert check_trainer_config(run.aapa, run.config, has_critic=True) == [], path
    # The oracle selection needs the reward's per-sample flaw_bonus, which only the local trainer passes.
    run.aapa.selection = "oracle"
    problems = check_trainer_config(run.aapa, run.config, has_critic=True)
    assert problems == [
        "aapa.selection: oracle needs a reward that reports a per-sample `flaw_bonus`, which only the local "
        "trainer passes; use gap, random or all"
    ]
