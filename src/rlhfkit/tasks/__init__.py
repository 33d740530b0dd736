"""The embedded default task: generated arithmetic word problems and their oracle judge."""
from rlhfkit.tasks.arith import (
    Problem, demonstration, format_prompt, gold_response, make_problems, missing_line, pretrain_corpus,
)
from rlhfkit.tasks.arith_data import TaskConfig, write_task_data
from rlhfkit.tasks.arith_judge import (
    Verdict, judge, preference_prob, sample_preference, sample_ranking,
)

__all__ = [
    "Problem", "TaskConfig", "Verdict", "demonstration", "format_prompt", "gold_response",
    "judge", "make_problems", "missing_line", "preference_prob", "pretrain_corpus",
    "sample_preference", "sample_ranking", "write_task_data",
]
