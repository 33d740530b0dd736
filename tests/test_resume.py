"""Mid-stage resume and the non-finite guard, in every training stage.

Each training stage (pretrain, sft, reward, dpo, dno, ppo) is killed with SIGKILL at a random step after
its first checkpoint, rerun, and must end with the weights of an uninterrupted run, bit for bit (CPU,
same seed, one thread), its console saying that it resumed mid-stage. A NaN injected into the loss at
step k is skipped and counted; three in a row stop the stage with exit 2 and commit nothing; lr=1e6
never commits NaN weights; and on the normal path the guard leaves the weights bit-identical to the
loop without it.
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import tiny_pipeline_overrides

LABEL = ["label.k=4", "label.chunk_size=8", "label.sampling.max_new_tokens=16"]


def _env():
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    """data → pretrain → sft → label on the tiny config: what the stages under test read (copied per run)."""
    from rlhfkit.pipeline import load_pipeline_config, run_pipeline

    out = tmp_path_factory.mktemp("upstream") / "run"
    cfg = load_pipeline_config(None, [*tiny_pipeline_overrides(out), "stages=[data, pretrain, sft, label]", *LABEL])
    run_pipeline(cfg)
    return out


def _copy_upstream(upstream: Path, out: Path, stages: list[str]) -> None:
    for s in stages:
        shutil.copytree(upstream / s, out / s)


def _meta_step(meta: Path) -> int | None:
    try:
        return json.loads(meta.read_text())["step"]
    except (OSError, ValueError, KeyError):
        return None  # not written yet (meta.json is replaced atomically, so never half-written)


def _weights(stage_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    return {str(f.relative_to(stage_dir)): load_file(f) for f in sorted(stage_dir.rglob("*.safetensors"))}


# stage → (upstream stages, overrides, the checkpoint whose meta.json is polled, its save points to pick the kill from)
RESUME_CASES = {
    "pretrain": (["data"], ["pretrain.max_steps=40", "pretrain.save_every=4"], "pretrain.ckpt", [4, 8, 12, 16]),
    "sft": (["data", "pretrain"], ["sft.max_steps=40", "sft.save_every=4"], "sft.ckpt", [4, 8, 12, 16]),
    # rm trains to the end first; the kill lands in the PRM, so the rerun must not train the RM again.
    "reward": (["data", "pretrain", "sft", "label"],
               ["reward.train_orm=false", "reward.train_cost=false", "reward.rerank.enabled=false",
                "reward.max_steps=16", "reward.batch_size=4", "reward.max_len=96", "reward.eval_batch_size=32",
                "reward.save_every=2", "reward.log_every=1", "reward.lr=1e-3"],
               "reward.ckpt/prm", [2, 4, 6]),
    "dpo": (["data", "pretrain", "sft", "label"],
            ["dpo.max_steps=30", "dpo.batch_size=4", "dpo.save_every=3", "dpo.log_every=1", "dpo.lr=1e-3"],
            "dpo.ckpt", [3, 6, 9, 12]),
    # iteration 1 finishes (kept), the kill lands inside iteration 2's training.
    "dno": (["data", "pretrain", "sft"],
            ["dno.iterations=2", "dno.prompts_per_iteration=12", "dno.n_validation=8", "dno.batch_size=1",
             "dno.epochs=8", "dno.sampling.max_new_tokens=16", "dno.save_every=2", "dno.log_every=1", "dno.lr=1e-3"],
            "dno.ckpt/train_2", [2, 4, 6]),
    "ppo": (["data", "pretrain", "sft"],
            ["ppo.reward_source=judge", "ppo.prompts_per_step=4", "ppo.minibatch_size=2", "ppo.ppo_epochs=2",
             "ppo.total_steps=16", "ppo.save_every=2", "ppo.sampling.max_new_tokens=8", "ppo.lr=1e-3",
             "ppo.critic_lr=1e-3"],
            "ppo.ckpt", [2, 4, 6]),
}


@pytest.mark.parametrize("stage", list(RESUME_CASES))
def test_sigkill_at_a_random_step_then_rerun_ends_with_the_uninterrupted_weights(stage, upstream, tmp_path):
    needs, extra, ckpt_rel, save_points = RESUME_CASES[stage]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    cmd = lambda out: [sys.executable, "-m", "rlhfkit.cli", stage, *tiny_pipeline_overrides(out), *LABEL, *extra]  # noqa: E731
    for out in (whole, killed):
        _copy_upstream(upstream, out, needs)
    # The uninterrupted run goes alongside the one to be killed (one thread each; the results do not depend on load).
    reference = subprocess.Popen(cmd(whole), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    target, delay = random.choice(save_points), random.uniform(0.0, 0.05)
    proc = subprocess.Popen(cmd(killed), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    meta = killed / ckpt_rel / "meta.json"
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline and (_meta_step(meta) or 0) < target:
        time.sleep(0.005)
    time.sleep(delay)  # a random moment after that checkpoint: the kill lands between checkpoints or inside one
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole process group
    except ProcessLookupError:
        pass
    proc.wait()
    killed_at = _meta_step(meta)
    why = f"target checkpoint {target}, then {delay:.3f}s"
    assert killed_at is not None and killed_at >= target, f"the run ended before its checkpoint ({why})"
    assert not (killed / stage).exists(), f"killed too late: the stage had already completed ({why})"
    assert reference.wait() == 0, reference.stderr.read()[-3000:]

    resumed = subprocess.run(cmd(killed), env=_env(), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {killed / ckpt_rel} after step {killed_at}" in resumed.stdout, (why, resumed.stdout)
    if stage == "reward":  # the RM had finished before the kill: kept, not trained again
        assert f"reward/rm: trained to the end before the restart ({killed / 'reward.ckpt' / 'rm'})" in resumed.stdout
    if stage == "dno":  # iteration 1 had finished: kept, not sampled or trained again
        assert f"dno: resuming from {killed / 'dno.ckpt' / 'iteration'} after iteration 1" in resumed.stdout
    a, b = _weights(whole / stage), _weights(killed / stage)
    assert a.keys() == b.keys() and a, (a.keys(), b.keys())
    for f in a:
        assert a[f].keys() == b[f].keys()
        assert all(torch.equal(a[f][k], b[f][k]) for k in a[f]), f"{f} differs ({why})"
    # The log is the uninterrupted run's: the lines after the checkpoint were redone, not duplicated.
    log = lambda out: [json.loads(x) for x in (out / stage / "log.jsonl").read_text().splitlines()]  # noqa: E731
    key = lambda r: (r.get("model"), r.get("step"), r.get("iteration"), r.get("loss"))  # noqa: E731
    assert [key(r) for r in log(killed)] == [key(r) for r in log(whole)]
    # ...and the weights are equal because resumed, not because nothing trained.
    start = {"sft": "pretrain", "dpo": "sft", "dno": "sft", "ppo": "sft"}.get(stage)
    if start:
        base, trained = _weights(upstream / start)["model/model.safetensors"], a["model/model.safetensors"]
        assert any(not torch.equal(trained[k], base[k]) for k in base)
    else:  # pretrain from scratch, the reward models on a fresh head: their losses moved
        losses = [r["loss"] for r in log(whole) if "loss" in r and r.get("model") in (None, "prm")]
        assert losses[-1] != losses[0]
    assert not (killed / f"{stage}.ckpt").exists(), "a complete stage's checkpoints are removed"


# ---------------------------------------------------------------- the non-finite guard

def _stage_out(upstream: Path, tmp_path: Path, needs: list[str]) -> Path:
    out = tmp_path / "run"
    _copy_upstream(upstream, out, needs)
    return out


def _nan_at(monkeypatch, target, name: str, steps: set[int]):
    """Patch ``target.name`` so that the loss it returns on its calls numbered ``steps`` (1-based) is NaN."""
    real = getattr(target, name)
    calls = {"n": 0}

    def patched(*args, **kwargs):
        calls["n"] += 1
        out = real(*args, **kwargs)
        if calls["n"] not in steps:
            return out
        if isinstance(out, tuple):
            return (out[0] * float("nan"), *out[1:])
        return out * float("nan")

    monkeypatch.setattr(target, name, patched)
    return calls


def _finite_weights(model_dir: Path) -> bool:
    from safetensors.torch import load_file

    return all(torch.isfinite(w).all() for f in model_dir.rglob("*.safetensors") for w in load_file(f).values())


def _sft_argv(out: Path, *extra: str) -> list[str]:
    return ["sft", *tiny_pipeline_overrides(out), "sft.max_steps=8", "sft.save_every=0", *extra]


def test_a_nan_loss_is_skipped_and_counted_in_metrics(upstream, tmp_path, monkeypatch):
    """NaN at step 3: that update is skipped (no optimizer or scheduler step), the run completes with finite
    weights, and metrics.json counts the step. Without the guard the NaN gradient would reach every weight."""
    import rlhfkit.training
    from rlhfkit.cli import main

    out = _stage_out(upstream, tmp_path, ["data", "pretrain"])
    _nan_at(monkeypatch, rlhfkit.training, "token_loss_sum", {3})
    assert main(_sft_argv(out)) == 0
    metrics = json.loads((out / "sft" / "metrics.json").read_text())
    assert metrics["skipped_nonfinite_steps"] == 1 and metrics["skipped_nonfinite_at"] == [3]
    assert _finite_weights(out / "sft")
    log = [json.loads(x) for x in (out / "sft" / "log.jsonl").read_text().splitlines()]
    assert math.isnan(log[2]["loss"]) and all(math.isfinite(r["loss"]) for r in log if r["step"] != 3)
    # The scheduler did not step at 3: the warm-up's lr (linear in the steps taken) stands still for one step.
    lrs = [r["lr"] for r in log]
    assert lrs[2] == lrs[1] and lrs[3] > lrs[2] and lrs[1] > lrs[0]


@pytest.mark.parametrize("stage", ["dpo", "reward", "ppo"])
def test_a_nan_loss_is_skipped_in_the_other_loops(stage, upstream, tmp_path, monkeypatch):
    """The same guard in DPO's, the reward models' and PPO's loops (PPO counts optimizer steps)."""
    import rlhfkit.recipes.dpo
    import rlhfkit.recipes.ppo
    import rlhfkit.recipes.reward
    from rlhfkit.cli import main

    out = _stage_out(upstream, tmp_path, ["data", "pretrain", "sft", "label"])
    target, name, extra = {
        "dpo": (rlhfkit.recipes.dpo, "dpo_loss", ["dpo.max_steps=6", "dpo.batch_size=4"]),
        "reward": (rlhfkit.recipes.reward, "bradley_terry_loss",
                   ["reward.train_prm=false", "reward.train_orm=false", "reward.train_cost=false",
                    "reward.rerank.enabled=false", "reward.max_steps=6", "reward.batch_size=4", "reward.max_len=96"]),
        "ppo": (rlhfkit.recipes.ppo, "ppo_policy_loss",  # patched where the recipe looks it up
                ["ppo.reward_source=judge", "ppo.prompts_per_step=4", "ppo.minibatch_size=2", "ppo.ppo_epochs=1",
                 "ppo.total_steps=3", "ppo.sampling.max_new_tokens=8"]),
    }[stage]
    _nan_at(monkeypatch, target, name, {2})
    assert main([stage, *tiny_pipeline_overrides(out), *extra, f"{stage}.save_every=0"]) == 0
    metrics = json.loads((out / stage / "metrics.json").read_text())
    assert metrics["skipped_nonfinite_steps"] == 1
    if stage == "reward":  # the stage's total, and each model's own
        metrics = metrics["models"]["rm"]
    assert metrics["skipped_nonfinite_steps"] == 1 and metrics["skipped_nonfinite_at"] == [2]
    assert _finite_weights(out / stage)


def test_three_nan_steps_in_a_row_stop_the_stage_with_exit_2_and_commit_nothing(upstream, tmp_path, monkeypatch, capsys):
    import rlhfkit.training
    from rlhfkit.cli import main

    out = _stage_out(upstream, tmp_path, ["data", "pretrain"])
    _nan_at(monkeypatch, rlhfkit.training, "token_loss_sum", {2, 3, 4})
    assert main(_sft_argv(out)) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.replace("\r", "\n").splitlines() if "error:" in line]  # (progress bars share stderr)
    assert len(errors) == 1, err
    assert "rlhfkit sft: error: sft: step 4: non-finite loss nan" in errors[0] and "3 steps in a row" in errors[0], err
    assert "Traceback" not in err
    assert not (out / "sft").exists() and (out / "sft.partial").exists()


def test_lr_1e6_without_clipping_never_commits_nan_weights(upstream, tmp_path, capsys):
    """The issue's case: `rlhfkit sft lr=1e6 grad_clip=0` once exited 0 with NaN weights committed."""
    from rlhfkit.cli import main

    out = _stage_out(upstream, tmp_path, ["data", "pretrain"])
    code = main(_sft_argv(out, "lr=1e6", "grad_clip=0"))
    err = capsys.readouterr().err
    if code == 0:
        assert _finite_weights(out / "sft")
    else:
        assert code == 2 and "non-finite" in err and "Traceback" not in err, err
        assert not (out / "sft").exists()


@pytest.mark.parametrize("grad_clip", [0.0, 1.0])
def test_the_guard_leaves_the_weights_bit_identical_when_every_step_is_finite(upstream, tmp_path, grad_clip):
    """The guard computes a gradient norm every step (with grad_clip 0, through the clip call with an
    infinite max norm, a coefficient of exactly 1) and decides before stepping; the weights must equal,
    bit for bit, those of the loop with the guard off (max_nonfinite_steps=0: no norm, no check)."""
    from rlhfkit.pipeline import load_pipeline_config, run_stage

    weights = {}
    for name, limit in (("on", 3), ("off", 0)):
        out = _stage_out(upstream, tmp_path / name, ["data", "pretrain"])
        cfg = load_pipeline_config(None, [*tiny_pipeline_overrides(out), "sft.max_steps=8", "sft.lr=3e-3",
                                          f"sft.grad_clip={grad_clip}", f"sft.max_nonfinite_steps={limit}"])
        run_stage(cfg, "sft", out)
        weights[name] = _weights(out / "sft")["model/model.safetensors"]
        log = [json.loads(x) for x in (out / "sft" / "log.jsonl").read_text().splitlines()]
        # with clipping, it clipped (a norm above the limit) on some step: the comparison covers clipping too
        if grad_clip and name == "on":
            assert any(r["grad_norm"] > grad_clip for r in log)
    assert all(torch.equal(weights["on"][k], weights["off"][k]) for k in weights["on"])
    base = _weights(upstream / "pretrain")["model/model.safetensors"]
    assert any(not torch.equal(weights["on"][k], base[k]) for k in base)  # and it trained


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_a_lora_stage_stopped_mid_way_resumes_to_the_same_adapter_and_weights(stage, upstream, tmp_path):
    """Under LoRA the checkpoint holds the peft-wrapped model's state (base and adapters): a run stopped after
    step 5 (stop_after_steps, checkpointing at 2 and 4 and at the stop) and rerun ends where an uninterrupted one does."""
    from rlhfkit.checkpoints import StoppedEarly
    from rlhfkit.pipeline import load_pipeline_config, run_stage

    needs = ["data", "pretrain"] if stage == "sft" else ["data", "pretrain", "sft", "label"]
    extra = [f"{stage}.max_steps=8", f"{stage}.save_every=2", f"{stage}.lora.r=4", f"{stage}.lr=1e-2",
             *(["dpo.batch_size=4"] if stage == "dpo" else [])]
    runs = {}
    for name in ("whole", "stopped"):
        out = _stage_out(upstream, tmp_path / name, needs)
        cfg = lambda *more: load_pipeline_config(None, [*tiny_pipeline_overrides(out), *extra, *more])  # noqa: E731
        if name == "stopped":
            with pytest.raises(StoppedEarly):
                run_stage(cfg(f"{stage}.stop_after_steps=5"), stage, out)
            assert json.loads((out / f"{stage}.ckpt" / "meta.json").read_text())["step"] == 5
        run_stage(cfg(), stage, out)
        runs[name] = (_weights(out / stage), json.loads((out / stage / "metrics.json").read_text()))
    (a, m_whole), (b, m_stopped) = runs["whole"], runs["stopped"]
    assert m_whole["resumed_from_step"] == 0 and m_stopped["resumed_from_step"] == 5
    assert "adapter/adapter_model.safetensors" in a and a.keys() == b.keys()
    for f in a:
        assert all(torch.equal(a[f][k], b[f][k]) for k in a[f]), f


def test_a_checkpoint_written_under_another_config_is_not_resumed(upstream, tmp_path, capsys):
    """Stopped after step 4 with lr 1e-3, rerun with lr 2e-3: exit 2 naming the key, not a resume; the keys that
    only say when to stop or save (stop_after_steps, save_every) may change."""
    from rlhfkit.checkpoints import StoppedEarly
    from rlhfkit.cli import main

    out = _stage_out(upstream, tmp_path, ["data", "pretrain"])
    argv = ["sft", *tiny_pipeline_overrides(out), "sft.max_steps=8", "sft.save_every=2"]
    with pytest.raises(StoppedEarly):
        main([*argv, "sft.stop_after_steps=4"])
    capsys.readouterr()
    assert main([*argv, "sft.lr=2e-3"]) == 2
    err = capsys.readouterr().err
    assert f"{out / 'sft.ckpt' / 'meta.json'}: checkpoint was written with a different config (lr)" in err, err
    assert not (out / "sft").exists()
    assert main([*argv, "sft.save_every=3"]) == 0
    assert f"sft: resuming from {out / 'sft.ckpt'} after step 4" in capsys.readouterr().out
