"""Experiment tracking through accelerate's trackers (TensorBoard, Weights & Biases, Trackio).

A stage's ``report_to`` names the trackers; ``distributed.make_accelerator`` hands them to
``accelerate.Accelerator`` with the stage's ``tracking/`` directory, the pipeline starts and
ends them around the stage, and ``io.JsonlLog`` forwards every record it writes, so each
metric in ``log.jsonl`` reaches the trackers from that one place.
"""
from __future__ import annotations

from typing import Sequence

from rlhfkit.config import to_dict

TRACKERS = ("tensorboard", "wandb", "trackio")
"""accelerate's tracker names ``report_to`` accepts (besides ``none``)"""
_TRACKER_PACKAGES = {"tensorboard": "tensorboard or tensorboardX", "wandb": "wandb", "trackio": "trackio"}


def check_report_to(report_to: Sequence[str]) -> None:
    """``report_to``: known tracker names, or ``none`` alone (a ValueError naming the key otherwise)."""
    unknown = [t for t in report_to if t not in (*TRACKERS, "none")]
    if unknown:
        raise ValueError(f"report_to: unknown tracker(s) {unknown}; choose from {', '.join(TRACKERS)} or none")
    if "none" in report_to and len(report_to) > 1:
        raise ValueError(f"report_to: 'none' cannot be combined with trackers, got {list(report_to)}")


def trackers_of(cfg) -> list[str]:
    """The trackers ``cfg.report_to`` names (none for a config without the key)."""
    return [t for t in getattr(cfg, "report_to", ()) if t != "none"]


def tracker_config(cfg) -> dict:
    """A config as the flat ``{"a.b": scalar}`` dict trackers store as hyperparameters (lists as text, None dropped)."""
    flat: dict = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}{k}.", v)
        elif isinstance(value, list):
            flat[prefix[:-1]] = ", ".join(str(v) for v in value)
        elif value is not None:
            flat[prefix[:-1]] = value

    walk("", to_dict(cfg))
    return flat


def check_trackers_available(wanted: Sequence[str], available) -> None:
    """accelerate drops a tracker whose package is missing with only a debug message: fail instead."""
    names = {str(kind) for kind in available}
    missing = [t for t in wanted if t not in names]
    if missing:
        raise RuntimeError(f"report_to: {', '.join(missing)} needs {' and '.join(_TRACKER_PACKAGES[t] for t in missing)} installed")


def start_tracking(accelerator, name: str, cfg) -> None:
    """Start the accelerator's trackers (if any) for stage ``name``, with ``cfg`` as its hyperparameters."""
    if accelerator.log_with:
        accelerator.init_trackers(name, config=tracker_config(cfg))


def end_tracking(accelerator) -> None:
    """Close the trackers ``start_tracking`` started (flushing their files).

    Not ``accelerator.end_training()``: that also destroys the process group, which the
    pipeline's later stages (one process, several stages) still need under torchrun.
    """
    for tracker in accelerator.trackers:
        tracker.finish()
    accelerator.trackers.clear()
