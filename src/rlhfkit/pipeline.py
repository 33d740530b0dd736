"""The pipeline: run the stages a config names, in order, each reading what the one before wrote.

Every stage is ``run(cfg, ctx)``: its config section and a :class:`~rlhfkit.stage.StageContext`
(the run directory, the stage's directory, accelerator and log). ``STAGES`` says which section
and which recipe each stage is; the pipeline treats them all alike.

Each stage writes ``OUT/<stage>.partial/`` and renames it to ``OUT/<stage>/`` when complete, so
a directory ``OUT/<stage>/`` is always a finished stage: a killed run resumes by skipping them.
A finished stage whose saved config differs from the current one is an error (silently reusing
it would report results of a different experiment). A stage whose section lists ``seeds`` runs its
recipe once per seed, each in ``OUT/<stage>/seed_<s>/`` (``rlhfkit.seeds``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import yaml

from rlhfkit import lineage
from rlhfkit.config import ConfigError, load_config, save_config, saved_form, to_dict
from rlhfkit.distributed import make_accelerator, process_state
from rlhfkit.engines import check_stage_engines
from rlhfkit.io import JsonlLog, RunLock, atomic_write_json, commit_dir
from rlhfkit.paths import STAGE_PREFIX, ConfigPath, map_config_paths
from rlhfkit.recipes import data, dno, dpo, evaluate, intransitive, label, ppo, pretrain, reward, sft, strength
from rlhfkit.recipes.dno import DNOConfig
from rlhfkit.recipes.dpo import DPOConfig
from rlhfkit.recipes.evaluate import EvalConfig
from rlhfkit.recipes.intransitive import IntransitiveConfig
from rlhfkit.recipes.label import LabelConfig
from rlhfkit.recipes.ppo import Algorithm, PPOConfig
from rlhfkit.recipes.pretrain import PretrainConfig
from rlhfkit.recipes.reward import RewardConfig
from rlhfkit.recipes.sft import SFTConfig
from rlhfkit.recipes.strength import StrengthConfig
from rlhfkit.report import write_report
from rlhfkit.seeds import check_references, run_seeds
from rlhfkit.stage import StageContext
from rlhfkit.tasks.arith_data import TaskConfig
from rlhfkit.tracking import end_tracking, start_tracking


@dataclass(frozen=True)
class GRPOConfig(PPOConfig):
    """The RL stage ``grpo``: an RL config whose algorithm is GRPO unless set."""

    algorithm: Algorithm = Algorithm.grpo
    """ppo, grpo (this section's default: group_size then defaults to 4) or rloo"""


@dataclass(frozen=True)
class RLOOConfig(PPOConfig):
    """The RL stage ``rloo``: an RL config whose algorithm is RLOO unless set."""

    algorithm: Algorithm = Algorithm.rloo
    """ppo, grpo or rloo (this section's default: group_size then defaults to 4)"""


@dataclass(frozen=True)
class PipelineConfig:
    """A whole run: which stages, where, and each stage's settings."""

    out: ConfigPath = "runs/quickstart"
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
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    """RL stage ``grpo``: GRPO, 4 samples per prompt unless set"""
    rloo: RLOOConfig = field(default_factory=RLOOConfig)
    """RL stage ``rloo``: RLOO, 4 samples per prompt unless set"""
    strength: StrengthConfig = field(default_factory=StrengthConfig)
    """the strength grid (configs/strength_grid.yaml): two finished runs' policies × reward models"""
    stage_processes: bool = False
    """run each stage in a fresh Python process (this one holds the lock, skips complete stages and writes the
    report): a stage then starts with none of the earlier stages' heap. One process per run is the default; on
    configs/transfer.yaml (SmolLM2-135M) later stages ran 1.3-1.7x slower a step in one process than each in its
    own (docs/transfer.md), on the tiny quickstart about 7%, less than a process's start-up costs there.
    Single-process runs only: under ``accelerate launch`` the launched processes are the stages' processes."""

    def __post_init__(self):
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown:
            raise ValueError(f"stages: unknown stage(s) {unknown}; known: {list(STAGES)}")
        map_config_paths(PipelineConfig, to_dict(self), _check_stage_name)
        check_references({stage: getattr(self, s.section) for stage, s in STAGES.items()})  # stage:ppo/model of a seeded ppo
        if self.label.judge_beta < 0:  # the label section's oracle noise defaults to the task's
            object.__setattr__(self, "label", dataclasses.replace(self.label, judge_beta=self.task.judge_beta))


def _check_stage_name(value: str, kind) -> str:
    if value.startswith(STAGE_PREFIX) and value[len(STAGE_PREFIX):].split("/")[0] not in STAGES:
        raise ValueError(f"{value!r} names no stage; known: {', '.join(STAGES)}")
    return value


class Stage(NamedTuple):
    """A stage: the config section it reads and the recipe that runs it."""

    section: str
    run: Callable[..., dict]


# RL stages: several can run in one config (e.g. configs/rl_comparison.yaml), each its own section.
RL_STAGES = ("ppo", "ppo_prm", "ppo_safe", "grpo", "rloo")

STAGES: dict[str, Stage] = {
    "data": Stage("task", data.run),
    "pretrain": Stage("pretrain", pretrain.run),
    "sft": Stage("sft", sft.run),
    "eval": Stage("eval", evaluate.run),
    "dpo": Stage("dpo", dpo.run),
    "dno": Stage("dno", dno.run),
    "intransitive": Stage("intransitive", intransitive.run),
    "strength": Stage("strength", strength.run),
    "label": Stage("label", label.run),
    "reward": Stage("reward", reward.run),
    **{name: Stage(name, ppo.run) for name in RL_STAGES},
}


@contextlib.contextmanager
def stage_context(section, name: str, out: Path, stage_dir: Path) -> Iterator[StageContext]:
    """The context of a stage: its accelerator (with the trackers ``section.report_to`` names started for
    its run) and its log.jsonl (written by the main process only, and forwarded to the trackers).

    Tracker files go to ``stage_dir/tracking`` (OUT/<stage>.partial/tracking, which becomes
    OUT/<stage>/tracking when the stage completes); they are closed however the stage ends.
    """
    acc = make_accelerator(section, project_dir=stage_dir / "tracking")
    start_tracking(acc, name, section)
    log = JsonlLog(stage_dir / "log.jsonl", enabled=acc.is_main_process, accelerator=acc)
    try:
        yield StageContext(out=out, stage_dir=stage_dir, name=name, accelerator=acc, log=log)
    finally:
        log.close()
        end_tracking(acc)


def config_differences(saved, now, limit: int = 5, defaults: dict | None = None) -> str:
    """The keys whose values differ between a stage's saved config and the current one, as
    ``key: saved → now`` (nested keys dotted; a key absent on one side shows as <absent>), at most ``limit``;
    "" when none. ``defaults`` (the section's defaults, in the same form): a key the saved config lacks
    whose value now is its default is no difference (a setting added by a later rlhfkit, left alone)."""
    if not isinstance(saved, dict) or not isinstance(now, dict):
        return "no saved config" if saved is None else "the saved config is not a mapping"

    absent = object()

    def show(v):
        return "<absent>" if v is absent else repr(v)

    def walk(a, b, d, prefix):
        for key in sorted(set(a) | set(b), key=str):
            x, y, z = a.get(key, absent), b.get(key, absent), d.get(key, absent) if isinstance(d, dict) else absent
            if isinstance(x, dict) and isinstance(y, dict):
                yield from walk(x, y, z, f"{prefix}{key}.")
            elif x is absent and y == z:
                continue
            elif x != y:
                yield f"{prefix}{key}: {show(x)} → {show(y)}"

    diffs = list(walk(saved, now, defaults or {}, ""))
    more = f", and {len(diffs) - limit} more" if len(diffs) > limit else ""
    return "; ".join(diffs[:limit]) + more


def run_stage(cfg: PipelineConfig, stage: str, out: Path) -> str:
    """Run one stage unless its output is complete; returns ``"ran"`` or ``"skipped"``."""
    state = process_state()
    final = out / stage
    section = getattr(cfg, STAGES[stage].section)
    cfg_now = to_dict(section)
    if final.exists():
        saved_path = final / "config.yaml"
        saved = yaml.safe_load(saved_path.read_text()) if saved_path.exists() else None
        now = saved_form(section, final)
        # both with their paths relative to the stage directory; a setting newer than the run at its default is no change
        differences = config_differences(saved, now, defaults=saved_form(type(section)(), final)) if saved != now else ""
        if differences:
            raise ConfigError(
                f"{saved_path}: stage '{stage}' already completed with a different config "
                f"({differences}); remove {final} to rerun it, or use another out="
            )
        lineage.check_complete(out, stage)
        state.print(f"[rlhfkit] {stage}: complete in {final}, skipped")
        return "skipped"
    check_stage_engines(section, stage)  # a rollout engine that cannot run here fails now, not after loading models
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
    with stage_context(section, stage, out, partial) as ctx:
        recipe = STAGES[stage].run
        metrics = run_seeds(recipe, section, ctx) if getattr(section, "seeds", ()) else recipe(section, ctx)
        # which engine ran it: a run meant for FSDP that fell back to DDP says so here
        engine = {"type": ctx.accelerator.distributed_type.value, "processes": ctx.accelerator.num_processes}
    state.wait_for_everyone()
    if state.is_main_process:
        metrics["stage_runtime_s"] = time.time() - t0
        metrics["distributed"] = engine
        atomic_write_json(partial / "metrics.json", metrics)
        save_config(section, partial / "config.yaml", base=final)  # its paths relative to where it will be
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
    out = Path(cfg.out)
    state = process_state()
    if cfg.stage_processes and state.num_processes > 1:
        raise ConfigError(f"stage_processes: true runs each stage as its own single process; under a launch of "
                          f"{state.num_processes} processes set stage_processes: false (they are the stages' processes)")
    with RunLock(out):
        if force_rerun and state.is_main_process:
            for p in lineage.force_rerun(out, cfg.stages, force_rerun):
                print(f"[rlhfkit] --force-rerun {force_rerun}: removed {p}")
        state.wait_for_everyone()
        for stage in cfg.stages:  # every stage still to run: an engine that cannot run here fails before the first
            if not (out / stage).exists():
                check_stage_engines(getattr(cfg, STAGES[stage].section), stage)
        if state.is_main_process:
            out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, out / "config.yaml")  # paths relative to OUT: `rlhfkit run OUT/config.yaml` reruns it
        for stage in cfg.stages:
            if cfg.stage_processes and not (out / stage).exists():
                run_stage_process(out, stage)
            else:
                run_stage(cfg, stage, out)
        if state.is_main_process:
            write_report(out)
    return out


def run_stage_process(out: Path, stage: str) -> None:
    """Run one stage of the run in ``OUT`` in a fresh Python process (``stage_processes: true``): it reads the run's
    saved ``OUT/config.yaml``; this process keeps the run's lock. A stage that fails raises here, its
    ``OUT/<stage>.partial/`` left to be started over, as when a stage fails in process."""
    code = "import sys; from rlhfkit.pipeline import stage_process_main; sys.exit(stage_process_main(*sys.argv[1:]))"
    sys.stdout.flush()  # this process's lines before the stage's, in a log file too
    rc = subprocess.run([sys.executable, "-c", code, str(out), stage]).returncode
    if rc != 0:
        raise RuntimeError(f"stage '{stage}' failed in its own process (exit status {rc}); its error is printed above")


def stage_process_main(out: str, stage: str) -> int:
    """The child of :func:`run_stage_process`: run ``stage`` of the run saved in ``out``."""
    cfg = load_pipeline_config(Path(out) / "config.yaml")
    run_stage(cfg, stage, Path(out))
    return 0


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

