"""Gradient-norm equalizer: every denoising step contributes to the update at the same scale.

Paper: micro level, the "gradient norm equalizer". Conventions of sde.py.

Why. A step's log-prob is log N(x'; μ(v), std²), averaged over elements, so

    ∂ log p / ∂v = (∂μ/∂v) · (x' - μ) / std²,   with x' - μ = std·ε,

and its size scales as  N_t = |∂μ/∂v| / std_t.  With HunyuanVideo's shifted 20-step schedule
N_t spans about two orders of magnitude (std is tiny in the last, low-noise steps), so without
correction a handful of late steps dominate the policy gradient. The equalizer multiplies step t's
clipped policy loss by

    S_t = median_τ(N_τ) / (N_t + ε),

so S_t·N_t is the same constant for every step and median(S) = 1 (the overall learning rate is
unchanged). The median is taken on a log scale (see `equalizer_weights`). S_t weighs the policy loss only, never the KL terms.

∂μ/∂v per kernel (ŝ = -(x + (1-σ)v)/σ depends on v:  ∂ŝ/∂v = -(1-σ)/σ):

    sage        -Δ - (V/2)·(1-σ)/σ
    flow_grpo   -Δ - (g²Δ/2)·(1-σ)/σ
    dance_grpo  -Δ - (η²Δ/2)·(1-σ)/σ
    cps         -σ·(1-σ') + (1-σ)·√(σ'² - std²)

Steps with std = 0 (the ODE, CPS's last step) carry no log-prob and get weight 0.
"""
import torch

import sde

# ε in S_t = median(N) / (N_t + ε): only guards a division by zero. N_t is far above it on every
# stochastic step (η = 0.5, shift 5, 20 steps: N_t from ≈ 0.015 to ≈ 2.8, most steps below 1).
EQUALIZER_EPS = 1e-8


def mean_velocity_derivative(kernel, sigma, sigma_next, eta):
    """∂μ/∂v of the kernel's mean (a scalar per step: the Jacobian is that times the identity)."""
    sde.check_kernel(kernel)
    sigma, sigma_next = torch.as_tensor(sigma, dtype=torch.float64), torch.as_tensor(sigma_next, dtype=torch.float64)
    delta = sigma - sigma_next
    if kernel == "cps":
        std = sde.cps_std(sigma_next, eta)
        # ∂/∂v [(1-σ')(x - σv) + √(σ'² - std²)(x + (1-σ)v)]
        return -sigma * (1 - sigma_next) + (1 - sigma) * torch.sqrt(torch.clamp(sigma_next ** 2 - std ** 2, min=0))
    variance = sde.step_std(kernel, sigma, sigma_next, eta) ** 2
    # ∂/∂v [x - Δv + (variance/2)·ŝ] = -Δ - (variance/2)·(1-σ)/σ
    return -delta - (variance / 2) * (1 - sigma) / sigma


def gradient_scales(kernel, sigmas, eta):
    """N_t = |∂μ/∂v| / std_t for each step t of the schedule.  Returns Tensor[N] (float64).

    Steps with std_t = 0 get N_t = 0 (they carry no log-prob, hence no gradient).
    """
    sde.check_kernel(kernel)
    sde.check_eta(eta)
    sde.check_schedule(sigmas)
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
    sigma, sigma_next = sigmas[:-1], sigmas[1:]
    std = sde.step_std(kernel, sigma, sigma_next, eta).to(torch.float64)
    derivative = mean_velocity_derivative(kernel, sigma, sigma_next, eta).abs()
    return torch.where(std > 0, derivative / torch.where(std > 0, std, torch.ones_like(std)), torch.zeros_like(std))


# Which median of the N_t: "geometric" (ours, below) or "lower" (official: torch.median, the lower of the two
# middle values for an even number of steps; every official S_t is then smaller than ours by the square root of
# the two middle values' ratio, 1/1.0871 at 20 steps, shift 5, η 0.5: the same as a 8 % smaller learning rate
# for the policy term).
MEDIANS = ("geometric", "lower")


def equalizer_weights(kernel, sigmas, eta, eps=EQUALIZER_EPS, median="geometric", window=None):
    """S_t = median_τ(N_τ) / (N_t + ε) over the stochastic steps, 0 for deterministic ones.

    Returns Tensor[N] (float64). Raises ValueError if no step is stochastic (e.g. kernel "ode" or
    η = 0): there is nothing to equalize and no policy gradient at all. median: one of MEDIANS.
    window: (start, stop) or None. With an SDE window only the steps start ≤ t < stop are stochastic
    (the others are ODE steps, `model.rollout`'s sde_window): they alone get weights, and the median
    is taken over them, so that median(S) = 1 over the steps that are trained.
    """
    if median not in MEDIANS:
        raise ValueError(f"unknown equalizer median {median!r}: expected one of {MEDIANS}")
    scales = gradient_scales(kernel, sigmas, eta)
    stochastic = (scales > 0) & sde.window_mask(len(scales), window)
    if not bool(stochastic.any()):
        where = "" if window is None else f" inside the SDE window {tuple(window)}"
        raise ValueError(f"kernel {kernel!r} with eta={eta} has no stochastic step{where}: GRPO needs a kernel "
                         f"with std > 0 (one of {list(sde.STOCHASTIC_KERNELS)}) and eta > 0")
    # Median on a log scale (N_t spans orders of magnitude): for an even number of steps it is the
    # geometric mean of the two middle values, which makes median(S) = 1 exactly (up to ε).
    # "lower": torch.median, the lower of the two middle values (the official code's).
    if median == "lower":
        median_scale = torch.median(scales[stochastic])
    else:
        median_scale = torch.quantile(scales[stochastic].log(), 0.5).exp()
    return torch.where(stochastic, median_scale / (scales + eps), torch.zeros_like(scales))


def step_weights(kernel, sigmas, eta, equalize=True, median="geometric", window=None):
    """The weight of each step's policy loss, Tensor[N] (float64): S_t with the equalizer on, else 1
    for every stochastic step; 0 for deterministic steps either way (they carry no log-prob), and
    0 outside the SDE window (start, stop) when one is given (window=None: every step)."""
    if equalize:
        return equalizer_weights(kernel, sigmas, eta, median=median, window=window)
    sde.check_kernel(kernel)
    sde.check_eta(eta)
    sde.check_schedule(sigmas)
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
    stochastic = sde.step_std(kernel, sigmas[:-1], sigmas[1:], eta) > 0
    return (stochastic & sde.window_mask(len(stochastic), window)).double()
