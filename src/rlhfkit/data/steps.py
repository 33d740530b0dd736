"""Step boundaries: a step is a line.

A multi-step response (a worked solution) is cut into steps at a separator, the newline by
default. One rule, used by every reader of steps: step labels (``data.preferences.load_steps``),
step-label estimation (``data.step_estimation``), the PRM's inputs (``models.reward``), PPO's
step rewards (``recipes.ppo``) and the embedded task's oracle, which labels each line.

- :func:`split_steps`: the response's text, surrounding whitespace dropped, cut at every separator;
  each step stripped, interior empty steps kept (a blank line is a step the labeller saw).
- :func:`join_steps`: steps back into a response, one separator between steps.
- :func:`step_end_positions`: where each step ends among a response's *sampled tokens*: the token
  holding the separator that closes it, the last token for the last step. A causal PRM reads step
  k's score there, and PPO puts step k's reward there.
"""
from __future__ import annotations

from typing import Sequence

STEP_SEPARATOR = "\n"
"""the default step separator: a step is a line"""


def split_steps(response: str, separator: str = STEP_SEPARATOR) -> list[str]:
    """The steps of ``response``: ``"  a \\n\\nb\\n"`` → ``["a", "", "b"]``; no steps in a blank response."""
    text = response.strip()
    return [step.strip() for step in text.split(separator)] if text else []


def join_steps(steps: Sequence[str], separator: str = STEP_SEPARATOR) -> str:
    """``steps`` as one response; :func:`split_steps` gives them back when none holds the separator
    or surrounding whitespace."""
    return separator.join(steps)


def step_end_positions(tokenizer, response_ids: Sequence[int], n_tokens: int, separator: str = STEP_SEPARATOR) -> list[int]:
    """Index (within the response's ``n_tokens`` tokens) of the token closing each step of :func:`split_steps`.

    Step k < last ends at the token that completes the k-th separator inside the stripped text
    (separators in the leading or trailing whitespace close no step); the last step ends at the
    last token (the EOS of a finished response, which ``n_tokens`` counts). Character offsets come
    from decoding growing prefixes of the sampled ids, never from re-tokenising the text, which
    may split differently from what was sampled. A blank response has no steps: ``[]``.
    """
    text = tokenizer.decode(list(response_ids), skip_special_tokens=True)
    lo, hi = len(text) - len(text.lstrip()), len(text.rstrip())
    if lo >= hi:
        return []
    ends = [len(tokenizer.decode(list(response_ids[: i + 1]), skip_special_tokens=True)) for i in range(len(response_ids))]
    positions = []
    c = text.find(separator, lo)
    while c != -1 and c + len(separator) <= hi:
        last_char = c + len(separator) - 1
        positions.append(next(i for i, e in enumerate(ends) if e > last_char))
        c = text.find(separator, c + len(separator))  # non-overlapping, left to right, as str.split cuts
    return positions + [n_tokens - 1]
