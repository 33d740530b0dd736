"""The report's Markdown tables: escaping and relative paths for any text shown, figures as ``mean [95% CI]``
(or ``mean ± sd (n seeds)``), and any summary section drawn as tables (``section_tables``), never as a JSON dump.
``rlhfkit.report`` builds the report from them."""
from __future__ import annotations

import math
import os
import re

def md_escape(text: str) -> str:
    """``text`` as literal Markdown inline text, on one line (a line break becomes ``<br>``).

    Escapes what CommonMark would read as markup inside a paragraph or a table cell: backslash,
    backtick, ``<`` (raw HTML is on for ``<br>``), brackets, ``|``, an entity-like ``&``, and ``*`` or
    ``_`` that could open or close emphasis (a ``*`` between spaces, as in ``18 * 3``, or a ``_``
    inside a word, as in ``dno_1``, cannot, and stays unescaped for the plain-text reader).
    """
    out = []
    for i, ch in enumerate(text):
        prev, nxt = text[i - 1] if i else " ", text[i + 1] if i + 1 < len(text) else " "
        if (ch in "\\`<[]|" or ch == "&" and re.match(r"&#?\w+;", text[i:])
                or ch in "*_" and not (prev.isspace() and nxt.isspace()) and not (ch == "_" and prev.isalnum() and nxt.isalnum())):
            out.append("\\")
        out.append(ch)
    return "".join(out).replace("\r\n", "\n").replace("\n", "<br>")


_ABSOLUTE = re.compile(r"(?:^|(?<=[\s:=(,'\"]))(/[^\s,;)'\"]*)")


def relative_paths(text: str) -> str:
    """Every absolute path in ``text`` (alone, or after ``kind:`` as in a judge spec) relative to the working directory."""
    return _ABSOLUTE.sub(lambda m: os.path.relpath(m[1]), text)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"] + ["| " + " | ".join(r) + " |" for r in rows]


def _is_ci(v) -> bool:
    return isinstance(v, dict) and "mean" in v and "ci95" in v


def _fmt(v: dict | None) -> str:
    if not v or v.get("mean") is None:
        return "–"
    if "sd" in v:  # over seeds (rlhfkit.seeds.over_seeds)
        return f"{v['mean']:.3f} ± {v['sd']:.3f} ({len(v['seeds'])} seeds)"
    lo, hi = v["ci95"]
    return f"{v['mean']:.3f} [{lo:.3f}, {hi:.3f}]"


def _cell(v) -> str:
    """One figure as table-cell text: mean [95% CI] (with n when known), a number, yes/no, or escaped text."""
    if _is_ci(v):
        return _fmt(v) + (f", n = {v['n']}" if "n" in v else "")
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.3f}" if v == 0 or not math.isfinite(v) or 1e-3 <= abs(v) < 1e6 else f"{v:.3g}"
    if isinstance(v, (list, tuple)):
        return ", ".join(_cell(x) for x in v) or "–"
    if v is None or v == {}:
        return "–"
    return md_escape(relative_paths(str(v)))


def ci_table(section) -> list[str] | None:
    """A section shaped {row: {metric: {"mean", "ci95", ...}}} (plus scalar notes such as ``n``) as a
    markdown table of mean [95% CI]; None for any other shape (``section_tables`` draws those)."""
    if not isinstance(section, dict):
        return None
    rows = {k: v for k, v in section.items() if isinstance(v, dict)}
    ok = rows and all(v and all(isinstance(m, dict) and "mean" in m and "ci95" in m for m in v.values())
                      for v in rows.values())
    if not ok:
        return None
    metrics = list(dict.fromkeys(m for v in rows.values() for m in v))
    lines = ["| | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(_fmt(v.get(m)) for m in metrics) + " |" for name, v in rows.items()]
    notes = [f"{k} = {v}" for k, v in section.items() if not isinstance(v, dict)]
    return lines + (["", ", ".join(notes)] if notes else [])


def _leaves(value, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], object]]:
    """(key path, figure) of every leaf of a nested dict; a {mean, ci95} dict is one figure."""
    if isinstance(value, dict) and value and not _is_ci(value):
        return [leaf for k, v in value.items() for leaf in _leaves(v, (*path, str(k)))]
    return [(path, value)]


def section_tables(section, row_name: str = "") -> list[str]:
    """Any summary section as Markdown tables, never as a JSON dump.

    Each entry that is a dict is a row, its nested figures flattened into columns (named by their
    last key, or by the whole path where the last key repeats); rows with the same columns share a
    table, so models measured alike line up. Plain entries go into a two-column table.
    """
    if not isinstance(section, dict):
        section = {"value": section}
    rows = {k: _leaves(v) for k, v in section.items() if isinstance(v, dict) and v and not _is_ci(v)}
    groups: dict[tuple, list[str]] = {}
    for name, leaves in rows.items():
        groups.setdefault(tuple(p for p, _ in leaves), []).append(name)
    lines: list[str] = []
    for paths, names in groups.items():
        last = [p[-1] for p in paths]
        labels = [p[-1] if last.count(p[-1]) == 1 else ": ".join(p) for p in paths]
        lines += _table([row_name] + [md_escape(x) for x in labels],
                        [[md_escape(str(n))] + [_cell(v) for _, v in rows[n]] for n in names]) + [""]
    plain = [[md_escape(str(k)), _cell(v)] for k, v in section.items() if k not in rows]
    return lines + (_table(["", "value"], plain) + [""] if plain else [])


# ---------------------------------------------------------------- the report's sections
