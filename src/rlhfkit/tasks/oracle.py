"""The embedded task's oracle: simulated annotators who know the answer key.

It stands in for the human labelers of the pipeline and is never shown to the policy: the
policy learns only through the labels and reward models built from its preferences.
"""
from __future__ import annotations

from typing import Iterable, Sequence

from rlhfkit.tasks.arith import Problem, format_prompt
from rlhfkit.tasks.arith_judge import Verdict, judge, preference_prob


class TaskOracle:
    """P(a ≻ b | prompt) = σ(beta · (score_a − score_b)) from :func:`rlhfkit.tasks.arith_judge.judge`.

    Implements :class:`rlhfkit.judges.base.PreferenceFunction`. Prompts are looked up by
    their text with surrounding whitespace ignored, so a collator that strips the trailing
    newline of ``format_prompt`` still finds its problem.
    """

    name: str = "oracle"

    def __init__(self, problems: Iterable[Problem], beta: float = 10.0):
        self.beta = beta
        self._by_prompt = {format_prompt(p).strip(): p for p in problems}

    @classmethod
    def from_records(cls, records: Iterable[dict], beta: float = 10.0) -> TaskOracle:
        """From rows of prompts.jsonl / heldout.jsonl / sft.jsonl (each with a ``meta`` dict)."""
        return cls((Problem.from_meta(r["meta"]) for r in records), beta=beta)

    def problem(self, prompt: str) -> Problem:
        try:
            return self._by_prompt[prompt.strip()]
        except KeyError:
            raise KeyError(f"the oracle has no problem for prompt {prompt!r}") from None

    def prob(self, items: Sequence[tuple[str, str, str]]) -> list[float]:
        return [preference_prob(self.problem(prompt), a, b, self.beta) for prompt, a, b in items]

    def score(self, prompt: str, response: str) -> Verdict:
        return judge(self.problem(prompt), response)

    def logit(self, prompt: str, a: str, b: str, score_a: float | None = None, score_b: float | None = None) -> float:
        """The logit of P(a ≻ b): beta · (score_a − score_b).

        Pass the gold scores to override them (an evaluation scores a response that never ended
        as ``unfinished_score``); the prompt is looked up only for a score not given.
        """
        sa = self.score(prompt, a).score if score_a is None else score_a
        sb = self.score(prompt, b).score if score_b is None else score_b
        return self._logit(a, b, sa, sb)

    def _logit(self, a: str, b: str, score_a: float, score_b: float) -> float:
        return self.beta * (score_a - score_b)

    def verdict(self, prompt: str, a: str, b: str, score_a: float | None = None, score_b: float | None = None) -> float:
        """The noiseless annotator's verdict: 1 if it prefers ``a`` (logit > 0), ½ on a tie, 0 otherwise.

        Read from the sign of the logit, not from P(a ≻ b) > ½: σ of a tiny logit rounds to ½.
        """
        z = self.logit(prompt, a, b, score_a, score_b)
        return 1.0 if z > 0 else 0.5 if z == 0 else 0.0
