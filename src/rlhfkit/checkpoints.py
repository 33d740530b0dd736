"""Mid-stage checkpoints: one implementation for every training loop (pretrain, SFT, the reward models,
DPO, DNO, PPO/GRPO/RLOO).

A stage running in ``OUT/<stage>.partial`` keeps its resume state in ``OUT/<stage>.ckpt`` (one seed's run of a
seeded stage in ``OUT/<stage>.ckpt/seed_<s>``): outside the partial directory, which a restarted stage wipes;
``pipeline.run_stage`` removes it once the stage is complete. A checkpoint directory holds

- ``meta.json``: the step it was taken after (the data position: ``training.global_batches(start_step=)``
  skips ahead to it), the config it was written under (a checkpoint of another config is refused),
  ``extra`` (JSON the loop needs besides: counters, a finished model's metrics, DNO's pair history),
  and ``files``, the subdirectory holding the rest:
- ``<files>/state.pt``: the state dicts of the model (a peft-wrapped model's includes its adapters),
  the optimizer(s) and scheduler(s), the controllers (KL coefficient, Lagrange multiplier, the
  non-finite guard) and the RNG states (Python, torch CPU, CUDA); tensors and plain containers only,
  loaded with ``weights_only`` (no pickle);
- ``<files>/log.jsonl``: the stage's log as it was at that step. It replaces the log on resume, so the
  lines of steps after the checkpoint are redone, not duplicated.

Atomic at every instant: a new checkpoint's files go to a fresh subdirectory, then ``meta.json`` is
replaced (one ``os.replace``) to point at them, and only then are older subdirectories removed. A kill
at any moment leaves a ``meta.json`` that names complete files. (Renaming a whole checkpoint directory
over the old one cannot do that: between moving the old one aside and the new one in there is none.)

A resumed run ends with the weights of an uninterrupted one, bit for bit on CPU (tests/test_resume.py).

Not under an engine that shards the model or optimizer state (FSDP, DeepSpeed): the state dicts above would
be the first process's shards. There no checkpoint is written (``save_every`` is ignored, with a note), and a
checkpoint found on disk or ``stop_after_steps`` is refused with an error rather than half-restored.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Callable

import torch

from rlhfkit.config import ConfigError, to_dict
from rlhfkit.distributed import is_sharded
from rlhfkit.io import atomic_write_json

# Keys that say when to stop or save, not what is computed: a rerun that changes them still resumes.
NOT_COMPARED = ("stop_after_steps", "save_every", "max_nonfinite_steps")


class StoppedEarly(RuntimeError):
    """Raised after ``stop_after_steps`` steps: the stage is not complete and must not be committed."""


def checkpoint_dir(stage_dir: str | Path) -> Path | None:
    """``OUT/<stage>.ckpt`` for a stage running in ``OUT/<stage>.partial``, and ``OUT/<stage>.ckpt/seed_<s>``
    for one seed's run of a seeded stage (``OUT/<stage>.partial/seed_<s>``, ``rlhfkit.seeds``); None for any
    other directory (a recipe called as a library function, or inside another stage, keeps no checkpoints)."""
    stage_dir = Path(stage_dir)
    if re.fullmatch(r"seed_-?\d+", stage_dir.name) and stage_dir.parent.name.endswith(".partial"):
        return checkpoint_dir(stage_dir.parent) / stage_dir.name
    if not stage_dir.name.endswith(".partial"):
        return None
    return stage_dir.with_name(stage_dir.name.removesuffix(".partial") + ".ckpt")


def checkpoint_config(cfg, **identity) -> dict:
    """What a checkpoint must have been written under to be resumed: the stage's config (less
    ``NOT_COMPARED``) and ``identity`` (which model of the stage, which DNO iteration)."""
    return {k: v for k, v in to_dict(cfg).items() if k not in NOT_COMPARED} | identity


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(ckpt: Path, step: int, objects: dict, controllers: dict, log_path: Path | None, config: dict,
                    extra: dict | None = None) -> None:
    """Everything a resumed run needs, in a fresh subdirectory of ``ckpt`` that ``meta.json`` then points to.

    ``objects`` and ``controllers``: name → anything with ``state_dict()`` (None entries are skipped);
    pass the unwrapped model, not its DDP wrapper.
    """
    ckpt = Path(ckpt)
    files = ckpt / f"step-{step:08d}-{time.time_ns()}"  # never the name of the files meta.json points to now
    tmp = files.with_name(files.name + ".partial")
    tmp.mkdir(parents=True)
    state = {name: obj.state_dict() for name, obj in objects.items() if obj is not None}
    state["controllers"] = {name: c.state_dict() for name, c in controllers.items() if c is not None}
    state["rng"] = rng_state()
    torch.save(state, tmp / "state.pt")
    if log_path is not None and Path(log_path).exists():
        shutil.copyfile(log_path, tmp / "log.jsonl")
    os.replace(tmp, files)
    atomic_write_json(ckpt / "meta.json", {"step": step, "config": config, "extra": extra or {}, "files": files.name})
    for old in ckpt.iterdir():  # earlier checkpoints, and the leftovers of a save that was killed
        if old.is_dir() and old != files:
            shutil.rmtree(old, ignore_errors=True)


def read_meta(ckpt: Path) -> dict | None:
    """A checkpoint's ``meta.json`` (step, config, extra, files), or None when there is none."""
    meta_path = Path(ckpt) / "meta.json"
    return json.loads(meta_path.read_text()) if meta_path.exists() else None


def load_checkpoint(ckpt: Path, objects: dict, controllers: dict, log_path: Path | None, config: dict) -> int:
    """Restore a checkpoint into ``objects``/``controllers`` and the RNGs; returns the step it was taken
    after (0 if there is none). Objects absent from the checkpoint are left as they are.

    The checkpoint's log replaces ``log_path`` (None: leave the log alone, as every process but the first does).
    """
    ckpt = Path(ckpt)
    meta = read_meta(ckpt)
    if meta is None:
        return 0
    if meta["config"] != config:
        changed = sorted(k for k in set(meta["config"]) | set(config) if meta["config"].get(k) != config.get(k))
        raise ConfigError(f"{ckpt / 'meta.json'}: checkpoint was written with a different config "
                          f"({', '.join(changed)}); remove {ckpt} to start the stage over")
    files = ckpt / meta["files"]
    state = torch.load(files / "state.pt", weights_only=True)  # no pickle: tensors, numbers, tuples only
    for name, obj in objects.items():
        if obj is not None and name in state:
            obj.load_state_dict(state[name])
    for name, c in controllers.items():
        if c is not None and name in state["controllers"]:
            c.load_state_dict(state["controllers"][name])
    set_rng_state(state["rng"])
    if log_path is not None and (files / "log.jsonl").exists():
        # Rewrites the file in place: a log opened for appending keeps appending to it.
        shutil.copyfile(files / "log.jsonl", log_path)
    return int(meta["step"])


class LoopCheckpoint:
    """The checkpoints of one training loop: ``resume`` before the first step, ``after_step`` after each.

    ``path`` None (``checkpoint_dir`` of a directory that is not a stage's) keeps none. ``cfg`` gives
    ``save_every`` and ``stop_after_steps`` (0: never) and, with ``identity``, the config a checkpoint
    must match. ``log`` is the loop's ``JsonlLog``; ``name`` labels the console line of a resume, which
    counts ``unit``s (steps; DNO's outer loop counts iterations). ``keep_done``: a loop that ran to the end
    keeps its trained model here (``save_done``), for a stage that trains several (the reward models).
    """

    def __init__(self, path: Path | None, cfg, accelerator, log=None, name: str = "", unit: str = "step",
                 keep_done: bool = False, **identity):
        self.path = Path(path) if path is not None else None
        self.every = getattr(cfg, "save_every", 0)
        self.stop_after = getattr(cfg, "stop_after_steps", 0)
        self.config = checkpoint_config(cfg, **identity)
        self.accelerator, self.log, self.name, self.unit, self.keep_done = accelerator, log, name, unit, keep_done
        # a sharding engine holds each process's shard in the state dicts (module docstring): none is written there
        self.sharded = is_sharded(accelerator)

    @property
    def enabled(self) -> bool:
        """Whether checkpoints are written (a stage's directory, ``save_every`` > 0, no sharding engine)."""
        return self.path is not None and self.every > 0 and not self.sharded

    def _refuse_sharded(self) -> None:
        """Under FSDP / DeepSpeed: an error for a checkpoint on disk or ``stop_after_steps``, a note that none is written."""
        engine = self.accelerator.distributed_type.value
        if read_meta(self.path) is not None:
            raise ConfigError(f"{self.name}: {self.path} holds a checkpoint, and resuming under {engine} is not "
                              f"supported; resume without it, or remove {self.path} to start the stage over")
        if self.stop_after:
            raise ConfigError(f"{self.name}: stop_after_steps needs mid-stage checkpoints, which are not written "
                              f"under {engine}")
        if self.every and self.accelerator.is_main_process:
            print(f"[rlhfkit] {self.name}: no mid-stage checkpoints under {engine} (save_every ignored): "
                  "an interrupted stage starts over", flush=True)

    def _log_path(self) -> Path | None:
        return self.log.path if self.log is not None and self.log.enabled else None

    def resume(self, objects: dict, controllers: dict) -> tuple[int, dict]:
        """(steps done, the checkpoint's ``extra``) after restoring the checkpoint, or (0, {}) without one."""
        if self.path is None:
            return 0, {}
        if self.sharded:
            self._refuse_sharded()
            return 0, {}
        start = load_checkpoint(self.path, objects, controllers, self._log_path(), self.config)
        if not start:
            return 0, {}
        extra = read_meta(self.path)["extra"]
        if self.accelerator.is_main_process:
            print(f"[rlhfkit] {self.name}: " + (f"trained to the end before the restart ({self.path}), not trained again"
                                                if extra.get("done") else f"resuming from {self.path} after {self.unit} {start}"),
                  flush=True)
        return start, extra

    def save(self, step: int, objects: dict, controllers: dict, extra: dict | None = None) -> None:
        """Write a checkpoint now (the first process writes; every process waits for it)."""
        if self.accelerator.is_main_process:
            save_checkpoint(self.path, step, objects, controllers, self._log_path(), self.config, extra)
        self.accelerator.wait_for_everyone()

    def after_step(self, done: int, total: int, objects: dict, controllers: dict,
                   extra: Callable[[], dict] | None = None) -> None:
        """After optimizer step ``done`` of ``total``: a checkpoint every ``save_every`` steps (and at
        ``stop_after_steps``), then ``StoppedEarly`` at ``stop_after_steps``. ``extra`` is called only to save."""
        if self.path is None or self.sharded or done >= total:
            return
        if self.every and (done % self.every == 0 or done == self.stop_after):
            self.save(done, objects, controllers, extra() if extra else None)
        if self.stop_after and done >= self.stop_after:
            raise StoppedEarly(f"{self.name}: stopped after step {done} (stop_after_steps); rerun to resume from {self.path}")

    def save_done(self, total: int, objects: dict, extra: dict) -> None:
        """Keep a loop that ran to the end (``objects``: the trained model) so a restarted stage does not
        train it again: ``resume`` then returns ``extra`` with ``done: true`` (with ``keep_done``, when checkpoints are on)."""
        if self.enabled and self.keep_done:
            self.save(total, objects, {}, {**extra, "done": True})

    def remove(self) -> None:
        if self.path is not None and self.accelerator.is_main_process:
            shutil.rmtree(self.path, ignore_errors=True)
