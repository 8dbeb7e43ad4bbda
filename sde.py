"""Micro level of SAGE-GRPO: one stochastic sampling step of a flow-matching model.

Paper: Zheng et al., "Manifold-Aware Exploration for Reinforcement Learning in Video Generation"
(arXiv 2603.21872), micro level: the "precise manifold-aware SDE" with its logarithmic curvature
correction.

Conventions (fixed here, used by every other file)
--------------------------------------------------
* σ ∈ [0, 1] is the noise level: σ = 1 is pure noise, σ = 0 is data. Sampling runs
  σ_0 = 1 > σ_1 > ... > σ_N = 0; one step goes σ -> σ' (`sigma_next`) with Δ = σ - σ' > 0.
* x_σ = (1 - σ)·x_0 + σ·ε with ε ~ N(0, I)  (HunyuanVideo-1.5, diffusers FlowMatchEuler).
* The model predicts the velocity v ≈ ε - x_0 (its timestep input is σ·1000), so dx/dσ = v and the
  ODE (Euler) step is x' = x - Δ·v.
* From v one reads off  x̂_0 = x - σ·v  (data estimate),  x̂_1 = x + (1 - σ)·v  (noise estimate),
  and the score estimate ŝ = ∇ log p_σ(x) ≈ -x̂_1 / σ  (Tweedie: E[ε | x] = -σ·∇log p).
* Every stochastic step is a Gaussian kernel x' ~ N(mean, std²·I). `std` is the standard deviation
  **of the step itself** (it includes the √Δ where the method has one). We never call a variance a
  std: `variance` always means std².
* `log_prob` is the Gaussian log density of x' **averaged over latent elements** (one scalar per
  sample), as in every peer implementation; it is why PPO clip ranges of 1e-4 are sensible.

The transition kernels (one name everywhere: `kernel`, from `KERNELS`). All reduce to the Euler step x - Δ·v when η -> 0.

    ode         std = 0                      mean = x - Δ·v
    flow_grpo   std = g·√Δ, g = η·√(σ/(1-σ))  mean = x - Δ·v + (g²Δ/2)·ŝ
    dance_grpo  std = η·√Δ                   mean = x - Δ·v + (η²Δ/2)·ŝ
    cps         std = σ'·sin(ηπ/2)           mean = (1-σ')·x̂_0 + √(σ'² - std²)·x̂_1
    sage        std = √V                     mean = x - Δ·v + (V/2)·ŝ

SAGE replaces FlowGRPO's left-rectangle estimate g(σ)²·Δ of the injected variance by the exact
integral of the same diffusion coefficient over the step (the paper's "logarithmic curvature
correction"):

    V(σ, σ') = ∫_{σ'}^{σ} η²·u/(1-u) du = η²·[ ln((1-σ')/(1-σ)) - Δ ].

The integrand grows with u, so the left-rectangle value g(σ)²Δ always exceeds V, by exactly
g²Δ - V = η²·(r - ln(1 + r)) with r = Δ/(1-σ)  (≈ η²r²/2 for a small step, an estimate that
overstates the excess by up to 1.7× on the large steps of a 20-step schedule): FlowGRPO injects the most excess noise in the high-noise steps, which pushes
rollouts off the data manifold.

The σ = 1 singularity. Both g and V diverge at σ = 1 (the first step of every schedule).
* flow_grpo: FlowGRPO evaluates g with σ_1 (the next sigma of the schedule) in the denominator at
  σ = 1. Within one step that is `sigma_next`, so we do exactly that.
* sage: as the official SAGE-GRPO code, σ is clamped to `SAGE_SIGMA_MAX` = 1 - 3e-3 **inside the
  logarithm only**; the linear term keeps the true Δ = σ - σ':

      V(σ, σ') = η²·[ ln((1-σ')/(1-min(σ, σ_max))) - Δ ].

  For σ ≤ σ_max this is the exact integral. For σ > σ_max it is the integral up to σ_max minus the
  extra η²·(σ - σ_max) of the linear term, and no longer an integral of anything: it can exceed
  FlowGRPO's value, and it turns negative when σ' lies within about 1e-5 of σ_max or above it (at
  σ = 1: Δ < 3.01e-3, i.e. more than 67 steps at shift 5 or 332 at shift 1), where the official code
  takes the square root of a negative number; `sage_variance` raises a ValueError there instead.
  Consequence for the first step: it injects *more* noise than FlowGRPO's (η = 0.5, 20 steps:
  std 0.5555 vs 0.500 with shift 5, 0.831 vs 0.500 with shift 1), so "SAGE injects less noise
  than FlowGRPO" holds from the second step on, not on the first.

Differences from the official code (deliberate): its flow_grpo returns g instead of g·√Δ as the
std (its KL is then off by a factor Δ); its CPS log-prob is -(x'-μ)² with no normalisation. Here
every kernel returns a proper (mean, std) and a proper Gaussian log-prob, and a zero-std step (CPS
at σ' = 0, or the ODE) is deterministic: log_prob 0, never inf/NaN, and the equalizer gives it
weight 0 so it is excluded from the policy loss.

This module is pure torch: no I/O, no global state.
"""
import math

import torch

# Transition kernels: the deterministic Euler step and the four stochastic kernels GRPO can train with
# (the ODE has no noise, hence no log-prob and nothing to explore).
KERNELS = ("ode", "flow_grpo", "dance_grpo", "cps", "sage")
STOCHASTIC_KERNELS = ("flow_grpo", "dance_grpo", "cps", "sage")  # KERNELS without ode (config.py reads this literal)

# Clamp of σ inside SAGE's logarithm, not in its linear term (official SAGE-GRPO code: 1 - 3e-3).
SAGE_SIGMA_MAX = 1.0 - 3e-3


# ----------------------------------------------------------------------------------------------
# Validation: errors that say what was expected and what was found.

def check_kernel(kernel):
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}: expected one of {KERNELS}")


def check_eta(eta):
    if not (isinstance(eta, (int, float)) and math.isfinite(eta) and eta >= 0):
        raise ValueError(f"eta must be a finite number >= 0, got {eta!r}")


def check_schedule(sigmas):
    """A sampling schedule must be 1-D, inside [0, 1] and strictly decreasing."""
    sigmas = torch.as_tensor(sigmas)
    if sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ValueError(f"sigmas must be a 1-D schedule of >= 2 values, got shape {tuple(sigmas.shape)}")
    if not bool(((sigmas >= 0) & (sigmas <= 1)).all()):
        raise ValueError(f"sigmas must lie in [0, 1], got min {sigmas.min().item():.4g}, max {sigmas.max().item():.4g}")
    if not bool((sigmas[1:] < sigmas[:-1]).all()):
        i = int(torch.nonzero(sigmas[1:] >= sigmas[:-1])[0])
        raise ValueError(f"sigmas must be strictly decreasing (sigma = 1 is noise, 0 is data), "
                         f"but sigmas[{i}] = {sigmas[i].item():.6g} <= sigmas[{i + 1}] = {sigmas[i + 1].item():.6g}")


# ----------------------------------------------------------------------------------------------
# The schedule.

def shifted_sigmas(num_steps, shift=5.0):
    """σ_i = linspace(1, 0, N+1) shifted by σ <- s·σ / (1 + (s-1)·σ).  Returns Tensor[N+1], float64.

    shift s = 5 is HunyuanVideo-1.5's setting for 480p text-to-video; s > 1 spends more steps at
    high noise. Identical to diffusers FlowMatchEulerDiscreteScheduler(shift=s) with the final 0.
    """
    if not (isinstance(num_steps, int) and num_steps >= 1):
        raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
    if not (shift > 0):
        raise ValueError(f"shift must be > 0, got {shift!r}")
    sigmas = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    # σ <- s·σ / (1 + (s - 1)·σ)
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def window_mask(num_steps, window=None):
    """BoolTensor[N]: which of the N steps are stochastic under an SDE window (start, stop).

    An SDE window (MixGRPO; FlowGRPO-Fast trains 1–2 steps) samples with the stochastic kernel only on
    the steps start ≤ i < stop and with the ODE step elsewhere, so that only those steps carry a
    log-prob and need a recompute in the update. window=None: every step (the official recipe).
    """
    start, stop = (0, num_steps) if window is None else window
    if not 0 <= start < stop <= num_steps:
        raise ValueError(f"an SDE window (start, stop) must satisfy 0 <= start < stop <= {num_steps}, "
                         f"got {tuple(window)}")
    mask = torch.zeros(num_steps, dtype=torch.bool)
    mask[start:stop] = True
    return mask


def per_sample(sigma, x):
    """A float or Tensor[B] of noise levels as a float32+ tensor of shape (B, 1, ..., 1) like x."""
    sigma_dtype = sigma.dtype if torch.is_tensor(sigma) else torch.float64   # Python floats are doubles
    dtype = torch.float64 if torch.float64 in (sigma_dtype, x.dtype) else torch.float32
    sigma = torch.as_tensor(sigma, dtype=dtype, device=x.device)
    if sigma.ndim == 0:
        sigma = sigma.expand(x.shape[0])
    if sigma.shape != (x.shape[0],):
        raise ValueError(f"sigma must be a float or a tensor of shape [B] = [{x.shape[0]}], got shape {tuple(sigma.shape)}")
    return sigma.view(-1, *([1] * (x.ndim - 1)))


def _check_step(sigma, sigma_next):
    if not bool(((sigma_next >= 0) & (sigma_next < sigma) & (sigma <= 1)).all()):
        raise ValueError("a step must go from sigma to a smaller sigma_next with 0 <= sigma_next < sigma <= 1; "
                         f"got sigma = {sigma.flatten().tolist()[:4]}..., sigma_next = {sigma_next.flatten().tolist()[:4]}...")


# ----------------------------------------------------------------------------------------------
# What one velocity evaluation tells us about the clean sample, the noise and the score.

def x0_estimate(x, velocity, sigma):
    # x̂_0 = x - σ·v
    return x - sigma * velocity


def x1_estimate(x, velocity, sigma):
    # x̂_1 = x + (1 - σ)·v
    return x + (1 - sigma) * velocity


def score_estimate(x, velocity, sigma):
    # ŝ = -x̂_1 / σ   (exact for Gaussian data; tested in tests/test_sde.py)
    return -x1_estimate(x, velocity, sigma) / sigma


# ----------------------------------------------------------------------------------------------
# Injected variance of each kernel (a variance, not a std).

def flow_grpo_diffusion(sigma, sigma_next, eta):
    """FlowGRPO's diffusion coefficient g = η·√(σ / (1 - σ)), with σ_1 in the denominator at σ = 1."""
    sigma, sigma_next = torch.as_tensor(sigma), torch.as_tensor(sigma_next)
    # FlowGRPO: at σ = 1 use the next sigma of the schedule in 1 - σ.
    denominator_sigma = torch.where(sigma >= 1, sigma_next, sigma)
    return eta * torch.sqrt(sigma / (1 - denominator_sigma))


def flow_grpo_variance(sigma, sigma_next, eta):
    # g²·Δ: the left-rectangle estimate of ∫ g(u)² du over the step.
    return flow_grpo_diffusion(sigma, sigma_next, eta) ** 2 * (torch.as_tensor(sigma) - sigma_next)


def sage_variance(sigma, sigma_next, eta, sigma_max=SAGE_SIGMA_MAX):
    """Integrated variance V(σ, σ') = ∫_{σ'}^{σ} η²·u/(1-u) du = η²·[ln((1-σ')/(1-σ)) - Δ].

    As in the official code, σ is clamped to `sigma_max` (< 1) inside the logarithm only, so the
    first step of a schedule is finite; the linear term keeps the true Δ = σ - σ'. Raises ValueError
    where that makes V negative (σ' within ~1e-5 of `sigma_max` or above: see the module docstring).
    """
    sigma, sigma_next = torch.as_tensor(sigma), torch.as_tensor(sigma_next)
    clamped_sigma = torch.clamp(sigma, max=sigma_max)
    # V = η²·[ln(1 - σ') - ln(1 - min(σ, σ_max)) - (σ - σ')]; log1p keeps precision for small σ
    variance = eta ** 2 * (torch.log1p(-sigma_next) - torch.log1p(-clamped_sigma) - (sigma - sigma_next))
    if bool((variance < 0).any()):
        sigma, sigma_next = (t.expand_as(variance).flatten() for t in (sigma, sigma_next))
        bad = int(torch.nonzero(variance.flatten() < 0)[0])
        raise ValueError(
            f"sage's variance is negative for the step sigma = {sigma[bad].item():.6g} -> sigma_next = "
            f"{sigma_next[bad].item():.6g}: with sigma clamped to sigma_max = {sigma_max} inside the logarithm, "
            f"sigma_next must lie clearly below sigma_max (a first step needs Δ >= 3.01e-3: at most 67 steps at "
            f"shift 5, 332 at shift 1); use fewer steps or a smaller sigma_max")
    return variance


def dance_grpo_variance(sigma, sigma_next, eta):
    # η²·Δ: DanceGRPO's constant diffusion coefficient.
    return eta ** 2 * (torch.as_tensor(sigma) - sigma_next)


def cps_std(sigma_next, eta):
    # Coefficients-Preserving Sampling: std = σ'·sin(ηπ/2).
    return torch.as_tensor(sigma_next) * math.sin(eta * math.pi / 2)


def step_std(kernel, sigma, sigma_next, eta):
    """The std of x' given x for one step σ -> σ' (same shape as sigma)."""
    check_kernel(kernel)
    sigma, sigma_next = torch.as_tensor(sigma), torch.as_tensor(sigma_next)
    if kernel == "ode":
        return torch.zeros_like(sigma)
    if kernel == "cps":
        return cps_std(sigma_next, eta).to(sigma.dtype)
    variance = {"flow_grpo": flow_grpo_variance, "dance_grpo": dance_grpo_variance,
                "sage": sage_variance}[kernel](sigma, sigma_next, eta)
    return torch.sqrt(variance)


# ----------------------------------------------------------------------------------------------
# The transition kernel, its log density, and one sampled step.

def transition(kernel, x, velocity, sigma, sigma_next, eta):
    """Mean and std of x' ~ N(mean, std²·I) for one step σ -> σ' of `kernel`.

    x, velocity: (B, ...); sigma, sigma_next: floats or Tensor[B].
    Returns mean (B, ...) in x's dtype and std (B, 1, ..., 1) in float32 (float64 if sigma is).
    """
    check_kernel(kernel)
    check_eta(eta)
    if x.shape != velocity.shape:
        raise ValueError(f"x and velocity must have the same shape, got {tuple(x.shape)} and {tuple(velocity.shape)}")
    sigma, sigma_next = per_sample(sigma, x), per_sample(sigma_next, x)
    _check_step(sigma, sigma_next)
    delta = sigma - sigma_next
    std = step_std(kernel, sigma, sigma_next, eta)

    if kernel == "cps":
        # μ = (1 - σ')·x̂_0 + √(σ'² - std²)·x̂_1: keeps the coefficients of x_0 and ε at (1-σ', σ').
        noise_coefficient = torch.sqrt(torch.clamp(sigma_next ** 2 - std ** 2, min=0))
        mean = (1 - sigma_next) * x0_estimate(x, velocity, sigma) + noise_coefficient * x1_estimate(x, velocity, sigma)
    else:
        # μ = x - Δ·v + (variance/2)·ŝ   (ode: variance 0, the Euler step)
        mean = x - delta * velocity
        if kernel != "ode":
            mean = mean + (std ** 2 / 2) * score_estimate(x, velocity, sigma)
    return mean.to(x.dtype), std


def broadcast_std(std, like):
    """(stochastic, safe_std): std as a tensor broadcastable to `like` (in its dtype), the mask of
    entries with std > 0, and std with the zero entries replaced by 1 so that divisions stay finite."""
    std = torch.as_tensor(std, device=like.device).to(like.dtype)
    std = std.reshape(std.shape + (1,) * (like.ndim - std.ndim)) if std.ndim else std
    stochastic = std > 0
    return stochastic, torch.where(stochastic, std, torch.ones_like(std))


def log_prob(x_next, mean, std):
    """Gaussian log density of x' under N(mean, std²·I), averaged over elements.  Returns Tensor[B].

    log N(x'; μ, std²) = -(x' - μ)² / (2·std²) - log std - ½·log 2π, per element, then the mean over
    all non-batch dimensions. A zero-std (deterministic) sample gets log_prob 0: no inf/NaN, and no
    gradient, so it never moves the policy.
    """
    dtype = torch.promote_types(x_next.dtype, torch.float32)      # at least fp32 (bf16 rollouts)
    x_next, mean = x_next.to(dtype), mean.to(dtype)
    stochastic, safe_std = broadcast_std(std, mean)
    element_log_prob = (-(x_next - mean) ** 2 / (2 * safe_std ** 2)
                        - torch.log(safe_std) - 0.5 * math.log(2 * math.pi))
    element_log_prob = torch.where(stochastic, element_log_prob, torch.zeros_like(element_log_prob))
    return element_log_prob.flatten(1).mean(dim=1)


def step(kernel, x, velocity, sigma, sigma_next, eta, generator=None):
    """Sample one step x' = mean + std·ε.  Returns (x_next, log_prob, mean, std).

    `generator` makes the noise reproducible; it must live on x's device.
    """
    mean, std = transition(kernel, x, velocity, sigma, sigma_next, eta)
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    x_next = (mean + std.to(x.dtype) * noise).to(x.dtype)
    return x_next, log_prob(x_next, mean, std), mean, std
