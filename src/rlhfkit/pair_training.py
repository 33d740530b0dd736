"""Training a policy on preference pairs against reference log-probs given as tensors: the DPO family's
loop (``recipes.dpo``), which DNO runs once per iteration with the previous iterate as the reference
(``recipes.dno``). The loop itself is ``training.fit``; this module supplies its pair batches.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from rlhfkit.data.pairs import TokenizedPair
from rlhfkit.io import JsonlLog
from rlhfkit.models.sequence_logps import PairLayout, pair_forward
from rlhfkit.models.trainable import disable_dropout
from rlhfkit.preference_losses import sft_nll
from rlhfkit.training import TrainConfig, fit

# loss_fn(policy_chosen, policy_rejected, ref_chosen, ref_rejected, lengths, indices) → (weighted mean
# over the micro-batch, Σ weights of the micro-batch, metrics); lengths = (chosen_len, rejected_len).
PairLoss = Callable[..., tuple[torch.Tensor, float, dict]]


def add_sft_term(loss: torch.Tensor, metrics: dict, chosen_logps: torch.Tensor, chosen_len: torch.Tensor,
                 coef: float, weights: torch.Tensor | None = None) -> torch.Tensor:
    """``loss`` + coef × the chosen responses' per-token NLL (RPO), logged as ``sft_nll``; ``loss`` when coef is 0.

    ``weights``: the pairs' weights when ``loss`` is a weighted mean, so both terms are means over
    the same weights (``train_on_pairs`` scales a micro-batch by its share of them)."""
    if not coef:
        return loss
    nll = sft_nll(chosen_logps, chosen_len, weights)
    metrics["sft_nll"] = nll.detach()
    return loss + coef * nll


def train_on_pairs(
    model,
    pairs: Sequence[TokenizedPair],
    ref: dict[str, torch.Tensor],
    loss_fn: PairLoss,
    cfg: TrainConfig,
    accelerator,
    log: JsonlLog,
    pad_id: int,
    progress_desc: str = "dpo",
    step_offset: int = 0,
    layout: PairLayout = PairLayout.packed,
    checkpoint=None,
) -> dict:
    """Optimize ``loss_fn`` over global batches of ``pairs`` by ``training.fit``; ``ref`` holds the reference's
    precomputed sequence log-probs (``models.sequence_logps.precompute_logps``), chosen and rejected (N,).

    Exact global normalisation as ``rlhfkit.training``: each micro-batch's weighted-mean loss is
    scaled by (its Σ weights / the global batch's Σ weights) × world size, so the summed gradient
    is that of the global weighted mean whatever the split; the logged loss sums the same shares,
    in float64. Dropout stays off (the model is in eval mode while it trains; under gradient
    checkpointing, which runs in train mode only, dropout is switched off instead): at step 0 policy
    and reference log-probs are then identical. ``checkpoint`` (a ``checkpoints.LoopCheckpoint``):
    resume from it, save to it every ``save_every`` steps.
    """
    weights = torch.tensor([p.weight for p in pairs], dtype=torch.float32)
    world, device = accelerator.num_processes, accelerator.device

    def batch_loss(policy, mine: list[int], idx: list[int]):
        w_global = float(weights[idx].sum())
        logps, n = pair_forward(policy, [pairs[i] for i in mine], pad_id, device, layout)
        k, t = len(mine), torch.tensor(mine)
        loss, w_local, metrics = loss_fn(logps[:k], logps[k:], ref["chosen"][t].to(logps.device),
                                         ref["rejected"][t].to(logps.device), (n[:k], n[k:]), t)
        # float(loss) * w_local / w_global in float64 on the device, with no sync; divided by a tensor, since CUDA
        # divides by a Python number as a multiply by its reciprocal (not the same last digit).
        w_global_t = torch.full((), w_global, dtype=torch.float64, device=loss.device)
        logged = loss.detach().double() * w_local / w_global_t
        return loss * (w_local / w_global) * world, logged, metrics

    if cfg.gradient_checkpointing:
        disable_dropout(model)
    return fit(model, len(pairs), batch_loss, cfg, accelerator, log, name=progress_desc, checkpoint=checkpoint,
               train_mode=cfg.gradient_checkpointing, loss_denominator=lambda idx: 1, unit="pairs",
               step_offset=step_offset)
