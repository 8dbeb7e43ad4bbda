"""The GRPO objective: group-relative advantages and the per-step clipped policy loss.

Paper: the GRPO preliminaries (as in FlowGRPO/DanceGRPO).

Advantages. Each prompt is sampled G times; the G rollouts form a group and are compared only with
each other:

    A_i = (r_i - mean_group(r)) / (std_group(r) + ε),   then clamped to [-adv_clip, adv_clip].

Rewards are laid out group by group: rewards[g·G : (g+1)·G] is group g. The std is the population
std (numpy's default, as in FlowGRPO). A reward that failed (NaN/inf: a video the reward model
could not score) is excluded from its group's statistics and from the loss: its advantage is NaN,
which `clipped_policy_loss` masks out, and it is counted in `reward_stats`. (The official code turns
such rewards into 0, which silently drags the group mean down and rewards every other member: we
do not.) A group whose valid rewards are all equal carries no signal: A = 0 exactly.

Several rewards (`--reward videoalign=1 clipscore=0.5`). With rewards r^1..r^R and weights w_k there
are two ways to reach one advantage per sample, and `--reward_normalization` picks one:

    total       A = norm( Σ_k w_k·r^k )                        normalise the weighted sum (one-reward GRPO)
    per_reward  A = norm( Σ_k w_k·norm(r^k) )                   normalise each reward in its group first,
                                                                 then the sum once more (GDPO-style)

where norm is the group normalisation above (the inner ones without the clamp). `per_reward` is the
default: the rewards are on unrelated scales (VideoAlign's normalised scores vs CLIPScore's 100·cos)
and their spreads differ from group to group, so in `total` a weight means little: the reward with
the wider spread in that group dominates. After the per-reward normalisation each reward has unit
spread in every group and w_k is its share of the advantage; and two samples that win on different
rewards no longer collapse onto the same advantage (the GDPO argument). A sample whose reward failed
in any reward with a non-zero weight is excluded from every reward's statistics. With one reward there
is nothing to decouple: both modes are the plain GRPO advantage.

Clipped loss. For sample i at its trained step t, with ratio ρ = exp(log p_θ - log p_old):

    loss_it = S_t · max(-A_i·ρ, -A_i·clip(ρ, 1 - ε_clip, 1 + ε_clip))

(the PPO pessimistic bound, written as a loss to minimise), S_t being the equalizer weight. The
loss is the mean over valid (sample, step) pairs. At the first update after a rollout ρ = 1 exactly,
the clip is inert and ∇loss = -A·S_t·∇log p_θ / n: plain REINFORCE with a group baseline.

Pure torch, no global state.
"""
import torch

# ε in A = (r - mean) / (std + ε): FlowGRPO's 1e-4 (guards groups with nearly equal rewards).
ADVANTAGE_EPS = 1e-4
# Advantage clamp: official SAGE-GRPO / FlowGRPO default 5.
ADVANTAGE_CLIP = 5.0
# PPO clip range on the per-step ratio: official default 1e-4 (log-probs are element means).
CLIP_RANGE = 1e-4


def _check_groups(rewards, group_size):
    if rewards.ndim != 1:
        raise ValueError(f"rewards must be a 1-D tensor [B], got shape {tuple(rewards.shape)}")
    if not (isinstance(group_size, int) and group_size >= 1):
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if rewards.numel() % group_size != 0:
        raise ValueError(f"group_size {group_size} must divide the batch of {rewards.numel()} rewards "
                         f"(rewards are laid out group by group)")


def group_advantages(rewards, group_size, clip=ADVANTAGE_CLIP, eps=ADVANTAGE_EPS):
    """Group-normalised, clamped advantages.  rewards: Tensor[B] -> Tensor[B] (NaN = excluded)."""
    rewards = torch.as_tensor(rewards)
    _check_groups(rewards, group_size)
    if clip <= 0:
        raise ValueError(f"advantage clip must be > 0, got {clip!r}")
    grouped = rewards.double().view(-1, group_size)                          # (num_groups, G)
    valid = torch.isfinite(grouped)
    count = valid.sum(dim=1, keepdim=True)
    zeroed = torch.where(valid, grouped, torch.zeros_like(grouped))
    # mean and population std over the valid members of each group
    mean = zeroed.sum(dim=1, keepdim=True) / count.clamp(min=1)
    variance = (torch.where(valid, grouped - mean, torch.zeros_like(grouped)) ** 2).sum(dim=1, keepdim=True) / count.clamp(min=1)
    advantages = (grouped - mean) / (variance.sqrt() + eps)
    # a group whose valid rewards are all equal (or that has < 2 of them) carries no signal
    big, small = torch.finfo(grouped.dtype).max, torch.finfo(grouped.dtype).min
    spread = (torch.where(valid, grouped, torch.full_like(grouped, small)).amax(dim=1, keepdim=True)
              - torch.where(valid, grouped, torch.full_like(grouped, big)).amin(dim=1, keepdim=True))
    no_signal = (count < 2) | (spread == 0)
    advantages = torch.where(no_signal, torch.zeros_like(advantages), advantages)
    advantages = advantages.clamp(-clip, clip)
    advantages = torch.where(valid, advantages, torch.full_like(advantages, float("nan")))
    return advantages.view(-1).to(rewards.dtype if rewards.is_floating_point() else torch.float32)


def decoupled_advantages(rewards, weights, group_size, clip=ADVANTAGE_CLIP, eps=ADVANTAGE_EPS):
    """per_reward mode (module docstring): A = norm(Σ_k w_k·norm(r^k)).

    rewards: Tensor[R, B], one row per reward (NaN = failed); weights: R numbers. Returns Tensor[B]
    (NaN = excluded). A row with weight 0 is ignored (logged only, never optimised)."""
    rewards = torch.as_tensor(rewards).double()
    weights = [float(w) for w in weights]
    if rewards.ndim != 2 or rewards.shape[0] != len(weights):
        raise ValueError(f"rewards must be Tensor[R, B] with one row per weight ({len(weights)}), "
                         f"got shape {tuple(rewards.shape)}")
    used = [k for k, w in enumerate(weights) if w]
    if not used:
        raise ValueError("every reward weight is 0: nothing to optimise")
    # a sample is valid only if every optimised reward scored it; the others are NaN in every row
    valid = torch.isfinite(rewards[used]).all(dim=0)                         # (B,)
    combined = torch.zeros(rewards.shape[1], dtype=torch.float64)
    for k in used:
        row = torch.where(valid, rewards[k], torch.full_like(rewards[k], float("nan")))
        combined += weights[k] * group_advantages(row, group_size, clip=float("inf"), eps=eps)  # Σ w_k·norm(r^k)
    return group_advantages(combined, group_size, clip, eps)


def reward_stats(rewards, group_size):
    """Diagnostics of a batch of grouped rewards: mean/std of valid rewards, failures, zero-std groups."""
    rewards = torch.as_tensor(rewards)
    _check_groups(rewards, group_size)
    grouped = rewards.double().view(-1, group_size)
    valid = torch.isfinite(grouped)
    valid_rewards = grouped[valid]
    no_signal = []
    for group, ok in zip(grouped, valid):
        members = group[ok]
        no_signal.append(members.numel() < 2 or bool((members == members[0]).all()))
    return {
        "reward_mean": valid_rewards.mean().item() if valid_rewards.numel() else float("nan"),
        "reward_std": valid_rewards.std(unbiased=False).item() if valid_rewards.numel() else float("nan"),
        "num_failed_rewards": int((~valid).sum()),
        "zero_std_ratio": sum(no_signal) / len(no_signal),
    }


def clipped_policy_loss(log_prob, old_log_prob, advantages, weights, clip_range=CLIP_RANGE):
    """Equalized PPO-clip loss over (sample, step) pairs.  All inputs Tensor[B]; returns (loss, stats).

    log_prob: log p_θ(x' | x) with gradients; old_log_prob: the rollout policy's, recorded;
    advantages: from group_advantages (NaN = excluded); weights: equalizer S_t of each pair's step
    (0 = deterministic step, excluded). The loss is the mean over the valid pairs (0 if none).
    """
    shapes = {t.shape for t in (log_prob, old_log_prob, advantages, weights)}
    if len(shapes) != 1 or log_prob.ndim != 1:
        raise ValueError("log_prob, old_log_prob, advantages and weights must all be Tensor[B] of one shape, got "
                         f"{[tuple(t.shape) for t in (log_prob, old_log_prob, advantages, weights)]}")
    if not clip_range > 0:
        raise ValueError(f"clip_range must be > 0, got {clip_range!r}")
    valid = torch.isfinite(advantages) & (weights > 0)
    advantages = torch.where(valid, advantages, torch.zeros_like(advantages)).to(log_prob.dtype)
    weights = torch.where(valid, weights, torch.zeros_like(weights)).to(log_prob.dtype)
    # keep masked pairs out of the graph entirely (their log-prob may be anything)
    log_ratio = torch.where(valid, log_prob - old_log_prob.detach(), torch.zeros_like(log_prob))
    # ρ = exp(log p_θ - log p_old)
    ratio = torch.exp(log_ratio)
    # loss_it = S_t · max(-A·ρ, -A·clip(ρ, 1-ε, 1+ε))
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_range, 1 + clip_range)
    per_pair = weights * torch.maximum(unclipped, clipped)
    count = valid.sum().clamp(min=1)
    loss = per_pair.sum() / count

    with torch.no_grad():
        r, lr = ratio[valid], log_ratio[valid]
        stats = {
            # k3 estimator of KL(π_old ‖ π_θ): E[(ρ - 1) - log ρ] ≥ 0 (Schulman's "approx_kl")
            "approx_kl": ((r - 1) - lr).mean().item() if r.numel() else 0.0,
            "clip_fraction": ((r - 1).abs() > clip_range).float().mean().item() if r.numel() else 0.0,
            "ratio_mean": r.mean().item() if r.numel() else 1.0,
            "ratio_std": r.std(unbiased=False).item() if r.numel() else 0.0,
            "num_valid_pairs": int(valid.sum()),
        }
    return loss, stats
