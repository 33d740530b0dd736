"""RL fine-tuning against a reward: PPO with a critic, and the critic-free GRPO and RLOO.

One loop, read top to bottom in ``run``; every step is

    rollout   sample K responses per prompt (``generation.sample`` through the rollout engine,
              ``sampling.engine``: hf generate, or vLLM on a GPU, given the new weights after every
              update), cut after the first EOS; a response that never ends is unfinished
    score     a sequence score from the reward source (reward model, ensemble − penalty·std,
              PRM, the task judge, or any Python callable), the unfinished penalty in place
              of the score of an unfinished response; optionally PRM step rewards at the
              newline token that closes each step; optionally a cost from a cost model
    KL        log-probs of the policy and the frozen reference recomputed by a forward pass
              (never taken from ``generate``, whose own log-probs are only compared with them
              and logged), a per-token KL estimate (k1/k2/k3) either subtracted from the
              reward (β·KL, fixed or adaptive β) or added to the loss. A pass nothing reads is
              skipped: the reference's when β is fixed at 0 and ``log_kl`` is off, the policy's
              when the update is exactly on-policy (one epoch, one minibatch: its own forward's
              detached log-probs are the old ones, as in TRL at ``num_iterations=1``)
    advantage PPO: GAE on per-token rewards with the critic's values; GRPO: group-normalised
              sequence returns; RLOO: leave-one-out baseline. Safe RLHF combines reward and
              cost advantages, (A_r − λ·A_c) / (1 + λ), with λ updated online
    update    several epochs of shuffled minibatches (gradient accumulation inside), clipped
              policy loss, clipped value loss for the critic, each aggregated over tokens or
              responses (``loss_aggregation``), gradient clipping

The algorithms differ only in data (``advantages.Algorithm``'s properties), never in a buried branch.
Tokens are indexed by the *action* position t (``rollouts.Rollout``). The pieces composed here: the critic
(``models.critic``), the reward sources (``scoring``), where rewards land (``rewards``; a step is a line,
``data.steps``), log-probs from a forward pass (``generation.token_logprobs``), the losses (``policy_losses``).
Dropout is off in every model; the reference is frozen and in eval mode; under LoRA it is
the policy with its adapter disabled (no second copy). Checkpoints (every ``save_every``
steps, atomic) hold everything a resumed run needs to end with the same weights.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from rlhfkit.advantages import Algorithm, gae, scale_by_std, whiten
from rlhfkit.checkpoints import LoopCheckpoint, StoppedEarly, checkpoint_dir  # noqa: F401  (StoppedEarly: what a stopped run raises)
from rlhfkit.config import check_non_negative, check_positive, check_probability, coerce_enums
from rlhfkit.data.loading import load_prompts
from rlhfkit.generation import (
    SamplingConfig, reference_token_logprobs, sample, sampler_logprobs, sequences_from_samples, token_logprobs,
    token_logprobs_and_entropy, unwrap,
)
from rlhfkit.io import JsonlLog
from rlhfkit.kl import AdaptiveKLController, FixedKLController, KLChoice, KLInLoss, LagrangeMultiplier, kl_estimate
from rlhfkit.losses import masked_mean
from rlhfkit.models.critic import build_critic
from rlhfkit.models.loading import load_causal_lm, load_tokenizer, model_config
from rlhfkit.models.precision import frozen_dtype
from rlhfkit.models.trainable import LoRAConfig, disable_dropout, make_trainable, save_trained
from rlhfkit.nonfinite import NonFiniteGuard
from rlhfkit.paths import ConfigPath, ModelRef, run_path
from rlhfkit.policy_losses import (
    LossAggregation, aggregate_loss, ppo_policy_loss, ppo_value_loss, truncated_importance_weights,
)
from rlhfkit.distributed import Collective, refuse_sharded
from rlhfkit.engines import make_engine
from rlhfkit.ptx import PtxTerm, load_ptx_examples
from rlhfkit.rewards import place_token_rewards
from rlhfkit.rollouts import Rollout, clock, explained_variance, heldout_figures, rollout_metrics, token_kl
from rlhfkit.scoring import RewardFn, RewardSource, Scorer, make_scorer, score_samples
from rlhfkit.seeds import check_seeds
from rlhfkit.stage import StageContext
from rlhfkit.tasks import JUDGES as TASK_JUDGES
from rlhfkit.tasks.arith import Problem
from rlhfkit.tasks.arith_judge import judge
from rlhfkit.tracking import check_report_to
from rlhfkit.training import MixedPrecision, Scheduler, TrainConfig, global_batches, make_optimizer_and_scheduler, optimizer_step


@dataclass(frozen=True)
class PPOConfig:
    """An RL fine-tuning stage (PPO, GRPO or RLOO)."""

    algorithm: Algorithm = Algorithm.ppo
    """ppo (critic + GAE), grpo (group-normalised advantages, k3 KL loss) or rloo (leave-one-out baseline)"""
    policy: ModelRef = "stage:sft/model"
    """model to fine-tune, also the frozen reference"""
    data: ConfigPath = "stage:data/prompts.jsonl"
    """prompts (with task ``meta`` for the gold-score diagnostic)"""
    heldout: ConfigPath = "stage:data/heldout.jsonl"
    """held-out prompts for the final KL / cost figures (none when empty or when the file does not exist)"""
    reward_source: RewardSource = RewardSource.model
    """model (reward_models), prm, judge (the task oracle: a control, never the quickstart's reward) or callable (reward_fn)"""
    reward_models: tuple[ConfigPath, ...] = ("stage:reward/rm",)
    """reward-model directories (a stage's output, or a path); several form an ensemble"""
    ensemble_penalty: float = 0.0
    """ensemble score = mean − ensemble_penalty · std over members (uncertainty penalty)"""
    prm: ConfigPath = "stage:reward/prm"
    """process-reward-model directory, used when reward_source is prm"""
    prm_step_rewards: bool = True
    """prm: reward log q_k − log q_{k−1} (q_k = P(steps 1..k right)) at the newline closing step k; false: their sum log q_K at the last token"""
    prm_floor: float = 0.01
    """PRM probabilities are clamped to at least this before the log (bounds a wrong step's reward)"""
    prm_coef: float = 0.0
    """with reward_source model: also add prm_coef × the PRM's step rewards r_k = log q_k − log q_{k−1} (``prm``,
    ``prm_floor``) at the newline closing each step k, on top of the reward model's score (after its unfinished
    penalty, length term, whitening and clipping) at the last token. The RM carries the outcome preferences
    (style, abstaining); the PRM gives step-level credit for what the RM cannot check (the arithmetic), as
    process supervision (Lightman et al. 2023) used as dense reward shaping; 0: off"""
    reward_fn: str = ""
    """``module:function`` taking (prompts, responses) and returning scores, when reward_source is callable"""
    unfinished_score: float = -1.0
    """score of a response that never emitted EOS within sampling.max_new_tokens: it replaces the reward
    source's score (it is not added to it); EOS is looked for in the generated tokens only"""
    reward_length_penalty: float = 0.0
    """score ← score − reward_length_penalty · (response tokens, EOS excluded) / sampling.max_new_tokens, after the
    unfinished penalty, before whitening/clipping (``rewards.length_adjusted_scores``); 0 = off"""
    reward_length_bias: float = 0.0
    """experiments only: score ← score + reward_length_bias · tokens / max_new_tokens, a reward made length-biased on
    purpose to measure how a policy exploits it; the same term as the penalty with the opposite sign; 0 = off"""
    score_whiten: bool = False
    """whiten the sequence scores of each rollout batch (mean 0, std 1) before use"""
    score_clip: float = 0.0
    """clip sequence scores to [−score_clip, score_clip] (0 disables)"""
    cost_model: ConfigPath = ""
    """cost-model directory (negative cost = safe); set to constrain E[cost] ≤ cost_threshold (Safe RLHF)"""
    cost_threshold: float = 0.0
    """the constraint's bound on the mean cost"""
    lambda_init: float = 1.0
    """initial Lagrange multiplier λ"""
    lambda_lr: float = 0.1
    """λ ← clip(λ + lambda_lr · (mean cost − threshold), 0, lambda_max) after every rollout"""
    lambda_max: float = 10.0
    """upper bound of λ"""
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(max_new_tokens=64, temperature=1.0, top_p=1.0, batch_size=64))
    """rollout sampling (temperature must be > 0; the training forward pass uses the same temperature)"""
    group_size: int = 0
    """K responses per prompt; 0 means 1 for ppo and 4 for grpo and rloo (which need K ≥ 2)"""
    prompts_per_step: int = 64
    """prompts per rollout; the rollout batch is prompts_per_step · group_size responses"""
    total_steps: int = 40
    """rollout + update iterations"""
    ppo_epochs: int = 4
    """passes over each rollout batch"""
    minibatch_size: int = 32
    """responses per optimizer step (at most the rollout batch: a larger value means one minibatch)"""
    grad_accum_steps: int = 1
    """micro-batches per minibatch (the loss is normalised over the whole minibatch's tokens)"""
    lr: float = 1e-4
    """policy learning rate (AdamW)"""
    critic_lr: float = 1e-4
    """critic learning rate (AdamW)"""
    weight_decay: float = 0.0
    """AdamW weight decay, policy and critic"""
    warmup_steps: int = 0
    """linear warm-up, in optimizer steps"""
    scheduler: Scheduler = Scheduler.constant
    """constant, linear or cosine, over all optimizer steps"""
    grad_clip: float = 1.0
    """clip each model's global gradient norm to this (0 disables)"""
    clip_eps: float = 0.2
    """PPO ratio clip ε"""
    value_clip_eps: float = 0.2
    """value-loss clip around the rollout values"""
    vf_coef: float = 0.5
    """weight of the value loss (the critic has its own optimizer; this scales its gradient)"""
    entropy_coef: float = 0.0
    """entropy bonus weight"""
    ptx_coef: float = 0.0
    """γ of PPO-ptx (Ouyang et al. 2022, eq. 2): every optimizer step also minimises γ × the mean NLL of the
    response tokens of ``ptx_batch_size`` demonstrations drawn from ``ptx_data``, so that what the reward
    model cannot see (the task's arithmetic) does not drift under RL (the "alignment tax"); 0: off"""
    ptx_data: ConfigPath = "stage:data/sft.jsonl"
    """D for ``ptx_coef``: demonstrations (``prompt`` + ``response``, or ``messages``; the SFT stage's by default,
    loss on the response tokens) or a pretraining corpus (``.txt``, or records with ``text``: InstructGPT's
    choice, e.g. ``stage:data/pretrain.jsonl``; packed into ``ptx_block_size``-token blocks, loss on every token)"""
    ptx_batch_size: int = 32
    """demonstrations or corpus blocks per optimizer step for ``ptx_coef`` (divisible by the number of processes)"""
    ptx_block_size: int = 128
    """tokens per packed block when ``ptx_data`` is a corpus (at most the policy's context)"""
    gamma: float = 1.0
    """GAE discount"""
    lam: float = 0.95
    """GAE λ"""
    whiten_advantages: bool = True
    """ppo: whiten advantages over the batch's response tokens; grpo/rloo: divide them by their std over those
    tokens without shifting the mean (the group baseline centres them, and a shift would move a group of equal
    rewards off its zero advantage)"""
    scale_advantages: bool = True
    """grpo: divide each group's centred rewards by the group's std (Shao et al. 2024); false keeps r − mean
    (Dr. GRPO, Liu et al. 2025: the division favours groups whose rewards barely differ). TRL's default
    scale_rewards="group" is true here. ppo and rloo have no group std and ignore it"""
    loss_aggregation: LossAggregation = LossAggregation.token_mean
    """how per-token losses become the loss (policy, value, KL and entropy terms alike): token_mean (every token of
    the minibatch weighs the same; TRL's dapo, veRL's default token-mean), seq_mean_token_mean (each response's mean,
    then the mean over responses: GRPO's eq. 3, biased toward long wrong answers) or seq_mean_token_sum_norm (each
    response's sum / sampling.max_new_tokens, then the mean: Dr. GRPO)"""
    rollout_is_cap: float = 0.0
    """truncated importance sampling: multiply each token's policy loss by min(π_train/π_rollout, cap), π_rollout the
    sampler's probability of the token and π_train the training forward's; 0 disables it (TRL's default is on, cap 2,
    when it generates with vLLM). Every step logs the mean and max |log π_rollout − log π_train| either way"""
    kl_coef: float = 0.05
    """β: initial (adaptive) or fixed KL coefficient"""
    kl_in_loss: KLInLoss = KLInLoss.auto
    """auto (grpo: loss, ppo/rloo: reward), true (β·KL added to the loss) or false (−β·KL in the per-token reward)"""
    kl_estimator: KLChoice = KLChoice.auto
    """k1, k2 or k3; auto means k1 in the reward and k3 in the loss"""
    adaptive_kl: bool = False
    """adaptive β (Ziegler et al. 2019) steering the per-sequence KL to kl_target"""
    kl_target: float = 6.0
    """target per-sequence KL (nats) of the adaptive controller"""
    kl_horizon: int = 10000
    """adaptive controller horizon, in samples"""
    log_kl: bool = True
    """run the reference forward every step to log the rollouts' KL even when the KL has no weight (kl_coef 0,
    not adaptive): the report's over-optimisation plot needs it. False skips that forward then (TRL at β = 0 runs
    no reference model) and log.jsonl has no ``kl``; the held-out ``kl_from_reference`` is measured either way.
    Ignored when the KL has weight: it is computed and logged"""
    critic_warmup_steps: int = 0
    """ppo: the first this many rollouts train only the critic (the policy stays the reference, its optimizer and
    schedule wait), so that the first policy update's advantages come from values fitted to the scores the run
    sees, not from an initial head on another scale (a critic initialised from the reward model predicts raw RM
    scores while ``score_whiten`` feeds it whitened ones). veRL's ``critic_warmup``, OpenRLHF's
    ``freezing_actor_steps``; they count in ``total_steps``; 0: off"""
    critic_init: ModelRef = ""
    """critic backbone: empty means the (first) reward model when the reward is a model, else the policy"""
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    """low-rank adapters for the policy and the critic's backbone (``lora.r: 0`` trains every weight); the
    reference is then the policy with its adapter disabled (no second copy)"""
    gradient_checkpointing: bool = False
    """recompute activations in the update's backward pass (policy and critic): less memory, more compute"""
    save_every: int = 10
    """write a checkpoint every this many steps (0: never); a rerun resumes from it"""
    stop_after_steps: int = 0
    """stop (after checkpointing) once this many steps are done, without writing the final model; 0 runs to the end"""
    max_nonfinite_steps: int = 3
    """an optimizer step whose gradient norm (policy or critic) is NaN or infinite is skipped and counted; this many
    in a row stop the stage with an error, uncommitted; 0 turns the check off"""
    log_every: int = 1
    """write a log.jsonl line every this many steps"""
    seed: int = 0
    """seed for sampling, minibatch order and initialisation"""
    seeds: tuple[int, ...] = ()
    """run the stage once per seed, ``seed`` replaced by each, every run a whole output in OUT/<stage>/seed_<s>/
    (its model, log.jsonl, metrics.json) and metrics.json holding each seed's metrics; eval then reports each
    policy naming this stage's output once per seed and as mean ± sd over seeds (``rlhfkit.seeds``); empty: one
    run with ``seed``"""
    mixed_precision: MixedPrecision = MixedPrecision.auto
    """``auto`` (bf16 on a GPU, full precision on CPU), ``no``, ``bf16`` or ``fp16``"""
    report_to: tuple[str, ...] = ()
    """trackers every logged metric also goes to: tensorboard, wandb, trackio; empty (or [none]) logs only to log.jsonl"""

    def __post_init__(self):
        check_seeds(self.seeds)
        check_report_to(self.report_to)
        check_positive(lr=self.lr, critic_lr=self.critic_lr, total_steps=self.total_steps, ppo_epochs=self.ppo_epochs,
                       prompts_per_step=self.prompts_per_step, clip_eps=self.clip_eps, log_every=self.log_every,
                       ptx_batch_size=self.ptx_batch_size, ptx_block_size=self.ptx_block_size)
        check_non_negative(kl_coef=self.kl_coef, weight_decay=self.weight_decay, warmup_steps=self.warmup_steps,
                           grad_clip=self.grad_clip, entropy_coef=self.entropy_coef, vf_coef=self.vf_coef, ptx_coef=self.ptx_coef,
                           save_every=self.save_every, lambda_lr=self.lambda_lr,
                           max_nonfinite_steps=self.max_nonfinite_steps)
        check_probability(gamma=self.gamma, lam=self.lam)
        coerce_enums(self)  # enum values given as strings by Python callers (the YAML loader converts already)
        alg = self.algorithm
        if self.group_size == 0:
            object.__setattr__(self, "group_size", 1 if alg is Algorithm.ppo else 4)
        if self.group_size < alg.min_group_size:
            raise ValueError(f"algorithm {alg.value} needs group_size >= {alg.min_group_size}, got {self.group_size}")
        # Cross-field checks see each command-line override alone against the defaults, so they
        # accept what a partial override could produce (a minibatch larger than the batch).
        n, mb = self.batch_size, self.minibatch
        if self.minibatch_size <= 0 or n % mb:
            raise ValueError(f"rollout batch {n} (prompts_per_step·group_size) must be divisible by minibatch_size {mb}")
        if mb % self.grad_accum_steps:
            raise ValueError(f"minibatch_size {mb} must be divisible by grad_accum_steps {self.grad_accum_steps}")
        if self.sampling.temperature <= 0:
            raise ValueError("sampling.temperature must be > 0: RL needs a stochastic policy")
        if self.kl_uses_loss and self.estimator == "k1":
            # E_π[∇ log π] = 0: a k1 loss term has zero expected gradient (see rlhfkit.kl).
            raise ValueError("kl_estimator k1 as a loss term has zero expected gradient; use k2 or k3 in the loss")
        if self.reward_source is RewardSource.model and not self.reward_models:
            raise ValueError("reward_source is model but reward_models is empty")
        if self.reward_source is RewardSource.prm and self.prm_step_rewards and (self.score_whiten or self.score_clip > 0):
            raise ValueError("prm_step_rewards places each step's reward on its token; score_whiten and score_clip "
                             "act on whole-sequence scores, so set prm_step_rewards=false to use them")
        if not 0 <= self.critic_warmup_steps < self.total_steps:
            raise ValueError(f"critic_warmup_steps must be >= 0 and below total_steps {self.total_steps}, "
                             f"got {self.critic_warmup_steps}")
        if self.critic_warmup_steps and not Algorithm(self.algorithm).uses_critic:
            raise ValueError(f"critic_warmup_steps needs a critic: algorithm {self.algorithm} has none")
        if self.prm_coef < 0:
            raise ValueError(f"prm_coef must be >= 0 (0 disables it), got {self.prm_coef}")
        if self.prm_coef > 0 and self.reward_source is not RewardSource.model:
            raise ValueError(f"prm_coef adds PRM step rewards to a reward model's score: it needs reward_source "
                             f"model, not {self.reward_source} (reward_source prm uses the PRM alone)")
        if self.rollout_is_cap < 0:
            raise ValueError(f"rollout_is_cap must be >= 0 (0 disables it), got {self.rollout_is_cap}")

    @property
    def kl_uses_loss(self) -> bool:
        if self.kl_in_loss == "auto":
            return Algorithm(self.algorithm).default_kl_in_loss
        return self.kl_in_loss == "true"

    @property
    def estimator(self) -> str:
        if self.kl_estimator != "auto":
            return self.kl_estimator
        return "k3" if self.kl_uses_loss else "k1"

    @property
    def kl_has_weight(self) -> bool:
        """The KL can move the update: β > 0, or an adaptive β (fed the measured KL; from 0 it stays 0, but
        the controller is not second-guessed here)."""
        return self.kl_coef > 0 or self.adaptive_kl

    @property
    def reference_per_step(self) -> bool:
        """Every rollout runs the reference forward: the KL has weight, or ``log_kl`` logs it anyway."""
        return self.kl_has_weight or self.log_kl

    @property
    def old_logprobs_from_update(self) -> bool:
        """The update is exactly on-policy (one epoch, the whole rollout in one optimizer step: gradient
        accumulation inside it sees unchanged weights) and nothing needs the old log-probs before it (the
        KL enters the rewards only with weight), so they are the update's own detached log-probs, as TRL
        takes them at ``num_iterations=1``: the separate no-grad pass would give the same numbers up to
        float rounding (ratio 1, the clipped objective's gradient the plain policy gradient)."""
        kl_in_rewards = self.kl_has_weight and not self.kl_uses_loss
        return (self.ppo_epochs == 1 and self.minibatch == self.batch_size and not kl_in_rewards
                and not self.critic_warmup_steps)

    @property
    def batch_size(self) -> int:
        return self.prompts_per_step * self.group_size

    @property
    def minibatch(self) -> int:
        """Responses per optimizer step: minibatch_size, or the whole rollout batch if that is smaller."""
        return min(self.minibatch_size, self.batch_size)

    @property
    def optimizer_steps(self) -> int:
        """The critic's optimizer steps; the policy's are ``policy_optimizer_steps``."""
        return self.total_steps * self.ppo_epochs * (self.batch_size // self.minibatch)

    @property
    def policy_optimizer_steps(self) -> int:
        """The policy's optimizer steps: none in the ``critic_warmup_steps`` rollouts."""
        return (self.total_steps - self.critic_warmup_steps) * self.ppo_epochs * (self.batch_size // self.minibatch)



# ============================================================================ rollout

def make_rollout(policy, reference, critic, tokenizer, prompts: list[str], scorer: Scorer, cfg: PPOConfig,
                 seed: int, device, all_sum=None, first_chunk: int = 0, engine=None) -> Rollout:
    """This process's share of a rollout batch; ``all_sum`` (a sum over processes) makes score
    whitening use the whole batch, ``first_chunk`` is passed to ``generation.sample``. ``engine``: the
    rollout engine serving ``policy``'s current weights (``engines.make_engine``); None samples ``policy``
    with ``cfg.sampling.engine``."""
    t_start = clock(device)
    samples = sample(engine or unwrap(policy), tokenizer, prompts, cfg.sampling, seed=seed,
                     num_return_sequences=cfg.group_size, device=device, first_chunk=first_chunk, return_logprobs=True)
    t_generated = clock(device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batch = {k: v.to(device) for k, v in sequences_from_samples(samples, pad, tokenizer.eos_token_id).items()}
    # --- score: the reward source's opinion (the penalty where the response never ended), placed on the tokens
    scored = score_samples(scorer, samples, tokenizer, batch["response_mask"], cfg, all_sum=all_sum)
    # --- log-probs and values from forward passes (never from generate)
    t_scored = clock(device)
    mask = batch["response_mask"].bool()
    # Only the passes something reads: the old log-probs come from the update's own forward when it is
    # exactly on-policy (cfg.old_logprobs_from_update), and the reference is skipped when the KL has no
    # weight and log_kl is off (cfg.reference_per_step); both are then None here.
    old_logprobs = ref_logprobs = kl = None
    with torch.no_grad():  # the unwrapped models: no DDP bookkeeping outside the update
        # log-probs of the response tokens only: the output head runs where they are predicted
        if not cfg.old_logprobs_from_update:
            old_logprobs = token_logprobs(unwrap(policy), batch["input_ids"], batch["attention_mask"],
                                          cfg.sampling.temperature, scored=mask)
        t_policy = clock(device)
        if cfg.reference_per_step:
            ref_logprobs = reference_token_logprobs(policy, reference, batch["input_ids"], batch["attention_mask"],
                                                    cfg.sampling.temperature, scored=mask)
        t_reference = clock(device)
        old_values = unwrap(critic)(batch["input_ids"], batch["attention_mask"]) if critic is not None else None
    t_critic = clock(device)
    if old_logprobs is not None and ref_logprobs is not None:  # else ppo_update fills it in, or there is none
        kl = token_kl(old_logprobs, ref_logprobs, mask, cfg.estimator)
    timings = {"generation": t_generated - t_start, "scoring": t_scored - t_generated, "policy_forward": t_policy - t_scored,
               "reference": t_reference - t_policy, "critic": t_critic - t_reference}
    # The sampler's own log-probs of the tokens trained on: compared with old_logprobs (the training
    # forward's) every step, and the ratio of the two for truncated importance sampling.
    rollout_logprobs = sampler_logprobs(samples, batch["input_ids"].shape[1]).to(device)
    return Rollout(batch["input_ids"], batch["attention_mask"], batch["response_mask"], old_logprobs, ref_logprobs,
                   kl, scored.scores.to(device), scored.raw, scored.token_rewards.to(device), scored.costs, old_values,
                   samples, timings, rollout_logprobs)


# ============================================================================ advantages

def compute_advantages(ro: Rollout, cfg: PPOConfig, kl_coef: float, lagrange: float | None, all_sum=None):
    """Advantages (B, T) and value targets (B, T, H) or None, from a rollout.

    ``all_sum`` (a sum over processes): whitening uses the statistics of the whole rollout batch.

    PPO: rewards_t = token_rewards_t − β·KL_t (reward mode), GAE with the critic's values.
    GRPO/RLOO: sequence return = Σ_t rewards_t, advantage of the group, spread over its tokens
    (``scale_advantages``: GRPO's division by the group std); ``whiten_advantages`` then scales
    them by their std over the batch's tokens without re-centring, so a group of equal returns
    keeps its advantage of exactly 0 (PPO's GAE advantages are whitened: shifted and scaled).
    With a cost, the same estimator on the cost gives A_c and the combination is
    (A_r − λ·A_c) / (1 + λ) (Dai et al. 2023, eq. 10 divided by 1 + λ to keep its scale).
    """
    alg = Algorithm(cfg.algorithm)
    mask = ro.response_mask
    kl_weight = 0.0 if cfg.kl_uses_loss else kl_coef
    if kl_weight and ro.kl is None:
        raise ValueError("β·KL enters the rewards but the rollout has no KL (no reference forward ran)")
    rewards = ro.token_rewards - kl_weight * ro.kl if kl_weight else ro.token_rewards
    streams = [rewards]
    if ro.costs is not None:
        streams.append(place_token_rewards(mask.cpu(), ro.costs).to(rewards.device))
    advs, returns = [], []
    for h, r in enumerate(streams):
        if alg.uses_critic:
            a, ret = gae(r, ro.old_values[..., h], mask, cfg.gamma, cfg.lam)
            returns.append(ret)
        else:
            seq = alg.sequence_advantages((r * mask).sum(1), cfg.group_size, cfg.scale_advantages)  # (B,)
            a = seq[:, None] * mask
        if cfg.whiten_advantages:
            a = whiten(a, mask, all_sum=all_sum) if alg.uses_critic else scale_by_std(a, mask, all_sum=all_sum)
        advs.append(a)
    adv = advs[0]
    if ro.costs is not None:
        adv = (advs[0] - lagrange * advs[1]) / (1.0 + lagrange)
    return adv, (torch.stack(returns, -1) if returns else None)


# ============================================================================ update

def ppo_update(policy, critic, opt, critic_opt, sched, critic_sched, ro: Rollout, adv, returns, cfg: PPOConfig,
               kl_coef: float, accelerator, generator: torch.Generator, guard=None, ptx: PtxTerm | None = None,
               train_policy: bool = True) -> dict:
    """``ppo_epochs`` passes of shuffled minibatches; returns the mean of each diagnostic.

    With several processes (``accelerator``'s DDP) process r holds rows
    [r·b, (r+1)·b) of the rollout batch. Every process draws the same permutation of the whole
    batch, so a minibatch is the same set of rows as in one process; each process runs its own
    rows of it, weighted so that DDP's mean over processes is the gradient of the minibatch's
    loss (``cfg.loss_aggregation``: a mean over its tokens or its responses): 2 processes equal 1
    at the same global batch. With ``rollout_is_cap`` each token's policy loss is multiplied by
    min(π_train/π_rollout, cap) (``policy_losses.truncated_importance_weights``).

    A rollout without old log-probs (``PPOConfig.old_logprobs_from_update``) needs an exactly on-policy
    update, one epoch of one minibatch: each token's old log-prob is then its log-prob in this forward,
    detached (ratio 1), and they are written to ``ro.old_logprobs`` (with ``ro.kl`` when the rollout has
    reference log-probs) for the step's diagnostics, as a separate pass would have left them.

    ``ptx`` (``cfg.ptx_coef`` > 0): each minibatch's optimizer step also gets the gradient of γ × a batch of
    demonstrations' mean NLL (``rlhfkit.ptx``, drawn from ``generator``); ``ptx_nll`` is logged.

    ``train_policy`` false (``cfg.critic_warmup_steps``): the same minibatches train the critic alone; the policy
    runs no forward and its optimizer does not step.
    """
    guard = guard or NonFiniteGuard("ppo", 0, accelerator)  # none given: no check, the plain update

    agg, max_len = cfg.loss_aggregation, cfg.sampling.max_new_tokens
    if cfg.rollout_is_cap > 0 and ro.rollout_logprobs is None:
        raise ValueError("rollout_is_cap needs the sampler's log-probs (Rollout.rollout_logprobs)")
    coll = Collective(accelerator)
    world, rank = coll.world, coll.rank
    b = ro.input_ids.shape[0]
    B = b * world
    from_update = ro.old_logprobs is None
    if from_update and not train_policy:
        raise ValueError("a rollout without old log-probs needs a policy update (cfg.old_logprobs_from_update)")
    if from_update and (cfg.ppo_epochs != 1 or cfg.minibatch < B):
        raise ValueError("a rollout without old log-probs needs an exactly on-policy update (ppo_epochs 1, one "
                         f"minibatch); got ppo_epochs {cfg.ppo_epochs}, minibatch {cfg.minibatch} of {B} responses")
    kl_in_loss = cfg.kl_uses_loss and ro.ref_logprobs is not None
    if cfg.kl_uses_loss and ro.ref_logprobs is None and kl_coef:
        raise ValueError("the KL term is in the loss with weight but the rollout has no reference log-probs")
    filled = torch.zeros(ro.input_ids.shape, device=ro.input_ids.device) if from_update else None
    stats: dict[str, list[torch.Tensor]] = {}  # detached 0-d diagnostics, made numbers once at the end
    policy.train()
    if critic is not None:
        critic.train()
    for _ in range(cfg.ppo_epochs):
        perm = torch.randperm(B, generator=generator).tolist()
        for start in range(0, B, cfg.minibatch):
            mb = [i - rank * b for i in perm[start:start + cfg.minibatch] if rank * b <= i < (rank + 1) * b]
            n_units = coll.sum(agg.units(ro.response_mask[mb]))  # the minibatch's tokens (or responses)
            # grad_accum_steps micro-batches on every process (DDP syncs at each backward); one a
            # process has no rows for runs row 0 at weight 0.
            k, extra = divmod(len(mb), cfg.grad_accum_steps)
            bounds = [a * k + min(a, extra) for a in range(cfg.grad_accum_steps + 1)]
            for a in range(cfg.grad_accum_steps):
                rows = mb[bounds[a]:bounds[a + 1]]
                dummy = not rows
                idx = torch.tensor(rows or [0], device=ro.input_ids.device)
                width = int(ro.attention_mask[idx].sum(1).max())  # right padding: trim shared tail
                cut = lambda t: t[idx, :width]  # noqa: E731
                batch = {"input_ids": cut(ro.input_ids), "attention_mask": cut(ro.attention_mask)}
                mask = cut(ro.response_mask)
                # Each micro-batch's aggregate (a mean over its tokens or responses) is weighted by its
                # share of the minibatch's (times the process count, which DDP's mean divides out), so
                # accumulation gives the gradient of the minibatch's loss exactly. Every term below is
                # aggregated the same way, or the weight would be wrong for some of them.
                w = 0.0 if dummy else agg.units(mask) / n_units * world
                pm = {}
                if train_policy:
                    # response tokens only; the entropy has gradients only when it is in the loss (else it is just logged)
                    logp, ent = token_logprobs_and_entropy(policy, batch["input_ids"], batch["attention_mask"],
                                                           cfg.sampling.temperature, scored=mask.bool(),
                                                           entropy_grad=cfg.entropy_coef > 0)
                    if from_update:
                        old = logp.detach()
                        if not dummy:
                            filled[idx, :width] = old
                    else:
                        old = cut(ro.old_logprobs)
                    loss, pm = _policy_loss(logp, ent, old, cut(adv), mask, cfg,
                                            cut(ro.rollout_logprobs) if cfg.rollout_is_cap > 0 else None,
                                            cut(ro.ref_logprobs) if kl_in_loss else None, kl_coef)
                    accelerator.backward(loss * w)
                if critic is not None:
                    values = critic(batch["input_ids"], batch["attention_mask"])  # (b, width, H)
                    vloss = 0.0
                    for h in range(values.shape[-1]):
                        vl, vm = ppo_value_loss(values[..., h], cut(ro.old_values[..., h]), cut(returns[..., h]),
                                                mask, cfg.value_clip_eps, agg, max_len)
                        vloss = vloss + vl
                        if h == 0:
                            pm["value_clipfrac"] = vm["value_clipfrac"]
                    accelerator.backward(cfg.vf_coef * vloss * w)
                    pm["value_loss"] = vloss.detach()
                if not dummy:
                    for key, v in pm.items():
                        stats.setdefault(key, []).append(v)
            if ptx is not None and train_policy:
                stats.setdefault("ptx_nll", []).append(coll.sum(ptx.backward(policy, accelerator, generator, rank, world)))
            # One decision for both models (nonfinite.NonFiniteGuard, ``guard``): a non-finite gradient norm in
            # either skips both updates. Every term of the loss depends on the parameters, so a non-finite
            # loss shows in the norms, which DDP's all-reduce makes the same on every process.
            models = [(m, o, s) for m, o, s in ((policy if train_policy else None, opt, sched),
                                                 (critic, critic_opt, critic_sched)) if m is not None]
            optimizer_step(guard, models, cfg.grad_clip)
    policy.eval()
    if critic is not None:
        critic.eval()
    if from_update:
        ro.old_logprobs = filled
        if ro.ref_logprobs is not None:
            ro.kl = token_kl(filled, ro.ref_logprobs, ro.response_mask.bool(), cfg.estimator)
    # Diagnostics: one device fetch per key, summed in Python floats; over processes, the mean of their means.
    stats = {key: torch.stack(v).double().tolist() for key, v in stats.items()}
    return coll.mean_of({key: sum(v) / len(v) for key, v in stats.items()})


def _policy_loss(logp, ent, old, adv, mask, cfg: PPOConfig, rollout_logprobs=None, ref_logprobs=None,
                 kl_coef: float = 0.0) -> tuple[torch.Tensor, dict]:
    """One micro-batch's policy loss (b, T tensors of its response tokens, ``mask``): the clipped PPO objective,
    times the truncated importance weights when ``rollout_logprobs`` is given (``cfg.rollout_is_cap``), + β · the
    KL estimate to ``ref_logprobs`` when given (the KL in the loss), − ``cfg.entropy_coef`` · the entropy; and its
    detached diagnostics."""
    agg, max_len = cfg.loss_aggregation, cfg.sampling.max_new_tokens
    is_weights = None
    if rollout_logprobs is not None:
        is_weights = truncated_importance_weights(old, rollout_logprobs, mask, cfg.rollout_is_cap)
    loss, pm = ppo_policy_loss(logp, old, adv, mask, cfg.clip_eps, agg, max_len, is_weights)
    if is_weights is not None:
        pm["rollout_is_weight"] = masked_mean(is_weights, mask)
    if ref_logprobs is not None:
        kl_loss = aggregate_loss(kl_estimate(logp, ref_logprobs, cfg.estimator), mask, agg, max_len)
        loss = loss + kl_coef * kl_loss
        pm["kl_loss"] = kl_loss.detach()
    entropy = masked_mean(ent, mask)  # logged as the mean over tokens whatever the aggregation
    if cfg.entropy_coef:
        loss = loss - cfg.entropy_coef * aggregate_loss(ent, mask, agg, max_len)
    pm.update(loss=loss.detach(), entropy=entropy.detach())
    return loss, pm


# ============================================================================ the recipe

def run(cfg: PPOConfig, ctx: StageContext, reward_fn: RewardFn | None = None, ckpt_dir: Path | None = None) -> dict:
    """Train a policy with ``cfg.algorithm``; writes ``ctx.stage_dir/model`` and returns metrics.

    Every RL stage runs this recipe; ``ctx.name`` (``ppo``, ``grpo``, ``ppo_safe``, ...) names its
    policy in the metrics and its log lines. ``reward_fn`` (prompts, responses) → scores overrides the config's
    reward source (library use). Checkpoints go to ``ckpt_dir`` (default ``checkpoints.checkpoint_dir``:
    ``OUT/<name>.ckpt`` for ``OUT/<name>.partial``, none outside a stage directory), outside the stage
    directory, so a killed stage that is started over still finds them.
    """
    out, stage_dir, accelerator, name = ctx.out, ctx.stage_dir, ctx.accelerator, ctx.name
    refuse_sharded(accelerator, name)  # generation, the reference and the critic read the policy outside its forward
    log_path = stage_dir / "log.jsonl"  # this loop's own JsonlLog
    coll = Collective(accelerator)
    if cfg.prompts_per_step % coll.world:
        raise ValueError(f"prompts_per_step {cfg.prompts_per_step} must be divisible by the {coll.world} processes "
                         "(each samples and scores its share of the prompts)")
    device = accelerator.device
    t0 = time.time()
    # --- inputs, checked before any model is loaded
    policy_path = ctx.model(cfg.policy, "policy")
    records = load_prompts(ctx.resolve(cfg.data, key="data"))
    prompts = [r.prompt for r in records]
    problems = {r.prompt: Problem.from_meta(r.meta) for r in records if r.meta is not None}
    if len(prompts) < cfg.prompts_per_step:
        raise ValueError(f"{records[0].where.rsplit(':', 1)[0]}: {len(prompts)} prompts, fewer than prompts_per_step {cfg.prompts_per_step}")
    scorer = make_scorer(cfg, out, records, reward_fn, TASK_JUDGES, device=device)

    # --- models: policy (trainable), reference (frozen, eval), critic (PPO only)
    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(policy_path)
    ptx = None
    if cfg.ptx_coef > 0:  # the demonstrations validated (file:line on a bad or too long one) before any model loads
        context = getattr(model_config(policy_path), "max_position_embeddings", None) or 1 << 30
        examples, collate = load_ptx_examples(ctx.resolve(cfg.ptx_data, key="ptx_data"), tokenizer, context,
                                              cfg.ptx_block_size)
        ptx = PtxTerm(examples, cfg.ptx_coef, cfg.ptx_batch_size, tokenizer.pad_token_id, collate)
    policy = load_causal_lm(policy_path)
    disable_dropout(policy)
    reference = None
    policy = make_trainable(policy, cfg.lora, cfg.gradient_checkpointing)
    if not cfg.lora.enabled:  # under LoRA the reference is this model with the adapter disabled
        reference = load_causal_lm(policy_path, dtype=frozen_dtype(cfg.mixed_precision)).to(device)  # bf16 under bf16
        disable_dropout(reference)
        reference.eval().requires_grad_(False)
    critic = None
    if Algorithm(cfg.algorithm).uses_critic:
        if cfg.critic_init:
            critic_path = ctx.model(cfg.critic_init, "critic_init")
        elif cfg.reward_source is RewardSource.model and reward_fn is None:
            critic_path = run_path(out, cfg.reward_models[0])
        else:
            critic_path = policy_path
        critic = build_critic(critic_path, 2 if cfg.cost_model else 1, cfg.seed, cfg.lora, cfg.gradient_checkpointing)
    opt_cfg = TrainConfig(lr=cfg.lr, weight_decay=cfg.weight_decay, warmup_steps=cfg.warmup_steps, scheduler=cfg.scheduler)
    opt, sched = make_optimizer_and_scheduler(policy, opt_cfg, cfg.policy_optimizer_steps)
    critic_opt = critic_sched = None
    if critic is not None:
        copt_cfg = TrainConfig(lr=cfg.critic_lr, weight_decay=cfg.weight_decay, warmup_steps=cfg.warmup_steps, scheduler=cfg.scheduler)
        critic_opt, critic_sched = make_optimizer_and_scheduler(critic, copt_cfg, cfg.optimizer_steps)
        critic = critic.to(device)
    policy = policy.to(device)
    policy.eval()

    # --- controllers
    kl_ctl = (AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.adaptive_kl
              else FixedKLController(cfg.kl_coef))
    lagrange = LagrangeMultiplier(cfg.lambda_init, cfg.lambda_lr, cfg.lambda_max) if cfg.cost_model else None

    # --- resume (a checkpoint's config must match, less stop_after_steps and save_every: a rerun that changes them resumes)
    log = JsonlLog(log_path, enabled=accelerator.is_main_process, accelerator=accelerator)
    objects = {"policy": policy, "critic": critic, "opt": opt, "critic_opt": critic_opt, "sched": sched, "critic_sched": critic_sched}
    guard = NonFiniteGuard(name, cfg.max_nonfinite_steps, accelerator)
    controllers = {"kl": kl_ctl, "lambda": lagrange, "nonfinite": guard}
    checkpoint = LoopCheckpoint(ckpt_dir or checkpoint_dir(stage_dir), cfg, accelerator, log, name)
    start, _ = checkpoint.resume(objects, controllers)
    # DDP under `accelerate launch`/torchrun (a no-op wrapper in one process); the schedulers stay
    # out of prepare(): accelerate would step them once per process. Checkpoints hold the unwrapped objects.
    policy, opt = accelerator.prepare(policy, opt)
    if critic is not None:
        critic, critic_opt = accelerator.prepare(critic, critic_opt)
    # This process's share of each step's prompts, and where its sampling chunks fall in one process's draw.
    per_rank = cfg.prompts_per_step // coll.world
    first_chunk = coll.rank * -(-per_rank // cfg.sampling.batch_size)
    # The rollout engine, given the (resumed) weights now and the policy's after every update.
    engine = make_engine(cfg.sampling, accelerator.unwrap_model(policy), tokenizer, device)

    # --- the loop
    gold_available = bool(problems) and len(problems) == len(prompts)
    last = {}
    bar = tqdm(total=cfg.total_steps, initial=start, desc=name, disable=not accelerator.is_main_process)
    try:
        batches = global_batches(len(prompts), cfg.prompts_per_step, cfg.total_steps, cfg.seed, start_step=start)
        for step, idx in enumerate(batches, start=start):
            t_step = time.time()
            mine = idx[coll.rank * per_rank:(coll.rank + 1) * per_rank]
            ro = make_rollout(policy, reference, critic, tokenizer, [prompts[i] for i in mine], scorer, cfg,
                              seed=cfg.seed * 1_000_003 + step, device=device, all_sum=coll.sum, first_chunk=first_chunk,
                              engine=engine)
            engine.sleep()  # vllm: its GPU memory goes to the update
            every = lambda t: coll.gather(t.float().cpu())  # noqa: E731  (B,): the whole batch, in rank order
            mean_cost = float(every(ro.costs).mean()) if ro.costs is not None else None
            if lagrange is not None:
                lagrange.update(mean_cost, cfg.cost_threshold)  # λ first, then the advantages that use it
            adv, returns = compute_advantages(ro, cfg, kl_ctl.value, lagrange.value if lagrange else None, all_sum=coll.sum)
            gen = torch.Generator().manual_seed(cfg.seed * 7_919 + step)
            t_update = clock(device)
            stats = ppo_update(policy, critic, opt, critic_opt, sched, critic_sched, ro, adv, returns, cfg,
                               kl_ctl.value, accelerator, gen, guard, ptx, train_policy=step >= cfg.critic_warmup_steps)
            update_s = clock(device) - t_update
            engine.sync_weights(accelerator.unwrap_model(policy))  # the next rollout samples the updated policy
            rec = {
                "step": step + 1,
                **rollout_metrics(ro, kl_ctl.value, coll),  # reward, KL, lengths, sampler drift (rl_metrics)
                "lr": sched.get_last_lr()[0],
                "step_time_s": time.time() - t_step,
                # where the step's time went (this process's clock; the rest is advantages and logging):
                # time_forward_s is the rollout's no-grad forwards (policy log-probs, reference, critic: each 0
                # when skipped), of which time_reference_s and time_critic_s
                "time_generation_s": ro.timings["generation"],
                "time_scoring_s": ro.timings["scoring"],
                "time_forward_s": ro.timings["policy_forward"] + ro.timings["reference"] + ro.timings["critic"],
                "time_reference_s": ro.timings["reference"],
                "time_critic_s": ro.timings["critic"],
                "time_update_s": update_s,
                **stats,
            }
            if returns is not None:
                rec["explained_variance"] = explained_variance(returns[..., 0], ro.old_values[..., 0], ro.response_mask,
                                                               all_sum=coll.sum)
            if "kl" in rec:  # absent only without a reference forward: β fixed at 0 (cfg.reference_per_step)
                kl_ctl.update(rec["kl"], cfg.batch_size)
            if mean_cost is not None:
                rec.update(cost=mean_cost, **{"lambda": lagrange.value})
            if gold_available:
                # The oracle's opinion of the very responses trained on: a diagnostic only, never a reward
                # here (unless reward is judge), for the gold-vs-proxy over-optimisation plot.
                gold = [judge(problems[s.prompt], s.text).score if s.finished else 0.0 for s in ro.samples]
                rec["gold_score"] = float(every(torch.tensor(gold)).mean())
            last = rec
            if step % cfg.log_every == 0 or step == cfg.total_steps - 1:
                log.write(rec)
            bar.update(1)
            bar.set_postfix({"reward": f"{rec['reward']:.3f}", **({"kl": f"{rec['kl']:.3f}"} if "kl" in rec else {}),
                             "gen": f"{rec['time_generation_s']:.2f}s", "score": f"{rec['time_scoring_s']:.2f}s",
                             "fwd": f"{rec['time_forward_s']:.2f}s", "update": f"{update_s:.2f}s"})
            # every save_every steps and at stop_after_steps; then StoppedEarly at stop_after_steps
            checkpoint.after_step(step + 1, cfg.total_steps, objects, controllers)
    finally:
        bar.close()
        log.close()

    # --- final figures on held-out prompts: KL from the reference, and cost when constrained
    final = {}
    held_path = ctx.resolve(cfg.heldout) if cfg.heldout else None
    if held_path is not None and held_path.exists() and accelerator.is_main_process:
        final = heldout_figures(accelerator.unwrap_model(policy), reference, tokenizer,
                                [r.prompt for r in load_prompts(held_path)], scorer, cfg, device, engine)
    engine.close()
    if accelerator.is_main_process:
        save_trained(accelerator.unwrap_model(policy), tokenizer, stage_dir, cfg.lora)
    runtime = time.time() - t0
    policy_entry = dict(final)
    if cfg.cost_model:
        policy_entry["cost_threshold"] = cfg.cost_threshold
    return {
        "policies": {name: policy_entry},
        "algorithm": Algorithm(cfg.algorithm).value,
        "final_step": last,
        "total_steps": cfg.total_steps,
        "samples_seen": cfg.total_steps * cfg.batch_size,
        "resumed_from_step": start,
        **guard.metrics(),
        "critic_initialised_from_reward_head": critic is not None and accelerator.unwrap_model(critic).initialised_from_head,
        "train_runtime_s": runtime,
    }
