"""The planner: per-GPU memory by component, FLOPs and time per iteration, and what to change if it does not fit.

    python train.py --plan                                  # the standard setups (docs/scaling.md's cost model)
    python train.py --plan --world_size 8 --sp_size 2 --videos_per_rank 2 --optimizer muon
    python train.py --plan --world_size 1 --videos_per_rank 4 --lora_rank 64 --text_encoder_offload
    python plan.py ...                                      # the same, without train.py
    python plan.py --family wan --model_size 1.3B            # Wan2.1-1.3B on one GPU: 480x832x81 and 240x416x33

No weights and no GPU are needed: every model is built on the meta device (shapes, no memory).

What is measured, and how
-------------------------
* Parameters, gradients, optimizer states (`measure_states`): the real 8.3B HunyuanVideo-1.5
  transformer (`HunyuanVideo15Transformer3DModel` with diffusers' defaults: 54 blocks, 16 heads x 128)
  is built on the meta device, LoRA adapters are added as train.py adds them (peft, every attention
  projection), and it is sharded with FSDP2 exactly as distributed.shard does, over a fake process
  group of the target world size (torch's testing "fake" backend: collectives are no-ops). Bytes are
  read off rank 0's local shards (the largest: FSDP2 pads the last ranks). The optimizer is
  optimizer.build_optimizer's, stepped once on meta gradients: its state tensors are counted.
* FLOPs (`measure_flops`): torch.utils.flop_counter on meta tensors of the real shapes: one
  dual-stream block at the setup's full token count, forward and backward (LoRA: only the gradients
  that are needed), and the token refiner over the text tokens. Blocks x 54, divided by sp (each rank
  of a sequence-parallel group does 1/sp of every matmul and, with Ulysses, 1/sp of the heads).
* Activation bytes per token per block (`calibrate_activations`): one real block (2048 hidden, 16
  heads, random weights, bf16) runs forward on the CPU at 3 reduced lengths (128, 256, 512 video
  tokens + 32 text tokens); every tensor autograd saves for backward is counted once (parameters
  excluded). A fit bytes = a·L + b·L² (+ c) extrapolates it: a is the per-token cost (projections,
  norms, feed-forward, q/k/v/out: CPU SDPA is a flash kernel that saves no L×L matrix, as GPU flash
  attention), b is what grows with L² (≈ 0 with train.py's key-mask processor, parallel.py; ≈ 2 bytes
  with diffusers' own processor, whose pairwise boolean mask is L×L).

What is derived (formulas below, in `plan`)
-------------------------------------------
* Activations of the update (the peak phase): S = 2·videos_per_rank sequences (CFG) of l = L/sp
  local tokens. With gradient checkpointing every block keeps its input (each video or text token
  one 2048-vector in bf16) and one block at a time is recomputed, holding a·l + b·l² bytes per
  sequence, twice for the gradients of those activations during its backward (an assumption):
      act = S·(54·2048·2·l + 2·(a·l + b·l²)),   without checkpointing  S·54·(a·l + b·l²).
* Gathered compute weights: FSDP2 all-gathers one block at a time in bf16 and prefetches the next;
  the root's own parameters stay gathered between forward and backward: 2·(2 blocks + root) bytes.
* Frozen models (bf16): Qwen2.5-VL-7B and byT5 (text encoders), the VAE, VideoAlign (Qwen2-VL-2B):
  built on meta from their published configurations (typed in below: no files are read), x 2 bytes.
* Framework overhead (CUDA context, NCCL buffers, allocator fragmentation): 3 GiB, assumed.
* Time = FLOPs / (peak · MFU): H100 SXM dense bf16 peak 989 TFLOP/s, MFU 0.4 assumed. Not counted:
  communication (overlapped by FSDP2's prefetch when it can be), the VAE decode and the reward.

Wan2.1 (`--family wan --model_size 1.3B | 14B`). The same measurements on `WanTransformer3DModel` built from
the published configs (WAN21_CONFIGS), with three differences of the model: the video tokens are
F·(H/16)·(W/16) (VAE 8x, patch 2: 480x832x81 -> 32,760); the 512 UMT5 tokens are cross-attention keys, not
part of the self-attention sequence (so they add a constant per block, in the calibration's c, and are not
split by sequence parallelism); the frozen models are UMT5-XXL's encoder (5.7B) and the Wan VAE. The block
input every checkpointed block keeps is D = 1536 (1.3B) or 5120 (14B) per token.

Memory is in GiB (2^30 bytes); an H100 holds 79.6 GiB usable (torch.cuda.mem_get_info on an 80 GB card).

None of this has been checked on a GPU yet: benchmarks/gpu_check.py runs the real transformer and one real
block (random weights) on one and reports each measurement beside these functions' predictions. That is
why the block and FLOP measurements take a `config` (transformer_kwargs): its `--tiny` mode runs the same
functions on the tiny model on a CPU.
"""
import argparse
import contextlib
import dataclasses
import functools
import inspect
import math
import sys
import time

import torch
import torch.distributed as dist

import config

GIB = 2 ** 30
# bf16 compute copies, fp32 master weights / gradients (distributed.py: MixedPrecisionPolicy)
BF16, FP32 = 2, 4
# H100 SXM: dense bf16 tensor-core peak (NVIDIA datasheet), usable memory of the 80 GB card
H100_PEAK_TFLOPS = 989.0
H100_MEMORY_GIB = 79.6
MFU = 0.4  # model FLOPs utilisation assumed for the time estimate (a typical large-transformer figure)
OVERHEAD_GIB = 3.0  # CUDA context + NCCL buffers + fragmentation, assumed
PROMPT_TOKENS = 250  # real text tokens of a typical prompt after PromptEmbeds.trim_padding (Qwen2.5-VL + byT5)
CALIBRATION_LENGTHS = (128, 256, 512)  # video tokens of the CPU calibration runs (+ CALIBRATION_TEXT)
CALIBRATION_TEXT = 32

# Published configurations of the frozen models (config.json of each release), typed in: only their
# sizes matter here. Qwen2.5-VL-7B-Instruct's language model (HunyuanVideo-1.5's text_encoder),
# Glyph-SDXL-v2's byT5-small encoder (text_encoder_2), VideoAlign's base Qwen2-VL-2B-Instruct.
QWEN25_VL_7B_TEXT = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                         num_attention_heads=28, num_key_value_heads=4)
# Wan2.1: transformer/config.json of Wan-AI/Wan2.1-T2V-{1.3B,14B}-Diffusers, and google/umt5-xxl's encoder
# (text_encoder/config.json of the same checkpoints). WAN_TEXT_TOKENS: WanPipeline's max_sequence_length.
WAN21_CONFIGS = {
    "1.3B": dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
                 text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                 qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024),
    "14B": dict(patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16,
                text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024),
}
UMT5_XXL_ENCODER = dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                        feed_forward_proj="gated-gelu")
WAN_TEXT_TOKENS = 512
# The transformers the planner knows: "family-size" -> (family, size). HUNYUAN is the default of every function.
HUNYUAN = "hunyuan-8.3B"
MODEL_SIZES = {"hunyuan": ("8.3B",), "wan": tuple(WAN21_CONFIGS)}
BYT5_SMALL_ENCODER = dict(vocab_size=384, d_model=1472, d_ff=3584, num_layers=12, num_heads=6, d_kv=64)
QWEN2_VL_2B = dict(text_config=dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                    num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True),
                   vision_config=dict(depth=32, embed_dim=1280, hidden_size=1536, num_heads=16, mlp_ratio=4),
                   tie_word_embeddings=True)


_TRAIN = config.Config()  # train.py's defaults, the planner's too


@dataclasses.dataclass(frozen=True)
class Setup:
    """One training setup: the train.py flags that decide memory and time, plus the world size. Every default is
    train.py's own (config.Config), resolved as a GPU run resolves it: the family's default video size
    (config.default_video_size: HunyuanVideo-1.5's here), --videos_per_rank the fewest that fill whole groups on 8
    ranks, gradient checkpointing on (CUDA), the CFG scale of the HunyuanVideo-1.5 480p guider config."""
    name: str = "custom"
    world_size: int = 8
    family: str = "hunyuan"   # the checkpoint's family (train.py reads it from --model_path's model_index.json)
    model_size: str = "8.3B"  # hunyuan: 8.3B; wan: 1.3B or 14B
    sp_size: int = _TRAIN.sp_size
    videos_per_rank: int = config.default_videos_per_rank(_TRAIN.group_size, 8 // _TRAIN.sp_size)
    group_size: int = _TRAIN.group_size
    num_frames: int = config.module_constant("model", "DEFAULT_NUM_FRAMES")
    height: int = config.module_constant("model", "DEFAULT_HEIGHT")
    width: int = config.module_constant("model", "DEFAULT_WIDTH")
    lora_rank: int = _TRAIN.lora_rank
    optimizer: str = _TRAIN.optimizer
    text_encoder_offload: bool = _TRAIN.text_encoder_offload
    anchor_offload: bool = _TRAIN.anchor_offload
    kl_mode: str = _TRAIN.kl_mode
    num_steps: int = _TRAIN.num_steps
    train_step_fraction: float = _TRAIN.train_step_fraction
    sde_window: int = _TRAIN.sde_window
    updates_per_rollout: int = _TRAIN.updates_per_rollout
    gradient_checkpointing: bool = True
    cfg_scale: float = config.module_constant("model", "DEFAULT_GUIDANCE_SCALE")

    def flags(self):
        """The flags of this setup that differ from train.py's defaults, e.g. '--sp_size 2 --lora_rank 64'."""
        default = Setup()
        skip = ("name", "world_size", "family", "model_size")
        parts = []
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name in skip or value == getattr(default, field.name):
                continue
            parts.append(f"--{field.name}" if value is True else f"--no-{field.name}" if value is False
                         else f"--{field.name} {value}")
        return " ".join(parts)


# The standard setups of docs/scaling.md's table. 64 x H100 sp 2 is the official recipe (2 videos per
# data-parallel group, Muon); 720p is HunyuanVideo-1.5's 121 x 720 x 1280.
STANDARD_SETUPS = (
    Setup("1xH100 LoRA", world_size=1, videos_per_rank=4, lora_rank=64),
    Setup("8xH100", world_size=8),
    Setup("8xH100 AdamW", world_size=8, optimizer="adamw"),
    Setup("64xH100 sp2", world_size=64, sp_size=2),
    Setup("64xH100 sp2 720p", world_size=64, sp_size=2, num_frames=121, height=720, width=1280),
)
# Wan2.1 on one GPU: 480x832x81 (Wan's 480p) and the peers' GRPO size 240x416x33 (flow_grpo, Pref-GRPO), full
# fine-tune and LoRA r 32 (flow_grpo's rank), group 4 (flow_grpo's videos per prompt), CFG 5 (WanPipeline).
WAN_STANDARD_SETUPS = tuple(
    Setup(f"1xH100 {size} {frames}x{height}x{width} {'LoRA' if lora else 'full'}", world_size=1, family="wan",
          model_size="1.3B", videos_per_rank=4, num_frames=frames, height=height, width=width, lora_rank=lora,
          cfg_scale=5.0)
    for size, (frames, height, width) in (("480p", (81, 480, 832)), ("240p", (33, 240, 416))) for lora in (0, 32))


def model_name(setup):
    """The planner's key of a setup's transformer, e.g. "wan-1.3B"; a ValueError for an unknown family or size."""
    if setup.family not in MODEL_SIZES or setup.model_size not in MODEL_SIZES[setup.family]:
        raise ValueError(f"--family {setup.family} --model_size {setup.model_size}: expected one of "
                         f"{[f'{f} {s}' for f, sizes in MODEL_SIZES.items() for s in sizes]}")
    return f"{setup.family}-{setup.model_size}"


def family_class(name):
    """The policy family class (model.py) of a planner key."""
    import model
    return model.HunyuanVideo15Policy if name.startswith("hunyuan") else model.wan.WanPolicy


# ------------------------------------------------------------------------------------------------
# Measurements.

@contextlib.contextmanager
def fake_world(world_size):
    """A fake process group of `world_size` ranks, this process rank 0 (collectives are no-ops)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore
    if dist.is_initialized():
        raise RuntimeError("the planner needs its own (fake) process group: expected none initialised, found one")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def transformer_kwargs(config=(), name=HUNYUAN):
    """Keyword arguments of HunyuanVideo15Transformer3DModel: the real 8.3B T2V model (diffusers' defaults with
    task_type t2v) with the (name, value) pairs of `config` over them. A tuple of pairs, not a dict, so that the
    cached measurements below can take it as a key: () is the real model (everything the planner plans);
    benchmarks/gpu_check.py --tiny measures the tiny model (tiny.TINY_TRANSFORMER_CONFIG) with the same functions.
    name: a Wan2.1 key ("wan-1.3B", "wan-14B") gives WanTransformer3DModel's published config instead."""
    from diffusers import HunyuanVideo15Transformer3DModel
    if name != HUNYUAN:
        return {**WAN21_CONFIGS[name.split("-", 1)[1]], **dict(config)}
    parameters = inspect.signature(HunyuanVideo15Transformer3DModel.__init__).parameters.values()
    defaults = {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}
    return {**defaults, "task_type": "t2v", **dict(config)}


def build_transformer(lora_rank=0, dtype=torch.float32, num_layers=None, config=(), name=HUNYUAN):
    """The real 8.3B HunyuanVideo-1.5 T2V transformer (or `config`'s, transformer_kwargs) on the meta device,
    prepared as distributed.load_policy prepares it (LoRA adapters or all parameters trainable)."""
    family = family_class(name)
    kwargs = transformer_kwargs(config, name)
    if num_layers:
        kwargs["num_layers"] = num_layers
    with torch.device("meta"):
        transformer = family.transformer_class(**kwargs)
    transformer = transformer.to(dtype)
    if lora_rank > 0:
        from peft import LoraConfig
        transformer.requires_grad_(False)
        transformer.add_adapter(LoraConfig(r=lora_rank, lora_alpha=lora_rank, init_lora_weights=True,
                                           target_modules=family.lora_targets))
    else:
        transformer.requires_grad_(True)
    return transformer


def _local_bytes(tensors):
    """Bytes of rank 0's local shards of (D)Tensors."""
    total = 0
    for t in tensors:
        local = t.to_local() if hasattr(t, "to_local") else t
        total += local.numel() * local.element_size()
    return total


LINEAR_IN_BLOCKS = ("weights", "gradients", "optimizer", "anchor", "parameters", "trainable")


def measure_states(world_size, lora_rank, optimizer_kind, num_layers=None, name=HUNYUAN):
    """Per-GPU bytes of the sharded policy: {"weights", "gradients", "optimizer", "anchor", "gathered",
    "parameters", "trainable"} (the last two: global counts), from the meta model sharded over a fake
    process group of `world_size` ranks (module docstring). num_layers: the number of blocks (default: the real
    model's 54).

    Measured on 1 and 2 blocks and extended to the rest: the blocks are identical and FSDP2 shards each
    parameter on its own, so every block adds the same bytes to rank 0 and each figure is exactly
    m(1) + (L − 1)·(m(2) − m(1)) (tested against a direct measurement). Stepping an optimizer over the 54
    blocks' DTensors on the meta device took ~15 s per setup; two small models take under one."""
    layers = num_layers or transformer_kwargs(name=name)["num_layers"]
    if layers <= 2:
        return _measure_states(world_size, lora_rank, optimizer_kind, layers, name)
    one, two = (_measure_states(world_size, lora_rank, optimizer_kind, n, name) for n in (1, 2))
    return {**one, **{key: one[key] + (layers - 1) * (two[key] - one[key]) for key in LINEAR_IN_BLOCKS}}


@functools.lru_cache(maxsize=None)
def _measure_states(world_size, lora_rank, optimizer_kind, num_layers, name=HUNYUAN):
    """measure_states, measured directly on a model of `num_layers` blocks."""
    from torch.distributed.device_mesh import init_device_mesh

    import distributed
    import optimizer as optim
    transformer = build_transformer(lora_rank, num_layers=num_layers, name=name)
    parameters = sum(p.numel() for p in transformer.parameters())
    trainable_count = sum(p.numel() for p in transformer.parameters() if p.requires_grad)
    blocks = family_class(name).blocks  # "transformer_blocks" (HunyuanVideo-1.5), "blocks" (Wan2.1)
    block_bytes = max(sum(p.numel() for p in b.parameters()) for b in getattr(transformer, blocks)) * BF16
    root_params = sum(p.numel() for n, p in transformer.named_parameters() if not n.startswith(blocks + "."))
    with fake_world(world_size):
        distributed.shard(transformer, init_device_mesh("cpu", (world_size,)), param_dtype=None)
        trainable = [p for p in transformer.parameters() if p.requires_grad]
        opt = optim.build_optimizer(transformer, optimizer_kind)
        for p in trainable:
            p.grad = torch.zeros_like(p)
        opt.step()  # creates the state tensors (on meta: shapes only)
        states = [v for state in opt.state.values() for v in state.values() if torch.is_tensor(v)]
        measured = {
            "weights": _local_bytes(transformer.parameters()),           # fp32 master shards (frozen base included)
            "gradients": _local_bytes(p.grad for p in trainable),        # fp32 gradient shards
            "optimizer": _local_bytes(states),
            "anchor": _local_bytes(transformer.parameters()) // FP32 * BF16,  # the same shards in bf16
        }
    # FSDP2 gathers one block in bf16 and prefetches the next; the root's own parameters stay gathered
    measured["gathered"] = 2 * block_bytes + root_params * BF16
    measured["parameters"], measured["trainable"] = parameters, trainable_count
    return measured


def block_inputs(device, dtype, video_tokens, text_tokens, batch=1, config=(), name=HUNYUAN):
    """Random inputs of one HunyuanVideo15TransformerBlock (real model: hidden D = 16 x 128 = 2048, rope dim d =
    128); all text tokens valid."""
    kwargs = transformer_kwargs(config, name)
    width, head_dim = kwargs["num_attention_heads"] * kwargs["attention_head_dim"], kwargs["attention_head_dim"]
    if name != HUNYUAN:  # WanTransformerBlock(hidden, text keys, temb (B, 6, D), RoPE (cos, sin) (1, Lv, 1, d))
        with torch.device(device):
            hidden = torch.randn(batch, video_tokens, width, dtype=dtype, requires_grad=True)  # (B, Lv, D)
            text = torch.randn(batch, text_tokens, width, dtype=dtype)                          # (B, Lt, D) projected
            temb = torch.randn(batch, 6, width, dtype=torch.float32)                            # (B, 6, D)
            freqs = (torch.randn(1, video_tokens, 1, head_dim), torch.randn(1, video_tokens, 1, head_dim))
        return hidden, text, temb, freqs
    with torch.device(device):
        hidden = torch.randn(batch, video_tokens, width, dtype=dtype, requires_grad=True)  # (B, Lv, D)
        text = torch.randn(batch, text_tokens, width, dtype=dtype, requires_grad=True)     # (B, Lt, D)
        temb = torch.randn(batch, width, dtype=dtype)                                       # (B, D)
        mask = torch.ones(batch, text_tokens, dtype=torch.bool)                             # (B, Lt)
        freqs = (torch.randn(video_tokens, head_dim), torch.randn(video_tokens, head_dim))  # cos, sin (Lv, d)
    return hidden, text, temb, mask, freqs


def build_block(device, dtype, lora_rank=0, config=(), name=HUNYUAN):
    """One block of the real model (or of `config`'s): a dual-stream HunyuanVideo-1.5 block or a Wan2.1 block,
    seeded random weights."""
    from diffusers.models.transformers.transformer_hunyuan_video15 import HunyuanVideo15TransformerBlock
    from diffusers.models.transformers.transformer_wan import WanTransformerBlock
    kwargs = transformer_kwargs(config, name)
    torch.manual_seed(0)
    with torch.device(device):
        if name == HUNYUAN:
            block = HunyuanVideo15TransformerBlock(kwargs["num_attention_heads"], kwargs["attention_head_dim"],
                                                   mlp_ratio=kwargs["mlp_ratio"], qk_norm=kwargs["qk_norm"]).to(dtype)
        else:
            width = kwargs["num_attention_heads"] * kwargs["attention_head_dim"]
            block = WanTransformerBlock(width, kwargs["ffn_dim"], kwargs["num_attention_heads"], kwargs["qk_norm"],
                                        kwargs["cross_attn_norm"], kwargs["eps"]).to(dtype)
    if lora_rank > 0:
        from peft import LoraConfig, inject_adapter_in_model
        block.requires_grad_(False)
        block = inject_adapter_in_model(LoraConfig(r=lora_rank, lora_alpha=lora_rank,
                                                   target_modules=family_class(name).lora_targets), block)
    return block


@functools.lru_cache(maxsize=None)
def calibration_block(config=(), name=HUNYUAN):
    """One real-size dual-stream block (hidden 2048, 16 heads; or `config`'s), random weights, bf16, CPU, with
    the attention processor train.py uses (parallel.KeyMaskAttnProcessor)."""
    import parallel
    block = build_block("cpu", torch.bfloat16, config=config, name=name)
    if name == HUNYUAN:  # Wan's own processor is what train.py runs
        block.attn.set_processor(parallel.KeyMaskAttnProcessor())
    return block


def saved_activation_bytes(video_tokens, text_tokens=CALIBRATION_TEXT, dtype=torch.bfloat16, config=(), block=None,
                           name=HUNYUAN):
    """Bytes autograd saves for backward in one real block's forward on the CPU (each storage once,
    parameters excluded): the activation memory of one sequence of video_tokens + text_tokens.
    block: another block of `config`'s shape to run instead, on its own device (benchmarks/gpu_check.py
    counts a GPU block the same way)."""
    block = calibration_block(config, name) if block is None else block
    device = next(block.parameters()).device
    parameter_storages = {p.untyped_storage().data_ptr() for p in block.parameters()}
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameter_storages:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        block(*block_inputs(device, dtype, video_tokens, text_tokens, config=config, name=name))
    return sum(saved.values())


@functools.lru_cache(maxsize=None)
def calibrate_activations(config=(), name=HUNYUAN):
    """Fit saved bytes = c + a·L + b·L² (L = video + text tokens) on CPU runs at CALIBRATION_LENGTHS.
    Returns {"per_token": a, "per_token_squared": b, "constant": c, "points": [(L, bytes)]}.
    Wan2.1: L = video tokens; the 512 text keys of cross-attention are a constant of every run (in c)."""
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if name != HUNYUAN:
        points = [(v, saved_activation_bytes(v, WAN_TEXT_TOKENS, name=name)) for v in CALIBRATION_LENGTHS]
    else:
        points = [(v + CALIBRATION_TEXT, saved_activation_bytes(v, config=config)) for v in CALIBRATION_LENGTHS]
    lengths = torch.tensor([float(n) for n, _ in points], dtype=torch.float64)
    design = torch.stack([torch.ones_like(lengths), lengths, lengths ** 2], dim=1)  # (3, 3): exact fit
    c, a, b = torch.linalg.solve(design, torch.tensor([float(s) for _, s in points], dtype=torch.float64)).tolist()
    return {"per_token": a, "per_token_squared": b, "constant": c, "points": points}


def block_activation_bytes(activation, tokens):
    """a·l + b·l²: what one block's forward saves for one sequence of `tokens` tokens (calibrate_activations'
    fit, without its constant)."""
    return activation["per_token"] * tokens + activation["per_token_squared"] * tokens ** 2


@functools.lru_cache(maxsize=None)
def measure_flops(video_tokens, text_tokens, lora_rank=0, config=(), name=HUNYUAN):
    """FLOPs of one sequence through one block (forward, backward) and through the token refiner and
    the patch embedding / output head (forward), counted by torch.utils.flop_counter on meta tensors
    (the real model, or `config`'s)."""
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    block = build_block("meta", torch.bfloat16, lora_rank, config, name)
    if lora_rank == 0:
        block.requires_grad_(True)
    inputs = block_inputs("meta", torch.bfloat16, video_tokens, text_tokens, config=config, name=name)
    with counter:
        outputs = block(*inputs)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)  # Hunyuan: (video, text); Wan: video
    forward = counter.get_total_flops()
    with counter:
        sum(output.float().sum() for output in outputs).backward()
    backward = counter.get_total_flops()
    if name != HUNYUAN:
        return {"block_forward": forward, "block_backward": backward,
                "rest_forward": _wan_rest_flops(video_tokens, text_tokens, name, counter, config),
                "num_blocks": transformer_kwargs(config, name)["num_layers"]}
    from diffusers import HunyuanVideo15Transformer3DModel
    with torch.device("meta"):
        model = HunyuanVideo15Transformer3DModel(**transformer_kwargs(config)).to(torch.bfloat16)
        text_in = torch.randn(1, text_tokens, model.config.text_embed_dim, dtype=torch.bfloat16)
        latent = torch.randn(1, model.config.in_channels, 1, 1, video_tokens, dtype=torch.bfloat16)
        width = model.config.num_attention_heads * model.config.attention_head_dim  # D
        tokens = torch.randn(1, video_tokens, width, dtype=torch.bfloat16)
        timestep, text_mask = torch.ones(1, dtype=torch.bfloat16), torch.ones(1, text_tokens)
    with counter:
        model.context_embedder(text_in, timestep, text_mask)
        model.x_embedder(latent)
        model.proj_out(tokens)
    return {"block_forward": forward, "block_backward": backward, "rest_forward": counter.get_total_flops(),
            "num_blocks": model.config.num_layers}


def _wan_rest_flops(video_tokens, text_tokens, name, counter, config=()):
    """Forward FLOPs of a Wan2.1 transformer outside its blocks: text projection of the 512 UMT5 tokens, patch
    embedding, time embedding, output head (counted on meta tensors)."""
    from diffusers import WanTransformer3DModel
    with torch.device("meta"):
        model = WanTransformer3DModel(**{**transformer_kwargs(config, name), "num_layers": 1}).to(torch.bfloat16)
        config = model.config
        width = config.num_attention_heads * config.attention_head_dim
        text = torch.randn(1, text_tokens, config.text_dim, dtype=torch.bfloat16)
        latent = torch.randn(1, config.in_channels, 1, 2, 2 * video_tokens, dtype=torch.bfloat16)  # Lv patches
        tokens = torch.randn(1, video_tokens, width, dtype=torch.bfloat16)
        timestep = torch.ones(1)
    with counter:
        model.condition_embedder(timestep, text, None)
        model.patch_embedding(latent)
        model.proj_out(tokens)
    return counter.get_total_flops()


def frozen_model_bytes(name=HUNYUAN):
    """bf16 bytes of the frozen models, built on meta from their configurations: {name: bytes}. Wan2.1: UMT5-XXL's
    encoder and the Wan VAE (held in float32: 4 bytes per parameter)."""
    from diffusers import AutoencoderKLHunyuanVideo15
    from transformers import (Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel, Qwen2VLConfig, Qwen2VLForConditionalGeneration,
                              T5Config, T5EncoderModel)
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    if name != HUNYUAN:
        from diffusers import AutoencoderKLWan
        from transformers import UMT5Config, UMT5EncoderModel
        with torch.device("meta"):
            text = count(UMT5EncoderModel(UMT5Config(**UMT5_XXL_ENCODER)))
            vae = count(AutoencoderKLWan())
            videoalign = count(Qwen2VLForConditionalGeneration(Qwen2VLConfig(**QWEN2_VL_2B)))
        return {"text_encoders": text * BF16, "vae": vae * FP32, "reward": videoalign * BF16}
    with torch.device("meta"):
        text = count(Qwen2_5_VLTextModel(Qwen2_5_VLTextConfig(**QWEN25_VL_7B_TEXT)))
        glyph = count(T5EncoderModel(T5Config(**BYT5_SMALL_ENCODER)))
        vae = count(AutoencoderKLHunyuanVideo15())
        videoalign = count(Qwen2VLForConditionalGeneration(Qwen2VLConfig(**QWEN2_VL_2B)))
    return {"text_encoders": (text + glyph) * BF16, "vae": vae * BF16, "reward": videoalign * BF16}


# ------------------------------------------------------------------------------------------------
# The plan of one setup.

def latent_grid(setup):
    """Latent (F, H, W) of the real VAE (4x temporal, 16x spatial): 81x352x624 -> (21, 22, 39)."""
    return (setup.num_frames - 1) // 4 + 1, setup.height // 16, setup.width // 16


def video_tokens(setup):
    """Latent tokens F·H·W at patch size 1: 81x352x624 -> 18,018."""
    return math.prod(latent_grid(setup))


def forward_flops(flops, sp_size=1):
    """FLOPs of one sequence's forward through the whole transformer on one rank (measure_flops' counts): every
    block (1/sp of each with sequence parallelism) and the rest (embedders, refiner, head: whole on every rank)."""
    return flops["num_blocks"] * flops["block_forward"] / sp_size + flops["rest_forward"]


def forward_equivalents(setup):
    """Transformer passes per video per iteration, the hardware-independent cost, as train.py counts them
    (meters.ForwardCount: one video through the transformer is one forward, a CFG pair two).

    rollout: N steps x the CFG branches (1 at --cfg_scale 1). update: each optimizer update recomputes the trained
    steps with gradients, ceil(fraction x K) of the SDE window's K steps (K = N without a window). anchor: the
    anchor's forward of each trained step, once per rollout (an anchor refresh inside a rollout adds one more;
    not counted here). forward_equivalents = rollout + anchor + update x (1 + 2 for the backward + 1 with gradient
    checkpointing). Returns {"branches", "forwards_rollout", "forwards_update", "forwards_anchor",
    "forward_equivalents"}.
    """
    branches = 1 if setup.cfg_scale == 1 else 2
    trained = max(1, math.ceil(setup.train_step_fraction * (setup.sde_window or setup.num_steps)))
    counts = {"branches": branches, "forwards_rollout": setup.num_steps * branches,
              "forwards_update": setup.updates_per_rollout * trained * branches,
              "forwards_anchor": trained * branches if setup.kl_mode in ("fixed", "moving", "dual") else 0}
    counts["forward_equivalents"] = (counts["forwards_rollout"] + counts["forwards_anchor"]
                                     + (3 + int(setup.gradient_checkpointing)) * counts["forwards_update"])
    return counts


def check_setup(setup):
    """Raise ValueError (expected vs found) for a setup train.py would refuse."""
    if setup.world_size % setup.sp_size:
        raise ValueError(f"--sp_size must divide the world size: {setup.world_size} % {setup.sp_size} != 0")
    name = model_name(setup)
    family_class(name).check_sp_size(transformer_kwargs(name=name), setup.sp_size)
    if video_tokens(setup) % setup.sp_size:
        raise ValueError(f"--sp_size {setup.sp_size} must divide the {video_tokens(setup)} video tokens of "
                         f"{setup.num_frames}x{setup.height}x{setup.width}")
    videos = setup.world_size // setup.sp_size * setup.videos_per_rank
    if videos % setup.group_size:
        raise ValueError(f"{setup.world_size} GPUs / sp {setup.sp_size} x {setup.videos_per_rank} videos per rank = "
                         f"{videos} videos per iteration: expected a multiple of --group_size {setup.group_size}")
    if (setup.num_frames - 1) % 4 or setup.height % 16 or setup.width % 16:
        raise ValueError(f"video must be 4k+1 frames and multiples of 16 pixels, found "
                         f"{setup.num_frames}x{setup.height}x{setup.width}")
    if not 0 <= setup.sde_window <= setup.num_steps:
        raise ValueError(f"--sde_window must be 0 (every step) … --num_steps {setup.num_steps}, found {setup.sde_window}")


def plan(setup, gpu_memory_gib=H100_MEMORY_GIB, mfu=MFU, peak_tflops=H100_PEAK_TFLOPS, text_tokens=PROMPT_TOKENS):
    """Memory (GiB per GPU, by component), FLOPs and time per iteration of `setup` -> dict."""
    check_setup(setup)
    name = model_name(setup)
    states = measure_states(setup.world_size, setup.lora_rank, setup.optimizer, name=name)
    frozen = frozen_model_bytes(name)
    activation = calibrate_activations(name=name)
    has_anchor = setup.kl_mode in ("fixed", "moving", "dual")
    kwargs = transformer_kwargs(name=name)
    width = kwargs["num_attention_heads"] * kwargs["attention_head_dim"]  # D: 2048 (Hunyuan), 1536 / 5120 (Wan)
    if name != HUNYUAN:  # Wan: the 512 text tokens are cross-attention keys, outside the split sequence
        text_tokens = WAN_TEXT_TOKENS
        length = video_tokens(setup)
    else:
        length = video_tokens(setup) + text_tokens      # L: one sequence, video + text
    local = math.ceil(length / setup.sp_size)            # l = L / sp tokens on each rank of the group
    passes = forward_equivalents(setup)
    sequences = passes["branches"] * setup.videos_per_rank  # S: CFG doubles the batch
    one_block = block_activation_bytes(activation, local)  # a·l + b·l²
    flops = measure_flops(video_tokens(setup), text_tokens, setup.lora_rank, name=name)
    blocks = flops["num_blocks"]
    if setup.gradient_checkpointing:  # block inputs of every block + one recomputed block, x2 in its backward
        activations = sequences * (blocks * width * BF16 * local + 2 * one_block)
    else:
        activations = sequences * blocks * one_block
    memory = {
        "weights (fp32 shards)": states["weights"],
        "gradients (fp32 shards)": states["gradients"],
        "optimizer states": states["optimizer"],
        "gathered bf16 weights (2 blocks + root)": states["gathered"],
        "anchor (bf16 shards)": states["anchor"] if has_anchor and not setup.anchor_offload else 0,
        ("text encoders (Qwen2.5-VL-7B + byT5)" if name == HUNYUAN else "text encoder (UMT5-XXL)"):
            0 if setup.text_encoder_offload else frozen["text_encoders"],
        "VAE" if name == HUNYUAN else "VAE (float32)": frozen["vae"],
        "reward model (VideoAlign, Qwen2-VL-2B)": frozen["reward"],
        "activations (update, checkpointed)" if setup.gradient_checkpointing else "activations (update)": activations,
        "framework overhead (assumed)": OVERHEAD_GIB * GIB,
    }
    memory = {name: value / GIB for name, value in memory.items()}
    total = sum(memory.values())

    # FLOPs per GPU per iteration: each rank of an SP group does 1/sp of the block work
    forward = forward_flops(flops, setup.sp_size)
    backward = blocks * flops["block_backward"] / setup.sp_size + 2 * flops["rest_forward"]
    recompute = blocks * flops["block_forward"] / setup.sp_size if setup.gradient_checkpointing else 0
    # the forward counts of forward_equivalents, each at its FLOPs (a backward is measured, not taken as 2 forwards)
    rollout = passes["forwards_rollout"] * setup.videos_per_rank * forward
    update = setup.videos_per_rank * (passes["forwards_update"] * (forward + backward + recompute)
                                      + passes["forwards_anchor"] * forward)
    iteration = rollout + update
    return {"setup": setup, "memory_gib": memory, "total_gib": total, "fits": total <= gpu_memory_gib,
            "gpu_memory_gib": gpu_memory_gib, "tokens": length, "local_tokens": local,
            "videos_per_iteration": setup.world_size // setup.sp_size * setup.videos_per_rank,
            "flops": {"rollout": rollout, "update": update, "iteration": iteration, "forward_per_sequence": forward},
            "forward_equivalents": passes["forward_equivalents"],
            "seconds": iteration / (peak_tflops * 1e12 * mfu), "mfu": mfu, "peak_tflops": peak_tflops,
            "parameters": states["parameters"], "trainable": states["trainable"]}


# Changes the planner tries on a setup that does not fit, in this order (memory savers that leave the
# method unchanged first; fewer videos per rank or smaller groups change the batch).
def candidate_changes(setup):
    """[(flag text, changed setup)] of one-flag changes that keep the run valid (check_setup)."""
    changes = []
    if not setup.text_encoder_offload:
        changes.append(("--text_encoder_offload", dataclasses.replace(setup, text_encoder_offload=True)))
    if not setup.anchor_offload and setup.kl_mode in ("fixed", "moving", "dual"):
        changes.append(("--anchor_offload", dataclasses.replace(setup, anchor_offload=True)))
    for sp in (2, 4, 8, 16):
        if sp > setup.sp_size:
            changes.append((f"--sp_size {sp}", dataclasses.replace(setup, sp_size=sp)))
    if setup.optimizer == "adamw" and setup.lora_rank == 0:
        changes.append(("--optimizer muon", dataclasses.replace(setup, optimizer="muon")))
    if setup.lora_rank == 0:
        changes.append(("--lora_rank 64", dataclasses.replace(setup, lora_rank=64)))
    for videos in range(setup.videos_per_rank - 1, 0, -1):  # fewer videos; smaller groups if they must shrink too
        changed = dataclasses.replace(setup, videos_per_rank=videos)
        per_iteration = setup.world_size // setup.sp_size * videos
        if per_iteration % setup.group_size == 0:
            changes.append((f"--videos_per_rank {videos}", changed))
        elif per_iteration >= 2:
            changes.append((f"--videos_per_rank {videos} --group_size {per_iteration}",
                            dataclasses.replace(changed, group_size=per_iteration)))
    valid = []
    for text, changed in changes:
        try:
            check_setup(changed)
        except ValueError:
            continue
        valid.append((text, changed))
    return valid


def suggest(setup, max_changes=3, max_suggestions=3, **limits):
    """What to change for a setup that does not fit: the fitting sets of the fewest changes (up to
    `max_changes` flags, at most `max_suggestions` of them) -> [(flag text, changed Setup)]; [] if it
    fits or if no set tried fits. Changes combine in candidate_changes' order, one value per flag."""
    if plan(setup, **limits)["fits"]:
        return []
    frontier = [((), setup)]
    for _ in range(max_changes):
        fitting, next_frontier = [], []
        for texts, current in frontier:
            for text, changed in candidate_changes(current):
                flag = text.split()[0]
                if any(t.split()[0] == flag for t in texts):  # one value per flag
                    continue
                combined = texts + (text,)
                if any(sorted(combined) == sorted(c) for c, _ in next_frontier):
                    continue
                next_frontier.append((combined, changed))
                if plan(changed, **limits)["fits"]:
                    fitting.append((" ".join(combined), changed))
                    if len(fitting) == max_suggestions:
                        return fitting
        if fitting:
            return fitting[:max_suggestions]
        frontier = next_frontier
    return []


# ------------------------------------------------------------------------------------------------
# Printing.

def table(plans):
    """A markdown table: components as rows, setups as columns."""
    names = list(dict.fromkeys(name for p in plans for name in p["memory_gib"]))
    header = "| per GPU | " + " | ".join(p["setup"].name for p in plans) + " |"
    lines = [header, "|---" * (len(plans) + 1) + "|"]
    row = lambda label, cells: lines.append(f"| {label} | " + " | ".join(cells) + " |")  # noqa: E731
    row("GPUs x sp, videos/rank (per iteration)", [f"{p['setup'].world_size} x {p['setup'].sp_size}, "
                                                     f"{p['setup'].videos_per_rank} ({p['videos_per_iteration']})"
                                                     for p in plans])
    row("video, tokens per sequence (per rank)", [f"{p['setup'].num_frames}x{p['setup'].height}x{p['setup'].width}, "
                                                   f"{p['tokens']:,} ({p['local_tokens']:,})" for p in plans])
    row("flags", [f"`{p['setup'].flags()}`" if p["setup"].flags() else "defaults" for p in plans])
    for name in names:
        row(name, [f"{p['memory_gib'].get(name, 0.0):.1f}" for p in plans])
    row(f"**total GiB** (H100: {plans[0]['gpu_memory_gib']})", [f"**{p['total_gib']:.1f}**" + ("" if p["fits"] else " ✗")
                                                               for p in plans])
    row("PFLOP per GPU per iteration (rollout + update)", [f"{p['flops']['iteration'] / 1e15:.0f} "
                                                          f"({p['flops']['rollout'] / 1e15:.0f} + "
                                                          f"{p['flops']['update'] / 1e15:.0f})" for p in plans])
    row("transformer forward-equivalents per video", [f"{p['forward_equivalents']}" for p in plans])
    row(f"time per iteration at {plans[0]['mfu']:.0%} MFU", [f"{p['seconds'] / 60:.1f} min" for p in plans])
    return "\n".join(lines)


def quadratic_term(activation):
    """' + b B x L' of the activation fit, or ' (no L² term)' when b is below one byte per 10^6 tokens (a flash
    attention saves no L x L matrix: the fit's b is then round-off, printed as ±0.0e+00 otherwise)."""
    b = activation["per_token_squared"]
    return " (no L² term)" if abs(b) < 1e-6 else f" + {b:.1e} B x L"


STARTED = time.monotonic()  # the planner's clock, for its progress lines


def progress(message):
    """One line on stderr per step of the planner, with the seconds so far: the measurements take tens of seconds
    on a CPU, and a planner that prints nothing until its table looks hung."""
    print(f"plan: {message} ({time.monotonic() - STARTED:.0f} s)", file=sys.stderr, flush=True)


def report(setups, **limits):
    plans = []
    for s in setups:
        progress(f"measuring {s.name}: states over {s.world_size} fake rank(s), FLOPs, activations")
        plans.append(plan(s, **limits))
    name = model_name(plans[0]["setup"])
    activation = calibrate_activations(name=name)
    lines = [table(plans), ""]
    for p in plans:
        if not p["fits"]:
            progress(f"{p['setup'].name} does not fit: trying up to 3 changes")
            fixes = suggest(p["setup"], **limits)
            lines.append(f"- {p['setup'].name}: does not fit ({p['total_gib']:.1f} GiB > {p['gpu_memory_gib']}); "
                         + (f"fits with: {' | '.join(f'`{text}`' for text, _ in fixes)}" if fixes else
                            "no set of up to 3 changes tried fits"))
    lines.append(f"\nMeasured: transformer parameters {measure_states(1, 0, 'adamw', name=name)['parameters'] / 1e9:.3f}B; activations per block per token "
                 f"{activation['per_token'] / 1024:.1f} KiB{quadratic_term(activation)} "
                 f"(bf16, CPU calibration at L = {', '.join(str(n) for n, _ in activation['points'])}); "
                 f"forward per sequence {plans[0]['flops']['forward_per_sequence'] / 1e12:.0f} TFLOP "
                 f"({plans[0]['setup'].name}).")
    return "\n".join(lines)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world_size", type=int, help="GPUs; with no setup flag at all, the standard setups are planned")
    for field in dataclasses.fields(Setup):
        if field.name in ("name", "world_size"):
            continue
        if field.type in (bool, "bool"):
            parser.add_argument(f"--{field.name}", action=argparse.BooleanOptionalAction, default=None)
        else:
            kind = {"int": int, "float": float, "str": str}.get(field.type, field.type)
            parser.add_argument(f"--{field.name}", type=kind, default=None)
    parser.add_argument("--gpu_memory_gib", type=float, default=H100_MEMORY_GIB, help="usable memory per GPU")
    parser.add_argument("--mfu", type=float, default=MFU, help="model FLOPs utilisation for the time estimate")
    parser.add_argument("--peak_tflops", type=float, default=H100_PEAK_TFLOPS, help="dense bf16 peak per GPU")
    return parser.parse_args(argv)


def main(argv=None):
    from diffusers.utils import logging
    logging.set_verbosity_error()  # "modules that should be kept in float32: []" on every meta build
    args = parse_args(sys.argv[1:] if argv is None else argv)
    limits = {"gpu_memory_gib": args.gpu_memory_gib, "mfu": args.mfu, "peak_tflops": args.peak_tflops}
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(Setup)
             if f.name != "name" and getattr(args, f.name, None) is not None}
    family_only = set(given) <= {"family", "model_size"}
    if given.get("family") == "wan" and "model_size" not in given:
        given["model_size"] = "1.3B"
    if family_only and given.get("family") == "wan":
        setups = [dataclasses.replace(s, model_size=given["model_size"]) for s in WAN_STANDARD_SETUPS]
    else:
        setups = [Setup("custom", **given)] if given else list(STANDARD_SETUPS)
    try:
        print(report(setups, **limits), flush=True)
    except ValueError as error:
        print(f"plan: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
