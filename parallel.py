"""Sequence (context) parallelism: the ranks of one group split each video's tokens (`--sp_size`).

The official recipe trains HunyuanVideo-1.5 with sequence parallelism 2 on 64 GPUs: one video's
activations never have to fit on one GPU. Here that is diffusers' own context-parallel machinery
(`ModelMixin.enable_parallelism` with a `ContextParallelConfig`, Ulysses attention of the "native"
SDPA backend), driven by a context-parallel plan for `HunyuanVideo15Transformer3DModel`, for which
diffusers 0.42.1 ships none.

Ranks and groups (`SequenceParallel`)
-------------------------------------
World W = dp·sp ranks on a 2-D mesh ("dp", "sp"); rank = dp_rank·sp + sp_rank, so an SP group is
sp consecutive ranks (one node on GPUs). The sp ranks of a group hold the SAME videos (same
prompts, same seeds, hence bit-identical noise and rollouts) and each computes 1/sp of every
video's tokens inside the transformer. Data-parallel groups ("dp") link the ranks with the same
sp_rank: rewards, advantages and counts are gathered over them, so that every video is counted
once, not sp times.

The plan (`HUNYUAN_VIDEO15_CP_PLAN`): where the tokens are split and gathered
------------------------------------------------------------------------------
In every dual-stream block, attention runs over ONE sequence: the video tokens (Lv, with RoPE)
followed by the text tokens (Lt: byT5 glyphs then Qwen2.5-VL tokens, padding masked), i.e.

    Q, K, V = [q(video); q(text)],   attention(Q, K, V, key mask)   (B, Lv + Lt, 16 heads, 128)

so the text tokens must be split too: a rank holding all Lt text tokens would, after Ulysses'
all-to-all, see each text key sp times. The plan splits at the input of the first block:

    hidden_states          (B, Lv, D)  -> (B, Lv/sp, D)     video tokens
    encoder_hidden_states  (B, Lt, D)  -> (B, Lt/sp, D)     text tokens (joined, reordered, padded)
    attention_mask         (B, Lt)     -> (B, Lt/sp)        their key mask
    freqs_cis (cos, sin)   (Lv, 128)   -> (Lv/sp, 128)      RoPE of the local video tokens

Every per-token operation (norms, modulation, projections, feed-forward) then works on the local
tokens; only attention needs the whole sequence, and diffusers' Ulysses attention provides it:
an all-to-all turns (B, L/sp, H, d) into (B, L, H/sp, d) (all tokens, 1/sp of the heads), SDPA,
and the inverse all-to-all back (heads must divide: 16 heads, sp in {2, 4, 8, 16}). Rank r's local
sequence is [video_r; text_r], so the gathered sequence is [video_0; text_0; video_1; text_1; ...]:
a permutation of the keys, which attention does not see (RoPE is applied per token before it, and
the key mask is gathered in the same order). The output projection `proj_out` all-gathers the
video tokens back, (B, Lv/sp, C) -> (B, Lv, C): every rank of the group returns the whole velocity.
Embedders, the text token refiner and the timestep embedding run before the split, on every rank
of the group (a few % of the FLOPs: they see the ~250 text tokens, not the 18k video tokens).

Two changes around the plan make it exact:
* Text padding (`pad_text_to_multiple`): diffusers' splitter needs Lt divisible by sp, so a hook on
  the first block appends masked zero tokens (never read: masked as keys in every block).
* Key-padding mask (`KeyMaskAttnProcessor`): diffusers' HunyuanVideo-1.5 processor builds a pairwise
  (B, 1, L, L) mask (query AND key valid); Ulysses can all-gather only a key mask of the local
  length. The processor here is diffusers' own with the mask (B, L) of the keys: real tokens see the
  same keys; padding queries now attend to the real keys instead of none, and no real token ever
  reads them (they are masked as keys), so the velocity is unchanged (tested against the unsplit
  forward). train.py uses it for sp = 1 too: the velocity is bit-identical (the same SDPA over the
  same keys), and the (B, 1, L, L) boolean mask, 2 bytes per token pair in every block (0.6 GiB per
  sequence at 480p), is gone; on CPU it also lets SDPA take its flash kernel: one forward of the tiny
  model at 5,184 tokens, 2.77 s with diffusers' pairwise mask, 0.43 s with the key mask.

Gradients. Each rank of a group back-propagates the same loss through its own tokens (the gather's
backward keeps the local slice; Ulysses' backward routes key/value gradients to their owners), so
the full gradient is the SUM of the group's gradients, and FSDP2's average over all W ranks, with
train.py's loss scaled by W over the global pair count, gives exactly the mean over the global
batch (tested: 2 ranks sp=2 = 1 rank, 4 ranks dp=2 x sp=2 = 1 rank).

FSDP2 shards over the whole mesh (all W ranks), not only "dp": parameters, gradients and optimizer
states take 1/W per GPU instead of 1/dp, and the reduce-scatter over W ranks is the sum over the
SP group plus the average over data-parallel groups that the gradient needs anyway. Replicating
over "sp" (HSDP) would hold sp copies of the states for no gain.

Wan2.1 (`WanTransformer3DModel`). diffusers ships its plan (`WanTransformer3DModel._cp_plan`), which `enable`
uses as it is: the video tokens (and their RoPE) are split at the input of the first block and gathered at
`proj_out`; self-attention is Ulysses (heads must divide: 12 in the 1.3B model, 40 in the 14B; the config
check calls `wan.check_sp_size`); cross-attention runs locally, each rank's video queries against all 512
text keys (the text is not split, every rank holds it whole, so there is no padding hook and no mask to
gather: Wan's transformer takes no text mask). Only the video tokens F·H/2·W/2 must split evenly
(`check_video_tokens`, a pre-hook like the Hunyuan one). The timestep is per sample (Wan2.1), so the plan's
per-token timestep split (Wan2.2) does not apply.

What diffusers 0.42.1 cannot do here, and what we do about it
* `enable_parallelism` derives the device as rank % torch.accelerator.device_count(): a
  ZeroDivisionError on a machine without an accelerator. `enable` supplies the config's device
  and mesh itself (`_resolve_on`), the only step of `enable_parallelism` it replaces.
* Ring attention (`ContextParallelConfig(ring_degree=...)`) rotates the key/value chunks but
  applies the LOCAL mask to every chunk, which is wrong with padded text; and "anything" modes
  have no backward. Only Ulysses is offered.
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F
from diffusers import ContextParallelConfig
from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput, ParallelConfig
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_hunyuan_video15 import HunyuanVideo15AttnProcessor2_0
from torch.distributed.device_mesh import init_device_mesh

import model

# Where the transformer's tokens are split (input of the first dual-stream block) and gathered
# (output of proj_out); see the module docstring.
HUNYUAN_VIDEO15_CP_PLAN = {
    "rope": {0: ContextParallelInput(split_dim=0, expected_dims=2, split_output=True),   # cos (Lv, d) -> (Lv/sp, d)
             1: ContextParallelInput(split_dim=0, expected_dims=2, split_output=True)},  # sin (Lv, d) -> (Lv/sp, d)
    "transformer_blocks.0": {
        "hidden_states": ContextParallelInput(split_dim=1, expected_dims=3),          # (B, Lv, D) -> (B, Lv/sp, D)
        "encoder_hidden_states": ContextParallelInput(split_dim=1, expected_dims=3),  # (B, Lt, D) -> (B, Lt/sp, D)
    },
    # every block receives the model's whole text mask: each cuts its own slice
    "transformer_blocks.*": {"attention_mask": ContextParallelInput(split_dim=1, expected_dims=2)},  # (B, Lt) -> (B, Lt/sp)
    "proj_out": ContextParallelOutput(gather_dim=1, expected_dims=3),                 # (B, Lv/sp, C) -> (B, Lv, C)
}


# ------------------------------------------------------------------------------------------------
# Ranks and groups.

class SequenceParallel:
    """The (dp, sp) layout of the world: which videos a rank holds and which ranks it talks to.

    sp = 1 is plain data parallelism (every rank its own videos; the groups are then trivial).
    E.g. W = 4, sp = 2: ranks 0, 1 hold videos [0, B) and ranks 2, 3 videos [B, 2B);
    dp groups {0, 2} and {1, 3}, sp groups {0, 1} and {2, 3}.
    """

    def __init__(self, sp_size, device_type="cpu"):
        world_size, rank = dist.get_world_size(), dist.get_rank()
        if sp_size < 1 or world_size % sp_size:
            raise ValueError(f"--sp_size must divide the world size: expected a divisor of {world_size}, "
                             f"found {sp_size}")
        self.sp_size, self.dp_size = sp_size, world_size // sp_size
        self.sp_rank, self.dp_rank = rank % sp_size, rank // sp_size
        if sp_size == 1:  # plain data parallelism: the default (world) group, no new process groups
            self.mesh = self.dp_group = self.sp_group = None
            return
        # (dp, ring, ulysses): diffusers' ContextParallelConfig slices its "ring" and "ulysses" dims
        # out of the mesh it is given; ring = 1 (Ulysses only, see the module docstring).
        self.mesh = init_device_mesh(device_type, (self.dp_size, 1, sp_size), mesh_dim_names=("dp", "ring", "ulysses"))
        self.dp_group = self.mesh["dp"].get_group()
        self.sp_group = self.mesh["ulysses"].get_group()

    def scored_rows(self, batch_size):
        """Rows of the group's B videos this rank decodes and scores: sp_rank, sp_rank + sp, ...
        E.g. B = 3, sp = 2: rank 0 -> [0, 2], rank 1 -> [1]. Every video exactly once per group."""
        return list(range(self.sp_rank, batch_size, self.sp_size))

    def gather_rows(self, values, rows, batch_size, names, device):
        """{name: (len(rows),) tensor} computed by each rank of the group for its own rows (`scored_rows`;
        a rank with none passes {}) -> {name: (B,) float32 tensor on `device`} on every rank of the
        group: one all-reduce of (len(names), B) zeros filled with the own rows; a failed row (NaN) stays NaN."""
        if self.sp_size == 1:
            return {name: values[name].float().to(device) for name in names}
        full = torch.zeros(len(names), batch_size, dtype=torch.float64, device=device)
        for i, name in enumerate(names):
            if rows:
                full[i, rows] = values[name].to(device=device, dtype=torch.float64)
        dist.all_reduce(full, group=self.sp_group)
        return {name: full[i].float() for i, name in enumerate(names)}


# ------------------------------------------------------------------------------------------------
# The transformer.

class KeyMaskAttnProcessor(HunyuanVideo15AttnProcessor2_0):
    """diffusers' HunyuanVideo15AttnProcessor2_0 with a key-padding mask (B, L) instead of the pairwise
    (B, 1, L, L) one, so that Ulysses can all-gather it (module docstring). Everything else as there."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        # video stream: QKV, RMS norm, RoPE  # (B, Lv, H, d)
        query, key, value = (proj(hidden_states).unflatten(2, (attn.heads, -1)) for proj in (attn.to_q, attn.to_k, attn.to_v))
        query, key = attn.norm_q(query), attn.norm_k(key)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        # text stream joins the same sequence  # (B, Lv + Lt, H, d)
        if encoder_hidden_states is not None:
            encoder_q, encoder_k, encoder_v = (proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
                                               for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
            if attn.norm_added_q is not None:
                encoder_q = attn.norm_added_q(encoder_q)
            if attn.norm_added_k is not None:
                encoder_k = attn.norm_added_k(encoder_k)
            query, key, value = (torch.cat(pair, dim=1) for pair in ((query, encoder_q), (key, encoder_k), (value, encoder_v)))
        # key mask: video tokens always valid, text tokens as given  # (B, Lv + Lt) bool
        key_mask = None if attention_mask is None else F.pad(
            attention_mask, (query.shape[1] - attention_mask.shape[1], 0), value=True).bool()
        hidden_states = dispatch_attention_fn(query, key, value, attn_mask=key_mask, dropout_p=0.0, is_causal=False,
                                              backend=self._attention_backend, parallel_config=self._parallel_config)
        hidden_states = hidden_states.flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is None:
            return hidden_states, None
        text_length = encoder_hidden_states.shape[1]
        hidden_states, encoder_hidden_states = hidden_states[:, :-text_length], hidden_states[:, -text_length:]
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        return hidden_states, attn.to_add_out(encoder_hidden_states)


def pad_text_to_multiple(multiple, image_tokens=0):
    """A forward pre-hook for the transformer: append masked zero Qwen2.5-VL tokens until the joined text
    sequence (image slot + byT5 + Qwen2.5-VL tokens, the transformer concatenates them) splits evenly:
    encoder_hidden_states (B, L, D), encoder_attention_mask (B, L) -> (B, L', D), (B, L') with
    (image_tokens + L2 + L') % multiple == 0. Also checks that the video tokens split evenly (they
    cannot be padded: RoPE and the unpatchify need the whole F x H x W grid)."""

    def hook(module, args, kwargs):
        if args or "encoder_hidden_states" not in kwargs:
            raise TypeError("sequence parallelism: call the transformer with keyword arguments (as model.cfg_velocity "
                            f"does), found {len(args)} positional arguments")
        _, _, frames, height, width = kwargs["hidden_states"].shape
        p, pt = module.config.patch_size, module.config.patch_size_t
        video_tokens = (frames // pt) * (height // p) * (width // p)
        if video_tokens % multiple:
            raise ValueError(f"--sp_size {multiple} must divide the number of video tokens: found {video_tokens} "
                             f"latent tokens (F·H·W = {frames}·{height}·{width}), {video_tokens % multiple} left over; "
                             f"choose another video size or --sp_size")
        text, mask = kwargs["encoder_hidden_states"], kwargs["encoder_attention_mask"]
        glyph = kwargs.get("encoder_hidden_states_2")
        image = kwargs.get("image_embeds")
        joined = text.shape[1] + (glyph.shape[1] if glyph is not None else 0) + (image.shape[1] if image is not None else 0)
        extra = -joined % multiple
        if extra:
            kwargs["encoder_hidden_states"] = F.pad(text, (0, 0, 0, extra))     # zero tokens  # (B, L + extra, D)
            kwargs["encoder_attention_mask"] = F.pad(mask, (0, extra), value=0)  # masked out
        return args, kwargs

    return hook


def _resolve_on(transformer, device, mesh):
    """`ModelMixin._resolve_parallel_config` with the device and mesh given (diffusers 0.42.1 computes the
    device as rank % torch.accelerator.device_count(), which divides by zero without an accelerator)."""

    def resolve(config):
        config = ParallelConfig(context_parallel_config=config) if isinstance(config, ContextParallelConfig) else config
        config.setup(dist.get_rank(), dist.get_world_size(), device, mesh=mesh)
        transformer._parallel_config = config
        return config

    return resolve


def enable(transformer, layout, device):
    """Split `transformer`'s tokens over the SP group of `layout` (a SequenceParallel) with its family's plan
    (`SEQUENCE_PARALLEL`). Works on a plain or FSDP2-sharded (and LoRA-wrapped) transformer of either family."""
    heads = transformer.config.num_attention_heads
    if heads % layout.sp_size:
        raise ValueError(f"--sp_size must divide the attention heads (Ulysses splits heads): expected a divisor of "
                         f"{heads}, found {layout.sp_size}")
    family = model.family_of_transformer(transformer)
    if family is None:
        raise ValueError(f"no sequence-parallel plan for a {type(transformer).__name__}: expected one of "
                         f"{[f.transformer_class.__name__ for f in model.FAMILIES.values()]}")
    return SEQUENCE_PARALLEL[family.family](transformer, layout, device)


def enable_hunyuan(transformer, layout, device):
    """Key-mask processors in every block (also for sp = 1: same velocity, no L x L mask), then, for
    sp > 1, the text-padding hook and diffusers' enable_parallelism with HUNYUAN_VIDEO15_CP_PLAN."""
    for block in transformer.transformer_blocks:
        block.attn.set_processor(KeyMaskAttnProcessor())
    if layout.sp_size == 1:
        return transformer
    transformer.register_forward_pre_hook(pad_text_to_multiple(layout.sp_size), with_kwargs=True)
    transformer._resolve_parallel_config = _resolve_on(transformer, device, layout.mesh)
    transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=layout.sp_size, mesh=layout.mesh),
                                   cp_plan=HUNYUAN_VIDEO15_CP_PLAN)
    return transformer


def check_video_tokens(multiple):
    """A forward pre-hook: the video tokens (F/pt)·(H/p)·(W/p) of hidden_states must split evenly over `multiple`
    ranks (they cannot be padded: RoPE and the unpatchify need the whole grid)."""

    def hook(module, args, kwargs):
        hidden_states = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        _, _, frames, height, width = hidden_states.shape
        pt, ph, pw = module.config.patch_size
        video_tokens = (frames // pt) * (height // ph) * (width // pw)
        if video_tokens % multiple:
            raise ValueError(f"--sp_size {multiple} must divide the number of video tokens: found {video_tokens} "
                             f"tokens ((F/{pt})·(H/{ph})·(W/{pw}) of a {frames}x{height}x{width} latent), "
                             f"{video_tokens % multiple} left over; choose another video size or --sp_size")
        return args, kwargs

    return hook


def enable_wan(transformer, layout, device):
    """Wan2.1: diffusers' own WanTransformer3DModel._cp_plan (module docstring); nothing to do for sp = 1."""
    if layout.sp_size == 1:
        return transformer
    transformer.register_forward_pre_hook(check_video_tokens(layout.sp_size), with_kwargs=True)
    transformer._resolve_parallel_config = _resolve_on(transformer, device, layout.mesh)
    transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=layout.sp_size, mesh=layout.mesh))
    return transformer


# Each family's sequence-parallel preparation (model.py's family name -> function).
SEQUENCE_PARALLEL = {"hunyuan": enable_hunyuan, "wan": enable_wan}
