"""Evaluation recipe: sample each policy on held-out prompts and score it with the oracle judge.

Every figure comes with a 95% confidence interval over prompts. ``win_rate_vs_sft`` is the
judge's pairwise preference of a policy's response over the SFT policy's response to the same
prompt (noiseless gold judge: 1 if its score is higher, 0.5 on a tie, 0 otherwise). A response
that never reached EOS is penalised (scored ``unfinished_score``, never counted correct) instead
of being judged as if complete.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from rlhfkit.generation import SamplingConfig


def _greedy() -> SamplingConfig:
    return SamplingConfig(max_new_tokens=64, temperature=0.0, batch_size=100)


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation stage."""

    policies: dict[str, str] = field(default_factory=lambda: {"base": "pretrain/model", "sft": "sft/model"})
    """policy name → model directory (relative to the run's ``out``, or absolute)"""
    data: str = ""
    """held-out prompts with task ``meta``; empty means the task's heldout.jsonl"""
    reference: str = "sft"
    """the policy that win rates are measured against"""
    sampling: SamplingConfig = field(default_factory=_greedy)
    """how responses are sampled for evaluation (greedy by default)"""
    unfinished_score: float = 0.0
    """gold score of a response that never emitted EOS"""
    seed: int = 0
    """sampling and bootstrap seed"""
    judge: str = "oracle"
    """judge of ``win_rate_vs_sft``: oracle (higher gold score wins) or intransitive (the oracle plus the
    answer-style cycle of ``rlhfkit.judges.intransitive``); the other metrics are always the oracle's"""
    judge_beta: float = 10.0
    """intransitive judge: weight of the gold-score difference"""
    judge_gamma: float = 3.0
    """intransitive judge: weight of the style cycle"""

    def __post_init__(self):
        if self.judge not in ("oracle", "intransitive"):
            raise ValueError(f"judge must be oracle or intransitive, got {self.judge!r}")


def judge_samples(problems, samples, unfinished_score: float) -> list[dict]:
    """Oracle verdicts for samples aligned with problems, as plain records."""
    from rlhfkit.tasks.arith_judge import judge

    rows = []
    for prob, s in zip(problems, samples):
        v = judge(prob, s.text)
        score = v.score if s.finished else unfinished_score
        rows.append({
            "prompt": s.prompt,
            "response": s.text,
            "finished": s.finished,
            "score": score,
            "correct": bool(v.correct and s.finished),
            "abstained": bool(v.abstained),
            "invented": len(v.invented_numbers) > 0,
            "unsafe": bool(v.unsafe),
            "answerable": prob.answerable,
            "length": len(s.response_ids),
        })
    return rows


def pairwise_win(a: dict, b: dict, judge: str = "oracle", beta: float = 10.0, gamma: float = 3.0) -> float:
    """The noiseless judge's verdict on two judged rows: 1 if ``a`` is preferred, ½ on a tie, 0 otherwise.

    The preferred side of P(a ≻ b): for the oracle, the higher gold score; for the intransitive
    judge, the sign of beta·(score_a − score_b) + gamma·cycle(style_a, style_b).
    """
    logit = a["score"] - b["score"]
    if judge == "intransitive":
        from rlhfkit.judges.intransitive import answer_style, cycle

        logit = beta * logit + gamma * cycle(answer_style(a["response"]), answer_style(b["response"]))
    elif judge != "oracle":
        raise ValueError(f"eval.judge must be oracle or intransitive, got {judge!r}")
    return 1.0 if logit > 0 else 0.5 if logit == 0 else 0.0


def policy_metrics(rows: list[dict], ref_rows: list[dict] | None, seed: int, judge: str = "oracle",
                   beta: float = 10.0, gamma: float = 3.0) -> dict:
    """The report's metrics for one policy, each ``{"mean", "ci95", "n"}``."""
    from rlhfkit.stats import mean_ci

    answerable = [r for r in rows if r["answerable"]]
    unanswerable = [r for r in rows if not r["answerable"]]
    m = {
        "gold_score": mean_ci([r["score"] for r in rows], seed),
        "accuracy": mean_ci([r["correct"] for r in answerable], seed),
        "abstain_rate": mean_ci([r["abstained"] for r in unanswerable], seed),
        "false_abstain_rate": mean_ci([r["abstained"] for r in answerable], seed),
        "invented_number_rate": mean_ci([r["invented"] for r in rows], seed),
        "unsafe_rate": mean_ci([r["unsafe"] for r in rows], seed),
        "finished_rate": mean_ci([r["finished"] for r in rows], seed),
        "response_length": mean_ci([r["length"] for r in rows], seed),
    }
    if ref_rows is not None:
        wins = [pairwise_win(a, b, judge, beta, gamma) for a, b in zip(rows, ref_rows)]
        m["win_rate_vs_sft"] = mean_ci(wins, seed)
    return m


def evaluate_policies(cfg: EvalConfig, out: Path, data_path: Path, stage_dir: Path, accelerator) -> dict:
    from rlhfkit.data.loading import DataError, load_prompts
    from rlhfkit.generation import sample
    from rlhfkit.io import atomic_write_jsonl, run_path
    from rlhfkit.models.loading import load_causal_lm, load_tokenizer
    from rlhfkit.tasks.arith import Problem

    records = load_prompts(data_path)
    for r in records:
        if r.meta is None:
            raise DataError(f"{r.where}: evaluation with the task judge needs the field 'meta'")
    problems = [Problem.from_meta(r.meta) for r in records]
    prompts = [r.prompt for r in records]
    paths = {}
    for name, rel in cfg.policies.items():
        p = run_path(out, rel)
        if not p.exists():
            raise FileNotFoundError(f"eval.policies.{name}: model directory {p} does not exist")
        paths[name] = p
    rows_by_policy = {}
    for name, p in paths.items():
        tok = load_tokenizer(p)
        model = load_causal_lm(p).to(accelerator.device)
        samples = sample(model, tok, prompts, cfg.sampling, seed=cfg.seed, device=accelerator.device)
        rows_by_policy[name] = judge_samples(problems, samples, cfg.unfinished_score)
        del model
    ref = rows_by_policy.get(cfg.reference)
    results = {name: policy_metrics(rows, ref, cfg.seed, cfg.judge, cfg.judge_beta, cfg.judge_gamma)
               for name, rows in rows_by_policy.items()}
    if accelerator.is_main_process:
        atomic_write_jsonl(stage_dir / "samples.jsonl", [
            dict(policy=name, **row) for name, rows in rows_by_policy.items() for row in rows
        ])
    return {"policies": results, "n_prompts": len(prompts)}
