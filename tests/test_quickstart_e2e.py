"""End to end: the bundled quickstart, and the figures the issues promise (slow tier).

Runs `rlhfkit quickstart` exactly as `make quickstart` does and checks summary.json. It takes
the quickstart's full time (minutes), so it is marked slow: `make test-slow` runs it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def summary(tmp_path_factory):
    out = tmp_path_factory.mktemp("qs") / "out"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    r = subprocess.run([sys.executable, "-m", "rlhfkit.cli", "quickstart", "--out", str(out)], env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "report.md").exists() and (out / "report.html").exists()
    return json.loads((out / "summary.json").read_text()) | {"_out": str(out)}


def test_sft_is_20_points_above_base_on_heldout_accuracy(summary):
    base = summary["policies"]["base"]["accuracy"]["mean"]
    sft = summary["policies"]["sft"]["accuracy"]["mean"]
    assert sft >= base + 0.20, (base, sft)


def test_every_quickstart_policy_and_stage_is_reported(summary):
    assert {"base", "sft", "ppo", "dpo", "dno_1", "dno_2", "dno_3"} <= set(summary["policies"])
    assert {"data", "pretrain", "sft", "label", "reward", "ppo", "dpo", "dno", "eval"} <= set(summary["stages"])
    for name in ("prm", "orm", "majority"):
        lo, hi = summary["reranking"][name]["accuracy"]["ci95"]
        assert lo <= summary["reranking"][name]["accuracy"]["mean"] <= hi


def _win(summary, name):
    return summary["policies"][name]["win_rate_vs_sft"]


def test_sft_accuracy_is_well_above_half_and_below_its_best_of_n_ceiling(summary):
    """Issue 21: arithmetic within the model's reach (docs/task.md): SFT's greedy accuracy on answerable
    problems well above half, below the share of prompts where any of 16 samples is right."""
    sft = summary["policies"]["sft"]["accuracy"]["mean"]
    ceiling = summary["reranking"]["oracle_best_of_n"]["accuracy"]["mean"]
    assert 0.65 <= sft < ceiling, (sft, ceiling)


def test_dpo_and_dno_beat_sft_and_dno_rises_above_dpo(summary):
    """Issue 21's figures for the preference-optimisation methods: the 95% CI of the win rate against SFT
    above 0.5 for dpo and dno_3, dno_3 above dno_1 and above dpo (greedy eval, one seed)."""
    for name in ("dpo", "dno_3"):
        assert _win(summary, name)["ci95"][0] > 0.5, (name, _win(summary, name))
    win = {k: _win(summary, k)["mean"] for k in ("dpo", "dno_1", "dno_3")}
    assert win["dno_3"] > win["dno_1"] and win["dno_3"] > win["dpo"], win


def test_preference_methods_keep_sfts_accuracy(summary):
    """Issue 21: no DPO/DNO policy's answerable accuracy below SFT's by more than SFT's CI (its lower bound);
    PPO's below."""
    lo = summary["policies"]["sft"]["accuracy"]["ci95"][0]
    acc = {k: summary["policies"][k]["accuracy"]["mean"] for k in ("dpo", "dno_1", "dno_2", "dno_3")}
    assert all(a >= lo for a in acc.values()), (lo, acc)


def test_ppo_keeps_sfts_accuracy(summary):
    """Issue 21: PPO's answerable accuracy not below SFT's CI (its lower bound). With PPO-ptx (``ptx_coef`` 3) and
    unwhitened scores the quickstart's PPO gave 0.787 against SFT's 0.756 [0.684, 0.816] (600 bf16 pretraining
    steps); with the old 900 fp32 steps, without ptx, 0.750 against 0.831: its arithmetic drifted (docs/task.md)."""
    lo = summary["policies"]["sft"]["accuracy"]["ci95"][0]
    assert summary["policies"]["ppo"]["accuracy"]["mean"] >= lo, (summary["policies"]["ppo"]["accuracy"], lo)


def test_ppo_wins_065_against_sft_with_its_ci_above_half(summary):
    """Issue 21's PPO figure, the quickstart's seed: win rate against SFT at least 0.65 with the 95% CI above 0.5
    (0.6575 [0.6225, 0.6925] by hand on the same settings). Over seeds it is not reliable (docs/task.md, "Over
    seeds"): the flip of the filler line's greedy decision does not happen on every seed."""
    win = _win(summary, "ppo")
    assert win["mean"] >= 0.65 and win["ci95"][0] > 0.5, win


def test_prm_best_of_16_beats_orm_on_the_heldout_prompts(summary):
    """Issue 3's figure on the report's 100 held-out prompts: best-of-16 by the PRM (min over steps) is
    more often right than by the ORM. (PRM against majority vote is measured on 500 fresh prompts below:
    100 prompts cannot separate them. With the 600-step bf16 pretraining: PRM 0.77, majority 0.74, ORM 0.59
    here; 0.83 / 0.77 / 0.57 with the old 900 fp32 steps.)"""
    acc = {k: summary["reranking"][k]["accuracy"]["mean"] for k in ("prm", "orm", "majority")}
    assert acc["prm"] > acc["orm"], acc


def test_prm_best_of_16_beats_majority_vote_on_500_fresh_prompts(summary, tmp_path):
    """The quickstart's PRM, ORM and RM rerank 16 SFT samples of 500 new task prompts that share no
    question with the run's data (scripts/fresh_task_prompts.py): the PRM's pick is more often right
    than majority vote's and the ORM's. Measured: PRM 0.824 [0.788, 0.855], majority 0.810 [0.773, 0.842],
    ORM 0.640 with the 600-step bf16 pretraining (2026-12-02); 0.594 / 0.544 / 0.332 with the old 900 fp32 steps."""
    import dataclasses
    from pathlib import Path

    from rlhfkit.models.reward_files import load_reward_model
    from rlhfkit.pipeline import load_pipeline_config
    from rlhfkit.stage import StageContext
    from rlhfkit.tasks.arith_eval import rerank
    from rlhfkit.distributed import make_accelerator

    out = Path(summary["_out"])
    fresh = tmp_path / "fresh.jsonl"
    script = Path(__file__).parents[1] / "scripts" / "fresh_task_prompts.py"
    subprocess.run([sys.executable, str(script), str(out), "500", str(fresh)], check=True)
    cfg = load_pipeline_config(Path(__file__).parents[1] / "src/rlhfkit/configs/quickstart.yaml").reward
    cfg = dataclasses.replace(cfg, rerank=dataclasses.replace(cfg.rerank, data=str(fresh), n_prompts=500))
    models = {name: load_reward_model(out / "reward" / name) for name in ("prm", "orm", "rm")}
    ctx = StageContext(out=out, stage_dir=tmp_path, name="reward", accelerator=make_accelerator())
    result = rerank(cfg.rerank, ctx, models)
    acc = {k: result[k]["accuracy"]["mean"] for k in ("prm", "orm", "majority")}
    assert result["n_prompts"] == 500
    assert acc["prm"] > acc["majority"] and acc["prm"] > acc["orm"], acc
