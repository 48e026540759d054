"""Every OpenRLHF 0.11.2 internal the adapter relies on, asserted in one place.

If OpenRLHF changes any of these, this test names what moved before a GPU job finds out.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import sys

import pytest
import torch


def test_version_guard_refuses_other_versions(monkeypatch):
    import aapa_rl.openrlhf_adapter.pinned as pinned

    monkeypatch.setattr("importlib.metadata.version", lambda name: "0.11.0")
    monkeypatch.delitem(sys.modules, "aapa_rl.openrlhf_adapter.pinned")
    with pytest.raises(ImportError, match=r"openrlhf==0\.11\.2 exactly.*found 0\.11\.0"):
        importlib.import_module("aapa_rl.openrlhf_adapter.pinned")
    monkeypatch.setitem(sys.modules, "aapa_rl.openrlhf_adapter.pinned", pinned)
    assert pinned.OPENRLHF_VERSION == "0.11.2"


def test_openrlhf_internals_the_adapter_uses():
    from openrlhf.models.actor import Actor
    from openrlhf.models.loss import PolicyLoss
    from openrlhf.trainer import ppo_trainer
    from openrlhf.trainer.ppo_utils.experience import Experience
    from openrlhf.trainer.ppo_utils.experience_maker import RemoteExperienceMaker
    from openrlhf.trainer.ray import ppo_actor
    from openrlhf.trainer.ray.launcher import RayActorGroup
    from openrlhf.utils import config
    from openrlhf.utils.logging_utils import TensorboardLogger

    # The actor update the adapter extends (one backward per micro-step happens inside it).
    params = list(inspect.signature(ppo_actor.ActorPPOTrainer.training_step).parameters)
    assert params == ["self", "experience", "kl_ctl", "step", "loss_batch_info"]
    assert callable(ppo_actor.iter_grad_accum_global_norm)

    # Ray actor classes are subclassed through their undecorated class.
    assert inspect.isclass(ppo_actor.PolicyModelActor.__ray_actor_class__)
    assert hasattr(ppo_actor.PolicyModelActor.__ray_actor_class__, "init_model_from_pretrained")
    assert inspect.isclass(ppo_trainer.PPOTrainer.__ray_actor_class__)

    # The driver-side seam between "rewards known" and "advantages computed".
    seam = inspect.signature(RemoteExperienceMaker.compute_advantages_and_returns)
    assert list(seam.parameters) == ["self", "experiences"]

    # The flat argparse namespace becomes nested through this function; the launcher wraps it.
    assert callable(config.hierarchize)

    # Driver hooks the AapaPPOTrainer overrides, with the signatures it calls super() with.
    # (Ray's tracing adds a `_ray_trace_ctx` keyword to methods of classes it made remote.)
    def params(method) -> list[str]:
        return [p for p in inspect.signature(method).parameters if p != "_ray_trace_ctx"]

    base = ppo_trainer.BasePPOTrainer
    assert params(base.train_step) == ["self", "rollout_samples", "global_step"]
    assert params(base.save_logs_and_checkpoints) == ["self", "global_step", "logs_dict", "client_states"]
    assert params(base.init_checkpoint_states) == ["self"]
    assert "_actor_handlers" in inspect.getsource(RayActorGroup._initiate_actors)
    assert "self.writer" in inspect.getsource(TensorboardLogger.__init__)

    # The actor side: the expert forward reuses Actor.forward and overrides its sampling temperature;
    # the trainer lives in PolicyModelActor.trainer; ppo_train looks the accumulation window up at call time.
    forward = list(inspect.signature(Actor.forward).parameters)
    assert forward[:4] == ["self", "sequences", "action_mask", "attention_mask"]
    assert "ring_attn_group" in forward
    assert "self.temperature = temperature" in inspect.getsource(Actor.__init__)
    init_source = inspect.getsource(ppo_actor.PolicyModelActor.__ray_actor_class__.init_model_from_pretrained)
    assert "self.trainer = ActorPPOTrainer(" in init_source
    assert "iter_grad_accum_global_norm(" in inspect.getsource(ppo_actor.ActorPPOTrainer.ppo_train)

    # PolicyLoss returns a 5-tuple in 0.11.2 (it was 4 in 0.11.0).
    log_probs = torch.zeros(2, 3)
    out = PolicyLoss()(log_probs, log_probs, torch.ones(2, 3), action_mask=torch.ones(2, 3))
    assert isinstance(out, tuple) and len(out) == 5

    # Fields that carry rewards, groups, labels and per-sample anchor weights between driver and actor.
    fields = {f.name for f in dataclasses.fields(Experience)}
    needed = {
        "sequences", "attention_mask", "action_mask", "action_log_probs", "base_action_log_probs",
        "rollout_log_probs", "advantages", "returns", "kl", "rewards", "scores", "response_length",
        "index", "prompts", "labels", "info",
    }  # fmt: skip
    assert needed <= fields, f"Experience lost fields: {needed - fields}"
