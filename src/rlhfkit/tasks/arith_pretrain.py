"""The embedded task's pretraining corpus: stories and equations in the task's language, never its Q→A format
(the problems and their demonstrations are in ``tasks.arith``)."""
from __future__ import annotations

import random
from typing import Collection

from rlhfkit.tasks.arith import ITEMS, MAX_NUMBER, NAMES, _apply, _make_vague, _random_chain, _solve, _story


def _random_equation(rng: random.Random, max_number: int) -> str:
    op = rng.choice("+-*")
    if op == "+":
        a = rng.randint(0, max_number)
        b = rng.randint(0, max_number - a)
    elif op == "-":
        a = rng.randint(0, max_number)
        b = rng.randint(0, a)
    else:
        b = rng.randint(2, 9)
        a = rng.randint(0, max_number // b)
    return f"{a} {op} {b} = {_apply(a, op, b)}"


def pretrain_corpus(n_docs: int, seed: int, *, exclude: Collection[str] = (), max_number: int = MAX_NUMBER) -> list[str]:
    """Documents that teach the stories' language and arithmetic, but not the Q→A format.

    A third are stories (sometimes vague, sometimes with the question sentence or the final
    amount in prose), a third equation lines with numbers in 0..``max_number``, some chained like a
    solution, and a third worked stories: a story, the equations that follow its amounts, and
    the result in prose (capability — reading numbers off a story and computing — belongs to
    pretraining, as it does for real models). Neither ``Question:`` nor ``Answer:`` ever
    appears, so a model pretrained on this alone scores ~0 until SFT teaches the format. Stories whose question text is in
    ``exclude`` (pass the held-out questions) are skipped, so no held-out answer leaks.
    """
    rng = random.Random(seed)
    docs = []
    while len(docs) < n_docs:
        kind = rng.random()
        if kind < 1 / 3:
            docs.append(_worked_stories(rng, exclude, max_number))
            continue
        if kind < 2 / 3:
            lines = [_random_equation(rng, max_number) for _ in range(rng.randint(2, 6))]
            if rng.random() < 0.5:  # chained steps: the running amount carries to the next line
                lines = _solve(*_random_chain(rng, 4, max_number))[0] + lines[:2]
            docs.append("\n".join(lines))
            continue
        stories = []
        for _ in range(rng.randint(1, 3)):
            name, pron = rng.choice(NAMES)
            item = rng.choice(ITEMS)
            ops, full = _random_chain(rng, 3, max_number)
            operands: list[int | None] = list(full)
            vague = _make_vague(rng, ops, operands)[1] if rng.random() < 0.2 else ""
            sentences = _story(name, pron, item, ops, operands, vague)
            question = f"How many {item} does {name} have now?"
            if " ".join(sentences + [question]) in exclude:
                continue
            if rng.random() < 0.5:
                sentences.append(question)
            if None not in operands and rng.random() < 0.5:
                sentences.append(f"{name} has {_solve(ops, full)[1][-1]} {item} now.")
            stories.append(" ".join(sentences))
        if stories:
            docs.append("\n".join(stories))
    return docs


def _worked_stories(rng: random.Random, exclude: Collection[str], max_number: int) -> str:
    """One or two answerable stories, each followed by its step lines and the amount in prose."""
    parts = []
    while not parts:
        for _ in range(rng.randint(1, 2)):
            name, pron = rng.choice(NAMES)
            item = rng.choice(ITEMS)
            ops, full = _random_chain(rng, 3, max_number)
            sentences = _story(name, pron, item, ops, list(full), "")
            question = f"How many {item} does {name} have now?"
            if " ".join(sentences + [question]) in exclude:
                continue
            steps, results = _solve(ops, full)
            parts.append("\n".join([" ".join(sentences), *steps, f"So {name} has {results[-1]} {item} now."]))
    return "\n".join(parts)
