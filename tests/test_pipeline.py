"""The pipeline: stages in order, atomic outputs, skipping on resume, the report, loadable models."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import tiny_pipeline_overrides
from rlhfkit.config import ConfigError
from rlhfkit.data.loading import DataError
from rlhfkit.pipeline import load_pipeline_config, run_pipeline, run_stage


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    cfg = load_pipeline_config(None, tiny_pipeline_overrides(out))
    run_pipeline(cfg)
    return out, cfg


def test_every_stage_writes_its_outputs(tiny_run):
    out, _ = tiny_run
    for stage in ("data", "pretrain", "sft", "eval"):
        assert (out / stage / "metrics.json").exists() and (out / stage / "config.yaml").exists()
        assert not (out / f"{stage}.partial").exists()
    for stage in ("pretrain", "sft"):
        m = json.loads((out / stage / "metrics.json").read_text())
        assert m["train_samples"] == 4 * 8 and m["train_runtime_s"] > 0
        rows = [json.loads(x) for x in (out / stage / "log.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [1, 2, 3, 4]
        assert {"loss", "lr", "grad_norm", "tokens_per_s"} <= rows[0].keys()


def test_summary_and_report(tiny_run):
    out, _ = tiny_run
    s = json.loads((out / "summary.json").read_text())
    assert set(s["policies"]) == {"base", "sft"}
    for name in ("base", "sft"):
        for metric in ("gold_score", "accuracy", "abstain_rate", "invented_number_rate", "win_rate_vs_sft"):
            v = s["policies"][name][metric]
            lo, hi = v["ci95"]
            assert lo <= v["mean"] <= hi
    # The SFT policy against itself: every comparison a tie.
    assert s["policies"]["sft"]["win_rate_vs_sft"]["mean"] == 0.5
    # Where base's wins and losses against SFT come from: the shares add up to its win rate − ½.
    assert set(s["win_sources"]) == {"base"}
    assert sum(s["win_sources"]["base"].values()) == pytest.approx(s["policies"]["base"]["win_rate_vs_sft"]["mean"] - 0.5)
    assert "Where the wins come from" in (out / "report.md").read_text()
    assert set(s["stages"]) == {"data", "pretrain", "sft", "eval"}
    md = (out / "report.md").read_text()
    assert "| sft |" in md and "plots/pretrain.png" in md
    assert (out / "plots" / "sft.png").stat().st_size > 0
    assert "<table" in (out / "report.html").read_text()


def test_eval_reports_sampled_figures_beside_greedy(tiny_run):
    """eval.sampled's defaults (T = 0.7, 4 per prompt): samples_sampled.jsonl holds 4 responses to each held-out
    prompt (in order, indexed 0-3) for each policy, and each sampled figure is the mean over prompts of the mean
    of that prompt's samples, with n counting prompts; the report shows them beside the greedy figures."""
    out, _ = tiny_run
    greedy = [json.loads(x) for x in (out / "eval" / "samples.jsonl").read_text().splitlines()]
    sampled = [json.loads(x) for x in (out / "eval" / "samples_sampled.jsonl").read_text().splitlines()]
    metrics = json.loads((out / "eval" / "metrics.json").read_text())["policies"]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    for name in ("base", "sft"):
        rows = [r for r in sampled if r["policy"] == name]
        prompts = [r["prompt"] for r in greedy if r["policy"] == name]
        assert len(rows) == 16 * 4 and [r["sample"] for r in rows] == [0, 1, 2, 3] * 16
        groups = [rows[i:i + 4] for i in range(0, len(rows), 4)]
        assert [g[j]["prompt"] for g in groups for j in range(4)] == [p for p in prompts for _ in range(4)]
        m = metrics[name]["sampled"]
        assert m["temperature"] == 0.7 and m["samples_per_prompt"] == 4
        assert m["gold_score"]["n"] == 16 and m["gold_score"]["mean"] == pytest.approx(mean([r["score"] for r in rows]))
        answerable = [g for g in groups if g[0]["answerable"]]
        assert m["accuracy"]["n"] == len(answerable)
        assert m["accuracy"]["mean"] == pytest.approx(mean([mean([r["correct"] for r in g]) for g in answerable]))
        assert "lc_win_rate_vs_sft" not in m
    assert any(len({r["response"] for r in g}) > 1 for g in [sampled[i:i + 4] for i in range(0, len(sampled), 4)])
    assert metrics["sft"]["sampled"]["win_rate_vs_sft"]["mean"] == 0.5  # the reference against itself, sample by sample
    s = json.loads((out / "summary.json").read_text())
    assert set(s["policies"]["base"]["sampled"]["accuracy"]) == {"mean", "ci95"}
    assert s["policies"]["base"]["sampled"]["samples_per_prompt"] == 4
    md = (out / "report.md").read_text()
    assert "| accuracy | accuracy (T=0.7, 4/prompt) |" in md and "| win_rate_vs_sft | win_rate_vs_sft (T=0.7, 4/prompt) |" in md


def test_model_dir_loads_with_plain_transformers_in_a_fresh_process(tiny_run):
    out, _ = tiny_run
    code = (
        "import sys; from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]); t = AutoTokenizer.from_pretrained(sys.argv[1])\n"
        "ids = t('Question: Tom has 3 apples.\\n', return_tensors='pt').input_ids\n"
        "print(m(ids).logits.shape[-1] == len(t))\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, "-c", code, str(out / "sft" / "model")], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().endswith("True")
    names = {p.name for p in (out / "sft" / "model").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pkl")) for n in names)  # no pickle


def test_complete_stages_are_skipped_on_resume(tiny_run, capsys):
    out, cfg = tiny_run
    before = {s: (out / s / "metrics.json").stat().st_mtime_ns for s in ("data", "pretrain", "sft", "eval")}
    run_pipeline(cfg)
    assert "pretrain: complete" in capsys.readouterr().out
    after = {s: (out / s / "metrics.json").stat().st_mtime_ns for s in before}
    assert before == after


def test_killed_stage_reruns_and_changed_config_is_refused(tiny_run, tmp_path):
    out, cfg = tiny_run
    # A half-written stage (killed mid-way) is a .partial directory: it is started over, not trusted.
    import shutil

    run2 = tmp_path / "r2"
    shutil.copytree(out / "data", run2 / "data")
    (run2 / "pretrain.partial").mkdir()
    (run2 / "pretrain.partial" / "junk").write_text("half")
    cfg2 = load_pipeline_config(None, tiny_pipeline_overrides(run2))
    assert run_stage(cfg2, "pretrain", run2) == "ran"
    assert not (run2 / "pretrain" / "junk").exists() and not (run2 / "pretrain.partial").exists()
    changed = load_pipeline_config(None, tiny_pipeline_overrides(run2) + ["pretrain.lr=0.5"])
    with pytest.raises(ConfigError, match="different config") as err:
        run_stage(changed, "pretrain", run2)
    # the error names what changed: the stored value, then the one asked for
    old_lr = cfg2.pretrain.lr
    assert f"(lr: {old_lr!r} → 0.5)" in str(err.value), str(err.value)


def test_pass_at_k_script_on_a_run(tiny_run):
    """scripts/pass_at_k.py (docs/task.md's arithmetic table) on the tiny run's SFT policy: one JSON line whose
    figures are shares, pass@k at least the per-sample accuracy (any of k right ≥ the mean of k)."""
    out, _ = tiny_run
    script = os.path.join(os.path.dirname(__file__), "..", "scripts", "pass_at_k.py")
    r = subprocess.run([sys.executable, script, str(out), str(out / "sft" / "model"), "2"], capture_output=True,
                       text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads(r.stdout.strip().splitlines()[-1])
    assert m["answerable_problems"] > 0
    assert 0 <= m["greedy_accuracy"] <= 1 and 0 <= m["per_sample_accuracy_t1"] <= m["pass@2_t1"] <= 1


def test_config_differences_names_nested_and_missing_keys():
    from rlhfkit.pipeline import config_differences

    saved = {"lr": 0.1, "lora": {"r": 0, "alpha": 16.0}, "old": 1}
    now = {"lr": 0.1, "lora": {"r": 8, "alpha": 16.0}, "padding_free": True}
    assert config_differences(saved, now) == "lora.r: 0 → 8; old: 1 → <absent>; padding_free: <absent> → True"
    assert config_differences(None, now) == "no saved config"
    many = config_differences({f"k{i}": i for i in range(7)}, {})
    assert many.endswith(", and 2 more") and many.count("→") == 5


def test_bad_data_fails_before_training_and_leaves_nothing_complete(tiny_run, tmp_path):
    out, _ = tiny_run
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "Question: a\\n", "response": "x"}\n{"prompt": "Question: b\\n", "response": ""}\n')
    run = tmp_path / "r3"
    cfg = load_pipeline_config(None, tiny_pipeline_overrides(run) + [f"sft.data={bad}", f"sft.model={out / 'pretrain' / 'model'}"])
    with pytest.raises(DataError, match=rf"{bad}:2: field 'response' is empty"):
        run_stage(cfg, "sft", run)
    assert not (run / "sft").exists()


def test_cli_stage_commands_smoke(tiny_run, tmp_path):
    """`rlhfkit sft` with unqualified overrides, and a clear CLI error on a bad key."""
    out, _ = tiny_run
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    run = tmp_path / "cli"
    base = [sys.executable, "-m", "rlhfkit.cli"]
    r = subprocess.run([*base, "sft", f"out={run}", f"model={out / 'pretrain' / 'model'}", f"data={out / 'data' / 'sft.jsonl'}",
                        "max_steps=2", "batch_size=4"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (run / "sft" / "model" / "model.safetensors").exists()
    r = subprocess.run([*base, "sft", f"out={run}", "lrr=3"], capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "unknown key 'sft.lrr'" in r.stderr
    r = subprocess.run([*base, "config", "--section", "sft"], capture_output=True, text=True, env=env)
    assert r.returncode == 0 and "sft.lr (float" in r.stdout


def test_report_shows_a_section_of_confidence_intervals_as_a_table():
    """The reranking section ({method: {"accuracy": {mean, ci95}}, "n": 16}) reads as a table; other shapes stay JSON."""
    from rlhfkit.report_tables import ci_table

    section = {"prm": {"accuracy": {"mean": 0.57, "ci95": [0.472, 0.663], "n": 100}},
               "majority": {"accuracy": {"mean": 0.51, "ci95": [0.413, 0.606], "n": 100}}, "n": 16}
    assert ci_table(section) == ["| | accuracy |", "|---|---|", "| prm | 0.570 [0.472, 0.663] |",
                                 "| majority | 0.510 [0.413, 0.606] |", "", "n = 16"]
    assert ci_table({"rm": {"heldout": {"accuracy": 0.6}}}) is None
    assert ci_table({"edges": [0.8, 0.78]}) is None


def test_a_setting_newer_than_the_run_at_its_default_is_no_difference(tiny_run):
    """A run finished before a setting existed (its saved config lacks the key) is still complete when the
    setting is at its default now, and changed when it is not."""
    import yaml

    from rlhfkit.pipeline import config_differences

    saved = {"lr": 0.1, "sampling": {"temperature": 1.0}}
    now = {"lr": 0.1, "ptx_coef": 0.0, "sampling": {"temperature": 1.0, "engine": "hf"}}
    defaults = {"lr": 0.2, "ptx_coef": 0.0, "sampling": {"temperature": 0.5, "engine": "hf"}}
    assert config_differences(saved, now, defaults=defaults) == ""
    assert config_differences(saved, {**now, "ptx_coef": 1.0}, defaults=defaults) == "ptx_coef: <absent> → 1.0"
    # through run_stage: the finished sft stage's saved config loses a key that is at its default
    out, cfg = tiny_run
    path = out / "sft" / "config.yaml"
    full = path.read_text()
    try:
        saved = yaml.safe_load(full)
        assert saved.pop("padding_free") is True
        path.write_text(yaml.safe_dump(saved))
        assert run_stage(cfg, "sft", out) == "skipped"
        off = load_pipeline_config(None, [*tiny_pipeline_overrides(out), "sft.padding_free=false"])
        with pytest.raises(ConfigError, match=r"padding_free: <absent> → False"):
            run_stage(off, "sft", out)
    finally:
        path.write_text(full)


def test_stages_in_their_own_processes_equal_one_process(tiny_run, tmp_path):
    """``stage_processes: true`` runs each stage in a fresh Python process from the run's saved config: the same
    weights (byte for byte) and the same figures as the tiny run in one process, the report written by the parent;
    a second run skips the complete stages without starting a process."""
    out, _ = tiny_run
    run = tmp_path / "sp"
    cfg = load_pipeline_config(None, tiny_pipeline_overrides(run) + ["stage_processes=true"])
    run_pipeline(cfg)
    for stage in ("pretrain", "sft"):
        assert (run / stage / "model" / "model.safetensors").read_bytes() == (out / stage / "model" / "model.safetensors").read_bytes()
    one, own = (json.loads((d / "summary.json").read_text())["policies"] for d in (out, run))
    assert own == one
    assert "stage_processes: true" in (run / "config.yaml").read_text()
    before = {s: (run / s / "metrics.json").stat().st_mtime_ns for s in ("data", "pretrain", "sft", "eval")}
    run_pipeline(cfg)
    assert before == {s: (run / s / "metrics.json").stat().st_mtime_ns for s in before}


def test_a_stage_failing_in_its_own_process_fails_the_run_and_leaves_nothing_complete(tiny_run, tmp_path):
    out, _ = tiny_run
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "Question: a\\n", "response": "x"}\n{"prompt": "Question: b\\n", "response": ""}\n')
    run = tmp_path / "r4"
    cfg = load_pipeline_config(None, tiny_pipeline_overrides(run) + [
        "stage_processes=true", "stages=[sft]", f"sft.data={bad}", f"sft.model={out / 'pretrain' / 'model'}"])
    with pytest.raises(RuntimeError, match=r"stage 'sft' failed in its own process \(exit status 1\)"):
        run_pipeline(cfg)
    assert not (run / "sft").exists() and not (run / "report.md").exists()
