"""Sampling the toy model with any transition kernel of sde.py, recording what GRPO needs.

A rollout runs σ_0 = 1 > … > σ_N = 0 with `sde.step` and keeps, per step t and sample i, the state
x_t, the sampled x_{t+1}, the rollout policy's log p_old(x_{t+1} | x_t) and its mean μ_old (for the
step-wise KL of trust_region.py), and the step's std.
"""
from dataclasses import dataclass

import torch

import sde
from toy.velocity import guided_velocity


@dataclass
class Trajectory:
    states: torch.Tensor      # (N+1, B, 2): x_0 = noise, …, x_N = the sample
    log_probs: torch.Tensor   # (N, B): log p_old(x_{t+1} | x_t), element mean (sde.log_prob)
    means: torch.Tensor       # (N, B, 2): μ_old(x_t)
    stds: torch.Tensor        # (N,): the std of step t (the same for every sample)
    labels: torch.Tensor      # (B,): the prompt of each sample
    sigmas: torch.Tensor      # (N+1,): the schedule


@torch.no_grad()
def rollout(model, labels, sigmas, kernel, eta, generator, cfg_scale=1.0, noise=None):
    """Sample len(labels) points with `kernel` from `noise` (default: drawn).  Returns a Trajectory."""
    x = torch.randn(labels.shape[0], 2, generator=generator) if noise is None else noise   # (B, 2) ~ N(0, I)
    states, log_probs, means, stds = [x], [], [], []
    for sigma, sigma_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
        velocity = guided_velocity(model, x, sigma, labels, cfg_scale)
        x, log_prob, mean, std = sde.step(kernel, x, velocity, sigma, sigma_next, eta, generator)
        states.append(x), log_probs.append(log_prob), means.append(mean), stds.append(std.flatten()[0])
    return Trajectory(torch.stack(states), torch.stack(log_probs), torch.stack(means),
                      torch.stack(stds).float(), labels, torch.as_tensor(sigmas))
