"""grpo.py: group advantages and the clipped policy loss against hand computations."""
import math

import pytest
import torch
from hypothesis import assume, given, strategies as st

import grpo

finite = st.floats(-100, 100, allow_nan=False)


@given(group_size=st.integers(2, 8), num_groups=st.integers(1, 4), data=st.data())
def test_advantages_have_zero_group_mean_and_unit_population_std(group_size, num_groups, data):
    rewards = torch.tensor(data.draw(st.lists(finite, min_size=group_size * num_groups,
                                              max_size=group_size * num_groups)), dtype=torch.float64)
    advantages = grpo.group_advantages(rewards, group_size, clip=1e9, eps=0.0)
    for r, a in zip(rewards.view(-1, group_size), advantages.view(-1, group_size)):
        if r.max() - r.min() < 1e-6 * (1 + r.abs().max()):
            continue  # (near) zero-spread groups are tested separately
        assert abs(a.mean().item()) < 1e-9
        assert a.std(unbiased=False).item() == pytest.approx(1.0, rel=1e-9)
        # by hand: (r - mean) / population std
        torch.testing.assert_close(a, (r - r.mean()) / r.std(unbiased=False))


@given(scale=st.floats(1e-3, 1e3), offset=finite, data=st.data())
def test_advantages_are_invariant_to_positive_affine_reward_changes(scale, offset, data):
    rewards = torch.tensor(data.draw(st.lists(finite, min_size=8, max_size=8)), dtype=torch.float64)
    assume(all((g.max() - g.min()).item() > 1e-3 for g in rewards.view(2, 4)))
    a = grpo.group_advantages(rewards, 4, clip=1e9, eps=0.0)
    b = grpo.group_advantages(scale * rewards + offset, 4, clip=1e9, eps=0.0)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_failed_rewards_are_excluded_from_statistics_and_loss():
    rewards = torch.tensor([1.0, float("nan"), 3.0, 5.0, 2.0, 2.0, float("inf"), 4.0])
    advantages = grpo.group_advantages(rewards, 4, clip=100.0, eps=0.0)
    # group 0 by hand over its valid members [1, 3, 5]: mean 3, population std √(8/3)
    std = math.sqrt(8 / 3)
    torch.testing.assert_close(advantages[[0, 2, 3]], torch.tensor([-2 / std, 0.0, 2 / std]))
    assert math.isnan(advantages[1]) and math.isnan(advantages[6])
    stats = grpo.reward_stats(rewards, 4)
    assert stats["num_failed_rewards"] == 2
    assert stats["reward_mean"] == pytest.approx(17 / 6)
    # the loss ignores failed samples: their log-probs get no gradient and do not dilute the mean
    log_prob = torch.zeros(8, requires_grad=True)
    loss, loss_stats = grpo.clipped_policy_loss(log_prob, log_prob.detach(), advantages, torch.ones(8))
    loss.backward()
    assert log_prob.grad[1] == 0 and log_prob.grad[6] == 0
    assert loss_stats["num_valid_pairs"] == 6


def test_zero_std_groups_get_zero_advantage_and_are_counted():
    rewards = torch.tensor([0.3, 0.3, 0.3, 0.3, 0.0, 1.0, 0.0, 1.0])
    advantages = grpo.group_advantages(rewards, 4)
    assert bool((advantages[:4] == 0).all())
    assert grpo.reward_stats(rewards, 4)["zero_std_ratio"] == 0.5


def test_advantages_are_clamped():
    rewards = torch.tensor([0.0] * 99 + [1.0])
    advantages = grpo.group_advantages(rewards, 100, clip=5.0)
    # unclamped the outlier would get (1 - 0.01) / √(0.0099) ≈ 9.95
    assert advantages.max().item() == 5.0


@given(batch=st.integers(1, 16), data=st.data())
def test_on_policy_ratio_is_one_and_gradient_is_reinforce_times_equalizer_weight(batch, data):
    log_prob_values = torch.tensor(data.draw(st.lists(st.floats(-50, 50), min_size=batch, max_size=batch)))
    advantages = torch.tensor(data.draw(st.lists(st.floats(-5, 5), min_size=batch, max_size=batch)))
    weights = torch.tensor(data.draw(st.lists(st.floats(0.01, 10), min_size=batch, max_size=batch)))
    log_prob = log_prob_values.clone().requires_grad_(True)
    loss, stats = grpo.clipped_policy_loss(log_prob, log_prob_values.clone(), advantages, weights, 1e-4)
    assert stats["ratio_mean"] == 1.0 and stats["ratio_std"] == 0.0 and stats["clip_fraction"] == 0.0
    assert stats["approx_kl"] == 0.0
    loss.backward()
    # ∂loss/∂log p_i = -A_i·S_i / n
    torch.testing.assert_close(log_prob.grad, -advantages * weights / batch)


def test_clipped_pairs_get_no_gradient_only_on_the_pessimistic_side():
    clip = 0.1
    old = torch.zeros(4)
    log_ratio = torch.tensor([0.5, 0.5, -0.5, -0.5])       # ρ ≈ 1.65, 1.65, 0.61, 0.61
    advantages = torch.tensor([1.0, -1.0, 1.0, -1.0])
    log_prob = log_ratio.clone().requires_grad_(True)
    loss, stats = grpo.clipped_policy_loss(log_prob, old, advantages, torch.ones(4), clip)
    loss.backward()
    ratio = log_ratio.exp()
    # PPO: A > 0 and ρ > 1+ε -> clipped (flat); A < 0 and ρ < 1-ε -> clipped; otherwise -A·ρ
    expected_grad = torch.tensor([0.0, ratio[1].item(), -ratio[2].item(), 0.0]) / 4
    torch.testing.assert_close(log_prob.grad, expected_grad)
    expected_loss = (-(1 + clip) * 1 + ratio[1] - ratio[2] + (1 - clip) * 1) / 4
    assert loss.item() == pytest.approx(expected_loss.item(), rel=1e-6)
    assert stats["clip_fraction"] == 1.0


def test_invalid_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="group_size 3 must divide the batch of 8"):
        grpo.group_advantages(torch.zeros(8), 3)
    with pytest.raises(ValueError, match="1-D"):
        grpo.group_advantages(torch.zeros(2, 4), 4)
    with pytest.raises(ValueError, match="one shape"):
        grpo.clipped_policy_loss(torch.zeros(3), torch.zeros(3), torch.zeros(2), torch.ones(3))
