"""Pretraining the toy's velocity field with the flow-matching loss on points of the circle.

Conditional flow matching (Lipman et al. 2023; rectified flow), in the conventions of sde.py:

    x_σ = (1 − σ)·x_0 + σ·ε,   x_0 ~ data(c),  ε ~ N(0, I),  σ ~ U(0, 1)
    L(θ) = E ‖v_θ(x_σ, σ, c) − (ε − x_0)‖²

The pretrained model *defines* the manifold the paper talks about: its ODE samples lie on the
circle (tests/test_toy.py checks how near). With probability p_uncond the prompt is replaced by the
null prompt, so classifier-free guidance is available. Weights are cached under toy/out/ keyed by
the config, so only the first run pays the few seconds of training.
"""
import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from toy.manifold import NUM_PROMPTS, sample_manifold
from toy.velocity import DEPTH, HIDDEN, VelocityMLP

CACHE_DIR = Path(__file__).resolve().parent / "out"


@dataclass(frozen=True)
class PretrainConfig:
    steps: int = 3000
    """optimizer steps of flow matching (≈ 5 s on 2 CPU cores)"""
    batch_size: int = 512
    """points of the circle per step"""
    lr: float = 3e-3
    """Adam learning rate, cosine-decayed to 0 (a small MLP tolerates a large rate)"""
    p_uncond: float = 0.1
    """probability of the null prompt (classifier-free guidance training, as in the video models)"""
    hidden: int = HIDDEN
    """MLP width"""
    depth: int = DEPTH
    """MLP hidden layers"""
    num_prompts: int = NUM_PROMPTS
    """arcs of the circle, one per prompt"""
    seed: int = 0
    """seed of the initialisation and the data"""


def flow_matching_loss(model, x0, labels, generator=None):
    """E‖v_θ(x_σ, σ, c) − (ε − x_0)‖² with σ ~ U(0, 1).  x0: (B, 2), labels: (B,)."""
    sigma = torch.rand(x0.shape[0], generator=generator)
    noise = torch.randn(x0.shape, generator=generator)
    # x_σ = (1 − σ)·x_0 + σ·ε
    x_sigma = (1 - sigma[:, None]) * x0 + sigma[:, None] * noise
    # target v = ε − x_0
    return (model(x_sigma, sigma, labels) - (noise - x0)).pow(2).sum(-1).mean()


def pretrain(config=PretrainConfig(), verbose=False):
    """Train one velocity field from scratch.  Returns a VelocityMLP with one member."""
    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    model = VelocityMLP(1, config.num_prompts, config.hidden, config.depth)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, config.steps)
    for it in range(config.steps):
        labels = torch.randint(config.num_prompts, (config.batch_size,), generator=generator)
        x0 = sample_manifold(labels, generator, config.num_prompts)
        drop = torch.rand(config.batch_size, generator=generator) < config.p_uncond
        loss = flow_matching_loss(model, x0, torch.where(drop, config.num_prompts, labels), generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if verbose and it % 500 == 0:
            print(f"pretrain step {it:5d}  flow-matching loss {loss.item():.4f}")
    return model.eval().requires_grad_(False)


def cache_path(config):
    key = hashlib.sha1(json.dumps(dataclasses.asdict(config), sort_keys=True).encode()).hexdigest()[:10]
    return CACHE_DIR / f"pretrained_{key}.pt"


def load_or_pretrain(config=PretrainConfig(), verbose=False):
    """The pretrained model for `config`, from toy/out/ if it was trained before."""
    path = cache_path(config)
    model = VelocityMLP(1, config.num_prompts, config.hidden, config.depth)
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval().requires_grad_(False)
    model = pretrain(config, verbose)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(model.state_dict(), tmp)
    tmp.replace(path)   # atomic: a concurrent reader never sees half a file
    return model
