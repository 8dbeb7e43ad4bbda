"""A hackable reward: its maximum lies OFF the manifold, like a learned reward model's blind spot.

For prompt c the reward is the negative distance to a target point t_c placed outside the circle,
on the ray through the middle of arc c, at radius R_t > R:

    r(x, c) = −‖x − t_c‖.

On the manifold the best a policy can do is to gather its samples at the arc's midpoint (reward
−(R_t − R)): that is the "good" improvement, moving mass along the curve. Off the manifold the
reward keeps rising all the way to t_c (reward 0): that is reward hacking. The demo reports the
reward together with the off-manifold distance (manifold.distance_to_manifold), so both show.
"""
import torch

from toy.manifold import NUM_PROMPTS, RADIUS, arc_angles

TARGET_RADIUS = 1.6   # R_t: far enough out that hacking pays (0.6 of reward), near enough to tempt


def targets(labels, num_prompts=NUM_PROMPTS, target_radius=TARGET_RADIUS):
    """t_c: on the ray through the midpoint of arc c at radius R_t.  labels: LongTensor[B] -> Tensor[B, 2]."""
    start, width = arc_angles(labels, num_prompts)
    theta = start + width / 2
    return target_radius * torch.stack([torch.cos(theta), torch.sin(theta)], dim=-1)


def reward(x, labels, num_prompts=NUM_PROMPTS, target_radius=TARGET_RADIUS):
    """r(x, c) = −‖x − t_c‖.  x: Tensor[B, 2], labels: LongTensor[B] -> Tensor[B]."""
    return -(x - targets(labels, num_prompts, target_radius)).norm(dim=-1)


def best_on_manifold_reward(target_radius=TARGET_RADIUS, radius=RADIUS):
    """The highest reward a point ON the circle can get: −(R_t − R)."""
    return -(target_radius - radius)

