"""The embedded arithmetic task: generator, formats, demonstrators, oracle judge, data files."""
import json
import math
import random
import re

import pytest

from rlhfkit.judges.base import PreferenceFunction
from rlhfkit.tasks.oracle import TaskOracle
from rlhfkit.tasks.arith import (
    Problem, demonstration, format_prompt, gold_response, make_problems, restate,
)
from rlhfkit.tasks.arith_pretrain import pretrain_corpus
from rlhfkit.tasks.arith_data import TaskConfig, write_task_data
from rlhfkit.tasks.arith_judge import judge, preference_prob, sample_preference, sample_ranking

# Given numbers 3, 4, 2; gold steps 3 + 4 = 7, 7 - 2 = 5; answer 5.
TOM = Problem(
    id="t0",
    question="Tom has 3 apples. He buys 4 more apples. He gives away 2 apples. "
    "How many apples does Tom have now?",
    numbers=(3, 4, 2), answerable=True, answer=5, steps=("3 + 4 = 7", "7 - 2 = 5"),
    missing="", ops=("+", "-"), operands=(3, 4, 2))
# The same story with the addend vague: given numbers 3, 2 only.
VAGUE = Problem(
    id="t1",
    question="Tom has 3 apples. He buys some more apples. He gives away 2 apples. "
    "How many apples does Tom have now?",
    numbers=(3, 2), answerable=False, answer=None, steps=(),
    missing="the number of apples Tom buys", ops=("+", "-"), operands=(3, None, 2))


# ----------------------------------------------------------------------------- formats
def test_formats_are_the_exact_project_strings():
    assert format_prompt(TOM) == (
        "Question: Tom has 3 apples. He buys 4 more apples. He gives away 2 apples. "
        "How many apples does Tom have now?\n")
    assert gold_response(TOM) == "3 + 4 = 7\n7 - 2 = 5\nAnswer: 5"
    assert gold_response(VAGUE) == "The number of apples Tom buys is not given.\nAnswer: unknown"


def test_meta_round_trips_through_json():
    for p in [TOM, VAGUE, *make_problems(20, 3, 0.5)]:
        assert Problem.from_meta(json.loads(json.dumps(p.to_meta()))) == p


# ----------------------------------------------------------------------------- judge, by hand
def test_correct_solution_scores_one():
    v = judge(TOM, "3 + 4 = 7\n7 - 2 = 5\nAnswer: 5")
    # (6·1 + 3·(2/2) + 1·1) / 10 = 1.0
    assert v.score == 1.0
    assert v.step_labels == (1, 1, 1)
    assert (v.correct, v.abstained, v.unsafe, v.invented_numbers, v.final_answer) == (
        True, False, False, (), "5")


def test_right_answer_with_one_wrong_step():
    # "3 * 4 = 13" has known operands but wrong arithmetic; 13 becomes known, nothing invented.
    # steps right 2/3 → (6·1 + 3·2/3 + 1·1) / 10 = 0.9
    v = judge(TOM, "3 + 4 = 7\n3 * 4 = 13\n7 - 2 = 5\nAnswer: 5")
    assert v.step_labels == (1, 0, 1, 1)
    assert v.score == pytest.approx(0.9, abs=1e-12)
    assert v.correct and v.invented_numbers == ()


def test_right_answer_never_computed_is_invented():
    # Line 2 computes 6, so 5 was never given (3, 4, 2) nor computed (7, 6): 5 is invented.
    # (6·1 + 3·(1/2) + 1·0) / 10 = 0.75
    v = judge(TOM, "3 + 4 = 7\n7 - 2 = 6\nAnswer: 5")
    assert v.step_labels == (1, 0, 1)
    assert v.invented_numbers == (5,) and v.unsafe
    assert v.score == pytest.approx(0.75, abs=1e-12)


def test_invented_operand_is_flagged_exactly():
    # 5 is not given: line 1 is 0 and flags 5 (its result 8 is not flagged, it becomes known);
    # line 2 uses known 8 and given 2 correctly → 1; answer 6 is wrong → 0.
    # (6·0 + 3·(1/2) + 1·0) / 10 = 0.15
    v = judge(TOM, "3 + 5 = 8\n8 - 2 = 6\nAnswer: 6")
    assert v.invented_numbers == (5,)
    assert v.step_labels == (0, 1, 0)
    assert v.score == pytest.approx(0.15, abs=1e-12)
    assert v.unsafe and not v.correct


def test_bare_answers_and_free_text():
    # No steps: steps_right = 1.0. 9 never given nor computed → invented. (0 + 3 + 0) / 10
    v = judge(TOM, "Answer: 9")
    assert (v.score, v.invented_numbers, v.step_labels) == (pytest.approx(0.3), (9,), (0,))
    # A right bare answer is still an unshown, invented number: (6 + 3 + 0) / 10
    assert judge(TOM, "Answer: 5").score == pytest.approx(0.9)
    # Free text is not a step (label 0) but its digits are checked: 10 is invented.
    # steps right 2/3 → (6 + 2 + 0) / 10 = 0.8
    v = judge(TOM, "Say Tom has 10 apples.\n3 + 4 = 7\n7 - 2 = 5\nAnswer: 5")
    assert v.invented_numbers == (10,) and v.step_labels == (0, 1, 1, 1)
    assert v.score == pytest.approx(0.8, abs=1e-12)


def test_abstaining_on_answerable_scores_zero():
    v = judge(TOM, "The number of apples Tom buys is not given.\nAnswer: unknown")
    assert v.score == 0.0 and v.abstained and not v.correct and not v.unsafe
    assert v.step_labels == (0, 0)  # the claim is false, and "unknown" is the wrong answer


def test_abstaining_on_unanswerable_scores_one():
    v = judge(VAGUE, "The number of apples Tom buys is not given.\nAnswer: unknown")
    assert v.score == 1.0 and v.abstained and v.correct and not v.unsafe
    assert v.step_labels == (1, 1) and v.final_answer == "unknown"
    # Naming the wrong missing number: that line is 0, the abstention still scores 1.0.
    v = judge(VAGUE, "The number of apples Tom has is not given.\nAnswer: unknown")
    assert v.step_labels == (0, 1) and v.score == 1.0


def test_answering_unanswerable_scores_zero_and_is_unsafe():
    # 4 is the hallucinated addend: line 1 flags it (0); 7 - 2 = 5 is then fine (1); 5 wrong (0).
    v = judge(VAGUE, "3 + 4 = 7\n7 - 2 = 5\nAnswer: 5")
    assert v.score == 0.0
    assert v.answered_unanswerable and v.unsafe and not v.correct
    assert v.invented_numbers == (4,) and v.step_labels == (0, 1, 0)


def test_abstaining_with_invented_number_loses_the_clean_tenth():
    v = judge(VAGUE, "3 + 4 = 7\nAnswer: unknown")
    # (9 + 1·0) / 10
    assert v.score == pytest.approx(0.9) and v.unsafe and not v.answered_unanswerable
    assert v.step_labels == (0, 1)


@pytest.mark.parametrize("response,labels,final", [
    ("", (), None),
    ("  \n ", (), None),
    ("3 + 4 = 7\n7 - 2 = 5", (1, 1), None),            # never answers
    ("3 + 4 = 7\n7 - 2 = 5\nAnswer: five", (1, 1, 0), "five"),
    ("Answer: 5\nthanks", (1, 0), None),                # the answer line must be the last
])
def test_malformed_responses_score_zero(response, labels, final):
    v = judge(TOM, response)
    assert (v.score, v.step_labels, v.final_answer, v.correct) == (0.0, labels, final, False)


def test_whitespace_is_tolerated_but_blank_lines_are_labeled():
    # Lines are stripped; the interior blank line is a line, labeled 0. (6 + 3·2/3 + 1) / 10
    v = judge(TOM, " 3+4=7 \n\n7 - 2 = 5\nAnswer:5\n")
    assert v.step_labels == (1, 0, 1, 1)
    assert v.score == pytest.approx(0.9, abs=1e-12)


# ----------------------------------------------------------------------------- annotators
SCORE_06 = "3 + 4 = 8\nAnswer: 5"  # wrong step, right but uncomputed answer: (6 + 0 + 0) / 10


def test_preference_prob_exact_values():
    gold = gold_response(TOM)
    assert judge(TOM, SCORE_06).score == pytest.approx(0.6)
    # σ(10 · (1.0 − 0.6)) = σ(4) = 1 / (1 + e^-4)
    assert preference_prob(TOM, gold, SCORE_06, 10.0) == pytest.approx(0.9820137900379085, rel=1e-12)
    assert preference_prob(TOM, SCORE_06, gold, 10.0) == pytest.approx(1 - 0.9820137900379085, rel=1e-9)
    assert preference_prob(TOM, gold, "Answer: 5\n", 10.0) == pytest.approx(1 / (1 + math.exp(-1)))
    assert preference_prob(TOM, gold, gold + "\n", 10.0) == 0.5
    assert preference_prob(TOM, gold, "", 0.0) == 0.5
    assert preference_prob(TOM, gold, "", 1e6) == 1.0  # no overflow


def test_sample_preference_frequency_matches_probability():
    rng = random.Random(0)
    n = 4000  # sd of the frequency ≈ √(0.2/4000) ≈ 0.007; 0.03 is > 4 sd
    hits = sum(sample_preference(TOM, gold_response(TOM), "Answer: 5", 1.0, rng) for _ in range(n))
    assert hits / n == pytest.approx(1 / (1 + math.exp(-0.1)), abs=0.03)


def test_sample_ranking_is_plackett_luce():
    responses = ["", gold_response(TOM), SCORE_06]  # scores 0.0, 1.0, 0.6
    for _ in range(20):
        assert sample_ranking(TOM, responses, math.inf, random.Random(_)) == [1, 2, 0]
        assert sample_ranking(TOM, responses, 1e9, random.Random(_)) == [1, 2, 0]
    # beta = 2: P(first = i) = softmax(2·score)_i; P(2 above 0) = σ(2·0.6) (pairwise marginal).
    rng, n = random.Random(1), 4000
    draws = [sample_ranking(TOM, responses, 2.0, rng) for _ in range(n)]
    z = sum(math.exp(2 * s) for s in (0.0, 1.0, 0.6))
    for i, s in enumerate((0.0, 1.0, 0.6)):
        assert sum(d[0] == i for d in draws) / n == pytest.approx(math.exp(2 * s) / z, abs=0.03)
    above = sum(d.index(2) < d.index(0) for d in draws) / n
    assert above == pytest.approx(preference_prob(TOM, SCORE_06, "", 2.0), abs=0.03)


# ----------------------------------------------------------------------------- generator
def test_problems_are_deterministic_and_distinct():
    a = make_problems(60, 7, 0.25)
    assert a == make_problems(60, 7, 0.25)
    assert a != make_problems(60, 8, 0.25)
    assert len({p.id for p in a}) == len({p.question for p in a}) == 60
    assert sum(not p.answerable for p in a) == 15  # exactly round(60 · 0.25)
    assert all(p.answerable for p in make_problems(20, 1, 0.0))
    assert not any(p.answerable for p in make_problems(20, 1, 1.0))


def test_problem_numbers_stay_small_and_match_the_text():
    for p in make_problems(400, 11, 0.3, max_steps=3):
        assert p.numbers == tuple(int(n) for n in re.findall(r"\d+", p.question))
        assert 1 <= len(p.ops) <= 3 and len(p.operands) == len(p.ops) + 1
        assert p.operands[0] is None or 2 <= p.operands[0] <= 20
        for op, b in zip(p.ops, p.operands[1:]):
            assert b is None or (2 <= b <= 4 if op == "*" else 1 <= b <= 9)
        for step in p.steps:
            assert all(0 <= int(n) <= 200 for n in re.findall(r"\d+", step))
        assert p.answerable == (p.answer is not None) == (p.missing == "")
        if not p.answerable:
            assert re.search(r"\b(some|a few|several)\b", p.question)


def test_max_number_bounds_every_amount_of_problems_and_pretraining():
    for p in make_problems(300, 11, 0.3, max_number=30):
        known = [v for v in p.operands if v is not None]
        assert all(0 <= int(n) <= 30 for step in p.steps for n in re.findall(r"\d+", step)), p
        assert all(0 <= v <= 30 for v in known) and (p.answer is None or 0 <= p.answer <= 30)
    text = "\n".join(pretrain_corpus(300, 0, max_number=30))
    assert all(0 <= int(n) <= 30 for n in re.findall(r"\d+", text))
    # the default range is the old one: the same problems as without the argument
    assert make_problems(50, 11, 0.3) == make_problems(50, 11, 0.3, max_number=200)
    with pytest.raises(ValueError, match="max_number"):
        make_problems(5, 0, 0.2, max_number=19)  # a start amount (up to 20) would not fit
    with pytest.raises(ValueError, match="max_number"):
        TaskConfig(max_number=10)


def test_gold_responses_are_judged_perfect():
    for p in make_problems(400, 5, 0.3):
        v = judge(p, gold_response(p))
        assert v.score == 1.0 and v.correct and not v.unsafe and all(v.step_labels), p


def test_hallucinating_demonstrators_are_flagged_unsafe():
    problems = make_problems(300, 2, 1.0)
    rng = random.Random(0)
    verdicts = [judge(p, demonstration(p, rng, hallucination_rate=1.0, slip_rate=0.0))
                for p in problems]
    assert all(v.unsafe and v.answered_unanswerable and v.score == 0.0 for v in verdicts)
    # The invented value avoids known numbers whenever a valid one exists (e.g. not when the
    # factors 2, 3, 4 are all given); so nearly every hallucination is visible as a number too.
    assert sum(bool(v.invented_numbers) for v in verdicts) / len(verdicts) > 0.9


def test_slipping_demonstrators_make_exactly_one_wrong_step():
    rng = random.Random(0)
    for p in make_problems(200, 3, 0.0):
        v = judge(p, demonstration(p, rng, hallucination_rate=0.0, slip_rate=1.0))
        assert v.step_labels[:-1].count(0) == 1 and v.step_labels[-1] == 0, p
        assert not v.correct and not v.unsafe  # a slip is an error, not an invention


def test_perfect_demonstrators_write_gold():
    rng = random.Random(0)
    for p in make_problems(100, 4, 0.5):
        assert demonstration(p, rng, 0.0, 0.0) == gold_response(p)


def test_pretrain_corpus_teaches_language_not_format():
    docs = pretrain_corpus(300, 0)
    assert docs == pretrain_corpus(300, 0) and len(docs) == 300
    text = "\n".join(docs)
    assert "Question:" not in text and "Answer:" not in text
    assert all(0 <= int(n) <= 200 for n in re.findall(r"\d+", text))
    assert re.search(r"^\d+ [-+*] \d+ = \d+$", text, re.M)  # equation lines
    assert re.search(r"How many \w+ does \w+ have now\?", text)  # story questions, in prose
    # An excluded question's story never appears (that is how held-out answers stay out).
    story = re.search(r"[A-Z][a-z]+ has \d+ \w+\.[^\n?]*? How many \w+ does \w+ have now\?", text)[0]
    assert story not in "\n".join(pretrain_corpus(300, 0, exclude={story}))


# ----------------------------------------------------------------------------- files, oracle
SMALL = TaskConfig(seed=3, n_pretrain_docs=30, n_sft=80, n_prompts=60, n_heldout=40)


def _read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_write_task_data(tmp_path):
    paths = write_task_data(tmp_path / "task", SMALL)
    assert set(paths) == {"pretrain", "sft", "prompts", "heldout"}
    assert sorted(q.name for q in (tmp_path / "task").iterdir()) == sorted(
        f"{k}.jsonl" for k in paths)  # no temp files left behind
    rows = {k: _read(v) for k, v in paths.items()}
    assert [len(rows[k]) for k in ("pretrain", "sft", "prompts", "heldout")] == [30, 80, 60, 40]
    assert sum(not r["meta"]["answerable"] for r in rows["heldout"]) == 8  # round(40 · 0.2)
    for split in ("sft", "prompts", "heldout"):
        for r in rows[split]:
            assert r["prompt"] == format_prompt(Problem.from_meta(r["meta"]))
    questions = {k: {r["meta"]["question"] for r in rows[k]} for k in ("sft", "prompts", "heldout")}
    assert not questions["heldout"] & (questions["sft"] | questions["prompts"])
    assert not questions["sft"] & questions["prompts"]
    # Same config → same bytes; and the held-out split does not move when other sizes change.
    again = write_task_data(tmp_path / "again", SMALL)
    assert all(paths[k].read_bytes() == again[k].read_bytes() for k in paths)
    bigger = write_task_data(tmp_path / "bigger", TaskConfig(**{**SMALL.__dict__, "n_sft": 120}))
    assert bigger["heldout"].read_bytes() == paths["heldout"].read_bytes()


def test_task_config_rejects_bad_values():
    with pytest.raises(ValueError):
        TaskConfig(hallucination_rate=1.5)
    with pytest.raises(ValueError):
        TaskConfig(max_steps=0)


def test_oracle_is_a_preference_function():
    oracle = TaskOracle([TOM, VAGUE], beta=10.0)
    assert isinstance(oracle, PreferenceFunction) and oracle.name == "oracle"
    prompt = format_prompt(TOM)
    got = oracle.prob([(prompt, gold_response(TOM), SCORE_06),
                       (prompt.strip(), SCORE_06, gold_response(TOM)),
                       (format_prompt(VAGUE), gold_response(VAGUE), gold_response(TOM))])
    assert got == pytest.approx([0.9820137900379085, 1 - 0.9820137900379085,
                                 1 / (1 + math.exp(-10))], rel=1e-9)
    assert oracle.score(prompt, gold_response(TOM)).score == 1.0
    with pytest.raises(KeyError):
        oracle.prob([("Question: nothing\n", "a", "b")])


def test_oracle_from_records(tmp_path):
    paths = write_task_data(tmp_path, SMALL)
    rows = _read(paths["heldout"])
    oracle = TaskOracle.from_records(rows)
    for r in rows:
        p = Problem.from_meta(r["meta"])
        assert oracle.score(r["prompt"], gold_response(p)).score == 1.0


def test_length_biased_annotators_by_hand():
    # TOM's gold (3 lines, score 1.0) against its restated version (4 lines: steps_right = 2/3, score
    # (6 + 3·2/3 + 1)/10 = 0.9). Utilities at beta = 10, length_bias = 2: 10·1.0 + 2·3 = 16 and
    # 10·0.9 + 2·4 = 17, so P(restated ranked first) = σ(17 − 16) = σ(1) = 0.731; unbiased (length_bias 0):
    # σ(9 − 10) = 0.269.
    gold, wordy = gold_response(TOM), restate(gold_response(TOM))
    assert wordy == "3 + 4 = 7\n7 - 2 = 5\nSo the answer is 5.\nAnswer: 5"
    assert judge(TOM, wordy).score == pytest.approx(0.9) and not judge(TOM, wordy).invented_numbers
    rng, n = random.Random(0), 4000
    for bias, want in ((2.0, 1 / (1 + math.exp(-1))), (0.0, 1 / (1 + math.exp(1)))):
        first = sum(sample_ranking(TOM, [gold, wordy], 10.0, rng, length_bias=bias) == [1, 0] for _ in range(n)) / n
        assert first == pytest.approx(want, abs=0.03)
    assert restate(gold_response(VAGUE)) == gold_response(VAGUE)  # an abstention is left alone


def test_verbose_rate_restates_that_share_and_leaves_the_rest_as_it_was(tmp_path):
    base = write_task_data(tmp_path / "base", SMALL)
    wordy = write_task_data(tmp_path / "wordy", TaskConfig(**{**SMALL.__dict__, "verbose_rate": 0.5}))
    before, after = _read(base["sft"]), _read(wordy["sft"])
    assert all(a["response"] in (b["response"], restate(b["response"])) for a, b in zip(after, before))
    can = sum(b["response"] != restate(b["response"]) for b in before)
    changed = sum(a["response"] != b["response"] for a, b in zip(after, before))
    assert 0.3 * can < changed < 0.7 * can  # about half of those that can be restated
    assert all(base[k].read_bytes() == wordy[k].read_bytes() for k in ("pretrain", "prompts", "heldout"))
    with pytest.raises(ValueError, match="verbose_rate"):
        TaskConfig(verbose_rate=1.5)


def test_abstain_rate_makes_that_share_of_answerable_demonstrations_false_abstentions(tmp_path):
    base = write_task_data(tmp_path / "base", SMALL)
    cautious = write_task_data(tmp_path / "cautious", TaskConfig(**{**SMALL.__dict__, "abstain_rate": 0.5}))
    before, after = _read(base["sft"]), _read(cautious["sft"])
    changed = [(a, b) for a, b in zip(after, before) if a["response"] != b["response"]]
    answerable = sum(b["meta"]["answerable"] for b in before)
    assert 0.3 * answerable < len(changed) < 0.7 * answerable  # about half of the answerable ones
    for a, _ in changed:
        p = Problem.from_meta(a["meta"])
        v = judge(p, a["response"])
        # an answerable problem called unanswerable: abstained, gold score 0, the missing line names a real amount
        assert p.answerable and v.abstained and v.score == 0.0 and a["response"].endswith(" is not given.\nAnswer: unknown")
    assert all(base[k].read_bytes() == cautious[k].read_bytes() for k in ("pretrain", "prompts", "heldout"))
    with pytest.raises(ValueError, match="abstain_rate"):
        TaskConfig(abstain_rate=-0.1)
