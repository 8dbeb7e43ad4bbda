"""What an iteration measures besides its reward: seconds per phase, transformer forwards, peak memory, and the
update's diagnostics (the loss terms, β, the trust region's activity, the on-policy ratio per step).

Every number here lands in a metrics.jsonl row (run_directory.py) and, with --report_to, in the tracker.
"""
import resource
import time

import torch
import torch.distributed as dist

import distributed


def peak_memory_gb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux


class ForwardCount:
    """Transformer forwards of one iteration per video, counted by forward pre-hooks on the policy and the anchor:
    the hardware-independent cost (docs/cost_options.md). One video through the transformer is one forward, so a
    CFG pair (a batch of 2B) counts 2 per video. rollout: the policy without gradients; update: the policy's
    recomputes with gradients; anchor: the anchor's forwards (once per trained step and rollout, again after an
    anchor refresh); eval: --eval_every's samples (per training video, not part of the training cost).
    forward_equivalents adds the backward passes at the usual 2 forwards each, and 1 more with
    gradient checkpointing (each block's forward is recomputed in the backward)."""

    PHASES = ("rollout", "update", "anchor", "eval")

    def __init__(self, policy, anchor, videos, gradient_checkpointing):
        self.videos, self.backward = videos, 2 + int(bool(gradient_checkpointing))
        self.counts = dict.fromkeys(self.PHASES, 0)
        self.evaluating = False  # held_out_eval's forwards: counted apart, not a training cost
        policy.register_forward_pre_hook(self._hook(False), with_kwargs=True)
        if anchor is not None:
            anchor.register_forward_pre_hook(self._hook(True), with_kwargs=True)

    def _hook(self, is_anchor):
        def count(module, args, kwargs):
            phase = ("anchor" if is_anchor else "eval" if self.evaluating else
                     "update" if torch.is_grad_enabled() else "rollout")
            self.counts[phase] += kwargs["hidden_states"].shape[0]
        return count

    def take(self):
        """{forwards_<phase>: per video, forward_equivalents: per video} of the iteration so far; restarts the count."""
        per_video = {f"forwards_{phase}": n / self.videos for phase, n in self.counts.items()}
        self.counts = dict.fromkeys(self.PHASES, 0)
        if not per_video["forwards_eval"]:
            del per_video["forwards_eval"]  # only in the rows of iterations that evaluated
        per_video["forward_equivalents"] = (per_video["forwards_rollout"] + per_video["forwards_anchor"]
                                            + (1 + self.backward) * per_video["forwards_update"])
        return per_video


class PhaseTimer:
    """Wall time per phase (synchronising CUDA so that time is not attributed to the wrong phase)."""

    def __init__(self, device):
        self.device, self.times, self.start = device, {}, None

    def __call__(self, name):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        if self.start is not None:
            self.times[f"time_{self.start[0]}"] = now - self.start[1]
        self.start = (name, now) if name else None




class UpdateDiagnostics:
    """What one iteration's UPDATE measures besides its loss, summed over its (update, trained step, sample) pairs
    and over the ranks once, at LOG:

    * the loss terms (loss, policy_loss, approx_kl, clip_fraction, kl_anchor, kl_step): means over the valid pairs;
    * beta: the mean β of the pairs;
    * trust_region_activity = ‖∂(β·L_KL)/∂μ‖ / ‖∂L_policy/∂μ‖ summed over the steps: how hard the trust region
      pushes the step means μ against the policy term (~0: inert at this β). Both terms reach the weights through
      the same μ(θ), so their gradients with respect to μ compare them exactly: two backward passes through the
      loss formulas only, not through the transformer;
    * ratio_max_dev_per_step: max |ρ − 1| per denoising step, ρ = exp(log p_θ − log p_old) (0 at the first update:
      the on-policy check).
    Every number starts at 0, so an iteration without an update still logs every metric. The values stay on the
    device until LOG, which reads them all in one transfer (one host sync per iteration instead of ~10 per trained
    step); they are summed in the same order and precision (float64 of each float32 value) as before."""

    NAMES = ("pairs", "loss", "policy_loss", "approx_kl", "clip_fraction", "kl_anchor", "kl_step", "push_policy",
             "push_kl")

    def __init__(self, num_steps):
        self.num_steps = num_steps
        self.terms = {name: [] for name in self.NAMES}  # per recorded step: a float or a 0-d tensor on the device
        self.ratio_deviation = None  # (N,) float64 on the device, from the first record
        self.betas = []  # 0-d tensors: each step's mean β

    def record(self, policy_term, kl_loss, mean, stats, kl_terms, mask, log_prob, old_log_prob, steps, beta):
        """One trained step's pairs, before its backward. policy_term: the clipped policy loss x its valid pairs;
        kl_loss: Σ β·L_KL over the valid pairs; mean: the recomputed μ (B, ...) both depend on. Returns this rank's
        loss sum policy_term + kl_loss, a 0-d tensor (no host sync: the caller tests it once per update)."""
        push_policy = torch.autograd.grad(policy_term, mean, retain_graph=True)[0].norm()
        push_kl = torch.autograd.grad(kl_loss, mean, retain_graph=True)[0].norm() if kl_loss.requires_grad else 0.0
        n, value = stats["num_valid_pairs"], (policy_term + kl_loss).detach()
        for name, amount in (("pairs", n), ("loss", value), ("policy_loss", policy_term.detach()),
                             ("approx_kl", stats["approx_kl"] * n), ("clip_fraction", stats["clip_fraction"] * n),
                             ("kl_step", kl_terms["kl_step"].detach()[mask].sum()),
                             ("kl_anchor", kl_terms["kl_anchor"].detach()[mask].sum() if "kl_anchor" in kl_terms else 0.0),
                             ("push_policy", push_policy), ("push_kl", push_kl)):
            self.terms[name].append(amount)
        with torch.no_grad():
            deviation = torch.where(mask, (log_prob - old_log_prob).exp().sub(1).abs(), 0).double()
            if self.ratio_deviation is None:
                self.ratio_deviation = torch.zeros(self.num_steps, dtype=torch.float64, device=deviation.device)
            self.ratio_deviation.scatter_reduce_(0, steps.to(deviation.device), deviation, reduce="amax")
        self.betas.append(beta.detach().mean())
        return value

    def _sums(self):
        """{name: the sum of its recorded values in record order, as Python floats}, and the mean β: one transfer."""
        tensors = [v for values in self.terms.values() for v in values if torch.is_tensor(v)] + self.betas
        host = iter(torch.stack([t.double() for t in tensors]).tolist() if tensors else [])
        sums = {}
        for name, values in self.terms.items():
            sums[name] = 0.0
            for v in values:
                sums[name] += next(host) if torch.is_tensor(v) else float(v)
        betas = [next(host) for _ in self.betas]
        return sums, sum(betas) / len(betas) if betas else float("nan")

    def metrics(self, device):
        """The iteration's numbers over every rank: one all-reduce of the sums, one of the ratio deviations."""
        sums, beta = self._sums()
        names = sorted(sums)
        summed = dict(zip(names, distributed.all_reduce(torch.tensor([sums[n] for n in names], dtype=torch.float64,
                                                                     device=device)).tolist()))
        pairs = max(summed.pop("pairs"), 1.0)
        push_policy, push_kl = summed.pop("push_policy"), summed.pop("push_kl")
        ratio_deviation = (self.ratio_deviation if self.ratio_deviation is not None else
                           torch.zeros(self.num_steps, dtype=torch.float64))
        deviation = distributed.all_reduce(ratio_deviation.to(device), op=dist.ReduceOp.MAX).cpu()
        return {**{name: total / pairs for name, total in summed.items()},
                "beta": beta,
                "trust_region_activity": push_kl / push_policy if push_policy > 0 else float("nan"),
                "ratio_max_dev_per_step": deviation.tolist()}
