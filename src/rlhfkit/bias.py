"""Length bias and position bias, measured: how much of a reward model's accuracy, a win rate or a
judge's verdict a response's length, or the slot an answer is shown in, explains.

Pure functions of per-item numbers (plain sequences in, plain numbers out; torch only for the
batched logistic fits). N = pairs (or rows, or comparisons), B = bootstrap resamples.

- :func:`length_baselines`, :func:`length_split_accuracy`, :func:`spearman`: a reward model's
  length bias on preference pairs (RewardBench-style length baselines and splits; Singhal et al. 2023,
  "A Long Way to Go").
- :func:`length_controlled_win_rate`: AlpacaEval 2's length-controlled win rate (Dubois et al. 2024).
- :func:`position_bias`: how often a judge's verdict follows the slot, not the answer (Zheng et al.
  2023, MT-Bench "position bias"; Wang et al. 2023, "Large Language Models are not Fair Evaluators").
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

DEFAULT_MAX_POSITION_BIAS = 0.2
"""Default refusal threshold of a judge used without order averaging: above it more than one verdict in
five follows the slot, not the answer (a noise floor no label-noise model of the BT loss accounts for);
MT-Bench's GPT-4 judge, at 35% order-decided verdicts, would need averaging."""


def length_baselines(chosen_len: Sequence[float], rejected_len: Sequence[float]) -> dict:
    """Accuracy of the length-only baselines on N pairs.

    longer_wins = (#{l_c > l_r} + ½·#{l_c = l_r}) / N and shorter_wins = (#{l_c < l_r} + ½·#{l_c = l_r}) / N:
    a tie in length is a coin flip for either baseline, so it counts half and the two always sum to 1;
    ``ties`` = #{l_c = l_r} / N is reported beside them. A reward model whose accuracy is no better than
    ``longer_wins`` may have learned nothing but length (on two RewardBench subsets, longer_wins is 1.0).
    """
    n = len(chosen_len)
    if n != len(rejected_len):
        raise ValueError(f"{n} chosen lengths but {len(rejected_len)} rejected lengths")
    if n == 0:
        return {"longer_wins": None, "shorter_wins": None, "ties": None, "pairs": 0}
    longer = sum(c > r for c, r in zip(chosen_len, rejected_len))
    ties = sum(c == r for c, r in zip(chosen_len, rejected_len))
    shorter = n - longer - ties
    return {"longer_wins": (longer + 0.5 * ties) / n, "shorter_wins": (shorter + 0.5 * ties) / n, "ties": ties / n,
            "pairs": n}


def length_split_accuracy(chosen_scores: Sequence[float], rejected_scores: Sequence[float],
                          chosen_len: Sequence[float], rejected_len: Sequence[float]) -> dict:
    """Pair accuracy (r_c > r_r; a tie in score is wrong, as in ``pair_metrics``) on the pairs where the chosen
    response is longer, and on those where it is shorter; pairs of equal length are in neither.

    A model that learned length is right on ``chosen_longer`` and wrong on ``chosen_shorter``; an unbiased
    one scores alike on both. ``accuracy`` is None on an empty subset.
    """
    n = len(chosen_scores)
    if not n == len(rejected_scores) == len(chosen_len) == len(rejected_len):
        raise ValueError("scores and lengths must have one entry per pair")
    out = {}
    for key, keep in (("chosen_longer", lambda c, r: c > r), ("chosen_shorter", lambda c, r: c < r)):
        hits = [sc > sr for sc, sr, lc, lr in zip(chosen_scores, rejected_scores, chosen_len, rejected_len) if keep(lc, lr)]
        out[key] = {"accuracy": sum(hits) / len(hits) if hits else None, "n": len(hits)}
    return out


def average_ranks(x: Sequence[float]) -> list[float]:
    """1-based ranks, a block of equal values sharing the mean of the ranks it spans."""
    order = sorted(range(len(x)), key=lambda i: x[i])
    ranks = [0.0] * len(x)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's ρ: the Pearson correlation of the average ranks (ties share their mean rank),
    ρ = Σ (R_i − R̄)(S_i − S̄) / sqrt(Σ (R_i − R̄)² · Σ (S_i − S̄)²). NaN when either side is constant
    (no ranking to correlate) or has fewer than two items."""
    if len(x) != len(y):
        raise ValueError(f"{len(x)} vs {len(y)} values")
    if len(x) < 2:
        return float("nan")
    rx, ry = average_ranks(x), average_ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx, syy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    if sxx == 0 or syy == 0:
        return float("nan")
    return sxy / math.sqrt(sxx * syy)


def _logistic_fit(z: torch.Tensor, p: torch.Tensor, ridge: float, max_iter: int = 100) -> torch.Tensor:
    """Newton (IRLS) fits of logit P(policy ≻ baseline) = b0 + b1·z, one per row of z, p (B, N) float64 → (B, 2).

    Maximises Σ_i [p_i log σ(η_i) + (1 − p_i) log σ(−η_i)] − ½·ridge·b1² with soft targets p_i ∈ [0, 1].
    The ridge sits on b1 only: with all z = 0 its gradient is −ridge·b1, so b1 = 0 and σ(b0) is the mean
    of p exactly (a zero length difference leaves the raw win rate alone). The 1e-12 added to the
    Hessian's diagonal only keeps a saturated fit (p all 1, σ(b0) = 1.0 in float64) from 0/0; it
    moves no fixed point, since it scales a zero gradient.
    """
    b = torch.zeros(z.shape[0], 2, dtype=torch.float64)
    for _ in range(max_iter):
        s = torch.sigmoid(b[:, :1] + b[:, 1:] * z)
        w = s * (1 - s)
        g0 = (p - s).sum(1)
        g1 = ((p - s) * z).sum(1) - ridge * b[:, 1]
        h00, h01, h11 = w.sum(1) + 1e-12, (w * z).sum(1), (w * z * z).sum(1) + ridge + 1e-12
        det = h00 * h11 - h01 * h01
        step = torch.stack([(h11 * g0 - h01 * g1) / det, (h00 * g1 - h01 * g0) / det], 1)
        b = b + step
        if step.abs().max() < 1e-12:
            break
    return b


def length_controlled_win_rate(pref: Sequence[float], policy_len: Sequence[float], base_len: Sequence[float],
                               n_boot: int = 1000, seed: int = 0, ridge: float = 1e-3) -> dict:
    """AlpacaEval 2's length-controlled win rate (Dubois et al. 2024), over N comparisons of a policy with a baseline.

    pref_i ∈ [0, 1] is the judge's P(policy ≻ baseline) on row i (soft, or 0 / ½ / 1 verdicts). The length
    difference d_i = len_p,i − len_b,i is standardised, z_i = d_i / sd(d) (population sd; z = 0 when
    sd = 0), and a logistic regression logit pref_i = b0 + b1·z_i is fitted by Newton in float64
    (:func:`_logistic_fit`; every row is the policy against the baseline, so b0 is the policy indicator's
    coefficient). The LC win rate is σ(b0): the win rate the fit predicts at zero length difference.
    σ(b0) does not depend on how z is scaled, only on where z = 0 is (equal lengths).

    ``ci95``: percentile bootstrap over rows (``n_boot`` resamples drawn with a ``seed``-ed torch
    generator; sd kept from the full data), all resamples fitted at once. Returns ``mean`` (σ(b0)),
    ``ci95``, ``n``, ``length_coef`` (b1: the change in logit per standard deviation of length difference;
    > 0: the judge favours the longer response), ``raw_win_rate`` (mean pref) and ``length_sd`` (sd(d)).
    """
    n = len(pref)
    if not n == len(policy_len) == len(base_len):
        raise ValueError("pref, policy_len and base_len must have one entry per row")
    if n == 0:
        return {"mean": None, "ci95": [None, None], "n": 0, "length_coef": None, "raw_win_rate": None, "length_sd": None}
    p = torch.tensor([float(v) for v in pref], dtype=torch.float64)
    d = torch.tensor([float(a) - float(b) for a, b in zip(policy_len, base_len)], dtype=torch.float64)
    sd = float(d.std(unbiased=False))
    z = d / sd if sd > 0 else torch.zeros_like(d)
    b0, b1 = _logistic_fit(z[None], p[None], ridge)[0].tolist()
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(n, (n_boot, n), generator=g)
    boot = torch.sigmoid(_logistic_fit(z[idx], p[idx], ridge)[:, 0]).sort().values.tolist()
    alpha = 0.05
    lo = boot[int(math.floor(alpha / 2 * n_boot))]
    hi = boot[min(n_boot - 1, int(math.ceil((1 - alpha / 2) * n_boot)) - 1)]
    return {"mean": float(torch.sigmoid(torch.tensor(b0, dtype=torch.float64))), "ci95": [lo, hi], "n": n,
            "length_coef": b1, "raw_win_rate": float(p.mean()), "length_sd": sd}


def position_bias(p_ab: Sequence[float], p_ba: Sequence[float]) -> dict:
    """How often the slot, not the answer, decides a judge's verdict, over N comparisons asked in both orders.

    ``p_ab[i]`` = P(a ≻ b) with a in the first slot; ``p_ba[i]`` = P(b ≻ a) with b in the first slot. The
    order decides comparison i when the judge picks the same slot both times: (p_ab > ½) == (p_ba > ½)
    (first slot twice, or second slot twice, so the verdict on a vs b flips with the order).
    ``share_order_decides`` = #{order decides} / #{decided in both orders}: a comparison with a ½ in
    either order is undecided and left out (``n_undecided``); NaN when none is decided.
    ``first_slot_preference`` = Σ_i (p_ab,i + p_ba,i) / 2N: the mean probability given to whatever sits
    first; ½ for a judge without position bias, 1 for one that always picks the first slot.
    """
    n = len(p_ab)
    if n != len(p_ba):
        raise ValueError(f"{n} first-order probabilities but {len(p_ba)} swapped ones")
    if n == 0:
        raise ValueError("position bias needs comparisons asked in both orders")
    decided = [(x, y) for x, y in zip(p_ab, p_ba) if x != 0.5 and y != 0.5]
    same_slot = sum((x > 0.5) == (y > 0.5) for x, y in decided)
    return {"share_order_decides": same_slot / len(decided) if decided else float("nan"),
            "first_slot_preference": (sum(p_ab) + sum(p_ba)) / (2 * n), "n": n, "n_undecided": n - len(decided)}
