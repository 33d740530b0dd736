"""Log-probabilities of given tokens under a causal LM, with the output head run only where they are read.

The output head maps each position's hidden state (H) to the vocabulary (V): with a 49k vocabulary it is
the largest matmul of a small model, and its (positions, V) logits the largest activation. A loss reads the
log-probs of some tokens only (PPO and DPO: the response; SFT: the labelled tokens), so the head runs at the
positions that predict them: the forward gets ``logits_to_keep`` as a (B, T) bool mask, which transformers
applies to the hidden states before the head (``modeling_utils.slice_logits_to_keep``). It goes through the
model's own forward, so DDP's gradient hooks, a LoRA model (peft passes the argument on, and a disabled
adapter is the base), a head tied to the embeddings and a model's own logit post-processing (soft-capping)
all apply unchanged. Position t predicts token t + 1; token 0 is never scored.

The math (gather − logsumexp, in fp32, a chunk of positions at a time, no copy at T = 1) is
``policy_losses.logprobs_from_logits`` / ``entropy_from_logits``.
"""
from __future__ import annotations

import functools

import torch
from transformers import modeling_utils

from rlhfkit.policy_losses import entropy_from_logits, logprobs_from_logits

Tensor = torch.Tensor


@functools.cache
def _keeps_masked_positions() -> bool:
    """Whether this transformers slices the hidden states by a (B, T) bool ``logits_to_keep`` (≥ 5.x releases
    with ``slice_logits_to_keep``); older ones get the full logits, read at the mask here (same values)."""
    slicer = getattr(modeling_utils, "slice_logits_to_keep", None)
    if slicer is None:
        return False
    try:
        return tuple(slicer(torch.zeros(1, 2, 1), torch.tensor([[False, True]])).shape) == (1, 1)
    except Exception:  # noqa: BLE001  (any failure means: not supported)
        return False


def predicting_positions(scored: Tensor) -> Tensor:
    """(B, T) bool mask of the tokens to score → (B, T) bool mask of the positions that predict them (t − 1)."""
    keep = torch.zeros_like(scored, dtype=torch.bool)
    keep[:, :-1] = scored[:, 1:].bool()
    return keep


def scored_logits(model, input_ids: Tensor, scored: Tensor, **forward) -> Tensor:
    """(B, T) ids and (B, T) bool ``scored`` → (N, V) logits, row n predicting the n-th scored token in
    row-major order (``input_ids[scored]``), N = scored.sum(); ``scored[:, 0]`` must be False (nothing
    predicts token 0). ``forward``: the model's other arguments (attention_mask, position_ids, ...)."""
    scored = scored.bool()
    if scored[:, 0].any():
        raise ValueError("token 0 of a row cannot be scored: no position predicts it")
    keep = predicting_positions(scored)
    forward = {"use_cache": False, **forward}  # no KV cache to build (a caller's own cache still applies)
    if not _keeps_masked_positions():
        return model(input_ids=input_ids, **forward).logits[keep]
    logits = model(input_ids=input_ids, logits_to_keep=keep, **forward).logits
    if logits.dim() == 3 and logits.shape[:2] == keep.shape:  # a model that ignores logits_to_keep
        logits = logits[keep]
    return logits


def scored_logprobs(model, input_ids: Tensor, scored: Tensor, temperature: float = 1.0, labels: Tensor | None = None,
                    **forward) -> Tensor:
    """log π(x_t | x_<t) / T-softmax at the scored tokens: (N,) in fp32, in the order of ``input_ids[scored]``.

    ``labels`` (B, T): the tokens to score when they are not ``input_ids`` (an SFT batch's labels);
    read at ``scored`` only. Gradients flow unless the caller is under ``torch.no_grad()``.
    """
    logits = scored_logits(model, input_ids, scored, **forward)  # (N, V)
    targets = (input_ids if labels is None else labels)[scored.bool()]  # (N,)
    return logprobs_from_logits(logits, targets, temperature)


def scored_logprobs_and_entropy(model, input_ids: Tensor, scored: Tensor, temperature: float = 1.0,
                                entropy_grad: bool = False, **forward) -> tuple[Tensor, Tensor]:
    """:func:`scored_logprobs` and the entropy of π(· | x_<t) at T at the same positions, (N,) each, from one forward.

    The entropy carries gradients only with ``entropy_grad`` (an entropy bonus in the loss); a logged
    entropy is computed under ``no_grad``, so autograd keeps no second (N, V) softmax for it.
    """
    logits = scored_logits(model, input_ids, scored, **forward)  # (N, V)
    logp = logprobs_from_logits(logits, input_ids[scored.bool()], temperature)
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
        entropy = entropy_from_logits(logits, temperature)
    return logp, entropy


def per_row(values: Tensor, scored: Tensor) -> Tensor:
    """(N,) values at the scored positions → (B, T), 0 elsewhere (differentiable in ``values``)."""
    return values.new_zeros(scored.shape).masked_scatter(scored.bool(), values)
