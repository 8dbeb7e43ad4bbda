"""SAGE-GRPO post-training of HunyuanVideo-1.5 against the VideoAlign reward (DESIGN.md §4-7).

One iteration, straight through (the banners in `_train` follow it):

    ROLLOUT    G videos per prompt with the SDE kernel (`--kernel sage`); a group may span ranks;
               every sample has its own seed, a function of (seed, iteration, global sample index)
    REWARD     decode, score with VideoAlign: r = w_vq·VQ + w_mq·MQ + w_ta·TA (NaN = failed video)
    ADVANTAGE  all-gather the rewards, group statistics over the whole group (grpo.group_advantages)
    UPDATE     equalized clipped policy loss + β·dual KL over the trained denoising steps (all N in a
               per-sample random order by default), gradients accumulated over those steps;
               `--updates_per_rollout` optimizer updates per rollout; a non-finite loss or gradient
               skips the update
    ANCHOR     hard copy policy -> anchor every `--anchor_period` optimizer updates
    LOG        tqdm on rank 0 and a JSONL file (output_dir/metrics.jsonl); sample videos
    CHECKPOINT atomic (temp dir + rename): diffusers-format transformer, optimizer, anchor, RNG,
               sampler position; `--resume` continues exactly

Launch (the data directory holds the diffusers-format HunyuanVideo-1.5 480p T2V checkpoint and the
VideoAlign checkpoint, both local; nothing is ever downloaded):

    # 1 GPU (one group of G = 4 videos per iteration needs 4 videos on the one rank)
    python train.py --model_path ckpts/HunyuanVideo-1.5-480p_t2v --reward_path ckpts/VideoReward \\
        --prompts prompts/example.txt --output_dir runs/sage --videos_per_rank 4
    # 8 GPUs on one node (the paper's per-node setting)
    torchrun --standalone --nproc_per_node 8 train.py --model_path ... --reward_path ... --prompts ...
    # 8 nodes x 8 GPUs = 64 (the recommended setting): run on every node, NODE_RANK = 0..7,
    # MASTER_ADDR = node 0's address; output_dir must be on a filesystem every node sees
    torchrun --nnodes 8 --nproc_per_node 8 --node_rank $NODE_RANK --rdzv_id sage \\
        --rdzv_backend c10d --rdzv_endpoint $MASTER_ADDR:29500 train.py --model_path ... (same flags)
    # no weights, CPU: the same code on random tiny models built on the fly (gloo backend)
    torchrun --standalone --nproc_per_node 2 train.py --tiny --num_steps 4 --max_iterations 4 --output_dir runs/tiny
    # resume from the newest complete checkpoint in output_dir (same flags, plus --resume)
    torchrun --standalone --nproc_per_node 8 train.py ... --resume

Parallelism. Data parallel over ranks, parameters sharded with FSDP2 (`fully_shard` per transformer
block, then the root) on an explicit 1-D device mesh; bf16 compute with fp32 master weights
(MixedPrecisionPolicy) on CUDA; gradient checkpointing; the anchor is sharded the same way, in the
compute dtype, and optionally offloaded to CPU (`--anchor_offload`, FSDP2's CPUOffloadPolicy). On
CPU (gloo) FSDP2 works in torch 2.13 and is used unchanged, in fp32. No sequence parallelism (the
official recipe uses sp=2); see the cost model in the README. Loading (`load_policy`): only rank 0
reads the fp32 transformer (33 GB for 8.3B); the others build it on the meta device, shard it and
receive their shards from rank 0, so a node holds one full host copy, not one per rank.

Loss normalisation. The loss is the mean over the valid (sample, trained step) pairs of the
*global* batch: each rank divides its sum by the global count and FSDP averages gradients over
ranks, so 2 ranks x 2 videos gives the same update as 1 rank x 4 videos (tested).

Departures from the official code (Tencent-Hunyuan/SAGE-GRPO post_train.py): AdamW instead of its
default Muon; failed rewards are excluded instead of set to 0 (DESIGN.md §4); β follows the
two-stage schedule instead of the official adaptive controller (DESIGN.md §5); no sequence
parallelism.
"""
import argparse
import ast
import copy
import csv
import dataclasses
import inspect
import json
import math
import os
import random
import re
import resource
import shutil
import time
import typing
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from tqdm import tqdm

import equalizer
import grpo
import sde
import trust_region


@dataclass
class Config:
    # --- paths and run
    model_path: str = ""
    """local diffusers-format HunyuanVideo-1.5 directory (transformer/, vae/, text_encoder/, ...); never downloaded"""
    reward_path: str = ""
    """local VideoAlign (VideoReward) checkpoint directory; never downloaded"""
    prompts: str = "prompts/example.txt"
    """prompt file: .txt (one per line), .csv (column `prompt`) or .jsonl ({"prompt": ...})"""
    output_dir: str = "runs/sage_grpo"
    """checkpoints, metrics.jsonl and sample videos go here (shared filesystem for multi-node)"""
    resume: bool = False
    """continue exactly from the newest complete checkpoint in output_dir"""
    allow_config_change: bool = False
    """with --resume, accept flags that differ from the checkpoint's (otherwise an error lists them)"""
    tiny: bool = False
    """random tiny HunyuanVideo-1.5 and VideoAlign built on the fly, CPU, gloo: the pipeline without weights"""
    seed: int = 42
    """base seed of prompt order, rollout noise and step order (official post_train.py: 42)"""
    max_iterations: int = 10000
    """number of rollout iterations (official max_steps 10000)"""
    # --- sampling (rollouts)
    num_steps: int = 20
    """denoising steps N per rollout (paper / official grpo_sampling_steps 20)"""
    shift: float = 5.0
    """schedule shift s, σ <- sσ/(1+(s-1)σ) (HunyuanVideo-1.5 480p T2V; official infer_flow_shift_video 5)"""
    eta: float = 0.5
    """noise level η of the SDE kernel (paper / official eta 0.5)"""
    kernel: str = "sage"
    """transition kernel: sage | flow_grpo | dance_grpo | cps (sde.KERNELS; ode has no exploration)"""
    cfg_scale: float = 6.0
    """classifier-free guidance scale (official cfg_scale 6)"""
    num_frames: int = 81
    """video frames, 4k+1 (official sample_n_frames 81)"""
    height: int = 352
    """video height in pixels, multiple of 16 (official 480p bucket: 352x624)"""
    width: int = 624
    """video width in pixels, multiple of 16 (official 480p bucket: 352x624)"""
    # --- GRPO
    group_size: int = 4
    """rollouts per prompt G (official num_generations 4)"""
    videos_per_rank: int = 2
    """rollouts each rank makes per iteration (official batch_size 2)"""
    clip_range: float = grpo.CLIP_RANGE
    """PPO clip ε on the per-step ratio (official clip_range 1e-4)"""
    adv_clip: float = grpo.ADVANTAGE_CLIP
    """advantage clamp (official adv_clip_max 5)"""
    train_step_fraction: float = 1.0
    """fraction of the N steps trained per sample, in a per-sample random order (official timestep_fraction 1.0)"""
    equalizer: bool = True
    """gradient-norm equalizer S_t on the policy loss (official use_grad_balancing True)"""
    updates_per_rollout: int = 1
    """optimizer updates per rollout; > 1 makes the clip and the step-wise KL act (official 1)"""
    # --- trust region
    kl_mode: str = "dual"
    """none | fixed | step | moving | dual (official use_moving_KL + use_dual_kl = dual)"""
    anchor_period: int = trust_region.ANCHOR_PERIOD
    """optimizer updates between hard copies policy -> anchor (official update_ref_model_step 10)"""
    kl_anchor_weight: float = trust_region.ANCHOR_WEIGHT
    """weight of KL(π_θ‖π_anchor) in L_KL (official dual_kl_moving_weight 1.0)"""
    kl_step_weight: float = trust_region.STEP_WEIGHT
    """weight of KL(π_θ‖π_old) in L_KL (official dual_kl_step_weight 0.1)"""
    beta_start: float = trust_region.BETA_START
    """β before beta_switch_step (official kl_coef 1e-7)"""
    beta_end: float = trust_region.BETA_END
    """β from beta_switch_step on (official kl_weight 1e-5)"""
    beta_switch_step: int = 100
    """optimizer update at which β switches; our choice: the paper gives the two values, not the switch point"""
    anchor_offload: bool = False
    """keep the anchor's shards on CPU (FSDP2 CPUOffloadPolicy; official reference_mode_offload)"""
    text_encoder_offload: bool = False
    """keep the text encoders (Qwen2.5-VL-7B: 15 GB bf16) on CPU, on the GPU only while encoding prompts; our choice"""
    # --- reward
    w_vq: float = 0.5
    """weight of VideoAlign visual quality (paper setting B / official reward_weights VQ 0.5)"""
    w_mq: float = 0.5
    """weight of VideoAlign motion quality (official MQ 0.5)"""
    w_ta: float = 1.0
    """weight of VideoAlign text alignment (official TA 1.0)"""
    # --- optimisation
    lr: float = 1e-5
    """AdamW learning rate (official learning_rate 1e-5)"""
    weight_decay: float = 0.01
    """AdamW weight decay (official 0.01)"""
    grad_clip: float = 1.0
    """global gradient-norm clip (official max_grad_norm 1.0)"""
    lora_rank: int = 0
    """0 = full fine-tune (official default); > 0 trains LoRA adapters of this rank (needs peft)"""
    gradient_checkpointing: bool = True
    """recompute block activations in backward (official enable_gradient_checkpointing)"""
    # --- logging and checkpoints
    checkpoint_every: int = 100
    """iterations between checkpoints (official save_interval 100); the last iteration is always saved"""
    keep_checkpoints: int = 1
    """newest complete checkpoints kept; older ones are deleted once a newer one is complete (ours: disk)"""
    sample_every: int = 50
    """iterations between saved sample videos (official validation_interval 50); 0 = never"""


def _field_docs(cls):
    """{field: the string literal under it} (cleanrl-style field docs, reused as --help)."""
    body = ast.parse(inspect.getsource(cls)).body[0].body
    return {a.target.id: b.value.value for a, b in zip(body, body[1:])
            if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant)}


def parse_config(argv=None, cls=Config, description=__doc__):
    """Every field of the config dataclass is a flag: --name value; booleans --name / --no-name; lists nargs."""
    parser = argparse.ArgumentParser(description=description.splitlines()[0])
    docs = _field_docs(cls)
    for field in dataclasses.fields(cls):
        default = field.default_factory() if field.default is dataclasses.MISSING else field.default
        help = f"{docs.get(field.name, '')} (default: {default})"
        if field.type is bool:
            parser.add_argument(f"--{field.name}", action=argparse.BooleanOptionalAction, default=default, help=help)
        elif typing.get_origin(field.type) is list:
            parser.add_argument(f"--{field.name}", nargs="*", type=typing.get_args(field.type)[0], default=default, help=help)
        else:
            parser.add_argument(f"--{field.name}", type=field.type, default=default, help=help)
    return cls(**vars(parser.parse_args(argv)))


# ------------------------------------------------------------------------------------------------
# Input checks: every one runs before a model is loaded or a GPU touched.

def load_prompts(path):
    """Prompts from .txt (one per line), .csv (column `prompt`) or .jsonl ({"prompt": ...})."""
    if not os.path.isfile(path) and os.path.isfile(os.path.join(os.path.dirname(os.path.abspath(__file__)), path)):
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), path)  # the default, from any directory
    if not os.path.isfile(path):
        raise ValueError(f"prompt file {path!r} does not exist")
    ext = os.path.splitext(path)[1].lower()
    with open(path, encoding="utf-8") as f:
        if ext == ".txt":
            prompts = [line.strip() for line in f]
        elif ext == ".csv":
            reader = csv.DictReader(f)
            if "prompt" not in (reader.fieldnames or []):
                raise ValueError(f"prompt file {path!r}: expected a CSV column 'prompt', found columns {reader.fieldnames}")
            prompts = [row["prompt"].strip() for row in reader]
        elif ext == ".jsonl":
            prompts = [json.loads(line)["prompt"].strip() for line in f if line.strip()]
        else:
            raise ValueError(f"prompt file {path!r}: expected a .txt, .csv or .jsonl file, found {ext or 'no extension'!r}")
    prompts = [p for p in prompts if p]
    if not prompts:
        raise ValueError(f"prompt file {path!r} contains no prompts")
    return prompts


def check_config(cfg, world_size):
    """Raise ValueError with what was expected and what was found; returns the prompts."""
    if not cfg.tiny:
        for name in ("model_path", "reward_path"):
            path = getattr(cfg, name)
            if not path:
                raise ValueError(f"--{name} is required (a local directory; weights are never downloaded), or use --tiny")
            if not os.path.isdir(path):
                raise ValueError(f"--{name} {path!r} is not a directory")
        if not os.path.isdir(os.path.join(cfg.model_path, "transformer")):
            raise ValueError(f"--model_path {cfg.model_path!r} is not a diffusers HunyuanVideo-1.5 directory: "
                             f"expected a 'transformer' subdirectory, found {sorted(os.listdir(cfg.model_path))[:8]}")
    sde.check_kernel(cfg.kernel)
    if cfg.kernel == "ode":
        raise ValueError(f"unknown kernel 'ode' for training: expected one of {[k for k in sde.KERNELS if k != 'ode']} "
                         "(ode has no noise, hence nothing to explore)")
    trust_region.check_kl_mode(cfg.kl_mode)
    if cfg.group_size < 2:
        raise ValueError(f"group_size must be >= 2 (a group of one has no baseline), got {cfg.group_size}")
    if cfg.videos_per_rank < 1:
        raise ValueError(f"videos_per_rank must be >= 1, got {cfg.videos_per_rank}")
    videos = world_size * cfg.videos_per_rank
    if videos % cfg.group_size:
        raise ValueError(f"world_size x videos_per_rank = {world_size} x {cfg.videos_per_rank} = {videos} videos per "
                         f"iteration cannot hold whole groups of group_size {cfg.group_size}: it must be a multiple of it")
    if not 0 < cfg.train_step_fraction <= 1:
        raise ValueError(f"train_step_fraction must be in (0, 1], got {cfg.train_step_fraction}")
    if not cfg.eta > 0:
        raise ValueError(f"eta must be > 0 for exploration, got {cfg.eta}")
    if (cfg.num_frames - 1) % 4 or cfg.height % 16 or cfg.width % 16:
        raise ValueError(f"video must be 4k+1 frames and a multiple of 16 pixels (VAE 4x temporal, 16x spatial), "
                         f"got {cfg.num_frames} frames at {cfg.height}x{cfg.width}")
    for name in ("num_steps", "updates_per_rollout", "anchor_period", "checkpoint_every", "keep_checkpoints", "max_iterations"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.lora_rank < 0:
        raise ValueError(f"lora_rank must be >= 0 (0 = full fine-tune), got {cfg.lora_rank}")
    if cfg.lora_rank > 0:
        try:
            import peft  # noqa: F401
        except ImportError:
            raise ValueError("--lora_rank > 0 needs the optional dependency peft (pip install peft)") from None
    if cfg.resume and latest_checkpoint(cfg.output_dir) is None:
        raise ValueError(f"--resume: no complete checkpoint (checkpoint-NNNNNN/) in {cfg.output_dir!r}")
    if cfg.resume and not cfg.allow_config_change:
        check_resume_config(cfg, latest_checkpoint(cfg.output_dir))
    return load_prompts(cfg.prompts)


# Flags that may change between a run and its resumption without breaking "continues exactly".
RESUMABLE_CHANGES = {"resume", "allow_config_change", "max_iterations", "checkpoint_every", "keep_checkpoints",
                     "sample_every", "output_dir", "model_path", "reward_path", "prompts", "text_encoder_offload", "anchor_offload"}


def check_resume_config(cfg, checkpoint):
    """A resumed run must use the checkpoint's settings: list every flag that differs."""
    with open(os.path.join(checkpoint, "trainer_state.json")) as f:
        saved = json.load(f).get("config", {})
    if cfg.tiny:  # --tiny stores the tiny video size it substituted for the defaults
        saved.update({k: getattr(cfg, k) for k in ("num_frames", "height", "width")
                      if getattr(cfg, k) == getattr(Config, k)})
    changed = {k: (saved[k], v) for k, v in dataclasses.asdict(cfg).items()
               if k in saved and k not in RESUMABLE_CHANGES and saved[k] != v}
    if changed:
        listing = ", ".join(f"--{k} {new!r} (checkpoint: {old!r})" for k, (old, new) in sorted(changed.items()))
        raise ValueError(f"--resume from {checkpoint!r} with different settings: {listing}; "
                         "use the checkpoint's flags, or add --allow_config_change to continue anyway")


# ------------------------------------------------------------------------------------------------
# Distributed plumbing.

def setup_distributed(cfg):
    """(rank, world_size, device, mesh). Without torchrun: a world of one (in-memory store, no port)."""
    cuda = torch.cuda.is_available() and not cfg.tiny
    if "RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    else:
        device = torch.device("cuda", 0) if cuda else torch.device("cpu")
        dist.init_process_group("nccl" if cuda else "gloo", store=dist.HashStore(), rank=0, world_size=1)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    return dist.get_rank(), dist.get_world_size(), device, mesh


def shard(transformer, mesh, param_dtype, offload=False):
    """FSDP2: one shard group per transformer block, then the root (embedders, refiner, head)."""
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    offload_policy = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if offload else OffloadPolicy()
    for block in transformer.transformer_blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp, offload_policy=offload_policy)
    fully_shard(transformer, mesh=mesh, mp_policy=mp, offload_policy=offload_policy)
    return transformer


def load_policy(Transformer, path, cfg, mesh, device, rank, compute_dtype):
    """The sharded fp32 policy and (if the KL mode has one) the sharded anchor, from path/transformer.

    Rank 0 alone reads the weights (fp32, CPU); every rank builds the module on the meta device
    (no memory), shards it, allocates only its own shards (to_empty) and receives them from rank 0
    (set_model_state_dict with broadcast_from_rank0). The anchor is built the same way and filled from
    the policy's shards by MovingAnchor.refresh, so host memory holds one full copy, on rank 0.
    Returns (policy, anchor_module or None).
    """
    def prepare(transformer):  # identical on every rank: LoRA adapters or full fine-tune, checkpointing
        if cfg.lora_rank > 0:
            from peft import LoraConfig
            transformer.requires_grad_(False)
            # lora_alpha = r: the adapter adds B·A unscaled (LORA_SCALE = alpha / r = 1) at any rank
            transformer.add_adapter(LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_rank, init_lora_weights=True,
                                               target_modules=["to_q", "to_k", "to_v", "to_out.0", "add_q_proj",
                                                               "add_k_proj", "add_v_proj", "to_add_out"]))
        else:
            transformer.requires_grad_(True)
        if cfg.gradient_checkpointing:
            transformer.enable_gradient_checkpointing()
        return transformer

    path = os.path.join(path, "transformer")
    # rank 0's module holds the LoRA initialisation too, so every rank receives the same adapters
    full_state = prepare(Transformer.from_pretrained(path, torch_dtype=torch.float32)).state_dict() if rank == 0 else {}
    with torch.device("meta"):
        policy = prepare(Transformer.from_config(Transformer.load_config(path)))
    uninitialised = sorted(set(dict(policy.named_buffers())) - set(policy.state_dict()))
    if uninitialised:  # to_empty leaves them garbage and the broadcast does not carry them
        raise NotImplementedError(f"non-persistent buffers {uninitialised[:5]} would not be initialised by the "
                                  f"rank-0 broadcast load")
    w_anchor, _ = trust_region.kl_weights(cfg.kl_mode, cfg.kl_anchor_weight, cfg.kl_step_weight)
    anchor_module = None
    if w_anchor > 0:  # same structure, compute dtype, sharded the same way (optionally on CPU)
        anchor_module = copy.deepcopy(policy).to(compute_dtype).requires_grad_(False).eval()
        shard(anchor_module, mesh, None, offload=cfg.anchor_offload)
        anchor_module.to_empty(device="cpu" if cfg.anchor_offload else device)  # values: MovingAnchor.refresh
    shard(policy, mesh, compute_dtype if device.type == "cuda" else None)
    policy.to_empty(device=device)
    set_model_state_dict(policy, full_state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    return policy, anchor_module


def all_gather_cat(x):
    """Concatenate a [B, ...] tensor over ranks in rank order -> [W·B, ...]."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def all_reduce_sum(x):
    x = x.clone()
    dist.all_reduce(x)
    return x


class PromptSampler:
    """Prompt indices per iteration, identical on every rank; a fresh permutation every epoch.

    Each iteration takes `per_iteration` prompts (the global number of groups); an epoch is one
    pass over the file; the order of epoch e is randperm(seed + e), so (epoch, position) is the
    whole state and resuming continues the same sequence.
    """

    def __init__(self, num_prompts, per_iteration, seed):
        self.num_prompts, self.per_iteration, self.seed = num_prompts, per_iteration, seed
        self.epoch, self.position = 0, 0

    def _order(self):
        return torch.randperm(self.num_prompts, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()

    def next_indices(self):
        indices, order = [], self._order()
        while len(indices) < self.per_iteration:
            indices.append(order[self.position])
            self.position += 1
            if self.position == self.num_prompts:  # next epoch, next permutation
                self.epoch, self.position = self.epoch + 1, 0
                order = self._order()
        return indices

    def state_dict(self):
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state):
        self.epoch, self.position = state["epoch"], state["position"]


def sample_seed(seed, iteration, index, videos_per_iteration):
    """Seed of global sample `index` at `iteration`: independent of how samples are split over ranks."""
    return seed * 1_000_003 + iteration * videos_per_iteration + index


def trained_steps(seeds, num_steps, fraction):
    """Per-sample random order of the N steps, first ceil(fraction·N) kept -> LongTensor [B, K]."""
    keep = max(1, math.ceil(fraction * num_steps))
    return torch.stack([torch.randperm(num_steps, generator=torch.Generator().manual_seed(s + 1))[:keep] for s in seeds])


# ------------------------------------------------------------------------------------------------
# Checkpoints: checkpoint-NNNNNN/ exists only once complete (written as .tmp, then renamed).

def latest_checkpoint(output_dir):
    if not os.path.isdir(output_dir):
        return None
    done = sorted(d for d in os.listdir(output_dir) if d.startswith("checkpoint-") and not d.endswith(".tmp"))
    return os.path.join(output_dir, done[-1]) if done else None


# Largest safetensors file of a saved transformer (diffusers' own save_pretrained default): the 8.3B
# fp32 policy becomes 7 shards + an index instead of one 33 GB file.
MAX_SHARD_SIZE = "5GB"
# LoRA scale alpha / r of the adapters train.py adds (lora_alpha = r, our choice): merged as W + B·A.
LORA_SCALE = 1.0


def save_transformer(transformer, path, rank, max_shard_size=MAX_SHARD_SIZE, lora_scale=None):
    """Gather the full (fp32 master) state and write it in diffusers layout (rank 0): safetensors
    shards and, when there is more than one, the index diffusers' from_pretrained reads. With LoRA
    (`lora_scale` = alpha / r) the adapters are merged in, so the result is a plain transformer."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file
    state = get_model_state_dict(transformer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if lora_scale is not None:  # PEFT keys name the adapter (`lora_A.default.weight`): drop it, then fold
        from reward import merge_lora
        state = merge_lora({re.sub(r"\.default(?=\.|$)", "", k): v for k, v in state.items()}, lora_scale)
    if rank == 0:
        os.makedirs(path, exist_ok=True)
        transformer.save_config(path)
        split = split_torch_state_dict_into_shards(state, filename_pattern="diffusion_pytorch_model{suffix}.safetensors",
                                                   max_shard_size=max_shard_size)
        for filename, keys in split.filename_to_tensors.items():
            save_file({k: state[k].contiguous() for k in keys}, os.path.join(path, filename))
        if split.is_sharded:
            with open(os.path.join(path, "diffusion_pytorch_model.safetensors.index.json"), "w") as f:
                json.dump({"metadata": split.metadata, "weight_map": split.tensor_to_filename}, f, indent=1)


def save_checkpoint(cfg, iteration, trainer_state, policy, optimizer, anchor, rank):
    """checkpoint-NNNNNN/: transformer/ (diffusers layout; with LoRA a sharded policy/ instead),
    optimizer/ and anchor/ (sharded), rng.pt, trainer_state.json.  Written to .tmp, then renamed."""
    final = os.path.join(cfg.output_dir, f"checkpoint-{iteration:06d}")
    tmp = final + ".tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier()
    if cfg.lora_rank > 0:  # adapters + frozen base, sharded, for --resume; transformer/ gets the merged weights
        dcp.save({"policy": get_model_state_dict(policy)}, checkpoint_id=os.path.join(tmp, "policy"))
    save_transformer(policy, os.path.join(tmp, "transformer"), rank,
                     lora_scale=LORA_SCALE if cfg.lora_rank > 0 else None)
    # optimizer and anchor: sharded (each rank writes its shard), torch.distributed.checkpoint
    dcp.save({"optimizer": get_optimizer_state_dict(policy, optimizer)}, checkpoint_id=os.path.join(tmp, "optimizer"))
    if anchor is not None:
        dcp.save({"anchor": get_model_state_dict(anchor.anchor)}, checkpoint_id=os.path.join(tmp, "anchor"))
    rng = {"torch": torch.get_rng_state(), "python": random.getstate(),
           "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
    rngs = [None] * dist.get_world_size()
    dist.all_gather_object(rngs, rng)
    if rank == 0:
        torch.save(rngs, os.path.join(tmp, "rng.pt"))
        with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
            json.dump({**trainer_state, "config": dataclasses.asdict(cfg)}, f, indent=1)
    dist.barrier()
    if rank == 0:
        os.rename(tmp, final)  # atomic: until here the previous checkpoint is the newest complete one
        complete = sorted(d for d in os.listdir(cfg.output_dir) if d.startswith("checkpoint-") and not d.endswith(".tmp"))
        for old in complete[:-cfg.keep_checkpoints]:
            shutil.rmtree(os.path.join(cfg.output_dir, old))
    dist.barrier()
    return final


def load_checkpoint(path, policy, optimizer, anchor, rank):
    """Optimizer, anchor, RNG and trainer state from `path`; the policy weights too if they are sharded
    (LoRA), otherwise they were loaded from path/transformer when the policy was built."""
    if os.path.isdir(os.path.join(path, "policy")):
        state = {"policy": get_model_state_dict(policy)}
        dcp.load(state, checkpoint_id=os.path.join(path, "policy"))
        set_model_state_dict(policy, state["policy"])
    state = {"optimizer": get_optimizer_state_dict(policy, optimizer)}
    # partial: parameters that never had a gradient (e.g. the text-stream output of the last block,
    # whose result nothing reads) have no Adam state in the checkpoint, and AdamW leaves them alone
    dcp.load(state, checkpoint_id=os.path.join(path, "optimizer"), planner=DefaultLoadPlanner(allow_partial_load=True))
    set_optimizer_state_dict(policy, optimizer, state["optimizer"])
    if anchor is not None:
        state = {"anchor": get_model_state_dict(anchor.anchor)}
        dcp.load(state, checkpoint_id=os.path.join(path, "anchor"))
        set_model_state_dict(anchor.anchor, state["anchor"])
    rngs = torch.load(os.path.join(path, "rng.pt"), weights_only=False)
    if len(rngs) == dist.get_world_size():
        torch.set_rng_state(rngs[rank]["torch"])
        random.setstate(rngs[rank]["python"])
        if torch.cuda.is_available() and rngs[rank]["cuda"] is not None:
            torch.cuda.set_rng_state(rngs[rank]["cuda"])
    with open(os.path.join(path, "trainer_state.json")) as f:
        return json.load(f)


# The panels of curves.png: (title, metrics.jsonl keys drawn in it).
CURVE_PANELS = (("reward", ("reward_mean", "vq", "mq", "ta")), ("KL terms", ("kl_anchor", "kl_step", "approx_kl")),
                ("clip fraction", ("clip_fraction",)), ("gradient norm", ("grad_norm",)),
                ("groups with equal rewards", ("zero_std_ratio",)), ("seconds per phase", ("time_rollout", "time_reward",
                                                                                          "time_update")))


def plot_metrics(metrics_path, png_path):
    """metrics.jsonl -> a PNG of the curves practitioners watch, one panel each, written atomically."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    with open(metrics_path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    rows = list({r["iteration"]: r for r in rows}.values())  # a resumed run may have logged an iteration twice
    figure, axes = plt.subplots(2, 3, figsize=(13, 6.5))
    for axis, (title, keys) in zip(axes.flat, CURVE_PANELS):
        for key in keys:
            points = [(r["iteration"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
            if points:
                axis.plot(*zip(*points), marker="." if len(points) < 30 else None, label=key)
        axis.set_title(title)
        axis.set_xlabel("iteration")
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(png_path + ".tmp.png", dpi=80)
    plt.close(figure)
    os.replace(png_path + ".tmp.png", png_path)


def save_video(frames, path):
    """frames: (F, H, W, 3) uint8. mp4 if imageio-ffmpeg is installed, otherwise a PNG grid of frames."""
    try:
        import imageio.v2 as imageio
        import imageio_ffmpeg  # noqa: F401
        os.makedirs(os.path.dirname(path), exist_ok=True)
        imageio.mimwrite(path + ".mp4", list(frames.numpy()), fps=24)
        return path + ".mp4"
    except ImportError:
        from PIL import Image
        os.makedirs(os.path.dirname(path), exist_ok=True)
        f, h, w, _ = frames.shape
        cols = min(f, 8)
        rows = math.ceil(f / cols)
        grid = torch.zeros(rows * h, cols * w, 3, dtype=torch.uint8)
        for i in range(f):
            grid[(i // cols) * h:(i // cols + 1) * h, (i % cols) * w:(i % cols + 1) * w] = frames[i]
        Image.fromarray(grid.numpy()).save(path + ".png")
        return path + ".png"


def peak_memory_gb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux


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


# ------------------------------------------------------------------------------------------------

def main(cfg):
    prompts = check_config(cfg, int(os.environ.get("WORLD_SIZE", 1)))  # bad input fails here, before any model
    import model as hunyuan  # heavy imports (diffusers, transformers) after the checks
    import reward as videoalign
    from diffusers import HunyuanVideo15Transformer3DModel

    rank, world_size, device, mesh = setup_distributed(cfg)
    try:
        _train(cfg, prompts, rank, world_size, device, mesh, hunyuan, videoalign, HunyuanVideo15Transformer3DModel)
    finally:
        dist.destroy_process_group()


def _train(cfg, prompts, rank, world_size, device, mesh, hunyuan, videoalign, Transformer):
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    model_path, reward_path = cfg.model_path, cfg.reward_path
    if cfg.tiny:  # random tiny models in the real on-disk layouts, loaded by the same code as real ones
        model_path = model_path or os.path.join(cfg.output_dir, "tiny_hunyuan")
        reward_path = reward_path or os.path.join(cfg.output_dir, "tiny_videoalign")
        if rank == 0 and not os.path.isdir(model_path):
            hunyuan.build_tiny_hunyuan(model_path)
        if rank == 0 and not os.path.isdir(reward_path):
            videoalign.build_tiny_videoalign(reward_path)
        dist.barrier()
        if (cfg.num_frames, cfg.height, cfg.width) == (Config.num_frames, Config.height, Config.width):
            # the real model's video size is far too big for a CPU: use the tiny one unless the user chose a size
            cfg = dataclasses.replace(cfg, num_frames=hunyuan.TINY_NUM_FRAMES, height=hunyuan.TINY_HEIGHT,
                                      width=hunyuan.TINY_WIDTH)
    compute_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    checkpoint = latest_checkpoint(cfg.output_dir) if cfg.resume else None
    os.makedirs(cfg.output_dir, exist_ok=True)

    # Frozen parts (text encoders, VAE) in the compute dtype; the policy in fp32 (master weights),
    # from the checkpoint when resuming. The pipeline is loaded without its transformer: the policy's
    # weights are read once, by rank 0 (load_policy).
    pipe = hunyuan.load_hunyuan(model_path, device="cpu", dtype=compute_dtype, load_transformer=False)
    policy_path = checkpoint if checkpoint and cfg.lora_rank == 0 else model_path
    policy, anchor_module = load_policy(Transformer, policy_path, cfg, mesh, device, rank, compute_dtype)
    text_encoders = (pipe.pipeline.text_encoder, pipe.pipeline.text_encoder_2)
    for module in (pipe.vae,) + (() if cfg.text_encoder_offload else text_encoders):
        module.to(device)
    trainable = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    anchor = None
    if anchor_module is not None:
        anchor = trust_region.MovingAnchor(policy, trust_region.anchor_period_for(cfg.kl_mode, cfg.anchor_period),
                                           anchor=anchor_module)
    reward_model = videoalign.VideoAlignReward.from_pretrained(reward_path, device=device, dtype=compute_dtype)

    group_size, videos_per_rank = cfg.group_size, cfg.videos_per_rank
    videos_per_iteration = world_size * videos_per_rank
    first = rank * videos_per_rank  # global index of this rank's first sample; samples of a group are contiguous
    sampler = PromptSampler(len(prompts), videos_per_iteration // group_size, cfg.seed)
    sigmas = sde.shifted_sigmas(cfg.num_steps, cfg.shift)  # (N+1,) σ_0 = 1 … σ_N = 0
    latent_shape = pipe.latent_shape(cfg.num_frames, cfg.height, cfg.width)  # (C, F, H, W)
    # S_t per step (equalizer) or 1 per stochastic step; 0 marks a deterministic step (no log-prob)
    step_weights = equalizer.step_weights(cfg.kernel, sigmas, cfg.eta, cfg.equalizer).float().to(device)
    state = {"iteration": 0, "update_step": 0, "skipped_updates": 0}
    if checkpoint:
        state = load_checkpoint(checkpoint, policy, optimizer, anchor, rank)
        sampler.load_state_dict(state["sampler"])
        if anchor is not None:
            anchor.last_refresh = state["anchor_last_refresh"]
    metrics_file = open(os.path.join(cfg.output_dir, "metrics.jsonl"), "a") if rank == 0 else None
    if rank == 0:
        print(f"SAGE-GRPO: world {world_size}, {videos_per_iteration} videos/iteration in groups of {group_size}, "
              f"latent {tuple(latent_shape)}, {sum(p.numel() for p in trainable) / 1e6:.3g}M trainable, "
              f"{'resuming ' + checkpoint if checkpoint else 'from ' + model_path}", flush=True)

    bar = tqdm(range(state["iteration"], cfg.max_iterations), disable=rank != 0, initial=state["iteration"],
               total=cfg.max_iterations, desc="iterations")
    for iteration in bar:
        timer = PhaseTimer(device)
        # ======================================================================== ROLLOUT
        timer("rollout")
        group_prompts = [prompts[i] for i in sampler.next_indices()]  # one prompt per group, all ranks agree
        sample_prompts = [group_prompts[(first + b) // group_size] for b in range(videos_per_rank)]
        seeds = [sample_seed(cfg.seed, iteration, first + b, videos_per_iteration) for b in range(videos_per_rank)]
        unique = list(dict.fromkeys(sample_prompts))  # encode each prompt once, reuse for its G rollouts
        for module in text_encoders if cfg.text_encoder_offload else ():
            module.to(device)
        embeds = hunyuan.encode_prompts(pipe, unique, device=device, dtype=compute_dtype)
        embeds = embeds.select([unique.index(p) for p in sample_prompts])
        for module in text_encoders if cfg.text_encoder_offload else ():
            module.to("cpu")
        with torch.no_grad():
            rollout = hunyuan.rollout(policy, embeds, seeds, latent_shape, sigmas, cfg.kernel, cfg.eta, cfg.cfg_scale)

        # ======================================================================== REWARD
        timer("reward")
        frames = hunyuan.decode_latents(pipe.vae, rollout.final_latents)  # (B, F, 3, H, W) in [0, 1]
        with torch.no_grad():
            scores = reward_model(frames, sample_prompts)  # {"vq", "mq", "ta", ...}: Tensor[B], NaN = failed
        # r = w_vq·VQ + w_mq·MQ + w_ta·TA  (paper setting B)
        reward = (cfg.w_vq * scores["vq"] + cfg.w_mq * scores["mq"] + cfg.w_ta * scores["ta"]).float().to(device)

        # ======================================================================== ADVANTAGE
        timer("advantage")
        rewards = all_gather_cat(reward)  # (W·B,) in global sample order: group g = rewards[gG:(g+1)G]
        all_advantages = grpo.group_advantages(rewards, group_size, cfg.adv_clip)  # (W·B,) NaN = failed reward
        advantages = all_advantages[first:first + videos_per_rank]
        steps = trained_steps(seeds, cfg.num_steps, cfg.train_step_fraction).to(device)  # (B, K)
        pair_weights = step_weights[steps]  # (B, K) S_t of each (sample, trained step)
        valid = torch.isfinite(advantages)[:, None] & (pair_weights > 0)  # pairs that enter the loss
        num_pairs = int(all_reduce_sum(valid.sum()))  # the loss is a mean over the pairs of the global batch

        # ======================================================================== UPDATE
        timer("update")
        # sums over (update, trained step, sample) pairs: loss, policy loss, approx_kl, clip fraction, kl_anchor,
        # kl_step, number of pairs
        sums = torch.zeros(7, dtype=torch.float64)
        ratio_dev = torch.zeros(cfg.num_steps, dtype=torch.float64)  # max |ρ − 1| per denoising step
        grad_norms, skipped_now, refreshed = [], 0, False
        anchor_means = {}  # μ_anchor per trained step k: the anchor forward is reused by every update of this
                           # rollout, until the anchor is refreshed
        beta = trust_region.kl_coefficient(state["update_step"], cfg.beta_start, cfg.beta_end, cfg.beta_switch_step)
        for _ in range(cfg.updates_per_rollout if num_pairs else 0):
            beta = trust_region.kl_coefficient(state["update_step"], cfg.beta_start, cfg.beta_end, cfg.beta_switch_step)
            loss_finite = True
            # gradient accumulation over the trained steps. Gradients are reduce-scattered after every
            # step (not only the last): FSDP2's no-sync mode would hold full unsharded bf16 gradients
            # (16.6 GB for 8.3B) and sum 20 steps in bf16; this way they accumulate sharded, in fp32.
            for k in range(steps.shape[1]):
                step = rollout.transitions(steps[:, k])
                mean, std, log_prob = hunyuan.transition_log_prob(policy, embeds, step.latents, step.next_latents,
                                                                  step.sigma, step.sigma_next, cfg.kernel, cfg.eta,
                                                                  cfg.cfg_scale)
                policy_loss, stats = grpo.clipped_policy_loss(log_prob, step.log_prob, advantages, pair_weights[:, k],
                                                              cfg.clip_range)
                if anchor is not None and k not in anchor_means:
                    with torch.no_grad():
                        anchor_means[k], _, _ = hunyuan.transition_log_prob(anchor.anchor, embeds, step.latents,
                                                                            step.next_latents, step.sigma,
                                                                            step.sigma_next, cfg.kernel, cfg.eta,
                                                                            cfg.cfg_scale)
                # the step-wise term is always measured (μ_old is recorded), weighted only in its modes
                kl, kl_terms = trust_region.dual_kl(mean, std, anchor_means.get(k), step.mean, cfg.kl_mode,
                                                    cfg.kl_anchor_weight, cfg.kl_step_weight)
                mask = valid[:, k]
                kl_sum = torch.where(mask, kl, torch.zeros_like(kl)).sum()
                # mean over the global valid pairs of  loss_it + β·L_KL;  × W undoes FSDP's gradient averaging
                loss = (policy_loss * stats["num_valid_pairs"] + beta * kl_sum) * world_size / num_pairs
                loss.backward()
                loss_value = loss.item()  # one device sync per step, for the skip test and the logs
                loss_finite &= math.isfinite(loss_value)
                with torch.no_grad():
                    n = stats["num_valid_pairs"]
                    anchor_kl = kl_terms.get("kl_anchor", torch.zeros_like(kl))
                    sums += torch.tensor([loss_value * num_pairs / world_size, policy_loss.item() * n,
                                          stats["approx_kl"] * n, stats["clip_fraction"] * n,
                                          anchor_kl[mask].sum().item(), kl_terms["kl_step"][mask].sum().item(), n],
                                         dtype=torch.float64)
                    deviation = torch.where(mask, (log_prob - step.log_prob).exp().sub(1).abs(), 0).double().cpu()
                    ratio_dev.scatter_reduce_(0, steps[:, k].cpu(), deviation, reduce="amax")
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
            grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
            finite = int(all_reduce_sum(torch.tensor(int(loss_finite), device=device))) == world_size
            if finite and math.isfinite(grad_norm):  # a non-finite loss or gradient never reaches the weights
                optimizer.step()
                state["update_step"] += 1
                # ================================================================ ANCHOR
                if anchor is not None and anchor.update_if_due(state["update_step"]):  # hard copy every period
                    refreshed = True
                    anchor_means.clear()  # a new anchor: its means must be recomputed
            else:
                skipped_now += 1
                state["skipped_updates"] += 1
            optimizer.zero_grad(set_to_none=True)
            grad_norms.append(grad_norm)

        # ======================================================================== LOG
        timer("log")
        sums = all_reduce_sum(sums.to(device)).cpu()
        ratio_dev = ratio_dev.to(device)
        dist.all_reduce(ratio_dev, op=dist.ReduceOp.MAX)
        pairs = max(sums[6].item(), 1.0)
        stats = grpo.reward_stats(rewards.cpu(), group_size)
        gathered = {k: all_gather_cat(scores[k].float().to(device)) for k in ("vq", "mq", "ta")}
        metrics = {
            "iteration": iteration + 1, "update_step": state["update_step"], "unix_time": time.time(), **stats,
            **{k: v.nanmean().item() for k, v in gathered.items()},
            "advantage_abs_mean": all_advantages.nan_to_num().abs().mean().item(),
            "loss": sums[0].item() / pairs,
            "policy_loss": sums[1].item() / pairs, "approx_kl": sums[2].item() / pairs,
            "clip_fraction": sums[3].item() / pairs, "kl_anchor": sums[4].item() / pairs,
            "kl_step": sums[5].item() / pairs, "beta": beta, "grad_norm": grad_norms[-1] if grad_norms else float("nan"),
            "skipped_update": skipped_now, "skipped_updates_total": state["skipped_updates"],
            "anchor_refreshed": refreshed, "ratio_max_dev_per_step": ratio_dev.cpu().tolist(),
            **{k: round(v, 4) for k, v in timer.times.items()}, "peak_memory_gb": peak_memory_gb(device),
        }
        if rank == 0:
            metrics_file.write(json.dumps(metrics) + "\n")
            metrics_file.flush()
            bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}", kl=f"{metrics['approx_kl']:.1e}",
                            clip=f"{metrics['clip_fraction']:.2f}", skip=state["skipped_updates"])
            if cfg.sample_every and iteration % cfg.sample_every == 0:
                video = (frames[0].permute(0, 2, 3, 1) * 255).round().to(torch.uint8).cpu()  # (F, H, W, 3)
                save_video(video, os.path.join(cfg.output_dir, "samples", f"iter{iteration + 1:06d}"))

        # ======================================================================== CHECKPOINT
        timer(None)
        if (iteration + 1) % cfg.checkpoint_every == 0 or iteration + 1 == cfg.max_iterations:
            state.update(iteration=iteration + 1, sampler=sampler.state_dict(),
                         anchor_last_refresh=anchor.last_refresh if anchor is not None else 0)
            save_checkpoint(cfg, iteration + 1, state, policy, optimizer, anchor, rank)
            if rank == 0:
                plot_metrics(os.path.join(cfg.output_dir, "metrics.jsonl"), os.path.join(cfg.output_dir, "curves.png"))
    if metrics_file:
        metrics_file.close()


if __name__ == "__main__":
    main(parse_config())
