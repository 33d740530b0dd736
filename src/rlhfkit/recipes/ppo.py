"""RL fine-tuning against a reward: PPO with a critic, and the critic-free GRPO and RLOO.

One loop, read top to bottom in ``run``; every step is

    rollout   sample K responses per prompt (``generation.sample``: KV cache, temperature,
              top-p), cut after the first EOS; a response that never ends is unfinished
    score     a sequence score from the reward source (reward model, ensemble − penalty·std,
              PRM, the task judge, or any Python callable), the unfinished penalty in place
              of the score of an unfinished response; optionally PRM step rewards at the
              newline token that closes each step; optionally a cost from a cost model
    KL        log-probs of the policy and the frozen reference recomputed by a forward pass
              (never taken from ``generate``, whose own log-probs are only compared with them
              and logged), a per-token KL estimate (k1/k2/k3) either subtracted from the
              reward (β·KL, fixed or adaptive β) or added to the loss
    advantage PPO: GAE on per-token rewards with the critic's values; GRPO: group-normalised
              sequence returns; RLOO: leave-one-out baseline. Safe RLHF combines reward and
              cost advantages, (A_r − λ·A_c) / (1 + λ), with λ updated online
    update    several epochs of shuffled minibatches (gradient accumulation inside), clipped
              policy loss, clipped value loss for the critic, each aggregated over tokens or
              responses (``loss_aggregation``), gradient clipping

The algorithms differ only in data (``Algorithm``'s properties), never in a buried branch.
Tokens are indexed by the *action* position t of the right-padded prompt+response batch:
``logprobs[:, t]`` = log π(x_t | x_<t), ``values[:, t]`` = V(x_<t), ``rewards[:, t]`` the reward
for emitting x_t, ``response_mask[:, t]`` = 1 on response tokens (EOS included when finished).
Dropout is off in every model; the reference is frozen and in eval mode; under LoRA it is
the policy with its adapter disabled (no second copy). Checkpoints (every ``save_every``
steps, atomic) hold everything a resumed run needs to end with the same weights.
"""
from __future__ import annotations

import importlib
import math
import time
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Callable, Sequence

import torch

from rlhfkit.checkpoints import StoppedEarly, checkpoint_config, load_checkpoint, save_checkpoint
from rlhfkit.config import ConfigError, check_non_negative, check_positive, check_probability, coerce_enums
from rlhfkit.generation import SamplingConfig
from rlhfkit.paths import ConfigPath, ModelRef, run_path, stage_hint
from rlhfkit.policy_losses import LossAggregation
from rlhfkit.models.trainable import LoRAConfig, add_lora, disable_dropout, make_trainable, reference_mode, save_trained
from rlhfkit.stage import StageContext
from rlhfkit.tracking import check_report_to
from rlhfkit.training import MixedPrecision, Scheduler

RewardFn = Callable[[Sequence[str], Sequence[str]], Sequence[float]]


class Algorithm(StrEnum):
    """Which advantage estimator; members answer the questions the recipe asks."""

    ppo = "ppo"
    grpo = "grpo"
    rloo = "rloo"

    @property
    def uses_critic(self) -> bool:
        """Whether a value model is trained and GAE gives per-token advantages."""
        return self is Algorithm.ppo

    @property
    def min_group_size(self) -> int:
        """GRPO and RLOO compare the K samples of one prompt, so they need K ≥ 2."""
        return 1 if self is Algorithm.ppo else 2

    @property
    def default_kl_in_loss(self) -> bool:
        """GRPO puts a k3 KL term in the loss (Shao et al. 2024, eq. 3); PPO and RLOO penalise the reward."""
        return self is Algorithm.grpo

    def sequence_advantages(self, returns: torch.Tensor, group_size: int, scale: bool = True) -> torch.Tensor:
        """(B,) sequence returns → (B,) advantages for the critic-free members; ``scale`` divides GRPO's by the group std."""
        from rlhfkit.advantages import group_normalized_advantages, rloo_advantages

        if self is Algorithm.grpo:
            return group_normalized_advantages(returns, group_size, scale=scale)
        return rloo_advantages(returns, group_size)


class RewardSource(StrEnum):
    """Where the sequence score comes from."""

    model = "model"  # one or more reward-model directories (several: an ensemble)
    prm = "prm"  # a process reward model: per-step probabilities
    judge = "judge"  # the embedded task's oracle (an experiment control: never what the quickstart trains on)
    callable = "callable"  # any Python function (prompts, responses) -> scores, named "module:function"


class KLInLoss(StrEnum):
    """Where the KL penalty goes."""

    auto = "auto"
    """the algorithm's default (``Algorithm.default_kl_in_loss``)"""
    true = "true"
    """β·KL added to the loss"""
    false = "false"
    """−β·KL in the per-token reward"""


class KLChoice(StrEnum):
    """Which KL estimator (``rlhfkit.kl.KLEstimator``), or ``auto``: k1 in the reward, k3 in the loss."""

    auto = "auto"
    k1 = "k1"
    k2 = "k2"
    k3 = "k3"


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
    reward_fn: str = ""
    """``module:function`` taking (prompts, responses) and returning scores, when reward_source is callable"""
    unfinished_score: float = -1.0
    """score of a response that never emitted EOS within sampling.max_new_tokens: it replaces the reward
    source's score (it is not added to it); EOS is looked for in the generated tokens only"""
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
    mixed_precision: MixedPrecision = MixedPrecision.auto
    """``auto`` (bf16 on a GPU, full precision on CPU), ``no``, ``bf16`` or ``fp16``"""
    report_to: tuple[str, ...] = ()
    """trackers every logged metric also goes to: tensorboard, wandb, trackio; empty (or [none]) logs only to log.jsonl"""

    def __post_init__(self):
        check_report_to(self.report_to)
        check_positive(lr=self.lr, critic_lr=self.critic_lr, total_steps=self.total_steps, ppo_epochs=self.ppo_epochs,
                       prompts_per_step=self.prompts_per_step, clip_eps=self.clip_eps, log_every=self.log_every)
        check_non_negative(kl_coef=self.kl_coef, weight_decay=self.weight_decay, warmup_steps=self.warmup_steps,
                           grad_clip=self.grad_clip, entropy_coef=self.entropy_coef, vf_coef=self.vf_coef,
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
    def batch_size(self) -> int:
        return self.prompts_per_step * self.group_size

    @property
    def minibatch(self) -> int:
        """Responses per optimizer step: minibatch_size, or the whole rollout batch if that is smaller."""
        return min(self.minibatch_size, self.batch_size)

    @property
    def optimizer_steps(self) -> int:
        return self.total_steps * self.ppo_epochs * (self.batch_size // self.minibatch)


# ============================================================================ models

class Critic(torch.nn.Module):
    """A transformer backbone and a linear head of ``n_values`` outputs (reward value, cost value).

    forward(input_ids, attention_mask) → (B, T, n_values) aligned with actions: ``out[:, t]``
    is V(x_<t), read from the hidden state at t − 1 (the state before x_t is emitted).
    """

    def __init__(self, backbone: torch.nn.Module, n_values: int):
        super().__init__()
        self.backbone = backbone
        self.head = torch.nn.Linear(backbone.config.hidden_size, n_values)
        torch.nn.init.zeros_(self.head.weight)
        torch.nn.init.zeros_(self.head.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, h)
        values = self.head(hidden.float())  # (B, T, H)
        return torch.nn.functional.pad(values[:, :-1], (0, 0, 1, 0))  # shift: V(x_<t) at t


def _scalar_head(path: Path, hidden: int) -> dict | None:
    """The reward model's head, ``{"weight": (1, hidden), "bias": (1,)}``, if ``path`` is a reward-model directory."""
    from safetensors.torch import load_file

    from rlhfkit.models.reward import HEAD_WEIGHTS

    f = Path(path) / HEAD_WEIGHTS
    if not f.exists():
        return None
    head = load_file(str(f))
    if tuple(head["weight"].shape) != (1, hidden):
        raise ValueError(f"{f}: head weight {tuple(head['weight'].shape)} does not fit hidden size {hidden}")
    return head


def build_critic(path: Path, n_values: int, seed: int) -> Critic:
    """Critic from ``path``'s backbone; its first head row from the reward model's scalar head when present.

    Initialising from the reward model means V(x_<t) starts near the RM's opinion of the
    prefix, so early advantages are informative instead of noise from a random head.
    """
    from transformers import AutoModel

    torch.manual_seed(seed)
    backbone = AutoModel.from_pretrained(str(path))
    critic = Critic(backbone, n_values)
    head = _scalar_head(Path(path), backbone.config.hidden_size)
    if head is not None:
        with torch.no_grad():  # row 0 (reward value) from the RM; a cost value row stays 0
            critic.head.weight[0].copy_(head["weight"][0].float())
            critic.head.bias[0].copy_(head["bias"][0].float())
    critic.initialised_from_head = head is not None
    return critic


# ============================================================================ scoring

def line_end_positions(tokenizer, response_ids: Sequence[int], n_tokens: int) -> list[int]:
    """Index (within the response's ``n_tokens`` tokens) of the token closing each line of ``response_lines``.

    Line k < last ends at the token holding the k-th newline inside the stripped text; the last
    line ends at the last token (the EOS of a finished response). Offsets come from cumulative
    decoding of the sampled ids, never from re-tokenising the text (which may split differently).
    """
    text = tokenizer.decode(list(response_ids), skip_special_tokens=True)
    lo, hi = len(text) - len(text.lstrip()), len(text.rstrip())
    if lo >= hi:
        return []
    ends = [len(tokenizer.decode(list(response_ids[: i + 1]), skip_special_tokens=True)) for i in range(len(response_ids))]
    positions = []
    for c, ch in enumerate(text):
        if ch == "\n" and lo <= c < hi:
            positions.append(next(i for i, e in enumerate(ends) if e > c))
    return positions + [n_tokens - 1]


def place_token_rewards(
    response_mask: torch.Tensor, scores: torch.Tensor, step_rewards: Sequence[Sequence[tuple[int, float]]] | None = None
) -> torch.Tensor:
    """Per-token rewards (B, T): each sequence score at its last response token, step rewards at their tokens.

    response_mask (B, T); scores (B,); step_rewards[b] = [(index within the response, reward)].
    The last response token is found from the mask, never from "the first pad", so it is right
    whatever the padding and when pad == EOS.
    """
    B, T = response_mask.shape
    rewards = torch.zeros(B, T, dtype=torch.float32)
    first = response_mask.float().argmax(dim=1)  # (B,) first response position
    last = T - 1 - response_mask.flip(1).float().argmax(dim=1)  # (B,) last response position
    rewards[torch.arange(B), last] += scores.float()
    if step_rewards is not None:
        for b, steps in enumerate(step_rewards):
            for i, r in steps:
                rewards[b, first[b] + i] += r
    return rewards


def prm_step_rewards(step_probs: Sequence[float], floor: float) -> list[float]:
    """Step rewards from a PRM's q_k = P(steps 1..k are right): r_k = log q_k − log q_{k−1}, q_0 = 1.

    r_k is how much step k changed the log-probability that the solution is right so far. The
    rewards telescope to log q_K = log P(every step right) (Lightman et al. 2023's aggregation),
    so per-step and outcome-only placement give a response the same total and differ only in
    credit assignment. q is clamped to ``floor`` first, so one hopeless step costs at most log(1/floor).
    """
    logs = [0.0] + [math.log(max(q, floor)) for q in step_probs]
    return [b - a for a, b in zip(logs, logs[1:])]


@dataclass
class Scorer:
    """Sequence scores (and PRM step rewards) for (prompt, response) pairs; cost when constrained."""

    outcome: Callable[[list[str], list[str]], list[float]] | None
    steps: Callable[[list[str], list[str]], list[list[float]]] | None
    cost: Callable[[list[str], list[str]], list[float]] | None


def _import_callable(spec: str) -> RewardFn:
    # Checked here, not in __post_init__: each command-line override is validated alone against
    # the defaults, so "reward_source=callable reward_fn=m:f" would fail on its first half there.
    if ":" not in spec:
        raise ValueError(f"reward_source is callable: reward_fn must be 'module:function', got {spec!r}")
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def make_scorer(cfg: PPOConfig, out: Path, problems_by_prompt: dict, reward_fn: RewardFn | None = None) -> Scorer:
    """Build the reward (and cost) functions the config names; fail before any training if a model is missing."""
    outcome = steps = cost = None
    if reward_fn is not None:
        outcome = lambda p, r: [float(x) for x in reward_fn(p, r)]  # noqa: E731
    elif cfg.reward_source is RewardSource.callable:
        fn = _import_callable(cfg.reward_fn)
        outcome = lambda p, r: [float(x) for x in fn(p, r)]  # noqa: E731
    elif cfg.reward_source is RewardSource.judge:
        from rlhfkit.tasks.arith_judge import judge

        if not problems_by_prompt:
            raise ValueError("reward_source judge needs prompts with task 'meta'")
        outcome = lambda p, r: [judge(problems_by_prompt[x], y).score for x, y in zip(p, r)]  # noqa: E731
    elif cfg.reward_source is RewardSource.model:
        from rlhfkit.models.reward_files import load_reward_model

        members = []
        for rel in cfg.reward_models:
            path = run_path(out, rel)
            if not path.exists():
                raise ConfigError(f"reward_models: {path} does not exist (run the reward stage first){stage_hint(rel, out)}")
            members.append(load_reward_model(path))

        def outcome(p, r):
            s = torch.tensor([m.score(p, r) for m in members], dtype=torch.float64)  # (M, B)
            if len(members) == 1:
                return s[0].tolist()
            # Uncertainty penalty: members disagree most where the RM is extrapolating.
            return (s.mean(0) - cfg.ensemble_penalty * s.std(0, unbiased=True)).tolist()
    else:  # prm
        from rlhfkit.models.reward_files import load_reward_model

        path = run_path(out, cfg.prm)
        if not path.exists():
            raise ConfigError(f"prm: {path} does not exist (run the reward stage first){stage_hint(cfg.prm, out)}")
        prm = load_reward_model(path)

        def steps(p, r):
            return [prm_step_rewards(row, cfg.prm_floor) for row in prm.step_scores(p, r)]
    if cfg.cost_model:
        from rlhfkit.models.reward_files import load_reward_model

        path = run_path(out, cfg.cost_model)
        if not path.exists():
            raise ConfigError(f"cost_model: {path} does not exist (run the reward stage first){stage_hint(cfg.cost_model, out)}")
        cost_model = load_reward_model(path)
        cost = lambda p, r: [float(x) for x in cost_model.score(p, r)]  # noqa: E731
    return Scorer(outcome, steps, cost)


# ============================================================================ forward passes

def policy_forward(model, batch: dict, temperature: float, with_entropy: bool = False):
    """Training-pass log-probs (B, T) at the sampling temperature (position 0 is 0), and entropy (B, T)."""
    from rlhfkit.policy_losses import entropy_from_logits, logprobs_from_logits

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    logits = logits / temperature
    logp = torch.nn.functional.pad(logprobs_from_logits(logits, batch["input_ids"][:, 1:]), (1, 0))
    ent = torch.nn.functional.pad(entropy_from_logits(logits), (1, 0)) if with_entropy else None
    return logp, ent


def reference_forward(policy, reference, batch: dict, temperature: float) -> torch.Tensor:
    """Frozen reference log-probs: a separate copy, or the LoRA policy with its adapter disabled."""
    with torch.no_grad():
        if reference is not None:
            return policy_forward(reference, batch, temperature)[0]
        with reference_mode(policy) as base:
            return policy_forward(base, batch, temperature)[0]


# ============================================================================ rollout

@dataclass
class Rollout:
    """One rollout batch: everything the update needs, (B, T) unless noted."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    old_logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    kl: torch.Tensor  # per-token estimate with the configured estimator
    scores: torch.Tensor  # (B,) sequence scores (after penalty / whitening / clipping)
    raw_scores: torch.Tensor  # (B,) as the reward source gave them (penalty for unfinished)
    token_rewards: torch.Tensor  # reward per token, before the KL term
    costs: torch.Tensor | None  # (B,)
    old_values: torch.Tensor | None  # (B, T, H)
    samples: list
    timings: dict[str, float] = field(default_factory=dict)  # seconds: generation, scoring, forward
    rollout_logprobs: torch.Tensor | None = None  # the sampler's log-probs of the same tokens (a diagnostic; TIS)


def _clock(device) -> float:
    """``time.perf_counter()`` once ``device`` has finished its queued work (CUDA kernels run
    asynchronously: without the sync a phase's GPU time would be charged to the next one)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def make_rollout(policy, reference, critic, tokenizer, prompts: list[str], scorer: Scorer, cfg: PPOConfig,
                 seed: int, device, all_sum=None, first_chunk: int = 0) -> Rollout:
    """This process's share of a rollout batch; ``all_sum`` (a sum over processes) makes score
    whitening use the whole batch, ``first_chunk`` is passed to ``generation.sample``."""
    from rlhfkit.generation import sample, sampler_logprobs, sequences_from_samples, unwrap

    t_start = _clock(device)
    samples = sample(unwrap(policy), tokenizer, prompts, cfg.sampling, seed=seed,
                     num_return_sequences=cfg.group_size, device=device, first_chunk=first_chunk, return_logprobs=True)
    t_generated = _clock(device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batch = {k: v.to(device) for k, v in sequences_from_samples(samples, pad, tokenizer.eos_token_id).items()}
    texts = [s.text for s in samples]
    ps = [s.prompt for s in samples]
    finished = torch.tensor([s.finished for s in samples])
    # --- score: the reward source's opinion, replaced by the penalty where the response never ended
    if scorer.steps is not None:
        step_lp = scorer.steps(ps, texts)
        outcome = torch.tensor([sum(row) for row in step_lp], dtype=torch.float32)
    else:
        step_lp = None
        outcome = torch.tensor(scorer.outcome(ps, texts), dtype=torch.float32)
    if step_lp is not None:
        # A PRM has no step to judge in an empty response: its Σ log q over zero steps would be 0,
        # the best possible score. It is not an answer at all; it gets the unfinished penalty.
        finished = finished & torch.tensor([len(row) > 0 for row in step_lp])
    raw = torch.where(finished, outcome, torch.full_like(outcome, cfg.unfinished_score))
    scores = raw.clone()
    if cfg.score_whiten:
        from rlhfkit.advantages import whiten

        scores = whiten(scores, all_sum=all_sum)
    if cfg.score_clip > 0:
        scores = scores.clamp(-cfg.score_clip, cfg.score_clip)
    n_resp = batch["response_mask"].sum(1).tolist()
    if step_lp is not None and cfg.prm_step_rewards:
        # Step rewards at each newline token; finished responses only (an unfinished one gets
        # the penalty alone). The per-step rewards sum to the sequence score placed otherwise.
        placed = []
        for b, s in enumerate(samples):
            if not finished[b]:
                placed.append([])
                continue
            pos = line_end_positions(tokenizer, s.response_ids, int(n_resp[b]))
            if len(pos) != len(step_lp[b]):
                raise ValueError(f"PRM gave {len(step_lp[b])} step scores for a response of {len(pos)} lines: {s.text!r}")
            placed.append(list(zip(pos, step_lp[b])))
        outcome_part = torch.where(finished, torch.zeros_like(scores), scores)
        token_rewards = place_token_rewards(batch["response_mask"].cpu(), outcome_part, placed)
    else:
        token_rewards = place_token_rewards(batch["response_mask"].cpu(), scores)
    costs = torch.tensor(scorer.cost(ps, texts), dtype=torch.float32) if scorer.cost is not None else None
    # --- log-probs and values from forward passes (never from generate)
    from rlhfkit.kl import kl_estimate

    t_scored = _clock(device)
    with torch.no_grad():  # the unwrapped models: no DDP bookkeeping outside the update
        old_logprobs = policy_forward(unwrap(policy), batch, cfg.sampling.temperature)[0]
        ref_logprobs = reference_forward(policy, reference, batch, cfg.sampling.temperature)
        old_values = unwrap(critic)(batch["input_ids"], batch["attention_mask"]) if critic is not None else None
    mask = batch["response_mask"].bool()
    kl = torch.where(mask, kl_estimate(old_logprobs, ref_logprobs, cfg.estimator), torch.zeros_like(old_logprobs))
    timings = {"generation": t_generated - t_start, "scoring": t_scored - t_generated, "forward": _clock(device) - t_scored}
    # The sampler's own log-probs of the tokens trained on: compared with old_logprobs (the training
    # forward's) every step, and the ratio of the two for truncated importance sampling.
    rollout_logprobs = sampler_logprobs(samples, batch["input_ids"].shape[1]).to(device)
    return Rollout(batch["input_ids"], batch["attention_mask"], batch["response_mask"], old_logprobs, ref_logprobs,
                   kl, scores.to(device), raw, token_rewards.to(device), costs, old_values, samples, timings,
                   rollout_logprobs)


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
    from rlhfkit.advantages import gae, scale_by_std, whiten

    alg = Algorithm(cfg.algorithm)
    mask = ro.response_mask
    rewards = ro.token_rewards - (0.0 if cfg.kl_uses_loss else kl_coef) * ro.kl
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
               kl_coef: float, accelerator, generator: torch.Generator, guard=None) -> dict:
    """``ppo_epochs`` passes of shuffled minibatches; returns the mean of each diagnostic.

    With several processes (``accelerator``'s DDP) process r holds rows
    [r·b, (r+1)·b) of the rollout batch. Every process draws the same permutation of the whole
    batch, so a minibatch is the same set of rows as in one process; each process runs its own
    rows of it, weighted so that DDP's mean over processes is the gradient of the minibatch's
    loss (``cfg.loss_aggregation``: a mean over its tokens or its responses): 2 processes equal 1
    at the same global batch. With ``rollout_is_cap`` each token's policy loss is multiplied by
    min(π_train/π_rollout, cap) (``policy_losses.truncated_importance_weights``).
    """
    from rlhfkit.kl import kl_estimate
    from rlhfkit.losses import masked_mean
    from rlhfkit.policy_losses import aggregate_loss, ppo_policy_loss, ppo_value_loss, truncated_importance_weights
    from rlhfkit.nonfinite import NonFiniteGuard
    from rlhfkit.training import Collective

    guard = guard or NonFiniteGuard("ppo", 0, accelerator)  # none given: no check, the plain update

    agg, max_len = cfg.loss_aggregation, cfg.sampling.max_new_tokens
    if cfg.rollout_is_cap > 0 and ro.rollout_logprobs is None:
        raise ValueError("rollout_is_cap needs the sampler's log-probs (Rollout.rollout_logprobs)")
    coll = Collective(accelerator)
    world, rank = coll.world, coll.rank
    b = ro.input_ids.shape[0]
    B = b * world
    stats: dict[str, list[float]] = {}
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
                logp, ent = policy_forward(policy, batch, cfg.sampling.temperature, with_entropy=True)
                is_weights = None
                if cfg.rollout_is_cap > 0:
                    is_weights = truncated_importance_weights(cut(ro.old_logprobs), cut(ro.rollout_logprobs), mask,
                                                              cfg.rollout_is_cap)
                loss, pm = ppo_policy_loss(logp, cut(ro.old_logprobs), cut(adv), mask, cfg.clip_eps, agg, max_len,
                                           is_weights)
                if is_weights is not None:
                    pm["rollout_is_weight"] = masked_mean(is_weights, mask).item()
                if cfg.kl_uses_loss:
                    kl_loss = aggregate_loss(kl_estimate(logp, cut(ro.ref_logprobs), cfg.estimator), mask, agg, max_len)
                    loss = loss + kl_coef * kl_loss
                    pm["kl_loss"] = kl_loss.item()
                entropy = masked_mean(ent, mask)  # logged as the mean over tokens whatever the aggregation
                if cfg.entropy_coef:
                    loss = loss - cfg.entropy_coef * aggregate_loss(ent, mask, agg, max_len)
                accelerator.backward(loss * w)
                pm.update(loss=loss.item(), entropy=entropy.item())
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
                    pm["value_loss"] = float(vloss.detach())
                if not dummy:
                    for key, v in pm.items():
                        stats.setdefault(key, []).append(v)
            # One decision for both models (nonfinite.NonFiniteGuard, ``guard``): a non-finite gradient norm in
            # either skips both updates. Every term of the loss depends on the parameters, so a non-finite
            # loss shows in the norms, which DDP's all-reduce makes the same on every process.
            models = [(m, o, s) for m, o, s in ((policy, opt, sched), (critic, critic_opt, critic_sched)) if m is not None]
            norms = [guard.grad_norm(m, cfg.grad_clip) for m, _, _ in models]
            guard.step(None, None, norms, [(o, s) for _, o, s in models])
    policy.eval()
    if critic is not None:
        critic.eval()
    # Diagnostics: with several processes, the mean of the processes' means.
    return coll.mean_of({key: sum(v) / len(v) for key, v in stats.items()})


# ============================================================================ the recipe

def run(cfg: PPOConfig, ctx: StageContext, reward_fn: RewardFn | None = None, ckpt_dir: Path | None = None) -> dict:
    """Train a policy with ``cfg.algorithm``; writes ``ctx.stage_dir/model`` and returns metrics.

    Every RL stage runs this recipe; ``ctx.name`` (``ppo``, ``grpo``, ``ppo_safe``, ...) names its
    outputs and checkpoints. ``reward_fn`` (prompts, responses) → scores overrides the config's
    reward source (library use). Checkpoints go to ``ckpt_dir`` (default ``OUT/<name>.ckpt``),
    outside the stage directory, so a killed stage that is started over still finds them.
    """
    from rlhfkit.data.loading import load_prompts
    from rlhfkit.io import JsonlLog
    from rlhfkit.kl import AdaptiveKLController, FixedKLController, LagrangeMultiplier
    from rlhfkit.models.loading import load_causal_lm, load_tokenizer
    from rlhfkit.tasks.arith import Problem
    from rlhfkit.nonfinite import NonFiniteGuard
    from rlhfkit.training import Collective, TrainConfig, global_batches, make_optimizer_and_scheduler

    out, stage_dir, accelerator, name = ctx.out, ctx.stage_dir, ctx.accelerator, ctx.name
    log_path = stage_dir / "log.jsonl"  # this loop's own JsonlLog: reopened around each checkpoint
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
    scorer = make_scorer(cfg, out, problems, reward_fn)

    # --- models: policy (trainable), reference (frozen, eval), critic (PPO only)
    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(policy_path)
    policy = load_causal_lm(policy_path)
    disable_dropout(policy)
    reference = None
    policy = make_trainable(policy, cfg.lora, cfg.gradient_checkpointing)
    if not cfg.lora.enabled:  # under LoRA the reference is this model with the adapter disabled
        reference = load_causal_lm(policy_path).to(device)
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
        critic = build_critic(critic_path, 2 if cfg.cost_model else 1, cfg.seed)
        disable_dropout(critic)
        if cfg.gradient_checkpointing:
            critic.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.lora.enabled:
            critic.backbone = add_lora(critic.backbone, cfg.lora)  # the value head trains fully
    opt_cfg = TrainConfig(lr=cfg.lr, weight_decay=cfg.weight_decay, warmup_steps=cfg.warmup_steps, scheduler=cfg.scheduler)
    opt, sched = make_optimizer_and_scheduler(policy, opt_cfg, cfg.optimizer_steps)
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

    # --- resume
    ckpt = ckpt_dir or out / f"{name}.ckpt"
    objects = {"policy": policy, "critic": critic, "opt": opt, "critic_opt": critic_opt, "sched": sched, "critic_sched": critic_sched}
    guard = NonFiniteGuard(name, cfg.max_nonfinite_steps, accelerator)
    controllers = {"kl": kl_ctl, "lambda": lagrange, "nonfinite": guard}
    config_dict = checkpoint_config(cfg)  # less stop_after_steps and save_every: a rerun that changes them resumes
    start = load_checkpoint(ckpt, objects, controllers, log_path if accelerator.is_main_process else None, config_dict)
    if start and accelerator.is_main_process:
        print(f"[rlhfkit] {name}: resuming from {ckpt} after step {start}")
    # DDP under `accelerate launch`/torchrun (a no-op wrapper in one process); the schedulers stay
    # out of prepare(): accelerate would step them once per process. Checkpoints hold the unwrapped objects.
    policy, opt = accelerator.prepare(policy, opt)
    if critic is not None:
        critic, critic_opt = accelerator.prepare(critic, critic_opt)
    log = JsonlLog(log_path, enabled=accelerator.is_main_process, accelerator=accelerator)
    # This process's share of each step's prompts, and where its sampling chunks fall in one process's draw.
    per_rank = cfg.prompts_per_step // coll.world
    first_chunk = coll.rank * -(-per_rank // cfg.sampling.batch_size)

    # --- the loop
    from tqdm.auto import tqdm

    gold_available = bool(problems) and len(problems) == len(prompts)
    last = {}
    bar = tqdm(total=cfg.total_steps, initial=start, desc=name, disable=not accelerator.is_main_process)
    try:
        batches = global_batches(len(prompts), cfg.prompts_per_step, cfg.total_steps, cfg.seed, start_step=start)
        for step, idx in enumerate(batches, start=start):
            t_step = time.time()
            mine = idx[coll.rank * per_rank:(coll.rank + 1) * per_rank]
            ro = make_rollout(policy, reference, critic, tokenizer, [prompts[i] for i in mine], scorer, cfg,
                              seed=cfg.seed * 1_000_003 + step, device=device, all_sum=coll.sum, first_chunk=first_chunk)
            mask = ro.response_mask.bool()
            seq_kl = (ro.kl * mask).sum(1)  # (b,) per-sequence KL estimate, this process's rows
            every = lambda t: coll.gather(t.float().cpu())  # noqa: E731  (B,): the whole batch, in rank order
            mean_cost = float(every(ro.costs).mean()) if ro.costs is not None else None
            if lagrange is not None:
                lagrange.update(mean_cost, cfg.cost_threshold)  # λ first, then the advantages that use it
            adv, returns = compute_advantages(ro, cfg, kl_ctl.value, lagrange.value if lagrange else None, all_sum=coll.sum)
            gen = torch.Generator().manual_seed(cfg.seed * 7_919 + step)
            t_update = _clock(device)
            stats = ppo_update(policy, critic, opt, critic_opt, sched, critic_sched, ro, adv, returns, cfg,
                               kl_ctl.value, accelerator, gen, guard)
            update_s = _clock(device) - t_update
            kl_coef_used = kl_ctl.value
            if returns is not None:
                # cleanrl's diagnostic, over the whole rollout: 1 − Var(R − V_old) / Var(R).
                from rlhfkit.losses import masked_var

                var_r = masked_var(returns[..., 0], mask, all_sum=coll.sum)
                stats["explained_variance"] = float(1 - masked_var(returns[..., 0] - ro.old_values[..., 0], mask, all_sum=coll.sum) / var_r) if var_r > 0 else float("nan")
            all_kl = every(seq_kl)
            kl_ctl.update(float(all_kl.mean()), cfg.batch_size)
            # Sampler against training forward, same weights, same tokens: only numerics (kernels, batch
            # shapes, padding, an inference engine) can make them differ; a drift here means the rollouts
            # come from another policy than the one the loss assumes (rollout_is_cap corrects for it).
            lp_diff = torch.where(mask, (ro.rollout_logprobs - ro.old_logprobs).abs(), torch.zeros_like(ro.old_logprobs))
            rec = {
                "step": step + 1,
                "reward": float(every(ro.raw_scores).mean()),
                "reward_with_kl": float(every((ro.token_rewards * mask).sum(1)).mean() - kl_coef_used * all_kl.mean()),
                "kl": float(all_kl.mean()),
                "kl_coef": kl_coef_used,
                "response_length": float(every(mask.sum(1)).mean()),
                "rollout_logprob_diff_mean": float(coll.sum(lp_diff.sum()) / coll.sum(mask.sum()).clamp(min=1)),
                "rollout_logprob_diff_max": float(every(lp_diff.amax(1)).max()),
                "finished_rate": float(every(torch.tensor([s.finished for s in ro.samples])).mean()),
                "lr": sched.get_last_lr()[0],
                "step_time_s": time.time() - t_step,
                # where the step's time went (this process's clock; the rest is advantages and logging)
                "time_generation_s": ro.timings["generation"],
                "time_scoring_s": ro.timings["scoring"],
                "time_forward_s": ro.timings["forward"],
                "time_update_s": update_s,
                **stats,
            }
            if mean_cost is not None:
                rec.update(cost=mean_cost, **{"lambda": lagrange.value})
            if gold_available:
                # The oracle's opinion of the very responses trained on: a diagnostic only, never a reward
                # here (unless reward is judge), for the gold-vs-proxy over-optimisation plot.
                from rlhfkit.tasks.arith_judge import judge

                gold = [judge(problems[s.prompt], s.text).score if s.finished else 0.0 for s in ro.samples]
                rec["gold_score"] = float(every(torch.tensor(gold)).mean())
            last = rec
            if step % cfg.log_every == 0 or step == cfg.total_steps - 1:
                log.write(rec)
            bar.update(1)
            bar.set_postfix({"reward": f"{rec['reward']:.3f}", "kl": f"{rec['kl']:.3f}",
                             "gen": f"{rec['time_generation_s']:.2f}s", "update": f"{update_s:.2f}s"})
            done = step + 1
            if cfg.save_every and (done % cfg.save_every == 0 or done == cfg.stop_after_steps) and done < cfg.total_steps:
                log.close()
                if accelerator.is_main_process:
                    save_checkpoint(ckpt, done, objects, controllers, log_path, config_dict)
                accelerator.wait_for_everyone()
                log = JsonlLog(log_path, enabled=accelerator.is_main_process, accelerator=accelerator)
            if cfg.stop_after_steps and done >= cfg.stop_after_steps and done < cfg.total_steps:
                raise StoppedEarly(f"{name}: stopped after step {done} (stop_after_steps); rerun to resume from {ckpt}")
    finally:
        bar.close()
        log.close()

    # --- final figures on held-out prompts: KL from the reference, and cost when constrained
    final = {}
    held_path = ctx.resolve(cfg.heldout) if cfg.heldout else None
    if held_path is not None and held_path.exists() and accelerator.is_main_process:
        final = heldout_figures(accelerator.unwrap_model(policy), reference, tokenizer,
                                [r.prompt for r in load_prompts(held_path)], scorer, cfg, device)
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
        "critic_initialised_from_reward_head": bool(getattr(critic, "initialised_from_head", False)),
        "train_runtime_s": runtime,
    }


@torch.no_grad()
def heldout_figures(policy, reference, tokenizer, prompts, scorer: Scorer, cfg: PPOConfig, device) -> dict:
    """KL(π ‖ π_ref) per response (k1 summed over tokens, on samples from π) and the mean cost, with 95% CIs."""
    from rlhfkit.generation import sample, sequences_from_samples, unwrap
    from rlhfkit.kl import kl_k1
    from rlhfkit.stats import mean_ci

    samples = sample(unwrap(policy), tokenizer, prompts, cfg.sampling, seed=cfg.seed + 12345, device=device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batch = {k: v.to(device) for k, v in sequences_from_samples(samples, pad, tokenizer.eos_token_id).items()}
    logp = policy_forward(policy, batch, cfg.sampling.temperature)[0]
    ref = reference_forward(policy, reference, batch, cfg.sampling.temperature)
    kl = (kl_k1(logp, ref) * batch["response_mask"]).sum(1)
    figures = {"kl_from_reference": mean_ci(kl.tolist(), cfg.seed)}
    if scorer.cost is not None:
        figures["mean_cost"] = mean_ci(scorer.cost([s.prompt for s in samples], [s.text for s in samples]), cfg.seed)
    return figures
