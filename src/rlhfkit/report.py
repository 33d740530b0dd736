"""The run's report: ``summary.json`` (figures as data), ``report.md`` and ``report.html`` (for people).

Everything here is read back from what the stages wrote (``OUT/<stage>/metrics.json``,
``log.jsonl``, ``eval/samples.jsonl``); the report computes nothing that a stage did not measure.
"""
from __future__ import annotations

import html
import json
from pathlib import Path

from rlhfkit.io import atomic_write_json, atomic_write_text, read_jsonl_plain

METRICS = ["gold_score", "accuracy", "abstain_rate", "invented_number_rate", "win_rate_vs_sft", "kl_from_reference",
           "false_abstain_rate", "finished_rate", "response_length"]
# Eval with any other judge, on prompts without the task's meta (recipes/evaluate.py, general path).
GENERAL_METRICS = ["win_rate", "judge_score", "response_length", "hit_token_limit_rate", "kl_from_reference"]
PLOT_KEYS = ["loss", "reward", "kl", "gold_score", "win_rate"]


def _stage_dirs(out: Path) -> list[Path]:
    return sorted([p for p in out.iterdir() if p.is_dir() and (p / "metrics.json").exists()], key=lambda p: p.stat().st_mtime)


def build_summary(out: Path) -> dict:
    summary: dict = {"policies": {}, "stages": {}}
    for d in _stage_dirs(out):
        m = json.loads((d / "metrics.json").read_text())
        summary["stages"][d.name] = {"runtime_s": m.get("stage_runtime_s", m.get("train_runtime_s"))}
        for name, metrics in m.get("policies", {}).items():
            # Merged, not replaced: an RL stage adds kl_from_reference (and mean_cost), eval adds the rest.
            # A plain number (a cost_threshold) is kept as it is.
            summary["policies"].setdefault(name, {}).update(
                {k: {"mean": v["mean"], "ci95": v["ci95"]} if isinstance(v, dict) else v for k, v in metrics.items()})
        for key in m.get("summary_sections", []):
            summary[key] = m[key]
    return summary


def _fmt(v: dict | None) -> str:
    if not v or v.get("mean") is None:
        return "–"
    lo, hi = v["ci95"]
    return f"{v['mean']:.3f} [{lo:.3f}, {hi:.3f}]"


def ci_table(section) -> list[str] | None:
    """A section shaped {row: {metric: {"mean", "ci95", ...}}} (plus scalar notes such as ``n``) as a
    markdown table of mean [95% CI]; None for any other shape (the report then shows its JSON)."""
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


def plot_curves(out: Path) -> list[Path]:
    """One PNG per stage with a log.jsonl: each logged figure of PLOT_KEYS against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = []
    (out / "plots").mkdir(exist_ok=True)
    for d in _stage_dirs(out):
        log = d / "log.jsonl"
        if not log.exists():
            continue
        rows = read_jsonl_plain(log)
        keys = [k for k in PLOT_KEYS if any(k in r and isinstance(r[k], (int, float)) for r in rows)]
        if not keys:
            continue
        fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3), squeeze=False)
        for ax, k in zip(axes[0], keys):
            pts = [(r["step"], r[k]) for r in rows if isinstance(r.get(k), (int, float))]
            ax.plot([p[0] for p in pts], [p[1] for p in pts])
            ax.set_title(f"{d.name}: {k}")
            ax.set_xlabel("step")
        fig.tight_layout()
        path = out / "plots" / f"{d.name}.png"
        fig.savefig(path, dpi=80)
        plt.close(fig)
        plots.append(path)
    return plots


def plot_overoptimization(out: Path) -> list[Path]:
    """Gold (oracle) score and proxy reward of the rollouts against sqrt(KL), one line per RL stage.

    Gao et al. (2022): as the policy moves away from the reference (sqrt of the KL, in nats),
    the proxy reward keeps rising while the gold score peaks and falls: over-optimisation.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {}
    for d in _stage_dirs(out):
        log = d / "log.jsonl"
        rows = read_jsonl_plain(log) if log.exists() else []
        rows = [r for r in rows if all(isinstance(r.get(k), (int, float)) for k in ("kl", "reward", "gold_score"))]
        if rows:
            runs[d.name] = rows
    if not runs:
        return []
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for name, rows in runs.items():
        x = [max(r["kl"], 0.0) ** 0.5 for r in rows]
        axes[0].plot(x, [r["gold_score"] for r in rows], label=name)
        axes[1].plot(x, [r["reward"] for r in rows], label=name)
    for ax, title in zip(axes, ("gold score (oracle)", "proxy reward")):
        ax.set_title(title)
        ax.set_xlabel("sqrt(KL from reference), nats^0.5")
        ax.legend(fontsize=7)
    fig.tight_layout()
    (out / "plots").mkdir(exist_ok=True)
    path = out / "plots" / "overoptimization.png"
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return [path]


def plot_iterations(out: Path, summary: dict) -> list[Path]:
    """DNO: win rate against SFT (mean, 95% CI) of each iterate dno_1 … dno_T, with DPO as a line."""
    import re

    pols = summary["policies"]
    its = sorted((int(m[1]), name) for name in pols if (m := re.fullmatch(r"dno_(\d+)", name)) and "win_rate_vs_sft" in pols[name])
    if not its:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (out / "plots").mkdir(exist_ok=True)
    fig, ax = plt.subplots(figsize=(5, 3.2))
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
    fig.tight_layout()
    path = out / "plots" / "dno_iterations.png"
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return [path]


def _samples(out: Path, per_policy: int = 3) -> dict[str, list[dict]]:
    path = out / "eval" / "samples.jsonl"
    if not path.exists():
        return {}
    rows = read_jsonl_plain(path)
    first_prompts = []
    for r in rows:
        if r["prompt"] not in first_prompts:
            first_prompts.append(r["prompt"])
        if len(first_prompts) == per_policy:
            break
    by: dict[str, list[dict]] = {}
    for r in rows:
        if r["prompt"] in first_prompts:
            by.setdefault(r["policy"], []).append(r)
    return by


def _prompt_text(prompt) -> str:
    """A written prompt (a string, or a list of message objects) as text for the report."""
    from rlhfkit.data.chat import parse_messages, prompt_as_text

    return prompt if isinstance(prompt, str) else prompt_as_text(parse_messages(prompt, "prompt"))


def _sample_note(r: dict) -> str:
    if "correct" in r:  # judged by the task's oracle
        return (f"score {r['score']:.2f}, correct {r['correct']}, abstained {r['abstained']}, "
                f"invented number {r['invented']}")
    note = [f"{r['length']} tokens", "finished" if r["finished"] else "hit the token limit"]
    if r.get("score") is not None:
        note.append(f"judge score {r['score']:.2f}")
    if r.get("win_prob") is not None:
        note.append(f"P(≻ reference) {r['win_prob']:.2f}")
    return ", ".join(note)


def write_report(out: Path) -> dict:
    out = Path(out)
    summary = build_summary(out)
    atomic_write_json(out / "summary.json", summary)
    plots = plot_curves(out) + plot_overoptimization(out) + plot_iterations(out, summary)
    samples = _samples(out)

    md = ["# rlhfkit report", "", f"Run directory: `{out}`", ""]
    if summary["policies"]:
        present = {k for m in summary["policies"].values() for k in m}
        if "gold_score" in present:  # the embedded task's oracle judged
            cols, caption = METRICS, "Mean [95% CI] over held-out prompts, scored by the task's oracle judge."
        else:
            cols = [k for k in GENERAL_METRICS if k in present]
            ev = out / "eval" / "metrics.json"
            ev = json.loads(ev.read_text()) if ev.exists() else {}
            caption = (f"Mean [95% CI] over the evaluation prompts. win_rate: P(policy's response ≻ "
                       f"{ev.get('reference', 'the reference')}'s) by judge {ev.get('judge', '?')}; judge_score: its "
                       f"reward; response_length in tokens; hit_token_limit_rate: responses cut at the token limit.")
        md += ["## Policies on held-out prompts", "", caption, "",
               "| policy | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        for name, m in summary["policies"].items():
            md.append(f"| {name} | " + " | ".join(_fmt(m.get(k)) for k in cols) + " |")
        md.append("")
    for key in [k for k in summary if k not in ("policies", "stages")]:
        table = ci_table(summary[key])
        md += [f"## {key}", ""] + (table if table else ["```json", json.dumps(summary[key], indent=2), "```"]) + [""]
    md += ["## Stages", "", "| stage | runtime (s) |", "|---|---|"]
    for name, s in summary["stages"].items():
        rt = s["runtime_s"]
        md.append(f"| {name} | {rt:.1f} |" if isinstance(rt, (int, float)) else f"| {name} | – |")
    md.append("")
    if plots:
        md += ["## Training curves", ""] + [f"![{p.stem}](plots/{p.name})" for p in plots] + [""]
    if samples:
        md += ["## Sample responses", ""]
        for name, rows in samples.items():
            md.append(f"### {name}")
            for r in rows:
                md += ["", f"**Prompt:** `{_prompt_text(r['prompt']).strip()}`  ", _sample_note(r), "", "```",
                       r["response"], "```"]
            md.append("")
    atomic_write_text(out / "report.md", "\n".join(md))
    atomic_write_text(out / "report.html", _html(md))
    return summary


def _html(md_lines: list[str]) -> str:
    """A small, dependency-free rendering of the markdown we write (tables, headings, code, images)."""
    body, in_code, in_table = [], False, False
    for line in md_lines:
        if line.startswith("```"):
            body.append("</pre>" if in_code else "<pre>")
            in_code = not in_code
            continue
        if in_code:
            body.append(html.escape(line))
            continue
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if all(set(c) <= {"-"} for c in cells):
                continue
            if not in_table:
                body.append("<table border=1 cellpadding=4>")
                in_table = True
                body.append("<tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in cells) + "</tr>")
            else:
                body.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
            continue
        if in_table:
            body.append("</table>")
            in_table = False
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{html.escape(line.lstrip('#').strip())}</h{level}>")
        elif line.startswith("!["):
            alt, src = line[2:].split("](")
            body.append(f'<img alt="{html.escape(alt)}" src="{html.escape(src.rstrip(")"))}">')
        elif line.strip():
            body.append(f"<p>{html.escape(line)}</p>")
    if in_table:
        body.append("</table>")
    return "<!doctype html><html><head><meta charset='utf-8'><title>rlhfkit report</title></head><body>" + "\n".join(body) + "</body></html>\n"
