"""Confidence intervals for evaluation figures.

Means of per-prompt values get a 95% percentile-bootstrap interval (fixed seed, so reports
are reproducible). For a proportion at 0 or 1 the bootstrap degenerates to a point; the Wilson
interval is used for 0/1 data instead, which stays honest at the edges.
"""
from __future__ import annotations

import math
import random
from typing import Sequence


def wilson_ci(successes: float, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (Wilson 1927)."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def bootstrap_ci(values: Sequence[float], n_boot: int = 2000, seed: int = 0, alpha: float = 0.05) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean."""
    n = len(values)
    if n == 0:
        return (float("nan"), float("nan"))
    rng = random.Random(seed)
    means = sorted(sum(values[rng.randrange(n)] for _ in range(n)) / n for _ in range(n_boot))
    lo = means[int(math.floor(alpha / 2 * n_boot))]
    hi = means[min(n_boot - 1, int(math.ceil((1 - alpha / 2) * n_boot)) - 1)]
    return (lo, hi)


def mean_ci(values: Sequence[float], seed: int = 0) -> dict:
    """``{"mean", "ci95", "n"}`` for a list of per-item values (Wilson for 0/1 data, bootstrap otherwise)."""
    values = [float(v) for v in values]
    n = len(values)
    if n == 0:
        return {"mean": None, "ci95": [None, None], "n": 0}
    mean = sum(values) / n
    if all(v in (0.0, 1.0) for v in values):
        lo, hi = wilson_ci(sum(values), n)
    else:
        lo, hi = bootstrap_ci(values, seed=seed)
    return {"mean": mean, "ci95": [lo, hi], "n": n}
