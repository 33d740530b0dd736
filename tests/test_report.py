"""The report: series drawn one line per model, over-optimisation in KL order, Markdown escaping that
survives rendering, every section a table or a plot, and no absolute path.

``fake_run`` writes a small run directory shaped like a quickstart's (the files the report reads,
no models), so these tests and the browser test need no training.
"""
from __future__ import annotations

import json
import os
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

from rlhfkit.report import render_html, write_report
from rlhfkit.report_tables import md_escape, relative_paths, section_tables
from rlhfkit.report_plots import gold_peak, line_series, overoptimization_points


def _ci(mean, lo, hi, n=None):
    return {"mean": mean, "ci95": [lo, hi], **({"n": n} if n is not None else {})}


def _policy(gold, acc):
    return {"gold_score": _ci(gold, gold - 0.05, gold + 0.05, 16), "accuracy": _ci(acc, acc - 0.1, acc + 0.1, 12),
            "abstain_rate": _ci(0.5, 0.2, 0.8, 4), "invented_number_rate": _ci(0.1, 0.0, 0.3, 16),
            "win_rate_vs_sft": _ci(0.5, 0.4, 0.6, 16), "false_abstain_rate": _ci(0.0, 0.0, 0.2, 12),
            "finished_rate": _ci(1.0, 0.8, 1.0, 16), "response_length": _ci(20.0, 18.0, 22.0, 16)}


def _write(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(obj, list):
        path.write_text("".join(json.dumps(r) + "\n" for r in obj))
    else:
        path.write_text(json.dumps(obj))


def fake_run(out: Path) -> Path:
    """A run directory with what the report reads from a quickstart: metrics.json of each stage
    (policies, the reward stage's sections), log.jsonl of the reward (four models in one file), PPO and
    DNO (three rounds) stages, and eval/samples.jsonl."""
    stages = {
        "data": {"stage_runtime_s": 0.1},
        "sft": {"train_runtime_s": 3.0},
        "reward": {"stage_runtime_s": 5.0, "summary_sections": ["reward_models", "reranking"],
                   "reward_models": {
                       "rm": {"heldout": {"accuracy": 0.625, "mean_margin": 0.5, "ece": 0.05, "pairs": 40},
                              "judge_agreement": {"model_vs_judge": _ci(0.7, 0.6, 0.8, 30), "labels_vs_judge": _ci(0.9, 0.8, 0.95, 30)}},
                       "prm": {"heldout": {"step_accuracy": 0.75, "roc_auc": 0.8, "majority_baseline": 0.6, "positive_rate": 0.4, "steps": 50}},
                       "orm": {"heldout": {"step_accuracy": 0.7, "roc_auc": 0.75, "majority_baseline": 0.55, "positive_rate": 0.45, "steps": 20}},
                       "cost": {"heldout": {"sign_accuracy": 0.95, "unsafe_auc": 0.9, "unsafe_rate": 0.1, "responses": 30}}},
                   "reranking": {"prm": {"accuracy": _ci(0.5, 0.4, 0.6, 10)}, "majority": {"accuracy": _ci(0.45, 0.35, 0.55, 10)},
                                 "n": 4, "n_prompts": 10}},
        "ppo": {"stage_runtime_s": 4.0, "policies": {"ppo": {"kl_from_reference": _ci(0.3, 0.2, 0.4, 16)}}},
        "dno": {"stage_runtime_s": 2.0},
        "eval": {"stage_runtime_s": 1.0, "policies": {"base": _policy(0.1, 0.0), "sft": _policy(0.5, 0.4),
                                                      "ppo": _policy(0.55, 0.45), "dno_1": _policy(0.5, 0.4), "dno_2": _policy(0.6, 0.5)}},
    }
    for i, (name, metrics) in enumerate(stages.items()):
        _write(out / name / "metrics.json", metrics)
        os.utime(out / name, (1e9 + i, 1e9 + i))  # stages in the order they ran
    _write(out / "sft" / "log.jsonl", [{"step": s, "loss": 3.0 / s} for s in (1, 2, 3)])
    _write(out / "reward" / "log.jsonl",
           [{"model": "rm", "step": s, "loss": 0.7 - 0.05 * s} for s in (1, 2, 3)]
           + [{"model": "prm", "step_likelihood_start": {"weight": [1.0], "bias": 0.0}}]
           + [{"model": m, "step": s, "loss": base - 0.1 * s} for m, base in (("prm", 0.6), ("orm", 0.8), ("cost", 2.0)) for s in (1, 2, 3)])
    _write(out / "ppo" / "log.jsonl", [{"step": s, "kl": kl, "reward": r, "gold_score": g, "loss": 0.01}
                                       for s, (kl, r, g) in enumerate([(0.0, -1.0, 0.40), (0.25, -0.5, 0.45), (0.09, -0.8, 0.42),
                                                                       (1.0, 0.5, 0.38), (0.49, 0.0, 0.50)], 1)])
    _write(out / "dno" / "log.jsonl", [{"step": s, "loss": 0.7 - 0.01 * s} for s in (1, 2)] + [{"iteration": 1, "validation_win_rate": 0.5}]
           + [{"step": s, "loss": 0.7 - 0.01 * s} for s in (3, 4)] + [{"iteration": 2, "validation_win_rate": 0.55}])
    prompts = ["Question: Tom has 3 apples. He buys 2 more apples. How many apples does Tom have now?\n",
               "Question: Ann has 7 pens. She gives away 4 pens. How many pens does Ann have now?\n"]
    _write(out / "eval" / "samples.jsonl", [
        {"policy": pol, "prompt": p, "response": f"3 + 2 = 5\n5 * 1 = 5 | {pol}\nAnswer: 5", "finished": True, "score": 1.0,
         "correct": True, "abstained": False, "invented": pol == "base", "length": 12}
        for p in prompts for pol in ("base", "sft", "ppo", "dno_1", "dno_2")])
    return out


class _Text(HTMLParser):
    """The text a page shows (not its <head>), with <br> as a line break."""

    def __init__(self):
        super().__init__()
        self.parts: list[str] = []
        self._head = False

    def handle_starttag(self, tag, attrs):
        self._head = self._head or tag == "head"
        if tag == "br":
            self.parts.append("\n")

    def handle_endtag(self, tag):
        self._head = self._head and tag != "head"

    def handle_data(self, data):
        if not self._head:
            self.parts.append(data)


def _shown(html: str) -> str:
    p = _Text()
    p.feed(html)
    return "".join(p.parts)


# ---------------------------------------------------------------- series

def test_one_line_per_model_and_per_dno_round():
    rows = [{"model": "rm", "step": 1, "loss": 0.7}, {"model": "rm", "step": 2, "loss": 0.6},
            {"model": "prm", "step_likelihood_start": {"bias": 0.0}},  # no step: not a point
            {"model": "prm", "step": 1, "loss": 0.5}, {"model": "cost", "step": 1, "loss": 2.0}]
    assert line_series(rows, "loss") == {"rm": [(1, 0.7), (2, 0.6)], "prm": [(1, 0.5)], "cost": [(1, 2.0)]}
    dno = [{"step": 1, "loss": 0.7}, {"step": 11, "loss": 0.6}, {"iteration": 1, "validation_win_rate": 0.5},
           {"step": 19, "loss": 0.8}, {"iteration": 2, "validation_win_rate": 0.5}, {"step": 17, "loss": 0.75}]
    assert line_series(dno, "loss") == {"iteration 1": [(1, 0.7), (11, 0.6)], "iteration 2": [(19, 0.8)],
                                        "iteration 3": [(17, 0.75)]}
    assert line_series([{"step": 1, "loss": 1.0, "reward": True}, {"step": 2, "loss": 0.5}], "loss") == {"": [(1, 1.0), (2, 0.5)]}
    assert line_series([{"step": 1, "reward": True}], "reward") == {}  # a flag is not a figure


def test_overoptimization_points_are_in_kl_order_and_gold_peak_is_found():
    rows = [{"step": 1, "kl": 0.25, "reward": 1.0, "gold_score": 0.6}, {"step": 2, "kl": -0.01, "reward": 0.0, "gold_score": 0.3},
            {"step": 3, "kl": 1.0, "reward": 2.0, "gold_score": 0.4}, {"step": 4, "kl": 0.04, "reward": 0.5, "gold_score": 0.6},
            {"step": 5, "reward": 9.0, "gold_score": 0.9}]  # no KL logged: not a point
    pts = overoptimization_points(rows)
    assert pts == [(0.0, 0.3, 0.0), (0.2, 0.6, 0.5), (0.5, 0.6, 1.0), (1.0, 0.4, 2.0)]  # sqrt(0.04) = 0.2, sqrt(0.25) = 0.5
    assert gold_peak(pts) == (0.2, 0.6, 0.5)  # two equal highs: the one reached at the lower KL


# ---------------------------------------------------------------- Markdown

@pytest.mark.parametrize("text", [
    "**bold** and __also__ and *it* _it_", "`code` and ``two``", "a | b || c", "<script>alert(1)</script> & &amp; &#42;",
    "[link](http://x) ![img](y.png) \\n \\\\", "3*4*5 = 60\n18 * 3 = 54\nsnake_case_name _x_", "# not a heading\n- not a list\n1. nor this",
])
def test_escaped_text_renders_as_itself_in_a_table_cell_and_a_paragraph(text):
    md = "\n".join(["| a | b |", "|---|---|", f"| {md_escape(text)} | x |", "", f"**Label.** {md_escape(text)}"])
    html = render_html(md)
    assert "<script>" not in html
    cell = html.split("<td>")[1].split("</td>")[0]
    para = html.split("<strong>Label.</strong> ")[1].split("</p>")[0]
    assert _shown(cell) == text.strip() and _shown(para) == text.strip()


def test_plain_arithmetic_and_names_stay_readable_in_the_markdown():
    """Only what could be markup is escaped: a '*' between spaces or a '_' inside a word cannot be."""
    assert md_escape("18 * 3 = 54, dno_1, kl_from_reference") == "18 * 3 = 54, dno_1, kl_from_reference"
    assert md_escape("3*4 _x_ a|b `c`") == "3\\*4 \\_x\\_ a\\|b \\`c\\`"


def test_markdown_is_rendered_not_shown():
    html = render_html("# T\n\nRun directory: `runs/x`\n\n**Prompt 1.** text\n\n| a | b |\n|---|---|\n| 1 | 2 |\n")
    assert "<code>runs/x</code>" in html and "<strong>Prompt 1.</strong>" in html and "<td>1</td>" in html
    assert "**" not in _shown(html) and "`" not in _shown(html)


def test_absolute_paths_become_relative():
    here = Path.cwd()
    assert relative_paths(f"reward-model:{here / 'judges' / 'rm'}") == f"reward-model:{os.path.join('judges', 'rm')}"
    assert relative_paths(str(here / "a")) == "a"
    assert relative_paths("/") == os.path.relpath("/")
    assert relative_paths("judges/rm, 1/2 of it, P(a) = 0.5") == "judges/rm, 1/2 of it, P(a) = 0.5"


def test_a_nested_section_is_tables_by_shape_not_json():
    section = {"rm": {"heldout": {"accuracy": 0.625, "pairs": 40}, "agreement": {"model": _ci(0.7, 0.6, 0.8, 30)}},
               "prm": {"heldout": {"step_accuracy": 0.75, "steps": 50}},
               "orm": {"heldout": {"step_accuracy": 0.7, "steps": 20}},
               "probe": {"judge": {"P(a > b)": 0.9}, "bt": {"P(a > b)": 0.4}},
               "cycle": "a ≻ b ≻ a", "shares": [0.25, 0.75], "selected": {}}
    assert section_tables(section, "model") == [
        "| model | accuracy | pairs | model |", "|---|---|---|---|", "| rm | 0.625 | 40 | 0.700 [0.600, 0.800], n = 30 |", "",
        "| model | step_accuracy | steps |", "|---|---|---|", "| prm | 0.750 | 50 |", "| orm | 0.700 | 20 |", "",
        "| model | judge: P(a > b) | bt: P(a > b) |", "|---|---|---|", "| probe | 0.900 | 0.400 |", "",
        "|  | value |", "|---|---|", "| cycle | a ≻ b ≻ a |", "| shares | 0.250, 0.750 |", "| selected | – |", ""]
    assert section_tables([1, 2]) == ["|  | value |", "|---|---|", "| value | 1, 2 |", ""]


# ---------------------------------------------------------------- the whole report

class _Sections(HTMLParser):
    """For each <h2>: the tags met before the next <h2>."""

    def __init__(self):
        super().__init__()
        self.sections: list[tuple[str, set]] = []
        self._in_h2 = False

    def handle_starttag(self, tag, attrs):
        if tag == "h2":
            self.sections.append(("", set()))
            self._in_h2 = True
        elif self.sections:
            self.sections[-1][1].add(tag)

    def handle_endtag(self, tag):
        self._in_h2 = self._in_h2 and tag != "h2"

    def handle_data(self, data):
        if self._in_h2:
            self.sections[-1] = (self.sections[-1][0] + data, self.sections[-1][1])


def test_every_section_is_a_table_or_a_plot_and_no_path_is_absolute(tmp_path):
    out = fake_run(tmp_path / "run")
    write_report(out)
    md, html = (out / "report.md").read_text(), (out / "report.html").read_text()
    p = _Sections()
    p.feed(html)
    titles = [t for t, _ in p.sections]
    assert titles == ["Policies on held-out prompts", "Reward models", "Best-of-n reranking", "Stages", "Over-optimization",
                      "DNO iterations", "Training curves", "Sample responses"]
    assert [t for t, tags in p.sections if not tags & {"table", "img", "svg"}] == []
    assert "```" not in md and "{" not in _shown(html)  # no JSON dump
    absolute = re.compile(rf"(^|[^\w.]){re.escape(str(tmp_path))}")  # the run dir, not as part of a relative path
    assert not absolute.search(md) and not absolute.search(html)
    assert f"Run directory: `{os.path.relpath(out)}`" in md
    shown = _shown(html)
    assert "**" not in shown and "`" not in shown
    assert "5 * 1 = 5 | dno_1" in shown  # a sample's '*' and '|' shown as written
    for img in ("overoptimization", "dno_iterations", "reward", "ppo", "dno", "sft"):
        assert f"(plots/{img}.png)" in md and (out / "plots" / f"{img}.png").stat().st_size > 0
    # The reward models' figures, each model in a table with the models measured alike.
    assert "| rm | 0.625 | 0.500 | 0.050 | 40 | 0.700 [0.600, 0.800], n = 30 | 0.900 [0.800, 0.950], n = 30 |" in md
    assert "| prm | 0.750 | 0.800 | 0.600 | 0.400 | 50 |\n| orm | 0.700 | 0.750 | 0.550 | 0.450 | 20 |" in md
    # Gold peaks at step 5 (KL 0.49); the largest KL is step 4's 1.0.
    assert "| ppo | 5 | 0.490 | 0.500 | 0.000 | 1.000 | 0.380 | 0.500 |" in md


def test_the_bias_section_has_a_table_per_group_the_run_measured(tmp_path):
    """Reward-model length figures, raw vs length-controlled win rates, and a judge's position bias, each in
    its own table under "Bias" (between the stages' sections and "Stages"); summary.json keeps them as data."""
    out = fake_run(tmp_path / "run")
    reward = json.loads((out / "reward" / "metrics.json").read_text())
    reward["models"] = {"rm": {"length_bias": {
        "unit": "tokens", "baselines": {"longer_wins": 0.75, "shorter_wins": 0.25, "ties": 0.1, "pairs": 40},
        "split": {"chosen_longer": {"accuracy": 0.9, "n": 26}, "chosen_shorter": {"accuracy": None, "n": 0}},
        "spearman_score_length": 0.625}}}
    _write(out / "reward" / "metrics.json", reward)
    ev = json.loads((out / "eval" / "metrics.json").read_text())
    ev["policies"]["ppo"].update({"lc_win_rate_vs_sft": {**_ci(0.52, 0.45, 0.6, 16), "length_coef": 1.5, "length_sd": 3.0},
                                  "reference_length": _ci(12.0, 11.0, 13.0, 16)})
    _write(out / "eval" / "metrics.json", ev)
    _write(out / "label" / "metrics.json", {"judge": "llm:judge.gguf", "position_bias": {
        "share_order_decides": 0.375, "first_slot_preference": 0.7, "n": 48, "n_undecided": 0, "average_orders": True,
        "max_position_bias": 0.2}})
    summary = write_report(out)
    assert summary["bias"]["policies"]["ppo"] == {"win_rate": _ci(0.5, 0.4, 0.6, 16), "lc_win_rate": _ci(0.52, 0.45, 0.6),
                                                  "length_coef": 1.5, "response_length": _ci(20.0, 18.0, 22.0, 16),
                                                  "reference_length": _ci(12.0, 11.0, 13.0, 16)}
    assert set(summary["bias"]) == {"reward_models", "policies", "judges"}
    md, html = (out / "report.md").read_text(), (out / "report.html").read_text()
    p = _Sections()
    p.feed(html)
    titles = [t for t, _ in p.sections]
    assert titles.index("Bias") == titles.index("Stages") - 1
    assert "table" in dict(p.sections)["Bias"]
    assert "| rm | 0.750 | 0.250 | 0.100 | 0.900 (n = 26) | – (n = 0) | 0.625 |" in md
    assert ("| ppo | 0.500 [0.400, 0.600] | 0.520 [0.450, 0.600] | 1.500 | 20.000 [18.000, 22.000] | "
            "12.000 [11.000, 13.000] |") in md
    assert "| llm:judge.gguf | 0.375 | 0.700 | 48 | yes | 0.200 |" in md
    assert "| sft |" not in md.split("## Bias")[1].split("## Stages")[0]  # policies without LC figures have no row


def test_the_policy_table_sets_sampled_figures_beside_the_greedy_ones(tmp_path):
    """Eval's sampled figures (``policies.NAME.sampled``): accuracy and the win rate each get a sampled column
    right after the greedy one, a second table holds every sampled figure, summary.json keeps them as data.
    base has none: "–" in its sampled columns and no row in the second table."""
    out = fake_run(tmp_path / "run")
    ev = json.loads((out / "eval" / "metrics.json").read_text())
    for name in ("sft", "ppo", "dno_1", "dno_2"):
        ev["policies"][name]["sampled"] = {"temperature": 0.7, "samples_per_prompt": 4, "gold_score": _ci(0.3, 0.2, 0.4, 16),
                                           "accuracy": _ci(0.25, 0.1, 0.4, 12), "win_rate_vs_sft": _ci(0.45, 0.35, 0.55, 16)}
    _write(out / "eval" / "metrics.json", ev)
    summary = write_report(out)
    assert summary["policies"]["sft"]["sampled"] == {"temperature": 0.7, "samples_per_prompt": 4,
                                                     "gold_score": _ci(0.3, 0.2, 0.4), "accuracy": _ci(0.25, 0.1, 0.4),
                                                     "win_rate_vs_sft": _ci(0.45, 0.35, 0.55)}
    md = (out / "report.md").read_text()
    table = md.split("## Policies on held-out prompts")[1].split("## ")[0]
    assert ("| policy | gold_score | accuracy | accuracy (T=0.7, 4/prompt) | abstain_rate | invented_number_rate | "
            "win_rate_vs_sft | win_rate_vs_sft (T=0.7, 4/prompt) | kl_from_reference | false_abstain_rate | finished_rate | "
            "response_length |") in table
    assert ("| sft | 0.500 [0.450, 0.550] | 0.400 [0.300, 0.500] | 0.250 [0.100, 0.400] | 0.500 [0.200, 0.800] | "
            "0.100 [0.000, 0.300] | 0.500 [0.400, 0.600] | 0.450 [0.350, 0.550] | – | 0.000 [0.000, 0.200] | "
            "1.000 [0.800, 1.000] | 20.000 [18.000, 22.000] |") in table
    assert "| base | 0.100 [0.050, 0.150] | 0.000 [-0.100, 0.100] | – |" in table
    sampled = table.split("Sampled (T=0.7, 4/prompt):")[1]
    assert "| policy | gold_score | accuracy | win_rate_vs_sft |" in sampled
    assert "| ppo | 0.300 [0.200, 0.400] | 0.250 [0.100, 0.400] | 0.450 [0.350, 0.550] |" in sampled
    assert "| base |" not in sampled
    assert "4 responses per prompt sampled at temperature 0.7" in table


def test_a_run_with_no_stage_output_writes_an_empty_report(tmp_path):
    """``stages=[]`` (or every stage skipped) on an empty output: a report with no figures, not a KeyError."""
    from rlhfkit.report import write_report

    summary = write_report(tmp_path)
    assert summary == {"policies": {}, "stages": {}}
    assert (tmp_path / "report.md").is_file() and (tmp_path / "report.html").is_file()
