"""What an RL stage's rollouts are scored by: a reward source, and a cost model when constrained.

A :class:`Scorer` holds up to three functions of (prompts, responses), each returning one value
per response:

- ``outcome``: the sequence score: a reward model, an ensemble of them (mean − k·std,
  ``models.reward_scorers.RewardEnsemble``), the embedded task's oracle (``judges.from_spec("oracle")``:
  an experiment control, never what the quickstart trains on) or any Python callable;
- ``steps``: instead of ``outcome``, a process reward model's step rewards, r_k = log q_k − log q_{k−1}
  per step (``rewards.prm_step_rewards``), which sum to the sequence score log q_K;
- ``cost``: a cost model's score (negative = safe) for the Safe RLHF constraint.

:func:`make_scorer` turns a config into these functions, and fails before any training when a model it
names is missing; :func:`score_samples` scores a rollout's samples with them and places the rewards on
their tokens (the math is ``rlhfkit.rewards``'s; step boundaries are ``rlhfkit.data.steps``').
"""
from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Callable, Sequence

import torch

from rlhfkit.advantages import whiten
from rlhfkit.data.steps import step_end_positions
from rlhfkit.config import ConfigError
from rlhfkit.judges.spec import TaskJudges, from_spec
from rlhfkit.models.precision import frozen_dtype
from rlhfkit.models.reward_scorers import RewardEnsemble
from rlhfkit.models.reward_files import load_reward_model
from rlhfkit.paths import run_path, stage_hint
from rlhfkit.rewards import length_adjusted_scores, penalize_unfinished, place_token_rewards, prm_step_rewards

RewardFn = Callable[[Sequence[str], Sequence[str]], Sequence[float]]
"""(prompts, responses) → one score per response"""


class RewardSource(StrEnum):
    """Where the sequence score comes from."""

    model = "model"  # one or more reward-model directories (several: an ensemble)
    prm = "prm"  # a process reward model: per-step probabilities
    judge = "judge"  # the embedded task's oracle (an experiment control: never what the quickstart trains on)
    callable = "callable"  # any Python function (prompts, responses) -> scores, named "module:function"


@dataclass
class Scorer:
    """Sequence scores (or PRM step rewards) for (prompt, response) pairs; cost when constrained."""

    outcome: Callable[[list[str], list[str]], list[float]] | None
    steps: Callable[[list[str], list[str]], list[list[float]]] | None
    cost: Callable[[list[str], list[str]], list[float]] | None
    step_bonus: Callable[[list[str], list[str]], list[list[float]]] | None = None
    """PRM step rewards added, already scaled by ``prm_coef``, to the outcome's score (``prm_coef`` > 0)"""


def import_callable(spec: str) -> RewardFn:
    """The function ``spec`` = ``"module:function"`` names."""
    if ":" not in spec:
        raise ValueError(f"reward_source is callable: reward_fn must be 'module:function', got {spec!r}")
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def _load(out: Path, rel: str, what: str, device=None, dtype: torch.dtype | None = None):
    path = run_path(out, rel)
    if not path.exists():
        raise ConfigError(f"{what}: {path} does not exist (run the reward stage first){stage_hint(rel, out)}")
    return load_reward_model(path, device=device, dtype=dtype)


def make_scorer(cfg, out: Path, records: Sequence = (), reward_fn: RewardFn | None = None,
                task_judges: TaskJudges | None = None, device=None) -> Scorer:
    """The reward (and cost) functions ``cfg`` names.

    ``cfg``: an RL stage's config (``recipes.ppo.PPOConfig``): ``reward_source``, ``reward_models``,
    ``ensemble_penalty``, ``prm``, ``prm_floor``, ``reward_fn``, ``cost_model``; model paths resolve
    with ``paths.run_path`` (``stage:`` in the run directory ``out``). ``records``: the prompts (each with
    ``prompt`` and ``meta``), for the oracle's answer key, the judge ``oracle`` of ``task_judges`` (the
    task's judges, ``rlhfkit.tasks.JUDGES``). ``reward_fn`` overrides the reward source. Reward, PRM and
    cost models are loaded on ``device``, in bf16 under ``cfg.mixed_precision`` bf16 (``models.precision``).
    """
    load = functools.partial(_load, out, device=device, dtype=frozen_dtype(getattr(cfg, "mixed_precision", "no")))
    outcome = steps = cost = None
    if reward_fn is not None:
        outcome = lambda p, r: [float(x) for x in reward_fn(p, r)]  # noqa: E731
    elif cfg.reward_source is RewardSource.callable:
        # Checked here, not in the config's __post_init__: each command-line override is validated alone
        # against the defaults, so "reward_source=callable reward_fn=m:f" would fail on its first half there.
        fn = import_callable(cfg.reward_fn)
        outcome = lambda p, r: [float(x) for x in fn(p, r)]  # noqa: E731
    elif cfg.reward_source is RewardSource.judge:
        with_meta = [{"prompt": r.prompt, "meta": r.meta} for r in records if r.meta is not None]
        if not with_meta:
            raise ValueError("reward_source judge needs prompts with task 'meta'")
        oracle = from_spec("oracle", with_meta, task_judges=task_judges)
        outcome = lambda p, r: [oracle.score(x, y).score for x, y in zip(p, r)]  # noqa: E731
    elif cfg.reward_source is RewardSource.model:
        members = [load(rel, "reward_models") for rel in cfg.reward_models]
        # Several members: mean − ensemble_penalty · std (the uncertainty penalty); one: its own score.
        rm = members[0] if len(members) == 1 else RewardEnsemble(members, "mean_minus_std", cfg.ensemble_penalty)
        outcome = rm.score
    else:  # prm
        steps = _prm_steps(load(cfg.prm, "prm"), cfg.prm_floor)
    step_bonus = None
    if outcome is not None and cfg.prm_coef > 0:
        prm_steps, coef = _prm_steps(load(cfg.prm, "prm"), cfg.prm_floor), cfg.prm_coef
        step_bonus = lambda p, r: [[coef * x for x in row] for row in prm_steps(p, r)]  # noqa: E731
    if cfg.cost_model:
        cost_model = load(cfg.cost_model, "cost_model")
        cost = lambda p, r: [float(x) for x in cost_model.score(p, r)]  # noqa: E731
    return Scorer(outcome, steps, cost, step_bonus)


def _prm_steps(prm, floor: float):
    """(prompts, responses) → each response's PRM step rewards (``rewards.prm_step_rewards``)."""
    return lambda p, r: [prm_step_rewards(row, floor) for row in prm.step_scores(p, r)]


@dataclass
class SampleScores:
    """A rollout batch's scores, B = responses, T = tokens of the prompt+response batch."""

    raw: torch.Tensor  # (B,) as the reward source gave them, the unfinished penalty in place of an unfinished one's
    scores: torch.Tensor  # (B,) after the length term, whitening and clipping: the sequence scores the advantages see
    token_rewards: torch.Tensor  # (B, T) where the rewards land, before the KL term
    costs: torch.Tensor | None  # (B,) the cost model's scores when constrained


def score_samples(scorer: Scorer, samples: Sequence, tokenizer, response_mask: torch.Tensor, cfg,
                  all_sum=None) -> SampleScores:
    """Score ``samples`` (``generation.Sample``, in the rows of ``response_mask`` (B, T)) and place the rewards.

    ``cfg`` (``recipes.ppo.PPOConfig``) gives ``unfinished_score``, ``reward_length_penalty``,
    ``reward_length_bias``, ``sampling.max_new_tokens``, ``score_whiten``, ``score_clip`` and ``prm_step_rewards``; ``all_sum`` (a sum over processes) makes whitening use the whole batch.
    A response that never emitted EOS gets ``unfinished_score`` in place of its score, at its last
    token. With PRM step rewards each step's reward r_k lands on the token closing step k
    (``data.steps.step_end_positions``); they sum to the score placed at the last token otherwise.
    """
    ps, texts = [s.prompt for s in samples], [s.text for s in samples]
    finished = torch.tensor([s.finished for s in samples])
    if scorer.steps is not None:
        step_lp = scorer.steps(ps, texts)
        outcome = torch.tensor([sum(row) for row in step_lp], dtype=torch.float32)
        # A PRM has no step to judge in an empty response: its Σ log q over zero steps would be 0,
        # the best possible score. It is not an answer at all; it gets the unfinished penalty.
        finished = finished & torch.tensor([len(row) > 0 for row in step_lp])
    else:
        step_lp = None
        outcome = torch.tensor(scorer.outcome(ps, texts), dtype=torch.float32)
    raw = penalize_unfinished(outcome, finished, cfg.unfinished_score)
    scores = raw.clone()
    # The length term comes after the unfinished penalty, which *replaces* a score: applied before, it would be
    # erased, and a response that runs to the token limit (the longest of all) would escape it. It comes before
    # whitening and clipping, so it is in the reward's own units and the batch statistics see it.
    length_coef = cfg.reward_length_penalty - cfg.reward_length_bias
    lengths = torch.tensor([len(s.response_ids) for s in samples])  # (B,) EOS excluded
    if length_coef:  # 0: no term at all, so the default scores are bit-identical to a run without the option
        scores = length_adjusted_scores(scores, lengths, cfg.sampling.max_new_tokens, length_coef)
    if cfg.score_whiten:
        scores = whiten(scores, all_sum=all_sum)
    if cfg.score_clip > 0:
        scores = scores.clamp(-cfg.score_clip, cfg.score_clip)
    response_mask = response_mask.cpu()
    if step_lp is not None and cfg.prm_step_rewards:
        placed = _placed_steps(samples, step_lp, finished, tokenizer, response_mask)
        # A finished response's score is its steps' rewards; its length term (0 when off) lands at its last token.
        length_term = length_adjusted_scores(torch.zeros_like(scores), lengths, cfg.sampling.max_new_tokens, length_coef)
        token_rewards = place_token_rewards(response_mask, torch.where(finished, length_term, scores), placed)
    elif scorer.step_bonus is not None:
        # The reward model's score at the last token, plus prm_coef × the PRM's step rewards at each step's end.
        bonus_finished = finished & torch.tensor([len(s.response_ids) > 0 for s in samples])
        placed = _placed_steps(samples, scorer.step_bonus(ps, texts), bonus_finished, tokenizer, response_mask)
        token_rewards = place_token_rewards(response_mask, scores, placed)
    else:
        token_rewards = place_token_rewards(response_mask, scores)
    costs = torch.tensor(scorer.cost(ps, texts), dtype=torch.float32) if scorer.cost is not None else None
    return SampleScores(raw, scores, token_rewards, costs)


def _placed_steps(samples: Sequence, step_rewards: list[list[float]], finished: torch.Tensor, tokenizer,
                  response_mask: torch.Tensor) -> list[list[tuple[int, float]]]:
    """[(response token closing step k, r_k)] per sample; none for an unfinished one (it gets its penalty alone)."""
    n_resp = response_mask.sum(1).tolist()
    placed = []
    for b, s in enumerate(samples):
        pos = step_end_positions(tokenizer, s.response_ids, int(n_resp[b])) if finished[b] else []
        if finished[b] and len(pos) != len(step_rewards[b]):
            raise ValueError(f"PRM gave {len(step_rewards[b])} step scores for a response of {len(pos)} steps: {s.text!r}")
        placed.append(list(zip(pos, step_rewards[b])) if finished[b] else [])
    return placed
