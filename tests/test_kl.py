"""KL estimators and penalty controllers: hand values, the estimators' guarantees, resumability."""
import math

import pytest
import torch

from rlhfkit.kl import (
    AdaptiveKLController,
    FixedKLController,
    KLEstimator,
    LagrangeMultiplier,
    kl_estimate,
    kl_k1,
    kl_k2,
    kl_k3,
)

LN2 = math.log(2)


def test_estimators_by_hand():
    """Token a: log π = 0, log π_ref = ln 2 (d = log π_ref − log π = ln 2).
    Token b: log π = ln 2, log π_ref = 0 (d = −ln 2).
      k1 = log π − log π_ref:      a: −ln 2            b: ln 2
      k2 = ½ (log π − log π_ref)²:  a: (ln 2)²/2        b: (ln 2)²/2
      k3 = e^d − d − 1:            a: 2 − ln 2 − 1 = 1 − ln 2     b: 1/2 + ln 2 − 1 = ln 2 − 1/2
    """
    logp = torch.tensor([[0.0, LN2]], dtype=torch.float64)
    ref_logp = torch.tensor([[LN2, 0.0]], dtype=torch.float64)
    assert torch.allclose(kl_k1(logp, ref_logp), torch.tensor([[-LN2, LN2]], dtype=torch.float64))
    assert torch.allclose(kl_k2(logp, ref_logp), torch.tensor([[LN2**2 / 2, LN2**2 / 2]], dtype=torch.float64))
    assert torch.allclose(kl_k3(logp, ref_logp), torch.tensor([[1 - LN2, LN2 - 0.5]], dtype=torch.float64))
    for name, fn in (("k1", kl_k1), ("k2", kl_k2), ("k3", kl_k3)):
        assert torch.equal(kl_estimate(logp, ref_logp, name), fn(logp, ref_logp))
        assert torch.equal(kl_estimate(logp, ref_logp, KLEstimator(name)), fn(logp, ref_logp))


def test_estimators_are_exactly_zero_when_policy_equals_reference():
    logp = torch.randn(3, 7)
    for estimator in KLEstimator:
        assert torch.equal(kl_estimate(logp, logp.clone(), estimator), torch.zeros(3, 7))


def test_k3_is_nonnegative_even_near_zero():
    torch.manual_seed(0)
    logp = torch.randn(64, 128) * 3
    assert (kl_k3(logp, torch.randn(64, 128) * 3) >= 0).all()
    # Tiny differences, where exp(d) − 1 would cancel catastrophically in fp32.
    assert (kl_k3(logp, logp + torch.randn(64, 128) * 1e-6) >= 0).all()


def test_unbiasedness_exactly_over_a_categorical():
    """Take expectations exactly, Σ_x π(x)·k(x), instead of sampling: k1 and k3 give KL(π ‖ π_ref);
    k2 does not. (k3: Σ π (π_ref/π − log(π_ref/π) − 1) = Σ π_ref − 1 + KL = KL.)
    """
    torch.manual_seed(1)
    logp = torch.log_softmax(torch.randn(10, dtype=torch.float64), 0)
    ref_logp = torch.log_softmax(torch.randn(10, dtype=torch.float64), 0)
    p = logp.exp()
    exact = (p * (logp - ref_logp)).sum()
    for estimator in KLEstimator:
        expectation = (p * kl_estimate(logp, ref_logp, estimator)).sum()
        assert torch.isclose(expectation, exact).item() == estimator.unbiased
    assert KLEstimator.k3.nonnegative and not KLEstimator.k1.nonnegative
    assert (kl_k1(logp, ref_logp) < 0).any()  # k1 really does go negative per sample


def test_estimators_reject_broadcasting_shapes():
    with pytest.raises(ValueError):
        kl_k3(torch.zeros(2, 3), torch.zeros(2, 1))


def test_adaptive_controller_by_hand():
    """init 0.1, target 6, horizon 10000, n_steps 100 per update.
    KL 12:  e = clip(12/6 − 1 = 1, ±0.2) = 0.2;    β = 0.1 · (1 + 0.2·100/10000) = 0.1 · 1.002 = 0.1002
    KL 6.6: e = 6.6/6 − 1 = 0.1;                   β = 0.1002 · 1.001 = 0.1003002
    KL 3:   e = clip(−0.5) = −0.2;                 β = 0.1003002 · 0.998 = 0.1000995996
    """
    controller = AdaptiveKLController(init_coef=0.1, target=6.0, horizon=10000)
    controller.update(12.0, n_steps=100)
    assert math.isclose(controller.value, 0.1002, rel_tol=1e-12)
    controller.update(6.6, n_steps=100)
    assert math.isclose(controller.value, 0.1003002, rel_tol=1e-12)
    controller.update(torch.tensor(3.0), n_steps=100)  # a tensor KL is accepted
    assert math.isclose(controller.value, 0.1000995996, rel_tol=1e-12)


def test_adaptive_controller_moves_toward_target():
    controller = AdaptiveKLController(init_coef=0.2, target=4.0, horizon=1000)
    for _ in range(5):
        before = controller.value
        controller.update(8.0, n_steps=64)  # KL too high → penalize more
        assert controller.value > before
    for _ in range(5):
        before = controller.value
        controller.update(1.0, n_steps=64)  # KL too low → penalize less
        assert controller.value < before
    before = controller.value
    controller.update(4.0, n_steps=64)
    assert controller.value == before  # on target → unchanged


def test_fixed_controller_never_moves():
    controller = FixedKLController(0.05)
    controller.update(100.0, n_steps=1000)
    assert controller.value == 0.05


@pytest.mark.parametrize(
    "make, step",
    [
        (lambda: FixedKLController(0.05), lambda c: c.update(9.0, 10)),
        (lambda: AdaptiveKLController(0.1, 6.0, 100), lambda c: c.update(9.0, 10)),
        (lambda: LagrangeMultiplier(1.0, 0.1, 5.0), lambda c: c.update(2.0, 0.5)),
    ],
)
def test_controllers_resume_where_they_stopped(make, step):
    """A run interrupted after 3 updates and resumed from its state_dict ends where an
    uninterrupted run of 6 updates ends."""
    straight = make()
    for _ in range(6):
        step(straight)
    first = make()
    for _ in range(3):
        step(first)
    resumed = make()
    resumed.load_state_dict(first.state_dict())
    for _ in range(3):
        step(resumed)
    assert resumed.value == straight.value


def test_lagrange_multiplier_by_hand():
    """init 1, lr 0.5, max 2.
    cost 3, threshold 1: 1 + 0.5·(3 − 1) = 2            (at the cap)
    cost 4, threshold 1: 2 + 0.5·3 = 3.5 → clipped to 2
    cost 0.5, threshold 1: 2 + 0.5·(−0.5) = 1.75        (constraint holds → λ decays)
    cost −5, threshold 1: 1.75 + 0.5·(−6) = −1.25 → clipped to 0
    """
    multiplier = LagrangeMultiplier(init=1.0, lr=0.5, max_value=2.0)
    for cost, expected in ((3.0, 2.0), (4.0, 2.0), (0.5, 1.75), (-5.0, 0.0)):
        multiplier.update(cost, threshold=1.0)
        assert multiplier.value == expected


def test_lagrange_multiplier_stays_in_bounds():
    torch.manual_seed(2)
    multiplier = LagrangeMultiplier(init=0.5, lr=0.3, max_value=1.5)
    for cost in (torch.randn(200) * 4).tolist():
        multiplier.update(cost, threshold=0.0)
        assert 0.0 <= multiplier.value <= 1.5
    with pytest.raises(ValueError):
        LagrangeMultiplier(init=2.0, lr=0.1, max_value=1.0)
