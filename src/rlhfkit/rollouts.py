"""The rollout batch of the RL recipes (PPO, GRPO, RLOO), and what they measure on it.

:class:`Rollout` is what ``recipes.ppo.make_rollout`` hands the advantages and the update. Each step
logs, over the whole rollout batch (every process's rows: ``coll`` is a ``distributed.Collective``), what
cleanrl's PPO logs and what RLHF adds to it (:func:`rollout_metrics`, :func:`explained_variance`):

- ``reward``: the mean sequence score as the reward source gave it (the unfinished penalty included);
  ``reward_with_kl``: the mean per-response return the advantages see, Σ_t rewards_t − β·KL;
- ``kl``: the mean per-response KL estimate Σ_t KL_t from the reference, absent when no reference forward ran
  (β fixed at 0 and ``log_kl`` off: never a made-up 0); ``kl_coef``: β;
- ``response_length`` and ``finished_rate`` (responses that emitted EOS); ``batch_tokens``: the batch's prompt and
  response tokens (the update's throughput is ppo_epochs · batch_tokens / time_update_s);
- ``rollout_logprob_diff_mean`` / ``_max``: |log π_rollout − log π_train| over response tokens;
- ``explained_variance`` (critic methods): 1 − Var(R − V_old) / Var(R) over response tokens.

At the end, :func:`heldout_figures` samples held-out prompts and reports KL(π ‖ π_ref) per response
(and the cost, when constrained) with 95% confidence intervals.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from rlhfkit.generation import reference_token_logprobs, sample, sequences_from_samples, token_logprobs, unwrap
from rlhfkit.kl import kl_estimate, kl_k1
from rlhfkit.losses import masked_var
from rlhfkit.stats import mean_ci


@dataclass
class Rollout:
    """One rollout batch (this process's rows): everything the update needs, (B, T) unless noted.

    Tokens are indexed by the action position t of the right-padded prompt+response batch:
    ``old_logprobs[:, t]`` = log π(x_t | x_<t), ``old_values[:, t]`` = V(x_<t), ``token_rewards[:, t]``
    the reward for emitting x_t, ``response_mask[:, t]`` = 1 on response tokens (EOS included when finished).

    ``old_logprobs`` is None until the update fills it in when it takes them from its own forward (an exactly
    on-policy update, ``PPOConfig.old_logprobs_from_update``); ``ref_logprobs`` is None when no reference
    forward ran (``PPOConfig.reference_per_step``); ``kl`` is None while either is.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    old_logprobs: torch.Tensor | None
    ref_logprobs: torch.Tensor | None
    kl: torch.Tensor | None  # per-token estimate with the configured estimator, 0 off the response
    scores: torch.Tensor  # (B,) sequence scores (after penalty / whitening / clipping)
    raw_scores: torch.Tensor  # (B,) as the reward source gave them (penalty for unfinished)
    token_rewards: torch.Tensor  # reward per token, before the KL term
    costs: torch.Tensor | None  # (B,)
    old_values: torch.Tensor | None  # (B, T, H)
    samples: list
    timings: dict[str, float] = field(default_factory=dict)  # seconds: generation, scoring, policy_forward, reference, critic
    rollout_logprobs: torch.Tensor | None = None  # the sampler's log-probs of the same tokens (a diagnostic; TIS)


def clock(device) -> float:
    """``time.perf_counter()`` once ``device`` has finished its queued work (CUDA kernels run
    asynchronously: without the sync a phase's GPU time would be charged to the next one)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def token_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, estimator: str) -> torch.Tensor:
    """The per-token KL estimate (``kl.kl_estimate``) of (B, T) log-probs against the reference's: (B, T), 0 where
    ``mask`` (bool, the response tokens) is false."""
    return torch.where(mask, kl_estimate(logprobs, ref_logprobs, estimator), torch.zeros_like(logprobs))


def rollout_metrics(ro: Rollout, kl_coef: float, coll) -> dict:
    """The step's figures of a rollout ``ro`` (this process's rows) over the whole batch, in the log line's
    order; ``kl_coef`` is the β the step's rewards used. Called after the update, which may fill in the old
    log-probs (``Rollout``). Without reference log-probs there is no ``kl`` (β is then 0: ``reward_with_kl``
    is the reward's return alone)."""
    mask = ro.response_mask.bool()
    every = lambda t: coll.gather(t.float().cpu())  # noqa: E731  (B,): the whole batch, in rank order
    reward_with_kl = every((ro.token_rewards * mask).sum(1)).mean()  # the mean return before the KL term
    kl = {}
    if ro.kl is not None:
        all_kl = every((ro.kl * mask).sum(1))  # (B,) per-response KL estimate
        reward_with_kl = reward_with_kl - kl_coef * all_kl.mean()
        kl = {"kl": float(all_kl.mean())}
    # Sampler against training forward, same weights, same tokens: only numerics (kernels, batch
    # shapes, padding, an inference engine) can make them differ; a drift here means the rollouts
    # come from another policy than the one the loss assumes (rollout_is_cap corrects for it).
    lp_diff = torch.where(mask, (ro.rollout_logprobs - ro.old_logprobs).abs(), torch.zeros_like(ro.old_logprobs))
    return {
        "reward": float(every(ro.raw_scores).mean()),
        "reward_with_kl": float(reward_with_kl),
        **kl,
        "kl_coef": kl_coef,
        "response_length": float(every(mask.sum(1)).mean()),
        "batch_tokens": int(coll.sum(ro.attention_mask.sum())),
        "rollout_logprob_diff_mean": float(coll.sum(lp_diff.sum()) / coll.sum(mask.sum()).clamp(min=1)),
        "rollout_logprob_diff_max": float(every(lp_diff.amax(1)).max()),
        "finished_rate": float(every(torch.tensor([s.finished for s in ro.samples])).mean()),
    }


def explained_variance(returns: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, all_sum=None) -> float:
    """cleanrl's critic diagnostic 1 − Var(R − V) / Var(R) over ``mask``'s tokens, (B, T) each; NaN when Var(R) = 0.

    1: the critic predicts the returns; 0: no better than their mean; < 0: worse. ``all_sum`` (a sum
    over processes): the variances of the whole batch.
    """
    mask = mask.bool()
    var_r = masked_var(returns, mask, all_sum=all_sum)
    return float(1 - masked_var(returns - values, mask, all_sum=all_sum) / var_r) if var_r > 0 else float("nan")


@torch.no_grad()
def heldout_figures(policy, reference, tokenizer, prompts, scorer, cfg, device, engine=None) -> dict:
    """KL(π ‖ π_ref) per response (k1 summed over tokens, on samples from π) and the mean cost, with 95% CIs.

    ``cfg`` (``recipes.ppo.PPOConfig``) gives ``sampling`` and ``seed``; ``reference`` None means
    ``policy`` with its adapter disabled; ``scorer.cost`` (``scoring.Scorer``), when set, scores the samples.
    ``engine``: the rollout engine serving ``policy`` (None: one is built for this call).
    """
    samples = sample(engine or unwrap(policy), tokenizer, prompts, cfg.sampling, seed=cfg.seed + 12345, device=device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batch = {k: v.to(device) for k, v in sequences_from_samples(samples, pad, tokenizer.eos_token_id).items()}
    scored = batch["response_mask"].bool()
    logp = token_logprobs(policy, batch["input_ids"], batch["attention_mask"], cfg.sampling.temperature, scored)
    ref = reference_token_logprobs(policy, reference, batch["input_ids"], batch["attention_mask"], cfg.sampling.temperature,
                                   scored)
    kl = (kl_k1(logp, ref) * batch["response_mask"]).sum(1)
    figures = {"kl_from_reference": mean_ci(kl.tolist(), cfg.seed)}
    if scorer.cost is not None:
        figures["mean_cost"] = mean_ci(scorer.cost([s.prompt for s in samples], [s.text for s in samples]), cfg.seed)
    return figures
