"""The stage contract: every stage is ``run(cfg, ctx)``, its config section and one :class:`StageContext`.

The pipeline makes the context (``rlhfkit.pipeline.run_stage``); a recipe finds in it where it
writes, its accelerator and log, and how to read the paths of its config (:meth:`StageContext.resolve`,
the one path rule of :mod:`rlhfkit.paths`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhfkit.config import ConfigError
from rlhfkit.io import JsonlLog
from rlhfkit.models.local import ModelNotFound, resolve_in_run
from rlhfkit.paths import STAGE_PREFIX, run_path, stage_hint
from rlhfkit.seeds import seeded_hint


@dataclass(frozen=True)
class StageContext:
    """What a stage's ``run(cfg, ctx)`` gets besides its config section."""

    out: Path
    """the run directory OUT"""
    stage_dir: Path
    """where the stage writes: OUT/<name>.partial, renamed to OUT/<name> once the stage is complete"""
    name: str
    """the stage's name (``ppo_safe``; the RL stages share one recipe)"""
    accelerator: Any = None
    """the stage's ``accelerate.Accelerator`` (``distributed.make_accelerator``), its trackers started"""
    log: JsonlLog | None = None
    """the stage's ``log.jsonl`` (opened at the first record, so a stage that logs nothing leaves no file)"""

    def resolve(self, value: str, default: str = "", key: str | None = None) -> Path:
        """The path a config value names (``default`` when the value is empty): ``stage:NAME[/sub]`` is
        OUT/NAME/sub, any other path is used as the loader left it. With ``key`` (the field's name) the path
        must exist: a :class:`ConfigError` names the field and the path tried otherwise."""
        value = str(value or default)
        path = run_path(self.out, value)
        if key is not None and not path.exists():
            stage = value[len(STAGE_PREFIX):].split("/")[0]
            why = f" (the output of the {stage} stage: run it first)" if value.startswith(STAGE_PREFIX) else ""
            raise ConfigError(f"{self.name}.{key}: {path}: file not found{why}{stage_hint(value, self.out)}"
                              f"{seeded_hint(value, self.out)}")
        return path

    def model(self, value: str, key: str) -> Path:
        """The Hugging Face directory a model reference names (``models.local.resolve_in_run``: ``stage:``
        paths, directories, .gguf files, ``package:``/``pkg:``, hub names); errors name the field ``key``."""
        if str(value).startswith(STAGE_PREFIX):
            self.resolve(value, key=key)  # a missing stage output: say which stage to run
        try:
            return resolve_in_run(value, self.out)
        except ModelNotFound as e:
            raise ModelNotFound(f"{self.name}.{key}: {e}") from None
