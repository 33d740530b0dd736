"""Typed, frozen configs: YAML files plus ``key=value`` overrides.

Every stage has a frozen dataclass with a docstring under each field (cleanrl style). A
config is loaded by walking the dataclass's fields: an unknown key or a value of the wrong
type fails at start with a message naming the key and where it came from (the YAML file, or
the command-line override), before any expensive work. The resolved config is saved beside
every output, so a run can always be reproduced from its directory.

Paths follow the one path rule of :mod:`rlhfkit.paths`: the loader rewrites a file's relative
paths relative to the working directory, and a saved config writes them relative to its own
directory again, so a saved ``config.yaml`` loads with the same meaning from anywhere.
"""
from __future__ import annotations

import ast
import dataclasses
import enum
import inspect
import math
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from rlhfkit.io import atomic_write_text
from rlhfkit.paths import anchor_path, map_config_paths, relocate_path

T = TypeVar("T")


class ConfigError(ValueError):
    """A config that cannot be used; the message names the key and the file."""


def check_positive(**values: float) -> None:
    """Each value finite and > 0; the ValueError names the key (the loader adds the file and section)."""
    for key, v in values.items():
        if not (math.isfinite(v) and v > 0):
            raise ValueError(f"{key} must be a finite number > 0, got {v!r}")


def check_non_negative(**values: float) -> None:
    for key, v in values.items():
        if not (math.isfinite(v) and v >= 0):
            raise ValueError(f"{key} must be a finite number >= 0, got {v!r}")


def check_probability(**values: float) -> None:
    for key, v in values.items():
        if not (math.isfinite(v) and 0.0 <= v <= 1.0):
            raise ValueError(f"{key} must be in [0, 1], got {v!r}")


def coerce_enums(cfg: Any) -> None:
    """Turn each plain string given for an enum-typed field of the frozen dataclass ``cfg`` into its member
    (the YAML loader converts already; this serves Python callers); a ValueError names the key and the choices."""
    for name, tp in typing.get_type_hints(type(cfg)).items():
        value = getattr(cfg, name, None)
        if isinstance(tp, type) and issubclass(tp, enum.Enum) and not isinstance(value, tp):
            try:
                object.__setattr__(cfg, name, tp(value))
            except ValueError:
                raise ValueError(f"{name} must be one of {', '.join(str(m.value) for m in tp)}, got {value!r}") from None


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str, where: str, construct: bool = True) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert where lossless (int → float, list → tuple)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, where, construct)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: key '{key}': {value!r} is not of type {tp}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: key '{key}' must be a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, where, prefix=f"{key}.", construct=construct)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: key '{key}' must be a list, got {value!r}")
        args = typing.get_args(tp)
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{key}[{i}]", where) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: key '{key}' must be a mapping, got {value!r}")
        return dict(value)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        if isinstance(value, bool):
            # YAML 1.1 reads an unquoted true/false, yes/no, on/off as a bool (kl_in_loss: false; mixed_precision:
            # no): take the enum's member spelled one of those ways (at most one per enum here), "true"/"false" else
            spellings = ("true", "yes", "on") if value else ("false", "no", "off")
            value = next((m.value for m in tp if str(m.value).lower() in spellings), spellings[0])
        try:
            return tp(value)
        except ValueError:
            choices = ", ".join(str(m.value) for m in tp)
            name = key.rsplit(".", 1)[-1]
            raise ConfigError(f"{where}: key '{key}': {value!r} is not one of {choices} "
                              f"({name} must be one of these)") from None
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            # YAML 1.1 reads "3e-4" as a string; accept what float() accepts.
            if isinstance(value, str):
                try:
                    return float(value)
                except ValueError:
                    pass
            raise ConfigError(f"{where}: key '{key}' must be a float, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: key '{key}' must be an int, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: key '{key}' must be true or false, got {value!r}")
        return value
    if tp is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if not isinstance(value, str):
            raise ConfigError(f"{where}: key '{key}' must be a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: key '{key}': unsupported type {_type_name(tp)}")


def _build(cls: type[T], data: dict, where: str, prefix: str = "", construct: bool = True) -> T:
    """Check keys and types of ``data`` against ``cls``; build it when ``construct`` (which also runs
    the cross-field checks of ``__post_init__``, meaningful only on the merged config)."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    for k in data:
        if k not in names:
            raise ConfigError(
                f"{where}: unknown key '{prefix}{k}' (known keys of {cls.__name__}: {', '.join(sorted(names))})"
            )
    kwargs = {k: _coerce(v, hints[k], f"{prefix}{k}", where, construct) for k, v in data.items()}
    if not construct:
        return None  # type: ignore[return-value]
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{where}: {prefix.rstrip('.') or cls.__name__}: {e}") from None


def _merge(cls: type, base: dict, override: dict) -> dict:
    """Overlay ``override`` on ``base``: nested configs merge key by key; any other value (a
    mapping-valued field such as ``eval.policies`` too) is replaced whole."""
    hints = typing.get_type_hints(cls)
    out = dict(base)
    for k, v in override.items():
        tp = hints.get(k)
        if dataclasses.is_dataclass(tp) and isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(tp, out[k], v)
        else:
            out[k] = v
    return out


def parse_override(text: str) -> dict:
    """``a.b.c=VALUE`` → ``{"a": {"b": {"c": VALUE}}}``, VALUE parsed as YAML (``3``, ``true``, ``[a, b]``)."""
    if "=" not in text:
        raise ConfigError(f"command line: override '{text}' is not of the form key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"command line: override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"command line: override '{text}': {e}") from None
    node: dict = {}
    cur = node
    parts = key.split(".")
    for p in parts[:-1]:
        cur[p] = {}
        cur = cur[p]
    cur[parts[-1]] = value
    return node


def load_config(cls: type[T], path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> T:
    """Build ``cls`` from a YAML file and ``key=value`` overrides (overrides win)."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"{path}: config file not found")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(loaded).__name__}")
        _build(cls, loaded, str(path), construct=False)  # name the file in key/type errors
        # The path rule: a file's relative paths resolve against its directory (the overrides': the working directory).
        data = map_config_paths(cls, loaded, lambda v, kind: anchor_path(v, kind, path.parent))
    for text in overrides:
        one = parse_override(text)
        _build(cls, one, f"command line override '{text}'", construct=False)  # name the override
        data = _merge(cls, data, one)
    return _build(cls, data, str(path) if path is not None else "config")


def to_dict(cfg: Any) -> Any:
    """A plain, YAML-safe view of a config (enums by value, tuples as lists)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, enum.Enum):
        return cfg.value
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def saved_form(cfg: Any, base: str | Path) -> dict:
    """``to_dict(cfg)`` with its relative paths written relative to ``base``, the directory of the file that
    holds it, so that :func:`load_config` reads the file back to ``cfg`` from any working directory."""
    return map_config_paths(type(cfg), to_dict(cfg), lambda v, kind: relocate_path(v, kind, Path(base)))


def save_config(cfg: Any, path: str | Path, base: str | Path | None = None) -> None:
    """Write ``cfg`` as YAML to ``path``; its relative paths relative to ``base`` (default: the file's directory)."""
    path = Path(path)
    atomic_write_text(path, yaml.safe_dump(saved_form(cfg, path.parent if base is None else base), sort_keys=False))


def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of a dataclass (cleanrl style), by field name."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            src = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        body = ast.parse(src).body[0].body
        for node, nxt in zip(body, body[1:]):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
                    docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def describe(cls: type, prefix: str = "", defaults=None) -> list[str]:
    """Lines ``key (type, default): doc`` for every field, nested configs flattened. A nested config's defaults
    are its parent's (``defaults``: eval's ``sampling`` is greedy, though a bare ``SamplingConfig`` samples at 1)."""
    lines = []
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if defaults is not None:
            default = getattr(defaults, f.name)
        else:
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else "required")
        if dataclasses.is_dataclass(tp):
            nested = default if dataclasses.is_dataclass(default) else None
            lines.extend(describe(tp, prefix=f"{prefix}{f.name}.", defaults=nested))
            continue
        lines.append(f"{prefix}{f.name} ({_type_name(tp)}, default {to_dict(default)!r}): {docs.get(f.name, '')}")
    return lines
