"""Exact excess noise of each kernel on Gaussian data: the thin-manifold limit, in closed form.

For data x_0 ~ N(0, s²I) the marginal of x_σ = (1−σ)x_0 + σε is N(0, m(σ)·I) with

    m(σ) = (1−σ)²s² + σ²,

and the exact velocity is linear:  v*(x, σ) = E[ε − x_0 | x_σ = x] = (σ − (1−σ)s²)/m(σ) · x.

Every kernel's mean is then linear too, μ = c·x (c read off sde.transition at x = 1), so one step
maps N(0, m(σ)) to N(0, c²·m(σ) + std²), which can be compared exactly with the true marginal
m(σ'). Small s is a thin manifold: the data occupy a sliver of width s, and every bit of excess
variance is a displacement off it. Propagating the same recursion through a whole schedule gives
the std of the final samples, to compare with s (the ODE row shows the Euler discretisation error
alone, with no injected noise).
"""
import torch

import sde

KERNELS = sde.KERNELS


def marginal_variance(sigma, s):
    # m(σ) = (1−σ)²s² + σ²
    return (1 - sigma) ** 2 * s ** 2 + sigma ** 2


def exact_velocity(x, sigma, s):
    # v*(x, σ) = (σ − (1−σ)s²) / m(σ) · x
    return (sigma - (1 - sigma) * s ** 2) / marginal_variance(sigma, s) * x


def step_map(kernel, sigma, sigma_next, eta, s):
    """(c, std) of one step with the exact velocity: x' = c·x + std·ε."""
    x = torch.ones(1, 1, dtype=torch.float64)
    mean, std = sde.transition(kernel, x, exact_velocity(x, sigma, s), sigma, sigma_next, eta)
    return mean.item(), std.item()


def one_step_excess(kernel, sigmas, eta, s):
    """Per step: variance after one step from the true marginal, minus the true m(σ').  Tensor[N]."""
    excess = []
    for sigma, sigma_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
        c, std = step_map(kernel, sigma, sigma_next, eta, s)
        excess.append(c ** 2 * marginal_variance(sigma, s) + std ** 2 - marginal_variance(sigma_next, s))
    return torch.tensor(excess, dtype=torch.float64)


def final_std(kernel, sigmas, eta, s):
    """Std of the samples after the whole schedule, from N(0, I): var ← c²·var + std² per step."""
    variance = 1.0
    for sigma, sigma_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
        c, std = step_map(kernel, sigma, sigma_next, eta, s)
        variance = c ** 2 * variance + std ** 2
    return variance ** 0.5


def table(s=0.01, eta=0.5, step_counts=(10, 20, 40), shift=1.0):
    """Markdown rows: per kernel, the final std for each step count and the one-step excess variance
    (first step, and the largest over the other steps) of the middle step count."""
    n_mid = step_counts[len(step_counts) // 2]
    head = ("| kernel | " + " | ".join(f"final std, {n} steps" for n in step_counts)
            + f" | one-step excess variance, first step ({n_mid} steps) | largest |excess| over the other steps |")
    lines = [f"Gaussian data N(0, s²I), s = {s}, η = {eta}, shift {shift}: exact, no sampling "
             f"(the true final std is s = {s})", "", head, "|" + "---|" * (len(step_counts) + 3)]
    for kernel in KERNELS:
        stds = [final_std(kernel, sde.shifted_sigmas(n, shift), eta, s) for n in step_counts]
        excess = one_step_excess(kernel, sde.shifted_sigmas(n_mid, shift), eta, s)
        lines.append(f"| {kernel} | " + " | ".join(f"{v:.4f}" for v in stds)
                     + f" | {excess[0]:.2e} | {excess[1:].abs().max():.2e} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
