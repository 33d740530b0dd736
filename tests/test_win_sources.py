"""Where wins come from (tasks.win_sources): hand-graded pairs and the exact decomposition of a win rate."""
import pytest

from rlhfkit.tasks.arith import Problem
from rlhfkit.tasks.arith_judge import judge
from rlhfkit.tasks.win_sources import SOURCES, decided_by, win_sources

# Tom has 3 apples, buys 4 more, then has 2 times as many: 3 + 4 = 7, 7 * 2 = 14.
TWO_STEP = Problem(id="a", question="Tom has 3 apples. He buys 4 more apples. Then he has 2 times as many apples. "
                   "How many apples does Tom have now?", numbers=(3, 4, 2), answerable=True, answer=14,
                   steps=("3 + 4 = 7", "7 * 2 = 14"), missing="", ops=("+", "*"), operands=(3, 4, 2))
VAGUE = Problem(id="u", question="Tom has 3 apples. He buys some more apples. How many apples does Tom have now?",
                numbers=(3,), answerable=False, answer=None, steps=(), missing="the number of apples Tom buys",
                ops=("+",), operands=(3, None))
GOLD = "3 + 4 = 7\n7 * 2 = 14\nAnswer: 14"
VERBOSE = "3 + 4 = 7\n7 * 2 = 14\nSo the answer is 14.\nAnswer: 14"
SLIP_LATE = "3 + 4 = 7\n7 * 2 = 15\nAnswer: 15"     # one wrong equation line
SLIP_BOTH = "3 + 4 = 8\n8 * 2 = 15\nAnswer: 15"     # two wrong equation lines
ABSTAIN = "The number of apples Tom buys is not given.\nAnswer: unknown"
INVENT = "3 + 5 = 8\nAnswer: 8"


def _decide(p, a, b, **kw):
    return decided_by(p, a, b, judge(p, a), judge(p, b), **kw)


def test_each_source_is_named_for_the_property_that_differs():
    # gold 1.0; verbose: lines before the answer [1, 1, 0] → (6 + 3·2/3 + 1)/10 = 0.9
    assert judge(TWO_STEP, GOLD).score == 1.0 and judge(TWO_STEP, VERBOSE).score == pytest.approx(0.9)
    assert _decide(TWO_STEP, GOLD, VERBOSE) == "style"
    assert _decide(TWO_STEP, GOLD, SLIP_LATE) == "accuracy"
    # both wrong: (0 + 3·1/2 + 1)/10 = 0.25 against (0 + 3·0 + 1)/10 = 0.1
    assert judge(TWO_STEP, SLIP_LATE).score == pytest.approx(0.25)
    assert judge(TWO_STEP, SLIP_BOTH).score == pytest.approx(0.1)
    assert _decide(TWO_STEP, SLIP_LATE, SLIP_BOTH) == "arithmetic"
    assert _decide(TWO_STEP, GOLD, GOLD, finished_b=False) == "finished"
    assert _decide(VAGUE, ABSTAIN, INVENT) == "abstention"
    # a false abstention (0) against a worked wrong answer (0.25): abstention decided it
    assert _decide(TWO_STEP, "Answer: unknown", SLIP_LATE) == "abstention"
    # both abstain; one names a number never given ("7 more"): invented, 1.0 vs 0.9
    assert _decide(VAGUE, ABSTAIN, "Tom buys 7 more.\nAnswer: unknown") == "invented"


def test_shares_sum_to_the_win_rate_above_one_half():
    problems = [TWO_STEP, TWO_STEP, TWO_STEP, VAGUE]
    policy = [GOLD, SLIP_LATE, GOLD, ABSTAIN]
    reference = [VERBOSE, GOLD, GOLD, INVENT]
    wins = [1.0, 0.0, 0.5, 1.0]  # style win, accuracy loss, tie, abstention win
    rows = [{"response": r, "finished": True} for r in policy]
    ref_rows = [{"response": r, "finished": True} for r in reference]
    shares = win_sources(problems, rows, ref_rows, wins, [judge(p, r) for p, r in zip(problems, policy)],
                         [judge(p, r) for p, r in zip(problems, reference)])
    assert set(shares) == set(SOURCES)
    # n = 4: each decided prompt moves its source by ±1/(2·4) = ±0.125
    assert shares["style"] == 0.125 and shares["accuracy"] == -0.125 and shares["abstention"] == 0.125
    assert shares["invented"] == shares["arithmetic"] == shares["finished"] == shares["other"] == 0.0
    # win rate (1 + 0 + 0.5 + 1) / 4 = 0.625 = 0.5 + 0.125 − 0.125 + 0.125
    assert sum(shares.values()) == pytest.approx(sum(wins) / len(wins) - 0.5)


def test_misaligned_inputs_are_refused():
    with pytest.raises(ValueError, match="aligned"):
        win_sources([TWO_STEP], [], [], [1.0], [], [])
