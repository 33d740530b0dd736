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

``train_on_pairs`` is the loop with the reference log-probs given as tensors; DNO reuses it with
the previous iterate's log-probs as the reference (``rlhfkit.recipes.dno``).
"""
from __future__ import annotations

import contextlib
import time
import warnings
from dataclasses import dataclass
from enum import StrEnum
from typing import Callable, Sequence

import torch

from rlhfkit.config import check_non_negative, check_positive, check_probability, coerce_enums
from rlhfkit.data.collate import Truncation
from rlhfkit.paths import ConfigPath, ModelRef
from rlhfkit.preference_losses import DPOLossType
from rlhfkit.stage import StageContext
from rlhfkit.training import TrainConfig


class PairLayout(StrEnum):
    """How a batch of B pairs enters the forward pass that gives its (2B,) sequence log-probs.

    Every layout computes the same function (to float rounding; the tests compare values and
    gradients with ``concatenated``). Measured on the bench's model (CPU, B = 16, prompts ~34 and
    responses ~24 tokens): concatenated pushes ~2 600 tokens through the model per step,
    prompt_cache ~1 900, packed ~1 300, and packed's forward + backward takes ~2/3 of concatenated's.
    """

    concatenated = "concatenated"
    """(2B, T) rows of prompt + response, right-padded: the plain forward, works with any causal LM"""
    prompt_cache = "prompt_cache"
    """prompts (B, P) once, then chosen and rejected (2B, R) on a copy of their KV cache: two calls"""
    packed = "packed"
    """one unpadded row, each prompt once, attention by views (``rlhfkit.models.view_attention``);
    falls back to concatenated for a model whose attention is not pluggable"""


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
    """how pairs enter the forward pass: packed (one unpadded row, each prompt once; the fastest measured),
    prompt_cache or concatenated; the same values in each (see PairLayout)"""
    epochs: float = 2.0
    """passes over the pairs"""
    lr: float = 1e-4
    """peak learning rate (AdamW)"""
    warmup_steps: int = 5
    """linear warm-up steps"""
    batch_size: int = 32
    """pairs per optimizer step"""

    def __post_init__(self):
        super().__post_init__()
        coerce_enums(self)
        check_positive(beta=self.beta, ref_batch_size=self.ref_batch_size)
        check_non_negative(sft_coef=self.sft_coef)
        check_probability(max_unusable_share=self.max_unusable_share)
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")


# ---------------------------------------------------------------- pairs as tokens

@dataclass(frozen=True)
class TokenizedPair:
    """Token ids of one comparison; response ids end with EOS."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    weight: float = 1.0


def tokenize_pairs(tokenizer, pairs: Sequence, max_len: int, truncation: Truncation = Truncation.error,
                   counts: dict | None = None) -> list[TokenizedPair]:
    """``pairs`` have .prompt/.chosen/.rejected (and optionally .weight/.where); too long is a DataError under
    ``truncation: error``, else cut (``counts["truncated"]`` counts those pairs)."""
    from rlhfkit.data.collate import encode_prompt, encode_response, fit_to_length

    out, n_cut = [], 0
    for i, pair in enumerate(pairs):
        where = getattr(pair, "where", "") or f"pair {i}"
        p, (c, r), cut = fit_to_length(encode_prompt(tokenizer, pair.prompt),
                                       [encode_response(tokenizer, pair.chosen), encode_response(tokenizer, pair.rejected)],
                                       max_len, Truncation(truncation), where)
        n_cut += cut
        out.append(TokenizedPair(p, c, r, float(getattr(pair, "weight", 1.0))))
    if counts is not None:
        counts["truncated"] = counts.get("truncated", 0) + n_cut
    return out


def collate_pairs(pairs: Sequence[TokenizedPair], pad_id: int) -> dict[str, torch.Tensor]:
    """Chosen rows then rejected rows, right-padded to one length: (2B, T) ids, mask, response mask.

    One (2B, T) batch means one forward pass for both sides: half the kernel launches and
    Python overhead of two passes, which dominate on small models.
    """
    from rlhfkit.data.collate import pad_batch

    seqs, resp = [], []
    for side in ("chosen_ids", "rejected_ids"):
        for p in pairs:
            r = getattr(p, side)
            seqs.append(p.prompt_ids + r)
            resp.append([0] * len(p.prompt_ids) + [1] * len(r))
    return {
        "input_ids": pad_batch(seqs, pad_id),
        "attention_mask": pad_batch([[1] * len(s) for s in seqs], 0),
        "response_mask": pad_batch(resp, 0),
    }


def sequence_logps(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ log π over response tokens, number of response tokens), each (rows,).

    Position t of the logits predicts token t+1, so the response mask is read from 1 on.
    """
    from rlhfkit.losses import masked_sum
    from rlhfkit.policy_losses import logprobs_from_logits

    ids, mask = batch["input_ids"], batch["attention_mask"]
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1]  # (2B, T-1, V)
    logp = logprobs_from_logits(logits, ids[:, 1:])  # (2B, T-1)
    resp = batch["response_mask"][:, 1:]
    return masked_sum(logp, resp.bool(), dim=1), resp.sum(1)


def collate_pairs_shared_prompt(pairs: Sequence[TokenizedPair], pad_id: int) -> dict[str, torch.Tensor]:
    """Prompts once, LEFT-padded (B, P); responses interleaved chosen₀, rejected₀, chosen₁, … RIGHT-padded (2B, R).

    Left padding makes every prompt end at the last column, so each response continues from
    the same cache position; ``response_mask`` (2B, R) marks real response tokens (EOS included).
    """
    from rlhfkit.data.collate import pad_batch

    responses = [r for p in pairs for r in (p.chosen_ids, p.rejected_ids)]
    return {
        "prompt_ids": pad_batch([p.prompt_ids for p in pairs], pad_id, side="left"),
        "prompt_mask": pad_batch([[1] * len(p.prompt_ids) for p in pairs], 0, side="left"),
        "response_ids": pad_batch(responses, pad_id),
        "response_mask": pad_batch([[1] * len(r) for r in responses], 0),
    }


def sequence_logps_shared_prompt(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """As ``sequence_logps`` (chosen rows then rejected rows), encoding each prompt ONCE.

    Pass 1 runs the prompts (B, P) and keeps their key/value cache and the last position's
    logits (which predict the first response token; ``logits_to_keep=1`` skips the LM head on
    every other prompt position). The cache is repeated for the two responses of each pair, and
    pass 2 runs chosen and rejected together (2B, R) on top of it. Gradients flow through the
    cache into the prompt pass, so this is the same function as the concatenated forward (to
    float rounding; tested), at B·P + 2B·R tokens instead of 2B·(P + R).
    """
    from rlhfkit.losses import masked_sum
    from rlhfkit.policy_losses import logprobs_from_logits

    pm, ids, rm = batch["prompt_mask"], batch["response_ids"], batch["response_mask"]
    first = model(input_ids=batch["prompt_ids"], attention_mask=pm, position_ids=(pm.cumsum(-1) - 1).clamp(min=0),
                  use_cache=True, logits_to_keep=1)
    cache = first.cache
    cache.batch_repeat_interleave(2)  # (B, …) → (2B, …): rows 2i and 2i+1 share prompt i
    prompt_len = pm.sum(-1).repeat_interleave(2)  # (2B,)
    positions = prompt_len[:, None] + torch.arange(ids.shape[1], device=ids.device)[None, :]  # (2B, R)
    mask = torch.cat([pm.repeat_interleave(2, dim=0), rm], dim=1)  # (2B, P + R)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache).logits  # (2B, R, V)
    # token 0 is predicted by the prompt's last position; token j ≥ 1 by response position j − 1
    logits = torch.cat([first.logits[:, -1:].repeat_interleave(2, dim=0), logits[:, :-1]], dim=1)  # (2B, R, V)
    logp = logprobs_from_logits(logits, ids)  # (2B, R)
    sums, n = masked_sum(logp, rm.bool(), dim=1), rm.sum(1)
    # interleaved (c₀, r₀, c₁, r₁, …) → (c₀, c₁, …, r₀, r₁, …), the layout of ``sequence_logps``
    return torch.cat([sums[0::2], sums[1::2]]), torch.cat([n[0::2], n[1::2]])


def collate_pairs_packed(pairs: Sequence[TokenizedPair]) -> dict[str, torch.Tensor]:
    """Every pair in ONE unpadded row ``[prompt₀ chosen₀ rejected₀ prompt₁ …]`` of N tokens, for view attention.

    - ``input_ids``, ``position_ids`` (1, N): both responses' positions continue from their prompt's
      end (rejected's restart where chosen's did), the positions of the concatenated forward;
    - ``view_index`` (2B, L): the row positions of view i = (prompt i, chosen i) and of view B + i =
      (prompt i, rejected i), right-padded with the view's first position (never attended: causal);
    - ``view_source`` (N,): where each token reads its attention output, flat (view · L + column): a
      prompt or chosen token from its chosen view, a rejected token from its rejected view;
    - ``predictor`` (1, M), ``labels`` (M,), ``label_view`` (M,), for each of the M response tokens: the
      row position whose logits predict it, the token, and its view (= its output row). Rejected's first
      token is predicted by the prompt's last position, not by chosen's last token, which precedes it in the row.
    """
    b = len(pairs)
    length = max(len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) for p in pairs)
    ids, positions, views, source = [], [], [None] * (2 * b), []
    predictor, labels, label_view = [], [], []
    start = 0
    for i, p in enumerate(pairs):
        n_p, n_c, n_r = len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids)
        ids += p.prompt_ids + p.chosen_ids + p.rejected_ids
        positions += list(range(n_p + n_c)) + list(range(n_p, n_p + n_r))
        prompt, chosen = list(range(start, start + n_p)), list(range(start + n_p, start + n_p + n_c))
        rejected = list(range(start + n_p + n_c, start + n_p + n_c + n_r))
        for v, view in ((i, prompt + chosen), (b + i, prompt + rejected)):
            views[v] = view + [start] * (length - len(view))
        source += [i * length + j for j in range(n_p + n_c)] + [(b + i) * length + n_p + j for j in range(n_r)]
        predictor += [prompt[-1]] + chosen[:-1] + [prompt[-1]] + rejected[:-1]
        labels += p.chosen_ids + p.rejected_ids
        label_view += [i] * n_c + [b + i] * n_r
        start += n_p + n_c + n_r

    def t(x):
        return torch.tensor(x, dtype=torch.long)

    return {"input_ids": t([ids]), "position_ids": t([positions]), "view_index": t(views), "view_source": t(source),
            "predictor": t([predictor]), "labels": t(labels), "label_view": t(label_view)}


def sequence_logps_packed(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """As ``sequence_logps`` (chosen rows then rejected rows), from the one unpadded row of ``collate_pairs_packed``.

    The layers run on the N real tokens only; ``logits_to_keep`` applies the LM head to the M
    predicting positions only (no logits for prompt positions or padding).
    """
    from rlhfkit.policy_losses import logprobs_from_logits
    from rlhfkit.models.view_attention import view_attention

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
    from rlhfkit.models.view_attention import supports_view_attention

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
    """Sequence log-probs of every pair under ``model`` (the frozen reference): chosen, rejected (N,) and lengths."""
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


# ---------------------------------------------------------------- the loop

# loss_fn(policy_chosen, policy_rejected, ref_chosen, ref_rejected, lengths, indices) → (weighted mean
# over the micro-batch, Σ weights of the micro-batch, metrics); lengths = (chosen_len, rejected_len).
PairLoss = Callable[..., tuple[torch.Tensor, float, dict]]


def add_sft_term(loss: torch.Tensor, metrics: dict, chosen_logps: torch.Tensor, chosen_len: torch.Tensor,
                 coef: float, weights: torch.Tensor | None = None) -> torch.Tensor:
    """``loss`` + coef × the chosen responses' per-token NLL (RPO), logged as ``sft_nll``; ``loss`` when coef is 0.

    ``weights``: the pairs' weights when ``loss`` is a weighted mean, so both terms are means over
    the same weights (``train_on_pairs`` scales a micro-batch by its share of them)."""
    from rlhfkit.preference_losses import sft_nll

    if not coef:
        return loss
    nll = sft_nll(chosen_logps, chosen_len, weights)
    metrics["sft_nll"] = nll.item()
    return loss + coef * nll


def dpo_pair_loss(cfg: DPOConfig, weights: torch.Tensor) -> PairLoss:
    """The DPO-family loss of ``cfg`` as a PairLoss (losses from ``rlhfkit.preference_losses``)."""
    from rlhfkit.preference_losses import dpo_loss

    def loss_fn(pc, pr, rc, rr, lengths, idx):
        w = weights[idx].to(pc.device)
        nc, nr = lengths
        if cfg.loss_type is DPOLossType.ipo and cfg.ipo_average_logps:
            pc_, pr_ = pc / nc.clamp(min=1), pr / nr.clamp(min=1)
            rc_, rr_ = rc / nc.clamp(min=1), rr / nr.clamp(min=1)
        else:
            pc_, pr_, rc_, rr_ = pc, pr, rc, rr
        loss, metrics = dpo_loss(pc_, pr_, rc_, rr_, cfg.beta, cfg.loss_type, cfg.label_smoothing, weights=w)
        return add_sft_term(loss, metrics, pc, nc, cfg.sft_coef, w), float(w.sum()), metrics

    return loss_fn


def train_on_pairs(
    model,
    pairs: Sequence[TokenizedPair],
    ref: dict[str, torch.Tensor],
    loss_fn: PairLoss,
    cfg: TrainConfig,
    accelerator,
    log,
    pad_id: int,
    progress_desc: str = "dpo",
    step_offset: int = 0,
    layout: PairLayout = PairLayout.packed,
    checkpoint=None,
) -> dict:
    """Optimize ``loss_fn`` over global batches of ``pairs``; ``ref`` holds the precomputed reference log-probs.

    Exact global normalisation as ``rlhfkit.training``: each micro-batch's weighted-mean loss is
    scaled by (its Σ weights / the global batch's Σ weights) × world size, so the summed gradient
    is that of the global weighted mean whatever the split. Dropout stays off (the model is in
    eval mode while it trains): at step 0 policy and reference log-probs are then identical.
    ``checkpoint`` (a ``checkpoints.LoopCheckpoint``): resume from it, save to it every ``save_every`` steps.
    """
    from tqdm.auto import tqdm

    from rlhfkit.nonfinite import NonFiniteGuard
    from rlhfkit.training import Collective, global_batches, make_optimizer_and_scheduler, shard

    weights = torch.tensor([p.weight for p in pairs], dtype=torch.float32)
    total = cfg.total_steps(len(pairs))
    opt, sched = make_optimizer_and_scheduler(model, cfg, total)
    objects = {"model": model, "opt": opt, "sched": sched}  # unwrapped: what a checkpoint holds
    # The scheduler stays out of prepare(): accelerate would step it once per process (see training.py).
    model, opt = accelerator.prepare(model, opt)
    if cfg.gradient_checkpointing:
        from rlhfkit.models.trainable import disable_dropout

        disable_dropout(model)  # checkpointing runs in train mode only, so dropout is switched off instead
        model.train()
    else:
        model.eval()  # dropout off; gradients flow all the same
    coll = Collective(accelerator)
    world, rank = coll.world, coll.rank
    guard = NonFiniteGuard(progress_desc, cfg.max_nonfinite_steps, accelerator)
    controllers = {"nonfinite": guard}
    start, extra = checkpoint.resume(objects, controllers) if checkpoint is not None else (0, {})
    t0, seen, last = time.time(), extra.get("seen", 0), extra.get("last", {})
    seen_before = seen
    bar = tqdm(total=total, initial=start, desc=progress_desc, disable=not accelerator.is_main_process)
    for step, idx in enumerate(global_batches(len(pairs), cfg.batch_size, total, cfg.seed, start_step=start), start=start):
        w_global = float(weights[idx].sum())
        micro = shard(idx, cfg.grad_accum_steps, rank, world)
        step_metrics: dict[str, float] = {}
        loss_total = 0.0
        for m, mb in enumerate(micro):
            ctx = accelerator.no_sync(model) if m < len(micro) - 1 else contextlib.nullcontext()
            with ctx:
                logps, n = pair_forward(model, [pairs[i] for i in mb], pad_id, accelerator.device, layout)
                k = len(mb)
                t = torch.tensor(mb)
                loss, w_local, metrics = loss_fn(
                    logps[:k], logps[k:], ref["chosen"][t].to(logps.device), ref["rejected"][t].to(logps.device),
                    (n[:k], n[k:]), t,
                )
                accelerator.backward(loss * (w_local / w_global) * world)
            loss_total += loss.item() * w_local / w_global
            for key, v in metrics.items():
                step_metrics[key] = step_metrics.get(key, 0.0) + v / len(micro)
        grad_norm = guard.grad_norm(model, cfg.grad_clip)
        # The log is of the global batch: the processes' loss shares summed, metrics (equal shards) averaged.
        loss_total = float(coll.sum(torch.tensor(loss_total, dtype=torch.float64)))
        last = {"loss": loss_total, **coll.mean_of(step_metrics)}
        guard.step(step + 1, loss_total, [grad_norm], [(opt, sched)])
        seen += len(idx)
        bar.update(1)
        if step % cfg.log_every == 0 or step == total - 1:
            elapsed = time.time() - t0
            log.write({"step": step_offset + step + 1, **last, "lr": sched.get_last_lr()[0],
                       "grad_norm": float(grad_norm) if grad_norm is not None else None,
                       "pairs_per_s": (seen - seen_before) / max(elapsed, 1e-9), "elapsed_s": elapsed})
        bar.set_postfix(loss=f"{loss_total:.3f}")
        if checkpoint is not None:
            checkpoint.after_step(step + 1, total, objects, controllers, lambda: {"seen": seen, "last": last})
    bar.close()
    runtime = time.time() - t0
    return {"final_" + k: v for k, v in last.items()} | {
        "train_steps": total, "train_pairs": seen, "train_runtime_s": runtime,
        "train_pairs_per_s": (seen - seen_before) / max(runtime, 1e-9), "resumed_from_step": start, **guard.metrics(),
    }


def select_ranking_pairs(pair_set, mode: str) -> list:
    """The pairs to train on: all of them, or best vs worst of each ranking; identical texts dropped.

    A pair whose chosen and rejected texts are equal has h = 0 whatever the policy (no gradient),
    so it only dilutes the batch. Rankings expanded by ``load_pairs`` list (ranking[i], ranking[j])
    for i < j, so a group's first pair's chosen is the best and its last pair's rejected the worst.
    """
    import dataclasses

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
    from rlhfkit.checkpoints import LoopCheckpoint, checkpoint_dir
    from rlhfkit.data.preferences import load_pairs
    from rlhfkit.models.loading import load_causal_lm, load_tokenizer, model_config
    from rlhfkit.models.trainable import make_trainable, reference_mode, save_trained

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
        from rlhfkit.data.loading import DataError

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
    if accelerator.is_main_process:
        save_trained(accelerator.unwrap_model(model), tokenizer, out_dir, cfg.lora)
    return metrics | {"n_pairs": len(pairs), "n_pairs_in_file": len(pair_set.pairs), "reference_logps_s": ref_s,
                      "n_truncated": counts["truncated"]}
