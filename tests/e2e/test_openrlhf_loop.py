"""OpenRLHF 0.11.2's real training loop with AAPA, end to end: `aapa-rl launch` on the tiny staged recipe.

Each layout runs once (4 steps: SFT + AAPA, GRPO + AAPA, GRPO with lambda 0, CHORD + AAPA) and the tests
read what it left: TensorBoard, OpenRLHF's log lines, the engine's weights after every sync (recorded by
the vLLM stand-in), the checkpoints and the final model. The 1-rank layout is resumed for 4 more steps.
"""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
import yaml
from harness import LAYOUTS, RECIPE, TRAIN_PROBLEMS, Assets, Run, answer_for, dry_run

from aapa_rl.objectives import chord_mu

ALPHA, RHO, EPS = 0.3, 0.5, 1e-6  # as in configs/e2e-tiny-staged-aapa.yaml
CHORD = {"warmup_steps": 0, "decay_steps": 3, "peak": 0.9, "valley": 0.1}
PROMPTS_PER_STEP = 2
# Logged step -> (stage index, objective, lambda); OpenRLHF's global step N runs schedule step N - 1.
STAGES = {1: (0, "sft", 0.5), 2: (1, "grpo", 0.5), 3: (2, "grpo", 0.0), 4: (3, "chord", 0.5)}
LAYOUT_NAMES = list(LAYOUTS)


def hard_set_size(m: dict[str, float]) -> int:
    """|H| as configured: ceil(rho * prompts) = 1 prompt, if one has a positive gap (a rollout group that
    looks as expert as the expert is never anchored; rare here, but sampling decides it)."""
    return math.ceil(RHO * PROMPTS_PER_STEP) if m["aapa/gap_max"] > 0 else 0


@pytest.fixture(scope="module", params=LAYOUT_NAMES)
def run(request, run_layout) -> Run:
    result = run_layout(request.param)
    assert result.returncode == 0, f"{request.param} failed ({result.out}):\n{result.output[-6000:]}"
    return result


@pytest.fixture(scope="module")
def resumed(run_layout) -> tuple[Run, Run]:
    first = run_layout("zero2-1rank")
    assert first.returncode == 0, f"first run failed: {first.out}/launch.log"
    again = run_layout("zero2-1rank", "--train.num_episodes", "2", name="zero2-1rank-resumed", resume=first)
    assert again.returncode == 0, f"resumed run failed, see {again.out}/launch.log:\n{again.output[-6000:]}"
    return first, again


def logged(line: str, name: str) -> float | None:
    """A metric from OpenRLHF's "Global step N: {...}" line (floats, possibly nan/inf)."""
    match = re.search(rf"'{re.escape(name)}': (?:np\.float\d+\()?([-+0-9.eEnaif]+)", line)
    return None if match is None else float(match[1])


def test_every_stage_runs_with_its_aapa_terms(run: Run):
    scalars, lines = run.scalars(), run.logged_steps()
    assert sorted(scalars) == [1, 2, 3, 4] and sorted(lines) == [1, 2, 3, 4]
    anchors = 0
    for step, (stage, objective, lam) in STAGES.items():
        m = scalars[step]
        assert m["aapa/stage"] == stage and m["aapa/lambda"] == lam, (step, m)
        assert m["aapa/hard_set_size"] == hard_set_size(m), (step, m)
        anchors += hard_set_size(m)
        assert m["aapa/anchors_total"] == anchors
        assert "policy_loss" in m  # OpenRLHF's own actor step ran
        if lam > 0 and hard_set_size(m):
            assert m["aapa/anchor_loss"] > 0, (step, m)
        else:  # no expert forward at all: the anchor term is absent, the step is OpenRLHF's own
            assert m.get("aapa/anchor_loss", 0.0) == 0.0, (step, m)
        if objective in ("sft", "chord"):
            assert m["aapa/sft_loss"] > 0, (step, m)
        base = 0.0 if objective == "sft" else m["aapa/reward_raw_mean"]  # SFT drops the verifiable reward
        shaping = m["aapa/reward_shaped_mean"] - base
        assert shaping == pytest.approx(ALPHA * m["aapa/shaping_mean"], abs=1e-5), (step, m)
        assert m["reward"] == pytest.approx(m["aapa/reward_shaped_mean"], abs=1e-5)  # what OpenRLHF optimises
        # The log line and TensorBoard carry the same values.
        for name in ("aapa/hard_set_size", "aapa/anchor_loss", "aapa/lambda", "aapa/mu"):
            assert logged(lines[step], name) == pytest.approx(m.get(name), abs=1e-6), (step, name)
    assert scalars[4]["aapa/mu"] == pytest.approx(chord_mu(0, **CHORD))
    assert all(scalars[s]["aapa/mu"] == 0 for s in (1, 2, 3))


def test_logged_samples_carry_the_shaped_reward(run: Run, assets: Assets, tmp_path):
    from aapa_rl.anchor import load_discriminator
    from aapa_rl.local.task import expert_for, prompt_for
    from reward_fns.math import batch_reward

    by_prompt = {prompt_for(*p): (p, expert_for(*p)) for p in TRAIN_PROBLEMS}
    disc = load_discriminator(assets.disc, device="cpu", cache_dir=tmp_path)
    samples = run.samples()
    assert len(samples) == len(STAGES)
    for step, (text, reward) in enumerate(samples, start=1):
        prompt = next(p for p in by_prompt if text.startswith(p))
        response = text[len(prompt):]
        problem, expert = by_prompt[prompt]
        raw = batch_reward([response], [{"answer": answer_for(*problem)}])[0][0].item()
        d = disc.score([prompt], [response], [expert])[0].item()
        base = 0.0 if STAGES[step][1] == "sft" else raw
        assert reward == pytest.approx(base + ALPHA * math.log(max(d, EPS)), abs=2e-4), (step, text)


def hf_weights(path) -> dict[str, torch.Tensor]:
    """A saved model's weights, loaded with transformers as a user would."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).state_dict()


def test_weights_change_and_reach_the_engines(run: Run, assets: Assets):
    syncs = run.engine_syncs()
    assert len(syncs) == 4
    previous = hf_weights(assets.model)
    for step in range(1, 5):
        policy = hf_weights(run.ckpt / f"global_step{step}_hf")
        assert any(not torch.equal(policy[k], previous[k]) for k in policy), f"step {step} changed nothing"
        assert syncs[step - 1].keys() == policy.keys()
        unequal = [k for k in policy if not torch.equal(syncs[step - 1][k], policy[k])]
        assert not unequal, f"the engine after step {step} differs from the policy in {unequal}"
        previous = policy
    final = hf_weights(run.out / "final")  # the final model loads with transformers and is the last step's
    assert all(torch.equal(final[k], previous[k]) for k in final)


def test_checkpoint_holds_the_plugin_state(run: Run, assets: Assets):
    state = run.client_state(4)
    assert state["global_step"] == 4
    aapa = state["aapa"]
    anchors = run.scalars()[4]["aapa/anchors_total"]
    assert aapa["counters"] == {"anchors": anchors, "prompts_scored": 8, "missing_experts": 0}
    assert aapa["discriminator"] == str(assets.disc)
    assert [s["objective"] for s in aapa["schedule"]["stages"]] == ["sft", "grpo", "grpo", "chord"]


def test_resume_continues_step_schedule_and_counters(resumed: tuple[Run, Run]):
    first, again = resumed
    scalars = again.scalars()
    assert sorted(scalars) == [5, 6, 7, 8]
    anchors = first.scalars()[4]["aapa/anchors_total"]  # the counter goes on from the checkpoint's
    for step in sorted(scalars):
        m = scalars[step]
        anchors += hard_set_size(m)
        assert m["aapa/stage"] == 3 and m["aapa/anchors_total"] == anchors, (step, m)
        assert m["aapa/mu"] == pytest.approx(chord_mu(step - 4, **CHORD))
    # The engine first gets the restored weights (step 4's), then each step's.
    syncs = again.engine_syncs()
    assert len(syncs) == 5
    restored = first.engine_syncs()[3]
    assert all(torch.equal(syncs[0][k], restored[k]) for k in restored)
    for step, synced in zip(range(5, 9), syncs[1:], strict=True):
        policy = hf_weights(again.ckpt / f"global_step{step}_hf")
        assert all(torch.equal(synced[k], policy[k]) for k in policy), f"engine after step {step}"
    counters = again.client_state(8)["aapa"]["counters"]
    assert counters == {"anchors": anchors, "prompts_scored": 16, "missing_experts": 0}


def test_resuming_with_other_stages_is_refused_before_launching(run_layout, assets: Assets):
    """The checks read the run's DeepSpeed checkpoint, so another stage list, or another number of policy
    ranks, is refused before Ray, the models or the engines start; the saved run's settings pass."""
    first = run_layout("zero2-1rank")
    resume = [*assets.flags(), "--ckpt.path", str(first.ckpt), "--ckpt.load_enable"]
    stages = yaml.safe_load(RECIPE.read_text())["aapa"]["stages"]
    stages[-1]["end_step"] += 1
    refusal = f"FAIL  --aapa.stages differs from the stage list saved in the checkpoint {first.ckpt}/_actor"
    assert refusal in dry_run([*resume, "--aapa.stages", json.dumps(stages)])
    assert "FAIL" not in dry_run(resume)
    # Its ZeRO optimizer state was written by 1 rank: DeepSpeed would refuse it on 2, after the models load.
    assert "was written by 1 policy ranks and this layout has 2" in dry_run(
        [*resume, "--actor.num_gpus_per_node", "2"])


def test_data_without_experts_fails_before_any_gpu_work(run_layout, assets: Assets):
    failed = run_layout("zero2-1rank", "--data.prompt_dataset", str(assets.no_experts), name="no-experts")
    assert failed.returncode != 0
    assert "aapa-rl: not launching" in failed.output
    problem = f"{assets.no_experts} (4 rows): 4 rows have no expert"
    assert problem in failed.output and problem in dry_run([*assets.flags(), "--data.prompt_dataset",
                                                            str(assets.no_experts)])
    # Stopped by the checks: the training command never ran, so no Ray actor was created.
    assert "aapa_rl.openrlhf_adapter.launch" not in failed.output and "Traceback" not in failed.output
    assert not list((failed.out / "probe").iterdir())
