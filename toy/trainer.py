"""GRPO on the toy, with the video trainer's maths modules unchanged (sde, equalizer, grpo, trust_region).

One iteration, cleanrl-style (the same phases as train.py):

    ROLLOUT    G samples per prompt with the chosen kernel; record x_t, x_{t+1}, log p_old, μ_old
    REWARD     r = −‖x_N − t_c‖ (target_reward.py: hackable, its maximum is off the manifold)
    ADVANTAGE  A_i = clamp((r_i − mean_group) / (std_group + ε), ±5)
    UPDATE     `updates_per_rollout` Adam steps on  mean_(i,t) S_t·clipped(−A_i·ρ_it) + β·L_KL
    ANCHOR     every `anchor_period` updates the anchor becomes a copy of the policy
    LOG        rollout reward, off-manifold distance, approx_kl, clip fraction, KL terms

Every trained step t of every sample i is one (sample, step) pair; all pairs of an update go
through the network in one batch (the video trainer visits steps one by one in a random order and
accumulates gradients into one optimizer step: the same gradient, because the order of a sum does
not change it). `train_steps` < N trains a random subset of steps per sample.

One normalisation differs from train.py: the toy averages the KL term over all (sample, step) pairs,
train.py over the pairs that enter the policy loss (finite advantage, stochastic step). They agree
except for CPS, whose deterministic last step adds a KL of 0 to the toy's mean (a factor (N−1)/N on
its KL), and for failed rewards, which the toy never has.

Seeds. `num_seeds` replicas are trained at once in one ensemble model (velocity.py): each has its
own weights, Adam state, gradient-norm clip, rollout noise and advantages; they share the loop.

Toy defaults that differ from the video setting (the official defaults in train.py), and why:
* shift 1 (video: 5). The shift moves steps towards high noise to compensate for the redundancy of
  many pixels at high resolution; a 2-D point has none, so the plain linear schedule is the natural
  one (and the one the flow-matching pretraining saw uniformly).
* lr 1e-3, clip range 0.05 (video: 1e-5, 1e-4). The video log-prob is a mean over ~10⁶ latent
  elements, so one update moves it by ~1e-4; here it is a mean over two coordinates, ratios move by
  percents, and a tiny MLP trains in a few hundred steps, not thousands.
* β 1 -> 10 at half the updates (video: 1e-7 -> 1e-5). Same role, same two-stage shape (small early
  for exploration, larger later). The scale is the toy's own: the KL is an element mean over 2
  coordinates instead of 10⁶ and the policy loss is O(1). A short sweep (sage + equalizer + dual,
  FlowGRPO-style as the baseline) showed: β ≤ 0.3 early lets every KL mode drift far off the circle
  (the reward is hacked), β ≥ 3 throughout makes the fixed KL freeze the pretrained model; 1 -> 10
  is in between, and it was chosen before looking at the ablation grid.
* updates_per_rollout 2 (official: 1): with one update per rollout the clip and the step-wise KL
  are both inert (ρ = 1 exactly), and the toy exists to show them.
"""
import math
from dataclasses import asdict, dataclass

import torch

import equalizer
import grpo
import sde
import trust_region
from toy.manifold import distance_to_manifold, random_labels, RADIUS
from toy.rollout import rollout
from toy.target_reward import reward
from toy.velocity import guided_velocity


@dataclass
class Config:
    kernel: str = "sage"
    """transition kernel of the rollouts and the log-probs: flow_grpo, dance_grpo, cps or sage"""
    equalizer: bool = True
    """weight each step's policy loss by the gradient-norm equalizer S_t (else 1 on stochastic steps)"""
    kl_mode: str = "dual"
    """trust region: none, fixed (to the pretrained model), step (to π_old), moving (anchor), dual"""
    eta: float = 0.5
    """noise level η, the same for every kernel (official SAGE-GRPO default 0.5)"""
    num_steps: int = 20
    """sampling steps N (official: 20)"""
    shift: float = 1.0
    """schedule shift (video: 5 for 480p; toy: 1, a 2-D point needs no resolution shift)"""
    train_steps: int = 0
    """steps trained per sample, a random subset; 0 = all N (official: all 20)"""
    cfg_scale: float = 1.0
    """classifier-free guidance w (video: 6; toy: 1, the conditional 2-D model needs none)"""
    num_groups: int = 8
    """groups per rollout batch, prompts alternating (2 prompts -> 4 groups each)"""
    group_size: int = 8
    """G rollouts per group (official: 4; the toy affords 8 for steadier advantages)"""
    iterations: int = 100
    """rollout batches"""
    updates_per_rollout: int = 2
    """optimizer updates on each rollout batch (official: 1, which leaves clip and step-KL inert)"""
    lr: float = 1e-3
    """Adam learning rate (video: 1e-5; toy MLP, see the module docstring)"""
    max_grad_norm: float = 1.0
    """gradient-norm clip per seed (official: 1.0)"""
    clip_range: float = 0.05
    """PPO clip ε on the per-step ratio (video: 1e-4 with 10⁶-element log-prob means)"""
    adv_clip: float = grpo.ADVANTAGE_CLIP
    """advantage clamp (official: 5)"""
    anchor_period: int = trust_region.ANCHOR_PERIOD
    """moving anchor refresh, in optimizer updates (paper: 10)"""
    anchor_weight: float = trust_region.ANCHOR_WEIGHT
    """w_anchor of the dual KL (official: 1.0)"""
    step_weight: float = trust_region.STEP_WEIGHT
    """w_step of the dual KL (official: 0.1)"""
    beta_start: float = 1.0
    """β of the first stage (video: 1e-7; toy scale, see the module docstring)"""
    beta_end: float = 10.0
    """β of the second stage (video: 1e-5)"""
    beta_switch: float = 0.5
    """fraction of the updates after which β switches to beta_end"""
    num_seeds: int = 3
    """independent replicas trained at once (mean ± std in the tables)"""
    seed: int = 0
    """seed of the rollout noise (replica e uses the e-th slice of its stream)"""
    eval_samples: int = 256
    """ODE samples per prompt and replica for the evaluation"""
    eval_every: int = 10
    """evaluate the deterministic (ODE) sampler every this many iterations"""

    def __post_init__(self):
        sde.check_kernel(self.kernel)
        trust_region.check_kl_mode(self.kl_mode)
        if self.kernel == "ode":
            raise ValueError("kernel 'ode' has no stochastic step, so GRPO has no log-prob to train")
        if self.num_groups % 2:
            raise ValueError(f"num_groups must be even (two prompts alternate), got {self.num_groups}")
        if not 0 <= self.train_steps <= self.num_steps:
            raise ValueError(f"train_steps must be in [0, num_steps={self.num_steps}], got {self.train_steps}")


# ----------------------------------------------------------------------------------------------
# Evaluation: what the deployed (deterministic, ODE) sampler of each replica produces.

def projected_reward(x, labels):
    """Reward of x snapped onto the circle: the part of the reward earned by moving along the curve."""
    return reward(RADIUS * x / x.norm(dim=-1, keepdim=True).clamp(min=1e-12), labels)


@torch.no_grad()
def evaluate(model, config, seed=12345):
    """ODE samples of every replica from the same noise.  Returns {metric: Tensor[E]} and the samples."""
    members = model.members
    labels = random_labels(2 * members, config.eval_samples)                  # (E·2·n,) member-major
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(2 * config.eval_samples, 2, generator=generator)
    sigmas = sde.shifted_sigmas(config.num_steps, config.shift)
    # every replica starts from the same noise, so replicas differ only by their weights
    trajectory = rollout(model, labels, sigmas, "ode", 0.0, generator, config.cfg_scale,
                         noise=noise.repeat(members, 1))
    x = trajectory.states[-1]
    per_member = lambda t: t.view(members, -1).mean(dim=1)
    return {"reward": per_member(reward(x, labels)),
            "projected_reward": per_member(projected_reward(x, labels)),
            "off_manifold": per_member(distance_to_manifold(x))}, (x.view(members, -1, 2), labels.view(members, -1))


def clip_grad_norm_per_member(model, max_norm):
    """Gradient-norm clip of each replica separately (a global clip would couple the seeds)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    norms = torch.stack([g.pow(2).flatten(1).sum(1) for g in grads]).sum(0).sqrt()     # (E,)
    scale = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(scale.view(-1, *([1] * (g.ndim - 1))))
    return norms


# ----------------------------------------------------------------------------------------------

def train(config, pretrained, progress=None):
    """Train `config.num_seeds` replicas of GRPO from `pretrained`.  Returns (policy, history)."""
    E, B, N = config.num_seeds, config.num_groups * config.group_size, config.num_steps
    generator = torch.Generator().manual_seed(config.seed)
    sigmas = sde.shifted_sigmas(N, config.shift)                               # (N+1,) float64
    # S_t (the gradient-norm equalizer); without the equalizer every stochastic step weighs 1, deterministic ones 0
    step_weights = equalizer.step_weights(config.kernel, sigmas, config.eta, config.equalizer).float()
    train_steps = config.train_steps or N
    total_updates = config.iterations * config.updates_per_rollout
    beta_switch = math.ceil(config.beta_switch * total_updates)

    policy = pretrained.replicate(E).train().requires_grad_(True)
    anchor = trust_region.MovingAnchor(policy, trust_region.anchor_period_for(config.kl_mode, config.anchor_period))
    uses_anchor = trust_region.kl_weights(config.kl_mode, config.anchor_weight, config.step_weight)[0] > 0
    optimizer = torch.optim.Adam(policy.parameters(), lr=config.lr)
    labels = random_labels(E * config.num_groups, config.group_size)           # (E·B,) member-major
    history, update = {"config": asdict(config)}, 0

    def log(key, value):
        history.setdefault(key, []).append(value)

    for iteration in range(config.iterations):
        # ---------------- ROLLOUT: G samples per prompt, recording log p_old and μ_old per step
        policy.eval()
        trajectory = rollout(policy, labels, sigmas, config.kernel, config.eta, generator, config.cfg_scale)
        policy.train()

        # ---------------- REWARD
        x_final = trajectory.states[-1]                                        # (E·B, 2)
        rewards = reward(x_final, labels)                                      # (E·B,)

        # ---------------- ADVANTAGE (groups never straddle replicas: B is a multiple of G)
        advantages = grpo.group_advantages(rewards, config.group_size, config.adv_clip)

        # (sample, step) pairs: a random subset of `train_steps` steps per sample, sample-major so
        # that each replica's pairs stay contiguous for the ensemble forward
        order = torch.rand(E * B, N, generator=generator).argsort(dim=1)[:, :train_steps]   # (E·B, K)
        sample = torch.arange(E * B).repeat_interleave(train_steps)            # (M,)
        t = order.reshape(-1)                                                  # (M,)
        x_t, x_next = trajectory.states[t, sample], trajectory.states[t + 1, sample]        # (M, 2)
        old_log_prob, old_mean = trajectory.log_probs[t, sample], trajectory.means[t, sample]
        # the float64 schedule the rollout stepped with (it passed these values as python floats): the
        # update recomputes each recorded step with the very same numbers, so at the first update the
        # ratio is exactly 1 and the step-wise KL exactly 0 against the RECORDED log p_old and μ_old
        sigma, sigma_next = sigmas[t], sigmas[t + 1]                            # (M,) float64
        pair_labels, pair_advantages, pair_weights = labels[sample], advantages[sample], step_weights[t]

        # ---------------- UPDATE
        anchor_mean = None  # μ_anchor of the pairs: one anchor forward per rollout, again only after a refresh
        for _ in range(config.updates_per_rollout):
            velocity = guided_velocity(policy, x_t, sigma, pair_labels, config.cfg_scale)
            mean, std = sde.transition(config.kernel, x_t, velocity, sigma, sigma_next, config.eta)
            log_prob = sde.log_prob(x_next, mean, std)                         # (M,)
            policy_loss, stats = grpo.clipped_policy_loss(log_prob, old_log_prob, pair_advantages,
                                                          pair_weights, config.clip_range)
            if uses_anchor and anchor_mean is None:
                with torch.no_grad():
                    anchor_velocity = guided_velocity(anchor.anchor, x_t, sigma, pair_labels, config.cfg_scale)
                    anchor_mean, _ = sde.transition(config.kernel, x_t, anchor_velocity, sigma, sigma_next, config.eta)
            kl, kl_terms = trust_region.dual_kl(mean, std, anchor_mean, old_mean, config.kl_mode,
                                                config.anchor_weight, config.step_weight)
            beta = trust_region.kl_coefficient(update, config.beta_start, config.beta_end, beta_switch)
            # mean over (sample, step) pairs; × E so each replica's gradient is its own mean. Our choice for the toy,
            # instead of trust_region.total_loss: its KL term is averaged over every pair, deterministic steps too
            # (module docstring), and its β is one number per update (trust_region.kl_coefficient).
            loss = E * (policy_loss + beta * kl.mean())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norms = clip_grad_norm_per_member(policy, config.max_grad_norm)
            optimizer.step()
            update += 1

            # ---------------- ANCHOR: hard copy of the policy every anchor_period updates
            if anchor.update_if_due(update):
                anchor_mean = None
            if update == 1:
                history["first_update_ratio"] = (stats["ratio_mean"], stats["ratio_std"])

        # ---------------- LOG (per replica where it matters: the tables average over replicas)
        log("rollout_reward", rewards.view(E, -1).mean(1))
        log("rollout_off_manifold", distance_to_manifold(x_final).view(E, -1).mean(1))
        log("grad_norm", grad_norms.detach())
        for key in ("approx_kl", "clip_fraction", "ratio_std"):
            log(key, stats[key])
        for key, value in kl_terms.items():   # every KL whose reference exists, weighted or not
            log(key, value.mean().item())
        if (iteration + 1) % config.eval_every == 0 or iteration == 0:
            metrics, _ = evaluate(policy, config)
            log("eval_iteration", iteration + 1)
            for key, value in metrics.items():
                log("eval_" + key, value)
        if progress is not None:
            progress(iteration, history)

    for key, value in list(history.items()):
        if isinstance(value, list) and value and torch.is_tensor(value[0]):
            history[key] = torch.stack(value)                                  # (T, E)
    return policy.eval().requires_grad_(False), history
