"""Labeling: sample K responses per prompt from a policy and collect judgments into a preference dataset.

For each chunk of prompts: sample K responses (``rlhfkit.generation.sample``), then

- judge ``oracle``: the embedded task's simulated annotators rank them (a noisy Plackett-Luce
  draw, ``sample_ranking`` with the task's ``judge_beta``) → ``rankings.jsonl``;
- any other judge (``judges.spec.from_spec``: a reward-model directory, a judge YAML): every pair in
  both orders, P(a ≻ b) averaged over the two orders, with the both-order agreement kept →
  ``pairs.jsonl``, plus ``rankings.jsonl`` ordered by summed win probability (Borda). The stage reports
  the judge's ``position_bias`` (``bias.position_bias``: the share of comparisons whose verdict the
  order decides, the mean first-slot probability). With ``average_orders: false`` the first order's
  P(a ≻ b) alone labels, and a judge whose first chunk shows more than ``max_position_bias`` of
  order-decided comparisons is refused (ConfigError) before any label is saved.

When prompts carry the task ``meta``, every line of every response gets a step label, and the
oracle gives its outcome and its safety → ``steps.jsonl``, which the PRM, ORM and cost model read.
Step labels come from the oracle's per-line ``step_labels`` (the human step annotators;
``step_labels: oracle``) or, for a task without step annotators, are estimated Math-Shepherd
style (``step_labels: estimate``, :mod:`rlhfkit.data.step_estimation`): the label policy
completes each distinct step prefix ``estimate_n`` times (samples of one prompt that open alike share
their completions) and only the final answers are checked. Every
record has ``provenance`` (judge, model, time, chunk, seed).

Resumable: chunk c uses seeds derived only from (seed, c), and is written atomically as its own
file under the stage's checkpoint directory ``OUT/label.ckpt/`` once judged (removed, like every
stage's checkpoints, when the stage completes). A killed run skips the chunks on disk and ends
with the same records as an uninterrupted one (``provenance.time`` aside).
"""
from __future__ import annotations

import hashlib
import json
import random
import time
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from rlhfkit.bias import DEFAULT_MAX_POSITION_BIAS, position_bias
from rlhfkit.checkpoints import checkpoint_dir
from rlhfkit.config import ConfigError, check_probability, coerce_enums, to_dict
from rlhfkit.data.loading import DataError, load_prompts
from rlhfkit.data.step_estimation import EstimateMode, estimate_step_labels
from rlhfkit.engines import make_engine
from rlhfkit.generation import SamplingConfig, sample
from rlhfkit.io import atomic_write_json, atomic_write_text
from rlhfkit.judges.spec import from_spec
from rlhfkit.losses import ranking_pairs
from rlhfkit.models.loading import load_causal_lm, load_tokenizer
from rlhfkit.paths import ConfigPath, JudgeSpec, ModelRef
from rlhfkit.stage import StageContext
from rlhfkit.tasks import JUDGES as TASK_JUDGES
from rlhfkit.tasks.arith import Problem
from rlhfkit.tasks.arith_judge import judge as oracle_judge, sample_ranking


def _sampling() -> SamplingConfig:
    # 0.7, not 1.0: a small SFT policy's full-temperature tail is mostly broken tokens ("Answwer"),
    # which a judge ranks trivially; K samples at 0.7 differ in the ways that matter (steps, answers).
    return SamplingConfig(max_new_tokens=64, temperature=0.7, batch_size=64)


class StepLabels(StrEnum):
    """Where the per-line labels of ``steps.jsonl`` come from."""

    oracle = "oracle"
    """the task's judge labels every line (the embedded task's human step annotators)"""
    estimate = "estimate"
    """Math-Shepherd: the share of the policy's completions from the step that reach the right answer"""


@dataclass(frozen=True)
class LabelConfig:
    """Labeling stage."""

    policy: ModelRef = "stage:sft/model"
    """the policy that writes the responses"""
    data: ConfigPath = "stage:data/prompts.jsonl"
    """prompts (``prompt``, optional task ``meta``; default: the task's)"""
    n_prompts: int = 0
    """label only the first this many prompts; 0 = all"""
    k: int = 4
    """responses per prompt"""
    judge: JudgeSpec = "oracle"
    """``oracle`` (the task's noisy annotators) or any judge spec of ``judges.spec.from_spec`` (a reward-model
    directory such as ``stage:reward/rm``, a judge YAML file, ``intransitive``)"""
    judge_beta: float = -1.0
    """oracle noise (Bradley-Terry inverse temperature); negative means the task's judge_beta (the pipeline
    config fills it in when it loads)"""
    oracle_length_bias: float = 0.0
    """with the oracle judge: annotators biased toward longer answers, each line adding this much to a response's
    Bradley–Terry utility (``sample_ranking``'s ``length_bias``); 0 = off. For length-bias experiments
    (``configs/length_bias.yaml``); eval's oracle never has it"""
    sampling: SamplingConfig = field(default_factory=_sampling)
    """how responses are sampled"""
    chunk_size: int = 64
    """prompts per chunk: the unit of work that is saved, and resumed from"""
    seed: int = 0
    """master seed; chunk c's seeds derive from (seed, c) only"""
    step_labels: StepLabels = StepLabels.oracle
    """``oracle``: the task's judge labels every line; ``estimate``: Math-Shepherd estimates from
    the policy's completions of each step prefix, checking final answers only"""
    estimate_n: int = 4
    """with ``step_labels: estimate``: completions per distinct (prompt, step prefix) (sampled as ``sampling`` says)"""
    step_label_prompts: int = 0
    """step-label (and write the ``steps`` records, the PRM's, ORM's and cost model's data, of) only the first
    this many prompts; 0 = all. The rankings cover every prompt: Math-Shepherd estimation costs ``estimate_n``
    completions of every step prefix, so a run can rank more prompts than it can afford to step-label"""
    estimate_mode: EstimateMode = EstimateMode.soft
    """with ``step_labels: estimate``: ``soft``, the share of completions that reach the right
    answer, or ``hard``, 1 if any does"""
    average_orders: bool = True
    """judges other than the oracle: label with P(a ≻ b) averaged over both orders (a ≻ b asked with a first,
    and with b first), which cancels position bias; false labels with the first order's alone (both are
    still asked, to measure the bias)"""
    max_position_bias: float = DEFAULT_MAX_POSITION_BIAS
    """with ``average_orders: false``: refuse a judge whose verdict the order decides on more than this share
    of its first chunk's comparisons (0.2: more than one label in five would follow the slot, not the
    answer)"""

    def __post_init__(self):
        if self.k < 2:
            raise ValueError(f"k must be at least 2 to compare responses, got {self.k}")
        if self.chunk_size < 1:
            raise ValueError("chunk_size must be positive")
        coerce_enums(self)  # a plain string from Python code
        if self.oracle_length_bias and not self.oracle_ranks:
            raise ValueError(f"oracle_length_bias biases the task's annotators; it needs judge: oracle, not {self.judge!r}")
        if self.estimate_n < 1:
            raise ValueError(f"estimate_n must be at least 1, got {self.estimate_n}")
        if self.step_label_prompts < 0:
            raise ValueError(f"step_label_prompts must be >= 0 (0 = every prompt), got {self.step_label_prompts}")
        check_probability(max_position_bias=self.max_position_bias)

    @property
    def oracle_ranks(self) -> bool:
        """The task's annotators rank each prompt's K responses (a noisy Plackett-Luce draw) instead of a
        judge comparing every pair: ``judge: oracle``, the simulated people of the embedded task."""
        return self.judge == "oracle"

    @property
    def step_labeller(self) -> str:
        """Who labelled the steps, for the steps records' ``provenance.judge``."""
        if self.step_labels == StepLabels.oracle:
            return "oracle step labels"
        return f"math-shepherd(n={self.estimate_n}, {self.estimate_mode})"


def _seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "big") % (2**31 - 1)


def label_chunk(c: int, records: list, lm, tok, judge, judge_name: str, cfg: LabelConfig, beta: float,
                policy_name: str, device) -> dict[str, list[dict]]:
    """Sample, judge and label one chunk; returns {"rankings": [...], "pairs": [...], "steps": [...], "orders": [...]}
    (``orders``: [P(a ≻ b) asked a first, P(b ≻ a) asked b first] of each judged pair, for the position bias).
    ``lm``: the label policy's rollout engine (``engines.make_engine``), or the model itself."""
    seed = _seed(cfg.seed, "chunk", c)
    prompts = [r.prompt for r in records]
    samples = sample(lm, tok, prompts, cfg.sampling, seed=seed, num_return_sequences=cfg.k, device=device)
    rng = random.Random(_seed(cfg.seed, "rank", c))
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    prov = {"judge": judge_name, "model": policy_name, "time": now, "chunk": c, "seed": seed}
    out: dict[str, list] = {"rankings": [], "pairs": [], "steps": [], "orders": []}
    groups = [samples[i * cfg.k:(i + 1) * cfg.k] for i in range(len(records))]
    probs = None
    if judge is not None:
        items = []
        for rec, group in zip(records, groups):
            for a, b, _ in ranking_pairs(list(range(cfg.k))):
                items += [(rec.prompt, group[a].text, group[b].text), (rec.prompt, group[b].text, group[a].text)]
        probs = iter(judge.prob(items))
    for rec, group in zip(records, groups):
        texts = [s.text for s in group]
        meta = {"meta": rec.meta} if rec.meta is not None else {}
        extra = {"finished": [s.finished for s in group], **meta}
        if judge is None:
            if rec.meta is None:
                raise DataError(f"{rec.where}: the oracle judge needs the task field 'meta'")
            ranking = sample_ranking(Problem.from_meta(rec.meta), texts, beta, rng, cfg.oracle_length_bias)
            out["rankings"].append({"prompt": rec.prompt, "responses": texts, "ranking": ranking, **extra,
                                    "provenance": prov})
        else:
            wins = [0.0] * cfg.k
            for a, b, _ in ranking_pairs(list(range(cfg.k))):
                p_ab, p_ba = next(probs), next(probs)
                out["orders"].append([p_ab, p_ba])  # P(a ≻ b) with a first, P(b ≻ a) with b first
                if cfg.average_orders:
                    p = (p_ab + 1.0 - p_ba) / 2  # both orders averaged: position bias cancels
                else:
                    p = p_ab
                wins[a] += p
                wins[b] += 1 - p
                if p == 0.5:
                    continue  # no preference: not a comparison
                w, l = (a, b) if p > 0.5 else (b, a)
                out["pairs"].append({"prompt": rec.prompt, "chosen": texts[w], "rejected": texts[l], **meta,
                                     "provenance": {**prov, "prob": max(p, 1 - p), "p_ab": p_ab, "p_ba": p_ba,
                                                    "both_order_agreement": (p_ab > 0.5) == (p_ba < 0.5)}})
            ranking = sorted(range(cfg.k), key=lambda i: (-wins[i], i))
            out["rankings"].append({"prompt": rec.prompt, "responses": texts, "ranking": ranking, **extra,
                                    "provenance": {**prov, "ranking_from": "borda over averaged pair probabilities"}})
    n_step = len(records) if not cfg.step_label_prompts else max(0, cfg.step_label_prompts - c * cfg.chunk_size)
    graded = [(rec, s, Problem.from_meta(rec.meta)) for rec, group in zip(records[:n_step], groups) if rec.meta is not None
              for s in group]
    verdicts = [oracle_judge(prob, s.text) for _, s, prob in graded]
    if cfg.step_labels == StepLabels.estimate:
        step_labels = _estimated_step_labels(graded, lm, tok, cfg, c, device)
    else:
        step_labels = [list(v.step_labels) for v in verdicts]
    for (rec, s, _), v, labels in zip(graded, verdicts, step_labels):
        if not labels:
            continue  # an empty response has no step to label
        out["steps"].append({"prompt": rec.prompt, "completion": s.text, "labels": labels,
                             "correct": bool(v.correct and s.finished), "is_safe": not v.unsafe,
                             "finished": s.finished, "meta": rec.meta,
                             "provenance": {**prov, "judge": cfg.step_labeller}})
    return out


def _estimated_step_labels(graded: list, lm, tok, cfg: LabelConfig, c: int, device) -> list[list[float]]:
    """Math-Shepherd labels of each (record, sample, problem) in ``graded``: the label policy
    completes every step prefix ``cfg.estimate_n`` times, and only the final answer is checked."""
    seed = _seed(cfg.seed, "estimate", c)

    def complete(queries: list[tuple[str, str]], n: int) -> list[list[str | None]]:
        done = sample(lm, tok, [p for p, _ in queries], cfg.sampling, seed=seed, num_return_sequences=n,
                      device=device, response_prefixes=[prefix for _, prefix in queries])
        # An unfinished completion was cut by max_new_tokens: its last line may be a cut-off number.
        return [[s.text if s.finished else None for s in done[q * n:(q + 1) * n]] for q in range(len(queries))]

    def is_correct(i: int, text: str) -> bool:
        return oracle_judge(graded[i][2], text).correct  # the final answer only; never its step labels

    labels = estimate_step_labels([rec.prompt for rec, _, _ in graded], [s.text for _, s, _ in graded],
                                  complete, is_correct, cfg.estimate_n, cfg.estimate_mode)
    for (_, s, _), row in zip(graded, labels):
        if row and not s.finished:
            row[-1] = 0.0  # the same trap for the sample itself: its last line never reached an answer
    return labels


def refuse_position_biased(orders: list, cfg: LabelConfig, judge_name: str, stage: str = "label") -> None:
    """ConfigError when the judge, used without order averaging, lets the order decide more than
    ``cfg.max_position_bias`` of ``orders`` ([p_ab, p_ba] per comparison: its calibration set, the first
    chunk's comparisons, asked in both orders)."""
    if not orders:
        return
    b = position_bias([a for a, _ in orders], [x for _, x in orders])
    share = b["share_order_decides"]
    if share == share and share > cfg.max_position_bias:  # share == share: not NaN (no decided comparison)
        raise ConfigError(
            f"{stage}: judge {judge_name} lets the order of the two responses decide the verdict on {share:.3f} of "
            f"{b['n'] - b['n_undecided']} comparisons (its first chunk, asked in both orders), above "
            f"{stage}.max_position_bias = {cfg.max_position_bias}; set {stage}.average_orders=true (the default: "
            f"both orders averaged) or raise {stage}.max_position_bias")


def run(cfg: LabelConfig, ctx: StageContext, stop_after_chunks: int | None = None) -> dict:
    """Label every chunk not already on disk, then write the datasets into ``ctx.stage_dir``.

    ``stop_after_chunks`` stops (as a kill would) after labeling that many new chunks; for tests.
    """
    out, stage_dir, accelerator = ctx.out, ctx.stage_dir, ctx.accelerator
    if cfg.judge_beta < 0:
        raise ConfigError(f"{ctx.name}.judge_beta is negative (the task's judge_beta, filled in by the pipeline "
                          f"config): give the oracle's beta")
    beta = cfg.judge_beta
    data = ctx.resolve(cfg.data, key="data")
    records = load_prompts(data)
    if cfg.n_prompts:
        records = records[: cfg.n_prompts]
    policy = ctx.model(cfg.policy, "policy")
    # The chunk store is the stage's checkpoint (removed with it once the stage completes); a library
    # call, outside a pipeline's OUT/<stage>.partial, keeps its chunks beside the run instead.
    work = checkpoint_dir(stage_dir) or out / "label.chunks"
    identity = {"label": to_dict(cfg), "beta": beta, "data": str(data), "n_records": len(records)}
    if (work / "config.json").exists():
        if json.loads((work / "config.json").read_text()) != identity:
            raise ConfigError(f"{work}: chunks from a labeling run with a different config; remove it to relabel")
    elif accelerator.is_main_process:
        atomic_write_json(work / "config.json", identity)
    if cfg.oracle_ranks:
        bias = f", length_bias={cfg.oracle_length_bias}" if cfg.oracle_length_bias else ""
        judge, judge_name = None, f"oracle(beta={beta}{bias})"  # label_chunk draws the rankings from each record's meta
    else:
        judge = from_spec(cfg.judge, [{"prompt": r.prompt, "meta": r.meta} for r in records], base_dir=out,
                          device=accelerator.device, beta=beta, task_judges=TASK_JUDGES)
        judge_name = getattr(judge, "name", cfg.judge)
    tok = load_tokenizer(policy)
    lm = make_engine(cfg.sampling, load_causal_lm(policy).to(accelerator.device), tok, accelerator.device)
    n_chunks = (len(records) + cfg.chunk_size - 1) // cfg.chunk_size
    kinds = ("rankings", "pairs", "steps")
    done_now = reused = 0
    t0 = time.time()
    for c in range(n_chunks):
        path = work / f"chunk-{c:05d}.json"
        if path.exists():
            reused += 1
            continue
        if stop_after_chunks is not None and done_now >= stop_after_chunks:
            lm.close()
            return {"stopped": True, "chunks_done": done_now}
        chunk = records[c * cfg.chunk_size:(c + 1) * cfg.chunk_size]
        result = label_chunk(c, chunk, lm, tok, judge, judge_name, cfg, beta, cfg.policy, accelerator.device)
        if c == 0 and judge is not None and not cfg.average_orders:
            refuse_position_biased(result["orders"], cfg, judge_name, ctx.name)  # before any label is saved
        if accelerator.is_main_process:
            atomic_write_json(path, result)  # the chunk is on disk whole, or not at all
        done_now += 1
    lm.close()
    merged: dict[str, list[dict]] = {k: [] for k in kinds}
    orders: list[list[float]] = []
    for c in range(n_chunks):
        chunk = json.loads((work / f"chunk-{c:05d}.json").read_text())
        for k in kinds:
            merged[k].extend(chunk[k])
        orders.extend(chunk["orders"])
    files = {}
    if accelerator.is_main_process:
        for k in kinds:
            if merged[k]:
                atomic_write_text(stage_dir / f"{k}.jsonl", "".join(json.dumps(r) + "\n" for r in merged[k]))
                files[k] = f"{k}.jsonl"
    metrics = {"files": files, "prompts": len(records), "k": cfg.k, "judge": judge_name,
               "step_labels": cfg.step_labeller, "chunks": n_chunks, "chunks_labeled": done_now, "chunks_resumed": reused,
               "label_runtime_s": time.time() - t0,
               "rankings": len(merged["rankings"]), "pairs": len(merged["pairs"]), "steps": len(merged["steps"])}
    if merged["steps"]:
        s = merged["steps"]
        metrics["sample_correct_rate"] = sum(r["correct"] for r in s) / len(s)
        metrics["sample_unsafe_rate"] = sum(not r["is_safe"] for r in s) / len(s)
        metrics["step_label_mean"] = sum(sum(r["labels"]) for r in s) / max(1, sum(len(r["labels"]) for r in s))
    if orders:
        metrics["position_bias"] = {**position_bias([a for a, _ in orders], [b for _, b in orders]),
                                    "average_orders": cfg.average_orders, "max_position_bias": cfg.max_position_bias}
    if merged["pairs"]:
        metrics["both_order_agreement"] = sum(p["provenance"]["both_order_agreement"] for p in merged["pairs"]) / len(merged["pairs"])
    return metrics
