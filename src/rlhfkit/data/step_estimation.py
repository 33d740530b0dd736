"""Step labels estimated from completions, for tasks with no human or oracle step labels.

Math-Shepherd (Wang et al. 2023, arXiv 2312.08935, §3.3): the quality of a step is its potential
to reach the right answer. From the prefix that ends with step s_i, a "completer" policy writes
N completions (s_{i+1,j}, ..., s_{K_j,j}, a_j), j = 1..N, and with the gold answer a*:

    hard estimation (HE):  y_i = 1 if ∃ j: a_j = a*, else 0
    soft estimation (SE):  y_i = (1/N) Σ_j 1[a_j = a*]

Here a step is a line (:func:`rlhfkit.data.steps.split_steps`, the steps the PRM and
``load_steps`` use), and "a_j = a*" is whatever final-answer check the caller passes, so only
the outcome is ever checked, never a step. The last line already holds the response's own
answer: it is labelled by that answer's correctness, with no completions (its only
"completion" is the response itself, so HE and SE agree).

The functions here take plain callables, so the estimate is tested with fakes; the label stage
(``rlhfkit.recipes.label``) passes the label policy's sampler and the task's answer check.
"""
from __future__ import annotations

from enum import StrEnum
from typing import Callable, Sequence

from rlhfkit.data.steps import STEP_SEPARATOR, join_steps, split_steps


class EstimateMode(StrEnum):
    """How the n completions of a step prefix become its label."""

    soft = "soft"
    """SE: the share of completions that reach the right answer, in {0, 1/n, ..., 1}"""
    hard = "hard"
    """HE: 1 if any completion reaches the right answer, else 0"""


CompleteFn = Callable[[list[tuple[str, str]], int], list[list[str | None]]]
"""(queries: Q × (prompt, prefix), n) → Q × n completions; None for one that did not finish"""
IsCorrectFn = Callable[[int, str], bool]
"""(index into prompts/responses, full response text) → the final answer is right"""


def step_prefixes(response: str) -> list[str]:
    """The response cut after each of its lines: prefix i = lines[:i+1] joined by "\\n", plus "\\n".

    One prefix per step of :func:`~rlhfkit.data.steps.split_steps` (so per step label), the last one included.
    The trailing newline closes the step, so a policy continuing a prefix starts the next line
    rather than extending this one. ``"a\\nb\\nAnswer: 3"`` → ``["a\\n", "a\\nb\\n", "a\\nb\\nAnswer: 3\\n"]``.
    """
    lines = split_steps(response)
    return [join_steps(lines[: i + 1]) + STEP_SEPARATOR for i in range(len(lines))]


def estimate_step_labels(
    prompts: Sequence[str],
    responses: Sequence[str],
    complete_fn: CompleteFn,
    is_correct_fn: IsCorrectFn,
    n: int,
    mode: EstimateMode | str = EstimateMode.soft,
) -> list[list[float]]:
    """Math-Shepherd labels: one list per response, one float in [0, 1] per line.

    prompts, responses: R each, paired by index (several responses may share a prompt).
    complete_fn: called once, with the distinct (prompt, prefix) pairs of every line but the last of
        every response (Q ≤ Σ_r (lines_r − 1) queries, batched across responses, in first-seen order),
        and ``n``; returns Q lists of n completions, each continuing its prefix. A step's value
        depends on (prompt, prefix) only, so responses that share a prefix (K samples of one prompt
        often open with the same line) share its n completions, each still checked per response.
        A completion that did not finish (ran out of tokens) is None and counts as not reaching
        the answer: its last line may be a cut-off number.
    is_correct_fn(r, text): whether ``text``, a full response to prompts[r], ends with the right
        answer. Called on prefix + completion for every completion, and on responses[r] itself
        for its last line.
    mode: ``soft`` (SE: the share of the n completions that are right) or ``hard`` (HE: 1.0 if
        any is right, else 0.0).

    Returns R lists, list r of length ``len(split_steps(responses[r]))`` (empty for an empty
    response), aligned with the ``labels`` of a steps record whose completion is responses[r].
    """
    if mode not in set(EstimateMode):
        raise ValueError(f"mode must be one of {', '.join(EstimateMode)}, got {mode!r}")
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    prefixes = [step_prefixes(r) for r in responses]
    steps = [(r, (prompts[r], p)) for r, ps in enumerate(prefixes) for p in ps[:-1]]  # (owner, query) per step
    queries = list(dict.fromkeys(query for _, query in steps))  # distinct, first-seen order
    completions = complete_fn(queries, n) if queries else []
    if len(completions) != len(queries) or any(len(c) != n for c in completions):
        raise ValueError(f"complete_fn must return {len(queries)} lists of {n} completions, "
                         f"got {[len(c) for c in completions]}")
    done = dict(zip(queries, completions))
    estimates = []
    for r, query in steps:
        prefix = query[1]
        right = sum(c is not None and bool(is_correct_fn(r, prefix + c)) for c in done[query])
        estimates.append(right / n if mode == EstimateMode.soft else float(right > 0))
    it = iter(estimates)
    labels = []
    for r, ps in enumerate(prefixes):
        steps = [next(it) for _ in ps[:-1]]
        labels.append([*steps, float(bool(is_correct_fn(r, responses[r])))] if ps else [])
    return labels
