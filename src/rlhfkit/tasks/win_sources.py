"""Where a policy's wins against a reference come from, on the embedded task.

A win rate against the reference is ``0.5 + (W − L) / (2n)`` over ``n`` prompts with ``W`` strict wins and
``L`` strict losses (a tie counts ½). Each decided prompt is put down to the first property, in the order of
:data:`SOURCES`, on which the two responses differ:

- ``finished``: one response reached EOS and the other did not;
- ``abstention``: an unanswerable problem, one response abstained (right) and the other gave a number;
- ``accuracy``: an answerable problem, one final answer right and the other not (abstaining counts as wrong);
  both wrong, one abstained and the other gave a wrong number: ``abstention`` again (a false abstention
  scores 0, below a worked wrong answer);
- ``invented``: one response used a number never given nor computed, the other did not;
- ``arithmetic``: they differ in the number of wrong equation lines;
- ``style``: they differ in the number of other lines the oracle labels 0 (prose such as "So the answer
  is N." on an answerable problem: a filler line that costs gold score and adds nothing);
- ``other``: anything else that moved the gold score.

:func:`win_sources` gives each source's share ``(W_s − L_s) / (2n)``; the shares sum to ``win_rate − 0.5``
exactly, so the report can say how much of a win rate each property of the task carried.
"""
from __future__ import annotations

from typing import Sequence

from rlhfkit.data.steps import split_steps
from rlhfkit.tasks.arith import Problem
from rlhfkit.tasks.arith_judge import _ANSWER, _EQUATION, Verdict

SOURCES = ("finished", "abstention", "accuracy", "invented", "arithmetic", "style", "other")


def _zero_lines(response: str, verdict: Verdict) -> tuple[int, int]:
    """(equation lines labelled 0, other non-answer lines labelled 0) of one response."""
    bad_equations = bad_prose = 0
    for line, label in zip(split_steps(response), verdict.step_labels):
        if label:
            continue
        if _EQUATION.fullmatch(line):
            bad_equations += 1
        elif not _ANSWER.fullmatch(line):
            bad_prose += 1
    return bad_equations, bad_prose


def decided_by(problem: Problem, a: str, b: str, va: Verdict, vb: Verdict, finished_a: bool = True,
               finished_b: bool = True) -> str:
    """The first property in :data:`SOURCES` on which responses ``a`` and ``b`` (with their oracle
    verdicts ``va``, ``vb``) differ; call it only for a pair whose verdict is not a tie."""
    if finished_a != finished_b:
        return "finished"
    if va.correct != vb.correct:
        return "accuracy" if problem.answerable else "abstention"
    if va.abstained != vb.abstained:
        return "abstention"
    if bool(va.invented_numbers) != bool(vb.invented_numbers):
        return "invented"
    (eq_a, prose_a), (eq_b, prose_b) = _zero_lines(a, va), _zero_lines(b, vb)
    if eq_a != eq_b:
        return "arithmetic"
    if prose_a != prose_b:
        return "style"
    return "other"


def win_sources(problems: Sequence[Problem], rows: Sequence[dict], ref_rows: Sequence[dict],
                wins: Sequence[float], verdicts: Sequence[Verdict], ref_verdicts: Sequence[Verdict]) -> dict:
    """Each source's share of the win rate above ½: ``{source: (W_s − L_s) / (2n)}`` over ``n`` prompts.

    ``rows``/``ref_rows``: the policy's and the reference's eval rows (``response``, ``finished``), prompt
    by prompt; ``wins``: the verdicts (1, ½ or 0) the win rate averages; ``verdicts``: the oracle's
    verdicts of each row's response. Every source is present (0.0 when it decided nothing).
    """
    n = len(wins)
    if not (len(problems) == len(rows) == len(ref_rows) == len(verdicts) == len(ref_verdicts) == n):
        raise ValueError("win_sources: problems, rows, verdicts and wins must be aligned prompt by prompt")
    net = dict.fromkeys(SOURCES, 0)
    for p, r, ref, w, va, vb in zip(problems, rows, ref_rows, wins, verdicts, ref_verdicts):
        if w == 0.5:
            continue
        source = decided_by(p, r["response"], ref["response"], va, vb, r["finished"], ref["finished"])
        net[source] += 1 if w > 0.5 else -1
    return {s: (net[s] / (2 * n) if n else 0.0) for s in SOURCES}
