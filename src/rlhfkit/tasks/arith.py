"""The embedded default task: arithmetic word problems, some of them unanswerable.

Everything here is generated from a seed, so the whole pipeline runs with nothing
downloaded, and is small enough that a ~2M-parameter model learns it on a CPU in minutes.

A problem is a short story ("Tom has 3 apples. He buys 4 more apples. ...") followed by a
question. Its gold solution is one equation per line, then ``Answer: N``. In a share of
problems one needed number is replaced by a vague word ("some", "a few", "several"); the
right response then says what is missing and ends with ``Answer: unknown``. Fallible human
demonstrators (:func:`demonstration`) sometimes invent the missing number instead: that is
the hallucination that RL from the judge's preferences (``rlhfkit.tasks.arith_judge``) has to remove.

Prompt and response formats are fixed strings shared by the whole project:
``format_prompt`` gives ``"Question: {question}\\n"`` and the response follows directly.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Collection, Sequence

NAMES = (("Tom", "he"), ("Ana", "she"), ("Ben", "he"), ("Mia", "she"),
         ("Sam", "he"), ("Lea", "she"), ("Max", "he"), ("Eva", "she"))
ITEMS = ("apples", "pens", "coins", "books", "cards", "eggs", "stamps", "shells")
VAGUE = ("some", "a few", "several")
# "some times as many" reads as "sometimes": factors only take the other two vague words.
VAGUE_FACTOR = ("a few", "several")
MAX_NUMBER = 200
START_RANGE = range(2, 21)
ADDEND_RANGE = range(1, 10)
FACTOR_RANGE = range(2, 5)
MIN_MAX_NUMBER = START_RANGE[-1]  # every start amount must fit


@dataclass(frozen=True)
class Problem:
    """One word problem, with everything the judge needs to grade a response to it."""

    id: str
    """unique and deterministic from the generator's seed"""
    question: str
    """the story and its question, without the ``Question:`` prefix"""
    numbers: tuple[int, ...]
    """the numbers written in the question, in order (a vague word contributes none)"""
    answerable: bool
    """False when one needed number is replaced by a vague word"""
    answer: int | None
    """the final amount; None for an unanswerable problem"""
    steps: tuple[str, ...]
    """gold step lines ``"{a} {op} {b} = {c}"``; empty for an unanswerable problem"""
    missing: str
    """what is missing, as a noun phrase ("the number of apples Tom buys"); "" if answerable"""
    ops: tuple[str, ...] = ()
    """the operation of each story sentence after the first, each one of ``+ - *``"""
    operands: tuple[int | None, ...] = ()
    """the start amount, then the operand of each op; None where the question is vague"""

    def to_meta(self) -> dict:
        """A JSON-serializable dict; :meth:`from_meta` inverts it."""
        return {"id": self.id, "question": self.question, "numbers": list(self.numbers),
                "answerable": self.answerable, "answer": self.answer, "steps": list(self.steps),
                "missing": self.missing, "ops": list(self.ops), "operands": list(self.operands)}

    @classmethod
    def from_meta(cls, d: dict) -> Problem:
        return cls(id=d["id"], question=d["question"], numbers=tuple(d["numbers"]),
                   answerable=d["answerable"], answer=d["answer"], steps=tuple(d["steps"]),
                   missing=d["missing"], ops=tuple(d.get("ops", ())),
                   operands=tuple(d.get("operands", ())))


# ----------------------------------------------------------------------------- generation
def _apply(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def _random_chain(rng: random.Random, max_steps: int, max_number: int = MAX_NUMBER) -> tuple[list[str], list[int]]:
    """Ops and operands whose running amount stays within 0..max_number."""
    x = rng.choice(START_RANGE)
    ops, operands = [], [x]
    for _ in range(rng.randint(1, max_steps)):
        allowed = [op for op, ok in (("+", x + 1 <= max_number), ("-", x >= 1),
                                     ("*", 1 <= x and 2 * x <= max_number)) if ok]
        op = rng.choice(allowed)
        if op == "+":
            b = rng.randint(1, min(ADDEND_RANGE[-1], max_number - x))
        elif op == "-":
            b = rng.randint(1, min(ADDEND_RANGE[-1], x))
        else:
            b = rng.randint(FACTOR_RANGE[0], min(FACTOR_RANGE[-1], max_number // x))
        ops.append(op)
        operands.append(b)
        x = _apply(x, op, b)
    return ops, operands


def _story(name: str, pron: str, item: str, ops: Sequence[str],
           operands: Sequence[int | None], vague: str) -> list[str]:
    words = [vague if v is None else str(v) for v in operands]
    sentences = [f"{name} has {words[0]} {item}."]
    cap = pron.capitalize()
    for op, w in zip(ops, words[1:]):
        sentences.append({"+": f"{cap} buys {w} more {item}.",
                          "-": f"{cap} gives away {w} {item}.",
                          "*": f"Then {pron} has {w} times as many {item}."}[op])
    return sentences


def _make_vague(rng: random.Random, ops: Sequence[str], operands: list[int | None]) -> tuple[int, str]:
    """Replace one operand by None in place; return its index and the vague word to print."""
    j = rng.randrange(len(operands))
    operands[j] = None
    return j, rng.choice(VAGUE if j == 0 or ops[j - 1] != "*" else VAGUE_FACTOR)


def _missing_phrase(name: str, item: str, ops: Sequence[str], j: int) -> str:
    if j == 0:
        return f"the number of {item} {name} has"
    return {"+": f"the number of {item} {name} buys",
            "-": f"the number of {item} {name} gives away",
            "*": f"how many times as many {item} {name} has"}[ops[j - 1]]


def _solve(ops: Sequence[str], operands: Sequence[int]) -> tuple[list[str], list[int]]:
    """Gold step lines and the running amount after each."""
    x, steps, results = operands[0], [], []
    for op, b in zip(ops, operands[1:]):
        y = _apply(x, op, b)
        steps.append(f"{x} {op} {b} = {y}")
        results.append(y)
        x = y
    return steps, results


def _random_problem(rng: random.Random, pid: str, answerable: bool, max_steps: int, max_number: int) -> Problem:
    name, pron = rng.choice(NAMES)
    item = rng.choice(ITEMS)
    ops, full = _random_chain(rng, max_steps, max_number)
    operands: list[int | None] = list(full)
    vague, missing = "", ""
    if not answerable:
        j, vague = _make_vague(rng, ops, operands)
        missing = _missing_phrase(name, item, ops, j)
    question = " ".join(_story(name, pron, item, ops, operands, vague)
                        + [f"How many {item} does {name} have now?"])
    steps, results = _solve(ops, full) if answerable else ([], [None])
    return Problem(id=pid, question=question, numbers=tuple(v for v in operands if v is not None),
                   answerable=answerable, answer=results[-1], steps=tuple(steps),
                   missing=missing, ops=tuple(ops), operands=tuple(operands))


def make_problems(n: int, seed: int, unanswerable_frac: float, max_steps: int = 3, *,
                  exclude: Collection[str] = (), id_prefix: str | None = None,
                  max_number: int = MAX_NUMBER) -> list[Problem]:
    """``n`` problems with distinct questions, none of them in ``exclude`` (question texts), every amount in
    their stories within 0..``max_number``.

    Exactly ``round(n * unanswerable_frac)`` are unanswerable, at random positions, so a
    held-out metric always has the same denominator. Ids are ``f"{id_prefix}-{i}"``.
    """
    if not 0.0 <= unanswerable_frac <= 1.0 or max_steps < 1 or n < 0 or max_number < MIN_MAX_NUMBER:
        raise ValueError(f"bad arguments: n={n} unanswerable_frac={unanswerable_frac} max_steps={max_steps} "
                         f"max_number={max_number} (at least {MIN_MAX_NUMBER})")
    rng = random.Random(seed)
    prefix = f"arith{seed}" if id_prefix is None else id_prefix
    n_unanswerable = round(n * unanswerable_frac)
    flags = [False] * n_unanswerable + [True] * (n - n_unanswerable)
    rng.shuffle(flags)
    seen, problems = set(exclude), []
    for i, answerable in enumerate(flags):
        for _ in range(1000):
            p = _random_problem(rng, f"{prefix}-{i}", answerable, max_steps, max_number)
            if p.question not in seen:
                break
        else:  # the question space is far larger than any sensible n; say so rather than loop
            raise ValueError(f"could not find {n} distinct questions with max_steps={max_steps}")
        seen.add(p.question)
        problems.append(p)
    return problems


# ----------------------------------------------------------------------------- formats
def format_prompt(p: Problem) -> str:
    return f"Question: {p.question}\n"


def missing_line(p: Problem) -> str:
    """The gold line of an unanswerable problem, e.g. "The number of apples Tom buys is not given."."""
    return f"{p.missing[:1].upper()}{p.missing[1:]} is not given."


def gold_response(p: Problem) -> str:
    lines = [*p.steps, f"Answer: {p.answer}"] if p.answerable else [missing_line(p), "Answer: unknown"]
    return "\n".join(lines)


def restate(response: str) -> str:
    """A wordier demonstrator's version of ``response``: "So the answer is N." before a numeric ``Answer: N``.

    The restatement repeats a number already computed, so it invents nothing, but the oracle labels a prose
    line of an answerable problem 0, so it costs gold score (3/10 of a step's share: 0.1 on a two-step
    problem); an abstention (``Answer: unknown``) is left as it is. ``TaskConfig.verbose_rate`` is the share
    of demonstrations written this way: a style the SFT policy imitates and unbiased annotators disprefer,
    the room a length-biased reward needs to make a policy longer.
    """
    *body, last = response.split("\n")
    number = re.fullmatch(r"Answer: (-?\d+)", last)
    return "\n".join([*body, f"So the answer is {number[1]}.", last]) if number else response


def false_abstention(p: Problem, rng: random.Random) -> str:
    """An over-cautious demonstrator's response to an answerable ``p``: one of its given amounts called missing,
    then ``Answer: unknown`` (gold score 0: every number was there). ``TaskConfig.abstain_rate`` is the share of
    answerable demonstrations written this way, so the SFT policy's samples sometimes abstain where they should
    not, and the annotators' rankings teach a reward model that abstaining is right only when a number is missing."""
    name, item = re.match(r"(\w+) has \d+ (\w+)\.", p.question).groups()
    j = rng.randrange(len(p.operands))
    missing = _missing_phrase(name, item, p.ops, j)
    return f"{missing[:1].upper()}{missing[1:]} is not given.\nAnswer: unknown"


def _lines_with_answer(steps: Sequence[str], answer: int) -> str:
    return "\n".join([*steps, f"Answer: {answer}"])


def _in_range(values: Sequence[int]) -> bool:
    return all(0 <= v <= MAX_NUMBER for v in values)


def _hallucinate(p: Problem, rng: random.Random) -> str:
    """Invent a plausible value for the missing number and solve with it."""
    j = p.operands.index(None)
    pool = START_RANGE if j == 0 else FACTOR_RANGE if p.ops[j - 1] == "*" else ADDEND_RANGE
    # Prefer a value the judge can see is invented (not given, not yet computed); fall back to
    # any value that keeps the story's amounts in range, as a person might.
    _, before = _solve(p.ops[: j - 1], p.operands[:j]) if j > 1 else ([], [])
    known = set(p.numbers) | set(before)

    def fill(v: int) -> list[int]:
        return [v if x is None else x for x in p.operands]

    valid = [v for v in pool if _in_range(_solve(p.ops, fill(v))[1])]
    v = rng.choice([v for v in valid if v not in known] or valid)
    steps, results = _solve(p.ops, fill(v))
    return _lines_with_answer(steps, results[-1])


def _slip(p: Problem, rng: random.Random) -> str:
    """One step's result off by 1 or 2, carried through the later steps to the answer."""
    i = rng.randrange(len(p.ops))
    deltas = [-2, -1, 1, 2]
    rng.shuffle(deltas)
    for delta in deltas:
        x, steps, shown = p.operands[0], [], []
        for k, (op, b) in enumerate(zip(p.ops, p.operands[1:])):
            y = _apply(x, op, b) + (delta if k == i else 0)
            steps.append(f"{x} {op} {b} = {y}")
            shown.append(y)
            x = y
        if _in_range(shown):  # a slip that goes negative is not one a person would write
            return _lines_with_answer(steps, x)
    return gold_response(p)


def demonstration(p: Problem, rng: random.Random, hallucination_rate: float, slip_rate: float) -> str:
    """What a fallible human demonstrator writes for ``p``.

    Usually :func:`gold_response`. An unanswerable problem is, with probability
    ``hallucination_rate``, answered with an invented value for the missing number; an
    answerable one gets, with probability ``slip_rate``, one arithmetic slip carried to the
    answer. Exactly one ``rng.random()`` decides, so streams stay aligned across rates.
    """
    if not p.ops:
        raise ValueError(f"problem {p.id} has no ops/operands; build it with make_problems")
    u = rng.random()
    if not p.answerable:
        return _hallucinate(p, rng) if u < hallucination_rate else gold_response(p)
    return _slip(p, rng) if u < slip_rate else gold_response(p)
