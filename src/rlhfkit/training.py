"""The pieces every supervised training loop composes: config, optimizer, global batches, the step.

Exact equivalence across process counts and accumulation: a global batch of ``batch_size``
examples is cut into ``grad_accum_steps`` micro-batches, each split across processes. Each
process's loss is its *sum* of token losses divided by the number of loss tokens in the whole
global batch (known to every process without communication), times the world size because DDP
averages gradients. The summed gradient is then exactly the gradient of the global mean token
loss, whatever the split. (Averaging per micro-batch instead, the common bug, weights tokens
of short micro-batches more and breaks "2 processes = 1 process" and "accumulation = bigger batch".)
"""
from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Callable, Iterator, Sequence

import torch
from tqdm.auto import tqdm
from transformers import get_scheduler

from rlhfkit.config import check_non_negative, check_positive, coerce_enums
from rlhfkit.distributed import Collective, is_sharded
from rlhfkit.io import JsonlLog
from rlhfkit.models.token_logps import scored_logprobs
from rlhfkit.models.trainable import LoRAConfig, is_peft
from rlhfkit.models.view_attention import view_attention
from rlhfkit.nonfinite import NonFiniteGuard
from rlhfkit.tracking import check_report_to


class Scheduler(StrEnum):
    """The learning-rate schedule after warm-up (``transformers.get_scheduler`` names)."""

    cosine = "cosine"
    linear = "linear"
    constant = "constant"


class MixedPrecision(StrEnum):
    """Mixed precision for ``accelerate``."""

    auto = "auto"
    """bf16 on a GPU that supports it, full precision otherwise"""
    no = "no"
    bf16 = "bf16"
    fp16 = "fp16"


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings shared by the supervised stages."""

    lr: float = 1e-3
    """peak learning rate (AdamW)"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    warmup_steps: int = 10
    """linear warm-up steps before the schedule"""
    scheduler: Scheduler = Scheduler.cosine
    """learning-rate schedule after warm-up: cosine, linear or constant (transformers.get_scheduler names)"""
    max_steps: int = 0
    """optimizer steps; 0 means derive from ``epochs``"""
    epochs: float = 1.0
    """passes over the data when ``max_steps`` is 0"""
    batch_size: int = 32
    """global batch: examples per optimizer step, over all processes and accumulation steps"""
    grad_accum_steps: int = 1
    """micro-batches per optimizer step on each process"""
    grad_clip: float = 1.0
    """clip the global gradient norm to this value (0 disables)"""
    log_every: int = 10
    """write a log.jsonl line every this many steps"""
    seed: int = 0
    """seed for initialisation, data order and dropout"""
    mixed_precision: MixedPrecision = MixedPrecision.auto
    """``auto`` (bf16 on a GPU, full precision on CPU), ``no``, ``bf16`` or ``fp16``"""
    report_to: tuple[str, ...] = ()
    """trackers every logged metric also goes to: tensorboard, wandb, trackio; empty (or [none]) logs only to log.jsonl"""
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    """low-rank adapters (``lora.r: 0`` trains every weight); the saved ``model/`` is merged unless ``lora.merge`` is false"""
    gradient_checkpointing: bool = False
    """recompute activations in the backward pass: less memory, about a third more compute"""
    save_every: int = 50
    """write a mid-stage checkpoint (model and adapters, optimizer, scheduler, RNG states, data position) to
    OUT/<stage>.ckpt every this many optimizer steps, atomically; a rerun of the stage resumes from it (0: never)"""
    stop_after_steps: int = 0
    """stop (after checkpointing) once this many optimizer steps are done, leaving the stage incomplete; a rerun
    resumes (for tests and operations); 0 runs to the end"""
    max_nonfinite_steps: int = 3
    """a step whose loss or gradient norm is NaN or infinite is skipped (no update) and counted; this many in a
    row stop the stage with an error, uncommitted; 0 turns the check off"""

    def __post_init__(self):
        check_report_to(self.report_to)
        # Ranges first, at load time: a negative or NaN value must not reach torch after the model has loaded.
        check_positive(lr=self.lr, epochs=self.epochs, log_every=self.log_every)
        check_non_negative(weight_decay=self.weight_decay, warmup_steps=self.warmup_steps, max_steps=self.max_steps,
                           grad_clip=self.grad_clip)
        check_non_negative(save_every=self.save_every, stop_after_steps=self.stop_after_steps,
                           max_nonfinite_steps=self.max_nonfinite_steps)
        if self.batch_size <= 0 or self.grad_accum_steps <= 0:
            raise ValueError("batch_size and grad_accum_steps must be positive")
        if self.batch_size % self.grad_accum_steps:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by grad_accum_steps {self.grad_accum_steps}")
        coerce_enums(self)

    def total_steps(self, n_examples: int) -> int:
        if self.max_steps > 0:
            return self.max_steps
        return max(1, math.ceil(self.epochs * n_examples / self.batch_size))


FUSED_ADAMW_DEVICES = ("cpu", "cuda")
"""devices where torch's fused AdamW kernel runs (one kernel per parameter group instead of a Python loop over
parameters); on a 2-core CPU its step over a 148M-parameter model took a fraction of the default's (bench/adamw.py)"""


def make_optimizer_and_scheduler(model: torch.nn.Module, cfg: TrainConfig, total_steps: int):
    """AdamW (β = 0.9, 0.95; fused where every trainable parameter is a float tensor on a CPU or CUDA device, the
    same update to float rounding) and the config's learning-rate schedule over ``total_steps``."""
    params = [p for p in model.parameters() if p.requires_grad]
    fused = bool(params) and all(p.device.type in FUSED_ADAMW_DEVICES and p.is_floating_point() for p in params)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95), fused=fused or None)
    name = "constant_with_warmup" if cfg.scheduler == "constant" else cfg.scheduler
    sched = get_scheduler(name, opt, num_warmup_steps=min(cfg.warmup_steps, total_steps), num_training_steps=total_steps)
    return opt, sched


def global_batches(n_examples: int, batch_size: int, total_steps: int, seed: int, start_step: int = 0) -> Iterator[list[int]]:
    """Deterministic global batches of example indices: a fresh shuffle per epoch, the same on every process.

    The last incomplete batch of an epoch is dropped so every step sees ``batch_size`` examples.
    ``start_step`` skips ahead for a resumed run (the data position is the step count).
    """
    if n_examples < batch_size:
        raise ValueError(f"batch_size {batch_size} is larger than the {n_examples} examples available")
    per_epoch = n_examples // batch_size
    for step in range(start_step, total_steps):
        epoch, k = divmod(step, per_epoch)
        order = list(range(n_examples))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        yield order[k * batch_size:(k + 1) * batch_size]


def shard(indices: Sequence[int], grad_accum_steps: int, rank: int, world_size: int) -> list[list[int]]:
    """This process's micro-batches of a global batch: cut into accumulation steps, then across processes."""
    n = len(indices)
    if n % (grad_accum_steps * world_size):
        raise ValueError(f"global batch {n} is not divisible by grad_accum_steps×processes = {grad_accum_steps * world_size}")
    micro = n // grad_accum_steps
    per_rank = micro // world_size
    out = []
    for a in range(grad_accum_steps):
        chunk = indices[a * micro:(a + 1) * micro]
        out.append(list(chunk[rank * per_rank:(rank + 1) * per_rank]))
    return out


def token_loss_sum(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of next-token cross-entropy −log p(label_t | x_<t) over positions whose label is not -100.

    batch: input_ids (B, T), attention_mask (B, T), labels (B, T), optional position_ids (B, T); or the one
    unpadded row of ``data.collate.collate_sft_unpadded`` (view_index and view_source, no attention_mask),
    run with view attention so that each example attends to itself only.
    The output head runs only at the positions that predict a label (``models.token_logps``: no logits
    for prompt tokens or padding); log-probs in fp32 (bf16 log-softmax loses precision). Label 0 of a
    row is never predicted and never counts.
    """
    labels = batch["labels"]
    scored = labels != -100
    scored[:, 0] = False
    forward = {k: batch[k] for k in ("attention_mask", "position_ids") if k in batch}
    if "view_index" not in batch:
        return -scored_logprobs(model, batch["input_ids"], scored, labels=labels, **forward).sum()
    with view_attention(model):
        return -scored_logprobs(model, batch["input_ids"], scored, labels=labels,
                                token_views=(batch["view_index"], batch["view_source"]), **forward).sum()


def optimizer_step(guard: NonFiniteGuard, updates: Sequence[tuple], grad_clip: float, step: int | None = None,
                   loss: float | None = None) -> tuple[bool, list]:
    """Clip each model of ``updates`` = [(model, optimizer, scheduler), ...] to the global norm ``grad_clip``
    (0: no clipping), then step every optimizer and scheduler together unless ``loss`` or a norm is non-finite
    (``guard`` skips, counts, and raises ``TrainingDiverged`` at its limit); gradients are zeroed either way.
    ``step`` names the step in messages (None: the guard's count). Returns (applied, the norms: None where
    neither clipping nor the guard wants one)."""
    norms = [guard.grad_norm(model, grad_clip) for model, _, _ in updates]
    applied = guard.step(step, loss, norms, [(opt, sched) for _, opt, sched in updates])
    return applied, norms


# batch_loss(model, this process's micro-batch indices, the global batch's indices) → (loss, logged, metrics)
BatchLoss = Callable[[torch.nn.Module, list[int], list[int]], tuple[torch.Tensor, torch.Tensor, dict]]


def fit(model, n_examples: int, batch_loss: BatchLoss, cfg: TrainConfig, accelerator, log: JsonlLog, *, name: str,
        checkpoint=None, train_mode: bool = True, loss_denominator: Callable[[list[int]], float] | None = None,
        tokens: Callable[[list[int]], int] | None = None, unit: str = "samples", log_fields: dict | None = None,
        step_offset: int = 0) -> dict:
    """The supervised loop: minimise ``batch_loss`` over seeded global batches of ``n_examples`` examples.

    A global batch of ``cfg.batch_size`` indices (``global_batches``) is cut into ``grad_accum_steps``
    micro-batches split across processes (``shard``). ``batch_loss(model, mine, global_idx)`` gets ``model``
    as ``accelerator.prepare`` wrapped it (DDP syncs gradients only through its forward) and returns
    ``loss``, back-propagated: its micro-batch's share of the global batch's loss × processes (DDP
    averages), so the summed gradient is the global batch's whatever the split (module docstring). Then
    one ``optimizer_step``. The logged loss is Σ ``logged`` over micro-batches and processes /
    ``loss_denominator(global_idx)`` (default: the process count, so ``logged = loss.detach()`` logs the
    global mean): each stage keeps its own arithmetic for it, so its figures stay the same to the last digit.
    ``metrics`` (floats or detached 0-d tensors) are averaged over micro-batches, then processes, when logged.

    ``train_mode`` False: dropout off throughout (DPO's step-0 policy equals its reference); the model
    ends in eval mode. ``checkpoint`` (``checkpoints.LoopCheckpoint``): resumed from, saved every
    ``save_every`` steps; with ``keep_done`` a rerun returns the kept result without training again.
    Logs ``{**log_fields, step (+ step_offset), loss, **metrics, lr, grad_norm, [tokens_per_s,] <unit>_per_s,
    elapsed_s}``; returns ``final_<loss, metrics>``, ``train_steps``, ``train_<unit>``, [``train_tokens``,]
    ``train_runtime_s``, ``train_<unit>_per_s``, ``resumed_from_step`` and the guard's counts.
    """
    if is_sharded(accelerator) and any(is_peft(m) for m in model.modules()):
        # The adapter and the merged model are saved from the unsharded peft model (models.trainable.save_trained).
        raise NotImplementedError(f"{name}: LoRA under FSDP or DeepSpeed ZeRO-3 is not supported yet; "
                                  "train every weight (lora.r: 0) or run under DDP")
    total = cfg.total_steps(n_examples)
    opt, sched = make_optimizer_and_scheduler(model, cfg, total)
    # The scheduler is not passed to prepare(): accelerate would step it once per process per
    # step (it assumes sharded dataloaders), running the schedule N times too fast on N processes.
    objects = {"model": model, "opt": opt, "sched": sched}  # unwrapped: what a checkpoint holds
    # accelerate keeps every model and optimizer it prepared: a stage training several (the reward models) would
    # hold each one's optimizer state to the end, and under FSDP its clip_grad_norm_ compares the parameters of
    # each kept model with this one's (an error for two models of one shape). Dropped before this training.
    accelerator.free_memory()
    prepared, opt = accelerator.prepare(model, opt)
    prepared.train(train_mode)
    guard = NonFiniteGuard(name, cfg.max_nonfinite_steps, accelerator)
    controllers = {"nonfinite": guard}
    start, extra = checkpoint.resume(objects, controllers) if checkpoint is not None else (0, {})
    if extra.get("done"):
        prepared.eval()
        return extra["fit"]
    coll = Collective(accelerator)
    denominator = loss_denominator or (lambda idx: coll.world)
    t0 = time.time()
    seen = seen_before = extra.get("seen", 0)
    n_tokens = tokens_before = extra.get("tokens", 0)
    last = extra.get("last", {})
    bar = tqdm(total=total, initial=start, desc=name, disable=not accelerator.is_main_process)
    for step, idx in enumerate(global_batches(n_examples, cfg.batch_size, total, cfg.seed, start_step=start), start=start):
        micro = shard(idx, cfg.grad_accum_steps, coll.rank, coll.world)
        logged_sum = torch.zeros((), device=accelerator.device)
        per_micro = []  # each micro-batch's diagnostics, reduced only on the steps that log
        for m, mine in enumerate(micro):
            # DDP synchronises gradients at the last micro-batch's backward only
            with accelerator.no_sync(prepared) if m < len(micro) - 1 else contextlib.nullcontext():
                loss, logged, micro_metrics = batch_loss(prepared, mine, idx)
                accelerator.backward(loss)
            logged_sum = logged_sum + logged
            per_micro.append(micro_metrics)
        is_logged = step % cfg.log_every == 0 or step == total - 1  # the same steps on every process: collectives
        # The global batch's loss (a collective): every step when the guard decides on it, else on logged steps only.
        loss_value = float(coll.sum(logged_sum) / denominator(idx)) if guard.enabled or is_logged else None
        _, (grad_norm,) = optimizer_step(guard, [(prepared, opt, sched)], cfg.grad_clip, step + 1, loss_value)
        seen += len(idx)
        n_tokens += tokens(idx) if tokens is not None else 0
        bar.update(1)
        if is_logged:
            # Diagnostics become numbers here only (``float`` of a tensor waits for the device), and are averaged
            # in Python floats as always: float64 tensors would not do on CUDA (x / n is x · (1/n) there).
            metrics: dict = {}
            for micro_metrics in per_micro:
                for key, v in micro_metrics.items():
                    metrics[key] = metrics.get(key, 0.0) + float(v) / len(micro)
            last = {"loss": loss_value, **coll.mean_of(metrics)}
            elapsed = time.time() - t0
            rates = {"tokens_per_s": (n_tokens - tokens_before) / max(elapsed, 1e-9)} if tokens is not None else {}
            rates[f"{unit}_per_s"] = (seen - seen_before) / max(elapsed, 1e-9)
            log.write({**(log_fields or {}), "step": step_offset + step + 1, **last, "lr": sched.get_last_lr()[0],
                       "grad_norm": float(grad_norm) if grad_norm is not None else None, **rates, "elapsed_s": elapsed})
            bar.set_postfix(loss=f"{loss_value:.3f}")
        if checkpoint is not None:
            checkpoint.after_step(step + 1, total, objects, controllers,
                                  lambda: {"seen": seen, "tokens": n_tokens, "last": last})
    bar.close()
    runtime = time.time() - t0
    prepared.eval()
    result = {**{"final_" + k: v for k, v in last.items()}, "train_steps": total, f"train_{unit}": seen,
              **({"train_tokens": n_tokens} if tokens is not None else {}), "train_runtime_s": runtime,
              f"train_{unit}_per_s": (seen - seen_before) / max(runtime, 1e-9), "resumed_from_step": start,
              **guard.metrics()}
    if checkpoint is not None:
        checkpoint.save_done(total, {"model": model}, {"fit": result})
    return result


def train_lm(
    model,
    n_examples: int,
    collate: Callable[[list[int]], dict[str, torch.Tensor]],
    loss_tokens: Sequence[int],
    cfg: TrainConfig,
    accelerator,
    log: JsonlLog,
    progress_desc: str = "train",
    checkpoint=None,
) -> dict:
    """Next-token training (pretraining and SFT) by ``fit``, normalised by the global batch's loss tokens.

    ``collate(indices)`` builds a batch for those examples; ``loss_tokens[i]`` is the number of
    positions of example i that carry a loss (known up front, so no communication is needed to
    normalise): a micro-batch back-propagates its token-loss sum × processes / the global batch's
    loss tokens, and the logged loss is the summed token losses over those tokens.
    """
    world, device = accelerator.num_processes, accelerator.device

    def n_tokens(idx: list[int]) -> int:
        return sum(loss_tokens[i] for i in idx)

    def batch_loss(prepared, mine, idx):
        s = token_loss_sum(prepared, {k: v.to(device) for k, v in collate(mine).items()})
        return s * world / n_tokens(idx), s.detach(), {}

    return fit(model, n_examples, batch_loss, cfg, accelerator, log, name=progress_desc, checkpoint=checkpoint,
               loss_denominator=n_tokens, tokens=n_tokens)
