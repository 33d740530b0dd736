"""Write N new embedded-task prompts (with ``meta``) that share no question with a run's data splits.

For a reranking check on prompts no choice was made on:

    python scripts/fresh_task_prompts.py RUN 500 fresh.jsonl
    rlhfkit run src/rlhfkit/configs/quickstart.yaml out=COPY_OF_RUN "stages=[reward]" \\
        reward.rerank.data=fresh.jsonl reward.rerank.n_prompts=500

The problems come from the task generator's own stream for the split name "fresh-test" (seed 0),
with the run's own ``task`` settings (its config.yaml: unanswerable share, steps, number range).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from rlhfkit.io import atomic_write_jsonl
from rlhfkit.tasks.arith import format_prompt, make_problems
from rlhfkit.pipeline import load_pipeline_config
from rlhfkit.tasks.arith_data import split_seed


def main(run: str, n: str, out: str) -> None:
    taken = {json.loads(line)["meta"]["question"] for split in ("sft", "prompts", "heldout")
             for line in open(Path(run) / "data" / f"{split}.jsonl")}
    cfg = load_pipeline_config(Path(run) / "config.yaml").task
    problems = make_problems(int(n), split_seed(0, "fresh-test"), cfg.unanswerable_frac, cfg.max_steps,
                             exclude=taken, id_prefix="fresh", max_number=cfg.max_number)
    atomic_write_jsonl(Path(out), [{"prompt": format_prompt(p), "meta": p.to_meta()} for p in problems])
    print(f"{out}: {len(problems)} prompts ({sum(not p.answerable for p in problems)} unanswerable), "
          f"none of the {len(taken)} questions of {run}/data")


if __name__ == "__main__":
    main(*sys.argv[1:])
