"""The strength grid (recipes/strength.py) on two tiny finished runs whose tokenizers differ (vocabularies of 300 and
360 tokens): every cell reranked, the curves' PPO runs logged, the report's sections, and the errors it gives before
any model loads."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import tiny_pipeline_overrides
from rlhfkit.config import ConfigError

REWARD = ["reward.max_steps=2", "reward.batch_size=4", "reward.max_len=96", "reward.train_cost=false",
          "reward.rerank.n=4", "reward.rerank.n_prompts=6", "reward.rerank.max_new_tokens=16"]
RERANK = ["strength.rerank.n=4", "strength.rerank.n_prompts=6", "strength.rerank.max_new_tokens=16"]
RL = ["prompts_per_step=4", "total_steps=2", "ppo_epochs=1", "minibatch_size=4", "sampling.max_new_tokens=16",
      "save_every=0"]


def _finished_run(out, vocab: int):
    from rlhfkit.pipeline import load_pipeline_config, run_pipeline

    cfg = load_pipeline_config(None, [*tiny_pipeline_overrides(out), "stages=[data, pretrain, sft, label, reward]",
                                      f"pretrain.arch.vocab_size={vocab}", "label.k=4", "label.n_prompts=16",
                                      "label.sampling.max_new_tokens=16", *REWARD])
    run_pipeline(cfg)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("strength")
    return _finished_run(base / "weak", 300), _finished_run(base / "strong", 360)


def _grid_overrides(out, weak, strong, curves="[weak/weak, weak/strong]"):
    return [f"out={out}", "stages=[strength]", f"strength.weak.run={weak}", f"strength.strong.run={strong}",
            f"strength.curves={curves}", *RERANK, *(f"strength.{s}.rl.{o}" for s in ("weak", "strong") for o in RL)]


@pytest.fixture(scope="module")
def grid(runs, tmp_path_factory):
    from rlhfkit.pipeline import load_pipeline_config, run_pipeline

    out = tmp_path_factory.mktemp("grid") / "run"
    run_pipeline(load_pipeline_config(None, _grid_overrides(out, *runs)))
    return out


def test_the_runs_tokenize_differently(runs):
    from rlhfkit.models.loading import load_tokenizer

    weak, strong = (load_tokenizer(r / "sft" / "model") for r in runs)
    assert len(weak) != len(strong)  # a reward model of one side scores the other side's samples as text


def test_every_cell_is_reranked_and_the_policy_only_methods_agree_across_reward_sides(grid):
    metrics = json.loads((grid / "strength" / "metrics.json").read_text())
    cells = metrics["strength_grid"]
    assert cells["n"] == 4 and cells["n_prompts"] == 6
    for p in ("weak", "strong"):
        rows = [cells[f"policy {p}, RM {r}"] for r in ("weak", "strong")]
        for row in rows:
            assert set(row) == {"rm", "prm", "prm_product", "orm", "majority", "single", "oracle_best_of_n"}
            for v in row.values():
                assert v["ci95"][0] <= v["mean"] <= v["ci95"][1]
        # each policy samples once; majority vote, the first sample and the oracle never read a reward model
        for m in ("majority", "single", "oracle_best_of_n"):
            assert rows[0][m] == rows[1][m]
        # each prompt's samples, their correctness, and both reward sides' scores of them
        rows = [json.loads(x) for x in (grid / "strength" / f"best_of_n_{p}.jsonl").read_text().splitlines()]
        assert len(rows) == 6
        for row in rows:
            assert len(row["responses"]) == len(row["correct"]) == 4
            assert set(row["scores"]) == {"weak", "strong"}
            assert all(len(v) == 4 for side in row["scores"].values() for v in side.values())


def test_a_diagonal_cell_reproduces_the_runs_own_reranking(runs, grid):
    """Same policy, prompts, seed, n, temperature and length as the weak run's reward stage, and its reward models
    read back from disk: the cell's figures are that stage's (the stage scored with the models still in memory)."""
    own = json.loads((runs[0] / "reward" / "metrics.json").read_text())["reranking"]
    cell = json.loads((grid / "strength" / "metrics.json").read_text())["strength_grid"]["policy weak, RM weak"]
    for m in ("rm", "prm", "prm_product", "orm", "majority", "single", "oracle_best_of_n"):
        assert cell[m] == own[m]["accuracy"], m


def test_each_curve_is_a_ppo_run_against_the_reward_sides_model(runs, grid):
    metrics = json.loads((grid / "strength" / "metrics.json").read_text())
    assert metrics["runs"] == ["ppo_weak_weak", "ppo_weak_strong"]
    for name in metrics["runs"]:
        rows = [json.loads(x) for x in (grid / "strength" / name / "log.jsonl").read_text().splitlines()]
        steps = [r for r in rows if "gold_score" in r]
        assert len(steps) == 2 and all("kl" in r and "reward" in r for r in steps)
        assert (grid / "strength" / name / "model" / "config.json").exists()
        saved = json.loads((grid / "strength" / name / "metrics.json").read_text())
        assert "policies" in saved
    curve = metrics["strength_curves"]["policy weak, RM strong"]
    assert curve["rollouts"] == 2 and curve["first_kl"] == pytest.approx(0.0, abs=1e-5)  # step 1 samples the reference
    # the strong side's reward model scores the weak policy's text; the critic reads the policy's tokens
    saved = yaml.safe_load((grid / "strength" / "ppo_weak_strong" / "config.yaml").read_text())
    assert Path(saved["reward_models"][0]) == runs[1] / "reward" / "rm"
    assert Path(saved["critic_init"]) == runs[0] / "sft" / "model" and Path(saved["policy"]) == Path("stage:sft/model")
    # the curves go into the report's over-optimisation section, one line each
    md = (grid / "report.md").read_text()
    assert "## Strength grid: best-of-n" in md and "## Strength grid: gold vs proxy" in md
    assert "strength/ppo_weak_weak" in md and "strength/ppo_weak_strong" in md and "plots/overoptimization.png" in md


def test_bad_grids_are_refused_before_a_model_loads(runs, tmp_path):
    from rlhfkit.pipeline import load_pipeline_config, run_pipeline

    with pytest.raises(ConfigError, match=r"curves: 'weak/medium' is not policy/reward"):
        load_pipeline_config(None, _grid_overrides(tmp_path / "a", *runs, curves="[weak/medium]"))
    with pytest.raises(ConfigError, match=r"strength\.strong\.run: .*nowhere: file not found"):
        run_pipeline(load_pipeline_config(None, _grid_overrides(tmp_path / "b", runs[0], tmp_path / "nowhere")))
    # reranking on the runs' own training prompts would favour them
    overrides = _grid_overrides(tmp_path / "c", *runs) + ["strength.rerank.data=stage:data/prompts.jsonl"]
    with pytest.raises(ConfigError, match=r"prompts\.jsonl: 6 of the reranked prompts are in weak's training data"):
        run_pipeline(load_pipeline_config(None, overrides))
    with pytest.raises(ConfigError, match=r"strength\.weak\.rl: a curve is one PPO run .* \(got model, \[0, 1\]\)"):
        run_pipeline(load_pipeline_config(None, _grid_overrides(tmp_path / "d", *runs) + ["strength.weak.rl.seeds=[0, 1]"]))
    for d in ("b", "c", "d"):
        assert not (tmp_path / d / "strength").exists()  # nothing written as if complete
