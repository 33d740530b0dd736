"""The label and reward stages end to end on tiny models: resumable labeling, the four models, eval-rm/eval-prm."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import tiny_pipeline_overrides
from rlhfkit.stage import StageContext

LABEL = ["label.k=4", "label.chunk_size=8", "label.sampling.max_new_tokens=16"]
REWARD = ["reward.max_steps=3", "reward.batch_size=4", "reward.max_len=96", "reward.eval_batch_size=32",
          "reward.rerank.n=4", "reward.rerank.n_prompts=8", "reward.rerank.max_new_tokens=16", "reward.log_every=1"]


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    """data → pretrain → sft on the tiny config (the label stage's inputs)."""
    from rlhfkit.pipeline import load_pipeline_config, run_pipeline

    out = tmp_path_factory.mktemp("pipe") / "run"
    cfg = load_pipeline_config(None, [*tiny_pipeline_overrides(out), "stages=[data, pretrain, sft]"])
    run_pipeline(cfg)
    return out


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    """32 task prompts with their ``meta`` (the oracle's answer key)."""
    from rlhfkit.tasks.arith import format_prompt, make_problems

    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    rows = [{"prompt": format_prompt(p), "meta": p.to_meta()} for p in make_problems(32, seed=5, unanswerable_frac=0.25)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _label_cfg(policy: Path, prompts: Path, extra=()):
    from rlhfkit.pipeline import load_pipeline_config

    return load_pipeline_config(None, [*LABEL, f"label.policy={policy}", f"label.data={prompts}", *extra])


def _records(d: Path) -> dict[str, list[dict]]:
    out = {}
    for name in ("rankings", "steps"):
        rows = [json.loads(x) for x in (d / f"{name}.jsonl").read_text().splitlines()]
        for r in rows:
            r["provenance"].pop("time")  # wall-clock time of labeling is the one thing allowed to differ
        out[name] = rows
    return out


def test_killed_labeling_run_resumes_to_the_same_dataset(tiny_lm_dir, prompts_file, tmp_path):
    from accelerate import Accelerator

    from rlhfkit.recipes import label

    cfg = _label_cfg(tiny_lm_dir, prompts_file, ["label.n_prompts=16", "label.chunk_size=4", "label.k=3",
                                                 "label.sampling.max_new_tokens=12"])
    acc = Accelerator()
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    for d in (whole, killed):
        (d / "stage").mkdir(parents=True)
    m_whole = label.run(cfg.label, StageContext(whole, whole / "stage", "label", acc))
    assert m_whole["chunks"] == 4 and m_whole["chunks_labeled"] == 4
    # "Kill" after two chunks: they are on disk, nothing else is.
    stopped = label.run(cfg.label, StageContext(killed, killed / "stage", "label", acc), stop_after_chunks=2)
    assert stopped == {"stopped": True, "chunks_done": 2}
    assert sorted(p.name for p in (killed / "label.chunks").glob("chunk-*.json")) == ["chunk-00000.json", "chunk-00001.json"]
    assert not (killed / "stage" / "rankings.jsonl").exists()
    m_resumed = label.run(cfg.label, StageContext(killed, killed / "stage", "label", acc))
    assert m_resumed["chunks_resumed"] == 2 and m_resumed["chunks_labeled"] == 2  # nothing relabeled
    a, b = _records(whole / "stage"), _records(killed / "stage")
    assert a == b
    assert len(a["rankings"]) == 16 and all(sorted(r["ranking"]) == [0, 1, 2] for r in a["rankings"])
    assert a["rankings"][0]["provenance"]["judge"] == "oracle(beta=10.0)"
    # a changed config does not silently reuse old chunks
    from rlhfkit.config import ConfigError

    other = _label_cfg(tiny_lm_dir, prompts_file, ["label.n_prompts=16", "label.chunk_size=4", "label.k=4",
                                                   "label.sampling.max_new_tokens=12"])
    with pytest.raises(ConfigError, match="different config"):
        label.run(other.label, StageContext(killed, killed / "stage", "label", acc))


def test_step_label_prompts_step_labels_only_the_first_prompts_and_ranks_them_all(tiny_lm_dir, prompts_file, tmp_path):
    """10 prompts in chunks of 4, step labels for the first 6 only: chunk 0 whole, 2 of chunk 1's, none of chunk 2's.
    The rankings (every prompt) and the step records kept are those of the run without the cap."""
    from accelerate import Accelerator

    from rlhfkit.recipes import label

    base = ["label.n_prompts=10", "label.chunk_size=4", "label.k=2", "label.sampling.max_new_tokens=12"]
    runs = {}
    for name, extra in (("all", []), ("capped", ["label.step_label_prompts=6"])):
        (tmp_path / name / "stage").mkdir(parents=True)
        cfg = _label_cfg(tiny_lm_dir, prompts_file, [*base, *extra])
        m = label.run(cfg.label, StageContext(tmp_path / name, tmp_path / name / "stage", "label", Accelerator()))
        runs[name] = (m, _records(tmp_path / name / "stage"))
    (m_all, all_), (m_cap, cap) = runs["all"], runs["capped"]
    assert m_cap["rankings"] == m_all["rankings"] == 10 and cap["rankings"] == all_["rankings"]
    first6 = {r["prompt"] for r in all_["rankings"][:6]}
    assert len(first6) == 6 and m_all["steps"] > m_cap["steps"] > 0
    assert cap["steps"] == [r for r in all_["steps"] if r["prompt"] in first6]
    with pytest.raises(ValueError, match="step_label_prompts must be >= 0"):
        label.LabelConfig(step_label_prompts=-1)


def test_label_with_a_reward_model_judge_records_both_order_agreement(tiny_lm_dir, prompts_file, tmp_path):
    from accelerate import Accelerator

    from rlhfkit.models.reward_files import build_scalar_model, save_scalar_model
    from rlhfkit.recipes import label

    net, tok = build_scalar_model(tiny_lm_dir, "reward", max_len=96)
    save_scalar_model(net, tok, tmp_path / "rm")
    cfg = _label_cfg(tiny_lm_dir, prompts_file, [f"label.judge={tmp_path / 'rm'}", "label.n_prompts=8", "label.k=3",
                                                     "label.sampling.max_new_tokens=12"])
    (tmp_path / "stage").mkdir()
    m = label.run(cfg.label, StageContext(tmp_path, tmp_path / "stage", "label", Accelerator()))
    pairs = [json.loads(x) for x in (tmp_path / "stage" / "pairs.jsonl").read_text().splitlines()]
    assert m["pairs"] == len(pairs) > 0
    p = pairs[0]["provenance"]
    # a reward model is order-consistent by construction: P(a>b) = 1 − P(b>a)
    assert p["both_order_agreement"] is True and p["p_ab"] == pytest.approx(1 - p["p_ba"], abs=1e-6)
    assert p["judge"].startswith("reward-model:")


def test_label_and_reward_stages_train_all_models_and_report_reranking(sft_run, capsys):
    from rlhfkit.cli import main
    from rlhfkit.pipeline import load_pipeline_config, run_pipeline

    cfg = load_pipeline_config(None, [*tiny_pipeline_overrides(sft_run), "stages=[data, pretrain, sft, label, reward]",
                                      *LABEL, *REWARD])
    run_pipeline(cfg)
    for name in ("rm", "prm", "orm", "cost"):
        assert (sft_run / "reward" / name / "scalar_head.json").exists()
    assert not (sft_run / "label.ckpt").exists() and not (sft_run / "label.chunks").exists()  # the chunk store
    metrics = json.loads((sft_run / "reward" / "metrics.json").read_text())
    assert set(metrics["models"]) == {"rm", "prm", "orm", "cost"}
    assert metrics["models"]["rm"]["heldout"]["pairs"] > 0
    summary = json.loads((sft_run / "summary.json").read_text())
    for method in ("prm", "orm", "majority"):
        acc = summary["reranking"][method]["accuracy"]
        assert 0.0 <= acc["mean"] <= 1.0 and acc["ci95"][0] <= acc["mean"] <= acc["ci95"][1]

    capsys.readouterr()
    assert main(["eval-rm", "--model", str(sft_run / "reward" / "rm"), "--data", str(sft_run / "label" / "rankings.jsonl")]) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(last) >= {"accuracy", "mean_margin", "ece", "pairs"}
    assert last["pairs"] == 6 * 32  # 32 rankings of 4 → C(4,2) = 6 pairs each
    assert main(["eval-prm", "--model", str(sft_run / "reward" / "prm"), "--data", str(sft_run / "label" / "steps.jsonl")]) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(last) >= {"step_accuracy", "roc_auc", "majority_baseline", "steps"} and last["steps"] > 0


class _FirstSlotJudge:
    """Always prefers the first slot: P = 0.75 whichever response sits there (position bias 1.0)."""

    name = "first-slot"

    def prob(self, items):
        return [0.75 for _ in items]


def test_label_refuses_a_position_biased_judge_without_order_averaging(tiny_lm_dir, prompts_file, tmp_path, monkeypatch):
    """Every comparison: p_ab = p_ba = 0.75, the same slot both times → share 1.0 > 0.2. Averaging off: refused
    before any chunk is saved, naming the share and the threshold. Averaging on (the default): labels, each
    pair's p = (0.75 + 1 − 0.75) / 2 = ½ exactly (no comparison), and reports the bias (first-slot preference 0.75)."""
    from accelerate import Accelerator

    from rlhfkit.config import ConfigError
    from rlhfkit.recipes import label

    monkeypatch.setattr(label, "from_spec", lambda *a, **k: _FirstSlotJudge())
    base = ["label.judge=first-slot", "label.n_prompts=4", "label.k=3", "label.sampling.max_new_tokens=8"]
    cfg = _label_cfg(tiny_lm_dir, prompts_file, [*base, "label.average_orders=false"])
    (tmp_path / "a" / "stage").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"judge first-slot .* on 1\.000 of 12 comparisons .* label\.max_position_bias = 0\.2"):
        label.run(cfg.label, StageContext(tmp_path / "a", tmp_path / "a" / "stage", "label", Accelerator()))
    assert not list((tmp_path / "a" / "label.chunks").glob("chunk-*.json"))
    # A looser threshold lets it label, from the first order alone: every pair a > b at 0.75.
    loose = _label_cfg(tiny_lm_dir, prompts_file, [*base, "label.average_orders=false", "label.max_position_bias=1.0"])
    (tmp_path / "b" / "stage").mkdir(parents=True)
    m = label.run(loose.label, StageContext(tmp_path / "b", tmp_path / "b" / "stage", "label", Accelerator()))
    assert m["pairs"] == 12 and m["position_bias"]["share_order_decides"] == 1.0
    averaged = _label_cfg(tiny_lm_dir, prompts_file, base)
    (tmp_path / "c" / "stage").mkdir(parents=True)
    m = label.run(averaged.label, StageContext(tmp_path / "c", tmp_path / "c" / "stage", "label", Accelerator()))
    assert m["pairs"] == 0 and m["position_bias"] == {"share_order_decides": 1.0, "first_slot_preference": 0.75, "n": 12,
                                                      "n_undecided": 0, "average_orders": True, "max_position_bias": 0.2}


def test_oracle_length_bias_needs_the_oracle_judge():
    from rlhfkit.recipes.label import LabelConfig

    assert LabelConfig(oracle_length_bias=2.0).oracle_length_bias == 2.0
    with pytest.raises(ValueError, match="oracle_length_bias.*judge: oracle"):
        LabelConfig(judge="stage:reward/rm", oracle_length_bias=2.0)
