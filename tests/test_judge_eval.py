"""`rlhfkit judge-eval`: data formats with located errors, the oracle on the embedded task, and the last-line JSON."""
from __future__ import annotations

import json

import pytest

from rlhfkit.cli import main
from rlhfkit.commands.judge_eval import load_pairs, task_pairs
from rlhfkit.config import load_config
from rlhfkit.data.loading import DataError
from rlhfkit.judges.config import JudgeConfig, JudgeKind
from rlhfkit.judges.spec import from_spec
from rlhfkit.tasks import JUDGES


def last_json(capsys):
    out = capsys.readouterr().out.strip().splitlines()
    return json.loads(out[-1]), out


def test_llmbar_and_pair_formats(tmp_path):
    llmbar = tmp_path / "natural.json"
    llmbar.write_text(json.dumps([{"input": "q", "output_1": "x", "output_2": "y", "label": 2}]))
    assert load_pairs(llmbar) == [{"prompt": "q", "a": "x", "b": "y", "a_preferred": False}]
    llmbar.write_text(json.dumps([{"input": "q", "output_1": "x", "output_2": "y", "label": 3}]))
    with pytest.raises(DataError, match=r"natural.json:record 0: field 'label' must be 1 or 2"):
        load_pairs(llmbar)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"p{i}", "chosen": f"good{i}", "rejected": f"bad{i}"}) + "\n"
                             for i in range(200)))
    got = load_pairs(pairs, seed=3)
    # The chosen response sits in either slot, about half the time each, and the label follows it.
    assert all((g["a"] if g["a_preferred"] else g["b"]).startswith("good") for g in got)
    assert 70 < sum(g["a_preferred"] for g in got) < 130
    pairs.write_text(json.dumps({"prompt": "p", "chosen": "same", "rejected": "same"}) + "\n")
    with pytest.raises(DataError, match=r"pairs.jsonl:1: 'chosen' and 'rejected' are the same"):
        load_pairs(pairs)


def test_oracle_judge_eval_on_task_pairs(tmp_path, capsys):
    cfg = tmp_path / "oracle.yaml"
    cfg.write_text("kind: oracle\n")
    out = tmp_path / "judgments.jsonl"
    assert main(["judge-eval", "--judge", str(cfg), "--task-pairs", "30", "--seed", "4", "--out", str(out)]) == 0
    res, lines = last_json(capsys)
    # The oracle made the labels and is order-free: full agreement, no position bias, either way.
    assert res["n"] == len(task_pairs(30, 4)) >= 25
    assert res["agreement"] == res["agreement_single_order"] == res["agreement_averaged"] == 1.0
    assert res["position_bias"] == 0.0
    assert any("position bias" in line for line in lines)
    assert len(out.read_text().splitlines()) == res["n"]


def test_llm_judge_eval_on_a_tiny_model(tmp_path, capsys, tiny_lm_dir):
    cfg = tmp_path / "judge.yaml"
    cfg.write_text(f"kind: llm\nmodel: {tiny_lm_dir}\nbatch_size: 2\n")
    data = tmp_path / "natural.json"
    rows = [{"input": f"Say {w}.", "output_1": w, "output_2": w[::-1], "label": 1 + i % 2} for i, w in enumerate(
        ["apple", "pear", "plum", "fig"])]
    data.write_text(json.dumps(rows))
    out = tmp_path / "j.jsonl"
    assert main(["judge-eval", "--judge", str(cfg), "--data", str(data), "--out", str(out), "average_orders=false"]) == 0
    res, _ = last_json(capsys)
    assert res["n"] == 4 and res["average_orders"] is False
    js = [json.loads(l) for l in out.read_text().splitlines()]
    gold = [r["label"] == 1 for r in rows]
    # The figures are recomputed here from the per-pair judgments the command wrote.
    single = sum((j["prob_a_first"] > 0.5) == g for j, g in zip(js, gold)) / 4
    assert res["agreement"] == res["agreement_single_order"] == pytest.approx(single)
    flips = sum((j["prob_a_first"] > 0.5) != (j["prob_a_second"] > 0.5) for j in js)
    assert res["position_bias"] == pytest.approx(flips / 4)


def test_judge_against_judge(tmp_path, capsys, tiny_lm_dir):
    oracle, llm = tmp_path / "oracle.yaml", tmp_path / "llm.yaml"
    oracle.write_text("kind: oracle\n")
    llm.write_text(f"kind: llm\nmodel: {tiny_lm_dir}\naverage_orders: false\n")
    assert main(["judge-eval", "--judge", str(llm), "--task-pairs", "6", "--against", str(oracle),
                 "--out", str(tmp_path / "j.jsonl")]) == 0
    res, _ = last_json(capsys)
    # The oracle agrees with its own labels, so judge-vs-oracle equals the judge's label agreement.
    assert res["against"]["agreement"] == 1.0
    assert res["against"]["judge_vs_judge"] == pytest.approx(res["agreement_single_order"])


def test_bad_judge_configs_fail_clearly(tmp_path, capsys):
    cfg = tmp_path / "j.yaml"
    cfg.write_text("kind: llm\n")
    data = tmp_path / "d.json"
    data.write_text(json.dumps([{"input": "q", "output_1": "x", "output_2": "y", "label": 1}]))
    assert main(["judge-eval", "--judge", str(cfg), "--data", str(data)]) == 2
    assert "needs 'model'" in capsys.readouterr().err
    cfg.write_text("kind: llm\nmodel: /no/such/dir\n")
    assert main(["judge-eval", "--judge", str(cfg), "--data", str(data)]) == 2
    assert "does not exist" in capsys.readouterr().err
    cfg.write_text("kind: judge\n")
    assert main(["judge-eval", "--judge", str(cfg), "--data", str(data)]) == 2
    assert "not one of llm, http, oracle" in capsys.readouterr().err
    cfg.write_text("kind: http\nmodel: m\n")
    assert main(["judge-eval", "--judge", str(cfg), "--data", str(data)]) == 2
    assert "base_url" in capsys.readouterr().err
    c = load_config(JudgeConfig, None, ["kind=oracle"])
    assert c.kind is JudgeKind.ORACLE
    with pytest.raises(ValueError, match="meta"):
        from_spec(c, [{"prompt": "x"}], task_judges=JUDGES)


def test_judge_eval_reports_first_slot_preference_and_the_label_stage_threshold(tmp_path, capsys, monkeypatch):
    """A judge that gives the first slot 0.75 whatever sits there: prob_a_first = 0.75, prob_a_second = 1 − 0.75,
    so every verdict flips with the order (position bias 1.0), the mean first-slot probability is 0.75, and the
    share is over the label stage's default threshold 0.2 (but not over 1.0)."""
    import rlhfkit.commands.judge_eval as judge_eval

    class FirstSlot:
        name = "first-slot"

        def prob(self, items):
            return [0.75 for _ in items]

    monkeypatch.setattr(judge_eval, "from_spec", lambda *a, **k: FirstSlot())
    cfg = tmp_path / "judge.yaml"
    cfg.write_text("kind: oracle\n")
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"p{i}", "chosen": f"good{i}", "rejected": f"bad{i}"}) + "\n" for i in range(6)))
    assert main(["judge-eval", "--judge", str(cfg), "--data", str(data)]) == 0
    res, lines = last_json(capsys)
    assert res["position_bias"] == 1.0 and res["first_slot_preference"] == 0.75
    assert res["max_position_bias"] == 0.2 and res["position_bias_over_max"] is True
    assert any("mean P(first slot): 0.750" in line for line in lines)
    assert any("the label stage refuses this judge without order averaging" in line for line in lines)
    assert main(["judge-eval", "--judge", str(cfg), "--data", str(data), "--max-position-bias", "1.0"]) == 0
    res, lines = last_json(capsys)
    assert res["position_bias_over_max"] is False and not any("refuses" in line for line in lines)
