"""An intransitive judge on the embedded task: a rock-paper-scissors cycle among answer styles.

The answer line of a response comes in three styles that the task's gold score ignores:

    spaced  ``Answer: 7``     (one space)
    tight   ``Answer:7``      (no space)
    wide    ``Answer:  7``    (two spaces)

The judge's preference is the oracle's plus a cycle among styles:

    P(a ≻ b) = σ(beta · (score_a − score_b) + gamma · cycle(style_a, style_b))

with cycle = +1 when a's style beats b's in   spaced ≻ tight ≻ wide ≻ spaced,
−1 the other way round, 0 for the same style (or a response with no recognisable answer line).
Correctness still dominates (beta · 0.6 = 6 for a right against a wrong answer at beta 10),
while among equally good responses the style decides, with no best style: whatever a policy
settles on, another style beats it. No scalar reward r can express this (σ(r_a − r_b) is
transitive), which is where a Bradley-Terry reward model fails and a pairwise preference
model does not.
"""
from __future__ import annotations

import math
import re
from typing import Iterable, Sequence

from rlhfkit.tasks.oracle import TaskOracle
from rlhfkit.tasks.arith import Problem

STYLES = ("spaced", "tight", "wide")
_SPACES = {"spaced": " ", "tight": "", "wide": "  "}
# BEATS[s] is the style that s beats.
BEATS = {"spaced": "tight", "tight": "wide", "wide": "spaced"}
_ANSWER_LINE = re.compile(r"^Answer:( *)(\S.*)$")


def answer_style(response: str) -> str | None:
    """The style of the last line's ``Answer:`` (None when the last line is not an answer line)."""
    lines = response.strip().split("\n")
    m = _ANSWER_LINE.match(lines[-1].strip()) if lines else None
    if m is None:
        return None
    return {0: "tight", 1: "spaced", 2: "wide"}.get(len(m[1]))


def restyle(response: str, style: str) -> str:
    """``response`` with its final answer line written in ``style`` (unchanged if it has none)."""
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    lines = response.rstrip().split("\n")
    m = _ANSWER_LINE.match(lines[-1].strip())
    if m is None:
        return response
    lines[-1] = f"Answer:{_SPACES[style]}{m[2]}"
    return "\n".join(lines)


def cycle(style_a: str | None, style_b: str | None) -> int:
    """+1 if a's style beats b's, −1 if b's beats a's, 0 otherwise."""
    if style_a is None or style_b is None or style_a == style_b:
        return 0
    return 1 if BEATS[style_a] == style_b else -1


class IntransitiveJudge(TaskOracle):
    """The task oracle plus the style cycle; implements PreferenceFunction."""

    name = "intransitive"

    def __init__(self, problems: Iterable[Problem], beta: float = 10.0, gamma: float = 3.0):
        super().__init__(problems, beta=beta)
        self.gamma = gamma

    @classmethod
    def from_records(cls, records: Iterable[dict], beta: float = 10.0, gamma: float = 3.0) -> IntransitiveJudge:
        return cls((Problem.from_meta(r["meta"]) for r in records), beta=beta, gamma=gamma)

    def _logit(self, a: str, b: str, score_a: float, score_b: float) -> float:
        """beta·(score_a − score_b) + gamma·cycle(style_a, style_b); ``logit`` looks the gold scores up."""
        return self.beta * (score_a - score_b) + self.gamma * cycle(answer_style(a), answer_style(b))

    def prob(self, items: Sequence[tuple[str, str, str]]) -> list[float]:
        return [1.0 / (1.0 + math.exp(-self.logit(p, a, b))) for p, a, b in items]
