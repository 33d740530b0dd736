"""Reading user data: JSONL, JSONL.gz, JSON, Parquet, CSV and ``datasets.save_to_disk`` directories.

Every record keeps where it came from (``file:line`` or ``file:record N``) so that a bad
record is reported by location, before any training starts.
"""
from __future__ import annotations

import csv
import gzip
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

from rlhfkit.data.chat import ChatFormatError, Prompt, completion_text, parse_messages, split_conversation


class DataError(ValueError):
    """Bad input data; the message names the file and line (or record)."""


@dataclass(frozen=True)
class Located:
    """A raw record and where it was read from (for error messages)."""

    record: dict
    where: str


def read_text_utf8(path: Path) -> str:
    """A whole file as text; a byte that is not UTF-8 is a DataError naming the file and its line."""
    raw = Path(path).read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 (byte {raw[e.start]:#04x})") from None


def _iter_jsonl(path: Path) -> Iterator[Located]:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as f:
        try:
            lines = list(f)
        except (OSError, EOFError) as e:  # gzip.BadGzipFile, a truncated .gz
            raise DataError(f"{path}: not a readable gzip file ({e})") from None
        for lineno, raw in enumerate(lines, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1})") from None
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
        import datasets  # lazy: slow to import (pyarrow, pandas), and only a datasets directory needs it

        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            raise DataError(f"{path}: a DatasetDict; point at one split's directory ({', '.join(ds)})")
        for i, rec in enumerate(ds):
            yield Located(dict(rec), f"{path}:record {i}")
    elif name.endswith(".jsonl") or name.endswith(".jsonl.gz"):
        yield from _iter_jsonl(path)
    elif name.endswith(".json"):
        try:
            data = json.loads(read_text_utf8(path))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
        if not isinstance(data, list):
            raise DataError(f"{path}: a .json data file must hold a list of objects")
        for i, rec in enumerate(data):
            if not isinstance(rec, dict):
                raise DataError(f"{path}:record {i}: expected a JSON object")
            yield Located(rec, f"{path}:record {i}")
    elif name.endswith(".csv"):
        reader = csv.DictReader(io.StringIO(read_text_utf8(path), newline=""))
        for rec in reader:
            yield Located(dict(rec), f"{path}:{reader.line_num}")
    elif name.endswith(".parquet"):
        # lazy: only a Parquet file needs pyarrow; data.loading is on the CLI's light path
        import pyarrow
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except (pyarrow.ArrowException, OSError) as e:
            raise DataError(f"{path}: not a readable Parquet file ({str(e).splitlines()[0][:200]})") from None
        for i, rec in enumerate(table.to_pylist()):
            yield Located(rec, f"{path}:record {i}")
    else:
        raise DataError(f"{path}: unknown data format (use .jsonl, .jsonl.gz, .json, .parquet, .csv or a datasets directory)")


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
        docs = [d.strip() for d in read_text_utf8(path).split("\n\n")]
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
    """One SFT example: a prompt (text or conversation) and the response to imitate."""

    prompt: Prompt
    response: str
    where: str = ""


def read_prompt(rec: Located, field: str = "prompt") -> Prompt:
    """A record's prompt: a non-empty string, or a list of {role, content} messages."""
    value = rec.record.get(field)
    if value is None:
        raise DataError(f"{rec.where}: missing field '{field}'")
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{rec.where}: field '{field}' is empty")
        return value
    if not isinstance(value, list):
        raise DataError(f"{rec.where}: field '{field}' must be str or a list of {{role, content}} messages, "
                        f"got {type(value).__name__}")
    try:
        return parse_messages(value, field)
    except ChatFormatError as e:
        raise DataError(f"{rec.where}: {e}") from None


def read_completion(rec: Located, field: str) -> str:
    """A response given as a string or as messages ending with the assistant's (TRL's conversational format)."""
    if field not in rec.record:
        raise DataError(f"{rec.where}: missing field '{field}'")
    try:
        return completion_text(rec.record[field], rec.where, field)
    except ChatFormatError as e:
        raise DataError(f"{rec.where}: {e}" if rec.where not in str(e) else str(e)) from None


def load_demonstrations(path: str | Path) -> list[Demonstration]:
    """SFT records: ``{"prompt", "response"}``, ``{"prompt", "completion"}`` (TRL's prompt-completion) or
    ``{"messages": [...]}`` (the last assistant turn is the response; every earlier turn is the prompt)."""
    out = []
    for rec in iter_records(path):
        r = rec.record
        if "messages" in r:
            try:
                prompt, response = split_conversation(parse_messages(r["messages"]), rec.where)
            except ChatFormatError as e:
                raise DataError(f"{rec.where}: {e}" if rec.where not in str(e) else str(e)) from None
        elif "prompt" in r:
            if "response" not in r and "completion" not in r:
                raise DataError(f"{rec.where}: missing field 'response' (or 'completion')")
            prompt = read_prompt(rec)
            field = "response" if "response" in r else "completion"
            response = read_completion(rec, field)
            if not response.strip():
                raise DataError(f"{rec.where}: field '{field}' is empty")
        else:
            raise DataError(f"{rec.where}: an SFT record needs prompt + response, prompt + completion, or messages; "
                            f"got keys {sorted(r)}")
        if not response.strip():
            raise DataError(f"{rec.where}: the response is empty")
        out.append(Demonstration(prompt, response, rec.where))
    if not out:
        raise DataError(f"{path}: no records")
    return out


@dataclass(frozen=True)
class PromptRecord:
    """A prompt to sample from, with optional task metadata (the oracle's answer key)."""

    prompt: Prompt
    meta: dict[str, Any] | None = None
    where: str = ""


def load_prompts(path: str | Path) -> list[PromptRecord]:
    """``{"prompt": text or messages}`` or ``{"messages": [...]}`` (a final assistant turn, if any, is dropped:
    the policy writes its own), with optional task ``meta``."""
    out = []
    for rec in iter_records(path):
        if "prompt" not in rec.record and "messages" in rec.record:
            prompt = read_prompt(rec, "messages")
            if prompt[-1].role == "assistant":
                prompt = prompt[:-1]
            if not prompt:
                raise DataError(f"{rec.where}: field 'messages' has no turn before the assistant's")
        else:
            prompt = read_prompt(rec)
        meta = rec.record.get("meta")
        if meta is not None and not isinstance(meta, dict):
            raise DataError(f"{rec.where}: field 'meta' must be an object")
        out.append(PromptRecord(prompt, meta, rec.where))
    if not out:
        raise DataError(f"{path}: no records")
    return out
