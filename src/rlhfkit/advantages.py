"""Advantage estimators for PPO, GRPO and RLOO. Pure tensor math: imports only torch.

Shapes: B = batch, T = tokens. Advantages are training *targets*: every function here runs
under ``torch.no_grad()``, so a caller that passes live critic values cannot backpropagate
through them by accident.
"""
from __future__ import annotations

from enum import StrEnum

import torch

from rlhfkit.losses import masked_var, masked_whiten  # pure tensor math too; one whitening, not two

Tensor = torch.Tensor


@torch.no_grad()
def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016, eq. 16): (B, T) → (B, T), (B, T).

    rewards: per-token rewards (typically −β·KL at every token, plus the sequence score at
    the last real token). values: V(s_t) from the critic. mask: 1 on response tokens.

        δ_t = r_t + γ V_{t+1} − V_t,    A_t = δ_t + γλ A_{t+1},    returns_t = A_t + V_t

    The episode ends at the last real token, so V_{t+1} = 0 and A_{t+1} = 0 beyond it; the
    critic's value of a padding token must never be bootstrapped from. Advantages and returns
    are 0 at masked positions. Right padding is the usual layout, but any mask whose 1s are
    one contiguous run per row (prompt tokens masked in front, say) works the same way.
    """
    if rewards.shape != values.shape or rewards.shape != mask.shape:
        raise ValueError(f"shapes must match: {tuple(rewards.shape)}, {tuple(values.shape)}, {tuple(mask.shape)}")
    keep = mask.bool()
    # where, not multiply: the critic's output at padding may be anything, inf included.
    rewards = torch.where(keep, rewards, torch.zeros_like(rewards))
    values = torch.where(keep, values, torch.zeros_like(values))
    next_value = torch.zeros_like(values[:, 0])  # V beyond the last column: the episode is over
    next_advantage = torch.zeros_like(values[:, 0])
    advantages = []
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        # Masking here stops the recursion at the end of each real segment.
        next_advantage = torch.where(keep[:, t], delta + gamma * lam * next_advantage, torch.zeros_like(delta))
        next_value = values[:, t]
        advantages.append(next_advantage)
    advantages = torch.stack(advantages[::-1], dim=1)
    return advantages, advantages + values


@torch.no_grad()
def group_normalized_advantages(rewards: Tensor, group_size: int, eps: float = 1e-6, scale: bool = True) -> Tensor:
    """GRPO outcome advantages (Shao et al. 2024, §4.1.2, fed to the objective of eq. 3): (B,) → (B,).

    rewards are laid out prompt-major, B = n_prompts · group_size, the group_size samples of
    one prompt contiguous. A_i = (r_i − mean_group) / (std_group + eps), with the *sample*
    (unbiased, n − 1) std, as DeepSeekMath's description and TRL's ``.std()`` use; that is
    why group_size must be ≥ 2. ``scale=False`` drops the division (Dr. GRPO, Liu et al. 2025),
    which removes the bias toward groups whose rewards barely differ. A group whose rewards are
    all equal gets advantage exactly 0 either way: it carries no signal.
    """
    shifted = _shifted_groups(rewards, group_size)  # (n_prompts, group_size)
    centered = shifted - shifted.mean(dim=1, keepdim=True)
    if scale:
        centered = centered / (shifted.std(dim=1, keepdim=True, unbiased=True) + eps)
    return centered.reshape(rewards.shape)


@torch.no_grad()
def rloo_advantages(rewards: Tensor, group_size: int) -> Tensor:
    """REINFORCE leave-one-out baseline (Ahmadian et al. 2024): (B,) → (B,), laid out prompt-major.

    A_i = r_i − (1/(k − 1)) Σ_{j≠i} r_j  =  k/(k − 1) · (r_i − mean_group).
    The baseline excludes the sample itself, so it is independent of r_i and the estimator
    stays unbiased; advantages sum to zero within each group, and are exactly 0 in a group of
    equal rewards.
    """
    shifted = _shifted_groups(rewards, group_size)
    others_mean = (shifted.sum(dim=1, keepdim=True) - shifted) / (group_size - 1)
    return (shifted - others_mean).reshape(rewards.shape)


def _shifted_groups(rewards: Tensor, group_size: int) -> Tensor:
    """(n_prompts, group_size) rewards minus each group's first reward: the baselines above are shift-invariant.

    The shift is what makes a group of equal rewards give advantages of exactly 0. Without it the
    group mean of equal floats need not equal them (x + x + x rounds, so mean − x can be one ulp),
    and GRPO then divides that ulp by std + eps = 1e-6: advantages of order 0.1 (+0.24 for three
    rewards of −2.9) from a group with no signal at all (group sizes 3, 5, 6, 7, 8, …; RLOO's
    leave-one-out mean rounds the same way, to ~1e-7).
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be (B,), got {tuple(rewards.shape)}")
    if group_size < 2 or rewards.numel() % group_size:
        raise ValueError(f"need group_size >= 2 dividing B = {rewards.numel()}, got {group_size}")
    groups = rewards.reshape(-1, group_size)
    return groups - groups[:, :1]


@torch.no_grad()
def whiten(x: Tensor, mask: Tensor | None = None, shift_mean: bool = True, all_sum=None) -> Tensor:
    """Whiten ``x`` (any shape) over its masked elements; all elements when ``mask`` is None.

    Delegates to ``losses.masked_whiten``: masked mean, unbiased masked variance, padding → 0.
    ``all_sum`` (a sum over processes) whitens a batch sharded across processes as one batch.
    """
    if mask is None:
        mask = torch.ones_like(x, dtype=torch.bool)
    return masked_whiten(x, mask, shift_mean=shift_mean, all_sum=all_sum)


@torch.no_grad()
def scale_by_std(x: Tensor, mask: Tensor, all_sum=None) -> Tensor:
    """x / sqrt(var + 1e-8) over the masked elements of ``x`` (any shape), without shifting the mean; padding → 0.

    For advantages that a baseline has already centred (GRPO's group mean, RLOO's leave-one-out):
    whitening would subtract the batch mean again and give a group whose rewards were all equal,
    advantage 0, a nonzero advantage and so a gradient from a group that carries no signal. Scaling
    alone keeps 0 at exactly 0 (TRL's ``scale_rewards="batch"`` is this scaling, on rewards). The
    unbiased masked variance and ``all_sum`` as in ``losses.masked_var``.
    """
    scaled = x * torch.rsqrt(masked_var(x, mask, all_sum=all_sum) + 1e-8)
    return torch.where(mask.bool(), scaled, torch.zeros_like(scaled))


class Algorithm(StrEnum):
    """Which advantage estimator an RL stage uses (``recipes.ppo``): ppo (a critic and :func:`gae`), grpo
    (:func:`group_normalized_advantages`) or rloo (:func:`rloo_advantages`). The algorithms differ only in
    these members' answers to the questions the recipe asks, never in a branch buried in it."""

    ppo = "ppo"
    grpo = "grpo"
    rloo = "rloo"

    @property
    def uses_critic(self) -> bool:
        """Whether a value model is trained and GAE gives per-token advantages."""
        return self is Algorithm.ppo

    @property
    def min_group_size(self) -> int:
        """GRPO and RLOO compare the K samples of one prompt, so they need K ≥ 2."""
        return 1 if self is Algorithm.ppo else 2

    @property
    def default_kl_in_loss(self) -> bool:
        """GRPO puts a k3 KL term in the loss (Shao et al. 2024, eq. 3); PPO and RLOO penalise the reward."""
        return self is Algorithm.grpo

    def sequence_advantages(self, returns: torch.Tensor, group_size: int, scale: bool = True) -> torch.Tensor:
        """(B,) sequence returns → (B,) advantages for the critic-free members; ``scale`` divides GRPO's by the group std."""
        if self is Algorithm.grpo:
            return group_normalized_advantages(returns, group_size, scale=scale)
        return rloo_advantages(returns, group_size)
