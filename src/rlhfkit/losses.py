"""Losses of the reward models (Bradley-Terry, step BCE, cost) and the masked statistics every loss rests on;
the PPO family's are in ``rlhfkit.policy_losses``, the direct preference ones in ``rlhfkit.preference_losses``.
Pure tensor math: imports only torch.

Conventions. B = batch, T = tokens, V = vocabulary. A ``mask`` is 0/1 (bool or float) with
the same shape as the tensor it masks; 1 marks a real (response) token. Sequence log-probs
are *sums* over response tokens unless a docstring says otherwise. Every loss returns
``(loss, metrics)``: a scalar tensor with grad, and a dict of detached 0-d tensors. Diagnostics stay
tensors because ``.item()`` would wait for the device on every call; the caller makes them numbers
(``float``) only on the steps it logs.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def _check_same_shape(**tensors: Tensor) -> None:
    # (B,) against (B, 1) broadcasts silently to (B, B): the loss then averages B² wrong pairs
    # and still looks plausible. Demand equal shapes instead.
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"shapes must match, got {shapes}")


def _zero_padding(mask: Tensor, *tensors: Tensor) -> list[Tensor]:
    # Padding may hold inf/NaN (garbage logits, -inf log-probs). Masking the *result* is not
    # enough: 0 * inf = NaN in the backward pass too. Replace padded inputs with 0 first.
    keep = mask.bool()
    return [torch.where(keep, t, torch.zeros_like(t)) for t in tensors]


def _weighted_mean(per_item: Tensor, weights: Tensor | None) -> Tensor:
    """Σ w·l / Σ w over a (B,) tensor; the plain mean when ``weights`` is None (Σ w must be > 0)."""
    if weights is None:
        return per_item.mean()
    _check_same_shape(losses=per_item, weights=weights)
    weights = weights.to(per_item.dtype)
    return (weights * per_item).sum() / weights.sum()


# ---------------------------------------------------------------- masked statistics

def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Σ of ``x`` where ``mask`` is 1, over all elements (``dim=None``) or along ``dim``."""
    _check_same_shape(x=x, mask=mask)
    # where, not x * mask: padding may hold inf/NaN and 0 * inf = NaN.
    zeroed = torch.where(mask.bool(), x, torch.zeros_like(x))
    return zeroed.sum() if dim is None else zeroed.sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``x`` over positions where ``mask`` is 1; shapes (…) → () or (…) minus ``dim``.

    An all-masked slice gives 0, not NaN, so one empty row cannot poison a batch's loss.
    """
    count = mask.to(x.dtype).sum() if dim is None else mask.to(x.dtype).sum(dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1)


def _masked_moments(x: Tensor, mask: Tensor, unbiased: bool, all_sum: Callable[[Tensor], Tensor] | None) -> tuple[Tensor, Tensor]:
    """(mean, variance) of the masked elements of ``x``: three sums, each taken over processes by ``all_sum``."""
    total = all_sum or (lambda t: t)
    n = total(mask.to(x.dtype).sum())
    mean = total(masked_sum(x, mask)) / n.clamp(min=1)
    squares = total(masked_sum((x - mean) ** 2, mask))
    return mean, squares / ((n - 1) if unbiased else n).clamp(min=1)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True, all_sum: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """Variance of the masked elements of ``x`` (one scalar over all of them).

    ``unbiased`` divides by n − 1 (Bessel), as TRL's and torchtune's ``masked_var`` do, so our
    whitened advantages match theirs. With a single element that would divide by zero; the
    divisor is clamped to 1, giving variance 0 (there is no spread to measure).

    ``all_sum`` sums a tensor over processes (each holding a shard of the batch), so the
    statistics are those of the whole batch; None means this process holds all of it.
    """
    return _masked_moments(x, mask, unbiased, all_sum)[1]


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, all_sum: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """(x − mean) / sqrt(var + 1e-8) over the masked elements, any shape; padding comes back 0.

    Mean and *unbiased* variance (see ``masked_var``) come from masked elements only: padding
    zeros would drag the mean toward 0 and shrink the variance. ``shift_mean=False`` keeps
    the original mean (rescales only), as PPO implementations do when whitening rewards.
    ``all_sum`` as in ``masked_var``: whiten by the statistics of the batch over all processes.
    """
    mean, var = _masked_moments(x, mask, True, all_sum)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, torch.zeros_like(whitened))


# ---------------------------------------------------------------- reward models

def bradley_terry_loss(
    chosen: Tensor,
    rejected: Tensor,
    margin: Tensor | None = None,
    weights: Tensor | None = None,
    center_coef: float = 0.0,
) -> tuple[Tensor, dict]:
    """Bradley-Terry reward-model loss on (B,) scalar rewards of chosen and rejected responses.

    loss = Σ w·(−log σ(r_c − r_r − m)) / Σ w  +  center_coef · mean((r_c + r_r)²)

    The first term is InstructGPT's eq. 1 (Ouyang et al. 2022) with an optional per-pair margin
    m (Llama 2, Touvron et al. 2023). BT is blind to a constant shift of all rewards, so the
    offset drifts freely; the second term (reward centering, Eisenstein et al. 2023) pins it
    near 0. ``weights`` e.g. 1/C(K,2) from ``ranking_pairs``. Metrics: accuracy (r_c > r_r,
    ties count as wrong), margin = mean(r_c − r_r), mean chosen and rejected rewards.
    """
    _check_same_shape(chosen=chosen, rejected=rejected)
    diff = chosen - rejected
    if margin is not None:
        _check_same_shape(chosen=chosen, margin=margin)
        diff = diff - margin
    # logsigmoid, not log(sigmoid(·)): sigmoid underflows to 0 below about −100 (fp32), log(0) = −inf.
    loss = _weighted_mean(-F.logsigmoid(diff), weights)
    if center_coef:
        loss = loss + center_coef * reward_centering(chosen, rejected)
    with torch.no_grad():
        metrics = {
            "accuracy": (chosen > rejected).float().mean(),
            "margin": (chosen - rejected).mean(),
            "chosen_reward": chosen.mean(),
            "rejected_reward": rejected.mean(),
        }
    return loss, metrics


def reward_centering(chosen: Tensor, rejected: Tensor) -> Tensor:
    """mean((r_c + r_r)²) over (B,) rewards: the centering term of ``bradley_terry_loss`` (Eisenstein et al. 2023).

    Its own function so a caller that splits a batch (gradient accumulation) can weight it by its
    share of the batch's pairs, and the BT term by its share of the pairs' weights.
    """
    return ((chosen + rejected) ** 2).mean()


def pearson_correlation(x: Tensor, y: Tensor, eps: float = 1e-12) -> Tensor:
    """Pearson's ρ of (N,) x and (N,) y, a 0-d tensor differentiable in both:

        ρ = Σ (x − x̄)(y − ȳ) / √(Σ (x − x̄)² · Σ (y − ȳ)²)

    A constant x or y (zero variance) gives ρ = 0, not NaN: the product under the root is clamped
    to eps² before the square root, whose gradient at 0 would be infinite.
    """
    _check_same_shape(x=x, y=y)
    dx, dy = x - x.mean(), y.to(x.dtype) - y.to(x.dtype).mean()
    return (dx * dy).sum() / ((dx * dx).sum() * (dy * dy).sum()).clamp(min=eps * eps).sqrt()


def length_decorrelation_loss(quality: Tensor, length_scores: Tensor, lengths: Tensor, coef: float,
                              quality_weight: Tensor | None = None,
                              length_weight: Tensor | None = None) -> tuple[Tensor, dict]:
    """ODIN's disentangling terms (Chen et al. 2024, "ODIN: Disentangled Reward Mitigates Hacking in RLHF", eq. 3-4)
    on N responses: quality (N,) = r_Q, length_scores (N,) = r_L, lengths (N,) in tokens.

        loss = coef · (−ρ(r_L, len) + |ρ(r_Q, len)| + |w_Q · w_L|)

    The BT loss is fitted to r_Q + r_L (the caller's); this term makes the length head r_L carry the
    length and the quality head r_Q (the one kept as the reward) carry none. The last term (ODIN's
    orthogonality of the two heads' weights, (1, H) each) only when both weights are given. One
    coefficient for all three: ODIN tunes them separately, but they share a scale (|ρ| ≤ 1, and the
    heads' weights have norm ~1 at their initialisation). Metrics: both ρ, detached.
    """
    rho_quality = pearson_correlation(quality, lengths)
    rho_length = pearson_correlation(length_scores, lengths)
    term = rho_quality.abs() - rho_length
    if quality_weight is not None and length_weight is not None:
        term = term + (quality_weight * length_weight).sum().abs()
    return coef * term, {"length_corr_quality": rho_quality.detach(), "length_corr_length": rho_length.detach()}


def ranking_pairs(ranking: list[int]) -> list[tuple[int, int, float]]:
    """Expand a K-wise ranking (response indices, best first) into (winner, loser, weight) pairs.

    All C(K,2) pairs, each weighted 1/C(K,2) (InstructGPT, Ouyang et al. 2022, eq. 1): the K
    responses of one prompt then count as one comparison in total, which is what keeps a
    reward model from overfitting to prompts with long rankings.
    """
    k = len(ranking)
    if k < 2:
        raise ValueError(f"a ranking needs at least 2 responses, got {ranking}")
    if len(set(ranking)) != k:
        raise ValueError(f"a ranking lists each response once, got {ranking}")
    weight = 1.0 / (k * (k - 1) / 2)
    return [(ranking[i], ranking[j], weight) for i in range(k) for j in range(i + 1, k)]


def step_bce_loss(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> tuple[Tensor, dict]:
    """Process-reward-model loss: BCE-with-logits at step boundaries only.

    logits (B, T): one logit per token, read as log-odds that the step ending there is correct.
    labels (B, T): 1 / 0 (or a soft target in [0, 1], Math-Shepherd style) at the positions
    that close a step, ``ignore_index`` elsewhere. Loss = mean over labelled positions of
    −[y log σ(z) + (1 − y) log σ(−z)] (Lightman et al. 2023). Metrics: step accuracy
    ((z > 0) == (y > 0.5)) and the number of labelled steps.
    """
    _check_same_shape(logits=logits, labels=labels)
    mask = labels != ignore_index
    # −100 is not a probability: replace it before BCE so ignored positions stay finite.
    targets = torch.where(mask, labels, torch.zeros_like(labels)).to(logits.dtype)
    per_position = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    loss = masked_mean(per_position, mask)
    with torch.no_grad():
        correct = ((logits > 0) == (targets > 0.5)).to(logits.dtype)
        metrics = {"step_accuracy": masked_mean(correct, mask), "n_steps": mask.sum()}
    return loss, metrics


def cost_model_loss(
    cost_safer: Tensor, cost_unsafer: Tensor, sign_safer: Tensor, sign_unsafer: Tensor
) -> tuple[Tensor, dict]:
    """Safe RLHF cost-model loss (Dai et al. 2023, eq. 6), all inputs (B,).

    loss = mean[−log σ(c_unsafer − c_safer) − log σ(s_safer·c_safer) − log σ(s_unsafer·c_unsafer)]

    s = +1 for an unsafe response, −1 for a safe one, so the classification terms push unsafe
    costs above 0 and safe ones below: a negative cost means safe, and 0 is the boundary the
    Lagrangian constraint in PPO-Lagrangian uses. The two signs are independent labels: the
    safer of two responses may still be unsafe. Metrics: ranking accuracy (c_unsafer >
    c_safer), sign accuracy (s·c > 0 over both responses), mean costs.
    """
    _check_same_shape(
        cost_safer=cost_safer, cost_unsafer=cost_unsafer, sign_safer=sign_safer, sign_unsafer=sign_unsafer
    )
    for name, sign in (("sign_safer", sign_safer), ("sign_unsafer", sign_unsafer)):
        # A 0/1 "is_safe" flag passed by mistake would silently zero or flip a term.
        if not bool(((sign == 1) | (sign == -1)).all()):
            raise ValueError(f"{name} must be +1 (unsafe) or -1 (safe)")
    sign_safer, sign_unsafer = sign_safer.to(cost_safer.dtype), sign_unsafer.to(cost_unsafer.dtype)
    ranking = -F.logsigmoid(cost_unsafer - cost_safer)
    classification = -F.logsigmoid(sign_safer * cost_safer) - F.logsigmoid(sign_unsafer * cost_unsafer)
    loss = (ranking + classification).mean()
    with torch.no_grad():
        signs_right = torch.cat([sign_safer * cost_safer > 0, sign_unsafer * cost_unsafer > 0])
        metrics = {
            "ranking_accuracy": (cost_unsafer > cost_safer).float().mean(),
            "sign_accuracy": signs_right.float().mean(),
            "cost_safer": cost_safer.mean(),
            "cost_unsafer": cost_unsafer.mean(),
        }
    return loss, metrics
