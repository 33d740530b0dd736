"""The preference-function interface every judge implements.

A preference function answers P(a ≻ b | prompt): the probability that response ``a`` is
preferred to response ``b`` for ``prompt``. Judges (the embedded task's oracle, a reward
model, an LLM judge, an HTTP judge, a pairwise preference model) all implement it, so the
labeling, DNO and evaluation code never needs to know which one it is talking to.
"""
from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable


@runtime_checkable
class PreferenceFunction(Protocol):
    """P(a ≻ b | prompt) for a batch of (prompt, a, b) triples."""

    name: str

    def prob(self, items: Sequence[tuple[str, str, str]]) -> list[float]:
        """Return, for each (prompt, a, b), the probability that ``a`` is preferred to ``b``."""
        ...
