"""The embedded task's data files: how much to generate (:class:`TaskConfig`) and the four splits on disk.

``write_task_data`` draws every split from its own seeded stream (``tasks.arith`` makes the problems,
demonstrations and pretraining documents) and writes ``pretrain/sft/prompts/heldout.jsonl`` atomically.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path

from rlhfkit.io import atomic_write_jsonl
from rlhfkit.tasks.arith import MIN_MAX_NUMBER, demonstration, false_abstention, format_prompt, make_problems, restate
from rlhfkit.tasks.arith_pretrain import pretrain_corpus


@dataclass(frozen=True)
class TaskConfig:
    """How much task data to generate, and how fallible the simulated people are."""

    seed: int = 0
    """master seed; each split draws from its own stream derived from it"""
    n_pretrain_docs: int = 4000
    """documents in pretrain.jsonl (stories and equations, no Q→A format)"""
    n_sft: int = 2000
    """demonstrations in sft.jsonl"""
    n_prompts: int = 1000
    """train prompts for labeling and RL, in prompts.jsonl"""
    n_heldout: int = 200
    """evaluation prompts, never in sft.jsonl or prompts.jsonl, nor as stories in pretrain.jsonl"""
    unanswerable_frac: float = 0.2
    """share of problems in every split whose needed number is vague"""
    max_steps: int = 3
    """most operations in a story (each problem has 1..max_steps)"""
    max_number: int = 200
    """largest amount in a story or a pretraining equation (at least 20): the arithmetic's range, what sets how
    often a small model slips"""
    hallucination_rate: float = 0.5
    """chance a demonstrator invents the missing number of an unanswerable problem"""
    slip_rate: float = 0.1
    """chance a demonstrator makes one arithmetic slip on an answerable problem"""
    verbose_rate: float = 0.0
    """chance a demonstrator restates the answer in a prose line before it (``tasks.arith.restate``): a wordier
    style that costs gold score; drawn from its own stream, so 0 leaves every other draw as it was"""
    abstain_rate: float = 0.0
    """chance a demonstrator abstains on an answerable problem, calling a given amount missing
    (``tasks.arith.false_abstention``): over-caution that costs the whole gold score; its own stream, as verbose_rate"""
    judge_beta: float = 10.0
    """annotator noise, Bradley–Terry inverse temperature on gold scores; higher = less noise"""

    def __post_init__(self):
        for rate in ("unanswerable_frac", "hallucination_rate", "slip_rate", "verbose_rate", "abstain_rate"):
            if not 0.0 <= getattr(self, rate) <= 1.0:
                raise ValueError(f"{rate} must be in [0, 1], got {getattr(self, rate)}")
        if min(self.n_pretrain_docs, self.n_sft, self.n_prompts, self.n_heldout) < 0:
            raise ValueError("counts must be non-negative")
        if self.max_steps < 1 or self.judge_beta < 0:
            raise ValueError("max_steps must be >= 1 and judge_beta >= 0")
        if self.max_number < MIN_MAX_NUMBER:
            raise ValueError(f"max_number must be >= {MIN_MAX_NUMBER} (the largest start amount), got {self.max_number}")


def split_seed(seed: int, split: str) -> int:
    # A hash, not seed + k, so seed 0's "sft" stream is never seed 1's "heldout" stream.
    return int.from_bytes(hashlib.sha256(f"{seed}:{split}".encode()).digest()[:8], "big")


def write_task_data(out_dir: Path, cfg: TaskConfig) -> dict[str, Path]:
    """Write pretrain/sft/prompts/heldout ``.jsonl`` files into ``out_dir``; return their paths.

    Held-out problems come first from their own stream; sft then prompts exclude every
    question drawn before them, so the three splits are pairwise disjoint by question text.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    taken: set[str] = set()
    splits = {}
    for split, n in (("heldout", cfg.n_heldout), ("sft", cfg.n_sft), ("prompts", cfg.n_prompts)):
        splits[split] = make_problems(n, split_seed(cfg.seed, split), cfg.unanswerable_frac,
                                      cfg.max_steps, exclude=taken, id_prefix=split, max_number=cfg.max_number)
        taken |= {p.question for p in splits[split]}
    demo_rng = random.Random(split_seed(cfg.seed, "demonstrations"))
    style_rng = random.Random(split_seed(cfg.seed, "style"))
    caution_rng = random.Random(split_seed(cfg.seed, "caution"))

    def demo(p) -> str:
        text = demonstration(p, demo_rng, cfg.hallucination_rate, cfg.slip_rate)
        text = restate(text) if style_rng.random() < cfg.verbose_rate else text  # its own stream: nothing else moves
        # Drawn for every problem (answerable or not), so the stream stays aligned across tasks; 0 changes nothing.
        over_cautious = caution_rng.random() < cfg.abstain_rate
        return false_abstention(p, caution_rng) if over_cautious and p.answerable else text

    heldout_questions = {p.question for p in splits["heldout"]}
    rows = {
        "pretrain": [{"text": t} for t in pretrain_corpus(
            cfg.n_pretrain_docs, split_seed(cfg.seed, "pretrain"), exclude=heldout_questions,
            max_number=cfg.max_number)],
        "sft": [{"prompt": format_prompt(p), "meta": p.to_meta(),
                 "response": demo(p)}
                for p in splits["sft"]],
        "prompts": [{"prompt": format_prompt(p), "meta": p.to_meta()} for p in splits["prompts"]],
        "heldout": [{"prompt": format_prompt(p), "meta": p.to_meta()} for p in splits["heldout"]],
    }
    paths = {}
    for name, records in rows.items():
        paths[name] = out_dir / f"{name}.jsonl"
        atomic_write_jsonl(paths[name], records)
    return paths
