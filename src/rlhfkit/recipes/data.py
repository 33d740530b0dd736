"""The data stage: the embedded task's files, written into the stage directory (OUT/data/).

``pretrain.jsonl`` (the corpus), ``sft.jsonl`` (demonstrations), ``prompts.jsonl`` (RL and
labeling prompts, with the oracle's ``meta``) and ``heldout.jsonl`` (evaluation prompts), from
``TaskConfig``'s seed: the same config writes the same files.
"""
from __future__ import annotations

from pathlib import Path

from rlhfkit.stage import StageContext
from rlhfkit.tasks.arith_data import TaskConfig, write_task_data


def run(cfg: TaskConfig, ctx: StageContext) -> dict:
    if not ctx.accelerator.is_main_process:
        return {}
    paths = write_task_data(ctx.stage_dir, cfg)
    return {"files": {k: Path(v).name for k, v in paths.items()}}
