"""The report's plots (matplotlib, PNG under ``OUT/plots/``) and the series they draw, read from each
stage's ``log.jsonl``.

The series are plain functions of the logged rows so that a test can check them without drawing:
one line per model (the reward stage logs rm, prm, orm and cost to one file, each row naming its
``model``), one per DNO iteration, and the over-optimisation points in KL order.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

# The object API, not pyplot: a Figure draws to a file without touching pyplot's global backend or
# its list of open figures (nothing to close, nothing changed for a notebook that imports this).
from matplotlib.figure import Figure

from rlhfkit.io import read_jsonl_plain

PLOT_KEYS = ["loss", "reward", "kl", "gold_score", "win_rate"]
DPI = 80


def stage_dirs(out: Path) -> list[Path]:
    """The finished stages of a run (those with a ``metrics.json``), in the order they finished."""
    return sorted([p for p in out.iterdir() if p.is_dir() and (p / "metrics.json").exists()], key=lambda p: p.stat().st_mtime)


def stage_logs(out: Path) -> dict[str, list[dict]]:
    """``{stage: rows of its log.jsonl}`` for every finished stage that wrote one; a stage run with seeds
    (``rlhfkit.seeds``) has one log per seed, ``OUT/<stage>/seed_<s>/log.jsonl``, named ``<stage>@seed<s>``, and
    a stage that ran other recipes in its directories (metrics ``runs``: the strength grid's PPO runs) one per
    run, ``OUT/<stage>/<run>/log.jsonl``, named ``<stage>/<run>``."""
    logs = {}
    for d in stage_dirs(out):
        m = json.loads((d / "metrics.json").read_text())
        subs = [(f"{d.name}@seed{s}", d / f"seed_{s}") for s in m.get("seeds_run", [])]
        subs += [(f"{d.name}/{r}", d / r) for r in m.get("runs", [])]
        for name, log in [(d.name, d / "log.jsonl")] + [(n, sub / "log.jsonl") for n, sub in subs]:
            if log.exists():
                logs[name] = read_jsonl_plain(log)
    return logs


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def line_series(rows: list[dict], key: str) -> dict[str, list[tuple[float, float]]]:
    """``{line name: [(step, value), ...]}`` of ``key``, one line per model or training round.

    A row with a ``model`` field belongs to that model's line. DNO logs ``{"iteration": t, ...}`` (no
    ``step``) after round t's training rows, so the rows before that marker form line "iteration t";
    joining rounds into one line would draw a zig-zag between models that never shared a loss.
    Without either, the stage has one line, named "".
    """
    labels: list[str | None] = []
    pending: list[int] = []  # indices of rows waiting for their round's marker
    last_round = None
    for i, r in enumerate(rows):
        if "iteration" in r and "step" not in r:
            last_round = r["iteration"]
            for j in pending:
                labels[j] = f"iteration {last_round}"
            pending = []
        labels.append(None)
        if "model" in r:
            labels[i] = str(r["model"])
        elif "step" in r:
            pending.append(i)
    for j in pending:  # rows after the last marker: a round still running, or a stage without rounds
        labels[j] = f"iteration {last_round + 1}" if isinstance(last_round, int) else ""
    series: dict[str, list[tuple[float, float]]] = {}
    for r, label in zip(rows, labels):
        if label is not None and _is_number(r.get("step")) and _is_number(r.get(key)):
            series.setdefault(label, []).append((r["step"], r[key]))
    return series


def overoptimization_points(rows: list[dict]) -> list[tuple[float, float, float]]:
    """(sqrt(KL), gold score, proxy reward) of each rollout step, sorted by KL (ties keep step order).

    Gao et al. (2022) plot scores against d = sqrt(KL(π ‖ π_ref)) in nats; joining points in step order
    instead draws back and forth across the axis. A negative KL (the k1 estimate of a step can be
    below zero) is drawn at 0.
    """
    pts = [(max(r["kl"], 0.0) ** 0.5, r["gold_score"], r["reward"]) for r in rows
           if all(_is_number(r.get(k)) for k in ("kl", "reward", "gold_score"))]
    return sorted(pts, key=lambda p: p[0])


def gold_peak(points: list[tuple[float, float, float]]) -> tuple[float, float, float]:
    """The point of highest gold score (the one at the lowest KL among equal highs)."""
    return max(points, key=lambda p: (p[1], -p[0]))


def plot_curves(out: Path, logs: dict[str, list[dict]]) -> list[Path]:
    """One PNG per stage with a log: each logged figure of PLOT_KEYS against step, one line per model/round."""
    plots = []
    for stage, rows in logs.items():
        panels = {k: s for k in PLOT_KEYS if (s := line_series(rows, k))}
        if not panels:
            continue
        fig = Figure(figsize=(4 * len(panels), 3))
        axes = fig.subplots(1, len(panels), squeeze=False)
        for ax, (k, series) in zip(axes[0], panels.items()):
            for label, pts in series.items():
                ax.plot([p[0] for p in pts], [p[1] for p in pts], label=label or None)
            ax.set_title(f"{stage}: {k}")
            ax.set_xlabel("step")
            if len(series) > 1:
                ax.legend(fontsize=7)
        plots.append(_save(fig, out, stage))
    return plots


def plot_overoptimization(out: Path, runs: dict[str, list[tuple[float, float, float]]]) -> list[Path]:
    """Gold (oracle) score and proxy reward of the rollouts against sqrt(KL), one line per RL stage,
    points joined in KL order, with a dotted line where gold peaks.

    Gao et al. (2022): as the policy moves away from the reference, the proxy reward keeps rising
    while the gold score peaks and falls: over-optimisation.
    """
    if not runs:
        return []
    fig = Figure(figsize=(9, 3.5))
    axes = fig.subplots(1, 2, sharex=True)
    for i, (name, pts) in enumerate(runs.items()):
        colour = f"C{i % 10}"
        x = [p[0] for p in pts]
        axes[0].plot(x, [p[1] for p in pts], marker=".", color=colour, label=name)
        axes[1].plot(x, [p[2] for p in pts], marker=".", color=colour, label=name)
        px, pg, _ = gold_peak(pts)
        axes[0].plot([px], [pg], marker="*", markersize=12, color=colour, linestyle="none",
                     label=f"{name}: gold peaks at KL {px * px:.3g}")
        for ax in axes:
            ax.axvline(px, color=colour, linestyle=":", linewidth=1)
    for ax, title in zip(axes, ("gold score (oracle)", "proxy reward")):
        ax.set_title(title)
        ax.set_xlabel("sqrt(KL from reference), nats^0.5")
        ax.legend(fontsize=7)
    return [_save(fig, out, "overoptimization")]


def plot_iterations(out: Path, summary: dict) -> list[Path]:
    """DNO: win rate against SFT (mean, 95% CI) of each iterate dno_1 … dno_T, with DPO as a line."""
    pols = summary["policies"]
    its = sorted((int(m[1]), name) for name in pols if (m := re.fullmatch(r"dno_(\d+)", name)) and "win_rate_vs_sft" in pols[name])
    if not its:
        return []
    fig = Figure(figsize=(5, 3.2))
    ax = fig.subplots()
    xs = [0] + [t for t, _ in its]
    wr = [pols["sft"]["win_rate_vs_sft"] if "sft" in pols else {"mean": 0.5, "ci95": [0.5, 0.5]}] + [pols[n]["win_rate_vs_sft"] for _, n in its]
    ax.errorbar(xs, [w["mean"] for w in wr], yerr=[[w["mean"] - w["ci95"][0] for w in wr], [w["ci95"][1] - w["mean"] for w in wr]],
                marker="o", capsize=3, label="DNO iterate (0 = SFT)")
    if "dpo" in pols and "win_rate_vs_sft" in pols["dpo"]:
        d = pols["dpo"]["win_rate_vs_sft"]
        ax.axhline(d["mean"], color="C1", linestyle="--", label="offline DPO")
        ax.axhspan(d["ci95"][0], d["ci95"][1], color="C1", alpha=0.15)
    ax.set_xticks(xs)
    ax.set_xlabel("DNO iteration")
    ax.set_ylabel("win rate vs SFT")
    ax.legend(fontsize=8)
    return [_save(fig, out, "dno_iterations")]


def _save(fig: Figure, out: Path, name: str) -> Path:
    fig.tight_layout()
    (out / "plots").mkdir(exist_ok=True)
    safe = re.sub(r"[^\w@.-]", "_", name)  # a sub-run's log (strength/ppo_weak_weak) is one file, not a folder
    path = out / "plots" / f"{safe}.png"
    fig.savefig(path, dpi=DPI)
    return path
