"""Advantage estimators: values worked out by hand, plus the properties that pin them down."""
import math

import pytest
import torch

from rlhfkit.advantages import gae, group_normalized_advantages, rloo_advantages, whiten
from rlhfkit.losses import masked_whiten


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


def test_gae_by_hand():
    """γ = 0.9, λ = 0.8, so γλ = 0.72. Row 0: three real tokens; row 1: two, then padding.

    Row 0, r = (0, 0, 1), V = (0.5, 0.4, 0.6); V after the last token is 0 (episode over):
      t=2: δ = 1 + 0.9·0 − 0.6 = 0.4                         A = 0.4
      t=1: δ = 0 + 0.9·0.6 − 0.4 = 0.14                      A = 0.14 + 0.72·0.4 = 0.428
      t=0: δ = 0 + 0.9·0.4 − 0.5 = −0.14                     A = −0.14 + 0.72·0.428 = 0.16816
      returns = A + V = (0.66816, 0.828, 1.0)
    Row 1, r = (0.5, 1, pad), V = (0.2, 0.3, pad); the padded V (9.0) must not be bootstrapped:
      t=1: δ = 1 + 0.9·0 − 0.3 = 0.7                         A = 0.7
      t=0: δ = 0.5 + 0.9·0.3 − 0.2 = 0.57                    A = 0.57 + 0.72·0.7 = 1.074
      returns = (1.274, 1.0, 0)
    """
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.5, 1.0, 5.0]], dtype=torch.float64)
    values = torch.tensor([[0.5, 0.4, 0.6], [0.2, 0.3, 9.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    assert torch.allclose(advantages, torch.tensor([[0.16816, 0.428, 0.4], [1.074, 0.7, 0.0]], dtype=torch.float64))
    assert torch.allclose(returns, torch.tensor([[0.66816, 0.828, 1.0], [1.274, 1.0, 0.0]], dtype=torch.float64))


def test_gae_with_gamma_lambda_one_gives_reward_to_go():
    """With γ = λ = 1 the δ's telescope: A_t + V_t = Σ_{k≥t} r_k, whatever the values."""
    rewards, values = torch.randn(2, 4, 5, dtype=torch.float64)
    mask = torch.ones(4, 5, dtype=torch.long)
    _, returns = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    reward_to_go = rewards.flip(1).cumsum(1).flip(1)
    assert torch.allclose(returns, reward_to_go)


def test_gae_lambda_zero_is_one_step_td():
    rewards, values = torch.randn(2, 3, 4, dtype=torch.float64)
    mask = torch.ones(3, 4)
    advantages, _ = gae(rewards, values, mask, gamma=0.9, lam=0.0)
    next_values = torch.cat([values[:, 1:], torch.zeros(3, 1, dtype=torch.float64)], dim=1)
    assert torch.allclose(advantages, rewards + 0.9 * next_values - values)


def test_gae_is_padding_invariant():
    """Extra padded columns, holding garbage, change nothing on the real tokens."""
    rewards, values = torch.randn(2, 3, 4, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    garbage = torch.full((3, 3), 1e6, dtype=torch.float64)
    garbage[0, 0] = float("inf")
    advantages, returns = gae(rewards, values, mask, 0.95, 0.9)
    advantages_long, returns_long = gae(
        torch.cat([rewards, garbage], 1), torch.cat([values, garbage], 1), torch.cat([mask, torch.zeros(3, 3)], 1), 0.95, 0.9
    )
    assert torch.equal(advantages_long[:, :4], advantages) and torch.equal(returns_long[:, :4], returns)
    assert (advantages_long[:, 4:] == 0).all() and (returns_long[:, 4:] == 0).all()
    # Garbage inside a row's padding (row 2, columns 1..3) did not leak either.
    short_rewards, short_values = rewards.clone(), values.clone()
    short_rewards[2, 1:], short_values[2, 1:] = -7.0, 123.0
    assert torch.equal(gae(short_rewards, short_values, mask, 0.95, 0.9)[0], advantages)


def test_gae_does_not_track_gradients():
    values = torch.randn(1, 3, requires_grad=True)
    advantages, returns = gae(torch.randn(1, 3), values, torch.ones(1, 3), 0.9, 0.9)
    assert not advantages.requires_grad and not returns.requires_grad


def test_group_normalized_advantages_by_hand():
    """Group (1, 0, 0, 0): mean 1/4; deviations (3/4, −1/4, −1/4, −1/4), squares sum
    9/16 + 3/16 = 3/4; sample (n − 1) variance (3/4)/3 = 1/4, std 1/2.
    A = (3/4, −1/4, −1/4, −1/4) / (1/2) = (1.5, −0.5, −0.5, −0.5)   (eps = 0 here).
    (The population std, √(3/16) ≈ 0.433, would give 1.732 instead of 1.5.)
    Without scaling: (0.75, −0.25, −0.25, −0.25).
    """
    advantages = group_normalized_advantages(t(1, 0, 0, 0), group_size=4, eps=0.0)
    assert torch.allclose(advantages, t(1.5, -0.5, -0.5, -0.5), atol=1e-15)
    assert torch.allclose(group_normalized_advantages(t(1, 0, 0, 0), 4, scale=False), t(0.75, -0.25, -0.25, -0.25))


def test_group_normalized_advantages_groups_are_prompt_major_and_equal_groups_give_zero():
    """Rewards (1, 0, 0, 0 | 2, 2, 2, 2): the second group carries no signal → exactly 0."""
    advantages = group_normalized_advantages(t(1, 0, 0, 0, 2, 2, 2, 2), group_size=4)
    assert torch.allclose(advantages[:4], t(1.5, -0.5, -0.5, -0.5) * 0.5 / (0.5 + 1e-6))
    assert torch.equal(advantages[4:], torch.zeros(4, dtype=torch.float64))
    with pytest.raises(ValueError):
        group_normalized_advantages(t(1, 2, 3), group_size=2)
    with pytest.raises(ValueError):
        group_normalized_advantages(t(1, 2), group_size=1)


def test_rloo_by_hand():
    """Group (1, 0, 0, 0): A_0 = 1 − (0+0+0)/3 = 1; A_j = 0 − (1+0+0)/3 = −1/3 for the others.
    Group (3, 1): A = (3 − 1, 1 − 3) = (2, −2).
    """
    assert torch.allclose(rloo_advantages(t(1, 0, 0, 0), 4), t(1, -1 / 3, -1 / 3, -1 / 3))
    assert torch.equal(rloo_advantages(t(3, 1, 0.5, 0.5), 2), t(2, -2, 0, 0))


def test_rloo_sums_to_zero_per_group_and_is_scaled_centering():
    rewards = torch.randn(12, dtype=torch.float64)
    advantages = rloo_advantages(rewards, group_size=4).view(3, 4)
    assert torch.allclose(advantages.sum(1), torch.zeros(3, dtype=torch.float64), atol=1e-12)
    centered = rewards.view(3, 4) - rewards.view(3, 4).mean(1, keepdim=True)
    assert torch.allclose(advantages, centered * 4 / 3)


def test_whiten_delegates_to_masked_whiten():
    """(2, 4, 6): mean 4, unbiased std 2 → (−1, 0, 1) up to the 1e-8 guard."""
    x = t(2, 4, 6)
    assert torch.allclose(whiten(x), t(-1, 0, 1), atol=1e-8)
    mask = torch.tensor([1, 1, 0])
    assert torch.equal(whiten(x, mask), masked_whiten(x, mask))
    assert torch.allclose(whiten(x, shift_mean=False), t(3, 4, 5), atol=1e-8)
    assert math.isclose(whiten(torch.randn(100, dtype=torch.float64)).std().item(), 1.0, rel_tol=1e-6)


def test_gae_with_masked_prompt_tokens_in_front():
    """A mask that starts late (prompt tokens in front of the response) gives the same advantages
    on the response as the response alone, and 0 on the prompt: nothing leaks backward."""
    rewards, values = torch.randn(2, 2, 3, dtype=torch.float64)
    advantages, returns = gae(rewards, values, torch.ones(2, 3), 0.9, 0.8)
    prompt = torch.full((2, 2), 5.0, dtype=torch.float64)
    mask = torch.cat([torch.zeros(2, 2), torch.ones(2, 3)], dim=1)
    advantages_p, returns_p = gae(torch.cat([prompt, rewards], 1), torch.cat([prompt, values], 1), mask, 0.9, 0.8)
    assert torch.equal(advantages_p[:, 2:], advantages) and torch.equal(returns_p[:, 2:], returns)
    assert (advantages_p[:, :2] == 0).all() and (returns_p[:, :2] == 0).all()
