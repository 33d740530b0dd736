"""How far a policy's arithmetic reaches on a run's held-out problems: greedy accuracy, per-sample accuracy
and pass@k at temperature 1 (the share of answerable problems where any of k samples is right).

    python scripts/pass_at_k.py RUN [MODEL] [K]

MODEL defaults to RUN/sft/model, K to 8. Prints one JSON object (docs/task.md uses it to place the SFT policy's
greedy accuracy between one half and its best-of-k ceiling).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from rlhfkit.data.loading import load_prompts
from rlhfkit.generation import SamplingConfig, sample
from rlhfkit.models.loading import load_causal_lm, load_tokenizer
from rlhfkit.tasks.arith import Problem
from rlhfkit.tasks.arith_judge import judge


def main(run: str, model: str | None = None, k: str = "8") -> None:
    model_dir = Path(model or Path(run) / "sft" / "model")
    records = [r for r in load_prompts(Path(run) / "data" / "heldout.jsonl") if r.meta["answerable"]]
    problems = [Problem.from_meta(r.meta) for r in records]
    prompts = [r.prompt for r in records]
    tok, lm = load_tokenizer(model_dir), load_causal_lm(model_dir)
    k = int(k)

    def right(p, s) -> bool:
        return s.finished and judge(p, s.text).correct

    greedy = sample(lm, tok, prompts, SamplingConfig(max_new_tokens=64, temperature=0.0, batch_size=100), seed=0)
    sampled = sample(lm, tok, prompts, SamplingConfig(max_new_tokens=64, temperature=1.0, batch_size=200), seed=1,
                     num_return_sequences=k)
    hits = [[right(p, sampled[i * k + j]) for j in range(k)] for i, p in enumerate(problems)]
    print(json.dumps({
        "model": str(model_dir), "answerable_problems": len(problems),
        "greedy_accuracy": sum(right(p, s) for p, s in zip(problems, greedy)) / len(problems),
        "per_sample_accuracy_t1": sum(map(sum, hits)) / (len(problems) * k),
        f"pass@{k}_t1": sum(map(any, hits)) / len(problems),
    }))


if __name__ == "__main__":
    if not 2 <= len(sys.argv) <= 4:
        sys.exit(__doc__)
    main(*sys.argv[1:])
