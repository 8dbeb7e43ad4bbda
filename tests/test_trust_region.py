"""trust_region.py: the closed-form KL against torch.distributions, the anchor schedule, β."""
import math

import pytest
import torch
from hypothesis import given, strategies as st

import trust_region as tr


@given(shape=st.lists(st.integers(1, 4), min_size=1, max_size=3), std_value=st.floats(1e-2, 5.0))
def test_gaussian_kl_equals_torch_distributions_kl_averaged_over_elements(shape, std_value):
    mean, ref_mean = torch.randn(3, *shape, dtype=torch.float64), torch.randn(3, *shape, dtype=torch.float64)
    expected = torch.distributions.kl_divergence(torch.distributions.Normal(mean, std_value),
                                                 torch.distributions.Normal(ref_mean, std_value)).flatten(1).mean(1)
    std = torch.full((3,) + (1,) * len(shape), std_value, dtype=torch.float64)
    torch.testing.assert_close(tr.gaussian_kl(mean, ref_mean, std), expected)


@given(std_value=st.floats(1e-2, 5.0), equal=st.booleans())
def test_gaussian_kl_is_nonnegative_zero_iff_equal_means_and_differentiable(std_value, equal):
    ref_mean = torch.randn(2, 5)
    mean = (ref_mean.clone() if equal else ref_mean + 0.1 * torch.randn(2, 5)).requires_grad_(True)
    kl = tr.gaussian_kl(mean, ref_mean, std_value)
    assert bool((kl >= 0).all())
    assert bool((kl == 0).all()) == equal
    kl.sum().backward()
    # ∂KL/∂μ = (μ - μ_ref) / (std²·n_elements)
    torch.testing.assert_close(mean.grad, (mean - ref_mean).detach() / (std_value ** 2 * 5))


def test_zero_std_steps_give_zero_kl_not_nan():
    kl = tr.gaussian_kl(torch.randn(2, 3), torch.randn(2, 3), torch.zeros(2, 1))
    assert bool((kl == 0).all())


def _equal(module_a, module_b):
    return all(torch.equal(a, b) for a, b in zip(module_a.parameters(), module_b.parameters()))


@pytest.mark.parametrize("period", [1, 3, 10])
def test_anchor_equals_policy_right_after_each_period_and_not_between(period):
    torch.manual_seed(0)
    policy = torch.nn.Linear(4, 4)
    pretrained = [p.detach().clone() for p in policy.parameters()]
    anchor = tr.MovingAnchor(policy, period)
    optimizer = torch.optim.SGD(policy.parameters(), lr=0.1)
    for update in range(1, 2 * period + 2):
        optimizer.zero_grad()
        policy(torch.randn(8, 4)).pow(2).sum().backward()
        optimizer.step()
        refreshed = anchor.update_if_due(update)
        assert refreshed == (update % period == 0)
        assert _equal(anchor.anchor, policy) == refreshed
        if update < period:   # before the first refresh the anchor is the pretrained model
            assert all(torch.equal(a, p) for a, p in zip(anchor.anchor.parameters(), pretrained))
    assert not any(p.requires_grad for p in anchor.anchor.parameters())


def test_infinite_period_keeps_the_pretrained_anchor_forever():
    policy = torch.nn.Linear(2, 2)
    pretrained = [p.detach().clone() for p in policy.parameters()]
    anchor = tr.MovingAnchor(policy, tr.anchor_period_for("fixed", 10))
    for update in range(1, 50):
        with torch.no_grad():
            policy.weight.add_(1.0)
        assert not anchor.update_if_due(update)
    assert all(torch.equal(a, p) for a, p in zip(anchor.anchor.parameters(), pretrained))


def test_anchor_state_round_trips():
    policy = torch.nn.Linear(2, 2)
    anchor = tr.MovingAnchor(policy, 2)
    with torch.no_grad():
        policy.weight.add_(1.0)
    anchor.update_if_due(2)
    restored = tr.MovingAnchor(torch.nn.Linear(2, 2), 2)
    restored.load_state_dict(anchor.state_dict())
    assert _equal(restored.anchor, anchor.anchor) and restored.last_refresh == 2


def test_dual_kl_combines_the_two_terms_with_their_weights():
    mean, anchor_mean, old_mean = torch.zeros(2, 3), torch.ones(2, 3), 2 * torch.ones(2, 3)
    std = 1.0
    # KL_anchor = 1/2, KL_step = 4/2 per element
    total, terms = tr.dual_kl(mean, std, anchor_mean, old_mean, "dual", 1.0, 0.1)
    torch.testing.assert_close(total, torch.full((2,), 0.5 + 0.1 * 2.0))
    assert {name: kl.tolist() for name, kl in terms.items()} == {"kl_anchor": [0.5, 0.5], "kl_step": [2.0, 2.0]}
    total, terms = tr.dual_kl(mean, std, anchor_mean, old_mean, "none")
    assert total.abs().sum() == 0 and set(terms) == {"kl_anchor", "kl_step"}  # still measured, for the logs
    torch.testing.assert_close(tr.dual_kl(mean, std, None, old_mean, "step", 1.0, 0.1)[0], torch.full((2,), 0.2))
    torch.testing.assert_close(tr.dual_kl(mean, std, anchor_mean, None, "moving", 1.0, 0.1)[0], torch.full((2,), 0.5))
    with pytest.raises(ValueError, match="kl_step"):
        tr.dual_kl(mean, std, anchor_mean, None, "dual")


def test_beta_follows_the_two_stage_schedule():
    assert tr.kl_coefficient(0, 1e-7, 1e-5, switch_step=100) == 1e-7
    assert tr.kl_coefficient(99, 1e-7, 1e-5, switch_step=100) == 1e-7
    assert tr.kl_coefficient(100, 1e-7, 1e-5, switch_step=100) == 1e-5
    assert tr.kl_coefficient(10 ** 6, 1e-7, 1e-5, switch_step=None) == 1e-7


def test_invalid_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="unknown KL mode 'adaptive'"):
        tr.kl_weights("adaptive")
    with pytest.raises(ValueError, match="positive int or math.inf"):
        tr.MovingAnchor(torch.nn.Linear(1, 1), 0)
    with pytest.raises(ValueError, match="same shape"):
        tr.gaussian_kl(torch.zeros(2, 3), torch.zeros(2, 4), 1.0)
    assert tr.anchor_period_for("fixed") == math.inf and tr.anchor_period_for("dual", 7) == 7
