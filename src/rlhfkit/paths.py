"""The one path rule: where a path in a config points.

- A relative path in a config file resolves against that file's directory.
- A path given on the command line (``key=value``) resolves against the working directory.
- ``stage:NAME[/sub]`` names another stage's output in the run: ``stage:sft/model`` is OUT/sft/model.

A config field holds a path when its annotation says so: ``ConfigPath`` (a file or directory),
``ModelRef`` (a model: also ``package:``/``pkg:`` names and hub names, which are not paths) or
``JudgeSpec`` (a judge: also the names ``oracle`` and ``intransitive``). The loader
(``rlhfkit.config.load_config``) rewrites a file's relative paths relative to the working
directory, so in memory every path is relative to it (a saved config writes them relative to its
own directory again); ``stage:`` values stay as they are until a stage resolves them in its run
(:func:`run_path`, ``rlhfkit.stage.StageContext.resolve``).
"""
from __future__ import annotations

import dataclasses
import enum
import os
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Callable

STAGE_PREFIX = "stage:"
"""how a config names another stage's output in the run: ``stage:sft/model`` is OUT/sft/model"""


def run_path(out: str | Path, value: str | Path) -> Path:
    """The path a config value names in the run ``out``: ``stage:NAME[/sub]`` is ``out/NAME/sub``; any other
    value is already a path (the config loader made a file's relative paths relative to the working
    directory, and the command line's are so; see ``rlhfkit.config``)."""
    value = str(value)
    if value.startswith(STAGE_PREFIX):
        return Path(out) / value[len(STAGE_PREFIX):]
    return Path(value).expanduser()


def looks_local(ref: str) -> bool:
    """A reference written as a path (not ``org/name``): it must exist, never goes to the hub."""
    return ref.startswith((".", "/", "~")) or ref.count("/") > 1 or ref.endswith(("/", ".gguf"))


class PathKind(enum.Enum):
    """What a path-valued config field holds, which decides what in it is a path."""

    FILE = "file"
    """a file or directory: every relative value is a path"""
    MODEL = "model"
    """a model reference: ``package:``/``pkg:`` names and hub names (``org/name``, not a path on disk and not
    written as one) are kept as they are; anything else is a path"""
    JUDGE = "judge"
    """a judge: ``oracle`` and ``intransitive`` are names; a ``kind:`` prefix (DNO's ``bt:``, ``pm:``) is kept
    and the rest is a path; anything else (a reward-model directory, a judge YAML) is a path"""


ConfigPath = Annotated[str, PathKind.FILE]
"""a config field holding a file or directory path (see the module docstring's path rule)"""
ModelRef = Annotated[str, PathKind.MODEL]
"""a config field naming a model: a path, ``stage:NAME/...``, ``package:``/``pkg:`` or a hub name"""
JudgeSpec = Annotated[str, PathKind.JUDGE]
"""a config field naming a judge: ``oracle``, ``intransitive``, or a path (``stage:`` included)"""
JUDGE_NAMES = ("oracle", "intransitive")


def _relative_part(value: str, kind: PathKind) -> tuple[str, str] | None:
    """``(prefix, relative path)`` of a path-valued config string; None when it holds no relative path
    (empty, a judge name, ``stage:``, absolute, ``~``, ``package:``/``pkg:``)."""
    prefix = ""
    if kind is PathKind.JUDGE:
        if value in JUDGE_NAMES:
            return None
        head, sep, rest = value.partition(":")
        if sep and head.isalnum() and head + sep != STAGE_PREFIX:
            prefix, value = head + sep, rest
    if not value or value.startswith((STAGE_PREFIX, "~")) or os.path.isabs(value):
        return None
    if kind is PathKind.MODEL and value.startswith(("package:", "pkg:")):
        return None
    return prefix, value


def _is_path(rel: str, kind: PathKind, base: str | Path) -> bool:
    # A model reference is a path when written as one or present under ``base``; else a hub name (org/name).
    return kind is not PathKind.MODEL or looks_local(rel) or Path(base, rel).exists()


def _written_as_path(path: str, kind: PathKind) -> str:
    # A model path rewritten to one component ("m") would read as a hub name next time: keep it "./m".
    return f".{os.sep}{path}" if kind is PathKind.MODEL and not looks_local(path) else path


def anchor_path(value: str, kind: PathKind, base: str | Path) -> str:
    """A path from a config file in directory ``base``, rewritten relative to the working directory."""
    part = _relative_part(value, kind)
    if part is None or not _is_path(part[1], kind, base):
        return value
    prefix, rel = part
    return prefix + _written_as_path(os.path.relpath(Path(os.path.abspath(base), rel)), kind)


def relocate_path(value: str, kind: PathKind, base: str | Path) -> str:
    """The inverse of :func:`anchor_path`: a path relative to the working directory, relative to ``base``."""
    part = _relative_part(value, kind)
    if part is None or not _is_path(part[1], kind, "."):
        return value
    prefix, rel = part
    return prefix + _written_as_path(os.path.relpath(os.path.abspath(rel), os.path.abspath(base)), kind)


def _path_kind(tp: Any) -> PathKind | None:
    if typing.get_origin(tp) is Annotated:
        return next((m for m in tp.__metadata__ if isinstance(m, PathKind)), None)
    return None


def _map_paths(value: Any, tp: Any, fn: Callable[[str, PathKind], str]) -> Any:
    """``value`` (raw data of annotation ``tp``) with ``fn`` applied to every path-valued string in it."""
    kind = _path_kind(tp)
    if kind is not None:
        return fn(value, kind) if isinstance(value, str) else value
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        kinds = [a for a in args if _path_kind(a) is not None]
        return _map_paths(value, kinds[0], fn) if kinds else value
    if dataclasses.is_dataclass(tp) and isinstance(value, dict):
        return map_config_paths(tp, value, fn)
    if origin in (tuple, list) and args and isinstance(value, (list, tuple)):
        return type(value)(_map_paths(v, args[0], fn) for v in value)
    if origin is dict and len(args) == 2 and isinstance(value, dict):
        return {k: _map_paths(v, args[1], fn) for k, v in value.items()}
    return value


def map_config_paths(cls: type, data: dict, fn: Callable[[str, PathKind], str]) -> dict:
    """``data`` (a mapping of ``cls`` fields: YAML or ``to_dict`` output) with ``fn(value, kind)`` applied to
    every value of a path-typed field, nested configs, lists and mappings included; other keys untouched."""
    hints = typing.get_type_hints(cls, include_extras=True)
    return {k: _map_paths(v, hints[k], fn) if k in hints else v for k, v in data.items()}


def stage_hint(ref: str, out: str | Path) -> str:
    """A hint for a relative path that does not exist but does inside the run ``out``: write it ``stage:...``."""
    if ref and not ref.startswith((STAGE_PREFIX, "/", "~")) and not Path(ref).exists() and (Path(out) / ref).exists():
        return (f"; {Path(out) / ref} exists: a run's own output is written {STAGE_PREFIX}{ref} (a relative path "
                f"resolves against its config file's directory, or the working directory on the command line)")
    return ""
