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


# ------------------------------------------------------------------------------------------------
# Several rewards: per_reward normalisation (GDPO-style), A = norm(Σ_k w_k·norm(r^k)).

def _norm(values, eps=grpo.ADVANTAGE_EPS):
    """One group's normalisation in plain Python: (r − mean)/(pstdev + ε) over the finite members,
    0 if they are all equal or fewer than 2, None for a failed member."""
    import statistics
    ok = [v for v in values if v is not None]
    if len(ok) < 2 or max(ok) == min(ok):
        return [None if v is None else 0.0 for v in values]
    mean, std = statistics.fmean(ok), statistics.pstdev(ok)
    return [None if v is None else (v - mean) / (std + eps) for v in values]


@given(st.integers(1, 3), st.integers(2, 5), st.integers(1, 3), st.data())
def test_per_reward_advantages_match_a_plain_python_computation(num_rewards, group_size, num_groups, data):
    n = group_size * num_groups
    value = st.floats(-5, 5, allow_nan=False).map(lambda x: round(x, 2))  # ties happen: equal-reward groups
    rows = [[data.draw(st.one_of(value, st.just(None)) if k == 0 else value) for _ in range(n)]
            for k in range(num_rewards)]
    weights = [data.draw(st.sampled_from([0.0, 0.5, 1.0, -2.0])) for _ in range(num_rewards)]
    assume(any(weights))
    expected = []
    for g in range(num_groups):
        members = range(g * group_size, (g + 1) * group_size)
        # a member failed if any reward with a non-zero weight failed on it (here: row 0 has the failures)
        failed = [any(rows[k][i] is None for k in range(num_rewards) if weights[k]) for i in members]
        combined = [0.0] * group_size
        for k in range(num_rewards):
            if weights[k]:
                normed = _norm([None if failed[j] else rows[k][i] for j, i in enumerate(members)])
                combined = [c + weights[k] * (x or 0.0) for c, x in zip(combined, normed)]
        final = _norm([None if failed[j] else combined[j] for j in range(group_size)])
        expected += [None if x is None else max(-grpo.ADVANTAGE_CLIP, min(grpo.ADVANTAGE_CLIP, x)) for x in final]
    tensor = torch.tensor([[math.nan if v is None else v for v in row] for row in rows], dtype=torch.float64)
    got = grpo.decoupled_advantages(tensor, weights, group_size)
    for g, e in zip(got.tolist(), expected):
        assert (math.isnan(g) and e is None) or g == pytest.approx(e, rel=1e-9, abs=1e-9), (got, expected)


@given(st.floats(0.5, 100), st.floats(-100, 100), st.integers(0, 2 ** 31 - 1))
def test_per_reward_advantages_ignore_each_rewards_scale_and_offset_where_total_does_not(scale, offset, seed):
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(2, 8, generator=g, dtype=torch.float64)
    rescaled = torch.stack([rewards[0] * scale + offset, rewards[1]])
    weights = [1.0, 0.5]
    # equal up to ε = 1e-4 in (r − mean)/(std + ε): a relative 1e-4/std, std ≥ 0.5·(a spread of 8 normals)
    torch.testing.assert_close(grpo.decoupled_advantages(rescaled, weights, 4),
                               grpo.decoupled_advantages(rewards, weights, 4), rtol=3e-3, atol=3e-3)
    if abs(math.log(scale)) > 1:  # total: the weighted sum's advantages follow the rescaled reward instead
        total = grpo.group_advantages(rescaled[0] * 1.0 + rescaled[1] * 0.5, 4)
        assert not torch.allclose(total, grpo.decoupled_advantages(rewards, weights, 4), atol=1e-2)


def test_per_reward_with_one_reward_is_the_grpo_advantage():
    rewards = torch.randn(1, 12, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    torch.testing.assert_close(grpo.decoupled_advantages(rewards, [2.0], 4), grpo.group_advantages(rewards[0], 4),
                               rtol=1e-3, atol=1e-4)  # equal up to where ε enters (ε = 1e-4 against spreads ~1)


# ------------------------------------------------------------------------------------------------
# Values and cases the tests above do not pin down (each one a mutation they let through).

def test_the_loss_is_the_mean_over_the_valid_pairs_and_so_is_its_gradient():
    # 6 pairs: one failed reward (NaN advantage), one deterministic step (weight 0): 4 valid
    advantages = torch.tensor([1.0, -2.0, float("nan"), 0.5, 3.0, -1.0], dtype=torch.float64)
    weights = torch.tensor([1.0, 2.0, 1.0, 0.0, 0.5, 1.0], dtype=torch.float64)
    log_prob = torch.zeros(6, dtype=torch.float64, requires_grad=True)
    loss, stats = grpo.clipped_policy_loss(log_prob, log_prob.detach(), advantages, weights)
    loss.backward()
    # by hand, on-policy (ρ = 1): loss = −Σ_valid S·A / 4, ∂loss/∂log p_i = −S_i·A_i / 4 for a valid pair, else 0
    valid = [0, 1, 4, 5]
    assert stats["num_valid_pairs"] == 4
    assert loss.item() == pytest.approx(-sum(weights[i].item() * advantages[i].item() for i in valid) / 4, rel=1e-12)
    expected = torch.zeros(6, dtype=torch.float64)
    expected[valid] = -weights[valid] * advantages[valid] / 4
    torch.testing.assert_close(log_prob.grad, expected, rtol=1e-12, atol=0)


def test_per_reward_inner_normalisation_is_not_clamped_only_the_final_advantage():
    # a group of 30 where reward 0 has one outlier: its normalised value is √29 ≈ 5.39 > adv_clip = 5, so a clamp
    # inside would change the sum (groups below 27 members cannot reach 5 this way: max z = √(G − 1))
    group = 30
    first = [0.0] * (group - 1) + [1.0]
    second = [float(i % 7) for i in range(group)]
    rows = [first, second]
    weights = [1.0, 0.5]
    combined = [0.0] * group
    for row, w in zip(rows, weights):
        combined = [c + w * x for c, x in zip(combined, _norm(row))]  # unclamped inner values
    expected = [max(-5.0, min(5.0, x)) for x in _norm(combined)]
    assert _norm(first)[-1] > 5.0
    got = grpo.decoupled_advantages(torch.tensor(rows, dtype=torch.float64), weights, group, clip=5.0)
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-12)


def test_a_group_of_equal_rewards_has_zero_advantage_even_without_epsilon():
    rewards = torch.tensor([0.7, 0.7, 0.7, 0.7, 0.0, 1.0, 0.5, 0.5], dtype=torch.float64)
    advantages = grpo.group_advantages(rewards, 4, eps=0.0)   # 0/0 without the rule: NaN
    assert advantages[:4].tolist() == [0.0, 0.0, 0.0, 0.0]
    assert torch.isfinite(advantages).all()


def test_the_advantage_epsilon_is_flowgrpos_1e_minus_4():
    assert grpo.ADVANTAGE_EPS == 1e-4  # FlowGRPO's; docs/official_recipe.md's table of differences states it
    # a group [0, d]: mean d/2, population std d/2, so A = ±(d/2)/(d/2 + ε); d = 2ε gives ±1/2 exactly
    advantages = grpo.group_advantages(torch.tensor([0.0, 2e-4], dtype=torch.float64), 2)
    torch.testing.assert_close(advantages, torch.tensor([-0.5, 0.5], dtype=torch.float64), rtol=1e-9, atol=0)
