"""Reading user data: JSONL, JSONL.gz, JSON, Parquet and ``datasets.save_to_disk`` directories.

Every record keeps where it came from (``file:line`` or ``file:record N``) so that a bad
record is reported by location, before any training starts.
"""
from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping


class DataError(ValueError):
    """Bad input data; the message names the file and line (or record)."""


@dataclass(frozen=True)
class Located:
    """A raw record and where it was read from (for error messages)."""

    record: dict
    where: str


def _iter_jsonl(path: Path) -> Iterator[Located]:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            yield Located(obj, f"{path}:{lineno}")


def iter_records(path: str | Path) -> Iterator[Located]:
    """Yield the records of a data file or a ``datasets`` directory, each with its location."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    name = path.name
    if path.is_dir():
        if not (path / "dataset_info.json").exists() and not (path / "state.json").exists():
            raise DataError(f"{path}: a directory must be a dataset saved with datasets.save_to_disk")
        import datasets

        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            raise DataError(f"{path}: a DatasetDict; point at one split's directory ({', '.join(ds)})")
        for i, rec in enumerate(ds):
            yield Located(dict(rec), f"{path}:record {i}")
    elif name.endswith(".jsonl") or name.endswith(".jsonl.gz"):
        yield from _iter_jsonl(path)
    elif name.endswith(".json"):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
        if not isinstance(data, list):
            raise DataError(f"{path}: a .json data file must hold a list of objects")
        for i, rec in enumerate(data):
            if not isinstance(rec, dict):
                raise DataError(f"{path}:record {i}: expected a JSON object")
            yield Located(rec, f"{path}:record {i}")
    elif name.endswith(".parquet"):
        import pyarrow.parquet as pq

        for i, rec in enumerate(pq.read_table(path).to_pylist()):
            yield Located(rec, f"{path}:record {i}")
    else:
        raise DataError(f"{path}: unknown data format (use .jsonl, .jsonl.gz, .json, .parquet or a datasets directory)")


def require(rec: Located, fields: Mapping[str, type | tuple[type, ...]], nonempty: tuple[str, ...] = ()) -> None:
    """Check that ``rec`` has ``fields`` of the given types, and that ``nonempty`` string fields are not blank."""
    for name, tp in fields.items():
        if name not in rec.record:
            raise DataError(f"{rec.where}: missing field '{name}'")
        if not isinstance(rec.record[name], tp):
            want = tp.__name__ if isinstance(tp, type) else " or ".join(t.__name__ for t in tp)
            raise DataError(f"{rec.where}: field '{name}' must be {want}, got {type(rec.record[name]).__name__}")
    for name in nonempty:
        v = rec.record.get(name)
        if isinstance(v, str) and not v.strip():
            raise DataError(f"{rec.where}: field '{name}' is empty")


def load_texts(path: str | Path, field: str = "text") -> list[str]:
    """A pretraining corpus: ``.txt`` (one document per blank-line-separated block) or records with ``text``."""
    path = Path(path)
    if path.suffix == ".txt":
        if not path.exists():
            raise DataError(f"{path}: file not found")
        docs = [d.strip() for d in path.read_text(encoding="utf-8").split("\n\n")]
        return [d for d in docs if d]
    out = []
    for rec in iter_records(path):
        require(rec, {field: str}, nonempty=(field,))
        out.append(rec.record[field])
    if not out:
        raise DataError(f"{path}: no records")
    return out


@dataclass(frozen=True)
class Demonstration:
    """One SFT example: a prompt and the response to imitate."""

    prompt: str
    response: str
    where: str = ""


def load_demonstrations(path: str | Path) -> list[Demonstration]:
    out = []
    for rec in iter_records(path):
        require(rec, {"prompt": str, "response": str}, nonempty=("prompt", "response"))
        out.append(Demonstration(rec.record["prompt"], rec.record["response"], rec.where))
    if not out:
        raise DataError(f"{path}: no records")
    return out


@dataclass(frozen=True)
class PromptRecord:
    """A prompt to sample from, with optional task metadata (the oracle's answer key)."""

    prompt: str
    meta: dict[str, Any] | None = None
    where: str = ""


def load_prompts(path: str | Path) -> list[PromptRecord]:
    out = []
    for rec in iter_records(path):
        require(rec, {"prompt": str}, nonempty=("prompt",))
        meta = rec.record.get("meta")
        if meta is not None and not isinstance(meta, dict):
            raise DataError(f"{rec.where}: field 'meta' must be an object")
        out.append(PromptRecord(rec.record["prompt"], meta, rec.where))
    if not out:
        raise DataError(f"{path}: no records")
    return out
