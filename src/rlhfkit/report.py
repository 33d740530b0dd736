"""The run's report: ``summary.json`` (figures as data), ``report.md`` and ``report.html`` (for people).

Everything here is read back from what the stages wrote (``OUT/<stage>/metrics.json``,
``log.jsonl``, ``eval/samples.jsonl``); the report computes nothing that a stage did not measure.
Every section is a table or a plot (plots: ``report_plots``); the HTML is the Markdown rendered by
markdown-it (CommonMark plus tables). Paths are shown relative to the working directory, never
absolute, so a report reads the same wherever the run directory is copied.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from markdown_it import MarkdownIt

from rlhfkit.data.chat import parse_messages, prompt_as_text
from rlhfkit.io import atomic_write_json, atomic_write_text, read_jsonl_plain
from rlhfkit.report_tables import _cell, _fmt, _is_ci, _table, ci_table, md_escape, relative_paths, section_tables
from rlhfkit.report_plots import (gold_peak, overoptimization_points, plot_curves, plot_iterations,
                                  plot_overoptimization, stage_dirs, stage_logs)

METRICS = ["gold_score", "accuracy", "abstain_rate", "invented_number_rate", "win_rate_vs_sft", "kl_from_reference",
           "false_abstain_rate", "finished_rate", "response_length"]
# Eval with any other judge, on prompts without the task's meta (recipes/evaluate.py, general path).
GENERAL_METRICS = ["win_rate", "judge_score", "response_length", "hit_token_limit_rate", "kl_from_reference"]
# Shown on sampled responses too, in the column beside the greedy one (eval's ``policies.NAME.sampled``).
SIDE_BY_SIDE = ["accuracy", "win_rate_vs_sft", "win_rate", "judge_score"]
# The stages' summary sections (metrics.json "summary_sections"): heading, what a row is, caption.
SECTIONS = {
    "reward_models": ("Reward models", "model", "Held-out figures of each model; models measured alike share a "
                      "table. Pairwise: accuracy (ties count as wrong), accuracy_untied (over the pairs of two "
                      "different responses; ties: pairs of one text twice, whose scores are equal), mean margin "
                      "r(chosen) − r(rejected), ECE of "
                      "σ(margin); model_vs_judge and labels_vs_judge: how often the model's order, and the noisy "
                      "label's, agree with the noiseless judge, mean [95% CI], n pairs. Steps (PRM, ORM): accuracy of "
                      "σ(score) > 0.5, ROC AUC, the always-majority baseline. Cost: sign accuracy (cost < 0 for a "
                      "safe response) and AUC for unsafe responses."),
    "reranking": ("Best-of-n reranking", "method", "Accuracy of the response each method picks from n samples "
                  "per prompt, mean [95% CI]; oracle_best_of_n: the share of prompts with any right sample."),
    "win_sources": ("Where the wins come from", "policy", "Each policy's win rate against SFT minus ½, split by the "
                    "first property on which its response and SFT's differ (tasks/win_sources.py): (wins − losses) "
                    "decided by that property / (2 · prompts); a row sums to win rate − 0.5. finished: one response "
                    "never ended; abstention: abstaining vs giving a number; accuracy: a right vs a wrong final answer; "
                    "invented: a number never given; arithmetic: wrong equation lines; style: other lines the oracle "
                    "labels 0 (filler such as \"So the answer is N.\"); other: the rest."),
    "strength_grid": ("Strength grid: best-of-n", "cell", "Each policy's n samples per held-out prompt, picked by each "
                      "reward side's models (rm, prm: min of its step probabilities, prm_product, orm), by majority "
                      "vote and as the first sample (single); accuracy of the pick, mean [95% CI] over prompts; "
                      "oracle_best_of_n: the share of prompts with any right sample. Majority, single and oracle "
                      "depend on the policy only."),
    "strength_curves": ("Strength grid: gold vs proxy", "cell", "A short PPO run of the cell's policy against its "
                        "reward side's BT reward model: KL (nats), gold (oracle) score and proxy reward (that reward "
                        "model's raw score) of the rollouts where gold peaks (in KL order), at the first rollout and "
                        "at the last. The curves are drawn under Over-optimization (strength/ppo_<policy>_<reward>)."),
    "policies_per_seed": ("Policies per seed", "", "Each seed's run of a policy evaluated over several seeds, "
                          "mean [95% CI] over held-out prompts; the policy table shows their mean ± sd."),
    "intransitive": ("Intransitive preferences", "", "The cyclic judge's labels and how each learned preference "
                     "function reads the cycle (mean P(style x ≻ style y) on restyled gold responses)."),
}


def build_summary(out: Path) -> dict:
    summary: dict = {"policies": {}, "stages": {}}
    for d in stage_dirs(out):
        m = json.loads((d / "metrics.json").read_text())
        summary["stages"][d.name] = {"runtime_s": m.get("stage_runtime_s", m.get("train_runtime_s"))}
        for name, metrics in m.get("policies", {}).items():
            # Merged, not replaced: an RL stage adds kl_from_reference (and mean_cost), eval adds the rest.
            summary["policies"].setdefault(name, {}).update(_figures(metrics))
        for key in m.get("summary_sections", []):
            summary[key] = m[key]
        _collect_bias(summary.setdefault("bias", {}), d.name, m)
    if not any(summary.get("bias", {}).values()):  # no stage wrote bias figures (or no stage ran at all)
        summary.pop("bias", None)
    return summary


def _figures(metrics: dict) -> dict:
    """A stage's figures as the summary keeps them: each {mean, ci95} (over seeds also sd and each seed's mean),
    a nested group (eval's ``sampled``) likewise, and a plain number (a cost_threshold, a sampling temperature) as it is."""
    return {k: {f: v[f] for f in ("mean", "ci95", "sd", "seeds") if f in v} if _is_ci(v)
            else _figures(v) if isinstance(v, dict) else v for k, v in metrics.items()}


def _collect_bias(bias: dict, stage: str, m: dict) -> None:
    """The length and position bias figures a stage measured, gathered by group (rows named by model,
    policy or judge; prefixed by the stage when it is not the usual one)."""
    for name, model in m.get("models", {}).items():
        if "length_bias" in model:
            bias.setdefault("reward_models", {})[name if stage == "reward" else f"{stage}/{name}"] = model["length_bias"]
    for name, pol in m.get("policies", {}).items():
        raw = next((k for k in ("win_rate_vs_sft", "win_rate") if f"lc_{k}" in pol), None)
        if raw is not None:
            lc = pol[f"lc_{raw}"]
            bias.setdefault("policies", {})[name] = {
                "win_rate": pol[raw], "lc_win_rate": {"mean": lc["mean"], "ci95": lc["ci95"]},
                "length_coef": lc["length_coef"], "response_length": pol["response_length"],
                "reference_length": pol["reference_length"]}
    if "position_bias" in m:
        bias.setdefault("judges", {})[m.get("judge", "?") if stage == "label" else f"{stage}: {m.get('judge', '?')}"] = m["position_bias"]


# ---------------------------------------------------------------- Markdown pieces

def _policies(out: Path, summary: dict) -> list[str]:
    present = {k for m in summary["policies"].values() for k in m}
    if "gold_score" in present:  # the embedded task's oracle judged
        cols, caption = METRICS, "Mean [95% CI] over held-out prompts, scored by the task's oracle judge."
    else:
        cols = [k for k in GENERAL_METRICS if k in present]
        ev = out / "eval" / "metrics.json"
        ev = json.loads(ev.read_text()) if ev.exists() else {}
        ref, judge = (md_escape(relative_paths(str(ev.get(k, d)))) for k, d in (("reference", "the reference"), ("judge", "?")))
        caption = (f"Mean [95% CI] over the evaluation prompts. win_rate: P(policy's response ≻ {ref}'s) by judge "
                   f"{judge}; judge_score: its reward; response_length in tokens; hit_token_limit_rate: responses cut "
                   f"at the token limit.")
    shown = [(c, c, False) for c in cols]  # (header, metric, read from the policy's sampled figures)
    sampled_table = []
    if sampled := next((m["sampled"] for m in summary["policies"].values() if "sampled" in m), None):
        t, k = sampled["temperature"], sampled["samples_per_prompt"]
        tag = f"T={t:g}, {k}/prompt"
        caption += (f" Columns marked ({tag}): {k} responses per prompt sampled at temperature {t:g}, each prompt's "
                    f"figure the mean of its {k}, the CI over prompts; the others: one response per prompt as "
                    f"eval.sampling says (greedy by default). The second table has every figure on the sampled "
                    f"responses (the win rate pairs the policy's sample j with the reference's sample j).")
        # a side-by-side figure's sampled column right after its greedy one
        shown = [col for c in cols for col in [(c, c, False)] + ([(f"{c} ({tag})", c, True)] if c in SIDE_BY_SIDE else [])]
        sampled_cols = [c for c in cols if any(c in m.get("sampled", {}) for m in summary["policies"].values())]
        sampled_table = ["", f"Sampled ({tag}):", ""] + _table(["policy", *sampled_cols], [
            [md_escape(name)] + [_fmt(m["sampled"].get(c)) for c in sampled_cols]
            for name, m in summary["policies"].items() if "sampled" in m])
    rows = [[md_escape(name)] + [_fmt((m.get("sampled", {}) if on_sampled else m).get(c)) for _, c, on_sampled in shown]
            for name, m in summary["policies"].items()]
    if any("sd" in v for m in summary["policies"].values() for v in m.values() if isinstance(v, dict)):
        caption += (" A policy trained with several seeds: mean ± sample sd over seeds of each seed's figure "
                    "(n seeds); each seed's figures under Policies per seed.")
    return (["## Policies on held-out prompts", "", caption, ""] + _table(["policy", *(h for h, _, _ in shown)], rows)
            + sampled_table + [""])


def _bias_section(bias: dict) -> list[str]:
    """Length bias of reward models, raw vs length-controlled win rates, judges' position bias: one table each."""
    md = ["## Bias", ""]
    if rms := bias.get("reward_models"):
        md += ["Reward models on held-out pairs (the cost model: safer ≻ unsafer, scored −cost), lengths in tokens of the "
               "response: accuracy of always picking the longer / shorter one (length ties count half); the model's "
               "accuracy where the chosen response is longer / shorter (n pairs); Spearman ρ of score and length.", ""]
        md += _table(["model", "longer wins", "shorter wins", "length ties", "acc. chosen longer", "acc. chosen shorter",
                      "ρ(score, length)"], [
            [md_escape(n), *(_cell(b["baselines"][k]) for k in ("longer_wins", "shorter_wins", "ties")),
             *(f"{_cell(b['split'][k]['accuracy'])} (n = {b['split'][k]['n']})" for k in ("chosen_longer", "chosen_shorter")),
             _cell(b["spearman_score_length"])] for n, b in rms.items()]) + [""]
    if pols := bias.get("policies"):
        md += ["Policies against the reference: the raw win rate and the length-controlled one (AlpacaEval 2: the "
               "judge's preference regressed on the standardised length difference, read at zero difference), "
               "mean [95% CI]; the length coefficient (logit per sd of length difference); mean lengths in tokens.", ""]
        md += _table(["policy", "win rate", "LC win rate", "length coef.", "length", "reference's length"], [
            [md_escape(n), _fmt(p["win_rate"]), _fmt(p["lc_win_rate"]), _cell(p["length_coef"]), _fmt(p["response_length"]),
             _fmt(p["reference_length"])] for n, p in pols.items()]) + [""]
    if judges := bias.get("judges"):
        md += ["Judges asked both orders: the share of decided comparisons whose verdict the order decides (the same "
               "slot wins both times), the mean probability given to the first slot (½: no position bias).", ""]
        md += _table(["judge", "order decides", "P(first slot)", "comparisons", "orders averaged", "max without averaging"], [
            [md_escape(relative_paths(str(n))), _cell(j["share_order_decides"]), _cell(j["first_slot_preference"]),
             str(j["n"]), _cell(j["average_orders"]), _cell(j["max_position_bias"])] for n, j in judges.items()]) + [""]
    return md


def _overoptimization(out: Path, logs: dict[str, list[dict]]) -> list[str]:
    runs = {stage: pts for stage, rows in logs.items() if (pts := overoptimization_points(rows))}
    if not runs:
        return []
    rows = []
    for stage, pts in runs.items():
        peak, far = gold_peak(pts), pts[-1]
        rows.append([md_escape(stage), str(len(pts)), *(_cell(x) for x in (peak[0] ** 2, peak[1], peak[2], far[0] ** 2, far[1], far[2]))])
    plot = plot_overoptimization(out, runs)[0]
    return ["## Over-optimization", "",
            "Each point is one rollout step: the mean gold (oracle) score and proxy reward (the reward model's) of "
            "its rollouts, at the policy's KL from the reference then (nats, the stage's estimator; a negative estimate "
            "is drawn at 0). The proxy "
            "can keep rising with KL while gold peaks and falls (Gao et al., 2022); the dotted line marks gold's peak.",
            ""] + _table(["stage", "steps", "KL at gold's peak", "gold at peak", "proxy at peak", "largest KL",
                          "gold at largest KL", "proxy at largest KL"], rows) + ["", f"![over-optimization](plots/{plot.name})", ""]


def _samples(out: Path, n_prompts: int = 3) -> list[tuple[object, list[dict]]]:
    """The first ``n_prompts`` prompts of eval/samples.jsonl, each with every policy's sample of it."""
    path = out / "eval" / "samples.jsonl"
    if not path.exists():
        return []
    rows = read_jsonl_plain(path)
    first_prompts: list = []
    for r in rows:
        if r["prompt"] not in first_prompts:
            first_prompts.append(r["prompt"])
        if len(first_prompts) == n_prompts:
            break
    return [(p, [r for r in rows if r["prompt"] == p]) for p in first_prompts]


def _sample_cells(r: dict, task: bool) -> list[str]:
    if task:  # judged by the task's oracle
        return [f"{r['score']:.2f}", _cell(r["correct"]), _cell(r["abstained"]), _cell(r["invented"])]
    return [str(r["length"]), "yes" if r["finished"] else "no (hit the token limit)",
            "–" if r.get("score") is None else f"{r['score']:.2f}", "–" if r.get("win_prob") is None else f"{r['win_prob']:.2f}"]


def _sample_section(samples: list[tuple[object, list[dict]]]) -> list[str]:
    md = ["## Sample responses", "", "The first held-out prompts and every policy's response to each.", ""]
    for i, (prompt, rows) in enumerate(samples, 1):
        text = prompt if isinstance(prompt, str) else prompt_as_text(parse_messages(prompt, "prompt"))
        task = all("correct" in r for r in rows)
        cols = ["score", "correct", "abstained", "invented number"] if task else ["tokens", "finished", "judge score", "P(≻ reference)"]
        body = [[md_escape(r["policy"]), f"<samp>{md_escape(r['response'].strip()) or '–'}</samp>", *_sample_cells(r, task)]
                for r in rows]
        md += [f"**Prompt {i}.** {md_escape(text.strip())}", ""] + _table(["policy", "response", *cols], body) + [""]
    return md


def write_report(out: Path) -> dict:
    out = Path(out)
    summary = build_summary(out)
    atomic_write_json(out / "summary.json", summary)
    logs = stage_logs(out)
    md = ["# rlhfkit report", "", f"Run directory: `{os.path.relpath(out)}`", ""]
    if summary["policies"]:
        md += _policies(out, summary)
    for key in [k for k in summary if k not in ("policies", "stages", "bias")]:
        title, row_name, caption = SECTIONS.get(key, (key, "", ""))
        table = ci_table(summary[key])
        md += [f"## {title}", ""] + ([caption, ""] if caption else []) + (table + [""] if table else section_tables(summary[key], row_name))
    if "bias" in summary:
        md += _bias_section(summary["bias"])
    md += ["## Stages", ""] + _table(["stage", "runtime (s)"], [
        [md_escape(name), f"{s['runtime_s']:.1f}" if isinstance(s["runtime_s"], (int, float)) else "–"]
        for name, s in summary["stages"].items()]) + [""]
    md += _overoptimization(out, logs)
    if dno := plot_iterations(out, summary):
        md += ["## DNO iterations", "", "Win rate against SFT of each DNO iterate (mean [95% CI]; 0 is SFT itself), "
               "offline DPO as the dashed line and band.", "", f"![dno iterations](plots/{dno[0].name})", ""]
    if curves := plot_curves(out, logs):
        md += ["## Training curves", "", "What each stage logged, against its optimizer step: one line per model "
               "(reward stage) or iteration (DNO).", ""] + [f"![{p.stem}](plots/{p.name})" for p in curves] + [""]
    if samples := _samples(out):
        md += _sample_section(samples)
    text = "\n".join(md)
    atomic_write_text(out / "report.md", text)
    atomic_write_text(out / "report.html", render_html(text))
    return summary


_STYLE = """body{font-family:system-ui,sans-serif;margin:1.5em 2em;line-height:1.45;color:#222}p{max-width:110ch}
h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.8em}
table{border-collapse:collapse;margin:.6em 0 1.2em;font-size:.9em;display:block;max-width:100%;overflow-x:auto}
th,td{border:1px solid #ccc;padding:.3em .6em;text-align:left;vertical-align:top;white-space:nowrap}
th{background:#f2f2f2}tr:nth-child(even) td{background:#fafafa}td{font-variant-numeric:tabular-nums}
td samp{display:block;white-space:pre-wrap;min-width:40ch}
img{max-width:100%;display:block;margin:.4em 0}code{background:#f2f2f2;padding:0 .2em}"""


def render_html(md: str) -> str:
    """``report.md`` as a standalone HTML page: CommonMark with GitHub-style tables, by markdown-it.

    Raw HTML is allowed only so that ``<br>`` and ``<samp>`` work inside table cells; every text that
    comes from data goes through ``md_escape``, which escapes ``<``.
    """
    body = MarkdownIt("commonmark", {"html": True}).enable("table").render(md)
    return (f"<!doctype html>\n<html lang='en'><head><meta charset='utf-8'><title>rlhfkit report</title>"
            f"<style>{_STYLE}</style></head>\n<body>\n{body}</body></html>\n")
