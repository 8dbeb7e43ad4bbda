"""The data manifold of the toy: the unit circle in 2-D, cut into arcs that act as "prompts".

The paper's claim is geometric: real videos lie on a thin manifold, and an SDE that injects more
noise than the flow can remove leaves its samples off it. In 2-D that manifold is a curve, and
"off-manifold drift" becomes a number with a closed form: for the circle of radius R centred at 0,

    dist(x, circle) = | ‖x‖ − R |.

The circle is the clearest choice: its distance is exact and cheap, its tangent (moving mass along
the curve, which a reward may legitimately ask for) and normal (leaving the curve) directions are
the angular and radial ones, so a picture shows at a glance which one a policy took.

Prompt c ∈ {0, …, K−1} is the arc of angles [2πc/K, 2π(c+1)/K): the class-conditional pretrained
model generates points on its own arc, and the union of the arcs is the whole circle.
"""
import math

import torch

RADIUS = 1.0       # R: the scale of the data matches the N(0, I) noise of x_σ = (1−σ)x_0 + σε
NUM_PROMPTS = 2    # K arcs: 0 = upper half circle, 1 = lower half circle


def arc_angles(labels, num_prompts=NUM_PROMPTS):
    """Start angle and width of each label's arc.  labels: LongTensor[B] -> (Tensor[B], float)."""
    width = 2 * math.pi / num_prompts
    return labels.float() * width, width


def sample_manifold(labels, generator=None, num_prompts=NUM_PROMPTS, radius=RADIUS):
    """Points uniform (in arc length) on each label's arc.  labels: LongTensor[B] -> Tensor[B, 2]."""
    start, width = arc_angles(labels, num_prompts)
    theta = start + width * torch.rand(labels.shape, generator=generator)
    return radius * torch.stack([torch.cos(theta), torch.sin(theta)], dim=-1)


def distance_to_manifold(x, radius=RADIUS):
    """Euclidean distance of each point to the circle:  | ‖x‖ − R |.  x: Tensor[..., 2] -> Tensor[...]."""
    return (x.norm(dim=-1) - radius).abs()


def random_labels(num_groups, group_size, num_prompts=NUM_PROMPTS):
    """Prompts laid out group by group (the layout grpo.group_advantages expects): [g g g … g+1 …]."""
    return (torch.arange(num_groups) % num_prompts).repeat_interleave(group_size)
