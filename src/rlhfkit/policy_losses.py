"""Losses of the PPO family (PPO, GRPO, RLOO): the clipped policy and value losses, how per-token losses
are aggregated, truncated importance weights, and the log-probs and entropy they are computed from.
Pure tensor math: imports only torch (and the masked statistics of ``rlhfkit.losses``).

Conventions as in ``rlhfkit.losses``: B = batch, T = tokens, V = vocabulary; a ``mask`` is 0/1 with the
shape of what it masks; every loss returns ``(loss, metrics)``, the metrics detached 0-d tensors.
"""
from __future__ import annotations

from enum import StrEnum

import torch

from rlhfkit.losses import _check_same_shape, _zero_padding, masked_mean, masked_sum, masked_var

Tensor = torch.Tensor


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
            "clipfrac": masked_mean((clipped > unclipped).to(ratio.dtype), mask),
            "approx_kl": masked_mean((ratio - 1) - log_ratio, mask),
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
        # where, not ``if var_returns > 0``: a Python branch on a tensor waits for the device.
        explained = torch.where(var_returns > 0, 1 - masked_var(returns - old_values, mask) / var_returns,
                                torch.full_like(var_returns, float("nan")))
        metrics = {
            "value_clipfrac": masked_mean((clipped_error > unclipped_error).to(values.dtype), mask),
            "explained_variance": explained,
        }
    return loss, metrics


# ---------------------------------------------------------------- from logits

# Elements of one chunk of the (tokens, V) logits: logsumexp and log-softmax make (chunk, V) temporaries,
# never (tokens, V) ones (2^24 fp32 = 64 MiB: 340 positions of a 49k vocabulary).
CHUNK_ELEMENTS = 1 << 24


def _row_chunks(logits: Tensor) -> tuple[Tensor, ...]:
    """``logits`` (…, V) as views along its first axis of about CHUNK_ELEMENTS each (the whole of a 1-D one)."""
    if logits.dim() < 2 or logits.shape[0] == 0:
        return (logits,)
    return logits.split(max(1, CHUNK_ELEMENTS // max(1, logits[0].numel())))


def _fp32_at(logits: Tensor, temperature: float) -> Tensor:
    # bf16 has 8 mantissa bits: a logsumexp over ~50k entries then errs by ~1e-2 nats, which the PPO
    # ratio exp(logp − old) turns into percent-level noise. Compute in fp32; no copy at T = 1 in fp32.
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return logits / temperature if temperature != 1.0 else logits


def _check_temperature(temperature: float) -> None:
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def entropy_from_logits(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Entropy −Σ p log p of softmax(logits / temperature) over the last axis: (…, V) → (…), in fp32.

    A chunk of rows at a time (``CHUNK_ELEMENTS``): under ``torch.no_grad()`` (entropy only logged) the
    log-softmax and p never exist for every position at once.
    """
    _check_temperature(temperature)
    out = []
    for chunk in _row_chunks(logits):
        logp = torch.log_softmax(_fp32_at(chunk, temperature), dim=-1)
        p = logp.exp()
        # Top-k / top-p filtering leaves −inf logits: p = 0 there and 0 · (−inf) = NaN, in the
        # forward and the backward pass. Such tokens contribute 0 to the entropy; say so first.
        logp = logp.masked_fill(torch.isneginf(logp), 0.0)
        out.append(-(p * logp).sum(-1))
    return out[0] if len(out) == 1 else torch.cat(out)


def logprobs_from_logits(logits: Tensor, labels: Tensor, temperature: float = 1.0) -> Tensor:
    """log softmax(logits / temperature) read at ``labels``: (…, V), (…) → (…), in fp32.

    ``logits[:, t]`` must already be the prediction for ``labels[:, t]`` (the caller shifts by
    one: logits[:, :-1] against input_ids[:, 1:]; or passes the (N, V) logits of the N scored
    positions, ``models.token_logps``). Labels must be valid token ids everywhere;
    put the pad id, not −100, at padding and mask the result. Use the sampling temperature:
    log-probs at another temperature make the PPO ratio wrong from the first step.

    log p(y) = z_y / T − logsumexp(z / T): the gathered logit minus the normaliser, so no (…, V)
    tensor of log-probs is ever made, and the logsumexp runs a chunk of rows at a time
    (``CHUNK_ELEMENTS``); at T = 1 in fp32 the logits are not copied at all.
    """
    _check_temperature(temperature)
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f"labels {tuple(labels.shape)} must match logits {tuple(logits.shape)} minus V")
    selected = _fp32_at(logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1), temperature)
    normaliser = [torch.logsumexp(_fp32_at(chunk, temperature), dim=-1) for chunk in _row_chunks(logits)]
    return selected - (normaliser[0] if len(normaliser) == 1 else torch.cat(normaliser))
