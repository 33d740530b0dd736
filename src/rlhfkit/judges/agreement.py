"""Agreement figures: judge vs gold labels, judge vs judge, position bias, ranking agreement.

Conventions. A verdict is the side a probability picks: ``p > 0.5`` prefers ``a``, ``p < 0.5``
prefers ``b``, ``p == 0.5`` is a tie. A tie against a definite label earns half credit (the
expected score of a coin flip), so a judge that always answers 0.5 scores 0.5, not 0 or 1.
"""
from __future__ import annotations

from itertools import combinations
from typing import Sequence

from rlhfkit import bias
from rlhfkit.judges.prompt import Judgment


def _side(p: float) -> int:
    return 1 if p > 0.5 else (-1 if p < 0.5 else 0)


def _credit(p: float, q: float) -> float:
    """1 when two probabilities pick the same side, 0 when opposite, 0.5 when either is a tie."""
    s, t = _side(p), _side(q)
    if s == 0 or t == 0:
        return 0.5
    return 1.0 if s == t else 0.0


def agreement_with_labels(probs: Sequence[float], a_preferred: Sequence[bool]) -> float:
    """Fraction of items where the judge prefers the side the gold (or human) label prefers."""
    if len(probs) != len(a_preferred):
        raise ValueError(f"{len(probs)} probabilities but {len(a_preferred)} labels")
    if not probs:
        raise ValueError("no items to compare")
    return sum(_credit(p, 1.0 if y else 0.0) for p, y in zip(probs, a_preferred)) / len(probs)


def agreement_between(probs_1: Sequence[float], probs_2: Sequence[float]) -> float:
    """Fraction of items on which two judges pick the same side (ties count half)."""
    if len(probs_1) != len(probs_2):
        raise ValueError(f"{len(probs_1)} vs {len(probs_2)} probabilities")
    if not probs_1:
        raise ValueError("no items to compare")
    return sum(_credit(p, q) for p, q in zip(probs_1, probs_2)) / len(probs_1)


def position_bias(judgments: Sequence[Judgment]) -> dict:
    """How often the same *slot* wins in both orders, i.e. the verdict on the content flips.

    Returns ``rate`` (``bias.position_bias``'s share where the order decides, over items with a
    definite verdict in both orders), ``first_slot_rate`` (how often the first slot wins, over all
    single-order verdicts; 0.5 is unbiased), and counts.
    """
    both = [j for j in judgments if j.prob_a_second is not None]
    if not both:
        raise ValueError("position bias needs judgments made in both orders")
    # prob_a_second is P(a ≻ b) asked with a second: P(b ≻ a) asked with b first is 1 − it.
    shares = bias.position_bias([j.prob_a_first for j in both], [1 - j.prob_a_second for j in both])
    first_wins = sum((j.prob_a_first > 0.5) + ((1 - j.prob_a_second) > 0.5) for j in both)
    return {
        "rate": shares["share_order_decides"],
        "first_slot_rate": first_wins / (2 * len(both)),
        "n_both_orders": len(both),
        "n_undecided": shares["n_undecided"],
    }


def _check_ranking(r: Sequence[int]) -> None:
    if sorted(r) != list(range(len(r))):
        raise ValueError(f"not a ranking of 0..{len(r) - 1}: {list(r)}")


def ranking_pair_agreement(r1: Sequence[int], r2: Sequence[int]) -> float:
    """Fraction of response pairs that two rankings (indices, best first) order the same way."""
    _check_ranking(r1), _check_ranking(r2)
    if len(r1) != len(r2) or len(r1) < 2:
        raise ValueError("rankings must have the same length, at least 2")
    pos1 = {x: i for i, x in enumerate(r1)}
    pos2 = {x: i for i, x in enumerate(r2)}
    pairs = list(combinations(range(len(r1)), 2))
    same = sum((pos1[x] < pos1[y]) == (pos2[x] < pos2[y]) for x, y in pairs)
    return same / len(pairs)


def kendall_tau(r1: Sequence[int], r2: Sequence[int]) -> float:
    """Kendall's tau-a between two full rankings: (concordant - discordant) / pairs, in [-1, 1].

    Full rankings have no ties, so tau = 2 * pair_agreement - 1.
    """
    return 2.0 * ranking_pair_agreement(r1, r2) - 1.0
