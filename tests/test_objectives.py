"""aapa_rl.objectives: parity with OpenRLHF 0.11.2 on random tensors, and the AAPA pieces by hand."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from openrlhf.models.loss import PolicyLoss
from openrlhf.models.utils import compute_approx_kl
from openrlhf.trainer.ppo_utils.experience import Experience
from openrlhf.trainer.ppo_utils.experience_maker import RemoteExperienceMaker

from aapa_rl import objectives as obj

TOL = 1e-6


def _random_batch(seed: int, batch: int = 6, tokens: int = 9):
    g = torch.Generator().manual_seed(seed)
    log_probs = -torch.rand(batch, tokens, generator=g, dtype=torch.float64) * 3
    old = log_probs + 0.3 * torch.randn(batch, tokens, generator=g, dtype=torch.float64)
    adv = torch.randn(batch, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, tokens + 1, (batch,), generator=g)
    mask = (torch.arange(tokens)[None, :] < lengths[:, None]).double()
    return log_probs, old, adv, mask


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("agg", obj.LOSS_AGGREGATIONS)
@pytest.mark.parametrize("clip", [(0.2, 0.2), (0.2, 0.28)])
def test_policy_loss_matches_openrlhf(seed, agg, clip):
    log_probs, old, adv, mask = _random_batch(seed)
    reference = PolicyLoss(clip_eps_low=clip[0], clip_eps_high=clip[1], token_level_loss=agg == "token-mean")
    expected = reference(log_probs, old, adv.unsqueeze(-1), action_mask=mask)[0]
    got = obj.policy_loss(log_probs, old, adv, mask, clip_low=clip[0], clip_high=clip[1], agg=agg)
    assert abs(got.item() - expected.item()) < TOL
    # Per-token advantages give the same value as broadcast per-sequence ones.
    got_tokens = obj.policy_loss(log_probs, old, adv[:, None].expand_as(mask), mask, *clip, agg=agg)
    assert abs(got_tokens.item() - expected.item()) < TOL


def test_clip_higher_changes_the_loss():
    log_probs, old, adv, mask = _random_batch(3)
    log_probs = old + 0.5  # every ratio is e^0.5 > 1.28, so the upper clip binds for positive advantages
    # A larger upper clip lets more of the positive advantage through: a lower (better) surrogate loss.
    assert obj.policy_loss(log_probs, old, adv.abs(), mask, 0.2, 0.28) < obj.policy_loss(
        log_probs, old, adv.abs(), mask, 0.2, 0.2
    )


@pytest.mark.parametrize("estimator", obj.KL_ESTIMATORS)
def test_kl_matches_openrlhf(estimator):
    log_probs, old, _, _ = _random_batch(4)
    old = old - 12 * (torch.rand_like(old) > 0.9)  # some large ratios hit the clamps
    expected = compute_approx_kl(log_probs, old, kl_estimator=estimator)
    assert torch.allclose(obj.approx_kl(log_probs, old, estimator), expected, atol=TOL, rtol=0)


def _openrlhf_advantages(rewards: torch.Tensor, group: int, estimator: str) -> torch.Tensor:
    args = SimpleNamespace(
        algo=SimpleNamespace(advantage=SimpleNamespace(estimator=estimator, gamma=1.0)),
        rollout=SimpleNamespace(n_samples_per_prompt=group),
        reward=SimpleNamespace(clip_range=None),
    )
    strategy, kl_ctl = SimpleNamespace(args=args), SimpleNamespace(value=0.0)
    maker = RemoteExperienceMaker(None, None, None, None, kl_ctl, strategy, None)
    tokens = 5
    experiences = []
    for start in range(0, rewards.numel(), 3):  # micro-batches that cut across groups
        rows = rewards[start : start + 3]
        experiences.append(
            Experience(
                rewards=rows.clone(),
                action_mask=torch.ones(len(rows), tokens, dtype=torch.bool),
                kl=torch.zeros(len(rows), tokens),
                index=list(range(start, start + len(rows))),
                info={},
            )
        )
    experiences = maker.compute_advantages_and_returns(experiences)
    return torch.cat([e.advantages[:, 0] for e in experiences])


@pytest.mark.parametrize("estimator", obj.ADVANTAGE_ESTIMATORS)
def test_group_advantages_match_openrlhf(estimator):
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.3, -2.0, 0.7, 5.0])
    expected = _openrlhf_advantages(rewards, 4, estimator)
    assert torch.allclose(obj.group_advantages(rewards, 4, estimator), expected, atol=TOL, rtol=0)


def test_group_advantages_known_values_and_errors():
    adv = obj.group_advantages(torch.tensor([1.0, 0.0, 1.0, 1.0]), 4, "group_norm")
    assert torch.allclose(adv, torch.tensor([0.5, -1.5, 0.5, 0.5]), atol=1e-6)
    with pytest.raises(ValueError, match="groups of 3"):
        obj.group_advantages(torch.zeros(4), 3)
    with pytest.raises(ValueError, match="unknown advantage estimator"):
        obj.group_advantages(torch.zeros(4), 2, "gae")


def test_a_group_of_equal_rewards_has_zero_advantages_though_its_float32_mean_misses_them():
    # Shaped rewards of four groups whose 8 rollouts were the same text (a GRPO + shaping run), and a mixed
    # group. Batched, float32's mean missed the equal ones by an ulp while their std was 0 (on an AVX-512
    # Xeon; how the mean rounds depends on the CPU's kernels): OpenRLHF's (r - mean) / (std + 1e-9) gave
    # all 8 the same advantage, 60 or 477.
    equal = [0.9305313229560852, 0.984295666217804, 0.9213687181472778, -6.907755374908447]
    rewards = torch.tensor([v for v in equal for _ in range(8)] + [1.0, 0.0] * 4)
    host = _openrlhf_advantages(rewards, 8, "group_norm")
    ours = obj.group_advantages(rewards, 8)
    assert torch.equal(ours[:32], torch.zeros(32))
    torch.testing.assert_close(ours[32:], host[32:])  # a group with a spread: as before, OpenRLHF's values


def test_sft_loss_and_phi_has_no_gradient_through_weight():
    logits = torch.randn(2, 4, requires_grad=True, dtype=torch.float64)
    log_probs = torch.nn.functional.logsigmoid(logits)
    mask = torch.tensor([[1.0, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.float64)
    plain = obj.sft_loss(log_probs, mask)
    assert abs(plain.item() - (-(log_probs * mask).sum() / 5).item()) < 1e-12

    phi_loss = obj.sft_loss(log_probs, mask, phi=True)
    (grad,) = torch.autograd.grad(phi_loss, logits, retain_graph=True)
    # Stop-gradient: d/dx [-logp * w] with w constant = -w * dlogp/dx.
    p = log_probs.detach().exp()
    w = p * (1 - p)
    (grad_logp,) = torch.autograd.grad(log_probs.sum(), logits)
    expected = -(w * mask / 5) * grad_logp
    assert torch.allclose(grad, expected, atol=1e-12)


def test_chord_mu_schedule():
    kw = dict(warmup_steps=10, decay_steps=20, peak=0.9, valley=0.05)
    assert obj.chord_mu(0, **kw) == 0.0
    assert obj.chord_mu(5, **kw) == pytest.approx(0.45)
    assert obj.chord_mu(10, **kw) == pytest.approx(0.9)  # end of warm-up = peak
    assert obj.chord_mu(20, **kw) == pytest.approx(0.05 + 0.85 * 0.5)  # mid-decay
    assert obj.chord_mu(30, **kw) == pytest.approx(0.05)  # floor
    assert obj.chord_mu(1000, **kw) == pytest.approx(0.05)
    assert obj.chord_mu(0, warmup_steps=0, decay_steps=0, peak=0.1, valley=0.1) == pytest.approx(0.1)


def test_stage_loss_weights_mix_the_host_loss_and_the_sft_term_per_objective():
    assert obj.stage_loss_weights("grpo", 0.0) == (1.0, 0.0)
    assert obj.stage_loss_weights("sft", 0.0) == (1.0, 1.0)
    assert obj.stage_loss_weights("chord", 0.25) == (0.75, 0.25)  # (1 - mu) L_rl + mu L_sft_phi


def test_stage_loss_is_the_weighted_host_loss_and_sft_term_plus_the_anchor_term():
    host, sft, anchor = torch.tensor(2.0), torch.tensor(4.0), torch.tensor(3.0)
    assert obj.stage_loss(host, sft, anchor, "chord", 0.25, 0.5).item() == 0.75 * 2 + 0.25 * 4 + 0.5 * 3
    assert obj.stage_loss(host, sft, anchor, "sft", 0.0, 0.5).item() == 2 + 4 + 0.5 * 3
    # grpo leaves the SFT term out: whatever its value on a batch without experts, it cannot reach the loss
    assert obj.stage_loss(host, torch.tensor(math.nan), anchor, "grpo", 0.0, 0.5).item() == 2 + 0.5 * 3


def test_a_softmax_weight_that_underflows_keeps_its_expert_in_h():
    # exp(-14 / 0.1) underflows in float32: the member must still read as in H (w > 0) in every backend.
    idx, w = obj.select_hard_set(torch.tensor([14.0, 0.001, -1.0]), rho=1.0, temperature=0.1)
    assert idx.tolist() == [0, 1]
    assert w[0].item() == pytest.approx(2.0) and 0 < w[1].item() < 1e-30


def test_shaping_transforms():
    d = torch.tensor([0.1, 0.5, 0.9])
    assert torch.allclose(obj.shaping_signal(d, "log"), d.log())
    assert torch.allclose(obj.shaping_signal(d, "neg_log_one_minus"), -(1 - d).log())
    assert torch.allclose(obj.shaping_signal(d, "logit"), (d / (1 - d)).log())
    assert torch.isfinite(obj.shaping_signal(torch.tensor([0.0, 1.0]), "logit")).all()
    with pytest.raises(ValueError, match="unknown shaping transform"):
        obj.shaping_signal(d, "exp")


def test_shaping_floor_clamps_from_below_and_keeps_nan_at_zero():
    scores = torch.tensor([1e-9, 0.01, 0.5, float("nan")])
    rewards = torch.ones(4)
    _, free = obj.shape_rewards(rewards, scores, alpha=0.5)
    assert free[0].item() == pytest.approx(math.log(1e-6))  # log eps: about -14 without a floor
    shaped, s = obj.shape_rewards(rewards, scores, alpha=0.5, floor=-2.0)
    assert s.tolist() == pytest.approx([-2.0, -2.0, math.log(0.5), 0.0])
    assert shaped.tolist() == pytest.approx([0.0, 0.0, 1 + 0.5 * math.log(0.5), 1.0])
    _, logit = obj.shape_rewards(rewards, scores, alpha=1.0, transform="logit", floor=-3.0)
    assert logit.tolist() == pytest.approx([-3.0, -3.0, 0.0, 0.0], abs=1e-6)


def test_anchor_gaps():
    rollouts = torch.tensor([[0.5, 0.25], [0.9, 0.9]])
    experts = torch.tensor([0.8, 0.9])
    gaps = obj.anchor_gaps(rollouts, experts)
    assert gaps[0].item() == pytest.approx(math.log(0.8) - (math.log(0.5) + math.log(0.25)) / 2, abs=1e-6)
    assert gaps[1].item() == pytest.approx(0.0, abs=1e-6)
    assert torch.isfinite(obj.anchor_gaps(torch.zeros(1, 3), torch.ones(1))).all()


def test_select_hard_set_top_positive_and_weights():
    gaps = torch.tensor([0.5, -1.0, 2.0, 0.1, 0.0, 1.0, 0.2, 0.3])
    idx, w = obj.select_hard_set(gaps, rho=0.25)
    assert idx.tolist() == [2, 5] and w.tolist() == [1.0, 1.0]
    idx, w = obj.select_hard_set(gaps, rho=0.25, temperature=0.5)
    expected = 2 * torch.softmax(torch.tensor([2.0, 1.0]) / 0.5, 0)
    assert torch.allclose(w, expected) and w.sum().item() == pytest.approx(2.0)


def test_select_hard_set_edge_cases():
    # All gaps <= 0: empty set, and the anchor loss over it is a finite zero.
    idx, w = obj.select_hard_set(torch.tensor([-0.1, 0.0, -3.0]), rho=1.0, temperature=1.0)
    assert idx.numel() == 0 and w.numel() == 0
    # Ties keep the lower index.
    idx, _ = obj.select_hard_set(torch.tensor([1.0, 3.0, 3.0, 3.0]), rho=0.5)
    assert idx.tolist() == [1, 2]
    # Rounding: ceil(0.3 * 4) = 2, ceil(0.25 * 8) = 2 exactly, ceil(0.01 * 4) = 1, rho 0 -> none.
    gaps = torch.arange(8, 0, -1).float()
    assert obj.select_hard_set(gaps[:4], 0.3)[0].numel() == 2
    assert obj.select_hard_set(gaps, 0.25)[0].numel() == 2
    assert obj.select_hard_set(gaps[:4], 0.01)[0].numel() == 1
    assert obj.select_hard_set(gaps, 0.0)[0].numel() == 0
    # A batch of one group.
    idx, w = obj.select_hard_set(torch.tensor([0.7]), rho=0.1, temperature=2.0)
    assert idx.tolist() == [0] and w.tolist() == pytest.approx([1.0])
    with pytest.raises(ValueError, match="rho"):
        obj.select_hard_set(gaps, 1.5)


def test_the_hard_set_budget_forgives_float_noise_only():
    """ceil(rho * P) with a relative tolerance: an absolute 1e-9 also swallowed real excesses."""
    assert obj.hard_set_budget(0.1, 30) == 3  # 0.1 * 30 = 3.0000000000000004
    assert obj.hard_set_budget(0.2500000001, 4) == 2  # 1.0000000004: a real excess over 1
    assert obj.hard_set_budget(0.3, 4) == 2 and obj.hard_set_budget(1e-9, 5) == 1
    assert obj.hard_set_budget(0.0, 5) == 0 and obj.hard_set_budget(0.5, 0) == 0
    gaps = torch.ones(4)
    assert obj.select_hard_set(gaps, 0.2500000001)[0].numel() == 2
    assert obj.choose_hard_set(gaps, 0.2500000001, selection="random")[0].numel() == 2


def test_select_hard_set_never_chooses_a_nan_gap():
    gaps = torch.tensor([float("nan"), 3.0, 2.0, 1.0])
    idx, w = obj.select_hard_set(gaps, 0.5, temperature=1.0)
    assert idx.tolist() == [1, 2] and w.isfinite().all()
    assert obj.choose_hard_set(gaps, 0.5)[0].tolist() == [1, 2]
    assert obj.select_hard_set(torch.tensor([float("nan")] * 2), 1.0)[0].numel() == 0


def test_gap_and_random_selections_are_unchanged():
    """The spec's rule is select_hard_set's; random makes one randperm draw over the prompts with a gap, so
    runs from before the oracle and all selections existed reproduce."""
    gaps = torch.tensor([0.5, float("nan"), 2.0, 0.1, -1.0, 1.0, 0.2, 0.3])
    idx, w = obj.choose_hard_set(gaps, 0.25, 0.5)
    expected = obj.select_hard_set(gaps.nan_to_num(nan=float("-inf")), 0.25, 0.5)
    assert idx.tolist() == expected[0].tolist() == [2, 5] and torch.equal(w, expected[1])
    torch.manual_seed(3)
    idx, w = obj.choose_hard_set(gaps, 0.25, selection="random")
    torch.manual_seed(3)
    have = torch.tensor([0, 2, 3, 4, 5, 6, 7])
    assert idx.tolist() == have[torch.randperm(7)[:2]].tolist() and w.tolist() == [1.0, 1.0]


def test_oracle_picks_the_most_exploiting_prompts_ties_by_gap():
    gaps = torch.tensor([0.5, 3.0, 2.0, float("nan"), 1.0, -1.0, 0.2, 0.3])
    exploiting = torch.tensor([2, 0, 1, 4, 1, 2, 0, 0])
    # Prompt 3 exploits most but has no expert; 5 and 0 tie at 2 (5's gap is lower), 2 and 4 tie at 1.
    idx, w = obj.choose_hard_set(gaps, 0.5, selection="oracle", exploiting=exploiting)
    assert idx.tolist() == [0, 5, 2, 4] and w.tolist() == [1.0] * 4
    # Fewer exploiting prompts than the budget: the rest by gap, so every selection anchors ceil(rho * P).
    idx, _ = obj.choose_hard_set(gaps, 0.75, selection="oracle", exploiting=exploiting)
    assert idx.tolist() == [0, 5, 2, 4, 1, 7]
    with pytest.raises(ValueError, match="oracle needs a reward that reports a per-sample `flaw_bonus`"):
        obj.choose_hard_set(gaps, 0.5, selection="oracle")


def test_all_anchors_every_prompt_with_a_gap_at_weight_rho():
    gaps = torch.tensor([0.5, float("nan"), -2.0, 1.0])
    idx, w = obj.choose_hard_set(gaps, 0.25, temperature=0.5, selection="all")
    assert idx.tolist() == [0, 2, 3] and w.tolist() == [0.25] * 3
    with pytest.raises(ValueError, match="unknown selection 'best'"):
        obj.choose_hard_set(gaps, 0.25, selection="best")


def test_selection_diagnostics_hand_computed():
    gaps = torch.tensor([2.0, 1.0, 1.0, float("nan"), 0.5, -1.0])
    exploiting = torch.tensor([True, False, True, True, False, False])
    d = obj.selection_diagnostics(gaps, torch.tensor([0, 1]), exploiting)
    assert d["hard_precision"] == 0.5 and d["hard_recall"] == pytest.approx(1 / 3)
    # Finite gaps: exploiting {2, 1}, the rest {1, 0.5, -1}; pairs won 3 + (2 + 0.5 for the tie) of 6.
    assert d["gap_auroc"] == pytest.approx(5.5 / 6) and d["exploiting_prompts"] == 3.0
    perfect = obj.selection_diagnostics(gaps, torch.tensor([0]), torch.tensor([1, 0, 0, 0, 0, 0]) > 0)
    assert (perfect["hard_precision"], perfect["hard_recall"], perfect["gap_auroc"]) == (1.0, 1.0, 1.0)


def test_selection_diagnostics_undefined_values_are_nan():
    gaps = torch.tensor([1.0, float("nan"), 0.5])
    empty = torch.tensor([], dtype=torch.long)
    none = obj.selection_diagnostics(gaps, empty, torch.zeros(3, dtype=torch.bool))
    assert math.isnan(none["hard_precision"]) and math.isnan(none["hard_recall"])
    assert math.isnan(none["gap_auroc"]) and none["exploiting_prompts"] == 0.0
    # The only exploiting prompt has no gap: one class among the finite gaps, so no AUROC.
    only_nan = obj.selection_diagnostics(gaps, torch.tensor([0]), torch.tensor([False, True, False]))
    assert only_nan["hard_precision"] == 0.0 and only_nan["hard_recall"] == 0.0
    assert math.isnan(only_nan["gap_auroc"])


def test_anchor_loss_hand_computed():
    log_probs = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, 0.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    weights = torch.tensor([2.0, 0.5])
    loss = obj.anchor_loss(log_probs, mask, weights)
    assert loss.item() == pytest.approx((2.0 * 6.0 + 0.5 * 1.0) / 5)
    loss.backward()
    assert torch.allclose(log_probs.grad, -weights[:, None] * mask / 5)

    phi = obj.anchor_loss(log_probs, mask, weights, phi=True)
    p = log_probs.detach().exp()
    expected = (weights[:, None] * -log_probs.detach() * p * (1 - p) * mask).sum() / 5
    assert phi.item() == pytest.approx(expected.item())


def test_anchor_loss_empty_is_zero_without_nan():
    log_probs = torch.zeros(0, 4, requires_grad=True)
    loss = obj.anchor_loss(log_probs, torch.zeros(0, 4), torch.zeros(0))
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(log_probs.grad).all()
    dummy = torch.full((1, 3), -2.0, requires_grad=True)
    masked_out = obj.anchor_loss(dummy, torch.zeros(1, 3), torch.ones(1))
    masked_out.backward()
    assert masked_out.item() == 0.0 and dummy.grad.abs().sum().item() == 0.0


def test_token_log_probs_and_masked_mean():
    logits = torch.randn(2, 3, 5)
    targets = torch.randint(0, 5, (2, 3))
    expected = torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0]
    assert torch.allclose(obj.token_log_probs(logits, targets), expected)
    assert obj.masked_mean(torch.ones(2, 2), torch.zeros(2, 2)).item() == 0.0
