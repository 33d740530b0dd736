"""The peer reference (slow tier): TRL's DPO and GRPO on a small run's own SFT policy and data, judged by our eval
beside ours (bench/peer_quickstart.py), at reduced budgets. Needs TRL (the ``bench`` extra); skipped without it.

What must hold, and can fail: for DPO and GRPO, ours' and the peer's win rates against SFT on the held-out prompts
have overlapping 95% CIs (a peer trained on other data, at another learning rate, with the reward's sign flipped
or without its KL term lands outside); both sides' policies moved off the SFT policy (agreement is not two
untrained copies of it); the TRL DPO arm trained on exactly our pairs' token ids. The run is small (a 300-step
pretrain; its SFT policy's gold score about 0.17 against the quickstart's 0.56; 100 held-out prompts), so the win
rates' CIs are some ±6 points wide: this is agreement at that resolution, one seed. About 4 minutes on 2 cores.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]

# Small enough for minutes on 2 cores, large enough that the SFT policy answers some held-out prompts right
# (at a 200-step pretrain its gold score was 0.01: every figure 0.50 +- noise, a check of nothing).
RUN_OVERRIDES = [
    "stages=[data, pretrain, sft, label, dpo]",
    "task.n_pretrain_docs=3000", "task.n_sft=2000", "task.n_prompts=256", "task.n_heldout=100",
    "pretrain.max_steps=300", "sft.epochs=4",
    "label.n_prompts=128", "label.step_labels=oracle",
]
GRPO_BUDGET = ["--grpo-steps=8", "--grpo-prompts=8"]  # 8 rollouts of 8 prompts x 4 (the full bench: 30 x 16 x 4)


def env() -> dict:
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])),
                HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", TQDM_DISABLE="1")


@pytest.fixture(scope="module")
def figures(tmp_path_factory):
    pytest.importorskip("trl", reason="TRL is a bench-only extra (pip install -e '.[bench]'); the peer reference needs it")
    tmp = tmp_path_factory.mktemp("peer")
    run = tmp / "run"
    subprocess.run([sys.executable, "-m", "rlhfkit", "run", str(ROOT / "src" / "rlhfkit" / "configs" / "quickstart.yaml"),
                    f"out={run}", *RUN_OVERRIDES], check=True, env=env(), cwd=str(tmp),
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "peer_quickstart.py"), str(run), f"--work={tmp / 'work'}",
                        *GRPO_BUDGET], env=env(), cwd=str(tmp), capture_output=True, text=True)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    print(p.stdout)  # the table, shown with -s or on failure
    return json.loads(p.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("method", ["dpo", "grpo"])
def test_ours_and_trl_win_rates_agree_within_their_cis(figures, method):
    wr = figures["figures"][method]["win_rate_vs_sft"]
    assert wr["ci_overlap"], (f"{method}: ours {wr['ours']['mean']:.3f} {wr['ours']['ci95']} vs TRL "
                              f"{wr['peer']['mean']:.3f} {wr['peer']['ci95']}")


@pytest.mark.parametrize("method", ["dpo", "grpo"])
def test_both_sides_moved_off_the_sft_policy(figures, method):
    changed = figures["figures"][method]["changed_vs_sft"]
    assert changed["ours"] > 0 and changed["peer"] > 0, changed


def test_trl_dpo_trained_on_our_pairs_token_for_token(figures):
    d = figures["arms"]["trl_dpo"]
    assert d["pairs_with_identical_token_ids"] == d["n_pairs"] > 0
    assert d["optimizer_steps"] == d["expected_steps"] and d["mixed_precision"] == "no"
