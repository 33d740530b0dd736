"""Exactness of the training loop: 2 processes = 1 process, accumulation = bigger batch, sharding."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import scramble_step_labels, tiny_pipeline_overrides
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


def test_fit_makes_tensor_diagnostics_numbers_when_it_logs_averaged_in_python_floats():
    """Losses return diagnostics as 0-d tensors (``.item()`` would be a device sync per call); ``fit`` turns
    them into numbers on the steps it logs and averages them over micro-batches in Python floats, as it did
    when losses returned floats, so logged figures keep their last digit. Micro-batches with 0.1, 0.2, 0.7
    (float32): ((0 + a/3) + b/3) + c/3 in doubles is 0.33333333084980643; in float32, 0.3333333432674408.
    Checked to fail: with the mean accumulated on the float32 tensors (v / n, as the loop did with floats).
    """
    from accelerate import Accelerator

    from rlhfkit.training import TrainConfig, fit

    values = torch.tensor([0.1, 0.2, 0.7])
    calls = []

    def batch_loss(model, mine, idx):
        v = values[len(calls) % 3]
        calls.append(mine)
        loss = model(torch.ones(1, 1)).sum()
        return loss, loss.detach(), {"x": v, "n": torch.tensor(len(mine))}

    class Log:
        def __init__(self):
            self.rows = []

        def write(self, row):
            self.rows.append(row)

    cfg, log = TrainConfig(batch_size=3, grad_accum_steps=3, max_steps=2, log_every=1, warmup_steps=0), Log()
    fit(torch.nn.Linear(1, 1), 3, batch_loss, cfg, Accelerator(cpu=True), log, name="diagnostics")
    expected = 0.0
    for v in values.tolist():
        expected = expected + v / 3
    assert expected == 0.33333333084980643 and len(calls) == 6 and len(log.rows) == 2
    for row in log.rows:
        assert type(row["x"]) is float and row["x"] == expected, row
        assert type(row["n"]) is float and row["n"] == 1.0, row


def _losses(stage_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (stage_dir / "log.jsonl").read_text().splitlines()]


def _env():
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def _overrides(out: Path) -> list[str]:
    return tiny_pipeline_overrides(out) + ["pretrain.max_steps=6", "sft.max_steps=6"]


def _prepare(tmp_path: Path, name: str) -> tuple[Path, list[str]]:
    out = tmp_path / name
    overrides = _overrides(out)
    subprocess.run([sys.executable, "-m", "rlhfkit.cli", "data", *overrides], check=True, env=_env(), capture_output=True)
    return out, overrides


@pytest.fixture(scope="module")
def tiny_sft(tmp_path_factory) -> Path:
    """data, pretrain and sft of the tiny pipeline, run once (each in its own process) for the tests that start
    from an SFT policy; a test copies them into its own run directories (``_from_sft``)."""
    out = tmp_path_factory.mktemp("equivalence") / "base"
    for stage in ("data", "pretrain", "sft"):
        r = subprocess.run([sys.executable, "-m", "rlhfkit.cli", stage, *_overrides(out)], env=_env(),
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
    return out


def _from_sft(tiny_sft: Path, *outs: Path) -> None:
    for out in outs:
        for d in ("data", "pretrain", "sft"):
            shutil.copytree(tiny_sft / d, out / d)


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def _one_and_two(stage: str, ov1: list[str], ov2: list[str], env=None) -> None:
    """Run ``stage`` in one process with ``ov1``, then under torchrun in two with ``ov2``; both must succeed."""
    for cmd in ([sys.executable, "-m", "rlhfkit.cli", stage, *ov1], [*TORCHRUN, "-m", "rlhfkit.cli", stage, *ov2]):
        r = subprocess.run(cmd, env=env or _env(), capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-3000:]


def test_two_processes_equal_one_at_the_same_global_batch(tmp_path):
    """torchrun --nproc_per_node 2 (gloo on CPU) gives the same loss trajectory as one process."""
    out1, ov1 = _prepare(tmp_path, "one")
    out2 = tmp_path / "two"
    shutil.copytree(out1 / "data", out2 / "data")
    ov2 = [o.replace(str(out1), str(out2)) for o in ov1]
    _one_and_two("pretrain", ov1, ov2)
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


@pytest.mark.parametrize("algorithm", ["ppo", "grpo"])
def test_rl_two_processes_equal_one_at_the_same_global_batch(tmp_path, algorithm, tiny_sft):
    """PPO (critic, whitened scores and advantages) and GRPO under torchrun --nproc_per_node 2 follow
    one process: each process samples its half of the prompts with the seeds one process would
    use, statistics are reduced over both, and every minibatch is the same set of rows."""
    out1, out2 = tmp_path / "one", tmp_path / "two"
    ov = _overrides(out1)
    _from_sft(tiny_sft, out1, out2)
    # A reward every response gets a different value of (the tiny SFT policy never reaches a right
    # answer, so the judge would score every response 0): characters / 10, importable in the subprocesses.
    (tmp_path / "length_reward.py").write_text("def score(prompts, responses):\n    return [len(r) / 10 for r in responses]\n")
    env = dict(_env(), PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    group = ["ppo.group_size=2"] if algorithm == "grpo" else []
    rl = [f"ppo.algorithm={algorithm}", *group, "ppo.reward_source=callable", "ppo.reward_fn=length_reward:score",
          "ppo.prompts_per_step=8", "ppo.total_steps=3",
          "ppo.ppo_epochs=2", "ppo.minibatch_size=4", "ppo.sampling.batch_size=4", "ppo.sampling.max_new_tokens=40",
          "ppo.score_whiten=true", "ppo.save_every=0", "ppo.lr=1e-3", "ppo.critic_lr=1e-3"]
    _one_and_two("ppo", [*ov, *rl], [*(o.replace(str(out1), str(out2)) for o in ov), *rl], env)
    logs = [[json.loads(line) for line in (o / "ppo" / "log.jsonl").read_text().splitlines()] for o in (out1, out2)]
    assert len(logs[0]) == len(logs[1]) == 3
    # Batch-level figures (the update's per-micro-batch diagnostics are means of different splits).
    keys = ["reward", "reward_with_kl", "kl", "response_length", "finished_rate", "gold_score"]
    if algorithm == "ppo":
        keys += ["explained_variance"]
    for a, b in zip(*logs):
        for k in keys:
            assert a[k] == pytest.approx(b[k], rel=1e-3, abs=1e-5, nan_ok=True), (k, a[k], b[k])
    # Not a vacuous match: some rollout had differing scores, and an update moved the policy away
    # from the reference before a later rollout (which then matched too).
    assert any(0 < r["finished_rate"] < 1 for r in logs[0][:-1]) and logs[0][-1]["kl"] > 0, logs[0]
    from safetensors.torch import load_file

    w1 = load_file(out1 / "ppo" / "model" / "model.safetensors")
    w2 = load_file(out2 / "ppo" / "model" / "model.safetensors")
    base = load_file(out1 / "sft" / "model" / "model.safetensors")
    assert max((w1[k] - base[k]).abs().max().item() for k in w1) > 1e-4  # it trained
    for k in w1:
        assert (w1[k] - w2[k]).abs().max().item() < 1e-4, k
    if algorithm != "ppo":
        return
    # Kill both processes after the first checkpoint (rank 0 writes it); a 2-process rerun resumes
    # from it and still ends where one uninterrupted process did.
    out3 = tmp_path / "killed"
    _from_sft(tiny_sft, out3)
    ov3 = [o.replace(str(out1), str(out3)) for o in ov]
    rl3 = [a.replace("ppo.save_every=0", "ppo.save_every=1") for a in rl]
    cmd = [*TORCHRUN, "-m", "rlhfkit.cli", "ppo", *ov3, *rl3]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    meta = out3 / "ppo.ckpt" / "meta.json"
    deadline = time.time() + 300
    while not meta.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    # torchrun starts each worker in a session of its own: kill every process whose command line names the run.
    for pid in [int(d) for d in os.listdir("/proc") if d.isdigit()]:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if f"out={out3}" in cmdline.split("\0"):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    proc.wait()
    assert meta.exists(), "the run ended before its first checkpoint"
    assert not (out3 / "ppo").exists(), "killed too late: the stage had already completed"
    killed_at = json.loads(meta.read_text())["step"]
    r3 = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert r3.returncode == 0, r3.stderr[-3000:]
    assert f"resuming from {out3 / 'ppo.ckpt'} after step {killed_at}" in r3.stdout
    w3 = load_file(out3 / "ppo" / "model" / "model.safetensors")
    for k in w1:
        assert (w1[k] - w3[k]).abs().max().item() < 1e-4, k


def test_dno_two_processes_equal_one(tmp_path, tiny_sft):
    """DNO (sampling, oracle pairs, then DPO-style updates) under torchrun --nproc_per_node 2: the same
    iterates as one process, and the logged loss and rewards are those of the global batch."""
    out1, out2 = tmp_path / "one", tmp_path / "two"
    ov = _overrides(out1)
    _from_sft(tiny_sft, out1, out2)
    dno = ["dno.iterations=2", "dno.prompts_per_iteration=12", "dno.n_validation=8", "dno.batch_size=2",
           "dno.sampling.max_new_tokens=16", "dno.lr=1e-3"]
    _one_and_two("dno", [*ov, *dno], [*(o.replace(str(out1), str(out2)) for o in ov), *dno])
    from safetensors.torch import load_file

    m1, m2 = (json.loads((o / "dno" / "metrics.json").read_text())["iterations"] for o in (out1, out2))
    base = load_file(out1 / "sft" / "model" / "model.safetensors")
    for it in ("dno_1", "dno_2"):
        assert m1[it]["n_new_pairs"] == m2[it]["n_new_pairs"] > 0
        for key in ("final_loss", "final_chosen_reward", "final_rejected_reward"):
            assert m1[it][key] == pytest.approx(m2[it][key], rel=1e-3, abs=1e-6), (it, key)
        w1, w2 = (load_file(o / "dno" / it / "model" / "model.safetensors") for o in (out1, out2))
        assert max((w1[k] - base[k]).abs().max().item() for k in w1) > 1e-5  # it trained
        assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 1e-5


def test_reward_models_two_processes_equal_one_at_the_same_global_batch(tmp_path, tiny_sft):
    """The reward stage under torchrun --nproc_per_node 2 trains the RM, the PRM (with step
    likelihoods), the ORM and the cost model to the weights one process reaches.

    Each process scores its half of every global batch; the gradients meet only if the loss is
    computed through the DDP-wrapped model's forward (calling the inner model, as the stage once
    did, left each process training on its own half: weights apart by 6e-4 to 5e-3 here). The
    PRM's shares are weighted by their rated steps, and the LR schedule is stepped once a step."""
    out1 = tmp_path / "one"
    _from_sft(tiny_sft, out1)
    ov = _overrides(out1) + ["label.k=4", "label.chunk_size=8", "label.sampling.max_new_tokens=16",
           "reward.max_steps=6", "reward.lr=1e-3", "reward.batch_size=4", "reward.max_len=96",
           "reward.eval_batch_size=32", "reward.step_likelihood=true", "reward.log_every=1",
           "reward.center_coef=0.01",  # without it BT is blind to the head's bias: a zero gradient, Adam's noise
           "reward.rerank.n=2", "reward.rerank.n_prompts=2", "reward.rerank.max_new_tokens=8"]
    r = subprocess.run([sys.executable, "-m", "rlhfkit.cli", "label", *ov], env=_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    scramble_step_labels(out1 / "label" / "steps.jsonl")  # every step has a gradient to synchronise
    out2 = tmp_path / "two"
    shutil.copytree(out1, out2)
    _one_and_two("reward", ov, [o.replace(str(out1), str(out2)) for o in ov])
    from safetensors.torch import load_file

    logs = [[json.loads(x) for x in (o / "reward" / "log.jsonl").read_text().splitlines()] for o in (out1, out2)]
    losses = [[(r["model"], r["step"], r["loss"]) for r in log if "step" in r] for log in logs]
    assert len(losses[0]) == 4 * 6 and [x[:2] for x in losses[0]] == [x[:2] for x in losses[1]]
    # the logged loss is the whole batch's (a PRM share is weighted by its rated steps)
    assert [x[2] for x in losses[0]] == pytest.approx([x[2] for x in losses[1]], rel=1e-4, abs=1e-6)
    base = load_file(out1 / "sft" / "model" / "model.safetensors")
    assert (out1 / "reward" / "prm" / "reference_lm" / "config.json").exists()
    for name in ("rm", "prm", "orm", "cost"):
        for f in ("model.safetensors", "scalar_head.safetensors"):
            w1, w2 = load_file(out1 / "reward" / name / f), load_file(out2 / "reward" / name / f)
            assert w1.keys() == w2.keys()
            for k in w1:
                assert (w1[k] - w2[k]).abs().max().item() < 1e-5, (name, f, k)
        w1 = load_file(out1 / "reward" / name / "model.safetensors")
        moved = max((w1[k] - base["model." + k]).abs().max().item() for k in w1 if "model." + k in base)
        assert moved > 1e-4, name  # it trained (the PRM's head starts at 0, so its backbone moves from step 2)


_COMPARISON_DRIVER = '''
import dataclasses, sys
from pathlib import Path
from rlhfkit.distributed import make_accelerator
from rlhfkit.io import JsonlLog
from rlhfkit.recipes.intransitive import ComparisonModelConfig, train_comparison_model
from rlhfkit.tasks.arith import format_prompt, gold_response, make_problems

backbone, out = Path(sys.argv[1]), Path(sys.argv[2])
Pair = dataclasses.make_dataclass("Pair", ["prompt", "chosen", "rejected"])
probs = make_problems(16, seed=3, unanswerable_frac=0.0)
pairs = [Pair(format_prompt(p), gold_response(p), "Answer: " + str(p.answer + 1 + i % 3)) for i, p in enumerate(probs)]
cfg = ComparisonModelConfig(max_steps=4, batch_size=8, lr=1e-3, max_len=96, log_every=1)
for kind in ("pm", "bt"):
    acc = make_accelerator(cfg)
    log = JsonlLog(out / f"{kind}_log.jsonl", enabled=acc.is_main_process)
    train_comparison_model(kind, backbone, pairs, cfg, out / kind, acc, log)
    log.close()
# Both processes leave together, with the process group torn down: a rank that exits while gloo's
# threads are still up can abort ("terminate called without an active exception") under CPU load.
acc.wait_for_everyone()
import torch.distributed as dist
if dist.is_initialized():
    dist.destroy_process_group()
'''


def test_comparison_models_two_processes_equal_one(tiny_lm_dir, tmp_path):
    """The pairwise preference model and the BT model of the intransitive experiment under torchrun
    --nproc_per_node 2: each process scores half of every batch, and both end at one process's weights."""
    driver = tmp_path / "driver.py"
    driver.write_text(_COMPARISON_DRIVER)
    one, two = tmp_path / "one", tmp_path / "two"
    for cmd, out in (([sys.executable], one), (TORCHRUN, two)):
        out.mkdir()
        r = subprocess.run([*cmd, str(driver), str(tiny_lm_dir), str(out)], env=_env(), capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-3000:]
    from safetensors.torch import load_file

    base = load_file(tiny_lm_dir / "model.safetensors")
    for kind in ("pm", "bt"):
        logs = [[json.loads(x) for x in (o / f"{kind}_log.jsonl").read_text().splitlines()] for o in (one, two)]
        assert [r["loss"] for r in logs[0]] == pytest.approx([r["loss"] for r in logs[1]], rel=1e-4, abs=1e-6)
        for f in ("model.safetensors", "scalar_head.safetensors"):
            w1, w2 = load_file(one / kind / f), load_file(two / kind / f)
            for k in w1:
                assert (w1[k] - w2[k]).abs().max().item() < 1e-5, (kind, f, k)
        w1 = load_file(one / kind / "model.safetensors")
        assert max((w1[k] - base["model." + k]).abs().max().item() for k in w1) > 1e-4  # it trained
