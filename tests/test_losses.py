"""Every loss: one value worked out by hand (arithmetic in the docstring) and a direction property.

Hand values use logits of ln 3, where σ(ln 3) = 3/4 and σ(−ln 3) = 1/4, so every log σ is a
log of a simple fraction. Tensors are float64 so exact values can be checked to 1e-12.
"""
import math

import pytest
import torch

from rlhfkit.losses import bradley_terry_loss, cost_model_loss, length_decorrelation_loss, pearson_correlation, masked_mean, masked_sum, masked_var, masked_whiten, ranking_pairs, step_bce_loss
from rlhfkit.policy_losses import entropy_from_logits, logprobs_from_logits, ppo_policy_loss, ppo_value_loss
from rlhfkit.preference_losses import DPOLossType, dno_loss, dno_soft_loss, dpo_loss, sft_nll

LN3 = math.log(3)


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


def close(actual, expected, tol=1e-12):
    if isinstance(actual, torch.Tensor):
        actual = actual.detach()
    return abs(float(actual) - float(expected)) < tol


# ---------------------------------------------------------------- masked statistics

X = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=torch.float64)
M = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)


def test_masked_sum_and_mean_by_hand():
    """Kept: 1, 2 | 4. Sum 7, mean 7/3; per row sums [3, 4], means [3/2, 4/1]."""
    assert close(masked_sum(X, M), 7)
    assert close(masked_mean(X, M), 7 / 3)
    assert torch.equal(masked_sum(X, M, dim=1), t(3, 4))
    assert torch.equal(masked_mean(X, M, dim=1), t(1.5, 4))


def test_masked_mean_ignores_padding_values_even_inf_and_nan():
    garbage = X.clone()
    garbage[0, 2], garbage[1, 1], garbage[1, 2] = float("inf"), float("nan"), -1e30
    assert close(masked_mean(garbage, M), 7 / 3)
    assert torch.equal(masked_mean(garbage, M, dim=1), t(1.5, 4))


def test_masked_mean_of_an_empty_row_is_zero_not_nan():
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    assert torch.equal(masked_mean(X, mask, dim=1), t(1.5, 0))


def test_masked_mean_rejects_a_broadcasting_mask():
    with pytest.raises(ValueError):
        masked_mean(X, torch.ones(2, 1))


def test_masked_whiten_by_hand_uses_unbiased_variance():
    """Kept 2, 4, 6 (9 is padding). Mean 4; unbiased var = (4 + 0 + 4) / (3 − 1) = 4, std 2.

    Whitened: (−2, 0, 2) / 2 = (−1, 0, 1); padding → 0. shift_mean=False adds 4 back: (3, 4, 5).
    (The biased variance, 8/3, would give ±1.2247 instead.)
    """
    x, mask = t(2, 4, 6, 9), torch.tensor([1, 1, 1, 0])
    assert close(masked_var(x, mask), 4)
    assert close(masked_var(x, mask, unbiased=False), 8 / 3)
    scale = 1 / math.sqrt(4 + 1e-8)  # the 1e-8 guards a zero variance
    assert torch.allclose(masked_whiten(x, mask), t(-2 * scale, 0, 2 * scale, 0), atol=1e-15)
    assert torch.allclose(masked_whiten(x, mask, shift_mean=False), t(4 - 2 * scale, 4, 4 + 2 * scale, 0))


def test_masked_whiten_over_processes_uses_the_whole_batch():
    """Two processes, each holding 2, 4, 6 (all_sum doubles: the other shard is the same).

    The whole batch is 2, 4, 6, 2, 4, 6: mean 4, unbiased var = (4+0+4+4+0+4) / (6 − 1) = 16/5,
    so each process whitens its shard to (−2, 0, 2) / sqrt(16/5), not by its own var 4.
    """
    x, mask = t(2, 4, 6, 9), torch.tensor([1, 1, 1, 0])
    twice = lambda v: 2 * v  # noqa: E731
    assert close(masked_var(x, mask, all_sum=twice), 16 / 5)
    scale = 1 / math.sqrt(16 / 5 + 1e-8)
    assert torch.allclose(masked_whiten(x, mask, all_sum=twice), t(-2 * scale, 0, 2 * scale, 0), atol=1e-15)


def test_masked_whiten_single_element_is_zero_not_nan():
    assert torch.equal(masked_whiten(t(5, 7), torch.tensor([1, 0])), t(0, 0))


# ---------------------------------------------------------------- Bradley-Terry

def test_bradley_terry_by_hand():
    """Pairs: r_c − r_r = ln 3 and 0, weights 1 and 3.

    −log σ(ln 3) = log(4/3); −log σ(0) = log 2.  Weighted: (1·log(4/3) + 3·log 2) / 4.
    Centering, coef 0.5: mean((ln 3 + 0)², (0 + 0)²) = (ln 3)²/2, times 0.5 → (ln 3)²/4.
    Accuracy: ln 3 > 0 yes, 0 > 0 no (ties are wrong) → 1/2. Margin: (ln 3 + 0)/2.
    """
    chosen, rejected, weights = t(LN3, 0), t(0, 0), t(1, 3)
    loss, metrics = bradley_terry_loss(chosen, rejected, weights=weights)
    assert close(loss, (math.log(4 / 3) + 3 * math.log(2)) / 4)
    loss_c, _ = bradley_terry_loss(chosen, rejected, weights=weights, center_coef=0.5)
    assert close(loss_c, (math.log(4 / 3) + 3 * math.log(2)) / 4 + LN3**2 / 4)
    assert metrics["accuracy"] == 0.5
    assert close(metrics["margin"], LN3 / 2)


def test_bradley_terry_margin_by_hand():
    """r_c − r_r = ln 3 + 1 with margin 1 → −log σ(ln 3) = log(4/3)."""
    loss, _ = bradley_terry_loss(t(LN3 + 1.5), t(0.5), margin=t(1))
    assert close(loss, math.log(4 / 3))


def test_bradley_terry_lower_when_chosen_preferred_more():
    rejected = t(0.3)
    losses = [bradley_terry_loss(t(c), rejected)[0].item() for c in (-2, -0.5, 0, 1, 4)]
    assert all(a > b for a, b in zip(losses, losses[1:]))


def test_bradley_terry_is_stable_for_huge_gaps():
    loss, _ = bradley_terry_loss(torch.tensor([-200.0]), torch.tensor([0.0]))
    assert close(loss, 200.0, tol=1e-4)  # log(sigmoid(−200)) in fp32 would be −inf


def test_pearson_and_odin_length_terms_by_hand():
    """4 responses, lengths [1, 2, 3, 4] (mean 2.5, deviations d = [−1.5, −0.5, 0.5, 1.5], Σd² = 5).
    r_Q = [1, 0, 0, 1]: deviations [0.5, −0.5, −0.5, 0.5], Σ = 1; Σ d·dQ = −0.75 + 0.25 − 0.25 + 0.75 = 0 → ρ_Q = 0.
    r_L = [0, 1, 1, 3]: mean 1.25, deviations [−1.25, −0.25, −0.25, 1.75], Σ² = 1.5625 + 0.0625 + 0.0625 + 3.0625
    = 4.75; Σ d·dL = 1.875 + 0.125 − 0.125 + 2.625 = 4.5 → ρ_L = 4.5 / √(5·4.75) = 4.5 / √23.75.
    λ = 0.5: loss = 0.5·(−ρ_L + |ρ_Q|) = −2.25 / √23.75; with head weights w_Q = [1, 2], w_L = [3, −1]
    (w_Q·w_L = 1) it adds 0.5·1. r_Q = −len (ρ = −1) costs |−1|: loss 0.5·(1 − ρ_L)."""
    lengths = t(1, 2, 3, 4)
    quality, length_scores = t(1, 0, 0, 1), t(0, 1, 1, 3)
    rho_l = 4.5 / math.sqrt(23.75)
    assert close(pearson_correlation(length_scores, lengths), rho_l)
    assert close(pearson_correlation(quality, lengths), 0.0)
    assert close(pearson_correlation(t(5, 5, 5, 5), lengths), 0.0)  # constant: 0, not NaN
    loss, metrics = length_decorrelation_loss(quality, length_scores, lengths, 0.5)
    assert close(loss, -0.5 * rho_l) and close(metrics["length_corr_length"], rho_l)
    loss, _ = length_decorrelation_loss(quality, length_scores, lengths, 0.5, t(1, 2)[None], t(3, -1)[None])
    assert close(loss, -0.5 * rho_l + 0.5)
    loss, metrics = length_decorrelation_loss(-lengths, length_scores, lengths, 0.5)
    assert close(loss, 0.5 * (1 - rho_l)) and close(metrics["length_corr_quality"], -1.0)
    # Direction: the gradient moves r_Q away from correlating with length, r_L toward it.
    q, l = t(1, 2, 2, 4).requires_grad_(), t(0, 1, 1, 3).requires_grad_()
    length_decorrelation_loss(q, l, lengths, 1.0)[0].backward()
    step = lambda x: x.detach() - 0.1 * x.grad  # noqa: E731
    assert pearson_correlation(step(q), lengths) < pearson_correlation(q.detach(), lengths)
    assert pearson_correlation(step(l), lengths) > pearson_correlation(l.detach(), lengths)


def test_bradley_terry_rejects_broadcasting_shapes():
    with pytest.raises(ValueError):
        bradley_terry_loss(torch.zeros(4), torch.zeros(4, 1))


def test_ranking_pairs_by_hand():
    """Ranking [2, 0, 1] (2 best): C(3,2) = 3 pairs (2≻0, 2≻1, 0≻1), each 1/3."""
    assert ranking_pairs([2, 0, 1]) == [(2, 0, 1 / 3), (2, 1, 1 / 3), (0, 1, 1 / 3)]


def test_ranking_pairs_weights_sum_to_one_and_winners_rank_higher():
    ranking = [3, 1, 4, 0, 2]
    pairs = ranking_pairs(ranking)
    assert len(pairs) == 10  # C(5, 2)
    assert math.isclose(sum(w for _, _, w in pairs), 1.0)
    assert all(ranking.index(w) < ranking.index(l) for w, l, _ in pairs)
    with pytest.raises(ValueError):
        ranking_pairs([0])
    with pytest.raises(ValueError):
        ranking_pairs([0, 1, 0])


# ---------------------------------------------------------------- process reward model

def test_step_bce_by_hand():
    """Labelled positions (others −100):
    (0,0) z=0, y=1:     −log σ(0) = log 2;            predicted 0 (z > 0 is false) → wrong
    (0,1) z=ln 3, y=1:  −log σ(ln 3) = log(4/3);      right
    (1,0) z=−ln 3, y=0: −log(1 − σ(−ln 3)) = log(4/3); right
    Loss = (log 2 + 2 log(4/3)) / 3; step accuracy 2/3. The ignored logits (1e4, −1e4) drop out.
    """
    logits = torch.tensor([[0.0, LN3, 1e4], [-LN3, -1e4, 1e4]], dtype=torch.float64)
    labels = torch.tensor([[1, 1, -100], [0, -100, -100]])
    loss, metrics = step_bce_loss(logits, labels)
    assert close(loss, (math.log(2) + 2 * math.log(4 / 3)) / 3)
    assert close(metrics["step_accuracy"], 2 / 3)
    assert metrics["n_steps"] == 3


def test_step_bce_direction_and_ignored_positions():
    labels = torch.tensor([[1, -100, 0]])
    base, _ = step_bce_loss(t(0.5, 0, 0.5).unsqueeze(0), labels)
    up, _ = step_bce_loss(t(1.5, 0, 0.5).unsqueeze(0), labels)  # more confident on the correct step
    ignored, _ = step_bce_loss(t(0.5, 99, 0.5).unsqueeze(0), labels)
    assert up < base
    assert ignored == base


# ---------------------------------------------------------------- cost model (Safe RLHF)

def test_cost_model_by_hand():
    """Pair 1: c_safer = −ln 3 (s = −1, safe), c_unsafer = ln 3 (s = +1, unsafe).
        −log σ(ln 3 − (−ln 3)) = −log σ(ln 9) = −log(9/10) = log(10/9)
        −log σ((−1)(−ln 3)) = log(4/3);  −log σ((+1)(ln 3)) = log(4/3)
    Pair 2: both costs 0, both safe (s = −1): three terms of −log σ(0) = 3 log 2.
    Mean: (log(10/9) + 2 log(4/3) + 3 log 2) / 2.
    Ranking accuracy: ln 3 > −ln 3 yes, 0 > 0 no → 1/2. Sign accuracy (s·c > 0): 2 of 4.
    """
    loss, metrics = cost_model_loss(t(-LN3, 0), t(LN3, 0), t(-1, -1), t(1, -1))
    assert close(loss, (math.log(10 / 9) + 2 * math.log(4 / 3) + 3 * math.log(2)) / 2)
    assert metrics["ranking_accuracy"] == 0.5
    assert metrics["sign_accuracy"] == 0.5


def test_cost_model_lower_when_unsafer_costs_more_and_signs_checked():
    signs = (t(-1), t(1))
    losses = [cost_model_loss(t(-1), t(c), *signs)[0].item() for c in (-3, 0, 1, 3)]
    assert all(a > b for a, b in zip(losses, losses[1:]))
    with pytest.raises(ValueError):
        cost_model_loss(t(-1), t(1), t(0), t(1))  # a 0/1 "is_safe" flag is not a sign


# ---------------------------------------------------------------- DPO family

def test_dpo_loss_type_answers_questions():
    assert DPOLossType("ipo") is DPOLossType.ipo
    assert f"{DPOLossType.ipo}" == "ipo"  # configs and logs see the bare name
    assert all(member.needs_reference for member in DPOLossType)


def test_dpo_sigmoid_by_hand():
    """β = 0.5. Chosen: π − ref = (ln 3 − 5) − (−5) = ln 3; rejected: (−7 − ln 3) − (−7) = −ln 3.
    h = 2 ln 3, βh = ln 3.  Loss = −log σ(ln 3) = log(4/3).
    cDPO, ε = 0.25: −0.75 log(3/4) − 0.25 log(1/4) = 0.75 log(4/3) + 0.25 log 4.
    Implicit rewards: chosen 0.5 ln 3, rejected −0.5 ln 3, margin ln 3, accuracy 1.
    """
    args = (t(LN3 - 5), t(-7 - LN3), t(-5), t(-7))
    loss, metrics = dpo_loss(*args, beta=0.5)
    assert close(loss, math.log(4 / 3))
    smooth, _ = dpo_loss(*args, beta=0.5, label_smoothing=0.25)
    assert close(smooth, 0.75 * math.log(4 / 3) + 0.25 * math.log(4))
    assert close(metrics["chosen_reward"], LN3 / 2)
    assert close(metrics["rejected_reward"], -LN3 / 2)
    assert close(metrics["reward_margin"], LN3)
    assert metrics["reward_accuracy"] == 1.0


def test_dpo_weighted_by_hand():
    """Pair 1 as above (log(4/3)); pair 2 has policy = reference, h = 0 → log 2.
    Weights 3, 1: (3 log(4/3) + log 2) / 4. Pair 2's rewards tie → accuracy 1/2.
    """
    loss, metrics = dpo_loss(t(LN3 - 5, -1), t(-7 - LN3, -2), t(-5, -1), t(-7, -2), beta=0.5, weights=t(3, 1))
    assert close(loss, (3 * math.log(4 / 3) + math.log(2)) / 4)
    assert metrics["reward_accuracy"] == 0.5


def test_ipo_by_hand():
    """β = 0.25, target 1/(2β) = 2.
    Pair 1: (−1 − (−3)) − (−4 − (−3)) = 2 − (−1) = 3 → (3 − 2)² = 1.
    Pair 2: policy = reference, h = 0 → (0 − 2)² = 4.   Mean 2.5.
    """
    loss, _ = dpo_loss(t(-1, -2), t(-4, -2), t(-3, -2), t(-3, -2), beta=0.25, loss_type="ipo")
    assert close(loss, 2.5)
    with pytest.raises(ValueError):
        dpo_loss(t(-1), t(-4), t(-3), t(-3), beta=0.25, loss_type="ipo", label_smoothing=0.1)


def test_dpo_loss_decreases_as_chosen_logratio_grows():
    losses = [dpo_loss(t(c), t(-3), t(-2), t(-3), beta=0.1)[0].item() for c in (-4, -2, 0, 3)]
    assert all(a > b for a, b in zip(losses, losses[1:]))
    # IPO decreases until h reaches its target 1/(2β) = 5, then rises again (it regresses, not maximizes).
    ipo = [dpo_loss(t(c), t(-3), t(-2), t(-3), beta=0.1, loss_type="ipo")[0].item() for c in (-2, 0, 3)]
    assert ipo[0] > ipo[1] > ipo[2] and close(ipo[2], 0.0)


def test_length_regularised_dpo_by_hand():
    """R-DPO (Park et al. 2024). β = 0.1, h = (−10 − (−12)) − (−20 − (−20)) = 2, α = 0.01, |y_c| = 30, |y_r| = 10:
    −log σ(0.1·2 − 0.01·(30 − 10)) = −log σ(0) = log 2.
    Lengths swapped (chosen shorter): −log σ(0.2 + 0.2) = log(1 + e^{−0.4}).
    cDPO ε = 0.25 with z = 0.4: −0.75 log σ(0.4) − 0.25 log σ(−0.4)."""
    args = (t(-10), t(-20), t(-12), t(-20))
    loss, _ = dpo_loss(*args, beta=0.1, length_alpha=0.01, lengths=(t(30), t(10)))
    assert close(loss, math.log(2))
    shorter, _ = dpo_loss(*args, beta=0.1, length_alpha=0.01, lengths=(t(10), t(30)))
    assert close(shorter, math.log(1 + math.exp(-0.4)))
    smooth, _ = dpo_loss(*args, beta=0.1, length_alpha=0.01, lengths=(t(10), t(30)), label_smoothing=0.25)
    assert close(smooth, 0.75 * math.log(1 + math.exp(-0.4)) + 0.25 * math.log(1 + math.exp(0.4)))
    with pytest.raises(ValueError):
        dpo_loss(*args, beta=0.1, length_alpha=0.01)  # no lengths
    with pytest.raises(ValueError):
        dpo_loss(*args, beta=0.1, loss_type="ipo", length_alpha=0.01, lengths=(t(30), t(10)))


def test_length_regularised_dpo_penalises_a_longer_chosen_more_as_alpha_grows():
    """Chosen 40 tokens, rejected 10: the loss rises with α; α = 0 is plain DPO to the last bit
    (no zero term is added, so the rounding is the same)."""
    args = (t(-10.3, -7.1), t(-20.9, -8.2), t(-12.2, -7.7), t(-20.1, -8.0))
    lengths = (t(40, 40), t(10, 10))
    losses = [dpo_loss(*args, beta=0.1, length_alpha=a, lengths=lengths)[0].item() for a in (0.0, 0.005, 0.01, 0.05)]
    assert all(a < b for a, b in zip(losses, losses[1:]))
    assert losses[0] == dpo_loss(*args, beta=0.1)[0].item()
    # A shorter chosen is helped instead.
    helped = dpo_loss(*args, beta=0.1, length_alpha=0.01, lengths=(t(10, 10), t(40, 40)))[0].item()
    assert helped < losses[0]


def test_dpo_does_not_train_the_reference():
    ref_c = t(-5).requires_grad_()
    loss, _ = dpo_loss(t(-4).requires_grad_(), t(-6), ref_c, t(-6), beta=0.1)
    loss.backward()
    assert ref_c.grad is None


def test_dno_by_hand():
    """η = 0.5; log(π/π_t)(y⁺) = −1 − (−1 − ln 3) = ln 3; log(π/π_t)(y⁻) = −2 − (−2 + ln 3) = −ln 3.
    −log σ(0.5 · 2 ln 3) = log(4/3). With a second pair at π = π_t (log 2) and weights 1, 3:
    (log(4/3) + 3 log 2) / 4.
    """
    loss, metrics = dno_loss(t(-1), t(-2), t(-1 - LN3), t(-2 + LN3), eta=0.5)
    assert close(loss, math.log(4 / 3))
    assert metrics["reward_accuracy"] == 1.0
    weighted, _ = dno_loss(t(-1, 0), t(-2, 0), t(-1 - LN3, 0), t(-2 + LN3, 0), eta=0.5, weights=t(1, 3))
    assert close(weighted, (math.log(4 / 3) + 3 * math.log(2)) / 4)


def test_dno_lower_as_positive_gains_on_previous_iterate():
    losses = [dno_loss(t(p), t(-2), t(-1), t(-2), eta=1.0)[0].item() for p in (-3, -1, 0, 2)]
    assert all(a > b for a, b in zip(losses, losses[1:]))


def test_dno_soft_by_hand_and_minimum_at_target():
    """η = 1, h = ln 3 (policy_1 gained ln 3 on π_t, policy_2 nothing), target 3/4.
    −[3/4 · log σ(ln 3) + 1/4 · log σ(−ln 3)] = 3/4 log(4/3) + 1/4 log 4: the binary entropy of
    3/4, the minimum, because σ(ηh) = 3/4 = target. So the gradient there is 0.
    """
    policy_1 = t(LN3 - 1).requires_grad_()
    loss, metrics = dno_soft_loss(policy_1, t(-2), t(-1), t(-2), target=t(0.75), eta=1.0)
    assert close(loss, 0.75 * math.log(4 / 3) + 0.25 * math.log(4))
    assert close(metrics["predicted_preference"], 0.75)
    loss.backward()
    assert abs(policy_1.grad.item()) < 1e-12
    with pytest.raises(ValueError):
        dno_soft_loss(t(0), t(0), t(0), t(0), target=t(1.5), eta=1.0)


def test_sft_nll_by_hand():
    """Sums −6 over 3 tokens and −2 over 4 tokens: per token 2 and 0.5; mean 1.25."""
    assert close(sft_nll(t(-6, -2), torch.tensor([3, 4])), 1.25)


# ---------------------------------------------------------------- PPO

# Row 0: three real tokens; row 1: one real token, then padding holding garbage.
PPO_MASK = torch.tensor([[1, 1, 1], [1, 0, 0]])


def test_ppo_policy_loss_by_hand():
    """ε = 0.2; old log-probs 0, so ratio = exp(logp).
    tok  A   ratio  −A·r   −A·clip(r)       max    clipped term won?
    1    1   1.5    −1.5   −1·1.2 = −1.2    −1.2   yes
    2   −2   0.5     1.0    2·0.8 =  1.6     1.6   yes
    3    1   1.0    −1.0   −1.0             −1.0   no (equal)
    4    2   0.5    −1.0   −2·0.8 = −1.6    −1.0   no (out of band, but on the pessimistic side)
    Loss = (−1.2 + 1.6 − 1.0 − 1.0) / 4 = −0.4.  clipfrac = 2/4.
    approx_kl = mean((r − 1) − ln r) = [(0.5 − ln 1.5) + 2(−0.5 + ln 2) + 0] / 4 = (2 ln 2 − ln 1.5 − 0.5) / 4.
    """
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.0], [0.5, 1.0, 1.0]], dtype=torch.float64))
    logp[1, 1:] = torch.tensor([1e4, float("nan")])  # garbage at padding
    advantages = torch.tensor([[1.0, -2.0, 1.0], [2.0, float("inf"), 7.0]], dtype=torch.float64)
    logp.requires_grad_()
    loss, metrics = ppo_policy_loss(logp, torch.zeros_like(logp), advantages, PPO_MASK, clip_eps=0.2)
    assert close(loss, -0.4)
    assert metrics["clipfrac"] == 0.5
    assert close(metrics["approx_kl"], (2 * math.log(2) - math.log(1.5) - 0.5) / 4)
    loss.backward()
    # Only token 3 (inside the band) and token 4 (unclipped term won) carry gradient: −A·r / 4.
    expected_grad = torch.tensor([[0.0, 0.0, -0.25], [-0.25, 0.0, 0.0]], dtype=torch.float64)
    assert torch.allclose(logp.grad, expected_grad, atol=1e-12)


def test_ppo_policy_loss_on_policy_is_vanilla_policy_gradient():
    """At ratio 1 (first epoch) the gradient is −A / n_tokens per real token, as in REINFORCE."""
    logp = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    advantages = torch.randn(2, 3, dtype=torch.float64)
    loss, metrics = ppo_policy_loss(logp, logp.detach(), advantages, PPO_MASK, clip_eps=0.2)
    loss.backward()
    assert torch.allclose(logp.grad, -advantages * PPO_MASK / 4)
    assert metrics["clipfrac"] == 0.0 and metrics["approx_kl"] == 0.0


def test_ppo_value_loss_by_hand():
    """ε = 0.2, one row of three tokens (a fourth, padded, holds garbage).
    tok  V    V_old  R     (V−R)²   clip(V) = V_old + clip(V − V_old)   (clip − R)²   max
    1    1.0  0.5    1.5   0.25     0.5 + 0.2 = 0.7                     0.64          0.64 clipped
    2    0.6  0.5    0.0   0.36     0.6 (inside)                        0.36          0.36
    3    0.0  1.0    0.0   0.00     1.0 − 0.2 = 0.8                     0.64          0.64 clipped
    Loss = 0.5 · (0.64 + 0.36 + 0.64) / 3 = 0.82 / 3.  value_clipfrac = 2/3.
    Explained variance (rollout values): R − V_old = (1, −0.5, −1), mean −1/6, unbiased var
    ((7/6)² + (1/3)² + (5/6)²) / 2 = 13/12; Var(R) = (1 + 1/4 + 1/4) / 2 = 3/4; 1 − (13/12)/(3/4) = −4/9.
    """
    values = t(1.0, 0.6, 0.0, float("nan")).unsqueeze(0).requires_grad_()
    old_values, returns = t(0.5, 0.5, 1.0, 3.0).unsqueeze(0), t(1.5, 0.0, 0.0, float("inf")).unsqueeze(0)
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, metrics = ppo_value_loss(values, old_values, returns, mask, clip_eps=0.2)
    assert close(loss, 0.82 / 3)
    assert close(metrics["value_clipfrac"], 2 / 3)
    assert close(metrics["explained_variance"], -4 / 9)
    loss.backward()
    assert torch.isfinite(values.grad).all()
    assert values.grad[0, 0] == 0 and values.grad[0, 2] == 0  # the clipped branch has no gradient


def test_ppo_value_loss_unclipped_at_old_values_is_half_mse():
    values = torch.randn(2, 3, dtype=torch.float64)
    returns = torch.randn(2, 3, dtype=torch.float64)
    loss, metrics = ppo_value_loss(values, values, returns, PPO_MASK, clip_eps=0.2)
    assert close(loss, 0.5 * masked_mean((values - returns) ** 2, PPO_MASK))
    assert metrics["value_clipfrac"] == 0.0


def test_explained_variance_is_nan_when_every_return_is_equal():
    """R = (3, 3), V_old = (1, 2): Var(R) = 0 and Var(R − V_old) = 1/2, so 1 − Var(R − V_old) / Var(R) would be
    −inf; it is undefined, NaN. Checked to fail: with the division unguarded (−inf)."""
    _, metrics = ppo_value_loss(t(1, 2).view(1, 2), t(1, 2).view(1, 2), t(3, 3).view(1, 2), torch.ones(1, 2), 0.2)
    assert math.isnan(metrics["explained_variance"])


def test_ppo_losses_are_padding_invariant():
    logp, old, adv, values, old_values, returns = torch.randn(6, 2, 3, dtype=torch.float64)
    padded = [torch.cat([x, torch.full((2, 2), 1e6, dtype=torch.float64)], dim=1) for x in (logp, old, adv)]
    mask = torch.cat([PPO_MASK, torch.zeros(2, 2, dtype=torch.long)], dim=1)
    short = ppo_policy_loss(logp, old, adv, PPO_MASK, 0.2)
    long = ppo_policy_loss(*padded, mask, 0.2)
    assert close(short[0], long[0])
    assert all(close(short[1][key], long[1][key]) for key in short[1])
    padded = [torch.cat([x, torch.full((2, 2), -1e6, dtype=torch.float64)], dim=1) for x in (values, old_values, returns)]
    assert close(ppo_value_loss(values, old_values, returns, PPO_MASK, 0.2)[0], ppo_value_loss(*padded, mask, 0.2)[0])


# ---------------------------------------------------------------- from logits

def test_entropy_by_hand():
    """Uniform over 4: log 4. Logits (ln 3, 0): p = (3/4, 1/4), H = −(3/4 log 3/4 + 1/4 log 1/4)
    = log 4 − (3/4) ln 3. A −inf logit (top-k filtered) adds nothing and must not give NaN.
    """
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [LN3, 0.0, -math.inf, -math.inf]], dtype=torch.float64)
    logits.requires_grad_()
    entropy = entropy_from_logits(logits)
    assert torch.allclose(entropy, t(math.log(4), math.log(4) - 0.75 * LN3), atol=1e-12)
    entropy.sum().backward()
    assert torch.isfinite(logits.grad).all()


def test_entropy_is_highest_for_uniform():
    logits = torch.randn(16, 5, dtype=torch.float64)
    assert (entropy_from_logits(logits) <= math.log(5) + 1e-12).all()


def test_logprobs_from_logits_by_hand():
    """Logits (0, ln 3): p = (1/4, 3/4). Labels 1, 0 → log(3/4), log(1/4). Shapes (1, 2, 2) → (1, 2).
    Temperature 2: logits (0, ln 3 / 2) = log-weights (1, √3), so p(label 0) = 1 / (1 + √3).
    """
    logits = torch.tensor([[[0.0, LN3], [0.0, LN3]]], dtype=torch.float64)
    labels = torch.tensor([[1, 0]])
    assert torch.allclose(logprobs_from_logits(logits, labels), t(math.log(0.75), math.log(0.25)).unsqueeze(0))
    hot = logprobs_from_logits(logits, labels, temperature=2.0)
    assert close(hot[0, 1], -math.log(1 + math.sqrt(3)))


def test_logprobs_from_logits_matches_log_softmax_and_upcasts_bf16():
    logits = torch.randn(2, 3, 50, dtype=torch.float64) * 3
    labels = torch.randint(0, 50, (2, 3))
    expected = torch.log_softmax(logits / 0.7, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(logprobs_from_logits(logits, labels, temperature=0.7), expected)
    assert logprobs_from_logits(logits.bfloat16(), labels).dtype == torch.float32
    with pytest.raises(ValueError):
        logprobs_from_logits(logits, labels.unsqueeze(-1))


# ---------------------------------------------------------------- diagnostics

def _live(*values):
    return t(*values).requires_grad_()


@pytest.mark.parametrize("call", [
    lambda: bradley_terry_loss(_live(1, 2), t(0, 3)),
    lambda: step_bce_loss(_live(0.5, -1, 2).unsqueeze(0), t(1, -100, 0).unsqueeze(0)),
    lambda: cost_model_loss(_live(-1, 1), t(1, 2), t(-1, 1), t(1, 1)),
    lambda: dpo_loss(_live(-1, -2), t(-3, -2), t(-2, -2), t(-3, -3), beta=0.1),
    lambda: dpo_loss(_live(-1, -2), t(-3, -2), t(-2, -2), t(-3, -3), beta=0.1, loss_type="ipo"),
    lambda: dno_loss(_live(-1, -2), t(-3, -2), t(-2, -2), t(-3, -3), eta=0.5),
    lambda: dno_soft_loss(_live(-1), t(-3), t(-2), t(-3), target=t(0.25), eta=0.5),
    lambda: ppo_policy_loss(_live(-1, -2, -3, -4).view(2, 2), t(-1, -1, -1, -1).view(2, 2),
                            t(1, -1, 2, 0).view(2, 2), torch.ones(2, 2), clip_eps=0.2),
    lambda: ppo_value_loss(_live(1, 2, 3, 4).view(2, 2), t(1, 1, 1, 1).view(2, 2), t(0, 2, 5, 1).view(2, 2),
                           torch.ones(2, 2), clip_eps=0.2),
])
def test_loss_diagnostics_are_detached_0d_tensors(call):
    """A diagnostic as a Python number would cost a device sync per loss call (``.item()``); the caller
    turns them into numbers on the steps it logs. Checked to fail: with any ``.item()`` or ``float(·)``
    back in a loss's metrics."""
    loss, metrics = call()
    assert loss.requires_grad and metrics
    for name, value in metrics.items():
        assert isinstance(value, torch.Tensor) and value.dim() == 0 and not value.requires_grad, name
