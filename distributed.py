"""Distributed machinery of train.py: FSDP2 sharding, rank-0 loading, collectives, atomic checkpoints.

None of this is SAGE-GRPO; it is what makes the same loop run on 1 CPU process, 8 GPUs or 64.

Process group and mesh (`setup`). torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; without it the run
is a world of one (in-memory store, no port). NCCL on CUDA, gloo on CPU (tests, `--tiny`). One 1-D
device mesh over all ranks, which FSDP2 shards over; with `--sp_size` > 1 the ranks also form the
(data-parallel x sequence-parallel) groups of parallel.py, whose ranks split each video's tokens.

Sharding (`shard`). FSDP2 (`torch.distributed.fsdp.fully_shard`): one shard group per transformer
block (the family's block list: HunyuanVideo-1.5 `transformer_blocks`, Wan2.1 `blocks`; model.py's family
objects name it), then the root (embedders, token refiner, output head). A block's full weights exist only
while it runs. On CUDA the policy computes in bf16 with fp32 master weights and fp32 gradient
reduction (MixedPrecisionPolicy); on CPU everything is fp32. The anchor (frozen, compute dtype) is
sharded the same way and may live on CPU (`--anchor_offload`: CPUOffloadPolicy).
One CPU process (`fsdp_needed` False: the world, `--tiny`, the tests) is not sharded: there FSDP2 would
shard over a single rank and mix no precision, so its all-gathers and reduce-scatters are copies and its
hooks pure overhead. The plain module trains the same weights up to the order of float additions (FSDP2's
hooks regroup the sum of the gradients that the shared timestep embedding receives from every block); the
2-rank tests compare the sharded run against it.

Loading (`load_policy`). The transformer class and LoRA targets are the checkpoint's family's
(model.family_of: HunyuanVideo15Transformer3DModel or WanTransformer3DModel). Only rank 0 reads the fp32 transformer (33 GB for the 8.3B model); every
rank builds the module on the meta device (no memory), shards it, allocates its own shards and
receives them from rank 0 (`set_model_state_dict(..., broadcast_from_rank0=True)`). A node thus
holds one full host copy, not one per rank.

Checkpoints (`save_checkpoint`, `load_checkpoint`, `latest_checkpoint`). A checkpoint is the
directory `checkpoint-NNNNNN/`, written as `checkpoint-NNNNNN.tmp/` and renamed once every file is
complete (the rename is atomic: a crash or a kill mid-write leaves the previous checkpoint the
newest complete one). It holds
    transformer/          the policy in diffusers layout (safetensors shards + index), loadable by its family's
                          class (`HunyuanVideo15Transformer3DModel` / `WanTransformer3DModel.from_pretrained`); with LoRA the adapters
                          merged in, and the adapters themselves in policy/ (sharded)
    optimizer/, anchor/   torch.distributed.checkpoint (each rank writes its own shards)
    ema/, ema_transformer/  with --ema_decay: the weights' EMA, sharded (for --resume) and in diffusers
                          layout like transformer/ (what eval.py evaluates beside it)
    rng.pt                every rank's torch / python / CUDA generator state
    trainer_state.json    iteration, update step, prompt sampler position, the run's config
and `--resume` continues bit-identically (tested after a real SIGKILL).

One writer per run directory (`lock_run_directory`). Rank 0 holds an exclusive `flock` on
output_dir/.lock for the whole run; a second run into the same directory is refused with the first
one's pid. The kernel drops the lock when the process ends in any way (exit, crash, kill -9), so a
lock never outlives its run and there is nothing to clean up by hand.
"""
import copy
import datetime
import fcntl
import hashlib
import json
import os
import random
import re
import shutil
import warnings

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

import model

# Modules that get LoRA adapters with --lora_rank: each family's `lora_targets` (model.LORA_TARGETS for
# HunyuanVideo-1.5, wan.LORA_TARGETS for Wan2.1); this name is HunyuanVideo-1.5's, kept for plan.py.
LORA_TARGETS = model.LORA_TARGETS
# LoRA scale alpha / r of those adapters (lora_alpha = r, our choice): merged as W + B·A.
LORA_SCALE = 1.0
# Largest safetensors file of a saved transformer (diffusers' own save_pretrained default): the 8.3B
# fp32 policy becomes 7 shards + an index instead of one 33 GB file.
MAX_SHARD_SIZE = "5GB"
EMA_TRANSFORMER = "ema_transformer"  # the EMA's diffusers directory inside a checkpoint


# ------------------------------------------------------------------------------------------------
# Process group, sharding, loading.

def setup(use_cuda, timeout_minutes=30.0):
    """Start the process group -> (rank, world_size, device, mesh). use_cuda False: gloo on CPU.
    A collective that waits longer than timeout_minutes raises (torch's own process-group timeout)."""
    cuda = use_cuda and torch.cuda.is_available()
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if "RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None, timeout=timeout)
    else:
        device = torch.device("cuda", 0) if cuda else torch.device("cpu")
        dist.init_process_group("nccl" if cuda else "gloo", store=dist.HashStore(), rank=0, world_size=1,
                                timeout=timeout)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    return dist.get_rank(), dist.get_world_size(), device, mesh


def family_blocks(transformer):
    """The repeated blocks of `transformer` that FSDP2 shards one by one: its family's block list."""
    family = model.family_of_transformer(transformer)
    if family is None:
        raise ValueError(f"no policy family has a {type(transformer).__name__}: expected one of "
                         f"{[f.transformer_class.__name__ for f in model.FAMILIES.values()]}")
    return getattr(transformer, family.blocks)


def fsdp_needed(mesh, device):
    """Whether load_policy shards: on more than one rank, or on CUDA (whose one rank still needs FSDP2's
    mixed precision: bf16 compute over fp32 master weights, and `--anchor_offload`). One CPU process is
    left plain (module docstring)."""
    return mesh.size() > 1 or device.type != "cpu"


def shard(transformer, mesh, param_dtype, offload=False, glyph_whole=False):
    """FSDP2: one shard group per transformer block, then the root (embedders, refiner, head).

    glyph_whole: the (frozen) glyph projector is not sharded at all (FSDP2 ignored_params, `--no-train_glyph_projector`):
    every rank keeps the whole of it, in the compute dtype, so no forward all-gathers it. It is 87 % of the
    tiny and world models' parameters (diffusers fixes its hidden width at 2048) and ~0.15 % of the real one's.
    """
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    offload_policy = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if offload else OffloadPolicy()
    for block in family_blocks(transformer):
        fully_shard(block, mesh=mesh, mp_policy=mp, offload_policy=offload_policy)
    ignored = None
    if glyph_whole:
        glyph = glyph_projector(transformer)
        if any(p.requires_grad for p in glyph.parameters()):
            raise ValueError("a glyph projector kept whole on every rank must be frozen (its gradients are not synced)")
        ignored = set(glyph.parameters())
        glyph.to(param_dtype or next(iter(ignored)).dtype)
    fully_shard(transformer, mesh=mesh, mp_policy=mp, offload_policy=offload_policy, ignored_params=ignored)
    # FSDP2 warns on every forward that the root returns a view (diffusers' unpatchify reshapes): an
    # in-place op on that output would skip the backward all-gather. Nothing modifies it in place
    # (model.cfg_velocity's first op is an out-of-place .float()), and the 2 ranks = 1 rank test checks
    # the gradients, so the warning is silenced here, once, for this module's messages only.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    return transformer


def load_policy(path, mesh, device, rank, compute_dtype, *, lora_rank=0, gradient_checkpointing=True,
                with_anchor=True, anchor_offload=False, train_glyph_projector=True):
    """The sharded fp32 policy and (with_anchor) the sharded anchor, from path/transformer.

    Rank 0 alone reads the weights (fp32, CPU); every rank builds the module on the meta device,
    shards it, allocates only its own shards (to_empty) and receives them from rank 0. The anchor is
    built the same way, empty: trust_region.MovingAnchor fills it from the policy's shards, so host
    memory holds one full copy, on rank 0. lora_rank > 0 adds LoRA adapters (peft) and freezes the
    rest; train_glyph_projector=False freezes the byT5 glyph projector (`shard` then leaves it whole on
    every rank). One CPU process (`fsdp_needed` False) skips the sharding: the same load, plain modules.
    Returns (policy, anchor_module or None).
    """
    family = model.family_of_weights(path)  # a pipeline directory or a checkpoint (transformer/ alone)
    Transformer = family.transformer_class

    def prepare(transformer):  # identical on every rank: LoRA adapters or full fine-tune, checkpointing
        if lora_rank > 0:
            from peft import LoraConfig
            transformer.requires_grad_(False)
            # lora_alpha = r: the adapter adds B·A unscaled (LORA_SCALE = alpha / r = 1) at any rank
            transformer.add_adapter(LoraConfig(r=lora_rank, lora_alpha=lora_rank, init_lora_weights=True,
                                               target_modules=family.lora_targets))
        else:
            transformer.requires_grad_(True)
            if not train_glyph_projector:
                glyph_projector(transformer).requires_grad_(False)
        if gradient_checkpointing:
            transformer.enable_gradient_checkpointing()
        return transformer

    path = os.path.join(path, "transformer")
    # rank 0's module holds the LoRA initialisation too, so every rank receives the same adapters
    full_state = prepare(Transformer.from_pretrained(path, torch_dtype=torch.float32)).state_dict() if rank == 0 else {}
    with torch.device("meta"):
        policy = prepare(Transformer.from_config(Transformer.load_config(path)))
    # non-persistent buffers: to_empty leaves them garbage and the broadcast does not carry them, so every rank
    # computes them from the config (the family knows how: Wan's RoPE tables)
    computed = family.computed_buffers(policy)
    uninitialised = sorted(set(dict(policy.named_buffers())) - set(policy.state_dict()) - set(computed))
    if uninitialised:
        raise NotImplementedError(f"non-persistent buffers {uninitialised[:5]} would not be initialised by the "
                                  f"rank-0 broadcast load")
    sharded = fsdp_needed(mesh, device)
    anchor_module = None
    if with_anchor:  # same structure, compute dtype, sharded the same way (optionally on CPU)
        anchor_module = copy.deepcopy(policy).to(compute_dtype).requires_grad_(False).eval()
        if sharded:
            shard(anchor_module, mesh, None, offload=anchor_offload, glyph_whole=not train_glyph_projector)
        anchor_module.to_empty(device="cpu" if anchor_offload else device)  # values: MovingAnchor.refresh
        _write_buffers(anchor_module, computed)
        if not train_glyph_projector:  # kept whole: not sharded, so not offloaded either
            glyph_projector(anchor_module).to(device)
    if sharded:
        shard(policy, mesh, compute_dtype if device.type == "cuda" else None, glyph_whole=not train_glyph_projector)
    policy.to_empty(device=device)
    _write_buffers(policy, computed)
    set_model_state_dict(policy, full_state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    return policy, anchor_module


def _write_buffers(module, buffers):
    """Copy {name: tensor} into the module's (materialised) buffers of those names, in their dtype and device."""
    named = dict(module.named_buffers())
    with torch.no_grad():
        for name, value in buffers.items():
            named[name].copy_(value.to(named[name].dtype))


def glyph_projector(transformer):
    """HunyuanVideo-1.5's byT5 glyph projector (`context_embedder_2`); a family without one (Wan2.1) raises."""
    glyph = getattr(transformer, "context_embedder_2", None)
    if glyph is None:
        raise ValueError(f"--no-train_glyph_projector: a {type(transformer).__name__} has no glyph projector "
                         f"(only HunyuanVideo-1.5's byT5 context_embedder_2 can be frozen); leave it at its default")
    return glyph


def exit_process(status):
    """End a process that used a process group, skipping the interpreter's teardown: flush stdout and stderr,
    then os._exit(status). Call it after destroy_process_group, with every file closed.

    Why: destroy_process_group drops c10d's references, yet the DeviceMesh, and with it the gloo process group,
    stay alive in DTensor's global sharding caches (the DTensorSpecs they hold name the mesh), even after
    gc.collect(). Their C++ destructors, gloo's worker threads among them, then run during interpreter
    finalization, where a thread that needs the GIL is ended by force: an occasional SIGABRT ("terminate called
    without an active exception") after a run that finished, and a non-zero status from torchrun."""
    import sys
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status)


# ------------------------------------------------------------------------------------------------
# Collectives.

def all_gather_cat(x, group=None):
    """Concatenate a (B, ...) tensor over the ranks of `group` (None: all) in rank order -> (W·B, ...).
    With sequence parallelism train.py passes the data-parallel group: each video once."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts)


def all_reduce(x, op=dist.ReduceOp.SUM, group=None):
    """A reduced copy of x (sum over the ranks of `group`, None: all, by default); x itself is left as it was."""
    x = x.clone()
    dist.all_reduce(x, op=op, group=group)
    return x


# ------------------------------------------------------------------------------------------------
# One writer per run directory.

LOCK_FILE = ".lock"


class DirectoryLocked(RuntimeError):
    """Another live process writes to this directory (the message names it)."""


def lock_run_directory(directory, what="run"):
    """Take an exclusive, non-blocking flock on directory/.lock and return the open file (keep it open for the
    life of the run: closing it, or the process ending in any way, kill -9 included, releases the lock).
    Raise DirectoryLocked naming the holder's pid and command if another process holds it."""
    os.makedirs(directory, exist_ok=True)
    handle = open(os.path.join(directory, LOCK_FILE), "a+")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise DirectoryLocked(f"{directory!r} is in use by another {what} ({holder}): one writer at a time; wait for "
                              f"it to finish or stop it, or choose another directory") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {os.uname().nodename}, started {datetime.datetime.now():%Y-%m-%d %H:%M:%S}\n")
    handle.flush()
    return handle


def lock_holder(directory):
    """Who holds directory/.lock ("pid N on host, started ..."), or None when no live process does. A shared,
    non-blocking probe: it writes nothing and is released at once."""
    path = os.path.join(directory, LOCK_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return handle.read().strip() or "another process"
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
    return None


# ------------------------------------------------------------------------------------------------
# Checkpoints. output_dir is treated as a small database: only the run's own numbered checkpoints
# (`checkpoint-NNNNNN`, exactly six digits) are ever discovered, resumed from or deleted; a user's
# copy such as `checkpoint-best` or `checkpoint-000004-best` is never touched. A checkpoint is
# complete only with its manifest (every file's size and SHA-256, written last, inside the .tmp
# directory, before the rename), and it is verified against it before it is resumed from.

CHECKPOINT_NAME = re.compile(r"checkpoint-(\d{6})")
MANIFEST = "manifest.json"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read; the message says which file and why."""


def checkpoints(output_dir):
    """The run's numbered checkpoint directories in output_dir, oldest first (numeric order):
    [(iteration, path)], complete (with a manifest) or not."""
    if not os.path.isdir(output_dir):
        return []
    found = [(int(m.group(1)), os.path.join(output_dir, name)) for name in os.listdir(output_dir)
             if (m := CHECKPOINT_NAME.fullmatch(name)) and os.path.isdir(os.path.join(output_dir, name))]
    return sorted(found)


def latest_checkpoint(output_dir):
    """The newest numbered checkpoint that has a manifest (not yet verified), or None."""
    complete = [path for _, path in checkpoints(output_dir) if os.path.isfile(os.path.join(path, MANIFEST))]
    return complete[-1] if complete else None


def _sha256(path, chunk=1 << 24):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(directory):
    """Record every file under `directory` (relative path -> size, SHA-256) in directory/manifest.json,
    written to a temporary name, flushed to disk, then renamed: the manifest is the last file to exist."""
    files = {}
    for root, _, names in os.walk(directory):
        for name in sorted(names):
            path = os.path.join(root, name)
            relative = os.path.relpath(path, directory)
            if relative != MANIFEST:
                files[relative] = {"size": os.path.getsize(path), "sha256": _sha256(path)}
    tmp = os.path.join(directory, MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(directory, MANIFEST))


def verify_checkpoint(path):
    """Raise CheckpointError naming the first problem: no manifest, a missing file, a size or checksum
    that differs from the manifest, or a non-finite value in the transformer weights."""
    from safetensors import safe_open
    try:
        with open(os.path.join(path, MANIFEST)) as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError) as error:
        raise CheckpointError(f"{path}: no readable {MANIFEST} ({error}): the checkpoint was never completed") from None
    for relative, expected in sorted(files.items()):
        file = os.path.join(path, relative)
        if not os.path.isfile(file):
            raise CheckpointError(f"{file} is missing (listed in {MANIFEST})")
        if os.path.getsize(file) != expected["size"]:
            raise CheckpointError(f"{file} has {os.path.getsize(file)} bytes, the manifest says {expected['size']} "
                                  "(truncated or overwritten)")
        if _sha256(file) != expected["sha256"]:
            raise CheckpointError(f"{file}: SHA-256 differs from the manifest (the bytes were changed after writing)")
    for relative in sorted(files):
        if relative.startswith("transformer" + os.sep) and relative.endswith(".safetensors"):
            with safe_open(os.path.join(path, relative), framework="pt") as f:
                for key in f.keys():
                    if not torch.isfinite(f.get_tensor(key)).all():
                        raise CheckpointError(f"{os.path.join(path, relative)}: tensor {key!r} holds NaN or inf")


def find_resumable(output_dir, log=print):
    """The newest checkpoint that verifies; each newer one that does not is named with the reason
    (`log`). Raise CheckpointError if none verifies. Rank 0 only (it reads every file once)."""
    skipped = []
    for _, path in reversed(checkpoints(output_dir)):
        try:
            verify_checkpoint(path)
        except CheckpointError as error:
            skipped.append(str(error))
            log(f"resume: skipping {os.path.basename(path)}: {error}")
            continue
        return path
    raise CheckpointError(f"--resume: no checkpoint in {output_dir!r} verifies"
                          + (": " + "; ".join(skipped) if skipped else " (there is none)"))


def remove_stale_tmp(output_dir):
    """Delete checkpoint-NNNNNN.tmp directories: the remains of a write that was killed (never resumable)."""
    for name in os.listdir(output_dir) if os.path.isdir(output_dir) else ():
        if name.endswith(".tmp") and CHECKPOINT_NAME.fullmatch(name[:-len(".tmp")]):
            shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)


def save_transformer(transformer, path, rank, max_shard_size=MAX_SHARD_SIZE, lora_scale=None, replace=None):
    """Gather the full (fp32 master) state and write it in diffusers layout (rank 0): safetensors
    shards and, when there is more than one, the index diffusers' from_pretrained reads. With LoRA
    (`lora_scale` = alpha / r) the adapters are merged in, so the result is a plain transformer.
    replace: {state-dict name: tensor or DTensor shard} written instead of the module's own (the EMA's
    averages, optimizer.WeightEMA); every rank calls this, the shards are gathered."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file
    state = get_model_state_dict(transformer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    for name, tensor in (replace or {}).items():  # a collective per sharded tensor: every rank, in the same order
        full = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
        if name in state:  # rank 0's full state (cpu_offload leaves the other ranks' empty)
            state[name] = full.detach().to("cpu", state[name].dtype)
    if lora_scale is not None:  # PEFT keys name the adapter (`lora_A.default.weight`): drop it, then fold
        from videoalign_checkpoint import merge_lora
        state = merge_lora({re.sub(r"\.default(?=\.|$)", "", k): v for k, v in state.items()}, lora_scale)
    if rank == 0:
        os.makedirs(path, exist_ok=True)
        transformer.save_config(path)
        family = model.family_of_transformer(transformer)
        if family is not None:  # FSDP2 names the wrapped class FSDP<class>: write the class diffusers loads
            with open(os.path.join(path, "config.json")) as f:
                saved = json.load(f)
            with open(os.path.join(path, "config.json"), "w") as f:
                json.dump({**saved, "_class_name": family.transformer_class.__name__}, f, indent=2, sort_keys=True)
        split = split_torch_state_dict_into_shards(state, filename_pattern="diffusion_pytorch_model{suffix}.safetensors",
                                                   max_shard_size=max_shard_size)
        for filename, keys in split.filename_to_tensors.items():
            save_file({k: state[k].contiguous() for k in keys}, os.path.join(path, filename))
        if split.is_sharded:
            with open(os.path.join(path, "diffusion_pytorch_model.safetensors.index.json"), "w") as f:
                json.dump({"metadata": split.metadata, "weight_map": split.tensor_to_filename}, f, indent=1)


def _agree(ok):
    """True on every rank if `ok` is True on every rank (one all-reduce): ranks leave a failed write together."""
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    flag = torch.tensor(int(bool(ok)), device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def save_checkpoint(output_dir, iteration, trainer_state, policy, optimizer, anchor, rank, *, lora=False, keep=2,
                    ema=None):
    """Write output_dir/checkpoint-NNNNNN/ (layout in the module docstring) via .tmp, manifest, rename;
    then delete all but the `keep` newest of the run's numbered checkpoints. Every rank calls it.

    A write that fails on any rank (disk full, read-only, quota) removes its partial files, leaves
    every earlier checkpoint as it was, and raises CheckpointError on every rank naming the newest
    intact checkpoint. Returns the path."""
    final = os.path.join(output_dir, f"checkpoint-{iteration:06d}")
    tmp = final + ".tmp"
    error = None

    def attempt(write):  # run one phase of the write, remember the first error
        nonlocal error
        if error is None:
            try:
                write()
            except (Exception, CheckpointException) as e:  # noqa: BLE001 - disk full, permissions, torch's errors
                error = e  # (torch.distributed.checkpoint wraps its errors in a BaseException: caught explicitly)
        return _agree(error is None)

    ok = attempt(lambda: (shutil.rmtree(tmp, ignore_errors=True), os.makedirs(tmp)) if rank == 0 else None)
    if ok and lora:  # adapters + frozen base, sharded, for --resume; transformer/ gets the merged weights
        ok = attempt(lambda: dcp.save({"policy": get_model_state_dict(policy)}, checkpoint_id=os.path.join(tmp, "policy")))
    if ok:
        ok = attempt(lambda: save_transformer(policy, os.path.join(tmp, "transformer"), rank,
                                              lora_scale=LORA_SCALE if lora else None))
    if ok:  # optimizer and anchor: sharded (each rank writes its shard), torch.distributed.checkpoint
        ok = attempt(lambda: dcp.save({"optimizer": get_optimizer_state_dict(policy, optimizer)},
                                      checkpoint_id=os.path.join(tmp, "optimizer")))
    if ok and anchor is not None:
        ok = attempt(lambda: dcp.save({"anchor": get_model_state_dict(anchor.anchor)},
                                      checkpoint_id=os.path.join(tmp, "anchor")))
    if ok and ema is not None:  # the EMA: sharded for --resume, and in diffusers format beside transformer/
        ok = attempt(lambda: dcp.save({"ema": ema.state_dict()}, checkpoint_id=os.path.join(tmp, "ema")))
        ok = ok and attempt(lambda: save_transformer(policy, os.path.join(tmp, EMA_TRANSFORMER), rank,
                                                     lora_scale=LORA_SCALE if lora else None, replace=ema.state_dict()))
    rng = {"torch": torch.get_rng_state(), "python": random.getstate(),
           "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
    rngs = [None] * dist.get_world_size()
    dist.all_gather_object(rngs, rng)
    if ok:
        def finish():
            if rank == 0:
                torch.save(rngs, os.path.join(tmp, "rng.pt"))
                with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
                    json.dump(trainer_state, f, indent=1)
                write_manifest(tmp)  # last: a directory without a manifest is never resumed from
                if os.path.isdir(final):  # a checkpoint of this number that did not verify: replaced
                    os.rename(final, final + ".replaced")
                os.rename(tmp, final)  # atomic: until here the previous checkpoint is the newest complete one
                shutil.rmtree(final + ".replaced", ignore_errors=True)
        ok = attempt(finish)
    if not ok:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # partial files would only fill the disk
        intact = latest_checkpoint(output_dir)
        raise CheckpointError(
            f"checkpoint-{iteration:06d} could not be written ({type(error).__name__ + ': ' + str(error) if error else 'failed on another rank'}); "
            f"its partial files were removed; the newest intact checkpoint is "
            f"{intact if intact else 'none (this run has not saved one yet)'}")
    if rank == 0:
        for _, old in checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old)
    dist.barrier()
    return final


def load_checkpoint(path, policy, optimizer, anchor, rank, ema=None):
    """Optimizer, anchor, EMA, RNG and trainer state from `path`; the policy weights too if they are sharded
    (LoRA), otherwise they were loaded from path/transformer when the policy was built. Returns the
    trainer state (trainer_state.json). A run that turns --ema_decay on at a resume from a checkpoint without
    an EMA starts its average from the checkpoint's weights (trainer state "ema_started_at_resume")."""
    try:
        return _load_checkpoint(path, policy, optimizer, anchor, rank, ema)
    except CheckpointError:
        raise
    except (Exception, CheckpointException) as error:  # noqa: BLE001 - say which checkpoint, not a 100-line trace
        # the whole message, but not the per-rank tracebacks torch.distributed.checkpoint appends to it
        message = str(error).split("Traceback (most recent call last)")[0].strip()
        raise CheckpointError(f"{path} could not be loaded ({type(error).__name__}: {message})") from error


def _load_checkpoint(path, policy, optimizer, anchor, rank, ema):
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
    ema_started = False
    if ema is not None and os.path.isdir(os.path.join(path, "ema")):
        dcp.load({"ema": ema.state_dict()}, checkpoint_id=os.path.join(path, "ema"))  # in place, into the averages
    elif ema is not None:  # built from the weights just loaded: the average starts here
        ema_started = True
    rngs = torch.load(os.path.join(path, "rng.pt"), weights_only=False)
    if len(rngs) == dist.get_world_size():
        torch.set_rng_state(rngs[rank]["torch"])
        random.setstate(rngs[rank]["python"])
        if torch.cuda.is_available() and rngs[rank]["cuda"] is not None:
            torch.cuda.set_rng_state(rngs[rank]["cuda"])
    with open(os.path.join(path, "trainer_state.json")) as f:
        return {**json.load(f), "ema_started_at_resume": ema_started}
