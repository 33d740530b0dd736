"""The known RLHF pitfalls, each a named test (issue 18).

Every major RLHF framework has shipped at least one of the bugs below, and its users found it
in a loss curve or a benchmark months later. One section per pitfall; each test's docstring
names the pitfall, where it showed up in public, and how the test was seen to fail when the
guarded behaviour was broken on purpose. Everything runs on tiny models built from
``transformers`` configs (``conftest.py``), in seconds.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from rlhfkit.generation import Sample, SamplingConfig, sampler_logprobs, sequences_from_samples, token_logprobs
from rlhfkit.models.critic import build_critic
from rlhfkit.policy_losses import LossAggregation, aggregate_loss, ppo_policy_loss, truncated_importance_weights
from rlhfkit.recipes import ppo
from rlhfkit.recipes.ppo import PPOConfig, Rollout
from rlhfkit.stage import StageContext

CPU = torch.device("cpu")


# ---------------------------------------------------------------- shared pieces

def _write_prompts(out: Path, n: int = 16) -> None:
    from rlhfkit.tasks.arith import format_prompt, make_problems

    (out / "data").mkdir(parents=True, exist_ok=True)
    rows = [{"prompt": format_prompt(p), "meta": p.to_meta()} for p in make_problems(n, seed=3, unanswerable_frac=0.25)]
    for name in ("prompts.jsonl", "heldout.jsonl"):
        (out / "data" / name).write_text("".join(json.dumps(r) + "\n" for r in rows))


def _task_prompts(n: int) -> list[str]:
    from rlhfkit.tasks.arith import format_prompt, make_problems

    return [format_prompt(p) for p in make_problems(n, seed=3, unanswerable_frac=0.25)]


def _rollout(token_rewards, mask, kl, old_values=None):
    """A Rollout holding what ``compute_advantages`` reads (rewards, mask, KL, critic values)."""
    B, T = mask.shape
    z = torch.zeros(B, T)
    return Rollout(torch.zeros(B, T, dtype=torch.long), mask.clone(), mask, z, z, kl, torch.zeros(B), torch.zeros(B),
                   token_rewards, None, old_values, [])


class _GradRecorder(torch.optim.Optimizer):
    """An "optimizer" that records each step's gradients and leaves the weights alone."""

    def __init__(self, params):
        super().__init__(list(params), {"lr": 0.0})
        self.steps: list[list[torch.Tensor]] = []

    @torch.no_grad()
    def step(self, closure=None):
        self.steps.append([p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
                           for g in self.param_groups for p in g["params"]])


def _record_gradients(monkeypatch) -> list[_GradRecorder]:
    """Make every stage's ``make_optimizer_and_scheduler`` return a gradient recorder (and a constant schedule)."""
    from rlhfkit import training

    made: list[_GradRecorder] = []

    def recording(model, cfg, total_steps):
        opt = _GradRecorder(p for p in model.parameters() if p.requires_grad)
        made.append(opt)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)

    monkeypatch.setattr(training, "make_optimizer_and_scheduler", recording)
    return made


def _relative_gap(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """max |a − b| over all entries, divided by max |a|: 0 for equal gradients."""
    scale = max(x.abs().max().item() for x in a)
    assert scale > 0, "no gradient at all: the comparison would prove nothing"
    return max((x - y).abs().max().item() for x, y in zip(a, b)) / scale


class _ListLog:
    def __init__(self):
        self.rows: list[dict] = []

    def write(self, row: dict) -> None:
        self.rows.append(row)

    def close(self) -> None:
        pass


# ================================================================ 1. loss aggregation

def test_loss_aggregations_by_hand_and_padding_invariant():
    """Pitfall 1: GRPO's per-sequence mean then batch mean biases toward short right and long wrong
    answers (Dr. GRPO, Liu et al. 2025, "Understanding R1-Zero-like training"); TRL added
    ``loss_type`` grpo/bnpo/dr_grpo/dapo after it. Each of our three aggregations against its closed form.

    Response A has 1 token with loss 4; response B has 3 tokens with losses 1, 2, 3; L = 4:
        token_mean              = (4 + 1 + 2 + 3) / 4       = 10 / 4    = 2.5
        seq_mean_token_mean     = (4 / 1 + 6 / 3) / 2       = (4 + 2)/2 = 3.0
        seq_mean_token_sum_norm = (4 / 4 + 6 / 4) / 2       = 2.5 / 2   = 1.25
    Padding (inf and NaN inside it), an extra padded column and a row with no response token change nothing.
    Checked to fail: with seq_mean_token_mean's per-row mean replaced by the row sum, and with the
    row count taken as B (so the padding row counts as a response).
    """
    inf, nan = float("inf"), float("nan")
    losses = torch.tensor([[4.0, inf, nan], [1.0, 2.0, 3.0]])
    mask = torch.tensor([[1, 0, 0], [1, 1, 1]])
    expected = {"token_mean": 2.5, "seq_mean_token_mean": 3.0, "seq_mean_token_sum_norm": 1.25}
    padded_losses = torch.tensor([[4.0, inf, nan, 7.0], [1.0, 2.0, 3.0, nan], [nan, 5.0, 5.0, 5.0]])
    padded_mask = torch.tensor([[1, 0, 0, 0], [1, 1, 1, 0], [0, 0, 0, 0]])
    for name, value in expected.items():
        assert aggregate_loss(losses, mask, name, max_len=4).item() == pytest.approx(value, abs=1e-7), name
        assert aggregate_loss(padded_losses, padded_mask, name, max_len=4).item() == pytest.approx(value, abs=1e-7), name
    assert LossAggregation.token_mean.units(padded_mask) == 4
    assert LossAggregation.seq_mean_token_mean.units(padded_mask) == 2
    with pytest.raises(ValueError, match="max_len"):
        aggregate_loss(losses, mask, "seq_mean_token_sum_norm")


def test_per_sequence_mean_gives_short_right_answers_more_push_and_long_wrong_answers_less():
    """Pitfall 1, the bias itself (Dr. GRPO, Liu et al. 2025, §3.1): the gradient each token receives.

    On-policy (ratio 1), ∂loss/∂log π_t = −A_i · (the token's weight in the aggregate). A right
    answer of 2 tokens (A = +1) and a wrong one of 6 tokens (A = −1), L = 6:
        token_mean:              every token 1/8            → −1/8 and +1/8
        seq_mean_token_mean:     1/(2·2) and 1/(2·6)        → −1/4 and +1/12: the long wrong answer is pushed
                                                              down 3× more gently than the short right one up
        seq_mean_token_sum_norm: every token 1/(2·6) = 1/12 → −1/12 and +1/12
    Checked to fail: with the aggregation argument ignored by ``ppo_policy_loss``.
    """
    mask = torch.tensor([[1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    adv = torch.tensor([[1.0] * 6, [-1.0] * 6])
    expected = {"token_mean": (-1 / 8, 1 / 8), "seq_mean_token_mean": (-1 / 4, 1 / 12),
                "seq_mean_token_sum_norm": (-1 / 12, 1 / 12)}
    for name, (right, wrong) in expected.items():
        logp = torch.full((2, 6), -1.0, requires_grad=True)
        loss, _ = ppo_policy_loss(logp, logp.detach(), adv, mask, clip_eps=0.2, aggregation=name, max_len=6)
        loss.backward()
        g = logp.grad
        assert torch.allclose(g[0, :2], torch.full((2,), right)), name
        assert torch.allclose(g[1], torch.full((6,), wrong)), name
        assert torch.equal(g[0, 2:], torch.zeros(4))  # padding gets no gradient


def test_loss_aggregation_is_exact_over_micro_batches_and_processes():
    """Pitfalls 1 and 6: an aggregate split into parts (micro-batches, processes) must be recombined by
    each part's share of the batch's units (tokens or responses), not by a plain mean of the parts.

    Six responses of lengths 1..6 split 2 + 3 + 1, the recipe's rule: Σ_k aggregate(part_k) ·
    units(part_k) / units(batch) equals the aggregate of the whole batch, for every aggregation.
    Checked to fail: with the weight units(part_k)/units(batch) replaced by 1/(number of parts).
    """
    torch.manual_seed(0)
    lengths = [1, 6, 3, 5, 2, 4]
    mask = torch.tensor([[1] * n + [0] * (6 - n) for n in lengths])
    losses = torch.randn(6, 6)
    parts = [[0, 1], [2, 3, 4], [5]]
    for agg in LossAggregation:
        whole = aggregate_loss(losses, mask, agg, max_len=6)
        recombined = sum(aggregate_loss(losses[p], mask[p], agg, max_len=6) * agg.units(mask[p]) / agg.units(mask)
                         for p in parts)
        assert recombined.item() == pytest.approx(whole.item(), abs=1e-6), agg
        plain_mean = sum(aggregate_loss(losses[p], mask[p], agg, max_len=6) for p in parts) / len(parts)
        assert abs(plain_mean.item() - whole.item()) > 1e-2, agg  # the naive recombination is wrong here


@pytest.fixture(scope="module")
def uneven_rollouts(tiny_lm_dir):
    """An 8-response rollout per algorithm (PPO with a critic, GRPO with k3 in the loss), responses cut
    to lengths 8, 3, 5, 1, 7, 2, 6, 4 so micro-batches hold different numbers of tokens."""
    from rlhfkit.models.loading import load_causal_lm, load_tokenizer

    tok = load_tokenizer(tiny_lm_dir)
    out = {}
    for algorithm in ("ppo", "grpo"):
        cfg = PPOConfig(algorithm=algorithm, prompts_per_step=8 if algorithm == "ppo" else 2,
                        group_size=1 if algorithm == "ppo" else 4, minibatch_size=8, ppo_epochs=1, grad_clip=0.0,
                        entropy_coef=0.01, sampling=SamplingConfig(max_new_tokens=8, temperature=1.0, batch_size=16))
        critic = build_critic(tiny_lm_dir, 1, seed=0) if algorithm == "ppo" else None
        policy = load_causal_lm(tiny_lm_dir)
        scorer = ppo.Scorer(lambda p, r: [float(len(x) % 5) for x in r], None, None)
        # ppo_epochs=2 for the rollout: the separate old-log-prob pass, which an exactly on-policy config
        # (PPOConfig.old_logprobs_from_update) leaves to the update; the policy moved below needs them fixed
        ro = ppo.make_rollout(policy, load_causal_lm(tiny_lm_dir), critic, tok, _task_prompts(cfg.prompts_per_step),
                              scorer, dataclasses.replace(cfg, ppo_epochs=2), seed=0, device=CPU)
        for row, keep in enumerate([8, 3, 5, 1, 7, 2, 6, 4]):
            ro.response_mask[row, ro.response_mask[row].nonzero()[keep:, 0]] = 0
        with torch.no_grad():  # a policy moved off the rollout's, so ratios and the KL term are not trivial
            for p in policy.parameters():
                p.add_(0.01 * torch.randn_like(p))
        out[algorithm] = (cfg, policy, critic, ro)
    return out


def _update_gradients(cfg, policy, critic, ro, **changes) -> tuple[list, list]:
    """The policy's and critic's gradients of one ``ppo_update`` minibatch under ``cfg`` with ``changes``."""
    from accelerate import Accelerator

    cfg = dataclasses.replace(cfg, **changes)
    adv, returns = ppo.compute_advantages(ro, cfg, kl_coef=0.1, lagrange=None)
    adv = adv + ro.response_mask * torch.arange(8.0)[:, None]  # advantages far from 0 on every row
    opts = [_GradRecorder(m.parameters()) if m is not None else None for m in (policy, critic)]
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambda _: 1.0) if o is not None else None for o in opts]
    ppo.ppo_update(policy, critic, opts[0], opts[1], scheds[0], scheds[1], ro, adv, returns, cfg, 0.1,
                   Accelerator(cpu=True), torch.Generator().manual_seed(0))
    assert len(opts[0].steps) == 1
    return opts[0].steps[0], (opts[1].steps[0] if critic is not None else [])


@pytest.mark.parametrize("aggregation", list(LossAggregation))
@pytest.mark.parametrize("algorithm", ["ppo", "grpo"])
def test_ppo_update_with_accumulation_equals_the_whole_minibatch(uneven_rollouts, algorithm, aggregation):
    """Pitfalls 1 and 6: PPO's update (policy, value, KL-in-loss and entropy terms) with the minibatch of 8
    in 4 micro-batches of 2 gives the gradient of 1 micro-batch of 8 (relative gap ≤ 1e-5), for each
    loss aggregation, with responses of 8 different lengths. The 2024 transformers bug averaged
    each micro-batch's mean and so weighted tokens of short micro-batches more.
    Checked to fail: with the micro-batch weight set to 1/grad_accum_steps (relative gap 0.8), and with
    the value loss left at token_mean under the per-sequence aggregations (critic gap 0.4).
    """
    cfg, policy, critic, ro = uneven_rollouts[algorithm]
    big = _update_gradients(cfg, policy, critic, ro, loss_aggregation=aggregation)
    acc = _update_gradients(cfg, policy, critic, ro, loss_aggregation=aggregation, grad_accum_steps=4)
    assert _relative_gap(big[0], acc[0]) < 1e-5
    if critic is not None:
        assert _relative_gap(big[1], acc[1]) < 1e-5


# ================================================================ 2. advantages of a group with equal rewards

@pytest.mark.parametrize("scale", [True, False], ids=["scaled", "unscaled"])
@pytest.mark.parametrize("algorithm", ["grpo", "rloo"])
def test_group_of_equal_rewards_gives_exactly_zero_advantage_and_gradient(algorithm, scale):
    """Pitfall 2: GRPO divides by the group's std (dropped by Dr. GRPO, Liu et al. 2025); a group where every
    sample has the same reward must get advantage exactly 0 and so exactly zero policy gradient, with
    ``scale_advantages`` either way, and with the default ``whiten_advantages`` (no NaN, no division by 0).

    Groups of K = 3 (rewards 0.1, 0.7, −2.9, each group all equal, responses of 1–3 tokens) and one
    group [1, 2, 6] with different lengths. Two bugs this caught here: the mean of three equal
    floats need not equal them, and GRPO divided that one-ulp remainder by std + eps = 1e-6, giving
    each of three samples rewarded −2.9 an advantage of +0.24, from no signal; and whitening
    re-centred the advantages over the batch's tokens, moving every equal group off 0 (now GRPO's
    and RLOO's advantages are only scaled).
    Checked to fail: with ``_shifted_groups`` returning the groups unshifted, and with
    ``scale_by_std`` replaced by ``whiten``.
    """
    lengths = [1, 2, 3] * 3 + [1, 3, 2]
    rewards = [0.1] * 3 + [0.7] * 3 + [-2.9] * 3 + [1.0, 2.0, 6.0]
    mask = torch.tensor([[1] * n + [0] * (3 - n) for n in lengths])
    token_rewards = torch.zeros(12, 3)
    token_rewards[torch.arange(12), torch.tensor(lengths) - 1] = torch.tensor(rewards)
    ro = _rollout(token_rewards, mask, torch.zeros(12, 3))
    cfg = PPOConfig(algorithm=algorithm, group_size=3, prompts_per_step=4, minibatch_size=12, scale_advantages=scale)
    assert cfg.whiten_advantages
    adv, _ = ppo.compute_advantages(ro, cfg, kl_coef=0.0, lagrange=None)
    assert torch.isfinite(adv).all()
    assert torch.equal(adv[:9], torch.zeros(9, 3))
    assert (adv[9:][mask[9:].bool()] != 0).all()
    logp = torch.randn(12, 3, requires_grad=True)
    loss, _ = ppo_policy_loss(logp, logp.detach() + 0.1 * torch.randn(12, 3), adv, mask, clip_eps=0.2)
    loss.backward()
    assert torch.equal(logp.grad[:9], torch.zeros(9, 3)) and logp.grad[9:].abs().sum() > 0


def test_scale_advantages_by_hand():
    """Pitfall 2, the option: one group of K = 3 with rewards [1, 2, 6], mean 3, whitening off.

    scale_advantages false: A = r − 3 = [−2, −1, 3].
    true: sample std = sqrt(((−2)² + (−1)² + 3²) / 2) = sqrt(7), A = [−2, −1, 3] / (sqrt(7) + 1e-6).
    Checked to fail: with ``scale_advantages`` not passed on to ``group_normalized_advantages``.
    """
    mask = torch.ones(3, 1, dtype=torch.long)
    ro = _rollout(torch.tensor([[1.0], [2.0], [6.0]]), mask, torch.zeros(3, 1))
    for scale, expected in ((False, [-2.0, -1.0, 3.0]), (True, [x / (math.sqrt(7) + 1e-6) for x in (-2.0, -1.0, 3.0)])):
        cfg = PPOConfig(algorithm="grpo", group_size=3, prompts_per_step=1, minibatch_size=3, whiten_advantages=False,
                        scale_advantages=scale)
        adv, _ = ppo.compute_advantages(ro, cfg, kl_coef=0.0, lagrange=None)
        assert adv[:, 0].tolist() == pytest.approx(expected, abs=1e-6)


# ================================================================ 3. the KL estimators' gradients

def test_kl_estimators_gradients_against_the_analytic_reverse_kl_gradient():
    """Pitfall 3: k3 inside the loss does not give the gradient of the reverse KL(π ‖ π_ref) it estimates
    (Tang & Munos 2025, "On a few pitfalls in KL divergence gradient estimation for RL"); GRPO's
    loss term (Shao et al. 2024, eq. 4), TRL's GRPOTrainer and veRL's ``low_var_kl`` use it.

    A categorical policy π = softmax(θ) over 5 outcomes, π_ref fixed; the expected gradient of each
    option is Σ_x π_old(x) ∇ loss(x) with π_old = π detached (samples from the current policy), in float64:
      k1 in the reward (through PPO's policy loss): E[k1 ∇log π]       = ∇ KL(π‖π_ref), unbiased
      k2 in the loss: E[(log π − log π_ref) ∇log π]                    = ∇ KL(π‖π_ref), unbiased
      k3 in the loss: E[(1 − π_ref/π) ∇log π] = −Σ π_ref ∇log π        = ∇ KL(π_ref‖π), the FORWARD KL
      k3 · π/π_old (the ratio correction): k2's gradient                = ∇ KL(π‖π_ref), unbiased
      k1 in the loss: E[∇log π] = 0 (the recipe refuses it)
    Analytic: ∇θ KL(π‖π_ref) = π ⊙ (log π − log π_ref − KL), ∇θ KL(π_ref‖π) = π − π_ref.
    Checked to fail: with the sign of d in ``kl_k3`` flipped, and with k2's ½ dropped.
    """
    from rlhfkit.kl import kl_estimate

    torch.manual_seed(0)
    theta = torch.randn(5, dtype=torch.float64, requires_grad=True)
    ref_logp = torch.log_softmax(torch.randn(5, dtype=torch.float64), -1)

    def expected_gradient(loss_of) -> torch.Tensor:
        logp = torch.log_softmax(theta, -1)
        weights = logp.detach().exp()
        total = sum(weights[x] * loss_of(logp[x].view(1, 1), ref_logp[x].view(1, 1)) for x in range(5))
        return torch.autograd.grad(total, theta)[0]

    def k1_in_reward(lp, ref):
        advantage = -kl_estimate(lp, ref, "k1").detach()  # reward −β·k1 with β = 1, no baseline
        return ppo_policy_loss(lp, lp.detach(), advantage, torch.ones(1, 1), clip_eps=0.2)[0]

    with torch.no_grad():
        pi, logpi = torch.softmax(theta, -1), torch.log_softmax(theta, -1)
        reverse_kl = (pi * (logpi - ref_logp)).sum()
        grad_reverse = pi * (logpi - ref_logp - reverse_kl)
        grad_forward = pi - ref_logp.exp()
    grads = {
        "k1 in the reward": expected_gradient(k1_in_reward),
        "k2 in the loss": expected_gradient(lambda lp, ref: kl_estimate(lp, ref, "k2").sum()),
        "k3 in the loss": expected_gradient(lambda lp, ref: kl_estimate(lp, ref, "k3").sum()),
        "k3 with the ratio correction": expected_gradient(
            lambda lp, ref: (torch.exp(lp - lp.detach()) * kl_estimate(lp, ref, "k3")).sum()),
        "k1 in the loss": expected_gradient(lambda lp, ref: kl_estimate(lp, ref, "k1").sum()),
    }
    for name in ("k1 in the reward", "k2 in the loss", "k3 with the ratio correction"):
        assert torch.allclose(grads[name], grad_reverse, atol=1e-12), name
    assert torch.allclose(grads["k3 in the loss"], grad_forward, atol=1e-12)
    assert (grads["k3 in the loss"] - grad_reverse).abs().max() > 1e-2  # biased for the reverse KL, visibly
    assert torch.allclose(grads["k1 in the loss"], torch.zeros(5, dtype=torch.float64), atol=1e-12)
    # What the recipe does by default: k1 in the reward for PPO and RLOO, k3 in the loss for GRPO.
    assert PPOConfig().estimator == "k1" and not PPOConfig().kl_uses_loss
    assert PPOConfig(algorithm="grpo", group_size=2).estimator == "k3"


# ================================================================ 4. where the reward sits

def _left_padded(t: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """Right-padded rows (B, T) → the same rows left-padded (rolled so each row ends at column T − 1)."""
    return torch.stack([row.roll(t.shape[1] - n) for row, n in zip(t, lengths)])


def test_token_rewards_sum_to_score_minus_kl_for_left_and_right_padding_with_pad_equal_to_eos():
    """Pitfall 4: the score is placed on the last real response token, not on the first pad after EOS (where
    a mask then silently removes it); with pad = EOS "the first pad" is even the EOS of a finished
    response. DeepSpeed-Chat's reward model and TRL's ``get_reward`` find a sequence's end as the
    first pad token after the prompt, which is why both need pad ≠ EOS and right padding.

    pad = EOS = 2, β = 0.5, γ = λ = 1, values 0, no whitening: the PPO advantage at a response's first
    token is the masked sum of its token rewards = score − β·Σ KL.
      finished, response [7, 8, 9] + EOS, score 1.5, KL [0.1, 0.2, 0.3, 0.4]: 1.5 − 0.5·1.0 = 1.0
      unfinished, response [7, 8], score −1 (unfinished), KL [0.2, 0.2]:      −1 − 0.5·0.4 = −1.2
    The same under left padding. Checked to fail: with the last position taken as the first
    response position + the number of response tokens (the first pad): an index past the row.
    """
    eos = pad = 2
    samples = [Sample("p", [5, 6], [7, 8, 9], "", finished=True), Sample("p", [5], [7, 8], "", finished=False)]
    batch = sequences_from_samples(samples, pad, eos)
    mask = batch["response_mask"]
    kl = torch.zeros(2, 6)
    kl[0, 2:6] = torch.tensor([0.1, 0.2, 0.3, 0.4])
    kl[1, 1:3] = torch.tensor([0.2, 0.2])
    scores = torch.tensor([1.5, -1.0])
    lengths = batch["attention_mask"].sum(1).tolist()
    cfg = PPOConfig(algorithm="ppo", gamma=1.0, lam=1.0, whiten_advantages=False, prompts_per_step=1, minibatch_size=1)
    for side in ("right", "left"):
        m, k, ids = mask, kl, batch["input_ids"]
        if side == "left":
            m, k, ids = _left_padded(mask, lengths), _left_padded(kl, lengths), _left_padded(ids, lengths)
        token_rewards = ppo.place_token_rewards(m, scores)
        last = [int(r.nonzero()[-1]) for r in m]
        assert token_rewards[0, last[0]] == 1.5 and ids[0, last[0]] == eos  # on the EOS of the finished one
        assert token_rewards[1, last[1]] == -1.0 and ids[1, last[1]] == 8  # on the last token of the unfinished one
        ro = _rollout(token_rewards, m, k, old_values=torch.zeros(2, 6, 1))
        sums = ((ro.token_rewards - 0.5 * ro.kl) * m).sum(1)
        assert sums.tolist() == pytest.approx([1.0, -1.2], abs=1e-6), side
        adv, _ = ppo.compute_advantages(ro, cfg, kl_coef=0.5, lagrange=None)
        first = [int(r.nonzero()[0]) for r in m]
        assert [adv[0, first[0]].item(), adv[1, first[1]].item()] == pytest.approx([1.0, -1.2], abs=1e-6), side


# ================================================================ 5. the missing-EOS penalty

@pytest.fixture()
def eos_prompt_tokenizer(tiny_lm_dir):
    """The tiny tokenizer with a chat template whose prompt ends with the EOS token itself."""
    from rlhfkit.models.loading import load_tokenizer

    tok = copy.deepcopy(load_tokenizer(tiny_lm_dir))
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}" + tok.eos_token + "{% endfor %}"
    return tok


def test_missing_eos_penalty_looks_at_the_completion_only(tiny_lm_dir, eos_prompt_tokenizer):
    """Pitfall 5: a response that never emits EOS must get the penalty even when the prompt, rendered by a
    chat template, already ends with an EOS token (Llama 3's <|eot_id|> and Qwen's <|im_end|> close
    every turn and are their models' EOS in generation); "is there an EOS in the sequence" then
    says yes for every sample. TRL's ``missing_eos_penalty`` (subtracted from the score) checks
    the completion's tokens only, as this recipe does.

    The penalty REPLACES the reward source's score (``unfinished_score``, default −1), it is not
    added to it: a scorer that gives 5 to everything yields −1 for an unfinished response, not 4.
    EOS suppressed in generation: every response unfinished, raw score −1; EOS forced at the
    last position: every response finished, raw score 5.
    Checked to fail: with ``generation.sample`` testing ``eos in prompt_ids + row`` for finished, and
    with the penalty added to the score instead of replacing it.
    """
    from rlhfkit.models.loading import load_causal_lm

    tok = eos_prompt_tokenizer
    eos = tok.eos_token_id
    prompts = _task_prompts(4)
    from rlhfkit.data.collate import encode_prompt

    assert all(encode_prompt(tok, p)[-1] == eos for p in prompts)  # the premise: every prompt ends with EOS
    cfg = PPOConfig(algorithm="grpo", group_size=2, prompts_per_step=4, minibatch_size=8,
                    sampling=SamplingConfig(max_new_tokens=6, temperature=1.0, batch_size=8))
    scorer = ppo.Scorer(lambda p, r: [5.0] * len(r), None, None)
    for setting, finished, raw in (("suppress_tokens", False, -1.0), ("forced_eos_token_id", True, 5.0)):
        policy = load_causal_lm(tiny_lm_dir)
        setattr(policy.generation_config, setting, [eos] if setting == "suppress_tokens" else eos)
        ro = ppo.make_rollout(policy, load_causal_lm(tiny_lm_dir), None, tok, prompts, scorer, cfg, seed=0, device=CPU)
        assert [s.finished for s in ro.samples] == [finished] * 8, setting
        assert ro.raw_scores.tolist() == [raw] * 8, setting
        n_response = ro.response_mask.sum(1).tolist()
        assert n_response == [6] * 8, setting  # 6 tokens, or 5 and the forced EOS


# ================================================================ 6. gradient accumulation in every stage

def _sft_examples(tok):
    from rlhfkit.data.collate import IGNORE, TokenizedExample, encode_prompt, encode_response
    from rlhfkit.tasks.arith import format_prompt, gold_response, make_problems

    probs = make_problems(8, seed=5, unanswerable_frac=0.25)
    responses = [gold_response(p) if i % 2 else f"Answer: {i}" for i, p in enumerate(probs)]  # 3 to 40 tokens
    out = []
    for p, r in zip(probs, responses):
        prompt, resp = encode_prompt(tok, format_prompt(p)), encode_response(tok, r)
        out.append(TokenizedExample(prompt + resp, [IGNORE] * len(prompt) + resp))
    assert len({e.n_loss_tokens for e in out}) >= 4
    return out


def test_sft_accumulation_equals_the_big_batch(tiny_lm_dir, monkeypatch):
    """Pitfall 6, SFT: batch 8 in one step equals 4 accumulated micro-batches of 2, loss and gradients, for
    responses of 3 to 40 tokens. The 2024 transformers/TRL gradient-accumulation bug: the Trainer
    averaged each micro-batch's token mean, so accumulated runs had a higher loss than the batch
    they stood for (fixed in transformers 4.46, "Fixing gradient accumulation", Oct 2024).
    Checked to fail: with ``train_lm`` dividing each micro-batch's sum by its own token count
    and by grad_accum_steps (gradient gap 0.05).
    """
    from accelerate import Accelerator

    from rlhfkit.data.collate import collate_sft
    from rlhfkit.models.loading import load_causal_lm, load_tokenizer
    from rlhfkit.training import TrainConfig, train_lm

    tok = load_tokenizer(tiny_lm_dir)
    examples = _sft_examples(tok)
    made = _record_gradients(monkeypatch)
    logs = []
    for accum in (1, 4):
        log = _ListLog()
        cfg = TrainConfig(batch_size=8, grad_accum_steps=accum, max_steps=1, grad_clip=0.0, warmup_steps=0, log_every=1)
        collate = lambda idx: collate_sft([examples[i] for i in idx], tok.pad_token_id)  # noqa: E731
        train_lm(load_causal_lm(tiny_lm_dir), len(examples), collate, [e.n_loss_tokens for e in examples], cfg,
                 Accelerator(cpu=True), log)
        logs.append(log.rows[0]["loss"])
    assert logs[0] == pytest.approx(logs[1], rel=1e-5)
    assert _relative_gap(made[0].steps[0], made[1].steps[0]) < 1e-5


def test_dpo_accumulation_equals_the_big_batch_with_weighted_pairs_and_an_sft_term(tiny_lm_dir, monkeypatch):
    """Pitfall 6, DPO: batch 8 equals 4 micro-batches of 2 (loss and gradients, 1e-5), with pairs weighted
    unequally (as pairs from K-wise rankings are, 1/C(K,2)) and the RPO SFT term on. The DPO part is a
    weighted mean over pairs; each micro-batch is scaled by its share of the batch's weights.
    Found here: the SFT term was an unweighted mean over each micro-batch's pairs, so under that
    scaling its accumulated value was not the big batch's (loss gap 3e-4); it is now weighted like the DPO part.
    Checked to fail: with the micro-batch scale w_local/w_global replaced by 1/grad_accum_steps
    (gradient gap 0.11), and with the SFT term unweighted again (loss gap 3e-4).
    """
    from accelerate import Accelerator

    from rlhfkit.data.pairs import tokenize_pairs
    from rlhfkit.models.loading import load_causal_lm, load_tokenizer
    from rlhfkit.models.sequence_logps import precompute_logps
    from rlhfkit.pair_training import train_on_pairs
    from rlhfkit.recipes import dpo
    from rlhfkit.tasks.arith import format_prompt, gold_response, make_problems

    tok = load_tokenizer(tiny_lm_dir)
    Pair = dataclasses.make_dataclass("Pair", ["prompt", "chosen", "rejected", "weight"])
    weights = [1.0, 1 / 3, 1 / 3, 1 / 3, 1.0, 1 / 6, 0.5, 1.0]
    raw = [Pair(format_prompt(p), gold_response(p), "Answer: 1" + "0" * i, w)
           for i, (p, w) in enumerate(zip(make_problems(8, seed=3, unanswerable_frac=0.25), weights))]
    pairs = tokenize_pairs(tok, raw, max_len=200)
    reference = load_causal_lm(tiny_lm_dir)
    ref = precompute_logps(reference, pairs, tok.pad_token_id, batch_size=8, device="cpu")
    made = _record_gradients(monkeypatch)
    losses = []
    for accum in (1, 4):
        model = load_causal_lm(tiny_lm_dir)
        with torch.no_grad():  # the policy away from its reference: a nonzero DPO gradient
            for p in model.parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        cfg = dpo.DPOConfig(batch_size=8, grad_accum_steps=accum, max_steps=1, grad_clip=0.0, warmup_steps=0, beta=0.5,
                            sft_coef=0.1, log_every=1)
        log = _ListLog()
        train_on_pairs(model, pairs, ref, dpo.dpo_pair_loss(cfg, torch.tensor(weights)), cfg, Accelerator(cpu=True),
                       log, tok.pad_token_id, layout=cfg.layout)
        losses.append(log.rows[0]["loss"])
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert _relative_gap(made[0].steps[0], made[1].steps[0]) < 1e-5


def test_reward_model_accumulation_equals_the_big_batch(tiny_lm_dir, tmp_path, monkeypatch):
    """Pitfall 6, the reward model: 8 units (rankings of K = 3 and 4 and single pairs) in one step equal 4
    accumulated micro-batches of 2 (loss and gradients, 1e-5), with reward centering on. Found here:
    the reward stage ignored ``grad_accum_steps`` altogether (every step was one full batch); it now
    accumulates, each micro-batch weighted by its share of the batch's pair weights (BT term) and
    pairs (centering term).
    Checked to fail: with the centering term scaled by 1/grad_accum_steps instead of its share of the
    pairs, and with ``_fit`` back to one batch per step (the forward count). The BT term's share of
    the weights equals 1/grad_accum_steps here (every ranking's pairs weigh 1 in total, as
    ``load_pairs`` gives them), so a wrong BT share cannot show in this batch.
    """
    from accelerate import Accelerator

    from rlhfkit.data.preferences import load_pairs
    from rlhfkit.recipes import reward
    from rlhfkit.recipes.reward import RewardConfig, train_rm

    lines = []
    for i in range(4):
        k = 3 if i % 2 else 4
        lines.append({"prompt": f"Q{i}: 2 + {i} =", "responses": [f"Answer: {i + j}" + " ok" * (j * i) for j in range(k)],
                      "ranking": list(range(k))})
        lines.append({"prompt": f"P{i}: 3 * {i} =", "chosen": f"Answer: {3 * i}", "rejected": "Answer: 7" + " no" * (4 * i)})
    f = tmp_path / "rankings.jsonl"
    f.write_text("".join(json.dumps(x) + "\n" for x in lines))
    pair_set = load_pairs(f)
    assert len(pair_set.groups) == 8
    made = _record_gradients(monkeypatch)
    calls = []
    real_score = reward._score_texts
    monkeypatch.setattr(reward, "_score_texts", lambda *a, **k: calls.append(len(a[2])) or real_score(*a, **k))
    losses = []
    for accum in (1, 4):
        cfg = RewardConfig(batch_size=8, grad_accum_steps=accum, max_steps=1, grad_clip=0.0, warmup_steps=0, center_coef=0.1,
                           max_len=96, log_every=1)
        log = _ListLog()
        calls.clear()
        train_rm(cfg, tiny_lm_dir, pair_set, Accelerator(cpu=True), log)
        assert len(calls) == accum  # one forward per micro-batch: it did accumulate
        losses.append(log.rows[-1]["loss"])
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert _relative_gap(made[0].steps[0], made[1].steps[0]) < 1e-5


# (PPO: test_ppo_update_with_accumulation_equals_the_whole_minibatch, under pitfall 1.)


# ================================================================ 7. rollout against training log-probs

def test_truncated_importance_weights_by_hand():
    """Pitfall 7: the sampler's and the trainer's probabilities of the same tokens disagree (different kernels,
    batch shapes, later vLLM), so the rollouts are off-policy for the loss (Yao et al. 2025, "Your
    efficient RL framework secretly brings you off-policy RL training"; TRL's
    ``vllm_importance_sampling_correction``). Truncated IS: weight min(π_train/π_rollout, cap).

    log π_train = [−1, −2, −0.5, −0.1], log π_rollout = [−1.5, −1, −0.5, −1], cap 2:
      ratios exp(0.5) = 1.648721, exp(−1) = 0.367879, exp(0) = 1, exp(0.9) = 2.459603 → capped 2.
    On-policy PPO loss with advantages [1, 1, −1, 2]: mean(−A·w) = −(1.648721 + 0.367879 − 1 + 4)/4 = −1.254150.
    Checked to fail: with the ratio inverted (π_rollout/π_train), and with the cap applied as a clamp
    from below.
    """
    train = torch.tensor([[-1.0, -2.0, -0.5, -0.1]])
    rollout = torch.tensor([[-1.5, -1.0, -0.5, -1.0]])
    mask = torch.ones(1, 4)
    w = truncated_importance_weights(train, rollout, mask, cap=2.0)
    assert w[0].tolist() == pytest.approx([math.exp(0.5), math.exp(-1.0), 1.0, 2.0], abs=1e-6)
    logp = torch.zeros(1, 4, requires_grad=True)
    loss, _ = ppo_policy_loss(logp, logp.detach(), torch.tensor([[1.0, 1.0, -1.0, 2.0]]), mask, 0.2, is_weights=w)
    assert loss.item() == pytest.approx(-(math.exp(0.5) + math.exp(-1.0) - 1.0 + 4.0) / 4, abs=1e-6)


def test_rollout_is_cap_scales_the_update_by_the_capped_ratio(uneven_rollouts):
    """Pitfall 7 in the recipe: with sampler log-probs log 2 below the trainer's on every token, every weight
    is min(2, cap 1.5) = 1.5, so the policy gradient (RLOO here: KL in the reward, no entropy term)
    is 1.5 times that without correction; with equal log-probs it is the same.
    Checked to fail: with ``ppo_update`` not passing the weights to ``ppo_policy_loss``.
    """
    cfg, policy, _, ro = uneven_rollouts["grpo"]
    cfg = dataclasses.replace(cfg, algorithm="rloo", kl_in_loss="false", kl_estimator="auto", entropy_coef=0.0)
    base, _ = _update_gradients(cfg, policy, None, ro)
    agreeing = dataclasses.replace(ro, rollout_logprobs=ro.old_logprobs.clone())
    same, _ = _update_gradients(cfg, policy, None, agreeing, rollout_is_cap=1.5)
    assert _relative_gap(base, same) < 1e-6
    lower = dataclasses.replace(ro, rollout_logprobs=ro.old_logprobs - math.log(2.0) * ro.response_mask)
    capped, _ = _update_gradients(cfg, policy, None, lower, rollout_is_cap=1.5)
    assert _relative_gap([1.5 * g for g in base], capped) < 1e-5


def test_every_rl_step_logs_the_rollout_training_logprob_gap(tmp_path, tiny_lm_dir, monkeypatch):
    """Pitfall 7, the diagnostic: every RL step logs the mean and max |log π_rollout − log π_train| over the
    response tokens (veRL logs ``training/rollout_probs_diff_max``; rlhfkit's sampler and trainer
    share CPU kernels, so here the gap is ~1e-6). A sampler made to report log-probs 0.25 too high
    shows up as a gap of 0.25 at both steps (the second from a policy the first update moved off
    the reference), and with ``rollout_is_cap`` the logged weight is exp(−0.25) = 0.778801.
    Checked to fail: with the gap computed against ``ref_logprobs`` instead of ``old_logprobs``
    (step 2's gap is then 0.25 ± the KL).
    """
    from accelerate import Accelerator

    import rlhfkit.generation as generation
    from rlhfkit.io import read_jsonl_plain

    real_sample = generation.sample

    def optimistic_sampler(*a, **k):
        return [dataclasses.replace(s, logprobs=tuple(x + 0.25 for x in s.logprobs)) if s.logprobs is not None else s
                for s in real_sample(*a, **k)]

    monkeypatch.setattr(ppo, "sample", optimistic_sampler)  # where the recipe looks it up
    _write_prompts(tmp_path)
    stage = tmp_path / "rl.partial"
    stage.mkdir()
    cfg = PPOConfig(policy=str(tiny_lm_dir), reward_source="judge", algorithm="ppo", prompts_per_step=4, minibatch_size=4,
                    ppo_epochs=1, total_steps=2, save_every=0, rollout_is_cap=2.0, lr=1e-2, mixed_precision="no",
                    sampling=SamplingConfig(max_new_tokens=8, temperature=0.8, batch_size=16))
    ppo.run(cfg, StageContext(tmp_path, stage, "rl", Accelerator(cpu=True)))
    rows = read_jsonl_plain(stage / "log.jsonl")
    assert abs(rows[1]["kl"]) > 1e-3  # the second rollout's policy is not the reference (k1 can be < 0)
    for row in rows:
        assert row["rollout_logprob_diff_mean"] == pytest.approx(0.25, abs=1e-5)
        assert row["rollout_logprob_diff_max"] == pytest.approx(0.25, abs=1e-5)
        assert row["rollout_is_weight"] == pytest.approx(math.exp(-0.25), abs=1e-5)


# ================================================================ 8. sampling temperature

@pytest.fixture(scope="module")
def lossy_lm(tmp_path_factory):
    """A 7-token byte-level BPE tokenizer with the merge a + b → ab (so decode-then-encode of [a, b] gives
    [ab]) and a tiny Llama on it; EOS is one token in 7, so sampled responses end often."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from rlhfkit.models.loading import TinyModelConfig, build_tiny_causal_lm, save_pretrained_atomic

    vocab = {"<|pad|>": 0, "<|bos|>": 1, "<|eos|>": 2, "a": 3, "b": 4, "c": 5, "ab": 6}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b")]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>")
    assert tok("ab", add_special_tokens=False)["input_ids"] == [6] and tok.decode([3, 4]) == "ab"
    arch = TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_position_embeddings=64)
    path = tmp_path_factory.mktemp("lossy") / "model"
    save_pretrained_atomic(build_tiny_causal_lm(arch, tok, seed=0), tok, path)
    return path


@pytest.mark.parametrize("temperature", [0.6, 1.7])
def test_training_logprobs_of_sampled_tokens_equal_the_samplers_at_temperature(lossy_lm, temperature):
    """Pitfall 8: the loss's log-probs must come from logits divided by the sampling temperature; at T ≠ 1 the
    training forward's log-prob of each sampled token (EOS included) equals the sampler's to 1e-5.
    Computing them at T = 1 while sampling at T ≠ 1 makes PPO's first ratio ≠ 1 and its KL wrong;
    TRL's PPOTrainer divides its logits by ``temperature + 1e-7`` before the log-softmax, and its
    GRPOTrainer by the temperature, for this reason. Without the division the gap here is > 0.1.
    Checked to fail: with ``generation.token_logprobs`` not dividing by the temperature.
    """
    from rlhfkit.generation import sample
    from rlhfkit.models.loading import load_causal_lm, load_tokenizer

    tok, model = load_tokenizer(lossy_lm), load_causal_lm(lossy_lm)
    sampling = SamplingConfig(max_new_tokens=10, temperature=temperature, batch_size=3)
    samples = sample(model, tok, ["abc", "ca", "bca", "c"], sampling, seed=1, num_return_sequences=4, return_logprobs=True)
    assert any(s.finished for s in samples) and not all(s.finished for s in samples)
    batch = sequences_from_samples(samples, tok.pad_token_id, tok.eos_token_id)
    mask = batch["response_mask"].bool()
    trained = token_logprobs(model, batch["input_ids"], batch["attention_mask"], temperature)
    sampled = sampler_logprobs(samples, trained.shape[1])
    assert (trained - sampled)[mask].abs().max() < 1e-5
    at_one = token_logprobs(model, batch["input_ids"], batch["attention_mask"], 1.0)
    assert (at_one - sampled)[mask].abs().max() > 0.1  # the check can tell the temperatures apart
    # and the recipe's rollout: old log-probs (training forward) against the sampler's, same tokens
    cfg = PPOConfig(algorithm="grpo", group_size=4, prompts_per_step=2, minibatch_size=8,
                    sampling=SamplingConfig(max_new_tokens=10, temperature=temperature, batch_size=8))
    scorer = ppo.Scorer(lambda p, r: [0.0] * len(r), None, None)
    ro = ppo.make_rollout(model, load_causal_lm(lossy_lm), None, tok, ["abc", "ca"], scorer, cfg, seed=0, device=CPU)
    assert (ro.old_logprobs - ro.rollout_logprobs)[ro.response_mask.bool()].abs().max() < 1e-5


# ================================================================ 9. the token ids trained on

def test_rl_trains_on_the_generated_ids_not_a_decode_and_re_encode(lossy_lm):
    """Pitfall 9: the ids trained on must be the ids generated. Decoding a response and encoding the text
    again can give other ids (here [a, b] → "ab" → [ab]); the log-probs and the KL are then of
    tokens the policy never sampled. It happens wherever rollouts come back as text (an inference
    server's chat API, a multi-turn agent loop), which is why agentic RL frameworks insist on
    "token in, token out" from sampler to trainer.
    The ids ``generate`` returned are recorded at the model, and every row of the rollout batch must
    hold them: prompt, the generated tokens up to and including the first EOS, then padding.
    Checked to fail: with ``generation.sample`` keeping the re-encoded text's ids as ``response_ids``.
    """
    from rlhfkit.models.loading import load_causal_lm, load_tokenizer

    tok = load_tokenizer(lossy_lm)
    eos = tok.eos_token_id
    policy = load_causal_lm(lossy_lm)
    generated = []
    real_generate = policy.generate

    def recording_generate(**kwargs):
        out = real_generate(**kwargs)
        generated.extend(out[:, kwargs["input_ids"].shape[1]:].tolist())
        return out

    policy.generate = recording_generate
    cfg = PPOConfig(algorithm="grpo", group_size=4, prompts_per_step=4, minibatch_size=16,
                    sampling=SamplingConfig(max_new_tokens=10, temperature=1.0, batch_size=8))
    scorer = ppo.Scorer(lambda p, r: [float(len(x)) for x in r], None, None)
    ro = ppo.make_rollout(policy, load_causal_lm(lossy_lm), None, tok, ["abc", "ca", "bca", "c"], scorer, cfg, seed=0,
                          device=CPU)
    assert len(generated) == len(ro.samples) == 16
    kept = [row[:row.index(eos) + 1] if eos in row else row for row in generated]  # cut after the first EOS
    texts = [tok.decode(ids, skip_special_tokens=True) for ids in kept]
    assert any(tok(t, add_special_tokens=False)["input_ids"] + [eos] * (ids[-1:] == [eos]) != ids
               for t, ids in zip(texts, kept))  # the premise: decode-then-encode changes some of these
    for row, (s, ids) in enumerate(zip(ro.samples, kept)):
        n_prompt = len(s.prompt_ids)
        assert ro.input_ids[row, n_prompt:n_prompt + len(ids)].tolist() == ids
        assert ro.response_mask[row].sum() == len(ids)
        assert s.text == texts[row]  # the reward reads the decoded text; the loss reads the ids


# ================================================================ 10. resume fidelity

def test_resumed_rl_run_takes_the_bit_identical_next_step(tmp_path, tiny_lm_dir):
    """Pitfall 10: after a resume, the next optimizer step must be bit-identical to the uninterrupted run's:
    optimizer moments, LR schedule, RNG, data position, the adaptive KL coefficient and the Lagrange
    multiplier all restored. transformers' Trainer saves RNG states and skips the data already seen
    on ``resume_from_checkpoint`` because runs resumed without them diverged; an RL loop adds its
    controllers, and an adaptive KL coefficient restarted at its initial value is the RL form.

    PPO with a critic, adaptive β (horizon 16: it moves by 1 − 0.2·4/16 = 0.95 a step), a cost model
    and λ, a linear schedule with warm-up: a run stopped after step 1 (``stop_after_steps``) and
    rerun to the end logs the same steps 2 and 3 and ends with bit-identical weights. The RL stage
    holds the most state (a critic, two optimizers and schedulers, β, λ), so it is the one tested
    here. The other stages' loops gained the same mid-stage checkpoints (``rlhfkit.checkpoints``)
    while this file was written; tests/test_resume.py kills and resumes them, so they are not
    re-tested here.
    Sampling and minibatch order are seeded from the step, so a missing RNG restore would not
    show here. The rerun clears ``stop_after_steps``, which a checkpoint must not compare
    (it says when to stop, not what to compute).
    Checked to fail: without the controllers' ``load_state_dict`` (kl_coef and λ of step 2 differ),
    and without the optimizer's (weights differ).
    """
    from accelerate import Accelerator

    from rlhfkit.io import read_jsonl_plain
    from rlhfkit.models.reward_files import build_scalar_model, save_scalar_model
    from safetensors.torch import load_file

    def score(prompts, responses):
        return [len(r) / 10 for r in responses]

    base = dict(policy=str(tiny_lm_dir), reward_source="callable", cost_model="stage:reward/cost", adaptive_kl=True,
                kl_horizon=16, kl_target=0.01, lambda_lr=0.5, scheduler="linear", warmup_steps=2, prompts_per_step=4,
                minibatch_size=2, ppo_epochs=2, total_steps=3, save_every=1, lr=1e-3, critic_lr=1e-3, mixed_precision="no",
                sampling=SamplingConfig(max_new_tokens=8, temperature=1.0, batch_size=16))
    runs = {}
    for name in ("whole", "resumed"):
        out = tmp_path / name
        _write_prompts(out)
        net, tok = build_scalar_model(tiny_lm_dir, kind="cost", seed=1)
        save_scalar_model(net, tok, out / "reward" / "cost")
        stage = out / "ppo.partial"
        if name == "resumed":
            stage.mkdir()
            with pytest.raises(ppo.StoppedEarly):
                ppo.run(PPOConfig(**base, stop_after_steps=1), StageContext(out, stage, "ppo", Accelerator(cpu=True)),
                        reward_fn=score)
            shutil.rmtree(stage)  # a restarted stage starts from an empty directory (pipeline.run_stage)
        stage.mkdir()
        metrics = ppo.run(PPOConfig(**base), StageContext(out, stage, "ppo", Accelerator(cpu=True)), reward_fn=score)
        runs[name] = (metrics, read_jsonl_plain(stage / "log.jsonl"), load_file(stage / "model" / "model.safetensors"))
    (m_whole, log_whole, w_whole), (m_resumed, log_resumed, w_resumed) = runs["whole"], runs["resumed"]
    assert m_whole["resumed_from_step"] == 0 and m_resumed["resumed_from_step"] == 1
    timing = {"step_time_s", "time_generation_s", "time_scoring_s", "time_forward_s", "time_reference_s", "time_critic_s",
              "time_update_s"}
    assert len(log_whole) == len(log_resumed) == 3
    for a, b in zip(log_whole, log_resumed):
        assert {k: v for k, v in a.items() if k not in timing} == {k: v for k, v in b.items() if k not in timing}
    assert log_whole[1]["kl_coef"] != log_whole[0]["kl_coef"] and log_whole[1]["lambda"] != log_whole[0]["lambda"]
    assert all(torch.equal(w_whole[k], w_resumed[k]) for k in w_whole)
    start = load_file(tiny_lm_dir / "model.safetensors")
    assert any(not torch.equal(w_whole[k], start[k]) for k in w_whole if k in start)  # equal because resumed, not idle


# ================================================================ 11. the DPO reference under LoRA

def test_dpo_reference_under_lora_and_precomputed_equals_a_frozen_copy(tiny_lm_dir):
    """Pitfall 11: under LoRA the reference is the base model with the adapter disabled; computed once before
    training (``precompute_logps``) it must give the same DPO loss as a separate frozen copy run
    beside the policy in the training batch, to 1e-6. With a PEFT model TRL's DPOTrainer takes the
    adapter-disabled base as the reference (``ref_adapter_name`` and ``force_use_ref_model`` exist
    for when that is wrong), and ``precompute_ref_log_probs`` computes it once.
    The adapter here is made non-trivial first (a fresh LoRA B is 0, which would hide the bug).
    Checked to fail: with ``reference_mode`` leaving the adapter on (loss gap 6e-3).
    """
    from rlhfkit.models.loading import load_causal_lm, load_tokenizer
    from rlhfkit.data.pairs import tokenize_pairs
    from rlhfkit.models.sequence_logps import PairLayout, pair_forward, precompute_logps
    from rlhfkit.models.trainable import LoRAConfig, add_lora, reference_mode
    from rlhfkit.preference_losses import dpo_loss
    from rlhfkit.tasks.arith import format_prompt, gold_response, make_problems

    tok = load_tokenizer(tiny_lm_dir)
    Pair = dataclasses.make_dataclass("Pair", ["prompt", "chosen", "rejected"])
    pairs = tokenize_pairs(tok, [Pair(format_prompt(p), gold_response(p), "Answer: 1" + "0" * i)
                                 for i, p in enumerate(make_problems(6, seed=3, unanswerable_frac=0.25))], max_len=200)
    policy = add_lora(load_causal_lm(tiny_lm_dir), LoRAConfig(r=4))
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.add_(0.05)
    copy_ref = load_causal_lm(tiny_lm_dir).eval().requires_grad_(False)
    with reference_mode(policy) as base:  # what dpo.run does, once, before training
        ref = precompute_logps(base, pairs, tok.pad_token_id, batch_size=64, device="cpu")
    policy.eval()
    k = len(pairs)
    logps, _ = pair_forward(policy, pairs, tok.pad_token_id, "cpu", PairLayout.concatenated)
    with torch.no_grad():
        copy_logps, _ = pair_forward(copy_ref, pairs, tok.pad_token_id, "cpu", PairLayout.concatenated)
    assert (logps.detach() - copy_logps).abs().max() > 1e-2  # the adapter is on: policy ≠ reference
    precomputed, _ = dpo_loss(logps[:k], logps[k:], ref["chosen"], ref["rejected"], 0.5)
    separate, _ = dpo_loss(logps[:k], logps[k:], copy_logps[:k], copy_logps[k:], 0.5)
    assert precomputed.item() == pytest.approx(separate.item(), abs=1e-6)
    after, _ = pair_forward(policy, pairs, tok.pad_token_id, "cpu", PairLayout.concatenated)
    assert torch.equal(after, logps)  # the adapter is back on after the reference pass


# ================================================================ 12. reward model scores and batch composition

@pytest.fixture(scope="module")
def tiny_gpt2_dir(tmp_path_factory, tiny_tokenizer):
    """A tiny GPT-2 (learned absolute position embeddings, unlike Llama's rotary ones) with the task tokenizer."""
    from transformers import AutoModelForCausalLM, GPT2Config

    from rlhfkit.models.loading import save_pretrained_atomic

    cfg = GPT2Config(vocab_size=len(tiny_tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=256,
                     bos_token_id=tiny_tokenizer.bos_token_id, eos_token_id=tiny_tokenizer.eos_token_id,
                     pad_token_id=tiny_tokenizer.pad_token_id, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("gpt2") / "model"
    save_pretrained_atomic(AutoModelForCausalLM.from_config(cfg), tiny_tokenizer, out)
    return out


@pytest.mark.parametrize("pad_is_eos", [False, True], ids=["pad", "pad=eos"])
@pytest.mark.parametrize("backbone", ["llama", "gpt2"])
def test_reward_score_does_not_depend_on_batch_composition(tiny_lm_dir, tiny_gpt2_dir, backbone, pad_is_eos):
    """Pitfall 12: a reward model's score of one (prompt, response) must not change with what else is in its
    batch: alone, or padded beside much longer sequences, right or left padded, with pad = EOS, to
    1e-5. Reading the score at "the first pad" or at the last column, or position ids that count
    padding, each break it (DeepSpeed-Chat's reward model and TRL's ``get_reward`` take the first
    pad after the prompt as the end, so they need right padding and pad ≠ EOS).
    Llama's rotary positions only see differences, so position ids that count the padding shift
    nothing there; GPT-2's learned absolute positions do, hence both backbones.
    Checked to fail: with ``last_token_index`` returning the last column (the pad variants; with
    pad = EOS the pad after the EOS has the same token, position and keys as the EOS, so it
    reads the same value), and with position ids 0..T−1 whatever the mask (GPT-2, left padding).
    """
    from rlhfkit.models.reward import collate, encode
    from rlhfkit.models.reward_scorers import RewardModel
    from rlhfkit.models.reward_files import build_scalar_model

    net, tok = build_scalar_model(tiny_lm_dir if backbone == "llama" else tiny_gpt2_dir, kind="reward", seed=1)
    if pad_is_eos:
        tok = copy.deepcopy(tok)
        tok.pad_token = tok.eos_token
    net.eval()
    rm = RewardModel(net, tok, batch_size=8)
    prompt, response = "2 + 3 =", "Answer: 5"
    alone = rm.score([prompt], [response])[0]
    long_prompts = ["Compute 12 * 7 and then add 5, showing every step of the work carefully."] * 2
    long_responses = ["12 * 7 = 84\n84 + 5 = 89\nAnswer: 89", "I cannot answer this question without more information."]
    inside = rm.score([*long_prompts, prompt], [*long_responses, response])[-1]
    assert inside == pytest.approx(alone, abs=1e-5)
    seqs = [encode(tok, net.info, p, r)[0] for p, r in zip([prompt, *long_prompts], [response, *long_responses])]
    assert len(seqs[0]) < min(len(s) for s in seqs[1:])
    with torch.no_grad():
        left = net(**collate(seqs, None, tok.pad_token_id, side="left"))[0].item()
    assert left == pytest.approx(alone, abs=1e-5)
