"""The one judge factory (``judges.from_spec``), the task judges' noiseless verdict, and the task's
reward-model evaluations (``tasks.arith_eval``): every form by hand."""
from __future__ import annotations

import json

import pytest

from rlhfkit.config import ConfigError
from rlhfkit.judges import from_spec
from rlhfkit.judges.config import JudgeConfig, JudgeKind
from rlhfkit.tasks.intransitive_judge import IntransitiveJudge, restyle
from rlhfkit.tasks.oracle import TaskOracle
from rlhfkit.tasks.arith import format_prompt, gold_response, make_problems
from rlhfkit.tasks import JUDGES
from rlhfkit.tasks.arith_judge import judge


@pytest.fixture(scope="module")
def task():
    """Three answerable problems, their prompt records, and for the first: prompt, gold and a wrong answer."""
    problems = make_problems(3, seed=7, unanswerable_frac=0.0)
    records = [{"prompt": format_prompt(p), "meta": p.to_meta()} for p in problems]
    p = problems[0]
    gold = gold_response(p)
    wrong = "\n".join(gold.split("\n")[:-1] + [f"Answer: {p.answer + 1}"])
    return problems, records, format_prompt(p), gold, wrong


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, tiny_lm_dir):
    """A run directory holding a (random) reward model ``rm`` and a pairwise preference model ``pm``."""
    from rlhfkit.judges.preference_model import MARKER
    from rlhfkit.models.reward_files import build_scalar_model, save_scalar_model

    run = tmp_path_factory.mktemp("run")
    for name in ("rm", "pm"):
        net, tok = build_scalar_model(tiny_lm_dir, kind="reward", max_len=64, seed=1)
        save_scalar_model(net, tok, run / name)
    (run / "pm" / MARKER).write_text(json.dumps({"kind": "pairwise", "symmetrized": True}))
    return run


# ---------------------------------------------------------------- from_spec

def test_task_judges_by_name_carry_beta_and_gamma(task):
    _, records, q, gold, wrong = task
    o = from_spec("oracle", records, beta=4.0, task_judges=JUDGES)
    assert type(o) is TaskOracle and o.beta == 4.0
    i = from_spec(" intransitive ", records, beta=2.0, gamma=5.0, task_judges=JUDGES)
    assert type(i) is IntransitiveJudge and (i.beta, i.gamma) == (2.0, 5.0)
    # records without meta are left out, not fatal, as long as one has it
    assert from_spec("oracle", [{"prompt": "no meta"}, *records], task_judges=JUDGES).problem(q) is not None
    with pytest.raises(ConfigError, match="'oracle' is neither a known judge name"):
        from_spec("oracle", records)  # the task's judges are the caller's to give: the factory imports no task
    with pytest.raises(ValueError, match="intransitive judge needs records of the embedded task"):
        from_spec("intransitive", [{"prompt": "no meta"}], task_judges=JUDGES)


def test_a_judge_config_loaded_or_on_disk_with_overrides(task, tmp_path):
    _, records, *_ = task
    j = from_spec(JudgeConfig(kind=JudgeKind.ORACLE, beta=3.0), records, task_judges=JUDGES)
    assert type(j) is TaskOracle and j.beta == 3.0
    (tmp_path / "judge.yaml").write_text("kind: oracle\nbeta: 2.0\n")
    assert from_spec("stage:judge.yaml", records, base_dir=tmp_path, task_judges=JUDGES).beta == 2.0
    assert from_spec("stage:judge.yaml", records, base_dir=tmp_path, overrides=["beta=6.5"], task_judges=JUDGES).beta == 6.5  # overrides win
    with pytest.raises(ConfigError, match="overrides apply to a judge YAML file only"):
        from_spec("oracle", records, overrides=["beta=6.5"], task_judges=JUDGES)
    with pytest.raises(ConfigError, match="nope"):
        from_spec("stage:judge.yaml", records, base_dir=tmp_path, overrides=["nope=1"], task_judges=JUDGES)


def test_model_directories_detected_or_named_with_bt_and_pm(model_dirs):
    from rlhfkit.judges.preference_model import PairwisePreferenceModel
    from rlhfkit.judges.reward_model import RewardModelPreference

    assert isinstance(from_spec("stage:rm", base_dir=model_dirs), RewardModelPreference)
    assert isinstance(from_spec("stage:pm", base_dir=model_dirs), PairwisePreferenceModel)
    assert isinstance(from_spec("bt:stage:rm", base_dir=model_dirs), RewardModelPreference)
    assert isinstance(from_spec("pm:stage:pm", base_dir=model_dirs), PairwisePreferenceModel)
    assert isinstance(from_spec(f"bt:{model_dirs / 'rm'}"), RewardModelPreference)  # absolute: no base_dir needed
    with pytest.raises(ConfigError, match="is not a pairwise preference model"):
        from_spec("pm:stage:rm", base_dir=model_dirs)
    with pytest.raises(ConfigError, match=r"judge 'bt:stage:missing'.*not a directory"):
        from_spec("bt:stage:missing", base_dir=model_dirs)
    with pytest.raises(ConfigError, match="not a directory"):
        from_spec("pm:", base_dir=model_dirs)


# ---------------------------------------------------------------- the noiseless verdict

def test_oracle_logit_and_verdict_by_hand(task):
    problems, _, q, gold, wrong = task
    o = TaskOracle(problems, beta=10.0)
    assert judge(problems[0], gold).score == 1.0
    s_wrong = judge(problems[0], wrong).score
    assert o.logit(q, gold, wrong) == 10.0 * (1.0 - s_wrong)
    assert (o.verdict(q, gold, wrong), o.verdict(q, wrong, gold), o.verdict(q, gold, gold)) == (1.0, 0.0, 0.5)
    # scores given override the gold ones (an unfinished gold response scored 0 loses), and no prompt is needed
    assert o.verdict("not a task prompt", gold, wrong, 0.0, s_wrong) == 0.0
    with pytest.raises(KeyError, match="no problem"):
        o.verdict("not a task prompt", gold, wrong, 0.0)


def test_eval_win_rate_is_the_judges_verdict_on_the_scores_as_judged(task):
    """Three prompts' rows against the reference's: by hand, with the intransitive judge (beta 10, gamma 3)
    and the oracle. Row 2's response never ended: scored 0 (unfinished_score), whatever its text."""
    from rlhfkit.recipes.evaluate import policy_metrics

    problems, records, q, gold, _ = task
    def row(text, score):
        return {"prompt": q, "response": text, "score": score, "correct": False, "abstained": False,
                "invented": False, "unsafe": False, "answerable": True, "finished": True, "length": 1}

    spaced, tight, wide = (restyle(gold, s) for s in ("spaced", "tight", "wide"))
    rows = [row(spaced, 1.0), row(wide, 0.0), row(tight, 1.0)]
    ref = [row(tight, 1.0), row(spaced, 1.0), row(tight, 1.0)]
    # intransitive: spaced ≻ tight → 1; 10·(0 − 1) + 3·(wide ≻ spaced) = −7 → 0; same text → ½
    m = policy_metrics(rows, ref, 0, IntransitiveJudge(problems, beta=10.0, gamma=3.0))
    assert m["win_rate_vs_sft"]["mean"] == 0.5 and m["win_rate_vs_sft"]["n"] == 3
    # the oracle: equal gold → ½; 0 < 1 → 0; equal → ½
    m = policy_metrics(rows, ref, 0, TaskOracle(problems))
    assert m["win_rate_vs_sft"]["mean"] == pytest.approx(1 / 3)
    assert "win_rate_vs_sft" not in policy_metrics(rows, None, 0, TaskOracle(problems))


def test_eval_config_refuses_a_judge_beta_that_silences_the_gold_score():
    from rlhfkit.recipes.evaluate import EvalConfig

    with pytest.raises(ValueError, match="judge_beta must be a finite number > 0"):
        EvalConfig(judge_beta=0.0)


# ---------------------------------------------------------------- tasks.arith_eval

def test_majority_vote_pick_by_hand():
    from rlhfkit.tasks.arith_eval import _majority_pick

    # "3" and "4" both twice: the answer seen first wins, and its first sample's correctness is the pick's
    assert _majority_pick(["3", None, "4", "4", "3"], [1.0, 0.0, 0.0, 1.0, 0.0]) == 1.0
    assert _majority_pick(["4", "3", "3"], [1.0, 0.0, 1.0]) == 0.0  # "3" twice: its first sample (index 1)
    assert _majority_pick([None, None], [1.0, 1.0]) == 0.0  # no sample gave an answer


def test_judge_agreement_by_hand(task):
    """Four pairs: one model ordering agrees with the gold order, one does not, one pair ties in gold
    (skipped), one prompt has no answer key (skipped). The second pair's label is itself wrong."""
    from types import SimpleNamespace

    from rlhfkit.tasks.arith_eval import judge_agreement

    problems, records, q, gold, wrong = task
    metas = {r["prompt"]: r["meta"] for r in records}
    pair = lambda c, r, prompt=q: SimpleNamespace(prompt=prompt, chosen=c, rejected=r)  # noqa: E731
    pairs = [pair(gold, wrong), pair(wrong, gold), pair(gold, restyle(gold, "wide")), pair(gold, wrong, "unknown")]
    chosen, rejected = [2.0, 1.0, 0.0, 0.0], [1.0, 0.0, 1.0, 1.0]
    got = judge_agreement(pairs, chosen, rejected, metas)
    # pair 1: model c > r, gold c > r → agree; pair 2: model c > r, gold c < r → disagree (and the label is wrong)
    assert got["model_vs_judge"]["mean"] == 0.5 and got["model_vs_judge"]["n"] == 2
    assert got["labels_vs_judge"]["mean"] == 0.5 and got["labels_vs_judge"]["n"] == 2


def test_task_metas_later_file_wins(tmp_path):
    from rlhfkit.tasks.arith_eval import task_metas

    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text(json.dumps({"prompt": "p", "meta": {"id": 1}}) + "\n" + json.dumps({"prompt": "q"}) + "\n")
    b.write_text(json.dumps({"prompt": "p", "meta": {"id": 2}}) + "\n")
    assert task_metas([a, ""]) == {"p": {"id": 1}}
    assert task_metas([a, b]) == {"p": {"id": 2}}


def test_score_each_once_scores_distinct_texts_in_first_seen_order():
    from rlhfkit.models.reward_eval import score_each_once

    calls = []

    def score(prompts, responses):
        calls.append(list(zip(prompts, responses)))
        return [float(len(p) * 10 + len(r)) for p, r in zip(prompts, responses)]

    texts = [("p", "aa"), ("p", "b"), ("p", "aa"), ("qq", "b"), ("p", "b")]
    assert score_each_once(score, texts) == [12.0, 11.0, 12.0, 21.0, 11.0]
    assert calls == [[("p", "aa"), ("p", "b"), ("qq", "b")]]  # one call, each distinct text once, first-seen order


def test_rated_step_metrics_leave_unrated_steps_out():
    """σ(0) = 0.5 is not > 0.5, so the first rated step (label 1) is missed; σ(−1) < 0.5 matches label 0;
    the step labelled None is not counted, whatever its logit."""
    from rlhfkit.models.reward_eval import rated_step_metrics

    m = rated_step_metrics([[0.0, 9.0], [-1.0]], [[1.0, None], [0.0]])
    assert (m["steps"], m["step_accuracy"], m["positive_rate"], m["roc_auc"]) == (2, 0.5, 0.5, 1.0)
