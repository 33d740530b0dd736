"""The peer on the same work: TRL's DPO and GRPO trained from a finished run's own SFT policy and data, judged
by the same eval as ours, so that "our figure equals the peer's on the same work" stays checked.

    make bench-peer OUT=runs/quickstart   # = pip install -e '.[bench]', then:
    python bench/peer_quickstart.py RUN [--work DIR] [--threads 2] [--grpo-steps N] [--grpo-prompts N]

RUN is a completed rlhfkit run with the stages data, sft, label and dpo (a quickstart run). It is only read.
TRL is imported here only, never in src/. How to read the output: docs/benchmarks.md.

Four policies, all from RUN/sft/model, then one eval:

- **dpo (ours)**: RUN/dpo/model, what the run's dpo stage trained (not retrained here).
- **dpo (TRL)**: ``trl.DPOTrainer`` on the pairs that stage trained on (its ``data``, or the label stage's
  pairs/rankings, through ``recipes.dpo.select_ranking_pairs`` with its ``from_rankings``) with its settings
  (RUN/dpo/config.yaml): β, learning rate and schedule, warm-up, optimizer steps (TRL: ``max_steps`` = ours'
  ``total_steps``, ``dataloader_drop_last`` as ours drops an epoch's incomplete batch), batch, gradient clip,
  AdamW β₂ = 0.95 (ours; TRL's default is 0.999), ``max_len``, reference log-probs precomputed once, fp32, no
  gradient checkpointing, seed. Ours' ``sft_coef`` (RPO) is TRL's ``loss_type=["sigmoid", "sft"]``,
  ``loss_weights=[1, sft_coef]``: the same chosen-response NLL at the same weight, but ours averages each
  response's per-token NLL and then over responses (Pang et al. 2024, eq. 1) while TRL's ``sft`` term is the
  mean over every chosen token of the batch, so a long response weighs more there (the only difference left in
  the loss; TRL has no option for ours). Settings TRL cannot express (label smoothing, R-DPO, pair weights that
  differ, LoRA) are refused, not approximated.
- **grpo (ours)**: ``rlhfkit run`` with stages [grpo, eval] in WORK/run, which links RUN's data, sft and dpo
  stages. The GRPO settings are configs/rl_comparison.yaml's ``grpo`` section (16 prompts x 4 samples a step,
  30 steps, 2 epochs of 2 minibatches of 32 per rollout, lr 1e-4 constant, β = 0.5 with k3 in the loss, clip
  0.2, 64 new tokens at temperature 1), with the task oracle's gold score as the reward (``reward_source:
  judge``; a response that never ends scores ``unfinished_score``, -1), ``score_whiten`` and
  ``whiten_advantages`` off (TRL has neither: the group normalisation alone, ``scale_rewards="group"``) and
  ``heldout`` empty (no held-out KL pass).
- **grpo (TRL)**: ``trl.GRPOTrainer`` with the same settings, written as TRL's: ``num_generations`` = group
  size, ``per_device_train_batch_size`` = minibatch, ``steps_per_generation`` = rollout / minibatch,
  ``num_iterations`` = ``ppo_epochs``, ``max_steps`` = optimizer steps, ``beta`` = ``kl_coef`` (TRL's KL is k3
  in the loss too; ``use_bias_correction_kl=False``, as ours weighs it by nothing), ``epsilon`` = ``clip_eps``,
  ``loss_type="dapo"`` (a token mean: ours' ``token_mean``; TRL divides by the rollout's tokens per minibatch
  on average, ours by the minibatch's own), ``disable_dropout=True``, ``mask_truncated_completions=False``,
  AdamW β₂ 0.95. Its reward function is the same oracle object ours builds (``judges.from_spec("oracle",
  prompts with meta)``, gold score), with ``unfinished_score`` where the completion has no EOS.

Evaluation: one eval stage (the run's eval settings: greedy on RUN/data/heldout.jsonl, the oracle, win rate
vs SFT with a 95% CI over prompts) over sft, the two DPO and the two GRPO policies. The table gives, per
method and metric, ours, the peer's, the difference, whether the two 95% CIs overlap, and the head-to-head
rate (ours' response preferred by the oracle's gold score over the peer's on the same prompt, ties ½; 0.5 =
no difference) with its CI. One seed: a run-to-run spread of a few points is expected on either side.

Each trainer runs in its own process (this script with ``--arm``). The last line printed is one JSON object
with every figure.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

ROOT = Path(__file__).resolve().parents[1]
ADAM_BETAS = (0.9, 0.95)  # ours (training.make_optimizer_and_scheduler); TRL's default β₂ is 0.999
METRICS = ("win_rate_vs_sft", "gold_score", "accuracy")
LINKED = ("data", "sft", "dpo")  # RUN's stages the new run reads


# ------------------------------------------------------------------------------------------- settings

def dpo_settings(run: Path):
    """The DPO stage's config as it ran (RUN/dpo/config.yaml) and the pairs file it read."""
    from rlhfkit.config import load_config
    from rlhfkit.paths import run_path
    from rlhfkit.recipes.dpo import DPOConfig

    cfg = load_config(DPOConfig, run / "dpo" / "config.yaml")
    if cfg.data:
        data = run_path(run, cfg.data)
    else:  # recipes.dpo.run's default: the label stage's pairs, else its rankings (the oracle writes rankings only)
        data = run / "label" / "pairs.jsonl"
        data = data if data.exists() else run / "label" / "rankings.jsonl"
    return cfg, data


def grpo_settings(source: Path, steps: int, prompts: int, group: int, max_new_tokens: int):
    """The GRPO section both arms train with: ``source``'s ``grpo`` section (configs/rl_comparison.yaml), the
    oracle as reward, no score whitening, no advantage std scaling, no held-out pass, one seed (the section's
    ``seed``; its ``seeds`` list, 3 seeds since issue 21, dropped: TRL's arm is one seed too); budgets overridable."""
    from rlhfkit.pipeline import load_pipeline_config

    g = load_pipeline_config(source).grpo
    budget = {k: v for k, v in (("total_steps", steps), ("prompts_per_step", prompts), ("group_size", group)) if v}
    sampling = dataclasses.replace(g.sampling, max_new_tokens=max_new_tokens) if max_new_tokens else g.sampling
    g = dataclasses.replace(g, reward_source="judge", score_whiten=False, whiten_advantages=False, heldout="",
                            save_every=0, sampling=sampling, seeds=(), **budget)
    if g.batch_size % g.minibatch:  # a reduced budget: keep the rollout / minibatch ratio an integer
        g = dataclasses.replace(g, minibatch_size=g.batch_size)
    return g


# ------------------------------------------------------------------------------------------- TRL arms (child)

def trl_common(cfg, out: Path, steps: int, batch: int, accum: int) -> dict:
    """TrainingArguments both TRL arms share, from one of our configs (TrainConfig or PPOConfig fields)."""
    sched = {"constant": "constant_with_warmup"}.get(str(cfg.scheduler.value), str(cfg.scheduler.value))
    return dict(output_dir=str(out / "trainer"), max_steps=steps, per_device_train_batch_size=batch,
                gradient_accumulation_steps=accum, learning_rate=cfg.lr, lr_scheduler_type=sched,
                warmup_steps=min(cfg.warmup_steps, steps), weight_decay=cfg.weight_decay, max_grad_norm=cfg.grad_clip,
                adam_beta1=ADAM_BETAS[0], adam_beta2=ADAM_BETAS[1], optim="adamw_torch_fused", seed=cfg.seed,
                bf16=False, fp16=False, gradient_checkpointing=False, report_to="none", save_strategy="no",
                logging_steps=1, disable_tqdm=True, dataloader_pin_memory=False)


def refuse(what: str) -> None:
    raise SystemExit(f"peer_quickstart: the run's {what}; TRL has no matching setting, so no peer figure")


def run_trl_dpo(run: Path, out: Path) -> dict:
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    from rlhfkit.data.chat import render_prompt
    from rlhfkit.data.pairs import tokenize_pairs
    from rlhfkit.data.preferences import load_pairs
    from rlhfkit.models.loading import load_tokenizer, save_pretrained_atomic
    from rlhfkit.preference_losses import DPOLossType
    from rlhfkit.recipes.dpo import select_ranking_pairs

    cfg, data = dpo_settings(run)
    if cfg.label_smoothing or cfg.length_alpha:
        refuse("dpo uses label_smoothing or length_alpha (TRL 1.16's sigmoid loss has neither)")
    if cfg.loss_type is DPOLossType.ipo and not cfg.ipo_average_logps:
        refuse("dpo runs IPO on summed log-probs (TRL's ipo averages them per token)")
    if cfg.lora.enabled:
        refuse("dpo trains LoRA adapters")
    pairs = select_ranking_pairs(load_pairs(data, cfg.max_unusable_share), cfg.from_rankings)
    if len({p.weight for p in pairs}) > 1:
        refuse("dpo pairs carry different weights (TRL weighs every pair alike)")
    sft = run / "sft" / "model"
    tok = load_tokenizer(sft)
    # Plain text (our one renderer's output; TRL then adds EOS to each response and tokenizes without special
    # tokens, as data.pairs does): the same token ids on both sides.
    dataset = Dataset.from_list([{"prompt": render_prompt(tok, p.prompt), "chosen": p.chosen, "rejected": p.rejected}
                                 for p in pairs])
    steps = cfg.total_steps(len(pairs))
    losses, weights = [cfg.loss_type.value], [1.0]
    if cfg.sft_coef:  # ours: loss + sft_coef · mean_b(NLL_b / |y_b|); TRL: + w · (Σ NLL / Σ |y|) (module docstring)
        losses, weights = losses + ["sft"], weights + [cfg.sft_coef]
    args = trl.DPOConfig(**trl_common(cfg, out, steps, cfg.batch_size // cfg.grad_accum_steps, cfg.grad_accum_steps),
                         dataloader_drop_last=True, beta=cfg.beta, loss_type=losses, loss_weights=weights,
                         max_length=cfg.max_len, precompute_ref_log_probs=True,
                         precompute_ref_batch_size=cfg.ref_batch_size, disable_dropout=True)
    torch.manual_seed(cfg.seed)
    model = AutoModelForCausalLM.from_pretrained(str(sft), dtype=torch.float32)
    trainer = trl.DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tok)
    # Both sides train on the same token ids: TRL's tokenized pairs against data.pairs.tokenize_pairs (ours').
    max_len = min(cfg.max_len, getattr(model.config, "max_position_embeddings", cfg.max_len))
    ours = tokenize_pairs(tok, pairs, max_len, cfg.truncation)
    same_ids = sum(all(getattr(o, k) == row[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids"))
                   for o, row in zip(ours, trainer.train_dataset))
    t = time.time()
    trainer.train()
    save_pretrained_atomic(trainer.model, tok, out / "model")
    logs = [x for x in trainer.state.log_history if "loss" in x]
    return {"arm": "trl_dpo", "trl": trl.__version__, "optimizer_steps": trainer.state.global_step,
            "expected_steps": steps, "n_pairs": len(pairs), "pairs_with_identical_token_ids": same_ids,
            "loss_type": losses, "loss_weights": weights,
            "final_reward_accuracy": logs[-1].get("rewards/accuracies"), "train_s": time.time() - t,
            "mixed_precision": str(trainer.accelerator.mixed_precision)}


def run_trl_grpo(run: Path, out: Path, cfg) -> dict:
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    from rlhfkit.data.chat import render_prompt
    from rlhfkit.data.loading import load_prompts
    from rlhfkit.judges.spec import from_spec
    from rlhfkit.models.loading import load_tokenizer, save_pretrained_atomic
    from rlhfkit.tasks import JUDGES

    records = load_prompts(run / "data" / "prompts.jsonl")
    # The object ours scores with (scoring.make_scorer, reward_source judge): the oracle's gold score.
    oracle = from_spec("oracle", [{"prompt": r.prompt, "meta": r.meta} for r in records if r.meta is not None],
                       task_judges=JUDGES)
    sft = run / "sft" / "model"
    tok = load_tokenizer(sft)
    rewards_by_rollout: list[float] = []

    def oracle_reward(prompts, completions, completion_ids, **kwargs) -> list[float]:
        # TRL cuts completions after the first EOS and keeps it: no EOS at the end means it never ended.
        r = [oracle.score(p, c).score if ids and ids[-1] == tok.eos_token_id else cfg.unfinished_score
             for p, c, ids in zip(prompts, completions, completion_ids)]
        rewards_by_rollout.append(sum(r) / len(r))
        return r

    unmatched = {"loss_aggregation is not token_mean": cfg.loss_aggregation.value != "token_mean",
                 "KL is not k3 in the loss": not cfg.kl_uses_loss or cfg.estimator != "k3",
                 "KL coefficient is adaptive": cfg.adaptive_kl, "rollout_is_cap is on": cfg.rollout_is_cap > 0,
                 "grad_accum_steps is not 1": cfg.grad_accum_steps != 1, "LoRA is on": cfg.lora.enabled,
                 "entropy_coef is not 0": cfg.entropy_coef != 0, "a cost model constrains it": bool(cfg.cost_model),
                 "scores are length-adjusted or clipped":
                     bool(cfg.reward_length_penalty or cfg.reward_length_bias or cfg.score_clip)}
    for what, bad in unmatched.items():
        if bad:
            refuse(f"grpo {what}")
    rollout, mb = cfg.batch_size, cfg.minibatch
    steps = cfg.optimizer_steps
    args = trl.GRPOConfig(**trl_common(cfg, out, steps, mb, 1),
                          num_generations=cfg.group_size, steps_per_generation=rollout // mb,
                          num_iterations=cfg.ppo_epochs, max_completion_length=cfg.sampling.max_new_tokens,
                          temperature=cfg.sampling.temperature, top_p=cfg.sampling.top_p, top_k=0,
                          beta=cfg.kl_coef, use_bias_correction_kl=False, epsilon=cfg.clip_eps, loss_type="dapo",
                          scale_rewards="group" if cfg.scale_advantages else "none", disable_dropout=True,
                          mask_truncated_completions=False)
    torch.manual_seed(cfg.seed)
    model = AutoModelForCausalLM.from_pretrained(str(sft), dtype=torch.float32)
    dataset = Dataset.from_list([{"prompt": render_prompt(tok, r.prompt)} for r in records])
    trainer = trl.GRPOTrainer(model=model, reward_funcs=[oracle_reward], args=args, train_dataset=dataset,
                              processing_class=tok)
    t = time.time()
    trainer.train()
    save_pretrained_atomic(trainer.model, tok, out / "model")
    return {"arm": "trl_grpo", "trl": trl.__version__, "optimizer_steps": trainer.state.global_step,
            "expected_steps": steps, "rollouts": len(rewards_by_rollout), "expected_rollouts": cfg.total_steps,
            "train_reward": rewards_by_rollout, "train_s": time.time() - t,
            "mixed_precision": str(trainer.accelerator.mixed_precision)}


def arm_main(a) -> None:
    import torch

    torch.set_num_threads(a.threads)
    import warnings

    warnings.filterwarnings("ignore")
    import transformers

    transformers.logging.set_verbosity_error()
    out = Path(a.work) / a.arm
    if a.arm == "trl_dpo":
        res = run_trl_dpo(Path(a.run), out)
    else:
        from rlhfkit.config import load_config
        from rlhfkit.pipeline import GRPOConfig

        res = run_trl_grpo(Path(a.run), out, load_config(GRPOConfig, Path(a.work) / "grpo.yaml"))
    if res["optimizer_steps"] != res["expected_steps"]:
        raise SystemExit(f"{a.arm}: {res['optimizer_steps']} optimizer steps, expected {res['expected_steps']}")
    if res.get("rollouts", 0) != res.get("expected_rollouts", 0):
        raise SystemExit(f"{a.arm}: {res['rollouts']} rollouts, expected {res['expected_rollouts']}")
    print(json.dumps(res))


# ------------------------------------------------------------------------------------------- the bench (parent)

def child_env(threads: int) -> dict:
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])),
                OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TQDM_DISABLE="1")


def call(cmd: list[str], threads: int, log: Path) -> str:
    with open(log, "a") as err:
        err.write(f"\n$ {' '.join(cmd)}\n")
        err.flush()
        p = subprocess.run(cmd, env=child_env(threads), stdout=subprocess.PIPE, stderr=err, text=True, cwd=str(ROOT))
    if p.returncode:
        tail = log.read_text().splitlines()[-40:]
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed ({p.returncode}); end of {log}:\n" + "\n".join(tail))
    return p.stdout


def write_pipeline(work: Path, run: Path, g) -> Path:
    """WORK/run links RUN's data, sft and dpo stages; WORK/pipeline.yaml runs [grpo, eval] there, the eval with
    the run's own eval settings over the five policies."""
    import yaml

    from rlhfkit.config import load_config, to_dict
    from rlhfkit.recipes.evaluate import EvalConfig

    out = work / "run"
    out.mkdir(parents=True, exist_ok=True)
    for stage in LINKED:
        if not (out / stage).exists():
            (out / stage).symlink_to((run / stage).resolve(), target_is_directory=True)
    ev = to_dict(load_config(EvalConfig, run / "eval" / "config.yaml")) if (run / "eval" / "config.yaml").exists() \
        else to_dict(EvalConfig())
    ev.update(reference="sft", policies={
        "sft": "stage:sft/model", "dpo": "stage:dpo/model", "dpo_trl": str(work / "trl_dpo" / "model"),
        "grpo": "stage:grpo/model", "grpo_trl": str(work / "trl_grpo" / "model")})
    path = work / "pipeline.yaml"
    path.write_text(yaml.safe_dump({"out": str(out), "stages": ["grpo", "eval"], "grpo": to_dict(g), "eval": ev},
                                   sort_keys=False))
    return path


def eval_rows(samples: Path) -> dict[str, list[dict]]:
    """The eval stage's samples.jsonl by policy, each list in prompt order."""
    rows: dict[str, list[dict]] = {}
    for line in samples.read_text().splitlines():
        r = json.loads(line)
        rows.setdefault(r["policy"], []).append(r)
    return rows


def head_to_head(a: list[dict], b: list[dict], seed: int) -> dict:
    """The oracle's verdict on a's response against b's, prompt by prompt (gold scores as judged, an
    unfinished response at the eval's unfinished_score): 1, ½ on a tie, 0; mean and 95% CI."""
    from rlhfkit.stats import mean_ci

    assert [x["prompt"] for x in a] == [x["prompt"] for x in b]
    return mean_ci([1.0 if x["score"] > y["score"] else 0.5 if x["score"] == y["score"] else 0.0
                    for x, y in zip(a, b)], seed)


def changed_share(a: list[dict], sft: list[dict]) -> float:
    """The share of held-out prompts whose greedy response differs from the SFT policy's: did training move it."""
    return sum(x["response"] != y["response"] for x, y in zip(a, sft)) / len(sft)


def overlap(x: dict, y: dict) -> bool:
    return x["ci95"][0] <= y["ci95"][1] and y["ci95"][0] <= x["ci95"][1]


def fmt(m: dict) -> str:
    return f"{m['mean']:.3f} [{m['ci95'][0]:.3f}, {m['ci95'][1]:.3f}]"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", nargs="?", default="", help="a completed rlhfkit run (stages data, sft, label, dpo)")
    ap.add_argument("--work", default="", help="a new working directory (default: a new temporary one, kept)")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")),
                    help="torch threads in every process")
    ap.add_argument("--grpo-config", default=str(ROOT / "configs" / "rl_comparison.yaml"),
                    help="pipeline YAML whose grpo section both GRPO arms train with")
    ap.add_argument("--grpo-steps", type=int, default=0, help="override total_steps (reduced budgets)")
    ap.add_argument("--grpo-prompts", type=int, default=0, help="override prompts_per_step")
    ap.add_argument("--group-size", type=int, default=0, help="override group_size")
    ap.add_argument("--max-new-tokens", type=int, default=0, help="override the GRPO rollouts' sampling.max_new_tokens")
    ap.add_argument("--arm", default="", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.arm:
        arm_main(a)
        return 0
    if not a.run:
        ap.error("the run directory is required")
    sys.path.insert(0, str(ROOT / "src"))
    t_start = time.time()
    run = Path(a.run).resolve()
    missing = [p for p in ("data/prompts.jsonl", "data/heldout.jsonl", "sft/model", "dpo/model", "dpo/config.yaml")
               if not (run / p).exists()]
    if missing:
        raise SystemExit(f"{run}: not a finished run with stages data, sft, label and dpo (missing {', '.join(missing)})")
    work = Path(a.work).resolve() if a.work else Path(tempfile.mkdtemp(prefix="bench-peer-"))
    if (work / "run").exists():  # its complete stages would be skipped: an eval of models trained before
        raise SystemExit(f"{work} holds a bench's run already; give a new --work")
    work.mkdir(parents=True, exist_ok=True)
    log = work / "arms.log"
    g = grpo_settings(Path(a.grpo_config), a.grpo_steps, a.grpo_prompts, a.group_size, a.max_new_tokens)
    import yaml

    from rlhfkit.config import to_dict

    (work / "grpo.yaml").write_text(yaml.safe_dump(to_dict(g), sort_keys=False))  # the TRL arm's copy
    pipeline = write_pipeline(work, run, g)
    print(f"# run {run}; work {work}; arms' stderr {log}", flush=True)

    arms = {}
    for arm in ("trl_dpo", "trl_grpo"):
        t = time.time()
        arms[arm] = json.loads(call([sys.executable, __file__, f"--arm={arm}", str(run), f"--work={work}",
                                     f"--threads={a.threads}"], a.threads, log).strip().splitlines()[-1])
        print(f"{arm}: {arms[arm]['optimizer_steps']} optimizer steps in {time.time() - t:.0f} s", flush=True)
    t = time.time()
    call([sys.executable, "-m", "rlhfkit", "run", str(pipeline)], a.threads, log)
    print(f"rlhfkit grpo + eval: {time.time() - t:.0f} s", flush=True)

    out = work / "run"
    ev = json.loads((out / "eval" / "metrics.json").read_text())["policies"]
    ours_log = [json.loads(x) for x in (out / "grpo" / "log.jsonl").read_text().splitlines()]
    ours_reward = [x["reward"] for x in ours_log if "reward" in x]
    seed = yaml.safe_load(pipeline.read_text())["eval"]["seed"]
    samples = eval_rows(out / "eval" / "samples.jsonl")
    figures, rows = {}, []
    for method in ("dpo", "grpo"):
        h2h = head_to_head(samples[method], samples[f"{method}_trl"], seed)
        figures[method] = {"head_to_head_ours_vs_peer": h2h,
                           "changed_vs_sft": {"ours": changed_share(samples[method], samples["sft"]),
                                              "peer": changed_share(samples[f"{method}_trl"], samples["sft"])}}
        for metric in METRICS:
            o, p = ev[method][metric], ev[f"{method}_trl"][metric]
            figures[method][metric] = {"ours": o, "peer": p, "difference": o["mean"] - p["mean"], "ci_overlap": overlap(o, p)}
            rows.append((method, metric, o, p, h2h if metric == METRICS[0] else None))

    sft = ev["sft"]
    print(f"\nSFT policy: gold score {fmt(sft['gold_score'])}, accuracy {fmt(sft['accuracy'])} "
          f"({sft['gold_score']['n']} held-out prompts, greedy); ours = rlhfkit, peer = TRL {arms['trl_dpo']['trl']}")
    head = (f"{'method':7s} {'metric':16s} {'ours [95% CI]':24s} {'peer [95% CI]':24s} {'diff':>7s} {'CIs overlap':12s}"
            f" ours vs peer head-to-head")
    print(head + "\n" + "-" * len(head))
    for method, metric, o, p, h2h in rows:
        print(f"{method:7s} {metric:16s} {fmt(o):24s} {fmt(p):24s} {o['mean'] - p['mean']:+7.3f} "
              f"{'yes' if overlap(o, p) else 'NO':12s} {fmt(h2h) if h2h else ''}")

    def first_last(xs):
        k = max(1, min(5, len(xs) // 2))
        return f"{sum(xs[:k]) / len(xs[:k]):.3f} -> {sum(xs[-k:]) / len(xs[-k:]):.3f}"

    tr, d = arms["trl_grpo"]["train_reward"], arms["trl_dpo"]
    print("\ngreedy held-out responses that differ from SFT's: " + ", ".join(
        f"{m} ours {figures[m]['changed_vs_sft']['ours']:.0%} peer {figures[m]['changed_vs_sft']['peer']:.0%}"
        for m in ("dpo", "grpo")))
    print(f"GRPO training reward (oracle gold score, unfinished {g.unfinished_score}), first -> last rollouts "
          f"(mean of {max(1, min(5, len(tr) // 2))}): ours {first_last(ours_reward)}, TRL {first_last(tr)}")
    print(f"TRL DPO: {d['n_pairs']} pairs ({d['pairs_with_identical_token_ids']} with token ids identical to ours), "
          f"{d['optimizer_steps']} steps, loss {d['loss_type']} x {d['loss_weights']}, final reward accuracy "
          f"{d['final_reward_accuracy']}")
    print(f"wall time {time.time() - t_start:.0f} s; models and eval samples in {work}")
    print(json.dumps({"figures": figures, "sft": {m: sft[m] for m in METRICS[1:]}, "run": str(run),
                      "grpo": {k: v for k, v in to_dict(g).items() if k in (
                          "total_steps", "prompts_per_step", "group_size", "ppo_epochs", "minibatch_size", "lr",
                          "kl_coef", "clip_eps", "unfinished_score", "sampling")},
                      "train_reward": {"ours": ours_reward, "peer": tr},
                      "arms": {k: {x: y for x, y in v.items() if x != "train_reward"} for k, v in arms.items()},
                      "threads": a.threads, "wall_s": time.time() - t_start}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
