"""Processes and devices, through ``accelerate``: the one place an Accelerator or PartialState is made,
and the collectives of recipes that shard their batch by hand.

One process by default; DDP, FSDP or DeepSpeed under ``accelerate launch`` / ``torchrun``, the same
recipe code either way (no ``.cuda()`` anywhere else).
"""
from __future__ import annotations

import os

import torch
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from torch.distributed.fsdp import CPUOffloadPolicy
from torch.distributed.tensor import DTensor

from rlhfkit.models.precision import resolve_mixed_precision
from rlhfkit.tracking import check_trackers_available, trackers_of


def _cpu_only() -> bool:
    # accelerate treats torchrun's LOCAL_RANK as a GPU launch unless told cpu=True; without it two CPU
    # processes each believe they are the only (main) process and race on the same files.
    return not torch.cuda.is_available()


def process_state():
    """The shared distributed state (rank, world size, barriers); gloo on CPU under torchrun."""
    return PartialState(cpu=_cpu_only())


def make_accelerator(cfg=None, project_dir=None):
    """One Accelerator per stage: single process by default, DDP/FSDP/DeepSpeed under ``accelerate launch``.

    ``cfg``: a stage config (``training.TrainConfig`` or an RL config: ``mixed_precision``, ``report_to``).
    Every Accelerator and PartialState in the project is made here or by ``process_state``: the
    state is a process-wide singleton and the first construction decides the backend.
    With ``cfg.report_to`` trackers and a ``project_dir`` (where tensorboard writes its event
    files), the accelerator logs to them once its caller runs ``init_trackers``; without a
    ``project_dir`` the caller tracks nothing and ``report_to`` is not used.
    """
    mp = resolve_mixed_precision(getattr(cfg, "mixed_precision", "auto"))
    _new_state_if_precision_changes(mp)
    trackers = trackers_of(cfg) if project_dir is not None else []
    if not trackers:
        return _fsdp_on_cpu(refuse_deepspeed(Accelerator(mixed_precision=mp, cpu=_cpu_only())))
    acc = refuse_deepspeed(Accelerator(mixed_precision=mp, cpu=_cpu_only(), log_with=trackers, project_dir=str(project_dir)))
    check_trackers_available(trackers, acc.log_with)
    return _fsdp_on_cpu(acc)


def _new_state_if_precision_changes(mp: str) -> None:
    """accelerate keeps one AcceleratorState per process and refuses an Accelerator with another
    ``mixed_precision`` than the first one's; a pipeline's stages each set their own (full-precision data and
    label stages, a bf16 SFT). When the precision changes, the state is rebuilt from the environment as
    accelerate's own tests do between cases; the process group (``PartialState``) is kept."""
    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision") != mp:
        AcceleratorState._reset_state(reset_partial_state=False)


def refuse_deepspeed(acc):
    """``acc``, unless ``accelerate launch`` asked for DeepSpeed, which rlhfkit's loops do not run yet: a clear error
    at the stage's start instead of a wrong or crashing run. DeepSpeed steps and rescales inside its own
    ``backward`` (bypassing the loop's accumulation weights and the non-finite guard), its ``prepare`` wants a
    micro-batch size from a dataloader the loops do not give it, and ZeRO-3's gather needs its engine object.
    ``configs/accelerate/zero{2,3}.yaml`` are shipped and parsed for when it does (docs/scale.md)."""
    if acc.distributed_type == DistributedType.DEEPSPEED:
        raise NotImplementedError("DeepSpeed (accelerate launch with a deepspeed config) is not supported by rlhfkit's "
                                  "training loops yet; use configs/accelerate/fsdp2.yaml (sharded) or ddp.yaml (docs/scale.md)")
    return acc


def _fsdp_on_cpu(acc):
    """CPU shim: FSDP2 over gloo when ``accelerate launch`` asked for FSDP on a machine without CUDA.

    accelerate (1.15) makes an FSDP state only from a GPU-like multi-process state: with ``cpu=True`` it
    settles on MULTI_CPU (DDP over gloo) and silently drops the FSDP plugin, so the FSDP test would test
    DDP. torch's FSDP2 (``fully_shard``) itself runs on CPU tensors over gloo, through accelerate's own
    ``prepare``, once the state says FSDP. So, only when there is no CUDA, several processes, and the
    launcher's ``ACCELERATE_USE_FSDP=true`` (set with the FSDP_* variables the plugin reads in its
    ``__post_init__``), the plugin is built from the environment and the state promoted to FSDP.
    Every other case is left exactly as accelerate made it. FSDP1 is refused (it needs a GPU), and so is
    parameter offload (torch's CPUOffloadPolicy moves shards to an accelerator to compute; on CPU processes
    they are in host memory already).
    """
    if not (_cpu_only() and acc.num_processes > 1 and acc.distributed_type == DistributedType.MULTI_CPU
            and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"):
        return acc
    plugin = FullyShardedDataParallelPlugin()  # from the FSDP_* environment variables the launcher set
    if plugin.fsdp_version != 2:
        raise ValueError(f"FSDP version {plugin.fsdp_version} on CPU: only FSDP2 (fsdp_version: 2, torch's "
                         "fully_shard) runs on CPU processes; use configs/accelerate/fsdp2.yaml")
    if isinstance(plugin.cpu_offload, CPUOffloadPolicy):
        raise ValueError("FSDP parameter offload (fsdp_offload_params: true) on CPU: the parameters are in host "
                         "memory already; use configs/accelerate/fsdp2.yaml")
    if acc.mixed_precision != "no":  # as AcceleratorState.__init__ does when it makes an FSDP state
        plugin.set_mixed_precision(acc.mixed_precision)
    acc.state.distributed_type = DistributedType.FSDP
    acc.state.fsdp_plugin = plugin
    # As AcceleratorState.__init__ does for FSDP: each later AcceleratorState() (an AcceleratedOptimizer makes
    # one) copies PartialState's fields over its own, which would turn the state back into MULTI_CPU.
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    return acc


def is_sharded(accelerator) -> bool:
    """Whether ``accelerator``'s engine shards the parameters (FSDP, DeepSpeed ZeRO-3): a process then holds
    a part of each weight, so saving gathers (``gathered_state_dict``) and a model is not copied or read as is.
    False for None (a recipe called as a library function without an accelerator)."""
    engine = getattr(accelerator, "distributed_type", None)
    if engine == DistributedType.DEEPSPEED:
        return accelerator.state.deepspeed_plugin.zero_stage == 3
    return engine == DistributedType.FSDP


def engine_checkpoints_activations(accelerator) -> bool:
    """Whether ``accelerator.prepare`` will wrap the model's layers for activation checkpointing (FSDP's
    ``activation_checkpointing``): a stage deciding before ``prepare`` whether its model can run view
    attention asks this (a checkpointed layer re-runs in backward, outside the view attention context)."""
    plugin = getattr(accelerator.state, "fsdp_plugin", None) if accelerator.distributed_type == DistributedType.FSDP else None
    return bool(plugin is not None and plugin.activation_checkpointing)


def gathered_state_dict(accelerator, model) -> dict | None:
    """For saving a prepared ``model``: under a sharding engine, its full state dict gathered onto the main
    process, on CPU (accelerate's ``get_state_dict``: torch's full state dict under FSDP2, the 16-bit
    consolidation under ZeRO-3); None otherwise (save the model itself). A collective under a sharding
    engine: every process must call it, the same number of times."""
    return accelerator.get_state_dict(model) if is_sharded(accelerator) else None


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole of a parameter that FSDP2 may hold as a DTensor shard (then a collective: every process calls
    it); any other tensor as it is."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def refuse_sharded(accelerator, stage: str) -> None:
    """Stop ``stage`` before it loads anything when the engine shards parameters: its code reads or copies
    the model outside the prepared forward (generation, a reference copy, a critic), which FSDP and ZeRO-3
    do not allow as written."""
    if is_sharded(accelerator):
        raise NotImplementedError(f"{stage}: not supported under FSDP or DeepSpeed ZeRO-3 yet (it generates with "
                                  "or copies the model outside its training forward); run it under DDP "
                                  "(configs/accelerate/ddp.yaml), with LoRA and bf16 for a large model (docs/scale.md)")


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
