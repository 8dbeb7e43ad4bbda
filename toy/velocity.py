"""The toy's policy: a tiny time- and prompt-conditioned MLP velocity field, E copies at once.

Conventions of sde.py: x_σ = (1−σ)·x_0 + σ·ε, the network predicts v ≈ ε − x_0, and
its timestep input is σ·1000 (through a sinusoidal embedding, as in diffusion transformers).

Ensemble. The toy trains several seeds (and the same config's replicas) in one batched model: every
layer holds E independent weight matrices, (E, in, out), applied with one batched matmul. Member e
sees only its own slice of the batch, so E members are E independent models that share the Python
loop, not the weights. `forward` takes (E·B, ...) inputs laid out member by member.

Classifier-free guidance (paper setting: CFG 6 on the video model) exists here too: label
`num_prompts` is the "null prompt" the model is pretrained on with probability p_uncond, and
`guided_velocity` combines v_uncond + w·(v_cond − v_uncond). The toy's default is w = 1 (the
conditional velocity, one forward): the 2-D conditional model is accurate and needs no guidance.
"""
import math

import torch
from torch import nn

from toy.manifold import NUM_PROMPTS

TIME_FEATURES = 16   # sinusoidal features of σ·1000 (8 frequencies × sin, cos)
HIDDEN = 128         # width of the MLP: small enough for a CPU, large enough to draw a circle
DEPTH = 3            # hidden layers


def timestep_embedding(sigma, dim=TIME_FEATURES, max_period=10_000.0):
    """Sinusoidal embedding of the timestep σ·1000.  sigma: Tensor[M] -> Tensor[M, dim]."""
    half = dim // 2
    frequencies = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    angles = (sigma.float() * 1000)[:, None] * frequencies[None]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)


class EnsembleLinear(nn.Module):
    """E independent linear layers: (E, B, in) -> (E, B, out)."""

    def __init__(self, members, fan_in, fan_out):
        super().__init__()
        bound = 1 / math.sqrt(fan_in)   # nn.Linear's default initialisation, per member
        self.weight = nn.Parameter(torch.empty(members, fan_in, fan_out).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(members, 1, fan_out).uniform_(-bound, bound))

    def forward(self, h):
        return torch.baddbmm(self.bias, h, self.weight)


class VelocityMLP(nn.Module):
    """v_θ(x, σ, c) for E members.  forward(x (E·B, 2), sigma (E·B,), labels (E·B,)) -> (E·B, 2)."""

    def __init__(self, members=1, num_prompts=NUM_PROMPTS, hidden=HIDDEN, depth=DEPTH):
        super().__init__()
        self.members, self.num_prompts = members, num_prompts
        fan_in = 2 + TIME_FEATURES + num_prompts + 1          # x, time, one-hot prompt (+ null)
        sizes = [fan_in] + [hidden] * depth + [2]
        self.layers = nn.ModuleList(EnsembleLinear(members, a, b) for a, b in zip(sizes[:-1], sizes[1:]))

    def forward(self, x, sigma, labels):
        sigma = torch.as_tensor(sigma, dtype=torch.float32).expand(x.shape[0])
        prompt = nn.functional.one_hot(labels, self.num_prompts + 1).float()
        h = torch.cat([x, timestep_embedding(sigma), prompt], dim=-1)       # (E·B, fan_in)
        h = h.view(self.members, -1, h.shape[-1])                            # (E, B, fan_in)
        for layer in self.layers[:-1]:
            h = nn.functional.silu(layer(h))
        return self.layers[-1](h).reshape(x.shape)                           # (E·B, 2)

    @torch.no_grad()
    def replicate(self, members):
        """A new model with `members` copies of member 0 (pretrained weights -> E GRPO seeds)."""
        copy = VelocityMLP(members, self.num_prompts, self.layers[0].weight.shape[-1], len(self.layers) - 1)
        for new, old in zip(copy.parameters(), self.parameters()):
            new.copy_(old[:1].expand_as(new))
        return copy


def guided_velocity(model, x, sigma, labels, cfg_scale=1.0):
    """CFG: v = v_uncond + w·(v_cond − v_uncond); w = 1 is the plain conditional velocity."""
    if cfg_scale == 1.0:
        return model(x, sigma, labels)
    members = model.members
    null = torch.full_like(labels, model.num_prompts)
    # one batched forward per member: [cond; uncond] stacked inside each member's slice
    xx = torch.cat([x.view(members, -1, 2)] * 2, dim=1).reshape(-1, 2)
    ll = torch.cat([labels.view(members, -1), null.view(members, -1)], dim=1).reshape(-1)
    sigma = torch.as_tensor(sigma, dtype=torch.float32).expand(x.shape[0])
    ss = torch.cat([sigma.view(members, -1)] * 2, dim=1).reshape(-1)
    v_cond, v_uncond = model(xx, ss, ll).view(members, 2, -1, 2).unbind(dim=1)
    return (v_uncond + cfg_scale * (v_cond - v_uncond)).reshape(x.shape)
