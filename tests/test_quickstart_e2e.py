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
    return json.loads((out / "summary.json").read_text())


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


def test_dno_rises_over_its_iterations_and_ends_above_dpo(summary):
    """Issue 5's figure: DNO's win rate against SFT rises over 3 iterations and ends above offline DPO's."""
    win = {k: summary["policies"][k]["win_rate_vs_sft"]["mean"] for k in ("dpo", "dno_1", "dno_2", "dno_3")}
    assert win["dno_1"] < win["dno_2"] < win["dno_3"], win
    assert win["dno_3"] > win["dpo"], win


def test_prm_best_of_16_beats_orm_and_majority_vote(summary):
    """Issue 3's figure: best-of-16 by the PRM (min over steps) is more often right than by the ORM or
    by majority vote over final answers, on the same held-out samples."""
    acc = {k: summary["reranking"][k]["accuracy"]["mean"] for k in ("prm", "orm", "majority")}
    assert acc["prm"] > acc["orm"] and acc["prm"] > acc["majority"], acc
