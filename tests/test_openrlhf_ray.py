"""The plugin's Ray pieces on a real local Ray cluster (CPU): the policy actor's remote methods, scoring on
the actors, the schedule pushed each step, and the plugin state through an OpenRLHF checkpoint."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import ray
import torch
from openrlhf.trainer import ppo_trainer
from openrlhf.trainer.ppo_utils.kl_controller import FixedKLController
from openrlhf.trainer.ray.launcher import RayActorGroup
from openrlhf.utils.logging_utils import TensorboardLogger
from test_openrlhf_driver import GROUP, by_index, make_args, make_experiences, make_maker, save_discriminator

from aapa_rl.openrlhf_adapter.ppo_actor import AapaPolicyModelActor
from aapa_rl.openrlhf_adapter.ppo_trainer import AapaPPOTrainer
from aapa_rl.openrlhf_adapter.scoring import build_critic
from aapa_rl.schedule import ScheduleValues
from reward_fns.combine import RewardError

TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    # Workers import the vllm / flash_attn stand-ins of tests/conftest.py before anything else (no-ops where
    # the real packages are installed); a lambda is shipped by value, so this module is not imported first.
    # Ray starts its workers at nice 15, where any other busy process on the machine starves them: at
    # nice 0 a loaded CI machine only slows these tests down.
    # A cluster of its own: not one that RAY_ADDRESS or another job's `ray start` on the machine points at.
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_worker_niceness", "0")
        env.delenv("RAY_ADDRESS", raising=False)
        setup = lambda: __import__("conftest")  # noqa: E731
        ray.init(address="local", num_cpus=1, include_dashboard=False, runtime_env={
            "env_vars": {"PYTHONPATH": str(TESTS)}, "worker_process_setup_hook": setup})
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def disc_dir(tmp_path_factory):
    return save_discriminator(tmp_path_factory.mktemp("disc"))


@pytest.fixture(scope="module")
def policy_group(local_ray):
    """OpenRLHF's RayActorGroup of two AAPA policy ranks (2 nodes x 1), placed without GPUs: only the AAPA
    methods are called, not init_model_from_pretrained. Each is a worker process that imports openrlhf."""
    return RayActorGroup(2, 1, AapaPolicyModelActor, num_gpus_per_actor=0)


def actor_state(handle) -> dict:
    """The AAPA state a policy actor holds, read inside the actor process."""
    return ray.get(handle.__ray_call__.remote(lambda self: self.aapa_state))


def test_policy_actor_sets_state_and_scores_like_the_driver(disc_dir, policy_group):
    actor = policy_group._actor_handlers[0]
    state = ray.get(actor.aapa_set_state.remote(step=3, objective="chord", lam=0.4, mu=0.2))
    assert state == actor_state(actor) == {"step": 3, "objective": "chord", "lam": 0.4, "mu": 0.2}

    aapa = make_args(disc_dir).aapa
    prompts, experts = ["Q: 1+2=?\nA: ", "Q: 3+4=?\nA: "], ["1+2=3. \\boxed{3}", "3+4=7. \\boxed{7}"]
    rollouts = [["1+2=3. \\boxed{3}", "3"], ["3+4=8. \\boxed{8}", "zz"]]
    remote = ray.get(actor.aapa_score.remote(aapa, prompts, experts, rollouts))
    local = build_critic(aapa).score(prompts, experts, rollouts)
    for key in ("scores", "expert_scores", "gaps"):
        assert torch.allclose(getattr(remote, key), getattr(local, key), equal_nan=True), key
    assert (remote.truncations, remote.missing_experts) == (local.truncations, local.missing_experts)
    assert remote.scores[0, 0] > remote.scores[0, 1]  # the expert-like rollout scores higher


def test_experience_maker_scores_on_the_policy_actors(disc_dir, policy_group):
    values = ScheduleValues(stage=0, stage_step=0, objective="grpo", lam=0.5, alpha=0.3, rho=0.5, mu=0.0)
    results = []
    for score_on in ("driver", "actors"):
        args = make_args(disc_dir, aapa_flags=["--aapa.score_on", score_on])
        maker = make_maker(args)
        if score_on == "actors":  # two ranks: each scores a chunk of whole groups
            maker.actor_model_group = policy_group
        maker.values = values
        experiences, _ = make_experiences(maker)
        maker.compute_advantages_and_returns(experiences)
        results.append((torch.stack(by_index(experiences, "rewards")),
                        torch.stack(by_index(experiences, lambda e: e.info["aapa_w"])), maker.last_metrics))
    (r_driver, w_driver, m_driver), (r_actors, w_actors, m_actors) = results
    assert torch.allclose(r_driver, r_actors) and torch.equal(w_driver, w_actors)
    assert m_driver == pytest.approx(m_actors)


class CheckpointGroup:
    """The policy group's checkpoint calls as DeepSpeed serves them: client_states kept with torch.save /
    torch.load (what engine.save_checkpoint / load_checkpoint do with it), answered through Ray refs."""

    def __init__(self, ckpt_dir: Path):
        self.dir = ckpt_dir / "_actor"

    def async_run_method(self, method_name, **kwargs):
        if method_name == "save_checkpoint":
            (self.dir / kwargs["tag"]).mkdir(parents=True)
            torch.save(kwargs["client_states"], self.dir / kwargs["tag"] / "client_states.pt")
            (self.dir / "latest").write_text(kwargs["tag"])
            return [ray.put(None)]
        assert method_name == "get_checkpoint_states"
        latest = self.dir / (self.dir / "latest").read_text() / "client_states.pt"
        return [ray.put(torch.load(latest, weights_only=False))]


def make_trainer(disc_dir, tmp_path, group):
    stages = [{"end_step": 2, "objective": "sft", "lam": 1.0, "alpha": 0.3, "rho": 0.5},
              {"end_step": 20, "objective": "chord", "lam": 0.8, "lam_end": 0.2, "alpha": 0.3, "rho": 0.5}]
    args = make_args(disc_dir, aapa_flags=[
        "--aapa.stages", json.dumps(stages), "--aapa.adaptive", json.dumps({"target_gap": 0.1, "rate": 0.5}),
        "--aapa.chord", json.dumps({"warmup_steps": 0, "decay_steps": 10, "peak": 0.5, "valley": 0.1})])
    args.ckpt = SimpleNamespace(save_steps=1, path=str(tmp_path / "ckpt"), load_enable=True)
    args.logger = SimpleNamespace(logging_steps=1, tensorboard_dir=str(tmp_path / "tb"),
                                  wandb=SimpleNamespace(run_name="run"))
    trainer = AapaPPOTrainer.__ray_actor_class__.__new__(AapaPPOTrainer.__ray_actor_class__)
    trainer.__dict__.update(
        args=args, strategy=SimpleNamespace(args=args), actor_model_group=group,
        critic_model_group=None, reward_model_group=None, reference_model_group=None,
        kl_ctl=FixedKLController(0.0),
        tokenizer=make_maker(args).tokenizer, wandb_logger=None, tensorboard_logger=TensorboardLogger(args),
        best_eval_metric_key="", best_eval_metric_value=-math.inf, _latest_eval_metric_value=None)
    trainer.setup_aapa()
    return trainer


def test_train_step_pushes_the_schedule_and_checkpoints_round_trip(disc_dir, tmp_path, monkeypatch,
                                                                   policy_group):
    trainer = make_trainer(disc_dir, tmp_path, policy_group)
    ranks = policy_group._actor_handlers

    def host_train_step(self, rollout_samples, global_step):
        """OpenRLHF's train_step, reduced to the calls that reach AAPA: the experience maker, then the actor
        metrics ppo_train returns (sums that the driver turns into ratios)."""
        experiences, _ = make_experiences(self.experience_maker)
        self.experience_maker.compute_advantages_and_returns(experiences)
        return {"policy_loss": 0.1, "aapa/anchor_nll_sum": 3.0, "aapa/anchor_tokens": 2.0,
                "aapa/sft_nll_sum": 1.0, "aapa/sft_tokens": 4.0, "aapa/expert_logp_sum": -6.0,
                "aapa/expert_tokens": 4.0}, global_step + 1

    monkeypatch.setattr(ppo_trainer.BasePPOTrainer, "train_step", host_train_step)
    rollouts = [None] * (4 * GROUP)
    status, step = trainer.train_step(rollouts, 0)
    first = {"step": 0, "objective": "sft", "lam": 1.0, "mu": 0.0}
    assert [actor_state(a) for a in ranks] == [first, first]  # pushed to every rank
    assert step == 1 and status["aapa/stage"] == 0 and status["aapa/lambda"] == 1.0
    assert status["aapa/anchor_loss"] == 1.5 and status["aapa/sft_loss"] == 0.25
    assert status["aapa/expert_logp_mean"] == -1.5 and "aapa/anchor_tokens" not in status
    lam_after_first = trainer.aapa_schedule.adaptive.lam
    assert lam_after_first == pytest.approx(1.5)  # gap mean above the 0.1 target: lambda x (1 + 0.5)
    status, step = trainer.train_step(rollouts, 5)  # stage 2 began at step 2: chord, 3 steps into mu(t)
    assert status["aapa/stage"] == 1 and status["aapa/mu"] == pytest.approx(0.1 + 0.4 * 0.5 * (1 + math.cos(
        math.pi * 3 / 10)))
    pushed = actor_state(ranks[1])
    assert (pushed["step"], pushed["objective"], pushed["mu"]) == (5, "chord", status["aapa/mu"])
    assert pushed["lam"] == pytest.approx(lam_after_first)
    assert trainer.aapa_counters == {"anchors": 4, "prompts_scored": 8, "missing_experts": 0}

    client_states = {"episode": 0, "global_step": step, "total_consumed_prompts": 8,
                     "data_loader_state_dict": {}}
    trainer.actor_model_group = CheckpointGroup(tmp_path / "ckpt")
    trainer.save_logs_and_checkpoints(step, status, client_states)
    assert client_states["aapa"] == trainer.aapa_state_dict()  # in place: best checkpoints get it too
    trainer.tensorboard_logger.close()
    assert list((tmp_path / "tb" / "run").glob("events.out.tfevents.*"))

    resumed = make_trainer(disc_dir, tmp_path, CheckpointGroup(tmp_path / "ckpt"))
    assert resumed.aapa_schedule.adaptive.lam is None and resumed.aapa_counters["anchors"] == 0
    states = resumed.init_checkpoint_states()
    assert states["global_step"] == step
    assert resumed.aapa_schedule.state_dict() == trainer.aapa_schedule.state_dict()
    assert resumed.aapa_counters == trainer.aapa_counters
    assert resumed.aapa_schedule.at(step).lam == trainer.aapa_schedule.at(step).lam


def test_resuming_with_other_stages_names_the_checkpoint_both_lists_and_the_ways_out(disc_dir, tmp_path):
    """Extending a stage and relaunching with --ckpt.load_enable: the refusal says where the checkpoint is,
    what it holds, what was given, and how to go on."""
    group = CheckpointGroup(tmp_path / "ckpt")
    saved = make_trainer(disc_dir, tmp_path, group).aapa_state_dict()
    saved["schedule"]["stages"][1]["end_step"] = 10  # the given list's last stage ends at 20
    group.async_run_method("save_checkpoint", tag="global_step3",
                           client_states={"episode": 0, "global_step": 3, "aapa": saved})
    resumed = make_trainer(disc_dir, tmp_path, group)
    with pytest.raises(ValueError) as refused:
        resumed.init_checkpoint_states()
    message = str(refused.value)
    given = resumed.aapa_schedule.state_dict()["stages"]
    for part in (f"--aapa.stages differs from the stage list saved in the checkpoint {group.dir}",
                 f"saved: {json.dumps(saved['schedule']['stages'])}", f"given: {json.dumps(given)}",
                 "another --ckpt.path or without --ckpt.load_enable"):
        assert part in message, (part, message)


def test_train_step_skips_empty_histograms(disc_dir, tmp_path, monkeypatch, policy_group):
    """With missing_expert: skip, a batch may have no scored rollout at all; TensorBoard's add_histogram
    raises on an empty tensor, so that step logs no histogram instead of crashing."""
    trainer = make_trainer(disc_dir, tmp_path, policy_group)

    def host_train_step(self, rollout_samples, global_step):
        experiences, _ = make_experiences(self.experience_maker)
        self.experience_maker.compute_advantages_and_returns(experiences)
        self.experience_maker.last_scores = {"rollouts": torch.zeros(0), "experts": torch.zeros(0)}
        return {}, global_step + 1

    monkeypatch.setattr(ppo_trainer.BasePPOTrainer, "train_step", host_train_step)
    _, step = trainer.train_step([None] * (4 * GROUP), 0)
    trainer.tensorboard_logger.close()
    assert step == 1


def test_a_non_finite_reward_stops_the_train_step_naming_its_global_step(disc_dir, tmp_path, monkeypatch,
                                                                          policy_group):
    """The driver hands the experience maker its global step with the schedule values, so a reward_func's NaN
    is reported at the step OpenRLHF is training."""
    trainer = make_trainer(disc_dir, tmp_path, policy_group)

    def host_train_step(self, rollout_samples, global_step):
        experiences, _ = make_experiences(self.experience_maker)
        experiences[2].rewards[0] = math.nan
        self.experience_maker.compute_advantages_and_returns(experiences)
        return {}, global_step + 1

    monkeypatch.setattr(ppo_trainer.BasePPOTrainer, "train_step", host_train_step)
    try:
        with pytest.raises(RewardError, match=r"reward_fns/math.py.: non-finite reward nan at step 4 for"):
            trainer.train_step([None] * (4 * GROUP), 4)
    finally:
        trainer.tensorboard_logger.close()
