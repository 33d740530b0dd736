"""FSDP2 on CPU: the shipped configs/accelerate/fsdp2.yaml under ``accelerate launch`` (2 processes, gloo) trains
SFT and the reward models to the weights one process reaches at the same global batch, and saves normal
Hugging Face directories that plain ``transformers`` loads; and what FSDP cannot do yet is refused, not half done.

accelerate alone never runs FSDP on CPU (it settles on DDP over gloo); ``distributed._fsdp_on_cpu`` promotes the
state. Each run's ``metrics.json`` records its engine, so a run that silently fell back to DDP fails here.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType

from conftest import scramble_step_labels, tiny_pipeline_overrides

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "configs/accelerate/fsdp2.yaml"),
          "--num_processes", "2", "--main_process_port", "0"]
REWARD = ["label.k=4", "label.chunk_size=8", "label.sampling.max_new_tokens=16",
          "reward.max_steps=6", "reward.lr=1e-3", "reward.batch_size=4", "reward.max_len=96",
          "reward.eval_batch_size=32", "reward.step_likelihood=true", "reward.log_every=1",
          "reward.center_coef=0.01", "reward.rerank.n=2", "reward.rerank.n_prompts=2", "reward.rerank.max_new_tokens=8"]


def _env():
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def _overrides(out: Path) -> list[str]:
    return [*tiny_pipeline_overrides(out), "pretrain.max_steps=6", "sft.max_steps=6", *REWARD]


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    """data → pretrain → sft → label in one process; the step labels rewritten as the DDP reward test does
    (alternating, unrelated to the text: every step has a gradient to synchronise)."""
    from rlhfkit.pipeline import load_pipeline_config, run_pipeline

    out = tmp_path_factory.mktemp("fsdp") / "one"
    run_pipeline(load_pipeline_config(None, [*_overrides(out), "stages=[data, pretrain, sft, label]"]))
    scramble_step_labels(out / "label" / "steps.jsonl")
    return out


def _launch_fsdp2(stage: str, out: Path) -> dict:
    """Run ``stage`` in ``out`` under ``accelerate launch --config_file configs/accelerate/fsdp2.yaml`` with 2
    processes; returns its metrics.json, which must say FSDP ran it."""
    r = subprocess.run([*LAUNCH, "-m", "rlhfkit.cli", stage, *_overrides(out)], env=_env(), capture_output=True, text=True,
                       timeout=600)  # a collective that one process skipped would hang both
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads((out / stage / "metrics.json").read_text())
    assert metrics["distributed"] == {"type": "FSDP", "processes": 2}, metrics["distributed"]
    return metrics


def _copy(src: Path, dst: Path, stages) -> None:
    for s in stages:
        shutil.copytree(src / s, dst / s)


def test_sft_under_fsdp2_equals_one_process_and_saves_a_plain_model(upstream, tmp_path):
    """SFT under FSDP2 (full shard, activation checkpointing: padded batches) follows one process (padding-free)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    two = tmp_path / "two"
    _copy(upstream, two, ("data", "pretrain"))
    metrics = _launch_fsdp2("sft", two)
    assert metrics["padding_free"] is False  # FSDP's activation checkpointing re-runs layers: no view attention
    one = upstream
    assert json.loads((one / "sft" / "metrics.json").read_text())["distributed"]["type"] == "NO"
    losses = [[json.loads(x)["loss"] for x in (o / "sft" / "log.jsonl").read_text().splitlines()] for o in (one, two)]
    assert len(losses[0]) == len(losses[1]) == 6
    assert losses[0] == pytest.approx(losses[1], rel=1e-4, abs=1e-5)
    w1, w2 = (load_file(o / "sft" / "model" / "model.safetensors") for o in (one, two))
    base = load_file(one / "pretrain" / "model" / "model.safetensors")
    assert w1.keys() == w2.keys()  # the tied output head saved once, as an unsharded model saves it
    assert max((w1[k] - base[k]).abs().max().item() for k in w1) > 1e-4  # it trained
    for k in w1:
        assert (w1[k] - w2[k]).abs().max().item() < 1e-4, k
    # The gathered directory is a plain transformers model, with one process's outputs.
    ids = torch.tensor([[1, 5, 9, 17, 33, 65, 7, 3]])
    with torch.no_grad():
        l1, l2 = (AutoModelForCausalLM.from_pretrained(str(o / "sft" / "model")).eval()(ids).logits for o in (one, two))
    assert (l1 - l2).abs().max().item() < 1e-4


def _plain_scores(model_dir: Path, inputs: list[list[int]]) -> torch.Tensor:
    """A scalar model's scores of token ids with transformers alone: AutoModel for the backbone, the head from
    scalar_head.safetensors applied at the last token (the layout of ``models.reward``)."""
    from safetensors.torch import load_file
    from transformers import AutoModel

    backbone = AutoModel.from_pretrained(str(model_dir)).eval()
    head = load_file(model_dir / "scalar_head.safetensors")
    out = []
    with torch.no_grad():
        for ids in inputs:
            hidden = backbone(input_ids=torch.tensor([ids])).last_hidden_state[0, -1]
            out.append(hidden @ head["weight"][0] + head["bias"][0])
    return torch.stack(out)


def test_reward_stage_under_fsdp2_equals_one_process_and_saves_plain_models(upstream, tmp_path):
    """The RM, the PRM (with its frozen step-likelihood LM inside the sharded model), the ORM and the cost model
    under FSDP2 reach one process's weights; held-out scoring and reranking run on the sharded models."""
    from safetensors.torch import load_file

    from rlhfkit.pipeline import load_pipeline_config, run_stage

    one, two = tmp_path / "one", tmp_path / "two"
    for out in (one, two):
        _copy(upstream, out, ("data", "pretrain", "sft", "label"))
    run_stage(load_pipeline_config(None, _overrides(one)), "reward", one)
    _launch_fsdp2("reward", two)
    logs = [[json.loads(x) for x in (o / "reward" / "log.jsonl").read_text().splitlines()] for o in (one, two)]
    losses = [[(r["model"], r["step"], r["loss"]) for r in log if "step" in r] for log in logs]
    assert len(losses[0]) == 4 * 6 and [x[:2] for x in losses[0]] == [x[:2] for x in losses[1]]
    assert [x[2] for x in losses[0]] == pytest.approx([x[2] for x in losses[1]], rel=1e-4, abs=1e-6)
    base = load_file(one / "sft" / "model" / "model.safetensors")
    for name in ("rm", "prm", "orm", "cost"):
        for f in ("model.safetensors", "scalar_head.safetensors"):
            w1, w2 = load_file(one / "reward" / name / f), load_file(two / "reward" / name / f)
            assert w1.keys() == w2.keys(), (name, f)
            for k in w1:
                assert (w1[k] - w2[k]).abs().max().item() < 1e-5, (name, f, k)
        w1 = load_file(one / "reward" / name / "model.safetensors")
        assert max((w1[k] - base["model." + k]).abs().max().item() for k in w1 if "model." + k in base) > 1e-4, name
    ref1, ref2 = (load_file(o / "reward" / "prm" / "reference_lm" / "model.safetensors") for o in (one, two))
    assert ref1.keys() == ref2.keys() and all(torch.equal(ref1[k], ref2[k]) for k in ref1)  # frozen, saved whole
    m1, m2 = (json.loads((o / "reward" / "metrics.json").read_text()) for o in (one, two))
    assert m1["models"]["prm"]["step_likelihood"]["weight"] == pytest.approx(m2["models"]["prm"]["step_likelihood"]["weight"], abs=1e-5)
    assert m1["models"]["rm"]["heldout"]["mean_margin"] == pytest.approx(m2["models"]["rm"]["heldout"]["mean_margin"], abs=1e-5)
    # Plain transformers reads the saved RM: the same scores from both runs, and they are the RM's own.
    from rlhfkit.models.reward import HeadInfo, encode
    from rlhfkit.models.reward_files import load_reward_model
    from rlhfkit.tasks.arith import format_prompt, gold_response, make_problems

    rm = load_reward_model(one / "reward" / "rm")
    problems = make_problems(3, seed=5, unanswerable_frac=0.0)
    pairs = [(format_prompt(p), gold_response(p)) for p in problems]
    info = HeadInfo(**json.loads((one / "reward" / "rm" / "scalar_head.json").read_text()))
    inputs = [encode(rm.tokenizer, info, q, a)[0] for q, a in pairs]  # the project's prompt rendering + EOS
    s1, s2 = _plain_scores(one / "reward" / "rm", inputs), _plain_scores(two / "reward" / "rm", inputs)
    assert (s1 - s2).abs().max().item() < 1e-4
    assert s1.tolist() == pytest.approx(rm.score([q for q, _ in pairs], [a for _, a in pairs]), abs=1e-4)


# ---------------------------------------------------------------- what the CPU shim and FSDP refuse


def _multi_cpu(n: int = 2):
    """What ``distributed._fsdp_on_cpu`` reads of an Accelerator that accelerate left as DDP over gloo."""
    return SimpleNamespace(num_processes=n, distributed_type=DistributedType.MULTI_CPU,
                           state=SimpleNamespace(distributed_type=DistributedType.MULTI_CPU))


@pytest.mark.parametrize("env, message", [
    ({"FSDP_VERSION": "1"}, "only FSDP2"),
    ({"FSDP_VERSION": "2", "FSDP_OFFLOAD_PARAMS": "true"}, "offload"),
])
def test_cpu_shim_refuses_fsdp1_and_offload(monkeypatch, env, message):
    from rlhfkit import distributed

    monkeypatch.setattr(distributed, "_cpu_only", lambda: True)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ValueError, match=message):
        distributed._fsdp_on_cpu(_multi_cpu())


@pytest.mark.parametrize("use_fsdp, processes", [("false", 2), ("true", 1)])
def test_cpu_shim_leaves_every_other_case_alone(monkeypatch, use_fsdp, processes):
    from rlhfkit import distributed

    monkeypatch.setattr(distributed, "_cpu_only", lambda: True)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", use_fsdp)
    monkeypatch.setenv("FSDP_VERSION", "1")  # would be refused if the shim looked at it
    acc = _multi_cpu(processes)
    assert distributed._fsdp_on_cpu(acc) is acc and acc.state.distributed_type == DistributedType.MULTI_CPU


def test_no_mid_stage_checkpoints_under_fsdp_and_a_found_one_is_refused(tmp_path, capsys):
    """Under FSDP a checkpoint would hold the first process's shards: none is written, and a checkpoint on
    disk (from a run without FSDP) or ``stop_after_steps`` is an error, never a half-restored run."""
    from rlhfkit.checkpoints import LoopCheckpoint, save_checkpoint
    from rlhfkit.config import ConfigError
    from rlhfkit.training import TrainConfig

    acc = SimpleNamespace(distributed_type=DistributedType.FSDP, is_main_process=True, wait_for_everyone=lambda: None)
    ckpt, net = tmp_path / "sft.ckpt", torch.nn.Linear(2, 1)
    loop = LoopCheckpoint(ckpt, TrainConfig(save_every=1), acc, None, "sft", keep_done=True)
    assert not loop.enabled and loop.resume({"model": net}, {}) == (0, {})
    assert "no mid-stage checkpoints under FSDP" in capsys.readouterr().out
    for step in (1, 2):
        loop.after_step(step, 4, {"model": net}, {})
    loop.save_done(4, {"model": net}, {})
    assert not ckpt.exists()
    with pytest.raises(ConfigError, match="stop_after_steps"):
        LoopCheckpoint(ckpt, TrainConfig(save_every=1, stop_after_steps=2), acc, None, "sft").resume({"model": net}, {})
    save_checkpoint(ckpt, 1, {"model": net}, {}, None, loop.config)
    with pytest.raises(ConfigError, match="resuming under FSDP is not supported"):
        loop.resume({"model": net}, {})


def test_lora_under_fsdp_is_refused_before_training(tiny_lm_dir):
    from rlhfkit.io import JsonlLog
    from rlhfkit.models.loading import load_causal_lm
    from rlhfkit.models.trainable import LoRAConfig, make_trainable
    from rlhfkit.training import TrainConfig, fit

    model = make_trainable(load_causal_lm(tiny_lm_dir), LoRAConfig(r=2))
    acc = SimpleNamespace(distributed_type=DistributedType.FSDP)
    with pytest.raises(NotImplementedError, match="LoRA under FSDP"):
        fit(model, 8, None, TrainConfig(batch_size=4, max_steps=1), acc, JsonlLog(Path("unused.jsonl"), enabled=False), name="sft")


@pytest.mark.parametrize("stage", ["ppo", "dno", "intransitive"])
def test_stages_that_read_the_model_outside_its_forward_refuse_fsdp(stage, tmp_path):
    from rlhfkit.recipes import dno, intransitive, ppo
    from rlhfkit.stage import StageContext

    run = {"ppo": ppo.run, "dno": dno.run, "intransitive": intransitive.run}[stage]
    ctx = StageContext(out=tmp_path, stage_dir=tmp_path / f"{stage}.partial", name=stage,
                       accelerator=SimpleNamespace(distributed_type=DistributedType.FSDP))
    with pytest.raises(NotImplementedError, match=f"{stage}: not supported under FSDP"):
        run(None, ctx)
