"""Distributed machinery of train.py: FSDP2 sharding, rank-0 loading, collectives, atomic checkpoints.

None of this is SAGE-GRPO; it is what makes the same loop run on 1 CPU process, 8 GPUs or 64.

Process group and mesh (`setup`). torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; without it the run
is a world of one (in-memory store, no port). NCCL on CUDA, gloo on CPU (tests, `--tiny`). One 1-D
device mesh over all ranks: plain data parallelism, every rank its own videos.

Sharding (`shard`). FSDP2 (`torch.distributed.fsdp.fully_shard`): one shard group per transformer
block, then the root (embedders, token refiner, output head). A block's full weights exist only
while it runs. On CUDA the policy computes in bf16 with fp32 master weights and fp32 gradient
reduction (MixedPrecisionPolicy); on CPU everything is fp32. The anchor (frozen, compute dtype) is
sharded the same way and may live on CPU (`--anchor_offload`: CPUOffloadPolicy).

Loading (`load_policy`). Only rank 0 reads the fp32 transformer (33 GB for the 8.3B model); every
rank builds the module on the meta device (no memory), shards it, allocates its own shards and
receives them from rank 0 (`set_model_state_dict(..., broadcast_from_rank0=True)`). A node thus
holds one full host copy, not one per rank.

Checkpoints (`save_checkpoint`, `load_checkpoint`, `latest_checkpoint`). A checkpoint is the
directory `checkpoint-NNNNNN/`, written as `checkpoint-NNNNNN.tmp/` and renamed once every file is
complete (the rename is atomic: a crash or a kill mid-write leaves the previous checkpoint the
newest complete one). It holds
    transformer/          the policy in diffusers layout (safetensors shards + index), loadable by
                          `HunyuanVideo15Transformer3DModel.from_pretrained`; with LoRA the adapters
                          merged in, and the adapters themselves in policy/ (sharded)
    optimizer/, anchor/   torch.distributed.checkpoint (each rank writes its own shards)
    rng.pt                every rank's torch / python / CUDA generator state
    trainer_state.json    iteration, update step, prompt sampler position, the run's config
and `--resume` continues bit-identically (tested after a real SIGKILL).
"""
import copy
import json
import os
import random
import re
import shutil

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from diffusers import HunyuanVideo15Transformer3DModel
from torch.distributed.checkpoint import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

# Modules that get LoRA adapters with --lora_rank: every attention projection of the transformer
# blocks (video and text streams), as diffusers' HunyuanVideo LoRA training scripts target.
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
# LoRA scale alpha / r of those adapters (lora_alpha = r, our choice): merged as W + B·A.
LORA_SCALE = 1.0
# Largest safetensors file of a saved transformer (diffusers' own save_pretrained default): the 8.3B
# fp32 policy becomes 7 shards + an index instead of one 33 GB file.
MAX_SHARD_SIZE = "5GB"


# ------------------------------------------------------------------------------------------------
# Process group, sharding, loading.

def setup(use_cuda):
    """Start the process group -> (rank, world_size, device, mesh). use_cuda False: gloo on CPU."""
    cuda = use_cuda and torch.cuda.is_available()
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


def load_policy(path, mesh, device, rank, compute_dtype, *, lora_rank=0, gradient_checkpointing=True,
                with_anchor=True, anchor_offload=False):
    """The sharded fp32 policy and (with_anchor) the sharded anchor, from path/transformer.

    Rank 0 alone reads the weights (fp32, CPU); every rank builds the module on the meta device,
    shards it, allocates only its own shards (to_empty) and receives them from rank 0. The anchor is
    built the same way, empty: trust_region.MovingAnchor fills it from the policy's shards, so host
    memory holds one full copy, on rank 0. lora_rank > 0 adds LoRA adapters (peft) and freezes the
    rest. Returns (policy, anchor_module or None).
    """
    Transformer = HunyuanVideo15Transformer3DModel

    def prepare(transformer):  # identical on every rank: LoRA adapters or full fine-tune, checkpointing
        if lora_rank > 0:
            from peft import LoraConfig
            transformer.requires_grad_(False)
            # lora_alpha = r: the adapter adds B·A unscaled (LORA_SCALE = alpha / r = 1) at any rank
            transformer.add_adapter(LoraConfig(r=lora_rank, lora_alpha=lora_rank, init_lora_weights=True,
                                               target_modules=LORA_TARGETS))
        else:
            transformer.requires_grad_(True)
        if gradient_checkpointing:
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
    anchor_module = None
    if with_anchor:  # same structure, compute dtype, sharded the same way (optionally on CPU)
        anchor_module = copy.deepcopy(policy).to(compute_dtype).requires_grad_(False).eval()
        shard(anchor_module, mesh, None, offload=anchor_offload)
        anchor_module.to_empty(device="cpu" if anchor_offload else device)  # values: MovingAnchor.refresh
    shard(policy, mesh, compute_dtype if device.type == "cuda" else None)
    policy.to_empty(device=device)
    set_model_state_dict(policy, full_state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    return policy, anchor_module


# ------------------------------------------------------------------------------------------------
# Collectives.

def all_gather_cat(x):
    """Concatenate a (B, ...) tensor over ranks in rank order -> (W·B, ...)."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def all_reduce(x, op=dist.ReduceOp.SUM):
    """A reduced copy of x (sum over ranks by default); x itself is left as it was."""
    x = x.clone()
    dist.all_reduce(x, op=op)
    return x


# ------------------------------------------------------------------------------------------------
# Checkpoints: checkpoint-NNNNNN/ exists only once complete (written as .tmp, then renamed).

def latest_checkpoint(output_dir):
    """The newest complete checkpoint-NNNNNN/ in output_dir, or None."""
    if not os.path.isdir(output_dir):
        return None
    done = sorted(d for d in os.listdir(output_dir) if d.startswith("checkpoint-") and not d.endswith(".tmp"))
    return os.path.join(output_dir, done[-1]) if done else None


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


def save_checkpoint(output_dir, iteration, trainer_state, policy, optimizer, anchor, rank, *, lora=False, keep=1):
    """Write output_dir/checkpoint-NNNNNN/ (layout in the module docstring) via .tmp + rename, then
    delete all but the `keep` newest complete checkpoints. Every rank calls it. Returns its path."""
    final = os.path.join(output_dir, f"checkpoint-{iteration:06d}")
    tmp = final + ".tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier()
    if lora:  # adapters + frozen base, sharded, for --resume; transformer/ gets the merged weights
        dcp.save({"policy": get_model_state_dict(policy)}, checkpoint_id=os.path.join(tmp, "policy"))
    save_transformer(policy, os.path.join(tmp, "transformer"), rank, lora_scale=LORA_SCALE if lora else None)
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
            json.dump(trainer_state, f, indent=1)
    dist.barrier()
    if rank == 0:
        os.rename(tmp, final)  # atomic: until here the previous checkpoint is the newest complete one
        complete = sorted(d for d in os.listdir(output_dir) if d.startswith("checkpoint-") and not d.endswith(".tmp"))
        for old in complete[:-keep]:
            shutil.rmtree(os.path.join(output_dir, old))
    dist.barrier()
    return final


def load_checkpoint(path, policy, optimizer, anchor, rank):
    """Optimizer, anchor, RNG and trainer state from `path`; the policy weights too if they are sharded
    (LoRA), otherwise they were loaded from path/transformer when the policy was built. Returns the
    trainer state (trainer_state.json)."""
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
