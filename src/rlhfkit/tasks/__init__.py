"""The embedded default task: generated arithmetic word problems and their oracle judge."""
from rlhfkit.tasks.arith import (
    Problem,
    TaskConfig,
    Verdict,
    demonstration,
    format_prompt,
    gold_response,
    judge,
    make_problems,
    missing_line,
    preference_prob,
    pretrain_corpus,
    response_lines,
    sample_preference,
    sample_ranking,
    write_task_data,
)

__all__ = [
    "Problem", "TaskConfig", "Verdict", "demonstration", "format_prompt", "gold_response",
    "judge", "make_problems", "missing_line", "preference_prob", "pretrain_corpus",
    "response_lines", "sample_preference", "sample_ranking", "write_task_data",
]
