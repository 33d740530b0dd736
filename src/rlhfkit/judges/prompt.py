"""The pairwise judging prompt shared by the local LLM judge and the HTTP judge.

One prompt, two transports: ``llm.py`` reads the probability of the two answer labels from a
local model's logits, ``http.py`` from an endpoint's ``logprobs`` (or the letter it answers).
Keeping the prompt here means a local judge and the same model behind a server are asked the
same question, so their figures can be compared.

Position bias (Zheng et al. 2023, "Judging LLM-as-a-judge"): judges favour one slot. Each
pair is asked in both orders; ``order`` 0 shows ``a`` in the first slot, ``order`` 1 shows it in
the second, and the judge's preference for ``a`` is read accordingly.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from rlhfkit.data.chat import Prompt, prompt_as_text

DEFAULT_RUBRIC = (
    "Judge which response follows the instruction better. Prefer the response that does exactly what "
    "the instruction asks, is correct and helpful, and does not add unrequested content. "
    "Do not let the order of the responses or their length influence you."
)


@dataclass(frozen=True)
class JudgePrompt:
    """How a pair is put to a judge: the rubric (or constitution) and the two answer labels."""

    rubric: str = DEFAULT_RUBRIC
    """the criteria, or the principles of a constitution, shown to the judge"""
    labels: tuple[str, str] = ("A", "B")
    """the two answer labels: ("A", "B") or ("1", "2")"""

    def __post_init__(self):
        if len(self.labels) != 2 or self.labels[0] == self.labels[1] or not all(l.strip() for l in self.labels):
            raise ValueError(f"labels must be two different non-empty strings, got {self.labels!r}")

    def messages(self, prompt: Prompt, first: str, second: str, cot: bool) -> list[dict]:
        """Chat messages asking which of ``first`` / ``second`` is better (a conversation prompt is shown as text)."""
        l1, l2 = self.labels
        prompt = prompt_as_text(prompt)
        if cot:
            ask = (f"First explain your reasoning in a few sentences. Then, on the last line, write "
                   f"'Answer: {l1}' or 'Answer: {l2}'.")
        else:
            ask = f"Answer with a single character: {l1} or {l2}."
        user = (
            f"{self.rubric}\n\n# Instruction\n{prompt}\n\n# Response {l1}\n{first}\n\n# Response {l2}\n{second}\n\n"
            f"Which response is better, {l1} or {l2}? {ask}"
        )
        return [{"role": "system", "content": "You are a fair and careful judge of responses to instructions."},
                {"role": "user", "content": user}]

    def answer_prefix(self) -> str:
        """Text appended after a chain-of-thought rationale so the next token is the answer label."""
        return "\nAnswer:"

    def parse_letter(self, text: str) -> int | None:
        """The slot (0 or 1) a free-text answer names, or None if it names neither.

        The last standalone label wins, so "A is verbose, but ... Answer: B" reads as B.
        """
        pat = "|".join(re.escape(l) for l in self.labels)
        hits = re.findall(rf"(?<![A-Za-z0-9])({pat})(?![A-Za-z0-9])", text)
        if not hits:
            return None
        return self.labels.index(hits[-1])


def prompt_from_files(rubric_file: str | None, constitution_file: str | None, labels: tuple[str, str]) -> JudgePrompt:
    """A JudgePrompt from a rubric file, or a constitution (one principle per line) file, or the default."""
    if rubric_file and constitution_file:
        raise ValueError("give rubric_file or constitution_file, not both")
    if rubric_file:
        text = _read(rubric_file, "rubric_file").strip()
        return JudgePrompt(rubric=text, labels=labels)
    if constitution_file:
        lines = [l.strip().lstrip("-*").strip() for l in _read(constitution_file, "constitution_file").splitlines()]
        principles = [l for l in lines if l and not l.startswith("#")]
        if not principles:
            raise ValueError(f"{constitution_file}: the constitution lists no principles")
        body = "\n".join(f"{i}. {p}" for i, p in enumerate(principles, 1))
        return JudgePrompt(rubric=f"Judge the responses by these principles:\n{body}", labels=labels)
    return JudgePrompt(labels=labels)


def _read(path: str, key: str) -> str:
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{key}: {path} not found")
    return p.read_text(encoding="utf-8")


@dataclass(frozen=True)
class Judgment:
    """A judge's verdict on one (prompt, a, b), with what it was made of.

    ``prob_a_first`` is P(a ≻ b) read with ``a`` in the first slot; ``prob_a_second`` with ``a`` in
    the second slot (None when only one order was asked). ``prob`` is what the judge reports:
    their mean when orders are averaged, else ``prob_a_first``.
    """

    prob: float
    prob_a_first: float
    prob_a_second: float | None
    rationales: tuple[str, ...] = ()

    @property
    def position_consistent(self) -> bool | None:
        """Both orders prefer the same response (None with one order, or a 0.5 tie in either)."""
        if self.prob_a_second is None or self.prob_a_first == 0.5 or self.prob_a_second == 0.5:
            return None
        return (self.prob_a_first > 0.5) == (self.prob_a_second > 0.5)

    def to_dict(self) -> dict:
        return {"prob": self.prob, "prob_a_first": self.prob_a_first, "prob_a_second": self.prob_a_second,
                "position_consistent": self.position_consistent, "rationales": list(self.rationales)}


def combine(p_first: float, p_second: float | None, average: bool) -> float:
    """The reported P(a ≻ b): the mean of both orders when averaging, else the first order's."""
    if average and p_second is not None:
        return 0.5 * (p_first + p_second)
    return p_first
