"""Sequence log-probabilities of preference pairs under a causal LM: Σ log π(response token | prefix)
over each response, for the DPO family's losses (``rlhfkit.preference_losses``).

``pair_forward`` gives the (2B,) log-probs of B pairs (chosen rows, then rejected rows) in one of three
layouts (``PairLayout``), all the same function to float rounding (tests compare values and gradients);
``precompute_logps`` runs it once over every pair for a frozen reference (DPO) or the previous iterate (DNO).
"""
from __future__ import annotations

import warnings
from enum import StrEnum
from typing import Sequence

import torch

from rlhfkit.data.pairs import TokenizedPair, collate_pairs, collate_pairs_packed, collate_pairs_shared_prompt
from rlhfkit.models.token_logps import scored_logprobs
from rlhfkit.models.view_attention import supports_view_attention, view_attention
from rlhfkit.policy_losses import logprobs_from_logits


class PairLayout(StrEnum):
    """How a batch of B pairs enters the forward pass that gives its (2B,) sequence log-probs.

    Every layout computes the same function (to float rounding; the tests compare values and
    gradients with ``concatenated``). Time of one batch's forward + backward relative to packed,
    measured on a 2-core CPU with 2 torch threads, every layout with the output head at the scored
    positions only (medians of per-round ratios, arms alternated, 15 and 5 rounds):

    ==============================================  ======  ============  ============
    model, batch                                    packed  prompt_cache  concatenated
    ==============================================  ======  ============  ============
    quickstart (4 layers, V = 512), B = 32          1       1.15          1.52
    SmolLM2-135M shapes (V = 49 152), B = 8         1       1.27          1.77
    ==============================================  ======  ============  ============

    With 1 thread on the same machine loaded by other jobs: 1.22 and 1.70; 1.27 and 1.84. Packed, the
    fewest tokens through the model (each prompt once, no padding), is therefore the default.
    """

    concatenated = "concatenated"
    """(2B, T) rows of prompt + response, right-padded: the plain forward, works with any causal LM"""
    prompt_cache = "prompt_cache"
    """prompts (B, P) once, then chosen and rejected (2B, R) on a copy of their KV cache: two calls"""
    packed = "packed"
    """one unpadded row, each prompt once, attention by views (``rlhfkit.models.view_attention``);
    falls back to concatenated for a model whose attention is not pluggable"""


def _row_sums(values: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
    """(N,) values at ``scored``'s True positions (row-major) → (rows,) their sum per row."""
    return values.new_zeros(scored.shape[0]).index_add(0, scored.nonzero()[:, 0], values)


def sequence_logps(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ log π over response tokens, number of response tokens), each (rows,).

    Position t predicts token t+1, so token 0 is never scored; the output head runs only at the
    positions that predict a response token (``models.token_logps``).
    """
    ids, mask = batch["input_ids"], batch["attention_mask"]
    resp = batch["response_mask"].bool().clone()
    resp[:, 0] = False
    logp = scored_logprobs(model, ids, resp, attention_mask=mask)  # (N,)
    return _row_sums(logp, resp), resp.sum(1)


def sequence_logps_shared_prompt(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """As ``sequence_logps`` (chosen rows then rejected rows), encoding each prompt ONCE.

    Pass 1 runs the prompts (B, P) and keeps their key/value cache and the last position's
    logits (which predict the first response token; ``logits_to_keep=1`` skips the LM head on
    every other prompt position). The cache is repeated for the two responses of each pair, and
    pass 2 runs chosen and rejected together (2B, R) on top of it, the head only where a later
    response token is predicted. Gradients flow through the cache into the prompt pass, so this
    is the same function as the concatenated forward (to float rounding; tested), at B·P + 2B·R
    tokens instead of 2B·(P + R).
    """
    pm, ids, rm = batch["prompt_mask"], batch["response_ids"], batch["response_mask"]
    first = model(input_ids=batch["prompt_ids"], attention_mask=pm, position_ids=(pm.cumsum(-1) - 1).clamp(min=0),
                  use_cache=True, logits_to_keep=1)
    cache = first.cache
    cache.batch_repeat_interleave(2)  # (B, …) → (2B, …): rows 2i and 2i+1 share prompt i
    prompt_len = pm.sum(-1).repeat_interleave(2)  # (2B,)
    positions = prompt_len[:, None] + torch.arange(ids.shape[1], device=ids.device)[None, :]  # (2B, R)
    mask = torch.cat([pm.repeat_interleave(2, dim=0), rm], dim=1)  # (2B, P + R)
    # token 0 is predicted by the prompt's last position; token j ≥ 1 by response position j − 1
    later = rm.bool().clone()
    later[:, 0] = False
    logp = scored_logprobs(model, ids, later, attention_mask=mask, position_ids=positions, cache=cache,
                           use_cache=True)  # (N,)
    logp_first = logprobs_from_logits(first.logits[:, -1].repeat_interleave(2, dim=0), ids[:, 0])  # (2B,)
    sums, n = logp_first * rm[:, 0] + _row_sums(logp, later), rm.sum(1)
    # interleaved (c₀, r₀, c₁, r₁, …) → (c₀, c₁, …, r₀, r₁, …), the layout of ``sequence_logps``
    return torch.cat([sums[0::2], sums[1::2]]), torch.cat([n[0::2], n[1::2]])


def sequence_logps_packed(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """As ``sequence_logps`` (chosen rows then rejected rows), from the one unpadded row of ``collate_pairs_packed``.

    The layers run on the N real tokens only; ``logits_to_keep`` applies the LM head to the M
    predicting positions only (no logits for prompt positions or padding).
    """
    with view_attention(model):
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False,
                       token_views=(batch["view_index"], batch["view_source"]),
                       logits_to_keep=batch["predictor"]).logits  # (1, M, V)
    logp = logprobs_from_logits(logits, batch["labels"][None])[0]  # (M,)
    views, rows = batch["label_view"], batch["view_index"].shape[0]
    return logp.new_zeros(rows).index_add(0, views, logp), torch.bincount(views, minlength=rows)


def pair_forward(model, pairs: Sequence[TokenizedPair], pad_id: int, device,
                 layout: PairLayout = PairLayout.packed) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence log-probs and response lengths of chosen rows then rejected rows, (2B,) each."""
    if layout == PairLayout.packed:
        if supports_view_attention(model):
            return sequence_logps_packed(model, {k: v.to(device) for k, v in collate_pairs_packed(pairs).items()})
        warnings.warn(f"{type(model).__name__}: attention is not plain causal and pluggable, or activation checkpointing "
                      "is on (see supports_view_attention); the packed layout falls back to concatenated")
    if layout == PairLayout.prompt_cache:
        batch = {k: v.to(device) for k, v in collate_pairs_shared_prompt(pairs, pad_id).items()}
        return sequence_logps_shared_prompt(model, batch)
    return sequence_logps(model, {k: v.to(device) for k, v in collate_pairs(pairs, pad_id).items()})


@torch.no_grad()
def precompute_logps(model, pairs: Sequence[TokenizedPair], pad_id: int, batch_size: int, device,
                     layout: PairLayout = PairLayout.packed) -> dict[str, torch.Tensor]:
    """Sequence log-probs of every pair under ``model`` (DPO's frozen reference, DNO's previous iterate):
    chosen, rejected (N,) and their lengths, on the CPU in float32."""
    was_training = model.training
    model.eval()
    chosen, rejected, n_c, n_r = [], [], [], []
    for s in range(0, len(pairs), batch_size):
        chunk = pairs[s:s + batch_size]
        logps, n = pair_forward(model, chunk, pad_id, device, layout)
        k = len(chunk)
        chosen.append(logps[:k].float().cpu())
        rejected.append(logps[k:].float().cpu())
        n_c.append(n[:k].cpu())
        n_r.append(n[k:].cpu())
    if was_training:
        model.train()
    return {"chosen": torch.cat(chosen), "rejected": torch.cat(rejected),
            "chosen_len": torch.cat(n_c), "rejected_len": torch.cat(n_r)}
