"""Which config class a YAML file in ``configs/`` is for.

A file is a pipeline config unless one of its leading comment lines says otherwise:
``# rlhfkit-config: module:Class`` (judge configs, for example).
"""
from __future__ import annotations

import importlib
from pathlib import Path


def config_class_for(path: str | Path) -> type:
    for line in Path(path).read_text().splitlines():
        if not line.startswith("#"):
            break
        if line.startswith("# rlhfkit-config:"):
            module, cls = line.split(":", 1)[1].strip().split(":")
            return getattr(importlib.import_module(module), cls)
    from rlhfkit.pipeline import PipelineConfig  # lazy: it imports every recipe and torch

    return PipelineConfig
