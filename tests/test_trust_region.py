"""trust_region.py: the closed-form KL against torch.distributions, the anchor schedule, β."""
import copy
import math

import pytest
import torch
from hypothesis import given, strategies as st

import grpo
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


# --- β controller ------------------------------------------------------------------------------

kl_values = st.floats(0.0, 1e-3, allow_nan=False)
# runs of equal KLs (below, inside and above the band 5e-6..1.5e-5), so that β reaches its bounds
kl_runs = st.lists(st.tuples(st.sampled_from([0.0, 3e-6, 1e-5, 2e-5, 1e-3]), st.integers(1, 80)), max_size=8).map(
    lambda runs: [kl for kl, length in runs for _ in range(length)])


def _run(controller, kls):
    """β before the first controller step, then after each: one step per pair (official), per optimizer update
    (adaptive, two_stage, fixed)."""
    advance = controller.step if isinstance(controller, tr.OfficialBeta) else controller.observe
    return [controller.beta] + [(advance(kl), controller.beta)[1] for kl in kls]


@given(kls=st.lists(kl_values, min_size=tr.RAMP_UPDATES, max_size=tr.RAMP_UPDATES + 5))
def test_official_beta_ramps_linearly_from_1e_7_over_the_first_100_updates_whatever_the_kl(kls):
    betas = _run(tr.OfficialBeta(), kls)
    # after n < 100 updates: β = 1e-7 + (1e-5 - 1e-7)·n/100; the ramp ends at 9.901e-6, not 1e-5
    for n in range(tr.RAMP_UPDATES):
        assert betas[n] == pytest.approx(1e-7 + (1e-5 - 1e-7) * n / 100, rel=1e-12)
    assert betas[99] == pytest.approx(9.901e-6, rel=1e-12)
    assert all(a < b for a, b in zip(betas[:100], betas[1:100]))
    # the 100th update is the first one of the KL rule, applied to the ramp's last value
    mean_kl = sum(kls[90:100]) / 10
    factor = 0.9 if mean_kl > 1.5e-5 else 1.1 if mean_kl < 5e-6 else 1.0
    assert betas[100] == pytest.approx(min(9.901e-6 * factor, 1e-5), rel=1e-12)


def _after_ramp(kls_during_ramp=2e-5):
    controller = tr.OfficialBeta()
    for _ in range(tr.RAMP_UPDATES - 1):
        controller.step(kls_during_ramp)
    return controller


@given(window=st.lists(kl_values, min_size=10, max_size=10))
def test_official_beta_after_the_ramp_moves_against_the_mean_kl_of_the_last_ten_updates(window):
    controller = _after_ramp()
    for kl in window[:-1]:
        controller.beta = 5e-6             # hold β mid-range so that both directions stay inside the bounds
        controller.step(kl)
    controller.beta = 5e-6
    new_beta = controller.step(window[-1])
    mean_kl = sum(window) / 10
    if mean_kl > 1.5e-5:                   # KL high -> β lowered (the official direction)
        assert new_beta == pytest.approx(0.9 * 5e-6, rel=1e-12)
    elif mean_kl < 5e-6:                   # KL low -> β raised
        assert new_beta == pytest.approx(1.1 * 5e-6, rel=1e-12)
    else:
        assert new_beta == 5e-6


def test_official_beta_reads_the_window_mean_not_the_last_kl():
    controller = _after_ramp(kls_during_ramp=0.0)
    controller.beta = 5e-6
    # nine large KLs then a zero: the last KL is low but the mean of the last ten is high
    for _ in range(9):
        controller.step(1e-3)
    controller.beta = 5e-6
    assert controller.step(0.0) == pytest.approx(4.5e-6, rel=1e-12)


@given(kls=kl_runs)
def test_official_beta_always_stays_within_1e_7_and_1e_5(kls):
    assert all(1e-7 <= beta <= 1e-5 for beta in _run(tr.OfficialBeta(), kls))


def test_official_beta_reaches_both_bounds_under_a_persistent_kl():
    assert _run(tr.OfficialBeta(), [1.0] * 200)[-1] == 1e-7
    assert _run(tr.OfficialBeta(), [0.0] * 200)[-1] == 1e-5


@given(kls=st.lists(kl_values, max_size=300))
def test_fixed_beta_never_changes(kls):
    assert set(_run(tr.ConstantBeta(1e-7), kls)) == {1e-7}


@given(kls=st.lists(kl_values, max_size=150), switch_step=st.one_of(st.none(), st.integers(0, 150)))
def test_two_stage_beta_equals_kl_coefficient_at_the_number_of_updates(kls, switch_step):
    betas = _run(tr.TwoStageBeta(1e-7, 1e-5, switch_step=switch_step), kls)
    assert betas == [tr.kl_coefficient(n, 1e-7, 1e-5, switch_step) for n in range(len(kls) + 1)]


@pytest.mark.parametrize("schedule", ("official", "two_stage", "constant"))
@given(kls=kl_runs, cut=st.integers(0, 200))
def test_beta_controller_state_round_trip_resumes_exactly(schedule, kls, cut):
    kls = [1e-3] * 100 + kls           # resume also after the ramp, with a KL window to carry over
    original = tr.beta_schedule(schedule, switch_step=50)
    _run(original, kls[:cut])
    resumed = tr.beta_schedule(schedule, switch_step=50)
    resumed.load_state_dict(copy.deepcopy(original.state_dict()))
    assert _run(resumed, kls[cut:]) == _run(original, kls[cut:])


def test_betas_returns_each_pairs_beta_before_its_step():
    one, batched = tr.OfficialBeta(), tr.OfficialBeta()
    kls = torch.linspace(0, 1e-4, 130)
    expected = []
    for kl in kls.tolist():
        expected.append(one.beta)
        one.step(kl)
    assert batched.betas(kls[:60]) + batched.betas(kls[60:]) == expected
    assert batched.state_dict() == one.state_dict()


SCHEDULES = {"official": {}, "two_stage": {"switch_step": 2},
             "constant": {}, "adaptive": {"beta_init": 1e-3, "kl_target": 1e-4, "beta_min": 1e-5, "beta_max": 1e-1}}


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
def test_reads_pair_kls_is_false_only_where_betas_ignore_the_kls(schedule):
    """train.pair_betas skips the all-reduce of the KLs where reads_pair_kls is False: the β there must not depend
    on the KLs' values (nor may their values move the schedule's state); the official schedule's does."""
    runs = []
    for kls in (torch.zeros(40), torch.full((40,), 1.0)):
        beta = tr.beta_schedule(schedule, **SCHEDULES[schedule])
        runs.append((beta.betas(kls[:20]) + beta.betas(kls[20:]), beta.state_dict()))
    assert (runs[0] != runs[1]) == tr.beta_schedule(schedule, **SCHEDULES[schedule]).reads_pair_kls


def test_beta_schedules_reject_bad_arguments():
    with pytest.raises(ValueError, match="unknown beta schedule 'ppo'"):
        tr.beta_schedule("ppo")
    with pytest.raises(ValueError, match="0 < beta_start <= beta_end"):
        tr.OfficialBeta(beta_start=0.0)
    with pytest.raises(ValueError, match="kl must be finite"):
        tr.OfficialBeta().step(float("nan"))
    controller = tr.OfficialBeta()
    with pytest.raises(ValueError, match="schedule 'constant'"):
        controller.load_state_dict(tr.ConstantBeta().state_dict())


# ------------------------------------------------------------------------------------------------
# The adaptive schedule (PPO's rule, in the usual direction) and the official k1 step-wise estimator.

def _ppo_rule(beta, kl, target, beta_min, beta_max):
    """PPO (Schulman et al. 2017, sec. 4), written out: x2 above 1.5·target, /2 below target/1.5, clipped."""
    if kl > 1.5 * target:
        beta = beta * 2
    elif kl < target / 1.5:
        beta = beta / 2
    return min(max(beta, beta_min), beta_max)


@given(kls=st.lists(st.floats(0, 1.0), max_size=40), target=st.floats(1e-4, 1e-1), start=st.floats(1e-2, 1e2))
def test_adaptive_beta_follows_ppos_rule_update_by_update(kls, target, start):
    controller = tr.AdaptiveBeta(start, target, 1e-3, 1e4)
    expected = start
    for kl in kls:
        expected = _ppo_rule(expected, kl, target, 1e-3, 1e4)
        assert controller.observe(kl) == pytest.approx(expected, rel=1e-12)
    assert controller.num_updates == len(kls)


def test_adaptive_beta_rises_while_the_kl_is_above_target_and_falls_below_it():
    controller = tr.AdaptiveBeta(1.0, kl_target=1e-3, beta_min=1e-3, beta_max=1e4, window=1)
    rising = [controller.observe(1e-2) for _ in range(5)]   # KL 10x the target: the penalty doubles each update
    assert rising == [2.0, 4.0, 8.0, 16.0, 32.0]
    assert controller.observe(1e-3) == 32.0                 # inside the band: unchanged
    falling = [controller.observe(1e-5) for _ in range(3)]  # KL far below: it halves
    assert falling == [16.0, 8.0, 4.0]
    for _ in range(40):
        controller.observe(1.0)
    assert controller.beta == 1e4                          # the ceiling holds


@given(kls=st.lists(st.floats(0, 1.0), max_size=40), window=st.integers(1, 7), target=st.floats(1e-4, 1e-1))
def test_adaptive_beta_with_a_window_applies_the_rule_to_each_windows_mean_kl(kls, window, target):
    controller = tr.AdaptiveBeta(1.0, target, 1e-3, 1e4, window=window)
    expected, betas = 1.0, []
    for start in range(0, len(kls), window):
        chunk = kls[start:start + window]
        betas += [expected] * (len(chunk) - 1)  # unchanged inside a window
        if len(chunk) == window:
            expected = _ppo_rule(expected, sum(chunk) / window, target, 1e-3, 1e4)
        betas.append(expected)
    assert [controller.observe(kl) for kl in kls] == pytest.approx(betas, rel=1e-12)


def test_adaptive_beta_state_round_trip_resumes_exactly():
    a = tr.AdaptiveBeta(1.0, 1e-3, 1e-3, 1e4, window=3)
    for kl in (1e-2, 1e-2, 1e-5, 1e-2):  # resumed in the middle of a window
        a.observe(kl)
    b = tr.AdaptiveBeta(1.0, 1e-3, 1e-3, 1e4, window=3)
    b.load_state_dict(a.state_dict())
    assert [a.observe(kl) for kl in (1e-2, 1e-1, 1.0)] == [b.observe(kl) for kl in (1e-2, 1e-1, 1.0)]
    with pytest.raises(ValueError, match="checkpoint has beta schedule 'official'"):
        b.load_state_dict(tr.OfficialBeta().state_dict())


def test_adaptive_beta_rejects_bad_arguments():
    with pytest.raises(ValueError, match="beta_min <= beta_init <= beta_max"):
        tr.AdaptiveBeta(10.0, 1e-3, 1e-3, 1.0)
    with pytest.raises(ValueError, match="kl_target > 0"):
        tr.AdaptiveBeta(1.0, 0.0, 1e-3, 1e4)
    with pytest.raises(ValueError, match="finite"):
        tr.AdaptiveBeta(1.0, 1e-3, 1e-3, 1e4).observe(float("nan"))


@given(beta=st.floats(1e-3, 1e3), w_step=st.floats(0.01, 2.0), weight=st.floats(0.1, 5.0))
def test_k1_step_term_on_policy_adds_w_step_beta_over_s_to_every_advantage(beta, w_step, weight):
    """On-policy (ρ = 1) the gradient of  S_t·policy loss + β·w_step·k1  w.r.t. each log p equals that of the
    policy loss alone with every advantage raised by w_step·β/S_t (the official step-wise term's effect)."""
    import grpo
    advantages = torch.tensor([1.2, -0.4, 0.0, -2.0], dtype=torch.float64)
    old_log_prob = torch.randn(4, dtype=torch.float64)
    weights = torch.full((4,), weight, dtype=torch.float64)
    mean, std = torch.zeros(4, 3, dtype=torch.float64), 1.0
    log_prob = old_log_prob.clone().requires_grad_(True)
    loss, _ = grpo.clipped_policy_loss(log_prob, old_log_prob, advantages, weights, clip_range=1e-4)
    kl, terms = tr.dual_kl(mean, std, None, mean, "step", step_weight=w_step, step_estimator="k1",
                           log_prob=log_prob, old_log_prob=old_log_prob)
    assert torch.equal(terms["kl_step"], torch.zeros(4, dtype=torch.float64))  # 0 in value on-policy
    (loss + beta * kl.mean()).backward()
    # d/d log p_i of mean_i(-A_i·S·ρ_i) at ρ = 1 is -A_i·S/4: the raised advantage is A_i + w_step·β/S
    expected = -(advantages + w_step * beta / weight) * weight / 4
    torch.testing.assert_close(log_prob.grad, expected)


def test_gaussian_step_term_is_exactly_zero_on_policy_in_value_and_gradient():
    mean = torch.randn(3, 5, requires_grad=True)
    kl, terms = tr.dual_kl(mean, 0.3, None, mean.detach().clone(), "step")
    kl.sum().backward()
    assert torch.equal(terms["kl_step"], torch.zeros(3)) and torch.equal(mean.grad, torch.zeros(3, 5))


def test_unknown_step_estimator_and_missing_log_prob_raise():
    mean = torch.randn(2, 3)
    with pytest.raises(ValueError, match="unknown step-wise KL estimator 'k2'"):
        tr.dual_kl(mean, 1.0, None, mean, "step", step_estimator="k2")
    with pytest.raises(ValueError, match="needs the policy's log_prob"):
        tr.dual_kl(mean, 1.0, None, mean, "step", step_estimator="k1", old_log_prob=torch.zeros(2))


@given(data=st.data(), batch=st.integers(1, 6), pairs=st.integers(1, 30), scale=st.integers(1, 8))
def test_total_loss_is_the_mean_over_the_batchs_valid_pairs_of_the_policy_term_plus_beta_times_the_kl(data, batch, pairs,
                                                                                                   scale):
    """L = scale/P · Σ_valid [S_t·max(−Aρ, −A·clip(ρ)) + β·L_KL], written out pair by pair in float64 (the policy
    term of each pair by hand, not through grpo.clipped_policy_loss), against trust_region.total_loss fed the
    clipped loss's mean: the objective the paper minimises, as train.py assembles it over steps and ranks."""
    floats = st.floats(-2, 2, allow_nan=False)
    log_prob = torch.tensor(data.draw(st.lists(floats, min_size=batch, max_size=batch)), dtype=torch.float64)
    old = log_prob + torch.tensor(data.draw(st.lists(st.floats(-1e-3, 1e-3), min_size=batch, max_size=batch)),
                                  dtype=torch.float64)
    advantages = torch.tensor(data.draw(st.lists(st.one_of(floats, st.just(float("nan"))), min_size=batch,
                                                 max_size=batch)), dtype=torch.float64)
    weights = torch.tensor(data.draw(st.lists(st.sampled_from([0.0, 0.5, 1.0, 2.0]), min_size=batch, max_size=batch)),
                           dtype=torch.float64)
    kl = torch.tensor(data.draw(st.lists(st.floats(0, 1), min_size=batch, max_size=batch)), dtype=torch.float64)
    beta = torch.tensor(data.draw(st.lists(st.floats(0, 10), min_size=batch, max_size=batch)), dtype=torch.float64)
    valid = torch.isfinite(advantages) & (weights > 0)
    clip = 1e-4
    policy_loss, _ = grpo.clipped_policy_loss(log_prob, old, advantages, weights, clip)
    loss, policy_sum, kl_sum = tr.total_loss(policy_loss, kl, beta, valid, pairs, scale)
    expected = 0.0
    for i in range(batch):
        if valid[i]:
            rho = math.exp(log_prob[i].item() - old[i].item())
            a = advantages[i].item()
            expected += weights[i].item() * max(-a * rho, -a * min(max(rho, 1 - clip), 1 + clip)) + beta[i].item() * kl[i].item()
    assert loss.item() == pytest.approx(scale * expected / pairs, rel=1e-9, abs=1e-12)
    assert (policy_sum + kl_sum).item() == pytest.approx(expected, rel=1e-9, abs=1e-12)
