"""Stages run over several seeds (``rlhfkit.seeds``): the aggregation by hand, references to a seeded stage's
outputs, and a tiny pipeline whose dpo and ppo stages run two seeds each, evaluated, reported and resumed."""
from __future__ import annotations

import dataclasses
import json
import math
import shutil
import statistics
from pathlib import Path

import pytest
import torch

from conftest import tiny_pipeline_overrides
from rlhfkit.checkpoints import checkpoint_dir
from rlhfkit.config import ConfigError
from rlhfkit.seeds import aggregate_metrics, aggregate_policies, expand_policies, over_seeds


# ---------------------------------------------------------------- by hand

def test_over_seeds_by_hand():
    """Means 0.5, 0.6, 0.7: mean 0.6; sd = sqrt((0.01 + 0 + 0.01) / (3 − 1)) = 0.1 (ddof 1, not the 0.0816 of
    ddof 0); the 95% interval 0.6 ± t_{0.975,2}·0.1/√3 = 0.6 ± 4.303·0.057735 = 0.6 ± 0.248434."""
    figs = [{"mean": 0.5, "ci95": [0.4, 0.6], "n": 20, "length_coef": 1.0},
            {"mean": 0.6, "ci95": [0.5, 0.7], "n": 20, "length_coef": 2.0},
            {"mean": 0.7, "ci95": [0.6, 0.8], "n": 20, "length_coef": 4.5}]
    agg = over_seeds(figs)
    assert agg["mean"] == pytest.approx(0.6, abs=1e-15) and agg["sd"] == pytest.approx(0.1, abs=1e-15)
    assert agg["seeds"] == [0.5, 0.6, 0.7] and agg["n"] == 3
    assert agg["ci95"] == pytest.approx([0.6 - 0.248434, 0.6 + 0.248434], abs=1e-6)
    assert agg["length_coef"] == pytest.approx(2.5)  # any other number of the figure: its mean over seeds
    # Two seeds: sd = |a − b| / √2; a seed without a value leaves the figure without one.
    two = over_seeds([{"mean": 1.0}, {"mean": 3.0}])
    assert two["mean"] == 2.0 and two["sd"] == pytest.approx(math.sqrt(2)) and two["ci95"][0] < 0 < 4 < two["ci95"][1]
    assert over_seeds([{"mean": 1.0}, {"mean": None}])["mean"] is None
    # A setting equal in every seed stays as it is; a metric some seed lacks is left out.
    m = aggregate_metrics([{"cost_threshold": 0.0, "kl": {"mean": 1.0}, "x": {"mean": 1.0}},
                           {"cost_threshold": 0.0, "kl": {"mean": 2.0}}])
    assert m["cost_threshold"] == 0.0 and m["kl"]["mean"] == 1.5 and "x" not in m
    # A nested group (eval's sampled figures) is aggregated figure by figure: (0.2 + 0.4) / 2 = 0.3.
    m = aggregate_metrics([{"sampled": {"temperature": 0.7, "a": {"mean": 0.2}}},
                           {"sampled": {"temperature": 0.7, "a": {"mean": 0.4}}}])
    assert m["sampled"]["temperature"] == 0.7 and m["sampled"]["a"]["mean"] == pytest.approx(0.3)


def test_aggregate_policies_groups_seeds_in_place():
    res = {"sft": {"a": {"mean": 0.1}}, "ppo@seed0": {"a": {"mean": 0.2}}, "ppo@seed1": {"a": {"mean": 0.4}},
           "dpo": {"a": {"mean": 0.3}}}
    policies, per_seed = aggregate_policies(res)
    assert list(policies) == ["sft", "ppo", "dpo"] and list(per_seed) == ["ppo@seed0", "ppo@seed1"]
    assert policies["ppo"]["a"]["mean"] == pytest.approx(0.3) and policies["ppo"]["a"]["seeds"] == [0.2, 0.4]
    assert policies["sft"] is res["sft"] and per_seed["ppo@seed1"] is res["ppo@seed1"]


# ---------------------------------------------------------------- references

def _fake_seeded(out: Path, stage: str, seeds: list[int]) -> None:
    (out / stage).mkdir(parents=True)
    (out / stage / "metrics.json").write_text(json.dumps({"seeds_run": seeds, "seeds": {}}))


def test_eval_policies_expand_per_seed_and_an_explicit_seed_is_a_plain_path(tmp_path):
    _fake_seeded(tmp_path, "ppo", [0, 2])
    _fake_seeded(tmp_path, "dno", [1, 3])
    policies = {"sft": "stage:sft/model", "ppo": "stage:ppo/model", "ppo2": "stage:ppo/seed_2/model",
                "dno_3": "stage:dno/dno_3/model"}
    assert expand_policies(policies, tmp_path, "sft") == {
        "sft": "stage:sft/model", "ppo@seed0": "stage:ppo/seed_0/model", "ppo@seed2": "stage:ppo/seed_2/model",
        "ppo2": "stage:ppo/seed_2/model", "dno_3@seed1": "stage:dno/seed_1/dno_3/model",
        "dno_3@seed3": "stage:dno/seed_3/dno_3/model"}
    with pytest.raises(ConfigError, match=r"eval.reference: policy 'ppo' .* seeds \[0, 2\].*stage:ppo/seed_0/model"):
        expand_policies(policies, tmp_path, "ppo")


def test_another_stage_naming_a_seeded_stages_model_is_refused(tmp_path):
    from accelerate import Accelerator

    from rlhfkit.pipeline import load_pipeline_config
    from rlhfkit.stage import StageContext

    # At load time: the field, and what to write instead.
    with pytest.raises(ConfigError, match=r"dno\.model: 'stage:dpo/model' is ambiguous: stage dpo runs with seeds "
                                          r"\[0, 1\].*e\.g\. 'stage:dpo/seed_0/model'"):
        load_pipeline_config(None, ["dpo.seeds=[0, 1]", "dno.model=stage:dpo/model"])
    with pytest.raises(ConfigError, match=r"dno\.judge: 'bt:stage:ppo/model' is ambiguous.*'bt:stage:ppo/seed_3/model'"):
        load_pipeline_config(None, ["ppo.seeds=[3, 4]", "dno.judge=bt:stage:ppo/model"])
    cfg = load_pipeline_config(None, ["dpo.seeds=[0, 1]", "dno.model=stage:dpo/seed_1/model",
                                      "eval.policies={dpo: stage:dpo/model}"])
    assert cfg.dpo.seeds == (0, 1)
    with pytest.raises(ConfigError, match="seeds: \\[0\\] is one run"):
        load_pipeline_config(None, ["dpo.seeds=[0]"])
    with pytest.raises(ConfigError, match="repeats a seed"):
        load_pipeline_config(None, ["grpo.seeds=[1, 1]"])
    # At run time (a stage run alone, whose config does not list the seeds): the missing path says why.
    _fake_seeded(tmp_path, "ppo", [0, 1])
    ctx = StageContext(tmp_path, tmp_path / "dno.partial", "dno", Accelerator(cpu=True))
    with pytest.raises(ConfigError, match=r"dno\.model: .*file not found.*'stage:ppo/model' is ambiguous.*"
                                          r"'stage:ppo/seed_0/model'"):
        ctx.model("stage:ppo/model", "model")


def test_a_seeds_checkpoints_lie_in_its_stages_checkpoint_directory(tmp_path):
    assert checkpoint_dir(tmp_path / "ppo.partial") == tmp_path / "ppo.ckpt"
    assert checkpoint_dir(tmp_path / "ppo.partial" / "seed_2") == tmp_path / "ppo.ckpt" / "seed_2"
    assert checkpoint_dir(tmp_path / "intransitive.partial" / "bt") is None
    assert checkpoint_dir(tmp_path / "elsewhere" / "seed_2") is None


# ---------------------------------------------------------------- a tiny pipeline over seeds

SEEDED = ["stages=[data, pretrain, sft, label, ppo, dpo, dno, eval]", "label.k=4", "label.chunk_size=8",
          "label.sampling.max_new_tokens=16", "label.n_prompts=16",
          "dpo.seeds=[0, 1]", "dpo.batch_size=4", "dpo.max_steps=2", "dpo.save_every=1", "dpo.lr=1e-3",
          "ppo.seeds=[0, 5]", "ppo.reward_source=judge", "ppo.prompts_per_step=4", "ppo.minibatch_size=4",
          "ppo.ppo_epochs=1", "ppo.total_steps=2", "ppo.save_every=1", "ppo.sampling.max_new_tokens=8",
          "ppo.lr=1e-3", "ppo.critic_lr=1e-3",
          "dno.seeds=[0, 1]", "dno.iterations=2", "dno.prompts_per_iteration=12", "dno.n_validation=8",
          "dno.batch_size=2", "dno.sampling.max_new_tokens=16", "dno.save_every=1",
          "eval.policies={sft: stage:sft/model, dpo: stage:dpo/model, ppo: stage:ppo/model, dno_2: stage:dno/dno_2/model}"]


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


@pytest.fixture(scope="module")
def seeded_run(tmp_path_factory):
    from rlhfkit.pipeline import load_pipeline_config, run_pipeline

    out = tmp_path_factory.mktemp("seeds") / "run"
    cfg = load_pipeline_config(None, [*tiny_pipeline_overrides(out), *SEEDED])
    run_pipeline(cfg)
    return out, cfg


def test_each_seed_writes_a_whole_run_and_the_stage_lists_them(seeded_run):
    out, _ = seeded_run
    for stage, seeds in (("dpo", [0, 1]), ("ppo", [0, 5]), ("dno", [0, 1])):
        m = json.loads((out / stage / "metrics.json").read_text())
        assert m["seeds_run"] == seeds and list(m["seeds"]) == [str(s) for s in seeds]
        for s in seeds:
            d = out / stage / f"seed_{s}"
            assert (d / "model" / "model.safetensors").exists() and (d / "log.jsonl").exists()
            assert json.loads((d / "metrics.json").read_text()) == m["seeds"][str(s)]
        assert not (out / stage / "model").exists() and not (out / f"{stage}.ckpt").exists()
        if stage == "dno":
            assert all((out / stage / f"seed_{s}" / f"dno_{t}" / "model").exists() for s in seeds for t in (1, 2))
        a, b = (_weights(out / stage / f"seed_{s}" / "model") for s in seeds)
        assert any(not torch.equal(a[k], b[k]) for k in a), f"{stage}: the seeds trained the same model"
    # The RL stage's own figure (KL on held-out prompts) aggregated over its seeds.
    ppo = json.loads((out / "ppo" / "metrics.json").read_text())
    kls = [ppo["seeds"][s]["policies"]["ppo"]["kl_from_reference"]["mean"] for s in ("0", "5")]
    kl = ppo["policies"]["ppo"]["kl_from_reference"]
    assert kl["seeds"] == kls and kls[0] != kls[1] and kl["mean"] == (kls[0] + kls[1]) / 2
    assert kl["sd"] == pytest.approx(abs(kls[0] - kls[1]) / math.sqrt(2), rel=1e-12)
    half = 12.706 * kl["sd"] / math.sqrt(2)  # t_{0.975, 1}
    assert kl["ci95"] == pytest.approx([kl["mean"] - half, kl["mean"] + half], rel=1e-12)
    assert ppo["seeds"]["0"]["final_step"]["step"] == 2


def test_eval_reports_each_seed_and_their_mean_and_sd(seeded_run):
    out, _ = seeded_run
    ev = json.loads((out / "eval" / "metrics.json").read_text())
    assert list(ev["policies"]) == ["sft", "dpo", "ppo", "dno_2"]
    per_seed = ["dpo@seed0", "dpo@seed1", "ppo@seed0", "ppo@seed5", "dno_2@seed0", "dno_2@seed1"]
    assert list(ev["policies_per_seed"]) == per_seed
    samples = [json.loads(x) for x in (out / "eval" / "samples.jsonl").read_text().splitlines()]
    assert {r["policy"] for r in samples} == {"sft", *per_seed}
    for name, seeds in (("dpo", (0, 1)), ("ppo", (0, 5)), ("dno_2", (0, 1))):
        agg = ev["policies"][name]
        for metric in ("gold_score", "win_rate_vs_sft", "response_length"):
            a, b = (ev["policies_per_seed"][f"{name}@seed{s}"][metric]["mean"] for s in seeds)
            assert agg[metric]["mean"] == (a + b) / 2 and agg[metric]["seeds"] == [a, b] and agg[metric]["n"] == 2
            assert agg[metric]["sd"] == pytest.approx(statistics.stdev([a, b]), rel=1e-12, abs=1e-15)
            assert agg[metric]["sd"] == pytest.approx(abs(a - b) / math.sqrt(2), rel=1e-12, abs=1e-15)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["policies"]["dpo"]["gold_score"]["sd"] == ev["policies"]["dpo"]["gold_score"]["sd"]
    assert summary["policies"]["ppo"]["kl_from_reference"]["seeds"]  # the RL stage's figure, merged
    assert set(summary["policies_per_seed"]) == set(ev["policies_per_seed"])
    report = (out / "report.md").read_text()
    g = ev["policies"]["dpo"]["gold_score"]
    assert f"| dpo | {g['mean']:.3f} ± {g['sd']:.3f} (2 seeds) |" in report
    assert "## Policies per seed" in report and (out / "plots" / "dpo@seed1.png").exists()


def test_a_complete_seeded_stage_is_skipped_on_resume(seeded_run, capsys):
    from rlhfkit.pipeline import run_pipeline

    out, cfg = seeded_run
    run_pipeline(cfg)
    printed = capsys.readouterr().out
    assert "[rlhfkit] dpo: complete" in printed and "[rlhfkit] ppo: complete" in printed
    assert "seed 0 (1 of 2)" not in printed


def test_a_restarted_seeded_stage_keeps_its_finished_seeds(seeded_run, tmp_path, monkeypatch, capsys):
    """Seed 1 fails after seed 0 finished; the rerun copies seed 0 back (not trained again) and trains seed 1,
    ending with the uninterrupted run's weights."""
    from rlhfkit import pipeline
    from rlhfkit.recipes import dpo

    whole, cfg = seeded_run
    out = tmp_path / "run"
    for stage in ("data", "pretrain", "sft", "label"):
        shutil.copytree(whole / stage, out / stage)
    cfg = dataclasses.replace(cfg, out=str(out), stages=("data", "pretrain", "sft", "label", "dpo"))
    trained = []

    def fails_at_seed_1(c, ctx):
        trained.append(c.seed)
        if c.seed == 1:
            raise RuntimeError("killed")
        return dpo.run(c, ctx)

    monkeypatch.setitem(pipeline.STAGES, "dpo", pipeline.Stage("dpo", fails_at_seed_1))
    with pytest.raises(RuntimeError, match="killed"):
        pipeline.run_pipeline(cfg)
    assert (out / "dpo.ckpt" / "seed_0.done" / "output" / "model").exists() and not (out / "dpo").exists()
    monkeypatch.setitem(pipeline.STAGES, "dpo", pipeline.Stage("dpo", lambda c, ctx: trained.append(c.seed) or dpo.run(c, ctx)))
    pipeline.run_pipeline(cfg)
    assert trained == [0, 1, 1]
    assert f"dpo: seed 0 trained to the end before the restart ({out / 'dpo.ckpt' / 'seed_0.done'})" in capsys.readouterr().out
    for s in (0, 1):
        a, b = _weights(whole / "dpo" / f"seed_{s}" / "model"), _weights(out / "dpo" / f"seed_{s}" / "model")
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((out / "dpo" / "metrics.json").read_text())["seeds_run"] == [0, 1]
    assert not (out / "dpo.ckpt").exists()
