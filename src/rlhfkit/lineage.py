"""Lineage: what each stage was built from, so that nothing stale is reused.

Every completed stage writes ``OUT/<stage>/lineage.json``: a fingerprint of its own config and of
the fingerprints of its inputs, the stages before it (in ``ORDER``) that were complete when it ran.
A completed stage is reused, and a mid-stage checkpoint resumed, only while its inputs still have
the fingerprints it recorded; otherwise the run stops and names what changed and the
``--force-rerun STAGE`` that redoes the stage and everything after it. (Example: kill a run in PPO,
delete and retrain SFT with another learning rate, rerun: PPO's checkpoint was taken against the
old SFT policy, so it must not be resumed against the new reference.)
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from rlhfkit.config import ConfigError
from rlhfkit.io import atomic_write_json

# The order stages read each other's outputs in (a stage's inputs are complete stages before it).
ORDER = ("data", "pretrain", "sft", "label", "reward", "ppo", "ppo_prm", "ppo_safe", "grpo", "rloo", "dpo", "dno",
         "intransitive", "eval")
LINEAGE = "lineage.json"


def inputs_file(out: Path, stage: str) -> Path:
    """Where a running stage records its inputs, beside its checkpoint (outside the stage directory)."""
    return Path(out) / f"{stage}.inputs.json"


def fingerprint(config: dict, inputs: dict[str, str]) -> str:
    blob = json.dumps({"config": config, "inputs": inputs}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def current_inputs(out: Path, stage: str) -> dict[str, str]:
    """Fingerprints of the complete stages that come before ``stage``, as they are now."""
    before = ORDER[:ORDER.index(stage)] if stage in ORDER else ORDER
    found = {}
    for name in before:
        f = Path(out) / name / LINEAGE
        if f.exists():
            found[name] = json.loads(f.read_text())["fingerprint"]
    return found


def changed_inputs(recorded: dict[str, str], out: Path, stage: str) -> list[str]:
    """Inputs whose fingerprint differs from the recorded one (or that are gone)."""
    now = current_inputs(out, stage)
    return [name for name, fp in recorded.items() if now.get(name) != fp]


def _stale(stage: str, what: str, changed: list[str]) -> ConfigError:
    return ConfigError(f"stage '{stage}': its {what} was built from {', '.join(changed)} as they were before, and "
                       f"{'it has' if len(changed) == 1 else 'they have'} changed since; redo it and everything after "
                       f"it with: rlhfkit run CONFIG --force-rerun {stage}")


def check_complete(out: Path, stage: str) -> None:
    """Refuse to reuse a completed stage whose inputs changed (a stage from before lineage existed passes)."""
    f = Path(out) / stage / LINEAGE
    if f.exists():
        changed = changed_inputs(json.loads(f.read_text())["inputs"], out, stage)
        if changed:
            raise _stale(stage, f"output in {Path(out) / stage}", changed)


def check_checkpoint(out: Path, stage: str) -> dict[str, str]:
    """Before a stage starts: its inputs now; a checkpoint left by an earlier attempt on other inputs is refused."""
    now = current_inputs(out, stage)
    f = inputs_file(out, stage)
    if f.exists():
        recorded = json.loads(f.read_text())
        changed = [name for name, fp in recorded.items() if now.get(name) != fp]
        if changed:
            raise _stale(stage, "mid-stage checkpoint", changed)
    return now


def record_start(out: Path, stage: str, inputs: dict[str, str]) -> None:
    atomic_write_json(inputs_file(out, stage), inputs)


def record_complete(stage_dir: Path, config: dict, inputs: dict[str, str]) -> None:
    atomic_write_json(Path(stage_dir) / LINEAGE, {"fingerprint": fingerprint(config, inputs), "inputs": inputs})


def force_rerun(out: Path, stages: tuple[str, ...], stage: str) -> list[str]:
    """Remove ``stage`` and every stage after it in ``stages`` (outputs, partial dirs, checkpoints); returns them."""
    if stage not in stages:
        raise ConfigError(f"--force-rerun {stage}: not one of this config's stages ({', '.join(stages)})")
    removed = []
    for name in stages[stages.index(stage):]:
        for p in (Path(out) / name, Path(out) / f"{name}.partial", Path(out) / f"{name}.ckpt"):
            if p.exists():
                shutil.rmtree(p)
                removed.append(str(p))
        inputs_file(out, name).unlink(missing_ok=True)
    return removed
