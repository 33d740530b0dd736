"""Progress and tracking: trackers receive what log.jsonl holds, and the RL log splits each step's time.

Offline: accelerate's TensorBoard tracker (through tensorboardX) writes event files under the
stage's ``tracking/`` directory, read back here from their TFRecord framing.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from conftest import tiny_pipeline_overrides
from rlhfkit.config import ConfigError
from rlhfkit.io import JsonlLog, read_jsonl_plain
from rlhfkit.pipeline import load_pipeline_config, run_stage


def read_scalars(tracking_dir: Path) -> dict[str, dict[int, float]]:
    """Every scalar in the TensorBoard event files under ``tracking_dir``: ``{tag: {step: value}}``.

    An event file is a TFRecord stream: 8-byte little-endian length, 4-byte CRC of the length,
    the payload (a serialised ``Event``), 4-byte CRC of the payload.
    """
    from tensorboardX.proto import event_pb2

    scalars: dict[str, dict[int, float]] = {}
    files = sorted(tracking_dir.rglob("events.out.tfevents.*"))
    assert files, f"no event files under {tracking_dir}"
    for path in files:
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            payload = data[pos + 12:pos + 12 + length]
            pos += 12 + length + 4
            event = event_pb2.Event.FromString(payload)
            for value in event.summary.value:
                if value.WhichOneof("value") == "simple_value":
                    scalars.setdefault(value.tag, {})[event.step] = value.simple_value
        assert pos == len(data), f"{path}: truncated record"
    return scalars


def test_sft_stage_sends_its_log_to_tensorboard(tmp_path, tiny_lm_dir):
    out = tmp_path / "run"
    cfg = load_pipeline_config(None, tiny_pipeline_overrides(out) + [
        "stages=[data, sft]", f"sft.model={tiny_lm_dir}", "sft.report_to=[tensorboard]"])
    for stage in cfg.stages:
        assert run_stage(cfg, stage, out) == "ran"
    rows = read_jsonl_plain(out / "sft" / "log.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    scalars = read_scalars(out / "sft" / "tracking")  # written under sft.partial, renamed with the stage
    # The same figures at the same steps (TensorBoard stores float32: exact to its precision).
    assert sorted(scalars["loss"]) == [1, 2, 3, 4]
    for r in rows:
        assert scalars["loss"][r["step"]] == pytest.approx(r["loss"], rel=1e-6)
        assert scalars["lr"][r["step"]] == pytest.approx(r["lr"], rel=1e-6)
    assert not (out / "sft.partial").exists()


def test_rl_log_splits_each_step_time_and_reaches_the_tracker(tmp_path, tiny_lm_dir):
    from rlhfkit.tasks.arith import format_prompt, make_problems

    out = tmp_path / "run"
    (out / "data").mkdir(parents=True)
    rows = [{"prompt": format_prompt(p), "meta": p.to_meta()} for p in make_problems(8, seed=3, unanswerable_frac=0.25)]
    for name in ("prompts.jsonl", "heldout.jsonl"):
        (out / "data" / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_pipeline_config(None, [
        f"out={out}", "stages=[grpo]", f"grpo.policy={tiny_lm_dir}", "grpo.algorithm=grpo", "grpo.reward_source=judge",
        "grpo.group_size=2", "grpo.prompts_per_step=2", "grpo.minibatch_size=4", "grpo.ppo_epochs=1",
        "grpo.total_steps=3", "grpo.sampling.max_new_tokens=8", "grpo.sampling.batch_size=16", "grpo.save_every=0",
        "grpo.report_to=[tensorboard]",
    ])
    assert run_stage(cfg, "grpo", out) == "ran"
    log = read_jsonl_plain(out / "grpo" / "log.jsonl")
    assert [r["step"] for r in log] == [1, 2, 3]
    keys = ("time_generation_s", "time_scoring_s", "time_forward_s", "time_update_s")
    for r in log:
        assert all(r[k] >= 0 for k in keys), r
        # generating and updating take real time; the phases are disjoint parts of the step
        assert r["time_generation_s"] > 0 and r["time_update_s"] > 0, r
        assert sum(r[k] for k in keys) <= r["step_time_s"] + 0.01, r
        # the rollout's forwards: the policy's log-probs, the reference (here the policy, a second copy), no critic (grpo)
        assert r["time_reference_s"] > 0 and r["time_critic_s"] >= 0, r
        assert r["time_reference_s"] + r["time_critic_s"] <= r["time_forward_s"] + 1e-9, r
    scalars = read_scalars(out / "grpo" / "tracking")
    assert sorted(scalars["time_update_s"]) == [1, 2, 3]
    assert scalars["reward"][3] == pytest.approx(log[2]["reward"], rel=1e-6, abs=1e-7)


@pytest.mark.parametrize("override", ["sft.report_to=[tensorbord]", "grpo.report_to=[mlflow]",
                                      "reward.report_to=[none, wandb]"])
def test_invalid_report_to_is_a_config_error_naming_the_key(override):
    with pytest.raises(ConfigError, match="report_to"):
        load_pipeline_config(None, [override])


def test_report_to_none_is_accepted_and_starts_no_tracker(tmp_path):
    from rlhfkit.distributed import make_accelerator

    cfg = load_pipeline_config(None, ["sft.report_to=[none]", "grpo.report_to=[tensorboard]"])
    assert cfg.sft.report_to == ("none",)
    assert make_accelerator(cfg.sft, project_dir=tmp_path).log_with == []
    assert [str(t) for t in make_accelerator(cfg.grpo, project_dir=tmp_path).log_with] == ["tensorboard"]


def test_log_records_reach_the_tracker_as_numbers_at_their_step(tmp_path):
    """Text values label a record (the reward stage's ``model``), so rm and prm curves stay apart."""

    class Recorder:
        trackers = ["a tracker"]

        def __init__(self):
            self.calls = []

        def log(self, values, step=None):
            self.calls.append((values, step))

    acc = Recorder()
    log = JsonlLog(tmp_path / "log.jsonl", accelerator=acc)
    log.write({"model": "prm", "step": 3, "loss": 0.5, "grad_norm": None, "ok": True, "lr": 1e-3})
    log.write({"iteration": 1, "validation_win_rate": 0.25})
    log.close()
    assert acc.calls == [({"prm/loss": 0.5, "prm/lr": 1e-3}, 3), ({"iteration": 1, "validation_win_rate": 0.25}, None)]
    assert len(read_jsonl_plain(tmp_path / "log.jsonl")) == 2
