"""equalizer.py: analytic gradient scales against autograd, and the equalization property."""
import pytest
import torch
from hypothesis import given, strategies as st

import equalizer
import sde



@pytest.mark.parametrize("kernel", sde.STOCHASTIC_KERNELS)
@given(num_steps=st.integers(2, 40), shift=st.floats(1.0, 8.0), eta=st.floats(0.05, 1.0))
def test_mean_velocity_derivative_matches_autograd_of_the_kernel_mean(kernel, num_steps, shift, eta):
    sigmas = sde.shifted_sigmas(num_steps, shift)
    x = torch.randn(num_steps, 3, dtype=torch.float64)
    velocity = torch.randn(num_steps, 3, dtype=torch.float64, requires_grad=True)
    mean, _ = sde.transition(kernel, x, velocity, sigmas[:-1], sigmas[1:], eta)
    # the mean is affine in v with a scalar slope per sample: d(sum mean)/dv = slope
    (gradient,) = torch.autograd.grad(mean.sum(), velocity)
    analytic = equalizer.mean_velocity_derivative(kernel, sigmas[:-1], sigmas[1:], eta)
    torch.testing.assert_close(gradient[:, 0], analytic, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kernel", sde.STOCHASTIC_KERNELS)
def test_gradient_scale_is_the_size_of_the_log_prob_gradient(kernel):
    # N_t predicts |∂ log p / ∂v| per element: check it against autograd on sampled steps
    sigmas = sde.shifted_sigmas(20, 5.0)
    scales = equalizer.gradient_scales(kernel, sigmas, 0.5)
    n = 20_000
    for t in (0, 10, 18):
        x = torch.randn(1, n, dtype=torch.float64)
        velocity = torch.randn(1, n, dtype=torch.float64, requires_grad=True)
        x_next, _, _, _ = sde.step(kernel, x, velocity.detach(), sigmas[t], sigmas[t + 1], 0.5,
                                   generator=torch.Generator().manual_seed(t))
        mean, std = sde.transition(kernel, x, velocity, sigmas[t], sigmas[t + 1], 0.5)
        (gradient,) = torch.autograd.grad(sde.log_prob(x_next, mean, std).sum() * n, velocity)
        # per element ∂/∂v = (∂μ/∂v)·ε/std with ε ~ N(0,1): its RMS is N_t
        assert gradient.pow(2).mean().sqrt().item() == pytest.approx(scales[t].item(), rel=0.05)


@pytest.mark.parametrize("kernel", sde.STOCHASTIC_KERNELS)
@given(num_steps=st.integers(2, 40), shift=st.floats(1.0, 8.0), eta=st.floats(0.05, 1.0))
def test_equalized_scales_are_constant_and_median_weight_is_one(kernel, num_steps, shift, eta):
    sigmas = sde.shifted_sigmas(num_steps, shift)
    scales = equalizer.gradient_scales(kernel, sigmas, eta)
    weights = equalizer.equalizer_weights(kernel, sigmas, eta)
    stochastic = scales > 0
    products = (weights * scales)[stochastic]
    # S_t·N_t = median·N_t/(N_t + ε): constant up to a relative ε/min(N)
    tolerance = 10 * equalizer.EQUALIZER_EPS / scales[stochastic].min().item() + 1e-12
    torch.testing.assert_close(products, torch.full_like(products, products[0].item()), rtol=tolerance, atol=0)
    # median on a log scale (geometric mean of the middle pair for an even count)
    assert torch.quantile(weights[stochastic].log(), 0.5).exp().item() == pytest.approx(1.0, rel=tolerance)
    assert bool((weights[~stochastic] == 0).all())


def test_unequalized_scales_span_about_two_orders_of_magnitude_on_the_video_schedule():
    # with the shifted 20-step schedule N_t spans ~100x; this is why the equalizer exists
    sigmas = sde.shifted_sigmas(20, 5.0)
    for kernel in ("flow_grpo", "sage"):
        scales = equalizer.gradient_scales(kernel, sigmas, 0.5)
        assert 30 < (scales.max() / scales.min()).item() < 1000


def test_deterministic_cps_last_step_gets_zero_weight():
    weights = equalizer.equalizer_weights("cps", sde.shifted_sigmas(20, 5.0), 0.5)
    assert weights[-1] == 0 and bool((weights[:-1] > 0).all())


def test_without_the_equalizer_every_stochastic_step_weighs_one():
    sigmas = sde.shifted_sigmas(20, 5.0)
    expected = torch.ones(20, dtype=torch.float64)
    torch.testing.assert_close(equalizer.step_weights("sage", sigmas, 0.5, equalize=False), expected)
    expected[-1] = 0  # CPS's last step (σ' = 0) is deterministic
    torch.testing.assert_close(equalizer.step_weights("cps", sigmas, 0.5, equalize=False), expected)


def test_invalid_arguments_raise_clear_errors():
    sigmas = sde.shifted_sigmas(10, 5.0)
    with pytest.raises(ValueError, match="no stochastic step"):
        equalizer.equalizer_weights("ode", sigmas, 0.5)
    with pytest.raises(ValueError, match="no stochastic step"):
        equalizer.equalizer_weights("sage", sigmas, 0.0)
    with pytest.raises(ValueError, match="strictly decreasing"):
        equalizer.equalizer_weights("sage", sigmas.flip(0), 0.5)
    with pytest.raises(ValueError, match="unknown kernel"):
        equalizer.gradient_scales("euler", sigmas, 0.5)
    with pytest.raises(ValueError, match="eta must be"):
        equalizer.gradient_scales("sage", sigmas, -1.0)


@given(kernel=st.sampled_from(["sage", "flow_grpo", "dance_grpo"]), num_steps=st.integers(2, 30),
       shift=st.floats(1.0, 8.0), eta=st.floats(0.1, 1.0))
def test_lower_median_is_the_official_torch_median_of_the_scales(kernel, num_steps, shift, eta):
    """median="lower": S_t·N_t equals the lower of the two middle N_t (odd count: the middle one), so the step
    holding that value gets S_t = 1; for an even count every S_t is ours times sqrt(lower / upper middle)."""
    sigmas = sde.shifted_sigmas(num_steps, shift)
    scales = equalizer.gradient_scales(kernel, sigmas, eta)
    ordered = scales[scales > 0].sort().values
    n = len(ordered)
    lower_middle = ordered[(n - 1) // 2]
    lower = equalizer.equalizer_weights(kernel, sigmas, eta, median="lower")
    stochastic = scales > 0
    torch.testing.assert_close(lower[stochastic] * (scales[stochastic] + equalizer.EQUALIZER_EPS),
                               lower_middle.expand(int(stochastic.sum())), rtol=1e-12, atol=0)
    ours = equalizer.equalizer_weights(kernel, sigmas, eta)
    ratio = (lower_middle / ordered[n // 2]).sqrt() if n % 2 == 0 else torch.tensor(1.0, dtype=torch.float64)
    torch.testing.assert_close(lower[stochastic], ours[stochastic] * ratio, rtol=1e-12, atol=0)


def test_official_median_makes_every_weight_1_0871_times_smaller_at_the_official_20_steps():
    sigmas = sde.shifted_sigmas(20, 5.0)
    ratio = equalizer.equalizer_weights("sage", sigmas, 0.5) / equalizer.equalizer_weights("sage", sigmas, 0.5,
                                                                                         median="lower")
    assert float(ratio.min()) == pytest.approx(1.0871, abs=5e-5) and float(ratio.max()) == pytest.approx(1.0871, abs=5e-5)
    with pytest.raises(ValueError, match="unknown equalizer median 'mean'"):
        equalizer.equalizer_weights("sage", sigmas, 0.5, median="mean")


def test_the_equalizer_epsilon_is_1e_minus_8_and_the_weights_are_median_over_n():
    # ε only keeps S_t finite; the documented value is 1e-8. The constancy test above sizes its tolerance from
    # ε itself, so it cannot notice a larger ε: here the weights are held to median(N)/N within what ε = 1e-8 allows
    assert equalizer.EQUALIZER_EPS == 1e-8
    sigmas = sde.shifted_sigmas(20, 5.0)
    for kernel in sde.STOCHASTIC_KERNELS:
        scales = equalizer.gradient_scales(kernel, sigmas, 0.5)
        stochastic = scales > 0
        n = scales[stochastic]
        median = torch.quantile(n.log(), 0.5).exp()            # log-scale median, as documented
        # S = median/(N + ε) = (median/N)·(1 − ε/N + …): relative deviation from median/N at most ε/min(N)
        tolerance = 2 * 1e-8 / n.min().item()
        torch.testing.assert_close(equalizer.equalizer_weights(kernel, sigmas, 0.5)[stochastic], median / n,
                                   rtol=tolerance, atol=0)
