"""Losses of every stage but the direct preference ones (``rlhfkit.preference_losses``), and the masked statistics they rest on. Pure tensor math: imports only torch.

Conventions. B = batch, T = tokens, V = vocabulary. A ``mask`` is 0/1 (bool or float) with
the same shape as the tensor it masks; 1 marks a real (response) token. Sequence log-probs
are *sums* over response tokens unless a docstring says otherwise. Every loss returns
``(loss, metrics)``: a scalar tensor with grad, and a dict of detached Python floats.
"""
from __future__ import annotations

from enum import StrEnum
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
            "accuracy": (chosen > rejected).float().mean().item(),
            "margin": (chosen - rejected).mean().item(),
            "chosen_reward": chosen.mean().item(),
            "rejected_reward": rejected.mean().item(),
        }
    return loss, metrics


def reward_centering(chosen: Tensor, rejected: Tensor) -> Tensor:
    """mean((r_c + r_r)²) over (B,) rewards: the centering term of ``bradley_terry_loss`` (Eisenstein et al. 2023).

    Its own function so a caller that splits a batch (gradient accumulation) can weight it by its
    share of the batch's pairs, and the BT term by its share of the pairs' weights.
    """
    return ((chosen + rejected) ** 2).mean()


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
        metrics = {"step_accuracy": masked_mean(correct, mask).item(), "n_steps": int(mask.sum())}
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
            "ranking_accuracy": (cost_unsafer > cost_safer).float().mean().item(),
            "sign_accuracy": signs_right.float().mean().item(),
            "cost_safer": cost_safer.mean().item(),
            "cost_unsafer": cost_unsafer.mean().item(),
        }
    return loss, metrics


# ---------------------------------------------------------------- PPO

class LossAggregation(StrEnum):
    """How a (B, T) tensor of per-token losses l becomes the scalar that is minimised.

    With m the response mask, n_i = Σ_t m_it the length of response i, N the number of responses
    (rows with at least one token) and L a constant (the longest possible response):

        token_mean               Σ_it m·l / Σ_it m            every token of the batch weighs the same
        seq_mean_token_mean      (1/N) Σ_i Σ_t m·l / n_i      every response weighs the same
        seq_mean_token_sum_norm  (1/N) Σ_i Σ_t m·l / L        every token weighs the same, by a constant

    seq_mean_token_mean is GRPO's eq. 3 (Shao et al. 2024): a token of a short response weighs
    more than one of a long response, so a short right answer is pushed up harder and a long
    wrong answer pushed down more gently, a bias toward long wrong answers (Dr. GRPO, Liu et al.
    2025, §3.1). token_mean is PPO's usual mean and DAPO's token-level loss (TRL's ``dapo`` and
    ``bnpo``, veRL's ``token-mean``); seq_mean_token_sum_norm is Dr. GRPO's (TRL's ``dr_grpo``,
    veRL's ``seq-mean-token-sum-norm``). Each is a mean over ``units`` (tokens, or responses), so a
    caller that splits a batch (micro-batches, processes) weights each part's aggregate by its units
    over the batch's, and the weighted sum is the whole batch's aggregate exactly.
    """

    token_mean = "token_mean"
    seq_mean_token_mean = "seq_mean_token_mean"
    seq_mean_token_sum_norm = "seq_mean_token_sum_norm"

    def units(self, mask: Tensor) -> Tensor:
        """What the aggregate is a mean over, counted in ``mask`` (B, T): its tokens, or its rows that hold a token."""
        if self is LossAggregation.token_mean:
            return mask.sum()
        return (mask.sum(-1) > 0).sum()


def aggregate_loss(
    per_token: Tensor, mask: Tensor, aggregation: LossAggregation | str = LossAggregation.token_mean,
    max_len: int | None = None,
) -> Tensor:
    """(B, T) per-token losses → scalar, by ``aggregation`` (equations in ``LossAggregation``).

    ``max_len`` is L of seq_mean_token_sum_norm (a constant, e.g. the sampler's max_new_tokens).
    Padding-invariant: padded columns and rows without a response token change nothing, even
    when the padding holds inf or NaN.
    """
    _check_same_shape(per_token=per_token, mask=mask)
    aggregation = LossAggregation(aggregation)
    if aggregation is LossAggregation.token_mean:
        return masked_mean(per_token, mask)
    if per_token.dim() != 2:
        raise ValueError(f"per-sequence aggregation needs (B, T) per-token losses, got {tuple(per_token.shape)}")
    if aggregation is LossAggregation.seq_mean_token_mean:
        per_sequence = masked_mean(per_token, mask, dim=1)  # (B,); an empty row gives 0 and is not counted
    else:
        if max_len is None or max_len <= 0:
            raise ValueError(f"seq_mean_token_sum_norm needs max_len > 0, got {max_len}")
        per_sequence = masked_sum(per_token, mask, dim=1) / max_len  # (B,)
    return per_sequence.sum() / aggregation.units(mask).clamp(min=1)


def truncated_importance_weights(train_logprobs: Tensor, rollout_logprobs: Tensor, mask: Tensor, cap: float) -> Tensor:
    """Truncated importance sampling weights min(π_train / π_rollout, cap) per token: (B, T) → (B, T), detached.

    π_rollout is the probability the sampler gave the token it drew; π_train the training forward's
    probability of it under the same weights (PPO's old log-probs). When the two disagree (other
    kernels, batch shapes, an inference engine such as vLLM) the rollouts come from a slightly
    different policy than the one the loss assumes; multiplying each token's policy loss by this
    ratio corrects for it, and the cap bounds the variance (Yao et al. 2025, "Your efficient RL
    framework secretly brings you off-policy RL training"). Padding gets weight 1.
    """
    _check_same_shape(train_logprobs=train_logprobs, rollout_logprobs=rollout_logprobs, mask=mask)
    if cap <= 0:
        raise ValueError(f"cap must be > 0, got {cap}")
    train_logprobs, rollout_logprobs = _zero_padding(mask, train_logprobs.detach(), rollout_logprobs.detach())
    return torch.exp(train_logprobs - rollout_logprobs).clamp(max=cap)


def ppo_policy_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, clip_eps: float,
    aggregation: LossAggregation | str = LossAggregation.token_mean, max_len: int | None = None,
    is_weights: Tensor | None = None,
) -> tuple[Tensor, dict]:
    """PPO clipped surrogate (Schulman et al. 2017, eq. 7), all inputs (B, T).

    ratio = exp(logp − logp_old); l = max(−A·ratio, −A·clip(ratio, 1 − ε, 1 + ε)) per token, times
    ``is_weights`` (truncated importance sampling, ``truncated_importance_weights``) when given;
    loss = ``aggregate_loss(l, mask, aggregation, max_len)``, by default the mean over all response
    tokens of the batch. Metrics: clipfrac, the fraction of tokens
    where the clipped term won the max (so the token's gradient is 0; a ratio outside the band
    in the direction that hurts the objective is *not* counted, unlike cleanrl's |ratio − 1| > ε);
    approx_kl = masked_mean((ratio − 1) − log ratio), the k3 estimate of KL(π_old ‖ π) that
    cleanrl logs.
    """
    _check_same_shape(logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages, mask=mask)
    # Old log-probs and advantages are rollout constants: a live critic behind the advantages
    # would otherwise get gradient from the policy loss.
    old_logprobs, advantages = old_logprobs.detach(), advantages.detach()
    # Zero padding before exp: a garbage log-ratio there overflows to inf and poisons the grad.
    logprobs, old_logprobs, advantages = _zero_padding(mask, logprobs, old_logprobs, advantages)
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_eps, 1 + clip_eps)
    per_token = torch.maximum(unclipped, clipped)
    if is_weights is not None:
        _check_same_shape(logprobs=logprobs, is_weights=is_weights)
        per_token = per_token * is_weights.detach()
    loss = aggregate_loss(per_token, mask, aggregation, max_len)
    with torch.no_grad():
        metrics = {
            "clipfrac": masked_mean((clipped > unclipped).to(ratio.dtype), mask).item(),
            "approx_kl": masked_mean((ratio - 1) - log_ratio, mask).item(),
        }
    return loss, metrics


def ppo_value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip_eps: float,
    aggregation: LossAggregation | str = LossAggregation.token_mean, max_len: int | None = None,
) -> tuple[Tensor, dict]:
    """Clipped value loss, all inputs (B, T) (the PPO2 baselines form that cleanrl and TRL use).

    loss = 0.5 · aggregate(max((V − R)², (V_old + clip(V − V_old, −ε, ε) − R)²)), by default the
    mean over response tokens (``aggregate_loss``; one aggregation for every term of a loss keeps
    micro-batch weighting exact).
    Metrics: value_clipfrac (tokens where the clipped error won), explained_variance =
    1 − Var(R − V_old) / Var(R) of the rollout values (cleanrl's diagnostic; NaN when every
    return is equal, where it is undefined).
    """
    _check_same_shape(values=values, old_values=old_values, returns=returns, mask=mask)
    old_values, returns = old_values.detach(), returns.detach()
    values, old_values, returns = _zero_padding(mask, values, old_values, returns)
    clipped_values = old_values + (values - old_values).clamp(-clip_eps, clip_eps)
    unclipped_error = (values - returns) ** 2
    clipped_error = (clipped_values - returns) ** 2
    loss = 0.5 * aggregate_loss(torch.maximum(unclipped_error, clipped_error), mask, aggregation, max_len)
    with torch.no_grad():
        var_returns = masked_var(returns, mask)
        explained = 1 - masked_var(returns - old_values, mask) / var_returns if var_returns > 0 else float("nan")
        metrics = {
            "value_clipfrac": masked_mean((clipped_error > unclipped_error).to(values.dtype), mask).item(),
            "explained_variance": float(explained),
        }
    return loss, metrics


# ---------------------------------------------------------------- from logits

def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy −Σ p log p of softmax(logits) over the last axis: (…, V) → (…)."""
    logp = torch.log_softmax(logits, dim=-1)
    p = logp.exp()
    # Top-k / top-p filtering leaves −inf logits: p = 0 there and 0 · (−inf) = NaN, in the
    # forward and the backward pass. Such tokens contribute 0 to the entropy; say so first.
    logp = logp.masked_fill(torch.isneginf(logp), 0.0)
    return -(p * logp).sum(-1)


def logprobs_from_logits(logits: Tensor, labels: Tensor, temperature: float = 1.0) -> Tensor:
    """log softmax(logits / temperature) read at ``labels``: (B, T, V), (B, T) → (B, T).

    ``logits[:, t]`` must already be the prediction for ``labels[:, t]`` (the caller shifts by
    one: logits[:, :-1] against input_ids[:, 1:]). Labels must be valid token ids everywhere;
    put the pad id, not −100, at padding and mask the result. Use the sampling temperature:
    log-probs at another temperature make the PPO ratio wrong from the first step.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f"labels {tuple(labels.shape)} must match logits {tuple(logits.shape)} minus V")
    if temperature != 1.0:
        logits = logits / temperature
    # bf16 has 8 mantissa bits: a logsumexp over ~50k entries then errs by ~1e-2 nats, which the
    # PPO ratio exp(logp − old) turns into percent-level noise. Compute in fp32.
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    # gather − logsumexp: never materializes a second (B, T, V) tensor of log-probs.
    selected = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return selected - torch.logsumexp(logits, dim=-1)
