"""Direct Nash Optimization (Rosset et al. 2024, arXiv 2404.03715), the practical Algorithm 2.

DNO optimizes against a general preference function P(y ≻ y' | x), not a scalar reward, by
iterative contrastive self-improvement. For t = 1..T:

1. sample K responses per prompt from the current policy π_t (new prompts each iteration where
   the data allow), optionally plus a reference/teacher response per prompt;
2. compare ALL pairs of a prompt's responses with the preference function and rank each response
   by its average win rate against the others (an estimate of P(y ≻ π_t));
3. keep large-margin pairs: best vs worst by default, only when their win-rate gap ≥ ``min_margin``;
4. mix in pairs from earlier iterations (``mix_fractions``);
5. train π_{t+1} from π_t with ``rlhfkit.preference_losses.dno_loss``:
   −log σ(η log(π/π_t)(y⁺) − η log(π/π_t)(y⁻)) where the reference is the PREVIOUS ITERATE π_t
   (its log-probs computed once, before the iteration's training, from the model as it stands;
   using the SFT model instead silently turns DNO into iterated DPO);
6. keep every iterate (``dno_1`` … ``dno_T``); select the best by the preference function's win
   rate against the starting policy on validation prompts held out of training.

``loss: soft`` is Algorithm 1's soft-target loss (``dno_soft_loss``) instead: every pair (y₁, y₂)
of a prompt's samples with target σ(r_t(y₁) − r_t(y₂)), r_t the win rate, and no margin filter.
"""
from __future__ import annotations

import dataclasses
import random
import shutil
import time
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Sequence

import torch

from rlhfkit.checkpoints import LoopCheckpoint, checkpoint_dir
from rlhfkit.config import check_non_negative, check_positive, coerce_enums
from rlhfkit.data.loading import DataError, iter_records, load_prompts, require
from rlhfkit.data.pairs import tokenize_pairs
from rlhfkit.distributed import refuse_sharded
from rlhfkit.engines import make_engine
from rlhfkit.generation import SamplingConfig, sample
from rlhfkit.io import atomic_write_json, atomic_write_jsonl, partial_dir, replace_dir
from rlhfkit.judges.spec import from_spec
from rlhfkit.models.loading import load_causal_lm, load_tokenizer, model_config
from rlhfkit.models.sequence_logps import precompute_logps
from rlhfkit.models.trainable import make_trainable, save_trained
from rlhfkit.pair_training import add_sft_term, train_on_pairs
from rlhfkit.paths import ConfigPath, JudgeSpec, ModelRef
from rlhfkit.preference_losses import dno_loss, dno_soft_loss
from rlhfkit.rollouts import clock
from rlhfkit.seeds import check_seeds
from rlhfkit.stage import StageContext
from rlhfkit.tasks import JUDGES as TASK_JUDGES
from rlhfkit.training import TrainConfig


def _dno_sampling() -> SamplingConfig:
    return SamplingConfig(max_new_tokens=64, temperature=0.7, batch_size=64)


class PairSelection(StrEnum):
    """Which of a prompt's compared responses become training pairs (``loss: hard``)."""

    best_worst = "best_worst"
    """one pair per prompt: the highest win rate against the lowest"""
    all = "all"
    """every pair whose win-rate gap is large enough (``min_margin``)"""


class DNOLoss(StrEnum):
    """DNO's contrastive loss."""

    hard = "hard"
    """``dno_loss`` on the selected pairs (Algorithm 2)"""
    soft = "soft"
    """``dno_soft_loss`` on every pair, with the win-rate difference as a soft target (Algorithm 1)"""


@dataclass(frozen=True)
class DNOConfig(TrainConfig):
    """Direct Nash Optimization stage (Algorithm 2)."""

    model: ModelRef = "stage:sft/model"
    """starting policy π_1"""
    prompts: ConfigPath = "stage:data/prompts.jsonl"
    """prompts (with task ``meta`` for the task judges)"""
    judge: JudgeSpec = "oracle"
    """preference function, any judge spec of ``judges.from_spec``: oracle, intransitive, bt:DIR (σ of a reward model's
    difference), pm:DIR (pairwise model), a model directory or a judge YAML; DIR a path or a stage's output
    (bt:stage:reward/rm)"""
    judge_beta: float = 10.0
    """inverse temperature of the task judges (oracle, intransitive)"""
    judge_gamma: float = 3.0
    """weight of the style cycle of the intransitive judge"""
    iterations: int = 3
    """T: number of DNO iterations (policies dno_1 … dno_T)"""
    prompts_per_iteration: int = 256
    """fresh training prompts per iteration (prompts are reused, in order, only when the file runs out)"""
    samples_per_prompt: int = 4
    """K: responses sampled per prompt from the current policy"""
    sampling: SamplingConfig = field(default_factory=_dno_sampling)
    """how the K responses are sampled"""
    reference_responses: ConfigPath = ""
    """optional {prompt, response} file: a teacher response added to each prompt's candidates"""
    pair_selection: PairSelection = PairSelection.best_worst
    """best_worst: one pair per prompt, highest vs lowest win rate; all: every pair with a large enough gap"""
    min_margin: float = 0.0
    """keep a pair only if its win-rate gap is ≥ this (and > 0: ties carry no preference)"""
    loss: DNOLoss = DNOLoss.hard
    """hard: dno_loss on filtered pairs (Algorithm 2); soft: dno_soft_loss on all pairs (Algorithm 1)"""
    eta: float = 0.1
    """η, inverse temperature of the contrastive loss"""
    sft_coef: float = 0.0
    """weight of the per-token NLL of each pair's chosen response added to the loss (0 disables): iterative
    RPO (Pang et al. 2024) found the contrastive loss alone lowers the chosen likelihood on math reasoning"""
    mix_fractions: tuple[float, ...] = (0.5,)
    """fraction of iteration t−1's, t−2's, … pairs mixed into iteration t's training set"""
    n_validation: int = 64
    """prompts (the file's first ones, never trained on) for selecting the best iterate"""
    max_len: int = 192
    """longest prompt + response in tokens"""
    ref_batch_size: int = 64
    """pairs per forward pass when computing π_t's log-probs"""
    epochs: float = 2.0
    """passes over each iteration's pairs"""
    lr: float = 1e-4
    """peak learning rate"""
    warmup_steps: int = 5
    """linear warm-up steps (per iteration)"""
    batch_size: int = 32
    """pairs per optimizer step"""
    seeds: tuple[int, ...] = ()
    """run the stage once per seed, ``seed`` replaced by each, every run a whole output in OUT/<stage>/seed_<s>/
    (its model, log.jsonl, metrics.json, dno_<t>/) and metrics.json holding each seed's metrics; eval then reports each
    policy naming this stage's output once per seed and as mean ± sd over seeds (``rlhfkit.seeds``); empty: one
    run with ``seed``"""

    def __post_init__(self):
        check_seeds(self.seeds)
        super().__post_init__()
        check_positive(eta=self.eta, iterations=self.iterations, prompts_per_iteration=self.prompts_per_iteration)
        check_non_negative(min_margin=self.min_margin, n_validation=self.n_validation)
        coerce_enums(self)
        if self.samples_per_prompt < 2 and not self.reference_responses:
            raise ValueError("samples_per_prompt must be >= 2 (or give reference_responses)")
        if any(not 0.0 <= f <= 1.0 for f in self.mix_fractions):
            raise ValueError(f"mix_fractions must lie in [0, 1], got {self.mix_fractions}")
        if self.iterations < 1:
            raise ValueError("iterations must be >= 1")


@dataclass(frozen=True)
class DNOPair:
    """One training comparison: chosen ≻ rejected; ``target`` is the soft loss's P(chosen ≻ rejected)."""

    prompt: str
    chosen: str
    rejected: str
    target: float = 1.0
    iteration: int = 0
    weight: float = 1.0


# ---------------------------------------------------------------- preference functions

def win_rate_matrix(pf, prompt: str, responses: Sequence[str], finished: Sequence[bool]) -> list[list[float]]:
    """W[i][j] = P(response i ≻ response j); an unfinished response loses to a finished one.

    Each unordered pair is asked once, W[j][i] = 1 − W[i][j] (a preference function is
    symmetric, and this halves the judge calls); W[i][i] = ½.
    """
    k = len(responses)
    w = [[0.5] * k for _ in range(k)]
    ask = [(i, j) for i in range(k) for j in range(i + 1, k) if finished[i] and finished[j]]
    probs = pf.prob([(prompt, responses[i], responses[j]) for i, j in ask]) if ask else []
    for (i, j), p in zip(ask, probs):
        w[i][j], w[j][i] = p, 1.0 - p
    for i in range(k):
        for j in range(k):
            if i != j and finished[i] != finished[j]:
                w[i][j] = 1.0 if finished[i] else 0.0
    return w


def average_win_rates(w: Sequence[Sequence[float]]) -> list[float]:
    """Each response's mean P(≻ other) over the OTHER responses of its prompt."""
    k = len(w)
    return [sum(w[i][j] for j in range(k) if j != i) / (k - 1) for i in range(k)]


def select_pairs(prompt: str, responses: Sequence[str], rates: Sequence[float], mode: str, min_margin: float,
                 iteration: int = 0) -> list[DNOPair]:
    """Large-margin pairs of one prompt from its responses' win rates.

    best_worst: (argmax, argmin) if their gap is > 0 and ≥ min_margin (first index on ties).
    all: every (i, j) with rates[i] − rates[j] > 0 and ≥ min_margin, i the winner.
    Identical texts never make a pair (they carry no preference).
    """
    if mode == "best_worst":
        best = max(range(len(rates)), key=lambda i: (rates[i], -i))
        worst = min(range(len(rates)), key=lambda i: (rates[i], i))
        candidates = [(best, worst)]
    else:
        candidates = [(i, j) for i in range(len(rates)) for j in range(len(rates)) if rates[i] > rates[j]]
    out = []
    for i, j in candidates:
        gap = rates[i] - rates[j]
        if gap > 0 and gap >= min_margin and responses[i] != responses[j]:
            out.append(DNOPair(prompt, responses[i], responses[j], 1.0, iteration))
    return out


def soft_pairs(prompt: str, responses: Sequence[str], rates: Sequence[float], iteration: int = 0) -> list[DNOPair]:
    """Algorithm 1: every unordered pair (i < j) with target σ(r_i − r_j); no filter."""
    out = []
    for i in range(len(rates)):
        for j in range(i + 1, len(rates)):
            if responses[i] != responses[j]:
                target = float(torch.sigmoid(torch.tensor(rates[i] - rates[j], dtype=torch.float64)))
                out.append(DNOPair(prompt, responses[i], responses[j], target, iteration))
    return out


def mix_pairs(current: Sequence[DNOPair], history: Sequence[Sequence[DNOPair]], fractions: Sequence[float],
              rng: random.Random) -> list[DNOPair]:
    """current + round(fractions[j−1] · |history[−j]|) pairs drawn without replacement from iteration t−j.

    ``history`` lists earlier iterations' own (unmixed) pairs, oldest first.
    """
    out = list(current)
    for j, frac in enumerate(fractions, start=1):
        if j > len(history):
            break
        past = list(history[-j])
        out.extend(rng.sample(past, round(frac * len(past))))
    return out


# ---------------------------------------------------------------- the recipe

def _prompt_slices(n_train: int, per_iter: int, iterations: int) -> list[list[int]]:
    """Indices of each iteration's prompts: consecutive fresh slices, wrapping round only when exhausted."""
    return [[(t * per_iter + i) % n_train for i in range(min(per_iter, n_train))] for t in range(iterations)]


def _greedy(engine, tok, prompts, cfg: DNOConfig, device):
    # The stage's sampler made greedy (length, batch and precision kept; given an engine, its engine field is unread).
    return sample(engine, tok, prompts, dataclasses.replace(cfg.sampling, temperature=0.0), seed=cfg.seed, device=device)


def validation_win_rate(pf, prompts, policy_samples, base_samples) -> float:
    """Mean P(policy's greedy response ≻ the starting policy's) over validation prompts (unfinished loses)."""
    wins = []
    for p, a, b in zip(prompts, policy_samples, base_samples):
        wins.append(win_rate_matrix(pf, p, [a.text, b.text], [a.finished, b.finished])[0][1])
    return sum(wins) / len(wins)


def dno_pair_loss(cfg: DNOConfig, targets: torch.Tensor):
    """The iteration's loss as a ``pair_training.PairLoss``: ``dno_loss`` (hard) or ``dno_soft_loss`` with the
    pairs' soft ``targets`` (N,), plus ``sft_coef`` × the chosen responses' per-token NLL when set."""
    def loss_fn(pc, pr, rc, rr, lengths, ix):
        if cfg.loss == "soft":
            loss, m = dno_soft_loss(pc, pr, rc, rr, targets[ix].to(pc.device), cfg.eta)
        else:
            loss, m = dno_loss(pc, pr, rc, rr, cfg.eta)
        return add_sft_term(loss, m, pc, lengths[0], cfg.sft_coef), float(len(ix)), m

    return loss_fn


def reference_logps(model, pairs, pad_id: int, batch_size: int, device) -> dict[str, torch.Tensor]:
    """π_t's log-probs of this iteration's pairs: the DNO reference is the model as it stands now."""
    return precompute_logps(model, pairs, pad_id, batch_size, device)


def run(cfg: DNOConfig, ctx: StageContext, pf=None) -> dict:
    """Run T iterations from ``cfg.model``; writes ``ctx.stage_dir/dno_t/model``, ``ctx.stage_dir/model`` (the
    selected one). ``pf``: a preference function to use instead of ``cfg.judge`` (library use).

    In a stage directory (``OUT/dno.partial``) each finished iteration is kept in ``OUT/dno.ckpt``
    (the iterate, the pair history, the mixing RNG, its ``dno_t/`` outputs) and a rerun starts after
    it; inside an iteration, training checkpoints every ``save_every`` steps as DPO does.
    """
    refuse_sharded(ctx.accelerator, "dno")  # it samples from, and copies, the policy outside its training forward
    model_path, prompts_path = ctx.model(cfg.model, "model"), ctx.resolve(cfg.prompts, key="prompts")
    out, out_dir, accelerator, log = ctx.out, ctx.stage_dir, ctx.accelerator, ctx.log
    records = load_prompts(prompts_path)
    if len(records) <= cfg.n_validation:
        raise DataError(f"{prompts_path}: {len(records)} prompts, need more than n_validation={cfg.n_validation}")
    raw = [{"prompt": r.prompt, "meta": r.meta} for r in records]
    if cfg.judge in TASK_JUDGES:
        missing = [r for r in records if r.meta is None]
        if missing:
            raise DataError(f"{missing[0].where}: judge '{cfg.judge}' needs the task field 'meta'")
    teacher: dict[str, str] = {}
    if cfg.reference_responses:
        for rec in iter_records(ctx.resolve(cfg.reference_responses, key="reference_responses")):
            require(rec, {"prompt": str, "response": str}, nonempty=("prompt", "response"))
            teacher[rec.record["prompt"]] = rec.record["response"]
    # a stage: path resolves in the run (bt:stage:reward/rm); no device: the judge's model stays where it loads, off the policy's
    pf = pf or from_spec(cfg.judge, raw, base_dir=out, beta=cfg.judge_beta, gamma=cfg.judge_gamma,
                         task_judges=TASK_JUDGES)
    val_prompts = [r.prompt for r in records[:cfg.n_validation]]
    train_prompts = [r.prompt for r in records[cfg.n_validation:]]
    tok = load_tokenizer(model_path)
    max_len = min(cfg.max_len, getattr(model_config(model_path), "max_position_embeddings", cfg.max_len))
    device = accelerator.device
    torch.manual_seed(cfg.seed)
    policy = make_trainable(load_causal_lm(model_path), cfg.lora, cfg.gradient_checkpointing).to(device)
    rng = random.Random(cfg.seed)
    engine = make_engine(cfg.sampling, policy, tok, device)  # sleeps while π_t trains, then takes its weights
    base_val = _greedy(engine, tok, val_prompts, cfg, device)
    history: list[list[DNOPair]] = []
    per_iteration: dict[str, dict] = {}
    ckpt_root = checkpoint_dir(out_dir)
    kept = ckpt_root / "outputs" if ckpt_root is not None else None  # finished iterations' dno_t/ directories
    iteration_ckpt = LoopCheckpoint(ckpt_root / "iteration" if ckpt_root is not None else None, cfg, accelerator, log,
                                    "dno", unit="iteration")
    done, extra = iteration_ckpt.resume({"policy": policy}, {})  # π_{done+1}, the RNGs, and the log as they were
    if done:
        engine.sync_weights(policy)
        history = [[DNOPair(**p) for p in earlier] for earlier in extra["history"]]
        per_iteration = extra["per_iteration"]
        version, internal, gauss = extra["mix_rng"]
        rng.setstate((version, tuple(internal), gauss))
        if accelerator.is_main_process:
            for t in range(1, done + 1):
                if (out_dir / f"dno_{t}").exists():
                    shutil.rmtree(out_dir / f"dno_{t}")
                shutil.copytree(kept / f"dno_{t}", out_dir / f"dno_{t}")
        accelerator.wait_for_everyone()
    for t, idx in enumerate(_prompt_slices(len(train_prompts), cfg.prompts_per_iteration, cfg.iterations), start=1):
        if t <= done:
            continue
        t0 = time.time()
        t_start = clock(device)
        prompts = [train_prompts[i] for i in idx]
        # 1. K samples per prompt from π_t (+ the teacher's response)
        samples = sample(engine, tok, prompts, cfg.sampling, seed=cfg.seed * 1000 + t, num_return_sequences=cfg.samples_per_prompt, device=device)
        engine.sleep()  # vllm: its GPU memory goes to the judge and to training until the new weights come
        t_generated = clock(device)
        pairs: list[DNOPair] = []
        rates_log = []
        k = cfg.samples_per_prompt
        for i, prompt in enumerate(prompts):
            group = samples[i * k:(i + 1) * k]
            texts, finished = [s.text for s in group], [s.finished for s in group]
            if prompt in teacher:
                texts.append(teacher[prompt])
                finished.append(True)
            # 2. all pairs compared, ranked by average win rate; 3. large-margin pairs
            rates = average_win_rates(win_rate_matrix(pf, prompt, texts, finished))
            rates_log.append({"prompt": prompt, "responses": texts, "finished": finished, "win_rates": rates})
            if cfg.loss == "hard":
                pairs += select_pairs(prompt, texts, rates, cfg.pair_selection, cfg.min_margin, t)
            else:
                pairs += soft_pairs(prompt, texts, rates, t)
        t_judged = clock(device)
        # 4. mix in earlier iterations' pairs
        train = mix_pairs(pairs, history, cfg.mix_fractions, rng)
        history.append(pairs)
        it_dir = out_dir / f"dno_{t}"
        if accelerator.is_main_process:
            it_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_jsonl(it_dir / "candidates.jsonl", rates_log)
            atomic_write_jsonl(it_dir / "pairs.jsonl", [p.__dict__ for p in train])
        info = {"n_prompts": len(prompts), "n_new_pairs": len(pairs), "n_train_pairs": len(train),
                "finished_rate": sum(s.finished for s in samples) / len(samples)}
        if not train:
            raise RuntimeError(f"dno iteration {t}: no pair survives the margin filter (min_margin={cfg.min_margin}): "
                               f"every prompt's responses tie; lower it, sample more, or add reference_responses")
        train_cfg = cfg
        if len(train) < cfg.batch_size and cfg.grad_accum_steps == 1:
            # Fewer pairs than one batch: train on them as one batch rather than stop the run; logged.
            print(f"[rlhfkit] dno {t}: only {len(train)} pairs, fewer than batch_size {cfg.batch_size}; one batch of {len(train)}")
            train_cfg = dataclasses.replace(cfg, batch_size=len(train))
        # 5. train from π_t against π_t's own log-probs (computed once, now)
        tokenized = tokenize_pairs(tok, train, max_len)
        t_reference = clock(device)
        ref = reference_logps(policy, tokenized, tok.pad_token_id, cfg.ref_batch_size, device)
        t_update = clock(device)
        targets = torch.tensor([p.target for p in train], dtype=torch.float32)

        train_ckpt = LoopCheckpoint(ckpt_root / f"train_{t}" if ckpt_root is not None else None, train_cfg, accelerator,
                                    log, f"dno {t}", iteration=t)
        metrics = train_on_pairs(policy, tokenized, ref, dno_pair_loss(cfg, targets), train_cfg, accelerator, log, tok.pad_token_id,
                                 progress_desc=f"dno {t}/{cfg.iterations}", step_offset=(t - 1) * cfg.total_steps(len(train)),
                                 checkpoint=train_ckpt)
        t_trained = clock(device)
        policy = accelerator.unwrap_model(policy)
        engine.sync_weights(policy)  # π_{t+1}
        if accelerator.is_main_process:
            save_trained(policy, tok, it_dir, cfg.lora)
        # 6. validation win rate of the new iterate against the starting policy
        t_validation = clock(device)
        val = validation_win_rate(pf, val_prompts, _greedy(engine, tok, val_prompts, cfg, device), base_val)
        # where the iteration's time went (this process's clock): sampling, the preference function's comparisons,
        # π_t's reference log-probs, training, and the validation (greedy samples of the new iterate, judged)
        timing = {"time_generation_s": t_generated - t_start, "time_scoring_s": t_judged - t_generated,
                  "time_reference_s": t_update - t_reference, "time_update_s": t_trained - t_update,
                  "time_validation_s": clock(device) - t_validation}
        per_iteration[f"dno_{t}"] = info | metrics | {"validation_win_rate": val, "iteration_runtime_s": time.time() - t0,
                                                      **timing}
        log.write({"iteration": t, "validation_win_rate": val, "n_train_pairs": len(train), **timing})
        print(f"[rlhfkit] dno {t}: {len(pairs)} new pairs, validation win rate vs start {val:.3f}; "
              + ", ".join(f"{k[5:-2]} {v:.1f}s" for k, v in timing.items()))
        if iteration_ckpt.enabled:  # keep the finished iteration: its outputs first, then the state that points past it
            if accelerator.is_main_process:
                tmp = partial_dir(kept / f"dno_{t}")
                if tmp.exists():
                    shutil.rmtree(tmp)
                shutil.copytree(it_dir, tmp)
                replace_dir(tmp, kept / f"dno_{t}")
            iteration_ckpt.save(t, {"policy": policy}, {}, {
                "history": [[p.__dict__ for p in earlier] for earlier in history], "per_iteration": per_iteration,
                "mix_rng": rng.getstate()})
            train_ckpt.remove()
    engine.close()
    best = max(per_iteration, key=lambda name: (per_iteration[name]["validation_win_rate"], name))
    if accelerator.is_main_process:
        if (out_dir / "model").exists():
            shutil.rmtree(out_dir / "model")
        shutil.copytree(out_dir / best / "model", out_dir / "model")
        atomic_write_json(out_dir / "selected.json", {"best": best, "judge": cfg.judge,
                                                      "validation_win_rate": {k: v["validation_win_rate"] for k, v in per_iteration.items()}})
    return {"iterations": per_iteration, "selected": best, "judge": cfg.judge,
            "skipped_nonfinite_steps": sum(m["skipped_nonfinite_steps"] for m in per_iteration.values())}
