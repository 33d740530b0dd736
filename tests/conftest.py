"""Shared fixtures: tiny models built from transformers configs, offline."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "RLHFKIT_CACHE" not in os.environ:  # GGUF imports of library calls go here, not into ~/.cache
    import atexit
    import shutil
    import tempfile

    os.environ["RLHFKIT_CACHE"] = tempfile.mkdtemp(prefix="rlhfkit-cache-")
    # The process that made it removes it (subprocesses inherit the variable and leave it alone).
    atexit.register(shutil.rmtree, os.environ["RLHFKIT_CACHE"], ignore_errors=True)

import pytest


@pytest.fixture(scope="session")
def task_texts():
    from rlhfkit.tasks.arith import format_prompt, gold_response, make_problems
    from rlhfkit.tasks.arith_pretrain import pretrain_corpus

    problems = make_problems(60, seed=1, unanswerable_frac=0.2)
    return pretrain_corpus(60, seed=1) + [format_prompt(p) + gold_response(p) for p in problems]


@pytest.fixture(scope="session")
def tiny_tokenizer(task_texts):
    from rlhfkit.models.tokenizer import train_bpe_tokenizer

    return train_bpe_tokenizer(task_texts, vocab_size=300)


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory, tiny_tokenizer):
    """A saved tiny Llama (2 layers, width 32) with the task tokenizer: a normal HF directory."""
    from rlhfkit.models.loading import TinyModelConfig, build_tiny_causal_lm, save_pretrained_atomic

    arch = TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_position_embeddings=256)
    model = build_tiny_causal_lm(arch, tiny_tokenizer, seed=0)
    out = tmp_path_factory.mktemp("tiny") / "model"
    save_pretrained_atomic(model, tiny_tokenizer, out)
    return out


def tiny_pipeline_overrides(out) -> list[str]:
    """Overrides that shrink the quickstart to seconds (used by pipeline and CLI tests)."""
    return [
        f"out={out}",
        "stages=[data, pretrain, sft, eval]",
        "task.n_pretrain_docs=120", "task.n_sft=64", "task.n_prompts=32", "task.n_heldout=16",
        "pretrain.arch.hidden_size=32", "pretrain.arch.num_layers=2", "pretrain.arch.num_heads=2",
        "pretrain.arch.intermediate_size=64", "pretrain.arch.vocab_size=300",
        "pretrain.max_steps=4", "pretrain.batch_size=8", "pretrain.log_every=1",
        "sft.max_steps=4", "sft.batch_size=8", "sft.log_every=1",
        "eval.sampling.max_new_tokens=16",
    ]


def scramble_step_labels(steps_file) -> None:
    """Rewrite a tiny run's label-stage steps file for the reward stage's equivalence tests: the tiny SFT policy
    writes no right step (its labels are all 0, which the PRM would fit at once), so every other solution becomes
    the gold one and the labels alternate, unrelated to the text: no model fits them and every step has a
    gradient to synchronise."""
    import json

    from rlhfkit.data.steps import split_steps
    from rlhfkit.tasks.arith import Problem, gold_response

    rows = [json.loads(x) for x in steps_file.read_text().splitlines()]
    for i, r in enumerate(rows):
        if i % 2 == 0:
            r["completion"] = gold_response(Problem.from_meta(r["meta"]))
        r.update(labels=[(i + k) % 2 for k in range(len(split_steps(r["completion"])))],
                 correct=i % 3 == 0, is_safe=i % 4 < 2)
    steps_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
