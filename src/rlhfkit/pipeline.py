"""The pipeline: run the stages a config names, in order, each reading what the one before wrote.

Each stage writes ``OUT/<stage>.partial/`` and renames it to ``OUT/<stage>/`` when complete, so
a directory ``OUT/<stage>/`` is always a finished stage: a killed run resumes by skipping them.
A finished stage whose saved config differs from the current one is an error (silently reusing
it would report results of a different experiment).
"""
from __future__ import annotations

import contextlib
import dataclasses
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import yaml

from rlhfkit import lineage
from rlhfkit.config import ConfigError, load_config, save_config, to_dict
from rlhfkit.io import RunLock
from rlhfkit.models.local import resolve_in_run
from rlhfkit.recipes.dno import DNOConfig
from rlhfkit.recipes.dpo import DPOConfig
from rlhfkit.recipes.evaluate import EvalConfig
from rlhfkit.recipes.intransitive import IntransitiveConfig
from rlhfkit.recipes.label import LabelConfig
from rlhfkit.recipes.ppo import PPOConfig
from rlhfkit.recipes.pretrain import PretrainConfig
from rlhfkit.recipes.reward import RewardConfig
from rlhfkit.recipes.sft import SFTConfig
from rlhfkit.tasks.arith_data import TaskConfig


@dataclass(frozen=True)
class PipelineConfig:
    """A whole run: which stages, where, and each stage's settings."""

    out: str = "runs/quickstart"
    """output directory; each stage writes OUT/<stage>/"""
    stages: tuple[str, ...] = ("data", "pretrain", "sft", "eval")
    """stages to run, in order"""
    task: TaskConfig = field(default_factory=TaskConfig)
    """the embedded default task (used by the data stage and the oracle judge)"""
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    """pretraining stage"""
    sft: SFTConfig = field(default_factory=SFTConfig)
    """supervised fine-tuning stage"""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """evaluation stage"""
    dpo: DPOConfig = field(default_factory=DPOConfig)
    """offline DPO-family stage on the label stage's pairs: writes OUT/dpo/model"""
    dno: DNOConfig = field(default_factory=DNOConfig)
    """Direct Nash Optimization stage: writes OUT/dno/dno_<t>/model and the selected OUT/dno/model"""
    intransitive: IntransitiveConfig = field(default_factory=IntransitiveConfig)
    """the intransitive experiment (configs/intransitive.yaml): DNO with a BT vs a pairwise preference function"""
    label: LabelConfig = field(default_factory=LabelConfig)
    """labeling stage: K samples per prompt judged into rankings, pairs and step labels (OUT/label/)"""
    reward: RewardConfig = field(default_factory=RewardConfig)
    """reward-model stage: BT reward model, PRM, ORM, cost model (OUT/reward/{rm,prm,orm,cost}/)"""
    ppo: PPOConfig = field(default_factory=PPOConfig)
    """RL stage ``ppo`` (any algorithm; see ``RL_STAGES``): writes OUT/ppo/model"""
    ppo_prm: PPOConfig = field(default_factory=PPOConfig)
    """RL stage ``ppo_prm``, for PRM step rewards (set ``reward_source: prm`` in the config)"""
    ppo_safe: PPOConfig = field(default_factory=PPOConfig)
    """RL stage ``ppo_safe``, for the Safe RLHF constraint (set ``cost_model``)"""
    grpo: PPOConfig = field(default_factory=PPOConfig)
    """RL stage ``grpo`` (set ``algorithm: grpo`` and ``group_size``)"""
    rloo: PPOConfig = field(default_factory=PPOConfig)
    """RL stage ``rloo`` (set ``algorithm: rloo`` and ``group_size``)"""

    def __post_init__(self):
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown:
            raise ValueError(f"stages: unknown stage(s) {unknown}; known: {list(STAGES)}")


# --- stage runners: (cfg, out, stage_dir) -> metrics -------------------------------------------

def _data_path(cfg_value: str, out: Path, default: str) -> Path:
    return Path(cfg_value) if cfg_value else out / "data" / default


def _stage_data(cfg: PipelineConfig, out: Path, stage_dir: Path) -> dict:
    from rlhfkit.training import process_state

    from rlhfkit.tasks.arith_data import write_task_data

    if process_state().is_main_process:
        paths = write_task_data(stage_dir, cfg.task)
        return {"files": {k: Path(v).name for k, v in paths.items()}}
    return {}


@contextlib.contextmanager
def _tracked(section, stage_dir: Path):
    """The accelerator of a stage, with the trackers ``section.report_to`` names started for its run.

    Tracker files go to ``stage_dir/tracking`` (OUT/<stage>.partial/tracking, which becomes
    OUT/<stage>/tracking when the stage completes); they are closed however the stage ends.
    """
    from rlhfkit.tracking import end_tracking, start_tracking
    from rlhfkit.training import make_accelerator

    acc = make_accelerator(section, project_dir=stage_dir / "tracking")
    start_tracking(acc, stage_dir.name.removesuffix(".partial"), section)
    try:
        yield acc
    finally:
        end_tracking(acc)


@contextlib.contextmanager
def _accelerated(section, stage_dir: Path):
    """The accelerator and log.jsonl of a training stage (the log written by the main process only,
    and forwarded to the stage's trackers)."""
    from rlhfkit.io import JsonlLog

    with _tracked(section, stage_dir) as acc:
        log = JsonlLog(stage_dir / "log.jsonl", enabled=acc.is_main_process, accelerator=acc)
        try:
            yield acc, log
        finally:
            log.close()


def _stage_pretrain(cfg: PipelineConfig, out: Path, stage_dir: Path) -> dict:
    from rlhfkit.recipes import pretrain

    with _accelerated(cfg.pretrain, stage_dir) as (acc, log):
        return pretrain.run(cfg.pretrain, _data_path(cfg.pretrain.data, out, "pretrain.jsonl"), stage_dir, acc, log)


def _stage_sft(cfg: PipelineConfig, out: Path, stage_dir: Path) -> dict:
    from rlhfkit.recipes import sft

    model = resolve_in_run(cfg.sft.model, out) if cfg.sft.model else out / "pretrain" / "model"
    with _accelerated(cfg.sft, stage_dir) as (acc, log):
        return sft.run(cfg.sft, model, _data_path(cfg.sft.data, out, "sft.jsonl"), stage_dir, acc, log)


def _stage_dpo(cfg: PipelineConfig, out: Path, stage_dir: Path) -> dict:
    from rlhfkit.recipes import dpo

    model = resolve_in_run(cfg.dpo.model, out) if cfg.dpo.model else out / "sft" / "model"
    data = Path(cfg.dpo.data) if cfg.dpo.data else out / "label" / "pairs.jsonl"
    if not cfg.dpo.data and not data.exists():
        data = out / "label" / "rankings.jsonl"  # the oracle judge writes rankings only
    with _accelerated(cfg.dpo, stage_dir) as (acc, log):
        return dpo.run(cfg.dpo, model, data, stage_dir, acc, log)


def _stage_dno(cfg: PipelineConfig, out: Path, stage_dir: Path) -> dict:
    from rlhfkit.recipes import dno

    model = resolve_in_run(cfg.dno.model, out) if cfg.dno.model else out / "sft" / "model"
    prompts = Path(cfg.dno.prompts) if Path(cfg.dno.prompts).is_absolute() else out / (cfg.dno.prompts or "data/prompts.jsonl")
    with _accelerated(cfg.dno, stage_dir) as (acc, log):
        return dno.run(cfg.dno, model, prompts, out, stage_dir, acc, log)


def _stage_intransitive(cfg: PipelineConfig, out: Path, stage_dir: Path) -> dict:
    from rlhfkit.recipes import intransitive

    return intransitive.run(cfg.intransitive, out, stage_dir)


def _stage_eval(cfg: PipelineConfig, out: Path, stage_dir: Path) -> dict:
    from rlhfkit.training import make_accelerator

    from rlhfkit.recipes.evaluate import evaluate_policies

    acc = make_accelerator()
    return evaluate_policies(cfg.eval, out, _data_path(cfg.eval.data, out, "heldout.jsonl"), stage_dir, acc)


def _stage_label(cfg: PipelineConfig, out: Path, stage_dir: Path) -> dict:
    from rlhfkit.training import make_accelerator

    from rlhfkit.recipes import label

    metrics = label.run(cfg.label, out, cfg.task.judge_beta, stage_dir, make_accelerator())
    label.cleanup(out)  # the merged files are in stage_dir; the chunk store is no longer needed
    return metrics


def _stage_reward(cfg: PipelineConfig, out: Path, stage_dir: Path) -> dict:
    from rlhfkit.recipes import reward

    with _accelerated(cfg.reward, stage_dir) as (acc, log):
        return reward.run(cfg.reward, out, stage_dir, acc, log)


def _stage_rl(name: str) -> Callable[[PipelineConfig, Path, Path], dict]:
    """One runner for every RL stage: the stage name picks its config section and its output names."""

    def runner(cfg: PipelineConfig, out: Path, stage_dir: Path) -> dict:
        from rlhfkit.recipes import ppo

        section = getattr(cfg, name)
        with _tracked(section, stage_dir) as acc:
            return ppo.run(section, out, stage_dir, acc, stage_dir / "log.jsonl", name=name)

    return runner


# RL stages: several can run in one config (e.g. configs/rl_comparison.yaml), each its own section.
RL_STAGES = ("ppo", "ppo_prm", "ppo_safe", "grpo", "rloo")

STAGES: dict[str, Callable[[PipelineConfig, Path, Path], dict]] = {
    "data": _stage_data,
    "pretrain": _stage_pretrain,
    "sft": _stage_sft,
    "eval": _stage_eval,
    "dpo": _stage_dpo,
    "dno": _stage_dno,
    "intransitive": _stage_intransitive,
    "label": _stage_label,
    "reward": _stage_reward,
    **{name: _stage_rl(name) for name in RL_STAGES},
}

# Which config section belongs to each stage (saved beside its output and compared on resume).
SECTION = {"data": "task", "pretrain": "pretrain", "sft": "sft", "eval": "eval", "dpo": "dpo", "dno": "dno", "intransitive": "intransitive", "label": "label", "reward": "reward", **{n: n for n in RL_STAGES}}


def _stage_config(cfg: PipelineConfig, stage: str) -> dict:
    return to_dict(getattr(cfg, SECTION[stage]))


def run_stage(cfg: PipelineConfig, stage: str, out: Path) -> str:
    """Run one stage unless its output is complete; returns ``"ran"`` or ``"skipped"``."""
    from rlhfkit.training import process_state

    state = process_state()
    final = out / stage
    cfg_now = _stage_config(cfg, stage)
    if final.exists():
        saved_path = final / "config.yaml"
        saved = yaml.safe_load(saved_path.read_text()) if saved_path.exists() else None
        if saved != cfg_now:
            raise ConfigError(
                f"{saved_path}: stage '{stage}' already completed with a different config; "
                f"remove {final} to rerun it, or use another out="
            )
        lineage.check_complete(out, stage)
        state.print(f"[rlhfkit] {stage}: complete in {final}, skipped")
        return "skipped"
    inputs = lineage.check_checkpoint(out, stage)
    partial = final.with_name(stage + ".partial")
    if state.is_main_process:
        if partial.exists():
            shutil.rmtree(partial)  # an interrupted attempt: start the stage over
        partial.mkdir(parents=True)
        lineage.record_start(out, stage, inputs)
    state.wait_for_everyone()
    state.print(f"[rlhfkit] {stage}: running")
    t0 = time.time()
    metrics = STAGES[stage](cfg, out, partial)
    state.wait_for_everyone()
    if state.is_main_process:
        from rlhfkit.io import atomic_write_json, commit_dir

        metrics["stage_runtime_s"] = time.time() - t0
        atomic_write_json(partial / "metrics.json", metrics)
        save_config(getattr(cfg, SECTION[stage]), partial / "config.yaml")
        lineage.record_complete(partial, cfg_now, inputs)
        commit_dir(partial, final)
        # Resume state a stage kept outside its directory (checkpoints) is spent once it is complete.
        shutil.rmtree(out / f"{stage}.ckpt", ignore_errors=True)
        lineage.inputs_file(out, stage).unlink(missing_ok=True)
    state.wait_for_everyone()
    state.print(f"[rlhfkit] {stage}: done in {time.time() - t0:.1f}s")
    return "ran"


def run_pipeline(cfg: PipelineConfig, force_rerun: str | None = None) -> Path:
    """Run every stage in ``cfg.stages`` (skipping complete ones), then write the report; the output
    directory is locked for the whole run. ``force_rerun``: redo that stage and every stage after it."""
    from rlhfkit.training import process_state

    out = Path(cfg.out)
    state = process_state()
    with RunLock(out):
        if force_rerun and state.is_main_process:
            for p in lineage.force_rerun(out, cfg.stages, force_rerun):
                print(f"[rlhfkit] --force-rerun {force_rerun}: removed {p}")
        state.wait_for_everyone()
        if state.is_main_process:
            out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, out / "config.yaml")
        for stage in cfg.stages:
            run_stage(cfg, stage, out)
        if state.is_main_process:
            from rlhfkit.report import write_report

            write_report(out)
    return out


def load_pipeline_config(path: str | Path | None, overrides=()) -> PipelineConfig:
    return load_config(PipelineConfig, path, overrides)


# --- `rlhfkit run` ------------------------------------------------------------------------

def add_arguments(p) -> None:
    p.add_argument("config", help="pipeline YAML file")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. out=runs/x sft.lr=1e-4")
    p.add_argument("--force-rerun", metavar="STAGE", default=None,
                   help="redo STAGE and every stage after it (their outputs and checkpoints are removed first)")


def run(args) -> int:
    cfg = load_pipeline_config(args.config, args.overrides)
    out = run_pipeline(cfg, args.force_rerun)
    print(f"[rlhfkit] report: {out / 'report.md'}")
    return 0


def replace_stages(cfg: PipelineConfig, stages: tuple[str, ...]) -> PipelineConfig:
    return dataclasses.replace(cfg, stages=stages)
