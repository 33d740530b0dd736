"""Direct preference losses: DPO (sigmoid, conservative, IPO), DNO (hard and soft targets) and the SFT term.

Pure tensor math, imports only torch (and the shape helpers of ``rlhfkit.losses``), with the
conventions of ``rlhfkit.losses``: sequence log-probs are sums over response tokens, and every
loss returns ``(loss, metrics)``, the metrics detached 0-d tensors.
"""
from __future__ import annotations

from enum import StrEnum

import torch
import torch.nn.functional as F

from rlhfkit.losses import _check_same_shape, _weighted_mean

Tensor = torch.Tensor


class DPOLossType(StrEnum):
    """DPO variants. Label smoothing (conservative DPO) is a parameter of ``sigmoid``, not a member.

    StrEnum, not (str, Enum): str() and f-strings give the bare name ("ipo"), so configs and
    logs round-trip; a (str, Enum) prints "DPOLossType.ipo" on Python ≥ 3.11.
    """

    sigmoid = "sigmoid"
    ipo = "ipo"

    @property
    def needs_reference(self) -> bool:
        """Whether the loss compares to a frozen reference model (so the recipe must load one).

        Recipes ask this instead of matching names; a reference-free member (SimPO, ORPO)
        would answer False and the recipe would skip the reference forward pass.
        """
        return self in (DPOLossType.sigmoid, DPOLossType.ipo)


def _preference_metrics(chosen_rewards: Tensor, rejected_rewards: Tensor) -> dict:
    """Implicit-reward diagnostics shared by DPO and DNO; inputs (B,), already detached."""
    return {
        "reward_accuracy": (chosen_rewards > rejected_rewards).float().mean(),
        "chosen_reward": chosen_rewards.mean(),
        "rejected_reward": rejected_rewards.mean(),
        "reward_margin": (chosen_rewards - rejected_rewards).mean(),
    }


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
    loss_type: DPOLossType | str = DPOLossType.sigmoid,
    label_smoothing: float = 0.0,
    weights: Tensor | None = None,
    length_alpha: float = 0.0,
    lengths: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, dict]:
    """DPO-family loss on (B,) sequence log-probs of the policy and the frozen reference.

    h = (π_c − ref_c) − (π_r − ref_r), each term a log-prob summed over response tokens.
    sigmoid: −(1 − ε) log σ(βh) − ε log σ(−βh)   (Rafailov et al. 2023, eq. 7; ε > 0 is
             conservative DPO, Mitchell 2023: labels flipped with probability ε, ε ∈ [0, 0.5)).
    ipo:     (h − 1/(2β))²                          (Azar et al. 2023, eq. 17). IPO usually
             feeds *length-averaged* log-probs (mean over tokens), as TRL does; pass those
             if you want that, since the target 1/(2β) is then per token. ε must be 0.
    length_alpha α > 0 (sigmoid only): length-regularised DPO (R-DPO, Park et al. 2024, "Disentangling
             Length from Quality in DPO", eq. 9): βh becomes βh − α(|y_c| − |y_r|) in both log σ terms,
             ``lengths`` = (|y_c|, |y_r|) (B,) in response tokens. A longer chosen must then win by a larger
             log-ratio margin, so the policy cannot buy reward with length. E.g. β = 0.1, h = 2, α = 0.01,
             lengths 30 vs 10: −log σ(0.1·2 − 0.01·(30 − 10)) = −log σ(0) = log 2.
    Weighted mean over pairs. Metrics: implicit rewards β(π − ref) of chosen and rejected,
    their accuracy (chosen > rejected; 0 at step 0 where policy = reference) and margin.
    """
    loss_type = DPOLossType(loss_type)
    _check_same_shape(
        policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps,
        ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps,
    )
    # The reference is frozen: detach so a caller passing live tensors cannot train it.
    chosen_logratio = policy_chosen_logps - ref_chosen_logps.detach()
    rejected_logratio = policy_rejected_logps - ref_rejected_logps.detach()
    h = chosen_logratio - rejected_logratio
    if loss_type is DPOLossType.sigmoid:
        if not 0.0 <= label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
        z = beta * h
        if length_alpha:  # only then: α = 0 leaves z (and the loss) bit-identical to plain DPO
            if lengths is None:
                raise ValueError("length_alpha needs lengths = (chosen lengths, rejected lengths)")
            _check_same_shape(chosen_logratio=h, chosen_lengths=lengths[0], rejected_lengths=lengths[1])
            z = z - length_alpha * (lengths[0] - lengths[1]).to(z.dtype)
        per_pair = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    else:  # DPOLossType.ipo
        if label_smoothing or length_alpha:
            raise ValueError("label_smoothing and length_alpha apply to the sigmoid loss only")
        per_pair = (h - 1 / (2 * beta)) ** 2
    loss = _weighted_mean(per_pair, weights)
    with torch.no_grad():
        metrics = _preference_metrics(beta * chosen_logratio, beta * rejected_logratio)
    return loss, metrics


def dno_loss(
    policy_pos_logps: Tensor,
    policy_neg_logps: Tensor,
    prev_pos_logps: Tensor,
    prev_neg_logps: Tensor,
    eta: float,
    weights: Tensor | None = None,
) -> tuple[Tensor, dict]:
    """DNO contrastive loss (Rosset et al. 2024, arXiv 2404.03715, Algorithm 2), inputs (B,).

    loss = −log σ(η log(π/π_t)(y⁺) − η log(π/π_t)(y⁻)), weighted mean over pairs.

    The form of sigmoid DPO, but the reference is the *previous iterate* π_t, not the SFT
    model: using the SFT model here silently turns DNO into iterated DPO. (y⁺, y⁻) are
    on-policy samples ranked by the preference oracle. Metrics as ``dpo_loss`` with β = η.
    """
    _check_same_shape(
        policy_pos_logps=policy_pos_logps, policy_neg_logps=policy_neg_logps,
        prev_pos_logps=prev_pos_logps, prev_neg_logps=prev_neg_logps,
    )
    pos_logratio = policy_pos_logps - prev_pos_logps.detach()
    neg_logratio = policy_neg_logps - prev_neg_logps.detach()
    loss = _weighted_mean(-F.logsigmoid(eta * (pos_logratio - neg_logratio)), weights)
    with torch.no_grad():
        metrics = _preference_metrics(eta * pos_logratio, eta * neg_logratio)
    return loss, metrics


def dno_soft_loss(
    policy_1: Tensor, policy_2: Tensor, prev_1: Tensor, prev_2: Tensor, target: Tensor, eta: float
) -> tuple[Tensor, dict]:
    """DNO's soft-target loss (Rosset et al. 2024, Algorithm 1), inputs (B,).

    h = log(π/π_t)(y₁) − log(π/π_t)(y₂); target = σ(r_t(y₁) − r_t(y₂)) ∈ [0, 1], given.
    loss = mean −[target·log σ(ηh) + (1 − target)·log σ(−ηh)]

    A cross-entropy between the target preference and the model's σ(ηh): it is minimal (equal
    to the target's binary entropy, not 0) where σ(ηh) = target. Metrics: mean σ(ηh), mean target.
    """
    _check_same_shape(policy_1=policy_1, policy_2=policy_2, prev_1=prev_1, prev_2=prev_2, target=target)
    if not bool(((target >= 0) & (target <= 1)).all()):
        raise ValueError("target must be a probability in [0, 1]")
    h = (policy_1 - prev_1.detach()) - (policy_2 - prev_2.detach())
    target = target.to(h.dtype)
    loss = -(target * F.logsigmoid(eta * h) + (1 - target) * F.logsigmoid(-eta * h)).mean()
    with torch.no_grad():
        metrics = {"predicted_preference": torch.sigmoid(eta * h).mean(), "target": target.mean()}
    return loss, metrics


def sft_nll(logps_sum: Tensor, n_tokens: Tensor, weights: Tensor | None = None) -> Tensor:
    """Mean per-token negative log-likelihood of the chosen responses, for DPO + SFT (RPO).

    logps_sum (B,): summed log-probs of each chosen response; n_tokens (B,): its length.
    Returns mean_b(−logps_sum_b / n_tokens_b), a scalar. Each sequence is normalized by its own
    length before the batch mean (Pang et al. 2024, eq. 1), so a long response does not
    outweigh a short one; TRL's ``rpo_alpha`` instead averages over all tokens of the batch.
    ``weights`` (B,): the weighted mean Σ w·nll / Σ w, with the pair weights the DPO term uses,
    so a batch cut into micro-batches weighted by their share of Σ w gives the same total.
    Add it as ``loss = dpo + alpha * sft_nll(...)``.
    """
    _check_same_shape(logps_sum=logps_sum, n_tokens=n_tokens)
    per_sequence = -logps_sum / n_tokens.to(logps_sum.dtype).clamp(min=1)
    if weights is None:
        return per_sequence.mean()
    _check_same_shape(logps_sum=logps_sum, weights=weights)
    weights = weights.to(per_sequence.dtype)
    return (weights * per_sequence).sum() / weights.sum()
