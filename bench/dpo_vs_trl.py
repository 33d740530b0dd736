"""Throughput: our DPO recipe against TRL's ``DPOTrainer`` on the same tiny model, data, batch and length.

    .venv/bin/pip install -e '.[bench]'     # TRL is a bench-only extra, never imported by src/
    .venv/bin/python bench/dpo_vs_trl.py [--pairs 160] [--epochs 3] [--rounds 2] [--threads 2]

Both train the same freshly built Llama-style model (the quickstart's architecture) on the same
preference pairs of the embedded task, with the same batch size, learning rate, β and maximum
sequence length and number of epochs (TRL's default, 3), in one process, alternating TRL / ours for ``--rounds`` rounds so that machine
load hits both alike. TRL runs with its defaults except what must match (batch, steps, lr, β,
max_length, epochs, CPU, constant lr, no logging/saving); its defaults include gradient checkpointing, bf16
autocast (also on a CPU) and a reference forward pass every step. For transparency the bench also times TRL with
gradient checkpointing off, and with gradient checkpointing and bf16 both off (ours runs in fp32 on a CPU), and
reports those ratios too. Each run starts from a fresh accelerate state (TRL's TrainingArguments resets
it; ``run_ours`` resets it too), so that neither side inherits the other's mixed precision.

Pairs per second = pair-updates (pairs × epochs) / wall time of training. Ours includes its one-time
reference pass over the pairs (it is part of training; over several epochs it is where the
saving comes from: TRL repeats the reference forward in every step of every epoch); TRL's dataset tokenization (in its constructor) and ours are both
excluded. The last line printed is one JSON object; ``ratio`` = ours / TRL (defaults).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")


def build(tmp: Path, n_pairs: int, seed: int = 0):
    import random

    from rlhfkit.models.loading import TinyModelConfig, build_tiny_causal_lm, save_pretrained_atomic
    from rlhfkit.models.tokenizer import train_bpe_tokenizer
    from rlhfkit.tasks.arith import demonstration, format_prompt, gold_response, make_problems, pretrain_corpus

    problems = make_problems(n_pairs, seed=seed, unanswerable_frac=0.2)
    rng = random.Random(seed)
    pairs = []
    for p in problems:
        # rejected: a fallible demonstrator's answer (always hallucinating / slipping) or a bare answer
        bad = demonstration(p, rng, hallucination_rate=1.0, slip_rate=1.0)
        if bad == gold_response(p):
            bad = "Answer: 0"
        pairs.append({"prompt": format_prompt(p), "chosen": gold_response(p), "rejected": bad})
    tok = train_bpe_tokenizer(pretrain_corpus(400, seed) + [x["prompt"] + x["chosen"] for x in pairs], vocab_size=512)
    arch = TinyModelConfig(hidden_size=128, num_layers=4, num_heads=4, intermediate_size=384, vocab_size=512)
    model = build_tiny_causal_lm(arch, tok, seed=seed)
    save_pretrained_atomic(model, tok, tmp / "model")
    return tmp / "model", pairs


def run_trl(model_dir, pairs, args, tmp: Path, **overrides) -> float:
    """TRL's DPOTrainer with its defaults, except what must match and the transparency ``overrides``."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    kwargs = dict(output_dir=str(tmp / "trl"), per_device_train_batch_size=args.batch_size,
                  num_train_epochs=args.epochs, learning_rate=args.lr, beta=args.beta, max_length=args.max_len, use_cpu=True,
                  report_to="none", save_strategy="no", logging_steps=10_000, lr_scheduler_type="constant",
                  warmup_steps=0, seed=0)
    cfg = DPOConfig(**kwargs, **overrides)
    trainer = DPOTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(pairs), processing_class=tok)
    t0 = time.perf_counter()
    trainer.train()
    assert trainer.state.global_step == args.epochs * len(pairs) // args.batch_size, trainer.state.global_step
    return args.epochs * len(pairs) / (time.perf_counter() - t0)


def run_ours(model_dir, pairs, args, tmp: Path) -> float:
    import dataclasses

    import torch
    from accelerate.state import AcceleratorState

    from rlhfkit.data.pairs import tokenize_pairs
    from rlhfkit.io import JsonlLog
    from rlhfkit.models.loading import load_causal_lm, load_tokenizer
    from rlhfkit.models.sequence_logps import precompute_logps
    from rlhfkit.pair_training import train_on_pairs
    from rlhfkit.recipes import dpo
    from rlhfkit.distributed import make_accelerator

    tok = load_tokenizer(model_dir)
    model = load_causal_lm(model_dir)
    Pair = dataclasses.make_dataclass("Pair", ["prompt", "chosen", "rejected"])
    tokenized = tokenize_pairs(tok, [Pair(**p) for p in pairs], args.max_len)
    cfg = dpo.DPOConfig(batch_size=args.batch_size, epochs=float(args.epochs), lr=args.lr, beta=args.beta,
                        max_len=args.max_len, scheduler="constant", warmup_steps=0, log_every=10_000)
    # accelerate's state is process-wide: after a TRL run it still holds TRL's mixed precision (its default bf16
    # autocast), which a new Accelerator silently inherits, so ours used to run under TRL's bf16 autocast. TRL's
    # TrainingArguments resets that state before each TRL run; reset it before ours too, and build the accelerator
    # as the recipe does (fp32 on a CPU).
    AcceleratorState._reset_state(reset_partial_state=True)
    acc = make_accelerator(cfg)
    log = JsonlLog(tmp / "ours.jsonl")
    t0 = time.perf_counter()
    ref = precompute_logps(model, tokenized, tok.pad_token_id, cfg.ref_batch_size, acc.device, cfg.layout)
    m = train_on_pairs(model, tokenized, ref, dpo.dpo_pair_loss(cfg, torch.ones(len(tokenized))), cfg, acc, log,
                       tok.pad_token_id, layout=cfg.layout)
    dt = time.perf_counter() - t0
    log.close()
    assert m["train_pairs"] == args.epochs * len(pairs), m["train_pairs"]
    return m["train_pairs"] / dt


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=int, default=160, help="preference pairs (a multiple of the batch size)")
    ap.add_argument("--epochs", type=int, default=3, help="passes over the pairs (TRL's default num_train_epochs)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=192)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (the 2-core target)")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import transformers

    transformers.logging.set_verbosity_error()
    import trl

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        model_dir, pairs = build(tmp, args.pairs)
        results = {"trl": [], "trl_no_checkpointing": [], "trl_fp32_no_checkpointing": [], "ours": []}
        for r in range(args.rounds):
            results["trl"].append(run_trl(model_dir, pairs, args, tmp))
            results["ours"].append(run_ours(model_dir, pairs, args, tmp))
            results["trl_no_checkpointing"].append(run_trl(model_dir, pairs, args, tmp, gradient_checkpointing=False))
            results["trl_fp32_no_checkpointing"].append(
                run_trl(model_dir, pairs, args, tmp, gradient_checkpointing=False, bf16=False))
            print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f} pairs/s" for k, v in results.items()), file=sys.stderr)
    med = {k: statistics.median(v) for k, v in results.items()}
    print(json.dumps({
        "ratio": med["ours"] / med["trl"],
        "ratio_vs_trl_without_gradient_checkpointing": med["ours"] / med["trl_no_checkpointing"],
        "ratio_vs_trl_fp32_without_gradient_checkpointing": med["ours"] / med["trl_fp32_no_checkpointing"],
        "ours_pairs_per_s": med["ours"], "trl_pairs_per_s": med["trl"],
        "trl_no_checkpointing_pairs_per_s": med["trl_no_checkpointing"],
        "trl_fp32_no_checkpointing_pairs_per_s": med["trl_fp32_no_checkpointing"],
        "runs": results, "pairs": args.pairs, "epochs": args.epochs, "batch_size": args.batch_size, "max_len": args.max_len,
        "threads": args.threads, "trl_version": trl.__version__, "torch_version": torch.__version__,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
