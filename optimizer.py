"""The optimizer: Muon for weight matrices, AdamW for the rest, as the official recipe; FSDP2-ready.

The official SAGE-GRPO trainer (its `use_muon` default) builds HunyuanVideo-1.5's own
`get_muon_optimizer(model, lr, weight_decay)` (hyvideo/optim/muon.py). What that optimizer does, and
what we do:

* Grouping. Every parameter with ndim >= 2 goes to Muon, embeddings and the output projection
  included (the exclusion of embeddings and the final layer is commented out there); 1-D ones
  (biases, norm scales) go to AdamW. `grouping="official"` is the same rule with one exception:
  torch.optim.Muon takes 2-D matrices only, so the 5-D patch-embedding Conv3d weight
  (`x_embedder.proj.weight`, 2048 x 65 x 1 x 1 x 1 in the 8.3B model; officially flattened to 2-D
  and orthogonalised) goes to AdamW. With LoRA, lora_A (r, in) and lora_B (out, r) are 2-D: both go
  to Muon, as the official rule does. `grouping="hidden"` is the textbook rule (Muon's and
  Moonshot's papers, torch's documentation): Muon only for the 2-D matrices inside the repeated
  blocks (`transformer_blocks`, the text refiner's `refiner_blocks`), AdamW for embeddings, the
  output projection and everything else.
* Muon step, per matrix W with gradient G (torch.optim.Muon's form, hyperparameters official):

      B <- μ·B + (1 - μ)·G,   U = (1 - μ)·G + μ·B          (Nesterov, μ = 0.95)
      O = NS_5(U)                                          (Newton-Schulz, 5 quintic steps, bf16)
      W <- (1 - lr·λ)·W - lr·0.2·√max(A, B)·O              (adjust_lr_fn "match_rms_adamw")

  The official momentum is the undamped B <- μ·B + G, U = G + μ·B: (1 - μ) times ours, and NS
  normalises its input by its norm first, so the update is the same up to rounding. The factor
  0.2·√max(A, B) gives the orthogonalised update the RMS of an AdamW update (Moonshot), so the
  AdamW learning rate (official 1e-5) and weight decay (0.01) carry over.
* AdamW for the rest: betas (0.95, 0.95), eps 1e-8 (the official get_muon_optimizer defaults, which
  post_train.py does not override), the same lr and decoupled weight decay.
* `kind="adamw"`: plain torch AdamW on everything, betas (0.9, 0.999), eps 1e-8 (the official
  `use_muon=False` branch).

Sharded parameters (FSDP2, `fully_shard`: DTensors sharded on dim 0). Newton-Schulz must see the
whole matrix: orthogonalising each rank's rows separately is a different (wrong) update.
`ShardedMuon` keeps the momentum on the local shard (it is elementwise), all-gathers U, runs NS on
the whole matrix on every rank and keeps its own rows; the weight update is elementwise again.
That is what the official optimizer does too (`full_tensor()` before NS). The result equals the
unsharded step bit for bit (tested). torch.optim.Muon itself (torch 2.13) also accepts DTensors and
computes whole-matrix NS through DTensor's operator sharding (collectives inside each of NS's ~16
operations), but its partial sums are reduced in bf16, so it matches the unsharded step only to
bf16 rounding (a few % of the update), and its communication is implicit. One all-gather per matrix
and redundant NS on every rank cost little next to a video transformer's forward (see
benchmarks/bench_optimizer.py); a faster scheme would give each rank a share of the matrices.

One optimizer object (`MuonWithAdamW`) holds both parts, so that `step`, `zero_grad`, learning-rate
schedulers and torch.distributed.checkpoint's get_/set_optimizer_state_dict see a single
torch.optim.Optimizer.
"""
import torch
from torch.distributed.tensor import DTensor, distribute_tensor

from model import HIDDEN_BLOCKS as HUNYUAN_HIDDEN_BLOCKS
from model import family_of_transformer
# torch's own Newton-Schulz and learning-rate rule, so that an unsharded step equals torch.optim.Muon's
from torch.optim._muon import _adjust_lr, _zeropower_via_newtonschulz

OPTIMIZERS = ("muon", "adamw")
GROUPINGS = ("official", "hidden")
# Learning rate and weight decay: official train_grpo.sh `--learning_rate 1e-5`, TrainingConfig weight_decay 0.01.
LEARNING_RATE = 1e-5
WEIGHT_DECAY = 0.01
# Muon: official get_muon_optimizer momentum 0.95, Nesterov, 5 Newton-Schulz steps (torch's defaults),
# learning rate scaled by 0.2·√max(A, B) (official adjust_lr_for_muon = torch's "match_rms_adamw").
MUON_MOMENTUM = 0.95
MUON_ADJUST_LR = "match_rms_adamw"
# AdamW beside Muon: official get_muon_optimizer adamw_betas (0.95, 0.95), adamw_eps 1e-8.
MUON_ADAMW_BETAS = (0.95, 0.95)
# AdamW alone: official use_muon=False branch, torch.optim.AdamW(betas=(0.9, 0.999), eps=1e-8).
ADAMW_BETAS = (0.9, 0.999)
# Both AdamWs run fused (one kernel over all parameters, CPU and CUDA): torch's default on CPU is a loop of
# ~10 DTensor-dispatched ops per sharded parameter, 4x slower on the tiny models (benchmarks/bench_train.py).
# The same update up to round-off.
ADAMW_EPS = 1e-8


def _fused(params):
    """fused=True, except for meta tensors (plan.py steps an optimizer on them to count its states), where
    torch has no fused kernel."""
    return all(p.device.type != "meta" for p in params)
# The repeated blocks whose matrices `grouping="hidden"` gives Muon: the model's family's `hidden_blocks`
# (Wan2.1: "blocks."); these, HunyuanVideo15Transformer3DModel's, for a module of no family.
HIDDEN_BLOCKS = HUNYUAN_HIDDEN_BLOCKS


def check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}: expected one of {choices}")


def muon_groups(model, grouping="official"):
    """Split the trainable parameters: (muon, adamw), two lists of (name, parameter).

    official: every 2-D parameter to Muon (embeddings, output projection and LoRA matrices
    included); hidden: only 2-D parameters inside the family's hidden blocks (`HIDDEN_BLOCKS`
    for a module of no family). The rest goes to AdamW.
    """
    check_choice("grouping", grouping, GROUPINGS)
    family = family_of_transformer(model)
    hidden_blocks = family.hidden_blocks if family is not None else HIDDEN_BLOCKS
    muon, adamw = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        in_blocks = any(block in name for block in hidden_blocks)
        use_muon = parameter.ndim == 2 and (grouping == "official" or in_blocks)
        (muon if use_muon else adamw).append((name, parameter))
    return muon, adamw


def newton_schulz(matrix, ns_coefficients, ns_steps, eps):
    """torch's NS_k in bf16, except that an all-zero matrix returns its bf16 zeros at once: NS_k(0) = 0 exactly
    (0 / max(‖0‖, eps), then products of zeros), and such a matrix is common, the momentum of a weight that never
    gets a gradient (the tiny models' byT5 glyph projector, 2048 x 2048: its NS takes minutes in bf16 on a CPU
    without AVX-512)."""
    if matrix.device.type != "meta" and not bool(matrix.any()):  # plan.py steps on meta tensors: shapes only
        return torch.zeros_like(matrix, dtype=torch.bfloat16)
    return _zeropower_via_newtonschulz(matrix, ns_coefficients, ns_steps, eps)


def orthogonalize(update, ns_coefficients, ns_steps, eps):
    """NS_k of the whole matrix (A, B) -> (A, B), in bf16. A DTensor (an FSDP2 shard) is all-gathered,
    orthogonalised on every rank (the same input gives the same result) and cut back to its shard."""
    if not isinstance(update, DTensor):
        return newton_schulz(update, ns_coefficients, ns_steps, eps)
    whole = newton_schulz(update.full_tensor(), ns_coefficients, ns_steps, eps)
    # src_data_rank=None: every rank cuts its own rows from its own copy, no communication
    return distribute_tensor(whole, update.device_mesh, update.placements, src_data_rank=None)


class ShardedMuon(torch.optim.Muon):
    """torch.optim.Muon whose Newton-Schulz sees the whole matrix when the parameter is sharded."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, buffers = [], [], []
            self._init_group(group, params, grads, buffers)
            lr, momentum = float(group["lr"]), group["momentum"]
            for param, grad, buffer in zip(params, grads, buffers):
                # B <- μ·B + (1 - μ)·G  (on the local shard)
                buffer.lerp_(grad, 1 - momentum)
                # U = (1 - μ)·G + μ·B  (Nesterov) or B
                update = grad.lerp(buffer, momentum) if group["nesterov"] else buffer
                # O = NS(U) of the whole matrix
                update = orthogonalize(update, group["ns_coefficients"], group["ns_steps"], group["eps"])
                # W <- (1 - lr·λ)·W - lr·adjust(A, B)·O   (param.shape is the global shape of a DTensor)
                param.mul_(1 - lr * group["weight_decay"])
                param.add_(update, alpha=-_adjust_lr(lr, group["adjust_lr_fn"], param.shape))
        return loss


class MuonWithAdamW(torch.optim.Optimizer):
    """One optimizer over a ShardedMuon part and an AdamW part (either may be absent).

    param_groups are the parts' own group dicts (Muon's first), so a learning-rate change reaches
    them; the parts share this object's `state`, so state_dict()/load_state_dict() (and DCP's
    get_/set_optimizer_state_dict) cover both.
    """

    def __init__(self, muon_params, adamw_params, lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY,
                 momentum=MUON_MOMENTUM, adjust_lr_fn=MUON_ADJUST_LR, adamw_betas=MUON_ADAMW_BETAS, adamw_eps=ADAMW_EPS):
        muon_params, adamw_params = list(muon_params), list(adamw_params)
        if not muon_params and not adamw_params:
            raise ValueError("MuonWithAdamW got no parameters: expected at least one trainable parameter")
        self.parts = []
        if muon_params:
            self.parts.append(ShardedMuon(muon_params, lr=lr, weight_decay=weight_decay, momentum=momentum,
                                          adjust_lr_fn=adjust_lr_fn))
        if adamw_params:
            self.parts.append(torch.optim.AdamW(adamw_params, lr=lr, betas=adamw_betas, eps=adamw_eps,
                                                weight_decay=weight_decay, fused=_fused(adamw_params)))
        super().__init__([group for part in self.parts for group in part.param_groups], {"lr": lr})
        self._link_parts()

    def _link_parts(self):
        """Point every part at this optimizer's groups and state (after __init__ and load_state_dict)."""
        start = 0
        for part in self.parts:
            count = len(part.param_groups)
            part.param_groups = self.param_groups[start:start + count]
            part.state = self.state
            start += count

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)   # replaces self.param_groups and self.state
        self._link_parts()

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for part in self.parts:
            part.step()
        return loss


def build_optimizer(model, kind="muon", lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY, grouping="official",
                    momentum=MUON_MOMENTUM, adjust_lr_fn=MUON_ADJUST_LR):
    """The optimizer of the trainable parameters of `model` (plain or FSDP2-sharded).

    kind "muon": MuonWithAdamW with `muon_groups(model, grouping)`; kind "adamw": torch AdamW on all.
    """
    check_choice("optimizer kind", kind, OPTIMIZERS)
    if kind == "adamw":
        trainable = [p for p in model.parameters() if p.requires_grad]
        return torch.optim.AdamW(trainable, lr=lr, betas=ADAMW_BETAS, eps=ADAMW_EPS, weight_decay=weight_decay,
                                 fused=_fused(trainable))
    muon, adamw = muon_groups(model, grouping)
    return MuonWithAdamW([p for _, p in muon], [p for _, p in adamw], lr=lr, weight_decay=weight_decay,
                         momentum=momentum, adjust_lr_fn=adjust_lr_fn)


# ------------------------------------------------------------------------------------------------
# EMA of the trained weights (--ema_decay).

class WeightEMA:
    """An exponential moving average of the trained weights, updated after every optimizer step:

        θ_ema <- d·θ_ema + (1 − d)·θ        (d = --ema_decay; FlowGRPO's and Flow-Factory's ema)

    starting from the weights the run starts with. GRPO's policy moves with the noise of each 16-video batch; the
    average is a smoother model to evaluate and to release (docs/cost_options.md). Each average is a copy of a
    trained parameter as the policy holds it (fp32; with FSDP2 a DTensor shard), so it is sharded like the policy,
    costs one fp32 copy of the trainable weights per GPU divided by the world size, and is updated without
    communication. `state_dict()` names the averages as the policy's state dict names its parameters, so that
    torch.distributed.checkpoint saves and loads them like the optimizer's state (exact resume) and the
    checkpoint exports them in diffusers format (distributed.save_transformer's `replace`).
    """

    def __init__(self, module, decay):
        if not 0 < decay < 1:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        named = [(name, p) for name, p in module.named_parameters() if p.requires_grad]
        self.names = [name for name, _ in named]
        self.params = [p for _, p in named]
        self.averages = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self):
        for average, p in zip(self.averages, self.params):
            average.lerp_(p.detach(), 1 - self.decay)   # d·average + (1 − d)·θ

    def state_dict(self):
        """{parameter name: average}: the tensors themselves (loading into them restores the average in place)."""
        return dict(zip(self.names, self.averages))
