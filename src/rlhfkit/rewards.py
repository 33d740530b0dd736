"""Where a reward lands: sequence scores and process-reward-model step rewards as per-token rewards.
Pure tensor math: imports only torch (and ``math``).

Shapes: B = batch, T = tokens of the prompt+response batch (any padding side). ``response_mask``
(B, T) is 1 on response tokens, the EOS of a finished response included, as
``generation.sequences_from_samples`` builds it; a token's reward is the reward for emitting it.

- :func:`penalize_unfinished`: a response that never emitted EOS is not scored as if complete;
  its score is replaced by a fixed penalty.
- :func:`length_adjusted_scores`: a length-normalised penalty (or, with the sign flipped, a deliberate
  length bias) on the sequence scores.
- :func:`place_token_rewards`: the sequence score at the last response token, step rewards at the
  tokens that close their steps (``data.steps.step_end_positions`` finds those).
- :func:`prm_step_rewards`: a PRM's per-step probabilities as rewards that telescope to its
  outcome score.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

Tensor = torch.Tensor


def penalize_unfinished(scores: Tensor, finished: Tensor, penalty: float) -> Tensor:
    """(B,) scores, (B,) bool → (B,): s_b where response b ended with EOS, else ``penalty``.

    The penalty replaces the score, it is not added to it: a reward model's opinion of a
    truncated text says nothing about the response that was never finished.
    """
    return torch.where(finished, scores, torch.full_like(scores, penalty))


def length_adjusted_scores(scores: Tensor, lengths: Tensor, max_new_tokens: int, coef: float) -> Tensor:
    """(B,) scores, (B,) response lengths in tokens → (B,): s_b − coef · len_b / max_new_tokens.

    A length-normalised penalty: the longest possible response (len = max_new_tokens) pays ``coef``,
    an empty one nothing, in the units of the score. PPO passes coef = reward_length_penalty −
    reward_length_bias, so a negative coef *adds* a length bonus (a reward made length-biased on
    purpose, to measure how a policy exploits it). E.g. scores [1.0, 0.5], lengths [10, 40], max 64,
    coef 0.5 → [1 − 0.5·10/64, 0.5 − 0.5·40/64] = [0.921875, 0.1875].
    """
    return scores - coef * (lengths.to(scores.dtype) / max_new_tokens)


def place_token_rewards(
    response_mask: Tensor, scores: Tensor, step_rewards: Sequence[Sequence[tuple[int, float]]] | None = None
) -> Tensor:
    """Per-token rewards (B, T), float32: each sequence score at its last response token, step rewards at theirs.

    response_mask (B, T); scores (B,); ``step_rewards[b]`` = [(i, r)]: r is added at the i-th
    response token of row b (i counts from the first response token, so i = 0 is that token).

        rewards[b, last_b] = scores[b],    rewards[b, first_b + i] += r    for (i, r) in step_rewards[b]

    ``last_b`` = T − 1 − argmax(flip(mask_b)), the last response token, is found from the mask,
    never from "the first pad": that is right whatever the padding side and when pad == EOS.
    """
    B, T = response_mask.shape
    rewards = torch.zeros(B, T, dtype=torch.float32)
    first = response_mask.float().argmax(dim=1)  # (B,) first response position
    last = T - 1 - response_mask.flip(1).float().argmax(dim=1)  # (B,) last response position
    rewards[torch.arange(B), last] += scores.float()
    if step_rewards is not None:
        for b, steps in enumerate(step_rewards):
            for i, r in steps:
                rewards[b, first[b] + i] += r
    return rewards


def prm_step_rewards(step_probs: Sequence[float], floor: float) -> list[float]:
    """Step rewards from a PRM's q_k = P(steps 1..k are right): r_k = log q_k − log q_{k−1}, q_0 = 1.

    r_k is how much step k changed the log-probability that the solution is right so far. The
    rewards telescope, Σ_k r_k = log q_K = log P(every step right) (Lightman et al. 2023's
    aggregation), so per-step and outcome-only placement give a response the same total and differ
    only in credit assignment. q is clamped to ``floor`` first, so one hopeless step costs at most
    log(1/floor). K = 0 steps → [].
    """
    logs = [0.0] + [math.log(max(q, floor)) for q in step_probs]
    return [b - a for a, b in zip(logs, logs[1:])]
