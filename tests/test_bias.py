"""Length and position bias (``rlhfkit.bias``): each figure worked out by hand."""
from __future__ import annotations

import math

import pytest

from rlhfkit.bias import (length_baselines, length_controlled_win_rate, length_split_accuracy, position_bias,
                          spearman)
from rlhfkit.judges.agreement import position_bias as judgment_position_bias
from rlhfkit.judges.prompt import Judgment

CHOSEN_LEN, REJECTED_LEN = [10, 5, 7, 7], [3, 8, 7, 1]


def test_length_baselines_by_hand():
    """Pairs (10, 3) (5, 8) (7, 7) (7, 1): the chosen is longer in 2, shorter in 1, tied in 1.
    longer_wins = (2 + ½) / 4 = 0.625, shorter_wins = (1 + ½) / 4 = 0.375, ties = 1 / 4."""
    assert length_baselines(CHOSEN_LEN, REJECTED_LEN) == {"longer_wins": 0.625, "shorter_wins": 0.375, "ties": 0.25,
                                                          "pairs": 4}
    assert length_baselines([], [])["longer_wins"] is None
    with pytest.raises(ValueError):
        length_baselines([1], [1, 2])


def test_length_split_accuracy_by_hand():
    """Scores (1, 0) (0, 1) (2, 2) (3, 5). Chosen longer: pairs 0 (1 > 0, right) and 3 (3 > 5, wrong) → ½ of 2;
    chosen shorter: pair 1 (0 > 1, wrong) → 0 of 1; pair 2 (equal length) is in neither."""
    s = length_split_accuracy([1, 0, 2, 3], [0, 1, 2, 5], CHOSEN_LEN, REJECTED_LEN)
    assert s == {"chosen_longer": {"accuracy": 0.5, "n": 2}, "chosen_shorter": {"accuracy": 0.0, "n": 1}}
    assert length_split_accuracy([1], [0], [2], [2]) == {"chosen_longer": {"accuracy": None, "n": 0},
                                                         "chosen_shorter": {"accuracy": None, "n": 0}}


def test_spearman_with_ties_by_hand():
    """x = (1, 2, 2, 3) has average ranks (1, 2.5, 2.5, 4); y = (1, 3, 2, 4) ranks (1, 3, 2, 4); both mean 2.5.
    Deviations (−1.5, 0, 0, 1.5) and (−1.5, .5, −.5, 1.5): Σ dx·dy = 2.25 + 2.25 = 4.5, Σ dx² = 4.5,
    Σ dy² = 5 → ρ = 4.5 / √22.5 = 0.948683…"""
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(4.5 / math.sqrt(22.5), abs=1e-15)
    assert spearman([3, 2, 1], [10, 20, 30]) == pytest.approx(-1.0)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3])) and math.isnan(spearman([1], [2]))


def test_lc_win_rate_equals_the_raw_rate_when_lengths_match():
    """All length differences 0 → z = 0 (sd = 0): the fit is the intercept alone, σ(b0) = mean pref = 3.5 / 6,
    and the length coefficient stays 0; the raw rate is inside the bootstrap CI."""
    pref = [1, 0, 1, 1, 0.5, 0]
    lc = length_controlled_win_rate(pref, [5] * 6, [5] * 6)
    assert abs(lc["mean"] - 3.5 / 6) < 1e-9 and lc["length_coef"] == 0.0 and lc["raw_win_rate"] == 3.5 / 6
    assert lc["ci95"][0] <= 3.5 / 6 <= lc["ci95"][1] and lc["n"] == 6
    # Equal lengths row by row, whatever the lengths: d = 0 again.
    lc2 = length_controlled_win_rate(pref, [3, 9, 4, 7, 1, 2], [3, 9, 4, 7, 1, 2])
    assert abs(lc2["mean"] - 3.5 / 6) < 1e-9


def test_lc_win_rate_near_half_when_length_alone_explains_preferences():
    """Hard verdicts: 40 rows where the policy is 1 token longer (36 wins) and 10 where it is 1 shorter (1 win):
    raw = 37 / 50 = 0.74. d has mean 0.6 and sd 0.8, so z = ±1.25, symmetric around 0, and the fit is saturated:
    b0 + 1.25·b1 = logit 0.9, b0 − 1.25·b1 = logit 0.1 = −logit 0.9 → b0 = 0, LC = ½ (up to the tiny ridge
    on b1), b1 = logit(0.9) / 1.25 = 1.7578."""
    pref = [1.0] * 36 + [0.0] * 4 + [1.0] + [0.0] * 9
    lens = [1] * 40 + [-1] * 10
    lc = length_controlled_win_rate(pref, lens, [0] * 50)
    assert lc["raw_win_rate"] == pytest.approx(0.74, abs=1e-12)
    assert abs(lc["mean"] - 0.5) < 1e-3 and lc["length_coef"] == pytest.approx(math.log(9) / 1.25, rel=1e-3)
    assert lc["ci95"][0] < 0.5 < lc["ci95"][1]
    # Soft targets drawn from the model itself, pref_i = σ(2·z_i), lengths mostly longer: without the ridge the
    # fit recovers b0 = 0 exactly and b1 = 2, while the raw mean is 0.67.
    d = [3, 2, 1, 1, 1, 1, -1, -2]
    sd = math.sqrt(sum(x * x for x in d) / 8 - (sum(d) / 8) ** 2)
    soft = [1 / (1 + math.exp(-2 * x / sd)) for x in d]
    lc = length_controlled_win_rate(soft, d, [0] * 8, ridge=0.0)
    assert abs(lc["mean"] - 0.5) < 1e-9 and lc["length_coef"] == pytest.approx(2.0, abs=1e-9)
    assert lc["raw_win_rate"] > 0.65


def test_lc_bootstrap_is_seeded():
    pref, lp, lb = [1, 0, 1, 1, 0, 1, 0.5, 1], [5, 3, 8, 6, 2, 7, 4, 9], [4, 4, 4, 4, 4, 4, 4, 4]
    a, b = (length_controlled_win_rate(pref, lp, lb, n_boot=200, seed=s) for s in (0, 0))
    assert a == b and a["ci95"][0] < a["mean"] < a["ci95"][1]
    assert length_controlled_win_rate(pref, lp, lb, n_boot=200, seed=1)["ci95"] != a["ci95"]


def test_position_bias_by_hand():
    """p_ab = (.9, .8, .3, .6, .5), p_ba = (.7, .1, .2, .4, .9). Comparison 4 has a ½: undecided. Same slot both
    times: 0 (first, first) and 2 (second, second) → 2 of 4 decided. First-slot preference = (.9 + .8 + .3 + .6 +
    .5 + .7 + .1 + .2 + .4 + .9) / 10 = 0.54."""
    p_ab, p_ba = [0.9, 0.8, 0.3, 0.6, 0.5], [0.7, 0.1, 0.2, 0.4, 0.9]
    b = position_bias(p_ab, p_ba)
    assert b["share_order_decides"] == 0.5 and b["n_undecided"] == 1 and b["n"] == 5
    assert b["first_slot_preference"] == pytest.approx(0.54, abs=1e-12)
    # The same count as judge-eval's position bias on Judgments (a in the second slot: 1 − p_ba).
    js = [Judgment(0.5, x, 1 - y) for x, y in zip(p_ab, p_ba)]
    assert judgment_position_bias(js)["rate"] == b["share_order_decides"]
    always_first = position_bias([0.9, 0.8], [0.7, 0.6])
    assert always_first["share_order_decides"] == 1.0 and always_first["first_slot_preference"] == 0.75
    with pytest.raises(ValueError):
        position_bias([], [])


def test_eval_policy_metrics_carry_the_lc_win_rate_next_to_the_raw_one():
    """The task path: four prompts, verdicts 1, 1, 0, ½ (a stub judge: the higher score wins), the policy's
    responses 6, 6, 2, 4 tokens against the reference's 4 each → d = (2, 2, −2, 0). The LC figures are
    ``length_controlled_win_rate`` of those verdicts and lengths; reference_length = 4."""
    from rlhfkit.recipes.evaluate import policy_metrics

    class HigherScoreWins:
        def verdict(self, prompt, a, b, score_a, score_b):
            return 1.0 if score_a > score_b else (0.5 if score_a == score_b else 0.0)

    def row(score, length):
        return {"prompt": "q", "response": "r", "score": score, "correct": False, "abstained": False, "invented": False,
                "unsafe": False, "answerable": True, "finished": True, "length": length}

    rows = [row(1.0, 6), row(1.0, 6), row(0.0, 2), row(0.5, 4)]
    ref = [row(0.5, 4)] * 4
    m = policy_metrics(rows, ref, 0, HigherScoreWins())
    lc = length_controlled_win_rate([1.0, 1.0, 0.0, 0.5], [6, 6, 2, 4], [4, 4, 4, 4], seed=0)
    assert m["win_rate_vs_sft"]["mean"] == 2.5 / 4
    assert m["lc_win_rate_vs_sft"] == {k: lc[k] for k in ("mean", "ci95", "n", "length_coef", "length_sd")}
    assert lc["length_coef"] > 1 and lc["mean"] < 2.5 / 4  # longer won here: the LC rate discounts it
    assert m["reference_length"]["mean"] == 4.0 and m["response_length"]["mean"] == 4.5
    assert "lc_win_rate_vs_sft" not in policy_metrics(rows, None, 0, HigherScoreWins())
