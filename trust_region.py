"""Macro level of SAGE-GRPO: the dual trust region (a moving anchor and a step-wise constraint).

Paper: macro level, the "dual trust region" (periodic moving anchor + step-wise constraint).
Conventions of sde.py.

KL of two transition kernels. The policy and a reference model share the kernel's std at a given step
(it depends only on σ, σ', η), so the KL of the Gaussians N(μ_θ, std²I) and N(μ_ref, std²I) is
closed form. Averaged over elements, like the log-prob:

    KL = mean((μ_θ - μ_ref)²) / (2·std²).

Two references, two jobs:

* Moving anchor (position control). π_anchor starts as the pretrained model; every `anchor_period`
  optimizer updates (10 in the paper) it is replaced by a hard copy of the current policy. The
  term KL(π_θ ‖ π_anchor) keeps the policy within reach of a recent good model instead of pinning
  it to the pretrained one forever. anchor_period = ∞ is the classic fixed KL to the pretrained
  model.
* Step-wise constraint (velocity control). KL(π_θ ‖ π_old), π_old being the policy that produced
  the rollouts; its means μ_old are recorded during the rollout, so this term costs no extra
  forward pass. It is zero at the first update after a rollout and acts once a rollout is reused
  (updates_per_rollout > 1).

    L_KL = w_anchor·KL_anchor + w_step·KL_step,   total loss = policy loss + β·L_KL.

β follows the paper's two-stage schedule: small early (exploration), larger later. The official
script passes kl_coef = 1e-7 and kl_weight = 1e-5; the step at which the stage changes is a config
value (`switch_step`). The official code also has an adaptive controller that *lowers* β when the
KL is high, the reverse of the usual controller; we do not implement it.

KL modes compared in the ablation (`KL_MODES`): none, fixed (anchor never moves), step (step-wise
only), moving (moving anchor only), dual (both).

Pure torch apart from copying module parameters; no global state. Uses sde.py's std broadcasting.
"""
import copy
import math

import torch

import sde

KL_MODES = ("none", "fixed", "step", "moving", "dual")
# Anchor refresh period in optimizer updates: paper / official `update_ref_model_step 10`.
ANCHOR_PERIOD = 10
# Dual weights: official `dual_kl_moving_weight 1.0`, `dual_kl_step_weight 0.1`.
ANCHOR_WEIGHT = 1.0
STEP_WEIGHT = 0.1
# Two-stage β: official `kl_coef 1e-7` (early) and `kl_weight 1e-5` (late).
BETA_START = 1e-7
BETA_END = 1e-5


def check_kl_mode(mode):
    if mode not in KL_MODES:
        raise ValueError(f"unknown KL mode {mode!r}: expected one of {KL_MODES}")


def gaussian_kl(mean, ref_mean, std):
    """KL(N(mean, std²I) ‖ N(ref_mean, std²I)) averaged over elements.  Returns Tensor[B].

    mean, ref_mean: (B, ...); std: scalar or broadcastable (B, 1, ..., 1). Zero-std (deterministic)
    steps give 0: two point masses are either equal or infinitely apart, and such steps are
    excluded from the objective anyway.
    """
    if mean.shape != ref_mean.shape:
        raise ValueError(f"mean and ref_mean must have the same shape, got {tuple(mean.shape)} and {tuple(ref_mean.shape)}")
    dtype = torch.promote_types(mean.dtype, torch.float32)        # at least fp32 (bf16 models)
    mean, ref_mean = mean.to(dtype), ref_mean.to(dtype)
    stochastic, safe_std = sde.broadcast_std(std, mean)
    # KL = (μ_θ - μ_ref)² / (2·std²), per element
    element_kl = torch.where(stochastic, (mean - ref_mean) ** 2 / (2 * safe_std ** 2), torch.zeros_like(mean))
    return element_kl.flatten(1).mean(dim=1)


def kl_weights(mode, anchor_weight=ANCHOR_WEIGHT, step_weight=STEP_WEIGHT):
    """(w_anchor, w_step) that `mode` uses: the ablation's five settings as weights."""
    check_kl_mode(mode)
    return {"none": (0.0, 0.0), "fixed": (anchor_weight, 0.0), "moving": (anchor_weight, 0.0),
            "step": (0.0, step_weight), "dual": (anchor_weight, step_weight)}[mode]


def anchor_period_for(mode, anchor_period=ANCHOR_PERIOD):
    """'fixed' never refreshes the anchor (period ∞); every other mode uses `anchor_period`."""
    check_kl_mode(mode)
    return math.inf if mode == "fixed" else anchor_period


def dual_kl(mean, std, anchor_mean=None, old_mean=None, mode="dual",
            anchor_weight=ANCHOR_WEIGHT, step_weight=STEP_WEIGHT):
    """L_KL = w_anchor·KL(π_θ ‖ π_anchor) + w_step·KL(π_θ ‖ π_old).  Returns (Tensor[B], terms).

    mean: the policy's μ_θ with gradients; anchor_mean: μ_anchor from the anchor model on the same
    x (no gradient); old_mean: μ_old recorded in the rollout. `terms` holds the per-sample KL,
    Tensor[B], of every reference given ("kl_anchor", "kl_step"), also one whose weight is 0 in
    `mode` (for logging). A term with a weight > 0 in `mode` needs its reference.
    """
    w_anchor, w_step = kl_weights(mode, anchor_weight, step_weight)
    total = torch.zeros(mean.shape[0], device=mean.device)
    terms = {}
    for name, weight, reference in (("kl_anchor", w_anchor, anchor_mean), ("kl_step", w_step, old_mean)):
        if reference is None:
            if weight != 0:
                raise ValueError(f"KL mode {mode!r} uses {name} (weight {weight}) but its reference mean is None")
            continue
        terms[name] = gaussian_kl(mean, reference.detach(), std)
        total = total + weight * terms[name]
    return total, terms


def kl_coefficient(step, beta_start=BETA_START, beta_end=BETA_END, switch_step=None):
    """β at optimizer update `step`: beta_start before `switch_step`, beta_end from it on.

    switch_step=None keeps β = beta_start for the whole run (the fixed schedule).
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if beta_start < 0 or beta_end < 0:
        raise ValueError(f"beta must be >= 0, got beta_start={beta_start}, beta_end={beta_end}")
    if switch_step is None or step < switch_step:
        return beta_start
    return beta_end


class MovingAnchor:
    """The anchor policy π_anchor: a frozen copy of the policy, refreshed every `period` updates.

    `policy` is the trained module; `anchor` (optional) is a module with the same parameters, e.g.
    built sharded or on CPU by the caller; by default it is a deep copy of the policy at creation
    (the pretrained model). `period = math.inf` never refreshes: fixed KL to the pretrained model.
    """

    def __init__(self, policy, period=ANCHOR_PERIOD, anchor=None):
        if not (period == math.inf or (isinstance(period, int) and period >= 1)):
            raise ValueError(f"anchor period must be a positive int or math.inf, got {period!r}")
        self.policy = policy
        self.period = period
        self.anchor = copy.deepcopy(policy) if anchor is None else anchor
        self.anchor.requires_grad_(False)
        self.anchor.eval()
        self.last_refresh = 0
        self.refresh()

    @torch.no_grad()
    def refresh(self):
        """Hard copy: anchor parameters and buffers <- policy's (works across devices)."""
        policy_state = self.policy.state_dict()
        anchor_state = self.anchor.state_dict()
        if policy_state.keys() != anchor_state.keys():
            raise ValueError("anchor and policy must have the same parameters; "
                             f"differing keys: {sorted(set(policy_state) ^ set(anchor_state))[:5]}")
        for key, value in policy_state.items():
            anchor_state[key].copy_(value)

    def update_if_due(self, step):
        """Call after optimizer update number `step` (1, 2, ...). Refreshes when step % period == 0."""
        if self.period != math.inf and step > 0 and step % self.period == 0 and step != self.last_refresh:
            self.refresh()
            self.last_refresh = step
            return True
        return False

    def state_dict(self):
        return {"anchor": self.anchor.state_dict(), "last_refresh": self.last_refresh}

    def load_state_dict(self, state):
        self.anchor.load_state_dict(state["anchor"])
        self.last_refresh = state["last_refresh"]
