"""Atomic writes: nothing half-written is ever left behind looking complete.

A file is written to a temporary name in the same directory and renamed into place
(``os.replace`` is atomic on POSIX within one filesystem). A stage writes its whole output
directory under ``<name>.partial`` and renames it to ``<name>`` only when it is finished, so
the existence of ``OUT/<stage>/`` means the stage completed.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_write_jsonl(path: Path, records: Iterable[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))


def partial_dir(final: Path) -> Path:
    """Where a stage writes before it is complete."""
    final = Path(final)
    return final.with_name(final.name + ".partial")


def commit_dir(partial: Path, final: Path) -> None:
    """Rename a finished ``partial`` directory to ``final`` (replacing nothing: final must not exist)."""
    final = Path(final)
    if final.exists():
        raise FileExistsError(f"{final} already exists; refusing to overwrite a completed output")
    os.replace(partial, final)


def replace_dir(src: Path, dst: Path) -> None:
    """Atomically put directory ``src`` at ``dst``, removing an older ``dst`` (used for checkpoints)."""
    dst = Path(dst)
    if dst.exists():
        old = dst.with_name(dst.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old)
    else:
        os.replace(src, dst)


class RunLocked(RuntimeError):
    """Another rlhfkit run holds the output directory."""


class RunLock:
    """An OS file lock on ``OUT/.rlhfkit.lock`` for the life of a run: a second run on the same directory is
    refused at once; the kernel releases the lock when the process exits, crashes or is killed.

    Taken by the main process only (the processes of one torchrun launch share a run).
    """

    def __init__(self, out: Path):
        self.path = Path(out) / ".rlhfkit.lock"
        self._f = None

    def __enter__(self) -> "RunLock":
        import fcntl  # lazy: POSIX only, and every module imports io

        from rlhfkit.distributed import process_state  # lazy: torch and accelerate; io stays light

        if not process_state().is_main_process:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a+")
        try:
            fcntl.flock(self._f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._f.seek(0)
            holder = self._f.read().strip() or "unknown"
            self._f.close()
            self._f = None
            raise RunLocked(f"{self.path.parent} is in use by another rlhfkit run (pid {holder}); wait for it to "
                            f"finish or use another out=") from None
        self._f.seek(0)
        self._f.truncate()
        self._f.write(str(os.getpid()))
        self._f.flush()
        return self

    def __exit__(self, *exc) -> None:
        if self._f is not None:
            self._f.close()  # closing the descriptor releases the lock
            self._f = None


class JsonlLog:
    """Append-only ``log.jsonl``: one JSON object per training step, flushed as written.

    The file is opened at the first record, so a stage that logs nothing leaves no file.

    Given an ``accelerator`` with started trackers (``report_to``), every record written also
    goes to ``accelerator.log``: its numbers, at its ``step``. A record's text values label it
    and prefix its metric names (the reward stage's ``"model": "rm"`` logs ``rm/loss``), so the
    models of one stage do not overwrite each other's curves.
    """

    def __init__(self, path: Path, enabled: bool = True, accelerator=None):
        self.path = Path(path)
        self.enabled = enabled
        self.accelerator = accelerator
        self._f = None

    def write(self, record: dict) -> None:
        if self.enabled:
            if self._f is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._f = open(self.path, "a")
            self._f.write(json.dumps(record) + "\n")
            self._f.flush()
            if self.accelerator is not None and self.accelerator.trackers:
                self.accelerator.log(*tracker_values(record))

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def tracker_values(record: dict) -> tuple[dict[str, float], int | None]:
    """A log record as (numeric metrics, step) for ``accelerator.log``; see ``JsonlLog``."""
    prefix = "".join(f"{v}/" for k, v in record.items() if isinstance(v, str))
    numbers = {f"{prefix}{k}": v for k, v in record.items()
               if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
    step = record.get("step")
    return numbers, step if isinstance(step, int) else None


def read_jsonl_plain(path: Path) -> list[dict]:
    """Read a JSONL file this project wrote itself (no validation; use rlhfkit.data for user input)."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
