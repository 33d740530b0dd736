"""Exactness of the training loop: 2 processes = 1 process, accumulation = bigger batch, sharding."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import tiny_pipeline_overrides
from rlhfkit.training import global_batches, shard


def test_global_batches_deterministic_and_resumable():
    a = list(global_batches(10, 4, 6, seed=3))
    assert all(len(b) == 4 for b in a) and len(a) == 6
    assert a == list(global_batches(10, 4, 6, seed=3))
    # Resuming at step 4 yields exactly the remaining batches.
    assert list(global_batches(10, 4, 6, seed=3, start_step=4)) == a[4:]
    # Within an epoch (2 batches of 4 from 10) no example repeats.
    assert len(set(a[0]) | set(a[1])) == 8


def test_shard_covers_the_global_batch_once():
    idx = list(range(12))
    parts = [shard(idx, grad_accum_steps=3, rank=r, world_size=2) for r in range(2)]
    # accumulation step a, rank r: contiguous quarter-slices of each third.
    assert parts[0] == [[0, 1], [4, 5], [8, 9]] and parts[1] == [[2, 3], [6, 7], [10, 11]]
    with pytest.raises(ValueError, match="not divisible"):
        shard(list(range(10)), 3, 0, 2)


def _losses(stage_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (stage_dir / "log.jsonl").read_text().splitlines()]


def _env():
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def _prepare(tmp_path: Path, name: str) -> tuple[Path, list[str]]:
    out = tmp_path / name
    overrides = tiny_pipeline_overrides(out) + ["pretrain.max_steps=6", "sft.max_steps=6"]
    subprocess.run([sys.executable, "-m", "rlhfkit.cli", "data", *overrides], check=True, env=_env(), capture_output=True)
    return out, overrides


def test_two_processes_equal_one_at_the_same_global_batch(tmp_path):
    """torchrun --nproc_per_node 2 (gloo on CPU) gives the same loss trajectory as one process."""
    out1, ov1 = _prepare(tmp_path, "one")
    out2 = tmp_path / "two"
    shutil.copytree(out1 / "data", out2 / "data")
    ov2 = [o.replace(str(out1), str(out2)) for o in ov1]
    r1 = subprocess.run([sys.executable, "-m", "rlhfkit.cli", "pretrain", *ov1], env=_env(), capture_output=True, text=True)
    assert r1.returncode == 0, r1.stderr[-2000:]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    r2 = subprocess.run([*torchrun, "-m", "rlhfkit.cli", "pretrain", *ov2], env=_env(), capture_output=True, text=True)
    assert r2.returncode == 0, r2.stderr[-3000:]
    l1, l2 = _losses(out1 / "pretrain"), _losses(out2 / "pretrain")
    assert len(l1) == len(l2) == 6
    # Same data, same init, same global batch: only float summation order differs.
    assert l1 == pytest.approx(l2, rel=1e-4, abs=1e-5)
    # And it trained: the loss moved.
    assert l1[-1] < l1[0]
    # Rank 0 wrote one model; both runs end with the same weights.
    from safetensors.torch import load_file

    w1 = load_file(out1 / "pretrain" / "model" / "model.safetensors")
    w2 = load_file(out2 / "pretrain" / "model" / "model.safetensors")
    assert w1.keys() == w2.keys()
    for k in w1:
        assert (w1[k] - w2[k]).abs().max().item() < 1e-4, k


def test_gradient_accumulation_equals_bigger_batch(tmp_path):
    """batch 8 in one step == batch 8 as 4 micro-batches of 2, on SFT with uneven response lengths."""
    from rlhfkit.pipeline import load_pipeline_config, run_stage

    out, overrides = _prepare(tmp_path, "acc")
    cfg = load_pipeline_config(None, overrides)
    run_stage(cfg, "pretrain", out)
    run_stage(cfg, "sft", out)
    base = _losses(out / "sft")
    shutil.rmtree(out / "sft")
    cfg_acc = load_pipeline_config(None, overrides + ["sft.grad_accum_steps=4"])
    run_stage(cfg_acc, "sft", out)
    assert _losses(out / "sft") == pytest.approx(base, rel=1e-5, abs=1e-6)
