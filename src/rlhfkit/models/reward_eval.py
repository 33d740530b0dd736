"""Figures for reward models: pair accuracy, margin, calibration (ECE), step accuracy, ROC-AUC.

Plain Python on lists of floats, so the stage, ``eval-rm`` and ``eval-prm`` compute them the same way;
:func:`pair_length_bias` gathers a pair evaluation's length-bias figures (``rlhfkit.bias``).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

from rlhfkit.bias import average_ranks, length_baselines, length_split_accuracy, spearman


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def score_each_once(score: Callable[[list, list], list[float]], texts: Sequence[tuple]) -> list[float]:
    """``score(prompts, responses)`` of each (prompt, response) in ``texts``, each distinct one scored once.

    Pairs of K responses to a prompt repeat each response K − 1 times; the distinct ones are scored
    in order of first appearance, so the batches are the same whatever repeats.
    """
    uniq: dict[tuple, int] = {}
    for t in texts:
        uniq.setdefault(t, len(uniq))
    keys = list(uniq)
    s = score([k[0] for k in keys], [k[1] for k in keys])
    return [s[uniq[t]] for t in texts]


def expected_calibration_error(probs: Sequence[float], outcomes: Sequence[int], n_bins: int = 10) -> float:
    """ECE of binary predictions: Σ_b (n_b / n) · |mean outcome_b − mean prob_b| over equal-width bins of prob.

    For pairs, prob = σ(r_chosen − r_rejected) and outcome = 1 (the chosen response did win), so a
    model that says 0.8 should be right 80% of the time (Guo et al. 2017, over [0, 1] not max-prob).
    """
    n = len(probs)
    if n == 0:
        return float("nan")
    bins: list[list[tuple[float, int]]] = [[] for _ in range(n_bins)]
    for p, y in zip(probs, outcomes):
        bins[min(n_bins - 1, int(p * n_bins))].append((p, y))
    return sum(len(b) / n * abs(sum(y for _, y in b) / len(b) - sum(p for p, _ in b) / len(b)) for b in bins if b)


def pair_metrics(chosen: Sequence[float], rejected: Sequence[float]) -> dict:
    """accuracy (ties count as wrong), mean margin r_c − r_r, ECE of σ(r_c − r_r), and the pair count;
    ``ties`` (r_c = r_r exactly) and ``accuracy_untied``, the accuracy over the other pairs.

    Pairs drawn from a K-wise ranking of sampled responses can hold the same text twice (a peaked policy
    repeats itself), and scored once each (:func:`score_each_once`) the two get the same score: such a
    pair carries no preference, and ``accuracy`` counts it wrong. ``accuracy_untied`` is the figure that
    says how often the model orders two different responses as the label does.

    ECE is taken on the model's confidence in its own pick, max(p, 1 − p) with p = σ(r_c − r_r),
    against whether the pick was the human's (Guo et al. 2017). Binning p against "chosen won"
    would be degenerate: the label is 1 for every pair, so it would only measure 1 − mean p.
    """
    diffs = [c - r for c, r in zip(chosen, rejected)]
    n, ties, right = len(diffs), sum(d == 0 for d in diffs), sum(d > 0 for d in diffs)
    conf = [max(sigmoid(d), 1 - sigmoid(d)) for d in diffs]
    return {
        "accuracy": right / n if n else float("nan"),
        "accuracy_untied": right / (n - ties) if n > ties else float("nan"),
        "ties": ties,
        "mean_margin": sum(diffs) / n if n else float("nan"),
        "ece": expected_calibration_error(conf, [int(d > 0) for d in diffs]),
        "pairs": n,
    }


def roc_auc(scores: Sequence[float], labels: Sequence[int]) -> float:
    """Area under the ROC curve = P(score of a random positive > score of a random negative), ties 1/2.

    Computed from average ranks (Mann-Whitney U), O(n log n).
    """
    pos = sum(1 for y in labels if y)
    neg = len(labels) - pos
    if pos == 0 or neg == 0:
        return float("nan")
    ranks = average_ranks(scores)  # 1-based, a tie block sharing its mean rank
    rank_sum = sum(r for r, y in zip(ranks, labels) if y)
    return (rank_sum - pos * (pos + 1) / 2) / (pos * neg)


def step_metrics(probs: Sequence[float], labels: Sequence[float]) -> dict:
    """Step accuracy at threshold 0.5, ROC-AUC, and the always-majority-class baseline, over labelled steps."""
    hard = [int(y > 0.5) for y in labels]
    n = len(hard)
    share_pos = sum(hard) / n if n else float("nan")
    return {
        "step_accuracy": sum(int(p > 0.5) == y for p, y in zip(probs, hard)) / n if n else float("nan"),
        "roc_auc": roc_auc(probs, hard),
        "majority_baseline": max(share_pos, 1 - share_pos) if n else float("nan"),
        "positive_rate": share_pos,
        "steps": n,
    }


def rated_step_metrics(logits: Sequence[Sequence[float]], labels: Sequence[Sequence[float | None]]) -> dict:
    """:func:`step_metrics` of σ(logit) against the label of every rated step (a label of None is left out).

    ``logits``: per solution, one logit per step (``models.reward.step_logits``); ``labels``: the same shape.
    """
    probs, rated = [], []
    for row, ys in zip(logits, labels):
        for z, y in zip(row, ys):
            if y is not None:
                probs.append(sigmoid(z))
                rated.append(y)
    return step_metrics(probs, rated)


def response_token_lengths(tokenizer, responses: Sequence[str]) -> list[int]:
    """Tokens of each response alone (no prompt, no special tokens), by the scoring model's own tokenizer."""
    return [len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in responses]


def pair_length_bias(chosen: Sequence[float], rejected: Sequence[float], chosen_len: Sequence[int],
                     rejected_len: Sequence[int], keys: Sequence[tuple] | None = None) -> dict:
    """A pair evaluation's length bias (N pairs; lengths in tokens of the response, the model's tokenizer).

    ``baselines``: accuracy of always picking the longer / shorter response (length ties count half);
    ``split``: the model's pair accuracy where the chosen response is longer, and where it is shorter;
    ``spearman_score_length``: Spearman's ρ between score and length over the responses, each distinct
    response once (``keys``: 2N hashable keys, interleaved (prompt, chosen_0), (prompt, rejected_0),
    (prompt, chosen_1), …; a response that recurs in K − 1 pairs of a ranking would otherwise weigh
    K − 1 times; None: every response distinct).
    """
    points = {}
    ck, rk = (keys[0::2], keys[1::2]) if keys is not None else (range(0, 2 * len(chosen), 2), range(1, 2 * len(chosen), 2))
    for k, s, n in [*zip(ck, chosen, chosen_len), *zip(rk, rejected, rejected_len)]:
        points.setdefault(k, (s, n))
    return {"unit": "tokens", "baselines": length_baselines(chosen_len, rejected_len),
            "split": length_split_accuracy(chosen, rejected, chosen_len, rejected_len),
            "spearman_score_length": spearman([s for s, _ in points.values()], [n for _, n in points.values()])}
