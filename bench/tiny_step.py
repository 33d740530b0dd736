"""One pretraining step of the quickstart's tiny model (llama, 4 layers, hidden 128, vocab 512) on a 32 x 128
batch, three ways, arms alternated in one run: fp32 with plain causal attention, fp32 with the packed documents'
position ids (what the pretrain stage feeds), and bf16 autocast. Prints the median seconds per step of each arm,
the ratios, and the ops that take the step's CPU time (``torch.profiler``). Where the quickstart's pretraining
time goes (docs/task.md).

    OMP_NUM_THREADS=2 python bench/tiny_step.py [--repeats 5]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5, help="rounds of 5 steps per arm")
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                      intermediate_size=384, vocab_size=512, max_position_embeddings=256, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, 512, (32, 128))
    # three documents per block, as pack_documents lays them out: positions restart at each one
    packed = dict(position_ids=torch.cat([torch.arange(40), torch.arange(50), torch.arange(38)]).repeat(32, 1),
                  attention_mask=torch.ones_like(x))
    arms = {"fp32 plain": ({}, False), "fp32 packed": (packed, False), "bf16 packed": (packed, True)}

    def step(kw, bf16):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=x, labels=x, **kw).loss
        loss.backward()
        opt.step()
        opt.zero_grad()

    for kw, bf16 in arms.values():  # warm-up
        step(kw, bf16)
    times = {name: [] for name in arms}
    for _ in range(args.repeats):
        for name, (kw, bf16) in arms.items():
            t = time.perf_counter()
            for _ in range(5):
                step(kw, bf16)
            times[name].append((time.perf_counter() - t) / 5)
    med = {name: statistics.median(v) for name, v in times.items()}
    print(f"threads {torch.get_num_threads()}; median s/step over {args.repeats} rounds of 5 steps")
    for name, v in med.items():
        print(f"{name:12s} {v:.4f}  ratio to fp32 packed {med['fp32 packed'] / v:.3f}")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            step(packed, False)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=6))


if __name__ == "__main__":
    main()
