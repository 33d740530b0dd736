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

from rlhfkit.config import check_non_negative, check_positive, coerce_enums
from rlhfkit.nonfinite import NonFiniteGuard
from rlhfkit.io import JsonlLog
from rlhfkit.tracking import check_report_to, check_trackers_available, trackers_of
from rlhfkit.models.trainable import LoRAConfig


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


def _cpu_only() -> bool:
    # accelerate treats torchrun's LOCAL_RANK as a GPU launch unless told cpu=True; without it two CPU
    # processes each believe they are the only (main) process and race on the same files.
    return not torch.cuda.is_available()


def process_state():
    """The shared distributed state (rank, world size, barriers); gloo on CPU under torchrun."""
    from accelerate import PartialState

    return PartialState(cpu=_cpu_only())


def make_accelerator(cfg: TrainConfig | None = None, project_dir=None):
    """One Accelerator per stage: single process by default, DDP/FSDP/DeepSpeed under ``accelerate launch``.

    Every Accelerator and PartialState in the project is made here or by ``process_state``: the
    state is a process-wide singleton and the first construction decides the backend.
    With ``cfg.report_to`` trackers and a ``project_dir`` (where tensorboard writes its event
    files), the accelerator logs to them once its caller runs ``init_trackers``; without a
    ``project_dir`` the caller tracks nothing and ``report_to`` is not used.
    """
    from accelerate import Accelerator

    mp = getattr(cfg, "mixed_precision", "auto")
    if mp == "auto":
        mp = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    trackers = trackers_of(cfg) if project_dir is not None else []
    if not trackers:
        return Accelerator(mixed_precision=mp, cpu=_cpu_only())
    acc = Accelerator(mixed_precision=mp, cpu=_cpu_only(), log_with=trackers, project_dir=str(project_dir))
    check_trackers_available(trackers, acc.log_with)
    return acc


class Collective:
    """Sums, means and gathers over the processes of ``accelerator``; the identity in one process.

    For recipes whose batch is sharded by hand (RL: each process samples and scores its own
    prompts), so statistics of the batch (whitening, KL, cost, logs) are those of the whole batch.
    """

    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.world, self.rank = accelerator.num_processes, accelerator.process_index

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.world == 1 else self.accelerator.reduce(t.detach().clone(), reduction="sum")

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.world == 1 else self.sum(t) / self.world

    def mean_of(self, values: dict[str, float]) -> dict[str, float]:
        """Each value averaged over processes (every process passes the same keys); unchanged in one process."""
        if self.world == 1:
            return values
        keys = sorted(values)
        return dict(zip(keys, self.mean(torch.tensor([values[k] for k in keys], dtype=torch.float64)).tolist()))

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate equal-shaped (B, ...) shards in rank order."""
        return t if self.world == 1 else self.accelerator.gather(t.detach().contiguous())


def make_optimizer_and_scheduler(model: torch.nn.Module, cfg: TrainConfig, total_steps: int):
    from transformers import get_scheduler

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
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
    """Sum of next-token cross-entropy over positions whose label is not -100.

    batch: input_ids (B, T), attention_mask (B, T), labels (B, T), optional position_ids (B, T).
    Logits are upcast to float32 before the softmax (bf16 log-softmax loses precision).
    """
    kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if "position_ids" in batch:
        kwargs["position_ids"] = batch["position_ids"]
    logits = model(**kwargs).logits[:, :-1].float()  # (B, T-1, V): position t predicts token t+1
    labels = batch["labels"][:, 1:]  # (B, T-1)
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100, reduction="sum"
    )


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
    """Next-token training (pretraining and SFT): the loop, with exact global-token normalisation.

    ``collate(indices)`` builds a batch for those examples; ``loss_tokens[i]`` is the number of
    positions of example i that carry a loss (known up front, so no communication is needed to
    normalise). ``checkpoint`` (a ``checkpoints.LoopCheckpoint``): resume from it, save to it every
    ``cfg.save_every`` steps. Returns final metrics.
    """
    from tqdm.auto import tqdm

    total = cfg.total_steps(n_examples)
    opt, sched = make_optimizer_and_scheduler(model, cfg, total)
    # The scheduler is not passed to prepare(): accelerate would step it once per process per
    # step (it assumes sharded dataloaders), running the schedule N times too fast on N processes.
    objects = {"model": model, "opt": opt, "sched": sched}  # unwrapped: what a checkpoint holds
    model, opt = accelerator.prepare(model, opt)
    model.train()
    guard = NonFiniteGuard(progress_desc, cfg.max_nonfinite_steps, accelerator)
    controllers = {"nonfinite": guard}
    start, extra = checkpoint.resume(objects, controllers) if checkpoint is not None else (0, {})
    world, rank = accelerator.num_processes, accelerator.process_index
    t0 = time.time()
    tokens_seen = tokens_before = extra.get("tokens_seen", 0)
    samples_seen = samples_before = extra.get("samples_seen", 0)
    last_loss = extra.get("last_loss", float("nan"))
    bar = tqdm(total=total, initial=start, desc=progress_desc, disable=not accelerator.is_main_process)
    for step, idx in enumerate(global_batches(n_examples, cfg.batch_size, total, cfg.seed, start_step=start), start=start):
        n_global = sum(loss_tokens[i] for i in idx)
        micro_batches = shard(idx, cfg.grad_accum_steps, rank, world)
        loss_sum_local = torch.zeros((), device=accelerator.device)
        for m, mb in enumerate(micro_batches):
            batch = {k: v.to(accelerator.device) for k, v in collate(mb).items()}
            sync = m == len(micro_batches) - 1
            ctx = accelerator.no_sync(model) if not sync else contextlib.nullcontext()
            with ctx:
                s = token_loss_sum(model, batch)
                accelerator.backward(s * world / n_global)
            loss_sum_local += s.detach()
        grad_norm = guard.grad_norm(model, cfg.grad_clip)
        last_loss = (accelerator.reduce(loss_sum_local, reduction="sum") / n_global).item()
        guard.step(step + 1, last_loss, [grad_norm], [(opt, sched)])
        tokens_seen += n_global
        samples_seen += len(idx)
        bar.update(1)
        if step % cfg.log_every == 0 or step == total - 1:
            elapsed = time.time() - t0
            log.write({
                "step": step + 1,
                "loss": last_loss,
                "lr": sched.get_last_lr()[0],
                "grad_norm": float(grad_norm) if grad_norm is not None else None,
                "tokens_per_s": (tokens_seen - tokens_before) / max(elapsed, 1e-9),
                "samples_per_s": (samples_seen - samples_before) / max(elapsed, 1e-9),
                "elapsed_s": elapsed,
            })
            bar.set_postfix(loss=f"{last_loss:.3f}")
        if checkpoint is not None:
            checkpoint.after_step(step + 1, total, objects, controllers, lambda: {
                "tokens_seen": tokens_seen, "samples_seen": samples_seen, "last_loss": last_loss})
    bar.close()
    runtime = time.time() - t0
    model.eval()
    return {
        "final_loss": last_loss,
        "train_steps": total,
        "train_samples": samples_seen,
        "train_tokens": tokens_seen,
        "train_runtime_s": runtime,
        "train_samples_per_s": (samples_seen - samples_before) / max(runtime, 1e-9),
        "resumed_from_step": start,
        **guard.metrics(),
    }
