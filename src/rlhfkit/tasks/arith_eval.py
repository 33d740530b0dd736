"""Reward models measured on the embedded task, against its answer key.

- :func:`judge_agreement`: how often a reward model orders a held-out pair as the noiseless
  judge does (pairs whose gold scores tie are skipped), beside how often the noisy label does.
- :func:`rerank`: best-of-N on held-out prompts. The policy samples N responses per prompt; each
  method picks one (PRM: the min, or the product, of its step probabilities; ORM; RM; majority
  vote over the final answers of the finished samples; ``single``: the first sample), and the
  figure is the share of prompts whose pick is right (correct and finished), with a 95% CI.
  ``oracle_best_of_n`` is the share where any sample is right: the ceiling of every method.

The reward stage calls both after training (its metrics ``models.rm.judge_agreement`` and
``reranking``); they live with the task because they grade with its answer key. ``rerank`` is its pieces
in a row (prompts, samples, each model's scores, the picks), which the strength grid (``recipes.strength``)
composes otherwise: each policy samples once and the reward models of two runs score its samples.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from rlhfkit.data.loading import DataError, iter_records, load_prompts
from rlhfkit.generation import SamplingConfig, sample
from rlhfkit.io import atomic_write_jsonl
from rlhfkit.models.loading import load_causal_lm, load_tokenizer
from rlhfkit.paths import ConfigPath, ModelRef
from rlhfkit.stage import StageContext
from rlhfkit.stats import mean_ci
from rlhfkit.tasks.arith import Problem
from rlhfkit.tasks.arith_judge import judge


@dataclass(frozen=True)
class RerankConfig:
    """Best-of-N reranking evaluation on the embedded task's held-out prompts."""

    enabled: bool = True
    """run it (needs task prompts with ``meta`` and the trained PRM/ORM/RM)"""
    policy: ModelRef = "stage:sft/model"
    """the policy whose samples are reranked"""
    data: ConfigPath = "stage:data/heldout.jsonl"
    """held-out prompts with task ``meta``"""
    n: int = 16
    """samples per prompt (best-of-N)"""
    n_prompts: int = 200
    """held-out prompts used (the first ones of the file)"""
    temperature: float = 0.7
    """sampling temperature (as the label stage samples)"""
    max_new_tokens: int = 64
    """longest sampled response"""
    seed: int = 1
    """sampling seed"""
    bf16: bool = False
    """sample under bf16 autocast (``SamplingConfig.bf16``)"""


def task_metas(paths: Sequence[str | Path]) -> dict[str, dict]:
    """Task ``meta`` by prompt text, from labelled data files (label records carry ``meta``); a later
    file's entry wins. Empty paths are skipped."""
    metas = {}
    for path in paths:
        if not path:
            continue
        for rec in iter_records(path):
            meta = rec.record.get("meta")
            if isinstance(meta, dict) and "prompt" in rec.record:
                metas[rec.record["prompt"]] = meta
    return metas


def judge_agreement(pairs, chosen: list[float], rejected: list[float], metas: dict[str, dict]) -> dict:
    """How often the model orders a pair as the noiseless judge does (pairs with equal gold scores skipped).

    ``pairs``: objects with ``prompt``, ``chosen``, ``rejected``; ``chosen``/``rejected``: the model's
    scores of each pair's two responses; ``metas``: the answer key by prompt (pairs without one are
    skipped). ``model_vs_judge``: the share where r_chosen > r_rejected agrees with the gold order;
    ``labels_vs_judge``: the share where the (noisy) label itself prefers the gold winner.
    """
    agree, noisy_agree = [], []
    for p, c, r in zip(pairs, chosen, rejected):
        meta = metas.get(p.prompt)
        if meta is None:
            continue
        prob = Problem.from_meta(meta)
        gc, gr = judge(prob, p.chosen).score, judge(prob, p.rejected).score
        if gc == gr:
            continue
        agree.append(float((c > r) == (gc > gr)))
        noisy_agree.append(float(gc > gr))  # how often the noisy label itself matches the judge
    return {"model_vs_judge": mean_ci(agree), "labels_vs_judge": mean_ci(noisy_agree)}


def rerank(rc: RerankConfig, ctx: StageContext, models: dict) -> dict:
    """Best-of-N on held-out prompts: gold accuracy of the response each method picks, with 95% CIs.

    ``models``: the trained ``prm``, ``orm`` and ``rm`` that are present (``RewardModel``s); the
    per-prompt correctness of every sample goes to ``ctx.stage_dir/rerank_samples.jsonl``.
    """
    records = rerank_prompts(rc, ctx)
    samples = best_of_n_samples(rc, ctx.model(rc.policy, "rerank.policy"), records, ctx.accelerator.device)
    result, rows = rerank_picks(records, samples, rerank_scores(models, samples), rc.n)
    if ctx.accelerator.is_main_process:
        atomic_write_jsonl(ctx.stage_dir / "rerank_samples.jsonl", rows)
    return result


def rerank_prompts(rc: RerankConfig, ctx: StageContext) -> list:
    """The first ``rc.n_prompts`` prompts of ``rc.data``; each must carry the task ``meta`` (the answer key)."""
    records = load_prompts(ctx.resolve(rc.data, key="rerank.data"))[: rc.n_prompts]
    for r in records:
        if r.meta is None:
            raise DataError(f"{r.where}: reranking with the task judge needs the field 'meta'")
    return records


def best_of_n_samples(rc: RerankConfig, policy: Path, records: Sequence, device) -> list:
    """``rc.n`` samples of each record's prompt from the policy directory ``policy``, prompt by prompt
    (``generation.Sample``: sample j of prompt i at index i·n + j)."""
    tok = load_tokenizer(policy)
    lm = load_causal_lm(policy).to(device)
    sc = SamplingConfig(max_new_tokens=rc.max_new_tokens, temperature=rc.temperature, batch_size=max(1, 256 // rc.n),
                        bf16=rc.bf16)
    return sample(lm, tok, [r.prompt for r in records], sc, seed=rc.seed, num_return_sequences=rc.n, device=device)


def rerank_scores(models: dict, samples: Sequence) -> dict[str, list[float]]:
    """Each model's score of every sample: ``prm`` (the min of its step probabilities) and ``prm_product``
    (their product) from a PRM, ``orm`` and ``rm`` from those models; the models absent are skipped."""
    flat_p, flat_r = [s.prompt for s in samples], [s.text for s in samples]
    scores: dict[str, list[float]] = {}
    if "prm" in models:
        steps = models["prm"].step_scores(flat_p, flat_r)
        scores["prm"] = [min(s) if s else 0.0 for s in steps]
        # a float32 product, as the PRM's probabilities come out of the model
        scores["prm_product"] = [float(torch.tensor(s).prod()) if s else 0.0 for s in steps]
    if "orm" in models:
        scores["orm"] = models["orm"].score(flat_p, flat_r)
    if "rm" in models:
        scores["rm"] = models["rm"].score(flat_p, flat_r)
    return scores


def rerank_picks(records: Sequence, samples: Sequence, scores: dict[str, list[float]], n: int) -> tuple[dict, list[dict]]:
    """The accuracy (mean [95% CI] over prompts) of the sample each method picks from a prompt's ``n``:
    the highest score of each of ``scores`` (ties: the first sample), majority vote, ``single`` (the first
    sample), and ``oracle_best_of_n`` (any sample right); with the per-prompt rows (each sample's correctness)."""
    picks: dict[str, list[float]] = {m: [] for m in [*scores, "majority", "single"]}
    rows = []
    for i, rec in enumerate(records):
        prob = Problem.from_meta(rec.meta)
        group = samples[i * n:(i + 1) * n]
        verdicts = [judge(prob, s.text) for s in group]
        ok = [float(v.correct and s.finished) for v, s in zip(verdicts, group)]
        for m, vals in scores.items():
            v = vals[i * n:(i + 1) * n]
            picks[m].append(ok[max(range(n), key=lambda j: (v[j], -j))])  # ties: the first sample
        # An unfinished sample's last line may be a cut-off number: it gets no vote.
        answers = [v.final_answer if s.finished else None for v, s in zip(verdicts, group)]
        picks["majority"].append(_majority_pick(answers, ok))
        picks["single"].append(ok[0])
        rows.append({"prompt": rec.prompt, "correct": ok, "any_correct": max(ok)})
    result = {m: {"accuracy": mean_ci(v)} for m, v in picks.items()}
    result["oracle_best_of_n"] = {"accuracy": mean_ci([r["any_correct"] for r in rows])}
    result["n"], result["n_prompts"] = n, len(records)
    return result, rows


def _majority_pick(answers: list[str | None], ok: list[float]) -> float:
    """Majority vote: the correctness of the first sample giving the most frequent final answer
    (ties: the answer seen first); 0 when no sample gave one."""
    counts: dict[str, int] = {}
    for a in answers:
        if a is not None:
            counts[a] = counts.get(a, 0) + 1
    if not counts:
        return 0.0
    best = max(counts, key=lambda a: (counts[a], -answers.index(a)))
    return ok[answers.index(best)]
