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


def run_path(out: Path, rel: str | Path) -> Path:
    """A path from a config: absolute as given, otherwise relative to the run's directory ``out``."""
    p = Path(rel)
    return p if p.is_absolute() else Path(out) / p


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


class JsonlLog:
    """Append-only ``log.jsonl``: one JSON object per training step, flushed as written."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._f = open(self.path, "a")

    def write(self, record: dict) -> None:
        if self.enabled:
            self._f.write(json.dumps(record) + "\n")
            self._f.flush()

    def close(self) -> None:
        if self.enabled:
            self._f.close()


def read_jsonl_plain(path: Path) -> list[dict]:
    """Read a JSONL file this project wrote itself (no validation; use rlhfkit.data for user input)."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
