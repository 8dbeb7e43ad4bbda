"""sde.py against closed forms, diffusers' scheduler, torch.distributions and quadrature."""
import math

import mpmath  # a torch dependency (via sympy): independent arbitrary-precision quadrature
import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from hypothesis import given, strategies as st

import sde



@st.composite
def step_pairs(draw, low=0.0, high=1.0):
    """A step sigma -> sigma_next with low <= sigma_next < sigma <= high, Δ not vanishing."""
    sigma = draw(st.floats(low + 1e-3, high))
    sigma_next = draw(st.floats(low, sigma - 1e-3))
    return sigma, sigma_next


def test_shifted_sigmas_match_diffusers_flow_match_scheduler():
    for num_steps, shift in [(20, 5.0), (10, 1.0), (40, 3.0)]:
        scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
        # what HunyuanVideo15Pipeline passes to the scheduler
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 0.0, num_steps + 1)[:-1])
        ours = sde.shifted_sigmas(num_steps, shift)
        assert ours[0] == 1.0 and ours[-1] == 0.0
        torch.testing.assert_close(ours.float(), scheduler.sigmas.float(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("kernel", sde.KERNELS)
@given(pair=step_pairs())
def test_all_kernels_reduce_to_euler_at_zero_eta(kernel, pair):
    sigma, sigma_next = pair
    x, velocity = torch.randn(2, 3, 4, dtype=torch.float64), torch.randn(2, 3, 4, dtype=torch.float64)
    mean, std = sde.transition(kernel, x, velocity, sigma, sigma_next, eta=0.0)
    torch.testing.assert_close(mean, x - (sigma - sigma_next) * velocity)
    assert bool((std == 0).all())


@pytest.mark.parametrize("kernel", sde.STOCHASTIC_KERNELS)
def test_all_kernels_approach_euler_as_eta_vanishes(kernel):
    x, velocity = torch.randn(2, 8, dtype=torch.float64), torch.randn(2, 8, dtype=torch.float64)
    sigma, sigma_next = 0.6, 0.5
    euler = x - 0.1 * velocity
    gaps = [(sde.transition(kernel, x, velocity, sigma, sigma_next, eta)[0] - euler).abs().max().item()
            for eta in (1e-1, 1e-2, 1e-3)]
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 1e-5


@given(pair=step_pairs(high=sde.SAGE_SIGMA_MAX), eta=st.floats(0.05, 2.0))
def test_sage_variance_equals_quadrature_of_the_diffusion_coefficient(pair, eta):
    sigma, sigma_next = pair
    exact = float(mpmath.quad(lambda u: eta ** 2 * u / (1 - u), [sigma_next, sigma]))
    ours = sde.sage_variance(torch.tensor(sigma, dtype=torch.float64), torch.tensor(sigma_next, dtype=torch.float64), eta).item()
    assert ours == pytest.approx(exact, rel=1e-9, abs=1e-14)


@given(pair=step_pairs(high=sde.SAGE_SIGMA_MAX), eta=st.floats(0.05, 2.0))
def test_sage_variance_never_exceeds_flow_grpo_left_rectangle(pair, eta):
    sigma, sigma_next = (torch.tensor(s, dtype=torch.float64) for s in pair)
    assert sde.sage_variance(sigma, sigma_next, eta) <= sde.flow_grpo_variance(sigma, sigma_next, eta) * (1 + 1e-12)


@given(sigma=st.floats(0.05, 0.95), eta=st.floats(0.1, 2.0))
def test_sage_to_flow_grpo_ratio_tends_to_one_with_excess_delta_squared_over_two_one_minus_sigma_squared(sigma, eta):
    sigma_t = torch.tensor(sigma, dtype=torch.float64)
    previous_gap = math.inf
    for delta in (1e-2, 1e-3, 1e-4):
        sage_v = sde.sage_variance(sigma_t, sigma_t - delta, eta)
        flow_v = sde.flow_grpo_variance(sigma_t, sigma_t - delta, eta)
        gap = 1 - (sage_v / flow_v).item()
        assert 0 <= gap < previous_gap
        previous_gap = gap
    # leading term of the excess: g'(σ)²-integrand slope · Δ²/2 = η²Δ²/(2(1-σ)²)
    delta = 1e-4
    excess = (sde.flow_grpo_variance(sigma_t, sigma_t - delta, eta) - sde.sage_variance(sigma_t, sigma_t - delta, eta)).item()
    assert excess == pytest.approx(eta ** 2 * delta ** 2 / (2 * (1 - sigma) ** 2), rel=1e-2)


def test_singular_first_step_is_finite_and_clamps_sigma_in_the_logarithm_only():
    sigmas = sde.shifted_sigmas(20, 5.0)
    v_sage = sde.sage_variance(sigmas[0], sigmas[1], 0.5)
    # clamp in the log, true Δ = 1 - σ_1 in the linear term
    expected = 0.25 * (math.log((1 - sigmas[1].item()) / (1 - sde.SAGE_SIGMA_MAX)) - (1 - sigmas[1].item()))
    assert v_sage.item() == pytest.approx(expected, rel=1e-12)
    # FlowGRPO substitutes σ_1 for σ in the denominator at σ = 1
    g = sde.flow_grpo_diffusion(sigmas[0], sigmas[1], 0.5)
    assert g.item() == pytest.approx(0.5 * math.sqrt(1 / (1 - sigmas[1].item())), rel=1e-12)
    for kernel in sde.KERNELS:
        mean, std = sde.transition(kernel, torch.randn(2, 5), torch.randn(2, 5), sigmas[0], sigmas[1], 0.5)
        assert torch.isfinite(mean).all() and torch.isfinite(std).all()


def test_sage_first_step_std_is_the_official_0_5555_at_eta_half_20_steps_shift_5():
    # σ_1 = 5·0.95 / (1 + 4·0.95) = 0.95 / 0.96, so Δ = 1 - σ_1 = 1/96 exactly
    delta = 1 / 96
    std = 0.5 * math.sqrt(math.log(delta / 3e-3) - delta)
    assert std == pytest.approx(0.5555, abs=5e-5)
    sigmas = sde.shifted_sigmas(20, 5.0)
    assert sde.step_std("sage", sigmas[0], sigmas[1], 0.5).item() == pytest.approx(std, rel=1e-12)


@given(sigma=st.floats(sde.SAGE_SIGMA_MAX, 1.0), sigma_next=st.floats(0.0, 0.99), eta=st.floats(0.05, 2.0))
def test_sage_above_the_clamp_is_the_clamped_integral_minus_the_linear_excess(sigma, sigma_next, eta):
    # for σ > σ_max: V(σ, σ') = ∫_{σ'}^{σ_max} η²u/(1-u) du - η²·(σ - σ_max)
    integral = float(mpmath.quad(lambda u: eta ** 2 * u / (1 - u), [sigma_next, sde.SAGE_SIGMA_MAX]))
    expected = integral - eta ** 2 * (sigma - sde.SAGE_SIGMA_MAX)
    ours = sde.sage_variance(torch.tensor(sigma, dtype=torch.float64), torch.tensor(sigma_next, dtype=torch.float64), eta).item()
    assert ours == pytest.approx(expected, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("num_steps, shift", [(20, 5.0), (20, 1.0), (10, 5.0)])
def test_sage_first_step_exceeds_flow_grpo_but_every_later_step_does_not(num_steps, shift):
    sigmas = sde.shifted_sigmas(num_steps, shift)
    sage_v = sde.sage_variance(sigmas[:-1], sigmas[1:], 0.5)
    flow_v = sde.flow_grpo_variance(sigmas[:-1], sigmas[1:], 0.5)
    assert sage_v[0] > flow_v[0]
    assert bool((sage_v[1:] <= flow_v[1:] * (1 + 1e-12)).all())


def test_sage_raises_where_the_clamp_makes_the_variance_negative():
    # at σ = 1 the variance is η²·[ln(Δ/3e-3) - Δ] < 0 for Δ < 3.01e-3: 68 steps at shift 5
    sigmas = sde.shifted_sigmas(67, 5.0)
    assert bool(sde.step_std("sage", sigmas[:-1], sigmas[1:], 0.5).isfinite().all())
    sigmas = sde.shifted_sigmas(68, 5.0)
    with pytest.raises(ValueError, match="sage's variance is negative"):
        sde.step_std("sage", sigmas[:-1], sigmas[1:], 0.5)


@pytest.mark.parametrize("kernel", sde.STOCHASTIC_KERNELS)
def test_sampled_steps_have_the_returned_mean_and_std(kernel):
    torch.manual_seed(0)
    n = 200_000
    x, velocity = torch.randn(1, n, dtype=torch.float64), torch.randn(1, n, dtype=torch.float64)
    sigma, sigma_next = 0.7, 0.55
    generator = torch.Generator().manual_seed(1)
    x_next, _, mean, std = sde.step(kernel, x, velocity, sigma, sigma_next, 0.7, generator=generator)
    residual = (x_next - mean) / std
    # standardised residuals are N(0, 1): mean within 5/√n, std within 1%
    assert abs(residual.mean().item()) < 5 / math.sqrt(n)
    assert residual.std().item() == pytest.approx(1.0, rel=1e-2)
    # and the returned std is the kernel's formula, not something else
    expected_variance = {"flow_grpo": 0.7 ** 2 * 0.7 / 0.3 * 0.15, "dance_grpo": 0.7 ** 2 * 0.15,
                         "cps": (0.55 * math.sin(0.7 * math.pi / 2)) ** 2,
                         "sage": 0.7 ** 2 * (math.log(0.45 / 0.3) - 0.15)}[kernel]
    assert std.item() ** 2 == pytest.approx(expected_variance, rel=1e-9)


@given(shape=st.lists(st.integers(1, 5), min_size=1, max_size=3), std_value=st.floats(1e-3, 10.0),
       batch=st.integers(1, 4))
def test_log_prob_is_torch_normal_log_density_averaged_over_elements(shape, std_value, batch):
    mean = torch.randn(batch, *shape, dtype=torch.float64)
    x_next = mean + std_value * torch.randn_like(mean)
    std = torch.full((batch,) + (1,) * len(shape), std_value, dtype=torch.float64)
    expected = torch.distributions.Normal(mean, std_value).log_prob(x_next).flatten(1).mean(1)
    torch.testing.assert_close(sde.log_prob(x_next, mean, std).double(), expected, rtol=1e-5, atol=1e-5)


def test_zero_std_last_cps_step_is_deterministic_without_inf_or_nan():
    x = torch.randn(3, 4, requires_grad=True)
    velocity = torch.randn(3, 4, requires_grad=True)
    x_next, log_p, mean, std = sde.step("cps", x, velocity, 0.05, 0.0, 0.5)
    assert bool((std == 0).all())
    torch.testing.assert_close(x_next, mean)
    assert bool((log_p == 0).all())
    log_p.sum().backward()
    assert torch.isfinite(velocity.grad).all() and torch.isfinite(x.grad).all()


@given(s=st.floats(0.01, 3.0), sigma=st.floats(0.01, 1.0))
def test_score_estimate_is_exact_for_gaussian_data(s, sigma):
    # data x_0 ~ N(0, s²I): x_σ ~ N(0, m·I) with m = (1-σ)²s² + σ², true score -x/m, and the exact
    # velocity E[ε - x_0 | x] = (σ - (1-σ)s²)·x/m  (Gaussian conditioning)
    x = torch.randn(4, 6, dtype=torch.float64)
    m = (1 - sigma) ** 2 * s ** 2 + sigma ** 2
    velocity = (sigma - (1 - sigma) * s ** 2) * x / m
    torch.testing.assert_close(sde.score_estimate(x, velocity, sigma), -x / m)


def test_per_sample_sigmas_equal_separate_calls():
    x, velocity = torch.randn(3, 2, 4), torch.randn(3, 2, 4)
    sigmas = sde.shifted_sigmas(10, 3.0)
    index = torch.tensor([0, 4, 9])
    for kernel in sde.KERNELS:
        mean, std = sde.transition(kernel, x, velocity, sigmas[index], sigmas[index + 1], 0.5)
        for b, i in enumerate(index.tolist()):
            mean_b, std_b = sde.transition(kernel, x[b:b + 1], velocity[b:b + 1], sigmas[i].item(), sigmas[i + 1].item(), 0.5)
            torch.testing.assert_close(mean[b:b + 1], mean_b, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(std[b].float().flatten(), std_b.float().flatten(), rtol=1e-5, atol=1e-7)


def test_invalid_arguments_raise_clear_errors():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="unknown kernel 'ddim'"):
        sde.transition("ddim", x, x, 0.5, 0.4, 0.5)
    with pytest.raises(ValueError, match="eta must be a finite number >= 0"):
        sde.transition("sage", x, x, 0.5, 0.4, -0.1)
    with pytest.raises(ValueError, match="smaller sigma_next"):
        sde.transition("sage", x, x, 0.4, 0.5, 0.5)
    with pytest.raises(ValueError, match="same shape"):
        sde.transition("sage", x, torch.zeros(2, 4), 0.5, 0.4, 0.5)
    with pytest.raises(ValueError, match="strictly decreasing"):
        sde.check_schedule(torch.tensor([1.0, 0.5, 0.5, 0.0]))
    with pytest.raises(ValueError, match="positive int"):
        sde.shifted_sigmas(0, 5.0)
