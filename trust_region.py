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

    L_KL = w_anchor·KL_anchor + w_step·KL_step,   total loss = policy loss + β·L_KL

(`total_loss`: the mean of loss_it + β_i·L_KL_it over the valid (sample, step) pairs, the quantity minimised).

Scale: why the official β is inert. Log-probs and KLs are both element means, so per (sample, step) pair,
on-policy, the two pushes on the step mean μ compare as

    ‖∂(β·KL_anchor)/∂μ‖ / ‖∂L_policy/∂μ‖ = β · (rms(μ_θ - μ_anchor) / std) / (|A|·S_t)     (element count cancels)

and rms(μ_θ - μ_anchor)/std = √(2·KL_anchor). At β ≤ 1e-5 that ratio (the loop logs it as
`trust_region_activity`) is ~1e-8: the policy never feels the KL. A trust region that acts when the policy
has drifted by a tenth of a step's std needs β of order 10. The `adaptive` schedule finds such a β by itself.

The step-wise estimator. `gaussian` (ours, default): the closed-form KL of the step means above, exactly 0
at the first update after a rollout (μ_θ = μ_old). `k1` (official): the sample log-ratio
mean(log p_old - log p_θ) over the pairs; its value is 0 on-policy but its gradient is not: -∇log p_θ, i.e.
the same as adding +w_step·β/S_t to every advantage (a push towards whatever was sampled, at every update).

β, four schedules, one object each behind one interface (`OfficialBeta`, `TwoStageBeta`, `ConstantBeta`,
`AdaptiveBeta`; `beta_schedule(name, ...)` builds one): `betas(kls)` gives the β of each (sample, step) pair of a
trained step, `observe(kl)` is told each optimizer update's mean L_KL. The official schedule counts pairs (as the
official controller); the others count optimizer updates.

* official: what the official code runs. One controller update per (sample, step) pair that
  computes a KL. For the first 100 updates β ramps linearly from 1e-7 (`kl_coef`) towards 1e-5
  (`kl_weight`): after n < 100 updates β = 1e-7 + (1e-5 - 1e-7)·n/100, so the ramp ends at
  9.901e-6, not 1e-5. From the 100th update on, with K̄ the mean KL of the last 10 updates and the
  target 1e-5 (the official code passes `kl_weight` as the KL target too):

      K̄ > 1.5e-5  ->  β <- 0.9·β;    K̄ < 5e-6  ->  β <- 1.1·β;    then β clipped to [1e-7, 1e-5].

  It *lowers* β when the KL is high: the reverse of the usual adaptive controller (Ziegler et al.),
  reproduced as is. Each pair's loss uses β as it was before that pair's update. The official code
  feeds each rank's own KL, so β drifts apart across ranks; here the caller passes the KL averaged
  over ranks, so β is identical on every rank.
* two_stage: the paper's description, small early (exploration) and larger later: 1e-7 before
  `switch_step` optimizer updates, 1e-5 from then on (`kl_coefficient`).
* constant: β = beta_start throughout.
* adaptive (`AdaptiveBeta`): the usual adaptive KL penalty (PPO, Schulman et al. 2017, sec. 4), in the usual
  direction: every `window` optimizer updates, with d the mean L_KL of those updates (each a mean over its
  pairs, averaged over ranks),

      d > 1.5·target  ->  β <- 2·β;    d < target/1.5  ->  β <- β/2;    then β clipped to [β_min, β_max].

  PPO decides after every update (window 1); train.py's default window is the anchor period (AdaptiveBeta).

KL modes compared in the ablation (`KL_MODES`): none, fixed (anchor never moves), step (step-wise
only), moving (moving anchor only), dual (both).

Pure torch apart from copying module parameters; no global state (the controller's state is an
object with `state_dict()` for exact resume). Uses sde.py's std broadcasting.
"""
import copy
import math

import torch

import sde

KL_MODES = ("none", "fixed", "step", "moving", "dual")
# The step-wise term's estimator (module docstring): the Gaussian KL of the step means (ours), or the official
# sample log-ratio mean(log p_old - log p_θ).
STEP_ESTIMATORS = ("gaussian", "k1")
# Anchor refresh period in optimizer updates: paper / official `update_ref_model_step 10`.
ANCHOR_PERIOD = 10
# Dual weights: official `dual_kl_moving_weight 1.0`, `dual_kl_step_weight 0.1`.
ANCHOR_WEIGHT = 1.0
STEP_WEIGHT = 0.1
# β's floor and ceiling: official `kl_coef 1e-7` (start of the ramp, and the controller's minimum
# `kl_min_coef`, which defaults to kl_coef) and `kl_weight 1e-5` (end of the ramp and maximum).
BETA_START = 1e-7
BETA_END = 1e-5
BETA_SCHEDULES = ("official", "adaptive", "two_stage", "constant")
# Adaptive β (PPO's rule): band factor 1.5 around the target and factor 2 per update (PPO sec. 4). Its
# start, target and bounds are set where it is used (train.py's Config: calibrated in the synthetic world).
ADAPTIVE_BAND = 1.5
ADAPTIVE_FACTOR = 2.0
# Official controller (hyvideo AdaptiveKLController): ramp length in controller updates (hard-coded
# 100), KL window (mean of the last 10 KLs), KL target (the trainer passes kl_weight, 1e-5), band
# ±50 % of the target, multipliers 0.9 above the band and 1.1 below it.
RAMP_UPDATES = 100
KL_WINDOW = 10
KL_TARGET = 1e-5
KL_BAND = 0.5
BETA_DECREASE = 0.9
BETA_INCREASE = 1.1


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


def k1_kl(log_prob, old_log_prob):
    """The official step-wise estimator: the sample log-ratio log p_old - log p_θ per sample.  Tensor[B].

    Its expectation under π_old is KL(π_old ‖ π_θ); one sample of it is 0 on-policy, its gradient -∇log p_θ
    is not (module docstring)."""
    return old_log_prob.detach() - log_prob


def dual_kl(mean, std, anchor_mean=None, old_mean=None, mode="dual",
            anchor_weight=ANCHOR_WEIGHT, step_weight=STEP_WEIGHT, step_estimator="gaussian",
            log_prob=None, old_log_prob=None):
    """L_KL = w_anchor·KL(π_θ ‖ π_anchor) + w_step·KL(π_θ ‖ π_old).  Returns (Tensor[B], terms).

    mean: the policy's μ_θ with gradients; anchor_mean: μ_anchor from the anchor model on the same
    x (no gradient); old_mean: μ_old recorded in the rollout. `terms` holds the per-sample KL,
    Tensor[B], of every reference given ("kl_anchor", "kl_step"), also one whose weight is 0 in
    `mode` (for logging). A term with a weight > 0 in `mode` needs its reference.
    step_estimator "k1" takes the step term from log_prob (with gradients) and old_log_prob instead.
    """
    if step_estimator not in STEP_ESTIMATORS:
        raise ValueError(f"unknown step-wise KL estimator {step_estimator!r}: expected one of {STEP_ESTIMATORS}")
    w_anchor, w_step = kl_weights(mode, anchor_weight, step_weight)
    total = torch.zeros(mean.shape[0], device=mean.device)
    terms = {}
    for name, weight, reference in (("kl_anchor", w_anchor, anchor_mean), ("kl_step", w_step, old_mean)):
        if name == "kl_step" and step_estimator == "k1":
            reference = old_log_prob
        if reference is None:
            if weight != 0:
                raise ValueError(f"KL mode {mode!r} uses {name} (weight {weight}) but its reference is None")
            continue
        if name == "kl_step" and step_estimator == "k1":
            if log_prob is None:
                raise ValueError("step_estimator 'k1' needs the policy's log_prob")
            dtype = torch.promote_types(log_prob.dtype, torch.float32)  # at least fp32 (bf16 models)
            terms[name] = k1_kl(log_prob.to(dtype), reference.to(dtype))
        else:
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


def total_loss(policy_loss, kl, beta, valid, num_pairs, scale=1.0):
    """The loss the paper minimises, over one step's (sample, step) pairs, as a share of a batch mean:

        L = scale / P · Σ_{valid (i, t)} [ loss_it + β_i·L_KL_it ]

    policy_loss: grpo.clipped_policy_loss's mean over this call's valid pairs (Tensor[]); kl, beta: (B,) L_KL of
    each pair (dual_kl) and its β; valid: (B,) bool, the pairs that enter the loss (finite advantage, stochastic
    step); num_pairs: P, the valid pairs of the whole batch the mean is over (so that a caller who splits a batch
    over steps and ranks and sums the parts gets the batch mean); scale: train.py's world size, which undoes
    FSDP's averaging of gradients over ranks. Returns (loss, Σ policy terms, Σ β·L_KL), the sums over this
    call's valid pairs, each with its graph (the trust region's activity compares their gradients)."""
    policy_sum = policy_loss * int(valid.sum())
    kl_sum = (beta * kl)[valid].sum()
    return (policy_sum + kl_sum) * scale / num_pairs, policy_sum, kl_sum


# ------------------------------------------------------------------------------------------------
# β: one object per schedule (module docstring). The loop asks each the same two things:
#
#     betas(kls)   β of each (sample, step) pair of one trained step, in order; kls: those pairs' L_KL, averaged
#                  over ranks (so that β is the same on every rank)
#     observe(kl)  after each optimizer update that was taken: its mean L_KL per valid pair, averaged over ranks
#
# and state_dict() / load_state_dict() for exact resume. `reads_pair_kls` says whether betas() reads the KLs it is
# given (only the official schedule's does; the others read only how many there are), so that the loop skips the
# all-reduce that averages them over the ranks when nothing reads them. Units: the official schedule counts (sample, step) pairs,
# as the official controller does (its ramp is 100 pairs, about 3 iterations of 8 ranks x 2 videos x 20 steps);
# the others count optimizer updates taken.

class OfficialBeta:
    """What the official code runs: a ramp, then a KL-band rule (module docstring), one step per (sample, step) pair.

    Each pair's loss uses β as it was before that pair's step; the pairs of one call to `betas` are stepped in
    order. kl_target is the official `kl_weight` passed as the target (1e-5); KL_BAND and the factors are the
    official ones."""

    reads_pair_kls = True  # betas() reads the pairs' KLs: steps its controller on each pair's KL

    def __init__(self, beta_start=BETA_START, beta_end=BETA_END, kl_target=KL_TARGET, ramp_updates=RAMP_UPDATES,
                 window=KL_WINDOW):
        if not (0 < beta_start <= beta_end):
            raise ValueError(f"beta must satisfy 0 < beta_start <= beta_end, got beta_start={beta_start}, beta_end={beta_end}")
        if not (isinstance(ramp_updates, int) and ramp_updates >= 1 and isinstance(window, int) and window >= 1):
            raise ValueError(f"ramp_updates and window must be positive ints, got {ramp_updates!r} and {window!r}")
        if not kl_target > 0:
            raise ValueError(f"kl_target must be > 0, got {kl_target!r}")
        self.beta_start, self.beta_end, self.kl_target = beta_start, beta_end, kl_target
        self.ramp_updates, self.window = ramp_updates, window
        self.num_updates = 0   # pairs stepped so far
        self.kl_history = []   # the last `window` KLs (all the rule reads)
        self.beta = beta_start

    def step(self, kl):
        """One pair's (rank-averaged) L_KL -> the β of the next pair."""
        kl = float(kl)
        if not math.isfinite(kl):
            raise ValueError(f"kl must be finite, got {kl}")
        self.num_updates += 1
        self.kl_history = (self.kl_history + [kl])[-self.window:]
        if self.num_updates < self.ramp_updates:
            # linear ramp: β = β_start + (β_end - β_start)·n/R, ignoring the KL
            self.beta = self.beta_start + (self.beta_end - self.beta_start) * self.num_updates / self.ramp_updates
        elif len(self.kl_history) == self.window:
            mean_kl = sum(self.kl_history) / len(self.kl_history)
            if mean_kl > (1 + KL_BAND) * self.kl_target:      # KL high: β × 0.9 (sic: lowers the penalty)
                self.beta = self.beta * BETA_DECREASE
            elif mean_kl < (1 - KL_BAND) * self.kl_target:    # KL low: β × 1.1
                self.beta = self.beta * BETA_INCREASE
            self.beta = min(max(self.beta, self.beta_start), self.beta_end)
        return self.beta

    def betas(self, kls):
        betas = []
        for kl in torch.as_tensor(kls).flatten().tolist():
            betas.append(self.beta)
            self.step(kl)
        return betas

    def observe(self, kl):
        """The official controller reads only the pairs' KLs (betas)."""

    def state_dict(self):
        return {"schedule": "official", "beta": self.beta, "num_updates": self.num_updates,
                "kl_history": list(self.kl_history)}

    def load_state_dict(self, state):
        _check_schedule_state(state, "official")
        self.beta, self.num_updates = state["beta"], state["num_updates"]
        self.kl_history = list(state["kl_history"])


class TwoStageBeta:
    """The paper's description: beta_start (small, for exploration) before `switch_step` optimizer updates,
    beta_end from then on (`kl_coefficient`)."""

    reads_pair_kls = False  # betas() ignores the pairs' KLs: β follows the updates taken

    def __init__(self, beta_start=BETA_START, beta_end=BETA_END, switch_step=None):
        kl_coefficient(0, beta_start, beta_end, switch_step)  # checks the arguments
        self.beta_start, self.beta_end, self.switch_step = beta_start, beta_end, switch_step
        self.num_updates = 0  # optimizer updates taken

    @property
    def beta(self):
        return kl_coefficient(self.num_updates, self.beta_start, self.beta_end, self.switch_step)

    def betas(self, kls):
        return [self.beta] * torch.as_tensor(kls).numel()

    def observe(self, kl):
        self.num_updates += 1

    def state_dict(self):
        return {"schedule": "two_stage", "num_updates": self.num_updates}

    def load_state_dict(self, state):
        _check_schedule_state(state, "two_stage")
        self.num_updates = state["num_updates"]


class ConstantBeta:
    """β = beta throughout."""

    reads_pair_kls = False  # betas() ignores the pairs' KLs: a fixed β

    def __init__(self, beta=BETA_START):
        if not beta >= 0:
            raise ValueError(f"beta must be >= 0, got {beta}")
        self.beta = beta

    def betas(self, kls):
        return [self.beta] * torch.as_tensor(kls).numel()

    def observe(self, kl):
        """A fixed β reads nothing."""

    def state_dict(self):
        return {"schedule": "constant"}

    def load_state_dict(self, state):
        _check_schedule_state(state, "constant")


class AdaptiveBeta:
    """β of the adaptive schedule (module docstring): one decision per `window` optimizer updates.

    `observe(kl)` takes each update's L_KL (the mean over its valid pairs, averaged over ranks, so every rank holds
    the same β); every `window` updates PPO's rule is applied to the mean L_KL of the window. window = 1 is PPO's
    per-update rule; with a moving anchor the KL is a sawtooth (exactly 0 at the first update after each refresh,
    growing until the next), so a per-update rule halves β at every refresh and doubles it in between: the window
    of one anchor period sees the sawtooth's mean instead (measured in the synthetic world: README, docs/world.md).
    """

    reads_pair_kls = False  # betas() ignores the pairs' KLs: β changes on observe(), per update

    def __init__(self, beta_init, kl_target, beta_min, beta_max, window=1, band=ADAPTIVE_BAND, factor=ADAPTIVE_FACTOR):
        if not (0 < beta_min <= beta_init <= beta_max):
            raise ValueError(f"adaptive beta must satisfy 0 < beta_min <= beta_init <= beta_max, got "
                             f"{beta_min}, {beta_init}, {beta_max}")
        if not (kl_target > 0 and band > 1 and factor > 1 and isinstance(window, int) and window >= 1):
            raise ValueError(f"adaptive beta needs kl_target > 0, band > 1, factor > 1 and an int window >= 1, got "
                             f"{kl_target}, {band}, {factor}, {window!r}")
        self.beta, self.kl_target, self.beta_min, self.beta_max = beta_init, kl_target, beta_min, beta_max
        self.window, self.band, self.factor = window, band, factor
        self.num_updates = 0
        self.window_kls = []  # the L_KL of the updates since the last decision

    def betas(self, kls):
        return [self.beta] * torch.as_tensor(kls).numel()

    def observe(self, kl):
        """One optimizer update's (rank-averaged) L_KL -> the β of the next update."""
        kl = float(kl)
        if not math.isfinite(kl):
            raise ValueError(f"kl must be finite, got {kl}")
        self.num_updates += 1
        self.window_kls.append(kl)
        if len(self.window_kls) < self.window:
            return self.beta
        mean_kl = sum(self.window_kls) / len(self.window_kls)
        self.window_kls = []
        if mean_kl > self.band * self.kl_target:      # drifted too far: press harder
            self.beta *= self.factor
        elif mean_kl < self.kl_target / self.band:    # well inside: let go
            self.beta /= self.factor
        self.beta = min(max(self.beta, self.beta_min), self.beta_max)
        return self.beta

    def state_dict(self):
        return {"schedule": "adaptive", "beta": self.beta, "num_updates": self.num_updates,
                "window_kls": list(self.window_kls)}

    def load_state_dict(self, state):
        _check_schedule_state(state, "adaptive")
        self.beta, self.num_updates = state["beta"], state["num_updates"]
        self.window_kls = list(state.get("window_kls", []))


def _check_schedule_state(state, schedule):
    found = state.get("schedule") if isinstance(state, dict) else state
    if found != schedule:
        raise ValueError(f"checkpoint has beta schedule {found!r}, this run {schedule!r}")


def beta_schedule(name, *, beta_start=BETA_START, beta_end=BETA_END, switch_step=None, beta_init=None, kl_target=None,
                  beta_min=None, beta_max=None, window=1):
    """The β schedule `name` (BETA_SCHEDULES) with its parameters: official (beta_start, beta_end), two_stage
    (beta_start, beta_end, switch_step), constant (beta_start), adaptive (beta_init, kl_target, beta_min, beta_max,
    window)."""
    if name == "official":
        return OfficialBeta(beta_start, beta_end)
    if name == "two_stage":
        return TwoStageBeta(beta_start, beta_end, switch_step)
    if name == "constant":
        return ConstantBeta(beta_start)
    if name == "adaptive":
        return AdaptiveBeta(beta_init, kl_target, beta_min, beta_max, window)
    raise ValueError(f"unknown beta schedule {name!r}: expected one of {BETA_SCHEDULES}")


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
