"""KL estimators and the penalty coefficients that RL adapts online. Imports only torch.

Estimators (Schulman, "Approximating KL divergence", 2020) estimate KL(π ‖ π_ref) per token
from tokens *sampled from π*, given logp = log π(x) and ref_logp = log π_ref(x), both (B, T):

    k1 = logp − ref_logp                      unbiased, high variance, negative for some samples
    k2 = ½ (logp − ref_logp)²                 biased (little when π ≈ π_ref), low variance, ≥ 0
    k3 = r − 1 − log r,  r = π_ref/π          unbiased, low variance, ≥ 0

Where each is used: PPO's per-token reward penalty uses k1 (its expectation is the KL we
penalize, and it enters the return, not the gradient); GRPO's loss term uses k3 (Shao et al.
2024, eq. 4). Trap: k1 *as a loss* has zero expected gradient, E_π[∇ log π] = 0, so it does
not pull π toward π_ref at all; do not put it in a loss.

An unbiased *value* is not an unbiased *gradient*. On samples from π, differentiating through
log π (Tang & Munos 2025, "On a few pitfalls in KL divergence gradient estimation for RL"):

    k1 in the reward (policy gradient)  E[k1 ∇log π]                = ∇ KL(π ‖ π_ref)   unbiased
    k2 in the loss                      E[(log π − log π_ref) ∇log π] = ∇ KL(π ‖ π_ref)   unbiased
    k3 in the loss                      E[(1 − π_ref/π) ∇log π]     = ∇ KL(π_ref ‖ π)   the FORWARD KL
    k3 · π/π_old in the loss            k2's gradient                = ∇ KL(π ‖ π_ref)   unbiased
    k1 in the loss                      E[∇log π]                    = 0                 refused

So GRPO's default (k3 in the loss) regularises toward π_ref by the forward KL's gradient, not
the reverse KL it reports; ``kl_estimator: k2`` gives the reverse KL's gradient in the loss
(tests/test_pitfalls.py computes all five exactly on a categorical policy).

The controllers below (KL coefficient, Safe RLHF's Lagrange multiplier) are coefficients on a
penalty, updated by the training loop; each has ``state_dict`` / ``load_state_dict`` so a
resumed run continues from the same value instead of restarting from its initial one.
"""
from __future__ import annotations

from enum import StrEnum

import torch

Tensor = torch.Tensor


def _log_ratio(logp: Tensor, ref_logp: Tensor) -> Tensor:
    # (B, T) against (B, 1) would broadcast into nonsense without an error.
    if logp.shape != ref_logp.shape:
        raise ValueError(f"logp {tuple(logp.shape)} and ref_logp {tuple(ref_logp.shape)} must match")
    return logp - ref_logp


def kl_k1(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k1 = log π − log π_ref per token, (B, T) → (B, T). Unbiased; noisy; can be negative."""
    return _log_ratio(logp, ref_logp)


def kl_k2(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k2 = ½ (log π − log π_ref)² per token, (B, T) → (B, T). Biased, low variance, ≥ 0."""
    return 0.5 * _log_ratio(logp, ref_logp) ** 2


def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k3 = exp(d) − d − 1 with d = log π_ref − log π, per token, (B, T) → (B, T).

    Unbiased (E_π[π_ref/π] = 1) and ≥ 0 (e^d ≥ 1 + d). Computed as expm1(d) − d: near π = π_ref,
    exp(d) − 1 loses every significant digit to cancellation and can come out slightly negative.
    """
    d = -_log_ratio(logp, ref_logp)
    return torch.expm1(d) - d


class KLEstimator(StrEnum):
    """Which per-token estimator of KL(π ‖ π_ref); members say what they guarantee.

    StrEnum, not (str, Enum): str() and f-strings give the bare name ("k3"), so configs and
    logs round-trip; a (str, Enum) prints "KLEstimator.k3" on Python ≥ 3.11.
    """

    k1 = "k1"
    k2 = "k2"
    k3 = "k3"

    @property
    def unbiased(self) -> bool:
        """E_π[estimate] = KL(π ‖ π_ref) exactly."""
        return self in (KLEstimator.k1, KLEstimator.k3)

    @property
    def nonnegative(self) -> bool:
        """Every per-sample value is ≥ 0."""
        return self in (KLEstimator.k2, KLEstimator.k3)


def kl_estimate(logp: Tensor, ref_logp: Tensor, estimator: KLEstimator | str) -> Tensor:
    """Per-token KL estimate with the named estimator: (B, T) → (B, T)."""
    estimator = KLEstimator(estimator)
    if estimator is KLEstimator.k1:
        return kl_k1(logp, ref_logp)
    if estimator is KLEstimator.k2:
        return kl_k2(logp, ref_logp)
    return kl_k3(logp, ref_logp)


class KLInLoss(StrEnum):
    """Where the KL penalty goes."""

    auto = "auto"
    """the algorithm's default (``Algorithm.default_kl_in_loss``)"""
    true = "true"
    """β·KL added to the loss"""
    false = "false"
    """−β·KL in the per-token reward"""


class KLChoice(StrEnum):
    """Which KL estimator (``KLEstimator``), or ``auto``: k1 in the reward, k3 in the loss."""

    auto = "auto"
    k1 = "k1"
    k2 = "k2"
    k3 = "k3"


class FixedKLController:
    """A constant KL coefficient β, with the same interface as the adaptive one."""

    def __init__(self, coef: float):
        self.value = float(coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op: the coefficient is fixed."""

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Adaptive KL coefficient β that steers the measured KL toward ``target`` (Ziegler et al.
    2019, in the form their lm-human-preferences code implements):

    e = clip(KL / target − 1, −0.2, 0.2);   β ← β · (1 + e · n_steps / horizon)

    The clip bounds how far one noisy KL measurement can move β; ``n_steps`` is the number of
    samples (Ziegler et al. count episodes) since the last update, so the rate does not depend
    on how often ``update`` is called.
    """

    def __init__(self, init_coef: float, target: float, horizon: int):
        if target <= 0 or horizon <= 0:
            raise ValueError(f"target and horizon must be > 0, got {target}, {horizon}")
        self.value = float(init_coef)
        self.target = float(target)
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict:
        # target and horizon come from the config; only the learned value is state.
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class LagrangeMultiplier:
    """Safe RLHF's multiplier λ on the cost (Dai et al. 2023), updated online.

    λ ← clip(λ + lr · (mean_cost − threshold), 0, max_value): projected gradient ascent on the
    dual of "maximize reward subject to E[cost] ≤ threshold". λ grows while the policy
    violates the constraint and decays to 0 once it holds. The projection onto [0, ∞) keeps
    the dual feasible (a negative λ would *reward* cost); ``max_value`` bounds how far a burst
    of violations can drive the penalty. The authors' code updates log λ instead (λ > 0
    always); this additive form can reach exactly 0, i.e. switch the penalty off.
    """

    def __init__(self, init: float, lr: float, max_value: float = float("inf")):
        if not 0.0 <= init <= max_value:
            raise ValueError(f"init must be in [0, max_value={max_value}], got {init}")
        self.value = float(init)
        self.lr = float(lr)
        self.max_value = float(max_value)

    def update(self, mean_cost: float, threshold: float) -> None:
        stepped = self.value + self.lr * (float(mean_cost) - float(threshold))
        self.value = min(max(stepped, 0.0), self.max_value)

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])
