"""``rlhfkit data|pretrain|sft|eval [CONFIG] [key=value ...]``: run one pipeline stage.

Overrides may drop the stage's section: ``rlhfkit sft model=DIR data=FILE out=DIR lr=1e-4``
means ``sft.model=DIR sft.data=FILE out=DIR sft.lr=1e-4``. Paths given here resolve against the
working directory; ``stage:NAME/...`` names a stage's output in ``out``.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from rlhfkit.io import RunLock


def add_arguments(p) -> None:
    p.add_argument("config", nargs="?", help="pipeline YAML file (default: built-in defaults)")
    p.add_argument("overrides", nargs="*", help="key=value overrides")


def run(args) -> int:
    # lazy: the pipeline imports every recipe and torch, which this command's --help does not need
    from rlhfkit.pipeline import STAGES, PipelineConfig, load_pipeline_config, run_stage

    stage = args.command
    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config:
        overrides.insert(0, config)
        config = None
    top = {f.name for f in dataclasses.fields(PipelineConfig)}
    qualified = []
    for o in overrides:
        key = o.split("=", 1)[0]
        qualified.append(o if key.split(".")[0] in top else f"{STAGES[stage].section}.{o}")
    cfg = load_pipeline_config(config, qualified)
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    with RunLock(Path(cfg.out)):
        run_stage(cfg, stage, Path(cfg.out))
    return 0
