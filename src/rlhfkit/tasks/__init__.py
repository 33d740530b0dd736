"""The embedded default task: generated arithmetic word problems and their oracle judge."""
from rlhfkit.tasks.arith import Problem, demonstration, format_prompt, gold_response, make_problems, missing_line
from rlhfkit.tasks.arith_pretrain import pretrain_corpus
from rlhfkit.tasks.arith_data import TaskConfig, write_task_data
from rlhfkit.tasks.arith_judge import (
    Verdict, judge, preference_prob, sample_preference, sample_ranking,
)
from rlhfkit.tasks.intransitive_judge import IntransitiveJudge
from rlhfkit.tasks.oracle import TaskOracle

__all__ = [
    "Problem", "TaskConfig", "Verdict", "demonstration", "format_prompt", "gold_response",
    "judge", "make_problems", "missing_line", "preference_prob", "pretrain_corpus",
    "JUDGES", "sample_preference", "sample_ranking", "write_task_data",
]


def _oracle(records, beta: float, gamma: float):
    return TaskOracle.from_records(records, beta=beta)


def _intransitive(records, beta: float, gamma: float):
    return IntransitiveJudge.from_records(records, beta=beta, gamma=gamma)


# The task's named judges, for ``judges.from_spec(spec, ..., task_judges=JUDGES)``: ``oracle`` (the answer
# key as simulated annotators) and ``intransitive`` (the oracle plus an answer-style cycle).
JUDGES = {"oracle": _oracle, "intransitive": _intransitive}
