"""Reliability: every bad input gets a named error (the corpus), a locked run directory, lineage.

The bad-input corpus is built by tests/bad_input_corpus.py; each case must exit 2 with no traceback, its
error must name the file and line (or the config key), and it must leave no complete-looking stage.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from bad_input_corpus import cases  # noqa: E402
from conftest import tiny_pipeline_overrides  # noqa: E402

_CORPUS_ROOT = Path(os.environ.get("RLHFKIT_CACHE", "/tmp")) / "bad-input-corpus"


def _corpus_ids():
    return [c.id for c in cases(_CORPUS_ROOT / "ids", Path("MODEL"))]


def test_the_corpus_has_at_least_50_cases():
    assert len(_corpus_ids()) >= 50


@pytest.mark.parametrize("case_id", _corpus_ids())
def test_bad_input_is_a_named_error(case_id, tmp_path, tiny_lm_dir, capsys):
    from rlhfkit.cli import main

    case = next(c for c in cases(tmp_path, tiny_lm_dir) if c.id == case_id)
    code = main(case.argv)  # an exception escaping here is the traceback a user would see
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    for s in case.must_say:
        assert s in err, (s, err)
    assert not (tmp_path / "out" / case.stage).exists()  # nothing complete-looking left behind


# ------------------------------------------------------------------ the run lock

_HOLD = """
import sys, time
from pathlib import Path
from rlhfkit.io import RunLock
with RunLock(Path(sys.argv[1])):
    print("locked", flush=True)
    time.sleep(60)
"""


def test_a_second_run_on_a_locked_directory_exits_2_at_once(tmp_path, capsys):
    from rlhfkit.cli import main

    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(out)], stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        t0 = time.time()
        code = main(["run", str(Path(__file__).parents[1] / "src/rlhfkit/configs/quickstart.yaml"), f"out={out}"])
        took = time.time() - t0
        err = capsys.readouterr().err
        assert code == 2 and "in use by another rlhfkit run" in err and str(holder.pid) in err and took < 5
        assert not (out / "data").exists()
    finally:
        os.killpg(holder.pid, signal.SIGKILL)  # a killed holder releases the lock: the kernel closes its descriptor
        holder.wait()
    from rlhfkit.io import RunLock

    with RunLock(out):  # free again
        pass


# ------------------------------------------------------------------ lineage

def _ppo_overrides(out: Path) -> list[str]:
    return tiny_pipeline_overrides(out) + [
        "stages=[data, pretrain, sft, ppo]", "ppo.reward_source=judge", "ppo.prompts_per_step=4", "ppo.total_steps=3",
        "ppo.minibatch_size=4", "ppo.ppo_epochs=1", "ppo.save_every=1", "ppo.sampling.max_new_tokens=8",
        "ppo.sampling.batch_size=16", "ppo.heldout=none.jsonl"]


def test_a_changed_upstream_stage_invalidates_a_downstream_checkpoint(tmp_path, capsys):
    """Kill PPO after a checkpoint, retrain SFT with another learning rate, rerun: the checkpoint is refused."""
    import shutil

    from rlhfkit.cli import main
    from rlhfkit.recipes.ppo import StoppedEarly

    out = tmp_path / "run"
    cfg = Path(__file__).parents[1] / "src/rlhfkit/configs/quickstart.yaml"
    with pytest.raises(StoppedEarly):
        main(["run", str(cfg), *_ppo_overrides(out), "ppo.stop_after_steps=1"])
    assert (out / "ppo.ckpt").exists() and (out / "sft").exists()
    shutil.rmtree(out / "sft")
    code = main(["run", str(cfg), *_ppo_overrides(out), "sft.lr=5e-3"])
    err = capsys.readouterr().err
    assert code == 2 and "checkpoint was built from sft" in err and "--force-rerun ppo" in err, err
    assert not (out / "ppo").exists()
    # the way out it names: PPO starts over (no resume) against the new SFT policy
    assert main(["run", str(cfg), *_ppo_overrides(out), "sft.lr=5e-3", "--force-rerun", "ppo"]) == 0
    metrics = json.loads((out / "ppo" / "metrics.json").read_text())
    assert metrics["resumed_from_step"] == 0
    lineage = json.loads((out / "ppo" / "lineage.json").read_text())
    assert lineage["inputs"]["sft"] == json.loads((out / "sft" / "lineage.json").read_text())["fingerprint"]


def test_a_completed_stage_whose_input_changed_is_not_reused(tmp_path, capsys):
    import shutil

    from rlhfkit.cli import main

    out = tmp_path / "run"
    cfg = Path(__file__).parents[1] / "src/rlhfkit/configs/quickstart.yaml"
    base = tiny_pipeline_overrides(out) + ["stages=[data, pretrain, sft]"]
    assert main(["run", str(cfg), *base]) == 0
    assert main(["run", str(cfg), *base]) == 0  # unchanged: every stage reused
    shutil.rmtree(out / "pretrain")
    code = main(["run", str(cfg), *base, "pretrain.seed=7"])  # pretrain reruns; sft was built on the old one
    err = capsys.readouterr().err
    assert code == 2 and "stage 'sft'" in err and "pretrain" in err and "--force-rerun sft" in err, err
    assert main(["run", str(cfg), *base, "pretrain.seed=7", "--force-rerun", "sft"]) == 0
