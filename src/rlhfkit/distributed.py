"""Processes and devices, through ``accelerate``: the one place an Accelerator or PartialState is made,
and the collectives of recipes that shard their batch by hand.

One process by default; DDP, FSDP or DeepSpeed under ``accelerate launch`` / ``torchrun``, the same
recipe code either way (no ``.cuda()`` anywhere else).
"""
from __future__ import annotations

import torch
from accelerate import Accelerator, PartialState

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
