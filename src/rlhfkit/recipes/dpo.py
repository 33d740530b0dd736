"""Offline DPO family on preference pairs: DPO (sigmoid), IPO, conservative DPO, and DPO + SFT.

The whole algorithm, top to bottom:

1. tokenize every pair (prompt, chosen, rejected) with the project's one prompt rendering, and
   report a pair too long for ``max_len`` by file:line before any model is loaded;
2. compute the frozen reference's sequence log-probs ONCE, before training (the reference never
   changes, so recomputing them every step, as TRL does by default, doubles the forward passes
   for nothing);
3. for each global batch: the policy's sequence log-probs of chosen and rejected in one
   forward pass, summed over response tokens, then ``rlhfkit.preference_losses.dpo_loss``
   (+ ``sft_coef · sft_nll`` on the chosen rows). ``PairLayout`` says how the pairs enter that
   pass; all layouts compute the same values (to float rounding; tested). By default (``packed``)
   every pair goes into one unpadded row, each prompt once, and attention keeps chosen and
   rejected apart: the fewest tokens, no padding, and the LM head only where a response token
   is predicted.

Pairs as tokens come from ``rlhfkit.data.pairs``, their log-probs in each layout from
``rlhfkit.models.sequence_logps``, and the loop is ``rlhfkit.pair_training.train_on_pairs`` (the one
supervised loop, ``training.fit``, on pair batches, with the reference log-probs given as tensors); DNO
runs it too, with the previous iterate's log-probs as the reference (``rlhfkit.recipes.dno``).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from enum import StrEnum

import torch

from rlhfkit.checkpoints import LoopCheckpoint, checkpoint_dir
from rlhfkit.config import check_non_negative, check_positive, check_probability, coerce_enums
from rlhfkit.data.collate import Truncation
from rlhfkit.data.loading import DataError
from rlhfkit.data.pairs import tokenize_pairs
from rlhfkit.data.preferences import load_pairs
from rlhfkit.distributed import gathered_state_dict
from rlhfkit.models.loading import load_causal_lm, load_tokenizer, model_config
from rlhfkit.models.sequence_logps import PairLayout, precompute_logps
from rlhfkit.models.trainable import make_trainable, reference_mode, save_trained
from rlhfkit.pair_training import PairLoss, add_sft_term, train_on_pairs
from rlhfkit.paths import ConfigPath, ModelRef
from rlhfkit.preference_losses import DPOLossType, dpo_loss
from rlhfkit.seeds import check_seeds
from rlhfkit.stage import StageContext
from rlhfkit.training import TrainConfig


class FromRankings(StrEnum):
    """How a K-wise ranking becomes training pairs."""

    all = "all"
    """all C(K,2) pairs, each weighted 1/C(K,2)"""
    best_worst = "best_worst"
    """one pair: the first-ranked response against the last"""


@dataclass(frozen=True)
class DPOConfig(TrainConfig):
    """Offline DPO-family stage."""

    model: ModelRef = "stage:sft/model"
    """policy to start from, also the frozen reference"""
    data: ConfigPath = ""
    """preference pairs (or rankings) file; empty means the label stage's pairs.jsonl, else its rankings.jsonl"""
    from_rankings: FromRankings = FromRankings.all
    """how a K-wise ranking becomes pairs: all (C(K,2) pairs weighted 1/C(K,2)) or best_worst (one pair)"""
    loss_type: DPOLossType = DPOLossType.sigmoid
    """sigmoid (DPO; with label_smoothing > 0 conservative DPO) or ipo"""
    beta: float = 0.1
    """inverse temperature of the implicit reward β·log(π/π_ref)"""
    label_smoothing: float = 0.0
    """conservative DPO: assumed probability ε that a label is flipped (sigmoid only)"""
    length_alpha: float = 0.0
    """length-regularised DPO (R-DPO, Park et al. 2024; sigmoid only): the margin βh becomes βh − α·(|y_c| − |y_r|),
    lengths in response tokens, so a longer chosen must win by more; 0 = plain DPO"""
    sft_coef: float = 0.0
    """weight of the per-token NLL of the chosen response added to the loss (0 disables)"""
    ipo_average_logps: bool = True
    """IPO on length-averaged log-probs (as TRL does); the target 1/(2β) is then per token"""
    max_len: int = 192
    """longest prompt + response in tokens (see ``truncation``)"""
    max_unusable_share: float = 0.5
    """refuse a pair file where more than this share of the records is unusable (chosen equals rejected,
    HH dialogues that differ before the last turn), saying why"""
    truncation: Truncation = Truncation.error
    """a longer pair: error (names file:line), left (cut the prompt's start) or right (cut the responses' ends);
    metrics.json counts the truncated pairs"""
    ref_batch_size: int = 64
    """pairs per forward pass when precomputing the reference log-probs"""
    layout: PairLayout = PairLayout.packed
    """how pairs enter the forward pass: packed (one unpadded row, each prompt once; the fastest measured: about
    0.6 of concatenated's time, 0.8 of prompt_cache's), prompt_cache or concatenated; the same values in each
    (see PairLayout for the figures)"""
    epochs: float = 2.0
    """passes over the pairs"""
    lr: float = 1e-4
    """peak learning rate (AdamW)"""
    warmup_steps: int = 5
    """linear warm-up steps"""
    batch_size: int = 32
    """pairs per optimizer step"""
    seeds: tuple[int, ...] = ()
    """run the stage once per seed, ``seed`` replaced by each, every run a whole output in OUT/<stage>/seed_<s>/
    (its model, log.jsonl, metrics.json) and metrics.json holding each seed's metrics; eval then reports each
    policy naming this stage's output once per seed and as mean ± sd over seeds (``rlhfkit.seeds``); empty: one
    run with ``seed``"""

    def __post_init__(self):
        check_seeds(self.seeds)
        super().__post_init__()
        coerce_enums(self)
        check_positive(beta=self.beta, ref_batch_size=self.ref_batch_size)
        check_non_negative(sft_coef=self.sft_coef, length_alpha=self.length_alpha)
        check_probability(max_unusable_share=self.max_unusable_share)
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.length_alpha and self.loss_type is not DPOLossType.sigmoid:
            raise ValueError("length_alpha (R-DPO) applies to loss_type sigmoid only")


# ---------------------------------------------------------------- the loss

def dpo_pair_loss(cfg: DPOConfig, weights: torch.Tensor) -> PairLoss:
    """The DPO-family loss of ``cfg`` as a PairLoss (losses from ``rlhfkit.preference_losses``)."""
    def loss_fn(pc, pr, rc, rr, lengths, idx):
        w = weights[idx].to(pc.device)
        nc, nr = lengths
        if cfg.loss_type is DPOLossType.ipo and cfg.ipo_average_logps:
            pc_, pr_ = pc / nc.clamp(min=1), pr / nr.clamp(min=1)
            rc_, rr_ = rc / nc.clamp(min=1), rr / nr.clamp(min=1)
        else:
            pc_, pr_, rc_, rr_ = pc, pr, rc, rr
        loss, metrics = dpo_loss(pc_, pr_, rc_, rr_, cfg.beta, cfg.loss_type, cfg.label_smoothing, weights=w,
                                 length_alpha=cfg.length_alpha, lengths=(nc, nr))
        return add_sft_term(loss, metrics, pc, nc, cfg.sft_coef, w), float(w.sum()), metrics

    return loss_fn


def select_ranking_pairs(pair_set, mode: str) -> list:
    """The pairs to train on: all of them, or best vs worst of each ranking; identical texts dropped.

    A pair whose chosen and rejected texts are equal has h = 0 whatever the policy (no gradient),
    so it only dilutes the batch. Rankings expanded by ``load_pairs`` list (ranking[i], ranking[j])
    for i < j, so a group's first pair's chosen is the best and its last pair's rejected the worst.
    """
    if mode not in ("all", "best_worst"):
        raise ValueError(f"from_rankings must be all or best_worst, got {mode!r}")
    if mode == "all":
        chosen = list(pair_set.pairs)
    else:
        chosen = []
        for group in pair_set.groups:
            first, last = pair_set.pairs[group[0]], pair_set.pairs[group[-1]]
            chosen.append(dataclasses.replace(first, rejected=last.rejected, weight=1.0, margin=None))
    return [p for p in chosen if p.chosen != p.rejected]


def run(cfg: DPOConfig, ctx: StageContext) -> dict:
    """Train a policy with the DPO-family loss on ``cfg.data`` pairs; saves ``ctx.stage_dir/model``."""
    model_path = ctx.model(cfg.model, "model")
    labelled = "stage:label/pairs.jsonl"
    if not ctx.resolve(labelled).exists():
        labelled = "stage:label/rankings.jsonl"  # the oracle judge writes rankings only
    data_path = ctx.resolve(cfg.data, labelled, key="data")
    out_dir, accelerator, log = ctx.stage_dir, ctx.accelerator, ctx.log
    pair_set = load_pairs(data_path, cfg.max_unusable_share)
    for msg in pair_set.skipped:
        print(f"[rlhfkit] dpo: skipped {msg}")
    chosen_pairs = select_ranking_pairs(pair_set, cfg.from_rankings)
    tokenizer = load_tokenizer(model_path)
    max_len = min(cfg.max_len, getattr(model_config(model_path), "max_position_embeddings", cfg.max_len))
    counts: dict = {}
    pairs = tokenize_pairs(tokenizer, chosen_pairs, max_len, cfg.truncation, counts)  # errors name file:line before loading a model
    if counts["truncated"]:
        print(f"[rlhfkit] dpo: {counts['truncated']} of {len(pairs)} pairs truncated to {max_len} tokens ({cfg.truncation.value})")
    if len(pairs) < cfg.batch_size:
        raise DataError(f"{data_path}: {len(pairs)} pairs, fewer than one batch ({cfg.batch_size})")
    torch.manual_seed(cfg.seed)
    model = make_trainable(load_causal_lm(model_path), cfg.lora, cfg.gradient_checkpointing).to(accelerator.device)
    t0 = time.time()
    with reference_mode(model) as reference:  # under LoRA: the base, adapter disabled; else the model as loaded
        ref = precompute_logps(reference, pairs, tokenizer.pad_token_id, cfg.ref_batch_size, accelerator.device, cfg.layout)
    ref_s = time.time() - t0
    weights = torch.tensor([p.weight for p in pairs], dtype=torch.float32)
    metrics = train_on_pairs(model, pairs, ref, dpo_pair_loss(cfg, weights), cfg, accelerator, log,
                             tokenizer.pad_token_id, progress_desc=f"dpo ({cfg.loss_type.value})", layout=cfg.layout,
                             checkpoint=LoopCheckpoint(checkpoint_dir(out_dir), cfg, accelerator, log, "dpo"))
    state_dict = gathered_state_dict(accelerator, model)  # FSDP / ZeRO-3: every process takes part in the gather
    if accelerator.is_main_process:
        save_trained(accelerator.unwrap_model(model), tokenizer, out_dir, cfg.lora, state_dict=state_dict)
    return metrics | {"n_pairs": len(pairs), "n_pairs_in_file": len(pair_set.pairs), "reference_logps_s": ref_s,
                      "n_truncated": counts["truncated"]}
