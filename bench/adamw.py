"""One AdamW step over a SmolLM2-135M-shaped set of parameters: torch's default CPU implementation (a Python
loop over parameters) against its fused kernel, which ``training.make_optimizer_and_scheduler`` uses.

    python bench/adamw.py [--threads 2] [--rounds 5]

Arms alternate within each round (default first in odd rounds); prints each round's seconds per step and the
median ratio default / fused (above 1: fused is faster). Both arms get the same parameters and gradients.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

# SmolLM2-135M: a tied 49 152 × 576 embedding, 30 layers of 4 attention (576², k/v 576 × 192) and 3 MLP (576 × 1536)
# matrices, and the norms
SHAPES = [(49152, 576)] + [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536),
                           (576,), (576,)] * 30 + [(576,)]


def step_time(fused: bool, params: list[torch.nn.Parameter], steps: int) -> float:
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, betas=(0.9, 0.95), fused=fused or None)
    opt.step()  # the first step allocates the moments: not timed
    t = time.perf_counter()
    for _ in range(steps):
        opt.step()
    return (time.perf_counter() - t) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s) * 0.02) for s in SHAPES]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    print(f"{sum(p.numel() for p in params) / 1e6:.1f}M parameters, {args.threads} threads")
    ratios = []
    for r in range(1, args.rounds + 1):
        order = (False, True) if r % 2 else (True, False)
        t = {fused: step_time(fused, params, args.steps) for fused in order}
        ratios.append(t[False] / t[True])
        print(f"round {r}: default {t[False]:.3f} s/step, fused {t[True]:.3f} s/step, ratio {ratios[-1]:.2f}")
    print(f"median ratio default / fused: {statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()
