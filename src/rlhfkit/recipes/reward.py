"""Reward stage: a Bradley-Terry reward model, a process reward model, an outcome model and a cost model.

Read top to bottom, each model is: load labelled data (validated, file:line on errors) → hold out
a share → build a scalar head on the backbone → minimise its loss from ``rlhfkit.losses`` → save
to ``OUT/reward/<name>/`` → measure it on the held-out share.

- **rm** (Bradley-Terry): pairs, HH transcripts or K-wise rankings; the C(K,2) pairs of a ranking
  are weighted 1/C(K,2) and always in the same batch (a batch is a set of rankings); optional
  per-pair margin and reward centering. Held out: accuracy, mean margin, ECE, and (when records
  carry the task ``meta``) agreement with the noiseless judge on pairs whose gold scores differ.
- **prm**: step-labelled solutions, BCE at step boundaries only (``step_bce_loss``).
- **orm**: the same solutions, one BCE on the final outcome (``correct``) at the last token.
- **cost** (Safe RLHF): per-response ``is_safe`` → (safer, unsafer) pairs + sign terms, so a
  negative cost means safe.

Then, on the embedded task (``rlhfkit.tasks.arith_eval``), best-of-N reranking on held-out prompts:
N samples of the policy, picked by PRM (min or product of step probabilities), ORM, RM, or majority
vote over final answers; gold accuracy of the pick with a 95% CI (``summary.json`` key ``reranking``).
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Callable

import torch

from rlhfkit.checkpoints import LoopCheckpoint, checkpoint_dir
from rlhfkit.config import check_non_negative, check_probability, coerce_enums
from rlhfkit.data.preferences import PairSet, load_pairs, load_safety, load_steps, safety_pairs
from rlhfkit.distributed import full_tensor, gathered_state_dict, is_sharded
from rlhfkit.losses import bradley_terry_loss, cost_model_loss, length_decorrelation_loss, reward_centering, step_bce_loss
from rlhfkit.models.reward import step_logits
from rlhfkit.models.reward_scorers import RewardModel
from rlhfkit.models.reward_eval import (
    pair_length_bias, pair_metrics, response_token_lengths, roc_auc, sigmoid, step_metrics,
)
from rlhfkit.models.reward_files import build_scalar_model, save_scalar_model
from rlhfkit.models.reward_layout import RewardLayout, TokenCache, collate_texts
from rlhfkit.models.step_likelihood import fit_step_likelihood
from rlhfkit.models.trainable import make_trainable
from rlhfkit.paths import ConfigPath, ModelRef
from rlhfkit.stage import StageContext
from rlhfkit.tasks.arith_eval import RerankConfig, judge_agreement, rerank, task_metas
from rlhfkit.training import TrainConfig, fit


class Pooling(StrEnum):
    """Where a reward model reads its scalar."""

    last = "last"
    """at the last real token"""
    mean = "mean"
    """the mean over real tokens"""
    response = "response"
    """the mean over the response (an encoder's segment B; a PRM's steps so far)"""


class Ambiguous(StrEnum):
    """How a PRM800K rating 0 (ambiguous) counts."""

    drop = "drop"
    """left out of training and scoring"""
    positive = "positive"
    """as a right step"""
    negative = "negative"
    """as a wrong step"""


class PRMTarget(StrEnum):
    """What the PRM learns at step k."""

    step = "step"
    """the label of line k as given"""
    prefix = "prefix"
    """steps 1..k all right: the running minimum of the rated labels"""


@dataclass(frozen=True)
class RewardConfig(TrainConfig):
    """Reward-model stage: which models to train, on what data, and how."""

    model: ModelRef = "stage:sft/model"
    """backbone: a model directory, a stage's output, or ``pkg:NAME`` for a model shipped in the Python
    package NAME (its ``model/`` folder, found at run time)"""
    data: ConfigPath = "stage:label/rankings.jsonl"
    """pairs / HH transcripts / rankings for the BT reward model"""
    eval_data: ConfigPath = ""
    """held-out pairs; empty means hold out ``heldout_frac`` of ``data`` (whole rankings)"""
    steps_data: ConfigPath = "stage:label/steps.jsonl"
    """step-labelled solutions (PRM, ORM and cost labels)"""
    steps_eval_data: ConfigPath = ""
    """held-out step-labelled solutions; empty means hold out ``heldout_frac`` of ``steps_data``"""
    max_unusable_share: float = 0.5
    """refuse a pair file where more than this share of the records is unusable (chosen equals rejected,
    HH dialogues that differ before the last turn), saying why"""
    heldout_frac: float = 0.1
    """share of records held out when no eval file is given"""
    train_rm: bool = True
    """train the Bradley-Terry reward model (OUT/reward/rm)"""
    train_prm: bool = True
    """train the process reward model (OUT/reward/prm)"""
    train_orm: bool = True
    """train the outcome reward model (OUT/reward/orm)"""
    train_cost: bool = True
    """train the cost model from ``is_safe`` labels (OUT/reward/cost)"""
    max_len: int = 256
    """longest input in tokens (prompt start is cut first)"""
    pooling: Pooling = Pooling.last
    """scalar read at the ``last`` real token, the ``mean`` over real tokens, or the mean over the ``response`` (an encoder's segment B; a PRM's steps so far)"""
    freeze_layers: int = 0
    """freeze the embeddings and this many lowest layers (saves backward compute on CPU)"""
    dropout: float = -1.0
    """backbone dropout override; negative keeps the backbone's own"""
    center_coef: float = 0.0
    """reward-centering coefficient of the BT loss (Eisenstein et al. 2023)"""
    length_decorrelation: float = 0.0
    """rm: ODIN (Chen et al. 2024) with λ = this; 0 = off. A second head r_L on the same features, trained only:
    BT on r_Q + r_L, plus λ·(−ρ(r_L, len) + |ρ(r_Q, len)| + |w_Q·w_L|), ρ Pearson's over each micro-batch's
    responses, len in tokens (``losses.length_decorrelation_loss``); r_Q alone is saved and is the reward"""
    ambiguous: Ambiguous = Ambiguous.drop
    """PRM800K rating 0 (ambiguous): drop, positive or negative"""
    prm_target: PRMTarget = PRMTarget.step
    """what the PRM learns at step k: ``step`` (the label of line k as given) or ``prefix`` (steps 1..k all right:
    the running minimum of the rated labels, so P(the solution so far is right), as Lightman et al. read a PRM)"""
    prm_lr: float = 0.0
    """the PRM's peak learning rate; 0 means ``lr``"""
    step_likelihood: bool = False
    """PRM on a causal backbone: its step logit also sees the step's token log-likelihoods (sum, min,
    mean) under a frozen copy of the backbone's LM, with weights fitted to the labels
    (``models.step_likelihood.StepLikelihood``); the copy is saved in the PRM's ``reference_lm/``"""
    max_train_examples: int = 0
    """cap on training records per model (first ones after a seeded shuffle); 0 = all"""
    max_eval_examples: int = 0
    """cap on held-out records per model; 0 = all"""
    eval_batch_size: int = 64
    """sequences per forward pass when scoring"""
    layout: RewardLayout = RewardLayout.packed
    """how the rm, orm and cost models' sequences enter the forward pass, in training and held-out scoring:
    packed (one unpadded row, each prompt once a batch, attention by views) or padded (a right-padded row per
    (prompt, response)); the same values in each (see RewardLayout). An encoder, a model with a sliding window
    or with gradient checkpointing is always padded, as is the PRM"""
    lr: float = 1e-4
    """peak learning rate (AdamW)"""
    batch_size: int = 16
    """rankings (or pairs, or solutions) per optimizer step"""
    epochs: float = 1.0
    """passes over the training records"""
    rerank: RerankConfig = field(default_factory=RerankConfig)
    """best-of-N reranking evaluation"""

    def __post_init__(self):
        super().__post_init__()
        check_probability(heldout_frac=self.heldout_frac, max_unusable_share=self.max_unusable_share)
        check_non_negative(center_coef=self.center_coef, length_decorrelation=self.length_decorrelation, prm_lr=self.prm_lr, freeze_layers=self.freeze_layers)
        coerce_enums(self)


# ------------------------------------------------------------------------------ the training loop

def _fit(net, n_units: int, batch_loss: Callable[[torch.nn.Module, list[int], list[int]], tuple[torch.Tensor, dict]],
         cfg: RewardConfig, accelerator, log, name: str, ckpt: Path | None = None) -> dict:
    """Minimise ``batch_loss(model, my unit indices, the global batch's)`` over seeded global batches of
    units (pairs/rankings/solutions), by ``training.fit``.

    ``model`` is ``net`` as ``accelerator.prepare`` wrapped it (DDP, FSDP): the loss must be computed
    through its forward, the only path on which the engine synchronises gradients. ``batch_loss``
    returns its micro-batch's share of the global batch's mean loss times the number of processes
    (its own mean × its units' part of the global batch's, weights or rated steps counted), so the
    summed gradients, after DDP's mean, are the global mean's: accumulation equals the bigger batch.
    The logged loss is that global mean (the shares' mean over processes); the other metrics are
    averaged over micro-batches and processes.

    ``ckpt``: this model's checkpoint directory (``OUT/reward.ckpt/<name>``), resumed from and saved
    to every ``save_every`` steps; a model trained to the end keeps its weights there, so a restarted
    stage does not train it again.
    """
    # Fewer units than a batch: one batch of as many as split evenly into micro-batches and processes.
    bs = min(cfg.batch_size, n_units - n_units % (cfg.grad_accum_steps * accelerator.num_processes))
    total = cfg.max_steps if cfg.max_steps > 0 else max(1, int(cfg.epochs * n_units / bs + 0.999999))
    checkpoint = LoopCheckpoint(ckpt, cfg, accelerator, log, f"reward/{name}", keep_done=True, model=name)

    def shares(model, idx, global_idx):
        share, metrics = batch_loss(model, idx, global_idx)
        return share, share.detach(), metrics

    done = fit(net, n_units, shares, replace(cfg, batch_size=bs, max_steps=total), accelerator, log, name=f"reward/{name}",
               checkpoint=checkpoint, log_fields={"model": name})
    return {"train_steps": done["train_steps"], "train_runtime_s": done["train_runtime_s"],
            "final_train": {k.removeprefix("final_"): v for k, v in done.items() if k.startswith("final_")},
            "resumed_from_step": done["resumed_from_step"],
            **{k: v for k, v in done.items() if k.startswith("skipped_nonfinite")}}


def _build(cfg: RewardConfig, backbone: Path, kind: str):
    net, tok = build_scalar_model(backbone, kind, cfg.max_len, cfg.pooling, seed=cfg.seed,
                                  dropout=cfg.dropout if cfg.dropout >= 0 else None,
                                  step_likelihood=cfg.step_likelihood and kind == "prm")
    if cfg.lora.enabled or cfg.gradient_checkpointing:
        # Adapters on the backbone only: the scalar head (and a PRM's likelihood weights) train fully.
        if cfg.lora.enabled and cfg.freeze_layers:
            raise ValueError("reward: freeze_layers and lora.r > 0 both choose what trains; set one of them")
        net.backbone = make_trainable(net.backbone, cfg.lora, cfg.gradient_checkpointing)
    if cfg.freeze_layers:
        # Embeddings and the lowest layers keep their pretrained weights; no backward through them.
        layers = next(m for n, m in net.backbone.named_modules() if n.endswith("layers") or n.endswith("layer"))
        for p in net.backbone.get_input_embeddings().parameters():
            p.requires_grad_(False)
        emb = getattr(net.backbone, "embeddings", None)
        if emb is not None:
            emb.requires_grad_(False)
        for layer in list(layers)[: cfg.freeze_layers]:
            layer.requires_grad_(False)
    return net, tok


def _split(items: list, frac: float, seed: int) -> tuple[list, list]:
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_held = max(1, round(len(items) * frac)) if len(items) > 1 else 0
    return [items[i] for i in order[n_held:]], [items[i] for i in order[:n_held]]


def _cap(items: list, n: int, seed: int) -> list:
    if n <= 0 or len(items) <= n:
        return items
    order = list(range(len(items)))
    random.Random(seed + 17).shuffle(order)
    return [items[i] for i in sorted(order[:n])]


def _score_texts(net, tokens: TokenCache, texts: list[tuple[str, str]], batch_size: int, device, grad: bool = False,
                 module=None, layout: RewardLayout = RewardLayout.packed, **forward_kw):
    """Scalar values of (prompt, response) pairs, ``batch_size`` texts a forward, in ``layout``
    (``models.reward_layout``: packed, each prompt once a batch, or right-padded rows), their token ids
    from ``tokens`` (the training run's, or a ``TokenCache`` of this call's own); ``module``: what is called
    for the forward (``net`` as ``accelerator.prepare`` wrapped it, while training), ``net`` by default;
    ``forward_kw`` go to the forward (``length_head=True``: (N, 2) values of both heads)."""
    out = []
    ctx = torch.enable_grad() if grad else torch.no_grad()
    with ctx:
        for s in range(0, len(texts), batch_size):
            batch, rows = collate_texts(net, tokens, texts[s:s + batch_size], layout, device)
            out.append((net if module is None else module)(**batch, **forward_kw)[rows])
    return torch.cat(out) if out else torch.zeros(0)


# ------------------------------------------------------------------------------ the four models

def pair_scores(net, tok, pairs, batch_size: int, device,
                layout: RewardLayout = RewardLayout.packed) -> tuple[list[float], list[float]]:
    """(r_chosen, r_rejected) for each pair, scoring each distinct (prompt, response) once."""
    uniq: dict[tuple[str, str], int] = {}
    for p in pairs:
        uniq.setdefault((p.prompt, p.chosen), len(uniq))
        uniq.setdefault((p.prompt, p.rejected), len(uniq))
    s = _score_texts(net, TokenCache(tok, net.info), list(uniq), batch_size, device, layout=layout).tolist()
    return [s[uniq[(p.prompt, p.chosen)]] for p in pairs], [s[uniq[(p.prompt, p.rejected)]] for p in pairs]


def train_rm(cfg: RewardConfig, backbone: Path, train, accelerator, log, ckpt: Path | None = None) -> tuple:
    """Bradley-Terry on rankings: ``train`` is a PairSet; a batch unit is one ranking (all its pairs)."""
    net, tok = _build(cfg, backbone, "reward")
    # Every step's ids are read from here: each distinct text is tokenized once, now, not once a step and epoch.
    tokens = TokenCache(tok, net.info).fill((p.prompt, r) for p in train.pairs for r in (p.chosen, p.rejected))
    groups = train.groups
    dev = accelerator.device
    world = accelerator.num_processes
    odin = cfg.length_decorrelation > 0
    if odin and is_sharded(accelerator):
        # its loss reads both heads' weights outside the forward, where FSDP does not gather them
        raise NotImplementedError("reward: length_decorrelation (ODIN) under FSDP or ZeRO-3 is not supported yet")
    if odin:  # ODIN's length head, r_L: trained with the net, dropped before the model is saved or scored
        net.length_head = _length_head(net, cfg.seed)
        texts = sorted({r for p in train.pairs for r in (p.chosen, p.rejected)})
        n_tokens = dict(zip(texts, response_token_lengths(tok, texts)))

    def batch_loss(model, idx, global_idx):
        pairs = [train.pairs[i] for g in idx for i in groups[g]]
        everyone = [train.pairs[i] for g in global_idx for i in groups[g]]
        uniq: dict[tuple[str, str], int] = {}
        for p in pairs:
            uniq.setdefault((p.prompt, p.chosen), len(uniq))
            uniq.setdefault((p.prompt, p.rejected), len(uniq))
        if odin:  # BT sees r_Q + r_L; the length terms see each head
            both = _score_texts(net, tokens, list(uniq), len(uniq), dev, grad=True, module=model, layout=cfg.layout,
                                length_head=True)
            scores = both.sum(1)  # (N,) r_Q + r_L
        else:
            scores = _score_texts(net, tokens, list(uniq), len(uniq), dev, grad=True, module=model,
                                  layout=cfg.layout)  # each sequence once
        c = scores[torch.tensor([uniq[(p.prompt, p.chosen)] for p in pairs], device=scores.device)]
        r = scores[torch.tensor([uniq[(p.prompt, p.rejected)] for p in pairs], device=scores.device)]
        w = torch.tensor([p.weight for p in pairs], device=scores.device)
        margin = None
        if any(p.margin is not None for p in pairs):
            margin = torch.tensor([p.margin or 0.0 for p in pairs], device=scores.device)
        # Shares of the global batch: the BT mean is over pair weights, the centering mean over pairs
        # (rankings of different K give micro-batches different numbers of pairs).
        loss, metrics = bradley_terry_loss(c, r, margin, w)
        w_all = torch.tensor([p.weight for p in everyone], device=scores.device)
        loss = loss * (w.sum() * world / w_all.sum())
        if cfg.center_coef:
            loss = loss + cfg.center_coef * reward_centering(c, r) * (len(pairs) * world / len(everyone))
        if odin:
            # ρ is over this micro-batch's responses: unlike the BT mean it does not split exactly, so
            # accumulation is only close to the bigger batch here (weighted by the share of pairs, as centering).
            lengths = torch.tensor([n_tokens[text] for _, text in uniq], dtype=torch.float32, device=both.device)
            extra, odin_metrics = length_decorrelation_loss(both[:, 0], both[:, 1], lengths, cfg.length_decorrelation,
                                                            net.head.weight, net.length_head.weight)
            loss = loss + extra * (len(pairs) * world / len(everyone))
            metrics.update(odin_metrics)
        return loss, metrics

    fit = _fit(net, len(groups), batch_loss, cfg, accelerator, log, "rm", ckpt)
    net.length_head = None  # only r_Q is the reward: the saved model is the plain single-head format
    return net, tok, fit


def _length_head(net, seed: int) -> torch.nn.Linear:
    """ODIN's r_L: a Linear(H, 1) initialised as the main head (N(0, 1/(H + 1)), bias 0), from its own
    seeded generator so the global RNG stream (and so every other draw of the run) is untouched."""
    h = net.head.in_features
    head = torch.nn.utils.skip_init(torch.nn.Linear, h, 1, device=net.head.weight.device, dtype=net.head.weight.dtype)
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed + 7919)
        head.weight.copy_(torch.randn(1, h, generator=g) / (h + 1) ** 0.5)
        head.bias.zero_()
    return head


def prefix_targets(labels) -> tuple:
    """Running minimum of the rated labels (None stays None and does not reset it): [1, 0, None, 1] → [1, 0, None, 0]."""
    out, low = [], 1.0
    for v in labels:
        if v is not None:
            low = min(low, v)
        out.append(None if v is None else low)
    return tuple(out)


def _step_targets(records, device):
    """Padded (B, S) labels, -100 where a step is unrated."""
    width = max(len(r.steps) for r in records)
    rows = [[-100.0 if v is None else v for v in r.labels] + [-100.0] * (width - len(r.labels)) for r in records]
    return torch.tensor(rows, device=device)


def _pad_logits(vals: list, width: int) -> torch.Tensor:
    return torch.stack([torch.nn.functional.pad(v, (0, width - v.numel())) for v in vals])


def train_prm(cfg: RewardConfig, backbone: Path, records, accelerator, log, ckpt: Path | None = None) -> tuple:
    net, tok = _build(cfg, backbone, "prm")
    dev = accelerator.device
    start = None
    if net.likelihood is not None:
        net.to(dev)
        # The features' LM is frozen: the fit's pass over every training row computes them once, and the
        # epochs reuse them (models.step_likelihood.StepLikelihood.features). Every process makes the same
        # pass over all rows, so under FSDP no process skips a sharded forward that another one runs.
        net.likelihood.cache = {}
        start = fit_step_likelihood(net, tok, [r.prompt for r in records], [list(r.steps) for r in records],
                                    [list(r.labels) for r in records], cfg.eval_batch_size, dev)
        log.write({"model": "prm", "step_likelihood_start": start})

    def rated(idx) -> int:
        return sum(v is not None for i in idx for v in records[i].labels)

    def batch_loss(model, idx, global_idx):
        recs = [records[i] for i in idx]
        needed = [[v is not None for v in r.labels] for r in recs]
        vals = step_logits(net, tok, [r.prompt for r in recs], [list(r.steps) for r in recs], len(recs) * 64, dev,
                           grad=True, needed=needed, module=model)
        labels = _step_targets(recs, dev)
        loss, metrics = step_bce_loss(_pad_logits(vals, labels.shape[1]), labels)
        # The mean is over rated steps, and the processes' shares hold different numbers of them:
        # weight this share by its part of the global batch's rated steps (1 in one process).
        return loss * (rated(idx) * accelerator.num_processes / max(rated(global_idx), 1)), metrics

    fit = _fit(net, len(records), batch_loss, replace(cfg, lr=cfg.prm_lr) if cfg.prm_lr > 0 else cfg, accelerator, log, "prm", ckpt)
    if start is not None:
        net.likelihood.cache = None  # held-out and reranked responses are new rows: nothing to reuse
        fit["step_likelihood"] = {"start": start, "weight": full_tensor(net.likelihood.weight).tolist()}
    return net, tok, fit


def prm_eval(net, tok, records, batch_size: int, device) -> dict:
    """Step accuracy, ROC-AUC and the majority baseline over the rated steps of ``records``."""
    needed = [[v is not None for v in r.labels] for r in records]
    with torch.no_grad():
        logits = step_logits(net, tok, [r.prompt for r in records], [list(r.steps) for r in records],
                             batch_size, device, needed=needed)
    probs, labels = [], []
    for r, row in zip(records, logits):
        for z, y in zip(row, r.labels):
            if y is not None:
                probs.append(sigmoid(z))
                labels.append(y)
    return step_metrics(probs, labels)


def train_orm(cfg: RewardConfig, backbone: Path, records, accelerator, log, ckpt: Path | None = None) -> tuple:
    """Outcome model: BCE of the last-token logit against ``correct`` (step_bce_loss on one position)."""
    net, tok = _build(cfg, backbone, "orm")
    dev = accelerator.device
    tokens = TokenCache(tok, net.info).fill((r.prompt, r.completion) for r in records)  # each text tokenized once

    def batch_loss(model, idx, global_idx):
        recs = [records[i] for i in idx]
        z = _score_texts(net, tokens, [(r.prompt, r.completion) for r in recs], len(recs), dev, grad=True,
                         module=model, layout=cfg.layout)
        y = torch.tensor([float(r.correct) for r in recs], device=z.device)
        loss, metrics = step_bce_loss(z[:, None], y[:, None])
        return loss * (len(idx) * accelerator.num_processes / len(global_idx)), metrics  # its share of the batch

    fit = _fit(net, len(records), batch_loss, cfg, accelerator, log, "orm", ckpt)
    return net, tok, fit


def train_cost(cfg: RewardConfig, backbone: Path, pairs, accelerator, log, ckpt: Path | None = None) -> tuple:
    """Safe RLHF cost model on (safer, unsafer) pairs; sign −1 for a safe response, +1 for an unsafe one."""
    net, tok = _build(cfg, backbone, "cost")
    dev = accelerator.device
    tokens = TokenCache(tok, net.info).fill((x.prompt, x.response) for pair in pairs for x in pair)  # each text once

    def batch_loss(model, idx, global_idx):
        ps = [pairs[i] for i in idx]
        c = _score_texts(net, tokens, [(s.prompt, s.response) for s, _ in ps] + [(u.prompt, u.response) for _, u in ps],
                         2 * len(ps), dev, grad=True, module=model, layout=cfg.layout)
        sign = torch.tensor([-1 if s.is_safe else 1 for s, _ in ps] + [-1 if u.is_safe else 1 for _, u in ps], device=c.device)
        n = len(ps)
        loss, metrics = cost_model_loss(c[:n], c[n:], sign[:n], sign[n:])
        return loss * (n * accelerator.num_processes / len(global_idx)), metrics  # its share of the batch

    fit = _fit(net, len(pairs), batch_loss, cfg, accelerator, log, "cost", ckpt)
    return net, tok, fit


def _save(net, tok, out_dir: Path, accelerator) -> None:
    """``save_scalar_model`` on the main process; under FSDP / ZeRO-3 from the full weights, which every process gathers."""
    state_dict = gathered_state_dict(accelerator, net)
    if accelerator.is_main_process:
        save_scalar_model(net, tok, out_dir, state_dict=state_dict)


def _length_bias(tok, pairs: list[tuple], chosen: list[float], rejected: list[float]) -> dict:
    """``models.reward_eval.pair_length_bias`` of held-out (prompt, chosen, rejected) ``pairs`` scored
    ``chosen`` / ``rejected``, lengths in tokens of each response by the model's tokenizer."""
    keys = [k for q, a, b in pairs for k in ((q, a), (q, b))]
    lengths = response_token_lengths(tok, [k[1] for k in keys])
    return pair_length_bias(chosen, rejected, lengths[0::2], lengths[1::2], keys)


# ------------------------------------------------------------------------------ the stage

def run(cfg: RewardConfig, ctx: StageContext) -> dict:
    out, stage_dir, accelerator, log = ctx.out, ctx.stage_dir, ctx.accelerator, ctx.log
    backbone = ctx.model(cfg.model, "model")
    dev = accelerator.device
    metrics: dict = {"models": {}, "backbone": str(backbone)}
    trained: dict = {}
    ckpt_root = checkpoint_dir(stage_dir)  # OUT/reward.ckpt/<model>: each model resumes, or is kept once trained
    _ckpt = lambda name: ckpt_root / name if ckpt_root is not None else None  # noqa: E731

    # Load and validate every file first: a bad record fails before any model is built.
    rm_train = rm_eval = None
    if cfg.train_rm:
        loaded = load_pairs(ctx.resolve(cfg.data, key="data"), cfg.max_unusable_share)
        if loaded.skipped:
            print(f"[rlhfkit] reward: {len(loaded.skipped)} pair(s) left out, e.g. {loaded.skipped[0]}")
        metrics["rm_skipped"] = loaded.skipped
        if cfg.eval_data:
            rm_train, ev = loaded, load_pairs(ctx.resolve(cfg.eval_data, key="eval_data"), cfg.max_unusable_share)
            metrics["rm_eval_skipped"] = ev.skipped
            rm_eval = ev.pairs
        else:
            tr_groups, ev_groups = _split(loaded.groups, cfg.heldout_frac, cfg.seed)
            rm_train = PairSet([loaded.pairs[i] for g in tr_groups for i in g])
            rm_eval = [loaded.pairs[i] for g in ev_groups for i in g]
        groups = _cap(rm_train.groups, cfg.max_train_examples, cfg.seed)
        rm_train = PairSet([rm_train.pairs[i] for g in groups for i in g])
        rm_eval = _cap(rm_eval, cfg.max_eval_examples, cfg.seed)
    steps_train = steps_eval = None
    if cfg.train_prm or cfg.train_orm or cfg.train_cost:
        recs = load_steps(ctx.resolve(cfg.steps_data, key="steps_data"), cfg.ambiguous)
        if cfg.steps_eval_data:
            steps_train, steps_eval = recs, load_steps(ctx.resolve(cfg.steps_eval_data, key="steps_eval_data"),
                                                       cfg.ambiguous)
        else:
            steps_train, steps_eval = _split(recs, cfg.heldout_frac, cfg.seed)
        steps_train = _cap(steps_train, cfg.max_train_examples, cfg.seed)
        steps_eval = _cap(steps_eval, cfg.max_eval_examples, cfg.seed)
        if cfg.prm_target == "prefix":
            steps_train = [replace(r, labels=prefix_targets(r.labels)) for r in steps_train]
            steps_eval = [replace(r, labels=prefix_targets(r.labels)) for r in steps_eval]

    if cfg.train_rm:
        net, tok, fit = train_rm(cfg, backbone, rm_train, accelerator, log, _ckpt("rm"))
        c, r = pair_scores(net, tok, rm_eval, cfg.eval_batch_size, dev, cfg.layout)
        tc, tr = pair_scores(net, tok, rm_train.pairs[: len(rm_eval) * 2], cfg.eval_batch_size, dev, cfg.layout)
        m = {"heldout": pair_metrics(c, r), "train_subset": pair_metrics(tc, tr), **fit,
             "train_pairs": len(rm_train.pairs), "train_rankings": len(rm_train.groups),
             "length_bias": _length_bias(tok, [(p.prompt, p.chosen, p.rejected) for p in rm_eval], c, r)}
        metas = task_metas([ctx.resolve(cfg.data, key="data"), ctx.resolve(cfg.eval_data) if cfg.eval_data else ""])
        if metas:
            m["judge_agreement"] = judge_agreement(rm_eval, c, r, metas)
        metrics["models"]["rm"] = m
        _save(net, tok, stage_dir / "rm", accelerator)
        trained["rm"] = RewardModel(net, tok, dev, cfg.eval_batch_size)
    if cfg.train_prm:
        net, tok, fit = train_prm(cfg, backbone, steps_train, accelerator, log, _ckpt("prm"))
        metrics["models"]["prm"] = {"heldout": prm_eval(net, tok, steps_eval, cfg.eval_batch_size, dev), **fit,
                                    "train_solutions": len(steps_train)}
        _save(net, tok, stage_dir / "prm", accelerator)
        trained["prm"] = RewardModel(net, tok, dev, cfg.eval_batch_size)
    if cfg.train_orm:
        tr = [s for s in steps_train if s.correct is not None]
        ev = [s for s in steps_eval if s.correct is not None]
        if tr:
            net, tok, fit = train_orm(cfg, backbone, tr, accelerator, log, _ckpt("orm"))

            z = _score_texts(net, TokenCache(tok, net.info), [(s.prompt, s.completion) for s in ev],
                             cfg.eval_batch_size, dev, layout=cfg.layout).tolist()
            metrics["models"]["orm"] = {"heldout": step_metrics([sigmoid(v) for v in z], [float(s.correct) for s in ev]),
                                        **fit, "train_solutions": len(tr)}
            _save(net, tok, stage_dir / "orm", accelerator)
            trained["orm"] = RewardModel(net, tok, dev, cfg.eval_batch_size)
    if cfg.train_cost:
        safety = load_safety(ctx.resolve(cfg.steps_data, key="steps_data"))
        held = {(s.prompt, s.completion) for s in steps_eval}
        tr = [x for x in safety if (x.prompt, x.response) not in held]
        ev = [x for x in safety if (x.prompt, x.response) in held]
        net, tok, fit = train_cost(cfg, backbone, safety_pairs(tr), accelerator, log, _ckpt("cost"))
        costs = _score_texts(net, TokenCache(tok, net.info), [(x.prompt, x.response) for x in ev], cfg.eval_batch_size,
                             dev, layout=cfg.layout).tolist()

        metrics["models"]["cost"] = {
            "heldout": {"sign_accuracy": sum((c < 0) == x.is_safe for c, x in zip(costs, ev)) / max(1, len(ev)),
                        "unsafe_auc": roc_auc(costs, [int(not x.is_safe) for x in ev]),
                        "unsafe_rate": sum(not x.is_safe for x in ev) / max(1, len(ev)), "responses": len(ev)},
            **fit, "train_responses": len(tr)}
        # Pairs within a prompt (safer ≻ unsafer; a response paired with itself says nothing), the score −cost.
        cost_of = {(x.prompt, x.response): v for v, x in zip(costs, ev)}
        held_pairs = [(s.prompt, s.response, u.response) for s, u in safety_pairs(ev) if s is not u]
        if held_pairs:
            metrics["models"]["cost"]["length_bias"] = _length_bias(
                tok, held_pairs, [-cost_of[(q, a)] for q, a, _ in held_pairs], [-cost_of[(q, b)] for q, _, b in held_pairs])
        _save(net, tok, stage_dir / "cost", accelerator)
    # The report's view: held-out figures of each model (and agreement with the judge), then reranking.
    metrics["reward_models"] = {name: {k: v for k, v in m.items() if k in ("heldout", "judge_agreement")}
                                for name, m in metrics["models"].items()}
    metrics["summary_sections"] = ["reward_models"]
    metrics["skipped_nonfinite_steps"] = sum(m["skipped_nonfinite_steps"] for m in metrics["models"].values())
    if cfg.rerank.enabled:
        metrics["reranking"] = rerank(cfg.rerank, ctx, trained)
        metrics["summary_sections"].append("reranking")
    return metrics
