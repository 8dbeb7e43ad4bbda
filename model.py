"""The policy: HunyuanVideo-1.5 as a stochastic sampler whose steps have log-probabilities.

The maths of one step is sde.py's (conventions fixed there). The policy of SAGE-GRPO is the
text-to-video model HunyuanVideo-1.5 (diffusers `HunyuanVideo15Transformer3DModel`, 8.3B, 54
blocks) sampled with classifier-free guidance. One rollout is a chain of Gaussian steps

    x_{σ_0} ~ N(0, I),   x_{σ_{i+1}} ~ N(μ_i, std_i²·I),   (μ_i, std_i) = sde.transition(kernel,
                                                                  x_{σ_i}, v_θ(x_{σ_i}, σ_i), σ_i, σ_{i+1}, η)

whose velocity is the CFG combination of one batched forward pass

    v_θ = v_uncond + s·(v_cond − v_uncond),      s = 6 (HunyuanVideo-1.5 480p t2v guider config),

with timestep input σ·1000. GRPO needs, for every recorded step, log N(x_{σ_{i+1}}; μ_i, std_i²)
(averaged over latent elements, sde.log_prob) both at rollout time (no gradient: π_old) and at
update time (with gradient: π_θ); `rollout` records the first and `transition_log_prob` recomputes
the second from the same recorded latents.

What this file does, top to bottom
----------------------------------
* `load_hunyuan(path)`: the diffusers-format directory (what `HunyuanVideo15Pipeline.save_pretrained`
  writes) -> `HunyuanVideo15Policy` (transformer, VAE, both text encoders, scheduler shift, guidance
  scale). A directory with a missing piece fails before any weight is read, naming the piece.
  `sampling_defaults(path)`: the checkpoint's shift and CFG scale alone (its JSON configs), the
  values every run samples with unless the user overrides them.
* `encode_prompts`: Qwen2.5-VL hidden states + byT5 glyph embeddings, conditional and unconditional,
  computed once per prompt with the pipeline's own `encode_prompt` (so they are the diffusers ones
  bit for bit) and reused for every rollout of a group and every step.
* `cfg_velocity`: the guided velocity, conditional and unconditional in ONE transformer forward
  (batch 2B); gradients flow through both halves.
* `rollout`: N steps of any sde.py kernel from per-sample seeded noise -> `Rollout` (latents,
  log-probs, means, stds, sigmas, seeds). `transition_log_prob`: the same step's (mean, std,
  log_prob) recomputed with gradients for any per-sample step indices.
* `decode_latents`: latents -> frames in [0, 1], (B, F, 3, H, W); `set_vae_tiling` switches the VAE's
  spatial tiling (train.py / eval.py `--vae_tiling`, on by default on CUDA).

A tiny random HunyuanVideo-1.5 in the same layout, for tests and `--tiny` runs, is built by tiny.py.

Policy families (HunyuanVideo-1.5 here, Wan2.1 in wan.py)
---------------------------------------------------------
The family of a checkpoint is its model_index.json `_class_name` (`family_of`): `HunyuanVideo15Pipeline` ->
`HunyuanVideo15Policy` (this file), `WanPipeline` -> `wan.WanPolicy`; any other pipeline (an image-to-video
checkpoint, an unknown family) is refused in one line. `load_policy_family(path)` loads either. Each family's
policy object answers the same questions:
    check_directory(path), sampling_defaults(path) -> (shift, cfg), load(path, device, dtype, load_transformer)
    latent_shape(frames, height, width)       (C, F, H, W), ValueError for a size the family cannot make
    encode_prompts(prompts, negative_prompt)  the family's PromptEmbeds (cond + uncond), cached by PromptCache
    decode(latents), set_vae_tiling(enabled)  frames (B, F, 3, H, W) in [0, 1]
    text_encoders, release_text_encoder()     for offloading / freeing the encoders once the cache is full
    transformer_class, blocks, lora_targets, hidden_blocks, check_sp_size(config, sp),
    computed_buffers(transformer)             (distributed.py, optimizer.py, parallel.py, plan.py)
and its prompt embeddings supply `guided_velocity(transformer, x, σ, s)`: the CFG velocity in one batched
forward. `rollout` and `transition_log_prob` call only that, so the sampler, sde.py and the losses never ask
which family they run.

How the transformer is fed (matches `HunyuanVideo15Pipeline.__call__`, diffusers 0.42.1, T2V)
---------------------------------------------------------------------------------------------
* hidden_states = cat([x, zeros like x (image-condition latents), zeros (B, 1, F, H, W) (mask)],
  dim=1): 2C+1 = 65 channels. For T2V both extra inputs are zero.
* image_embeds = zeros (B, 0, image_embed_dim): the SigLIP slot. The pipeline passes 729 zero
  tokens; an all-zero slot means "text to video", and the transformer then multiplies it by 0 and
  gives it an all-False attention mask, so those tokens never reach a real one: we pass none.
* encoder_hidden_states(_2), encoder_attention_mask(_2): Qwen2.5-VL and byT5 embeddings with their
  padding masks (the transformer reorders valid tokens first). The pipeline pads them to 1000 and
  256 tokens; `encode_prompts` keeps only as many as the longest real prompt of the batch
  (conditional and negative together), see `PromptEmbeds.trim_padding`.
* timestep = σ·1000 per sample, in the transformer's dtype.

Differences from the diffusers pipeline (in float32 none changes the velocity beyond round-off, tested
in tests/test_model.py; in bf16 the different batch shapes and token counts round differently)
* cond and uncond are one batch of 2B (the pipeline runs two forwards through its guider; the
  official SAGE-GRPO code batches them too, unconditional rows first);
* padding tokens (text, glyph, image slot) are dropped instead of computed and masked: the same
  attention over the same real tokens, ~10% of the linear and ~20% of the attention FLOPs at
  81×352×624 (velocity equal to float round-off, tested);
* the latent state is kept in float32 between steps whatever the transformer dtype (the pipeline's
  scheduler also steps in float32 but casts back to the model dtype after every step); only the
  transformer input is cast;
* the sampler is any sde.py kernel; with kernel "ode" it is the pipeline's Euler sampler.

Known library issue: the HunyuanVideo-1.5 VAE of diffusers 0.42 fails on batch > 1, so
`decode_latents` decodes one sample at a time.
"""
import contextlib
import dataclasses
import json
import os

import torch
from diffusers import (AutoencoderKLHunyuanVideo15, FlowMatchEulerDiscreteScheduler, HunyuanVideo15Pipeline,
                       HunyuanVideo15Transformer3DModel)
from diffusers.guiders import ClassifierFreeGuidance

import hub
import sde
import wan

# ----------------------------------------------------------------------------------------------
# Constants (each with where it comes from).

# Rollout video size: the official 480p bucket (Tencent-Hunyuan/SAGE-GRPO post_train.py sample_n_frames 81,
# 352x624): the latent (32, 21, 22, 39). The default of train.py / eval.py for this family (config.default_video_size).
DEFAULT_NUM_FRAMES = 81
DEFAULT_HEIGHT = 352
DEFAULT_WIDTH = 624
# CFG scale s: HunyuanVideo-1.5 480p/720p t2v guider config (diffusers conversion script,
# GUIDANCE_CONFIGS) and the SAGE-GRPO paper / official code's sampling setting.
DEFAULT_GUIDANCE_SCALE = 6.0
# Model timestep input = σ·1000: FlowMatchEulerDiscreteScheduler's num_train_timesteps.
TIMESTEP_SCALE = 1000.0
# SigLIP semantic tokens of the image-condition slot: the pipeline passes 729 zero tokens for T2V
# (HunyuanVideo15Pipeline.vision_num_semantic_tokens in diffusers 0.42.1), which the transformer
# masks out entirely when they are all zero; we pass none (same velocity, tested).
IMAGE_EMBED_TOKENS = 0
# Negative prompt for the unconditional branch: the pipeline's default (None -> "").
DEFAULT_NEGATIVE_PROMPT = ""
# LoRA targets (distributed.py, --lora_rank): every attention projection of the dual-stream blocks (video and
# text streams), as diffusers' HunyuanVideo LoRA training scripts target.
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
# The repeated blocks whose 2-D matrices Muon's "hidden" grouping takes (optimizer.py).
HIDDEN_BLOCKS = ("transformer_blocks.", "refiner_blocks.")

# What `HunyuanVideo15Pipeline.save_pretrained` writes: subfolder -> the file that must be in it.
# Weights are checked separately (WEIGHT_SUFFIXES) for the four model subfolders.
REQUIRED_FILES = {
    "transformer": "config.json",
    "vae": "config.json",
    "text_encoder": "config.json",
    "tokenizer": "tokenizer_config.json",
    "text_encoder_2": "config.json",
    "tokenizer_2": "tokenizer_config.json",
    "scheduler": "scheduler_config.json",
}
MODEL_SUBFOLDERS = ("transformer", "vae", "text_encoder", "text_encoder_2")
WEIGHT_SUFFIXES = (".safetensors", ".bin")



# ----------------------------------------------------------------------------------------------
# Loading.

@dataclasses.dataclass
class HunyuanVideo15Policy:
    """The loaded HunyuanVideo-1.5 components.

    `pipeline` is the diffusers `HunyuanVideo15Pipeline` holding them all (text encoders,
    tokenizers, VAE, scheduler); `transformer` is the trained policy network (the trainer may wrap
    it, e.g. with FSDP2, and pass the wrapped module to `cfg_velocity` / `rollout`).
    """
    pipeline: HunyuanVideo15Pipeline
    shift: float            # schedule shift s of σ <- sσ/(1+(s−1)σ), from scheduler/scheduler_config.json
    guidance_scale: float   # CFG scale, from guider/guider_config.json (DEFAULT_GUIDANCE_SCALE without one)

    # the family interface (module docstring)
    family = "hunyuan"
    pipeline_class = "HunyuanVideo15Pipeline"
    transformer_class = HunyuanVideo15Transformer3DModel
    blocks = "transformer_blocks"  # FSDP2 shards each block of this list (distributed.shard)
    lora_targets = LORA_TARGETS
    hidden_blocks = HIDDEN_BLOCKS
    default_negative_prompt = DEFAULT_NEGATIVE_PROMPT
    default_video_size = (DEFAULT_NUM_FRAMES, DEFAULT_HEIGHT, DEFAULT_WIDTH)  # frames, height, width

    @staticmethod
    def check_directory(path):
        check_hunyuan_directory(path)

    @staticmethod
    def sampling_defaults(path):
        return sampling_defaults(path)

    @staticmethod
    def load(path, device="cpu", dtype=torch.bfloat16, load_transformer=True):
        return load_hunyuan(path, device=device, dtype=dtype, load_transformer=load_transformer)

    @staticmethod
    def check_sp_size(transformer_config, sp_size):
        """Raise ValueError unless sp_size divides the attention heads (Ulysses splits heads; 16 in the 8.3B)."""
        heads = transformer_config["num_attention_heads"]
        if sp_size < 1 or heads % sp_size:
            raise ValueError(f"--sp_size must divide the attention heads (Ulysses splits heads): expected a divisor "
                             f"of {heads}, found {sp_size}")

    @property
    def text_encoders(self):
        """The frozen text encoders (PromptCache moves them with offload): Qwen2.5-VL and byT5."""
        return tuple(m for m in (self.pipeline.text_encoder, self.pipeline.text_encoder_2) if m is not None)

    @staticmethod
    def computed_buffers(transformer):
        """Non-persistent buffers to recompute after a meta-device build (distributed.load_policy): none."""
        return {}

    def release_text_encoder(self):
        """Drop both text encoders once every prompt of the run is cached; returns the bytes freed."""
        freed = sum(p.numel() * p.element_size() for m in self.text_encoders for p in m.parameters())
        self.pipeline.text_encoder = self.pipeline.text_encoder_2 = None
        return freed

    def encode_prompts(self, prompts, negative_prompt=DEFAULT_NEGATIVE_PROMPT, device=None, dtype=None,
                       trim_padding=True):
        return encode_prompts(self, prompts, negative_prompt, device=device, dtype=dtype, trim_padding=trim_padding)

    def decode(self, latents):
        return decode_latents(self.vae, latents)

    def set_vae_tiling(self, enabled=None):
        """`set_vae_tiling` of this family's VAE (diffusers' HunyuanVideo-1.5 tiles); returns whether it is on."""
        return set_vae_tiling(self.vae, enabled)

    @property
    def transformer(self) -> HunyuanVideo15Transformer3DModel:
        return self.pipeline.transformer

    @property
    def vae(self) -> AutoencoderKLHunyuanVideo15:
        return self.pipeline.vae

    def latent_shape(self, num_frames, height, width):
        """(C, F, H, W) of the latent of a video of num_frames × height × width pixels.

        As `HunyuanVideo15Pipeline.prepare_latents`: F = (frames − 1)/4 + 1, H = height/16, W = width/16
        for the real VAE (4× temporal, 16× spatial, 32 channels); e.g. 81×352×624 -> (32, 21, 22, 39).
        """
        temporal = self.vae.temporal_compression_ratio
        spatial = self.vae.spatial_compression_ratio
        if (num_frames - 1) % temporal or height % spatial or width % spatial:
            raise ValueError(f"video size must be (k·{temporal} + 1) frames × multiples of {spatial} pixels, "
                             f"got {num_frames} frames × {height} × {width}")
        return (self.vae.config.latent_channels, (num_frames - 1) // temporal + 1, height // spatial, width // spatial)


def check_hunyuan_directory(path):
    """Raise FileNotFoundError naming every missing piece of a diffusers-format HunyuanVideo-1.5 directory."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"HunyuanVideo-1.5 directory {path!r} does not exist (expected the diffusers-format "
                                f"directory written by HunyuanVideo15Pipeline.save_pretrained)")
    missing = []
    if not os.path.isfile(os.path.join(path, "model_index.json")):
        missing.append("model_index.json")
    for subfolder, required_file in REQUIRED_FILES.items():
        folder = os.path.join(path, subfolder)
        if not os.path.isdir(folder):
            missing.append(f"{subfolder}/")
            continue
        if not os.path.isfile(os.path.join(folder, required_file)):
            missing.append(f"{subfolder}/{required_file}")
        if subfolder in MODEL_SUBFOLDERS and not any(name.endswith(WEIGHT_SUFFIXES) for name in os.listdir(folder)):
            missing.append(f"{subfolder}/ weights (*.safetensors)")
    if missing:
        found = sorted(os.listdir(path))
        raise FileNotFoundError(
            f"HunyuanVideo-1.5 directory {path!r} is incomplete: missing {', '.join(missing)}. Expected the "
            f"diffusers layout of HunyuanVideo15Pipeline.save_pretrained (model_index.json and "
            f"{', '.join(s + '/' for s in REQUIRED_FILES)}, optionally guider/); found {found}.")


def sampling_defaults(path):
    """(shift, guidance_scale) a checkpoint samples with: scheduler/ and guider/ configs (JSON only, no weights).

    The one source of both values: train.py and eval.py use them unless the user passes --shift or
    --cfg_scale. A directory without guider/ gets DEFAULT_GUIDANCE_SCALE.
    """
    path = hub.resolve_path(path, "HunyuanVideo-1.5")  # a directory, or a hub id in the hub cache
    check_hunyuan_directory(path)
    scheduler_config = FlowMatchEulerDiscreteScheduler.load_config(os.path.join(path, "scheduler"))
    if scheduler_config.get("use_dynamic_shifting", False):
        raise ValueError(f"{path}/scheduler uses dynamic (resolution-dependent) shifting; this code samples the "
                         f"fixed-shift schedule σ <- sσ/(1+(s−1)σ) of HunyuanVideo-1.5 (use_dynamic_shifting = false)")
    if scheduler_config.get("num_train_timesteps", TIMESTEP_SCALE) != TIMESTEP_SCALE:
        raise ValueError(f"expected num_train_timesteps = {TIMESTEP_SCALE:g} in {path}/scheduler, "
                         f"found {scheduler_config['num_train_timesteps']}")
    guider_dir = os.path.join(path, "guider")
    guidance_scale = DEFAULT_GUIDANCE_SCALE
    if os.path.isdir(guider_dir):
        guidance_scale = ClassifierFreeGuidance.load_config(guider_dir).get("guidance_scale", DEFAULT_GUIDANCE_SCALE)
    return float(scheduler_config.get("shift", 1.0)), float(guidance_scale)


def load_hunyuan(path, device="cpu", dtype=torch.bfloat16, load_transformer=True):
    """Load HunyuanVideo-1.5 from a diffusers-format directory.  Returns HunyuanVideo15Policy.

    path:   a local directory, or a hub id (hunyuanvideo-community/HunyuanVideo-1.5-480p_t2v) already in the
            hub cache (hub.py); never downloaded.
    dtype:  dtype of every component (bf16 on GPU; float32 for CPU tests and parity checks).
    load_transformer: False leaves `pipeline.transformer` None, for a caller that builds the policy
            itself (train.py: read once, in fp32, on rank 0 only).
    """
    path = hub.resolve_path(path, "HunyuanVideo-1.5")
    shift, guidance_scale = sampling_defaults(path)
    extra = {}
    if not os.path.isdir(os.path.join(path, "guider")):  # the guider only carries the CFG scale
        extra["guider"] = ClassifierFreeGuidance(guidance_scale=guidance_scale)

    if not load_transformer:
        extra["transformer"] = None
    pipeline = HunyuanVideo15Pipeline.from_pretrained(path, dtype=dtype, **extra).to(device)
    pipeline.set_progress_bar_config(disable=True)
    for module in (pipeline.transformer, pipeline.vae, pipeline.text_encoder, pipeline.text_encoder_2):
        if module is not None:
            module.eval().requires_grad_(False)  # the trainer re-enables gradients on the transformer
    return HunyuanVideo15Policy(pipeline=pipeline, shift=shift, guidance_scale=guidance_scale)


# ----------------------------------------------------------------------------------------------
# Families: which policy a checkpoint directory holds.

# model_index.json `_class_name` -> the family's policy class (module docstring: what each answers).
FAMILIES = {HunyuanVideo15Policy.pipeline_class: HunyuanVideo15Policy, wan.WanPolicy.pipeline_class: wan.WanPolicy}


def family_named(name):
    """The policy class of a family name ("hunyuan", "wan": train.py --tiny_family); ValueError for another."""
    names = {family.family: family for family in FAMILIES.values()}
    if name not in names:
        raise ValueError(f"unknown policy family {name!r}: expected one of {sorted(names)}")
    return names[name]


def family_of(path):
    """The policy class of a diffusers checkpoint directory (or cached hub id), from model_index.json's
    `_class_name` alone (no weights): HunyuanVideo15Policy or wan.WanPolicy. Any other pipeline, an
    image-to-video one included, is a one-line ValueError naming what was found and what is supported."""
    path = hub.resolve_path(path, "checkpoint")
    index = os.path.join(path, "model_index.json")
    if not os.path.isfile(index):
        raise FileNotFoundError(f"{path!r} has no model_index.json: expected a diffusers pipeline directory of one of "
                                f"{sorted(FAMILIES)}, found {sorted(os.listdir(path))}")
    with open(index) as f:
        name = json.load(f).get("_class_name")
    if name not in FAMILIES:
        raise ValueError(f"{path!r} holds a {name!r} checkpoint (model_index.json _class_name); supported are "
                         f"text-to-video {' and '.join(sorted(FAMILIES))}")
    return FAMILIES[name]


def transformer_class_of(transformer_dir):
    """The transformer class a saved transformer directory (config.json `_class_name`) loads with: either family's,
    for a checkpoint's transformer/ that has no model_index.json beside it."""
    with open(os.path.join(transformer_dir, "config.json")) as f:
        name = json.load(f).get("_class_name") or ""
    name = name[len("FSDP"):] if name.startswith("FSDP") else name  # checkpoints that kept FSDP2's wrapper name
    classes = {family.transformer_class.__name__: family.transformer_class for family in FAMILIES.values()}
    if name not in classes:
        raise ValueError(f"{transformer_dir!r} holds a {name!r} (config.json _class_name); supported are "
                         f"{' and '.join(sorted(classes))}")
    return classes[name]


def family_of_weights(path):
    """The family of a directory that holds a policy's weights: a pipeline directory (its model_index.json), or a
    training checkpoint, whose transformer/ stands alone (its config.json's class)."""
    if os.path.isfile(os.path.join(path, "model_index.json")):
        return family_of(path)
    transformer_class = transformer_class_of(os.path.join(path, "transformer"))
    return next(family for family in FAMILIES.values() if family.transformer_class is transformer_class)


def family_of_transformer(transformer):
    """The policy class whose transformer `transformer` is (FSDP2- and LoRA-wrapped modules keep their class),
    or None for a module of no family."""
    return next((family for family in FAMILIES.values() if isinstance(transformer, family.transformer_class)), None)


def load_policy_family(path, device="cpu", dtype=torch.bfloat16, load_transformer=True):
    """Load the policy of whatever family `path` holds (family_of): HunyuanVideo15Policy or wan.WanPolicy."""
    return family_of(path).load(path, device=device, dtype=dtype, load_transformer=load_transformer)


# ----------------------------------------------------------------------------------------------
# Prompt embeddings: computed once per prompt, reused by all G rollouts and all N steps.

@dataclasses.dataclass
class PromptEmbeds:
    """Text conditioning of B samples, conditional and unconditional (the negative prompt).

    embeds (B, L, D) Qwen2.5-VL hidden states, mask (B, L); embeds_2 (B, L2, D2) byT5 glyph embeddings
    (all-zero with an all-zero mask when the prompt quotes no text), mask_2 (B, L2). The pipeline pads
    L to 1000 and L2 to 256; after `trim_padding` they are the longest real lengths of the batch.
    The negative_* fields are the same for the unconditional branch (same L and L2: one CFG batch).
    """
    embeds: torch.Tensor
    mask: torch.Tensor
    embeds_2: torch.Tensor
    mask_2: torch.Tensor
    negative_embeds: torch.Tensor
    negative_mask: torch.Tensor
    negative_embeds_2: torch.Tensor
    negative_mask_2: torch.Tensor

    def _map(self, fn):
        return PromptEmbeds(**{f.name: fn(getattr(self, f.name)) for f in dataclasses.fields(self)})

    def __len__(self):
        return self.embeds.shape[0]

    def select(self, index):
        """Rows `index` (a LongTensor or list), e.g. one row per sample of a training micro-batch."""
        index = torch.as_tensor(index, device=self.embeds.device, dtype=torch.long)
        return self._map(lambda t: t.index_select(0, index))

    def repeat_interleave(self, group_size):
        """Each prompt `group_size` times in a row: prompts [a, b] -> samples [a, a, …, b, b, …] (GRPO groups)."""
        return self._map(lambda t: t.repeat_interleave(group_size, dim=0))

    def guided_velocity(self, transformer, latents, sigma, guidance_scale):
        """The family's CFG velocity (rollout and transition_log_prob call this): `cfg_velocity`."""
        return cfg_velocity(transformer, latents, sigma, self, guidance_scale)

    def unconditional(self):
        """The same rows with the negative prompt as the conditional one (self_check's separate forwards)."""
        return dataclasses.replace(self, embeds=self.negative_embeds, mask=self.negative_mask,
                                   embeds_2=self.negative_embeds_2, mask_2=self.negative_mask_2)

    # PromptCache: one prompt's real tokens on the CPU, and rows rebuilt from them.
    def real_tokens(self):
        """Row 0's real tokens (text (L, D), glyph (L2, D2)) and the negative prompt's, on the CPU."""
        real = lambda embeds, mask: embeds[0][mask[0].bool()].cpu()  # noqa: E731
        return ((real(self.embeds, self.mask), real(self.embeds_2, self.mask_2)),
                (real(self.negative_embeds, self.negative_mask), real(self.negative_embeds_2, self.negative_mask_2)))

    def from_real_tokens(self, rows, negative, device):
        """PromptEmbeds of `rows` (each a `real_tokens()[0]`) and the negative row, each stream padded with zeros
        (mask 0) to the longest real length of the rows and the negative prompt."""
        fields = {}
        for stream, suffix in ((0, ""), (1, "_2")):
            length = max(r[stream].shape[0] for r in list(rows) + [negative])
            padded = [_pad_tokens(r[stream], length, self.mask.dtype) for r in rows]
            negative_row = _pad_tokens(negative[stream], length, self.mask.dtype)
            fields[f"embeds{suffix}"] = torch.stack([e for e, _ in padded]).to(device)
            fields[f"mask{suffix}"] = torch.stack([m for _, m in padded]).to(device)
            fields[f"negative_embeds{suffix}"] = negative_row[0].expand(len(rows), -1, -1).contiguous().to(device)
            fields[f"negative_mask{suffix}"] = negative_row[1].expand(len(rows), -1).contiguous().to(device)
        return PromptEmbeds(**fields)

    def trim_padding(self):
        """Drop the padding tokens the transformer would mask: each stream (text, glyph) keeps, in every
        row, its real tokens first (in order), then padding up to the longest real length over all rows,
        conditional and negative together, so that CFG stays one batch of 2B.

        The transformer puts each row's real tokens first and masks the rest out of attention (queries
        and keys), so the velocity is the untrimmed one up to float round-off (tested).
        """
        text_length = int(torch.cat([self.mask, self.negative_mask]).bool().sum(1).max())
        glyph_length = int(torch.cat([self.mask_2, self.negative_mask_2]).bool().sum(1).max())
        trimmed = {}
        for prefix in ("", "negative_"):
            for suffix, length in (("", text_length), ("_2", glyph_length)):
                embeds, mask = getattr(self, f"{prefix}embeds{suffix}"), getattr(self, f"{prefix}mask{suffix}")
                embeds, mask = _real_tokens_first(embeds, mask, length)
                trimmed[f"{prefix}embeds{suffix}"], trimmed[f"{prefix}mask{suffix}"] = embeds, mask
        return PromptEmbeds(**trimmed)


def _real_tokens_first(embeds, mask, length):
    """Each row's real tokens first, in order (as the transformer reorders them), cut to `length` tokens.
    embeds (B, L, D), mask (B, L) -> (B, length, D), (B, length)."""
    order = torch.argsort((mask == 0).to(torch.uint8), dim=1, stable=True)[:, :length]  # (B, length)
    return embeds.gather(1, order[..., None].expand(-1, -1, embeds.shape[-1])), mask.gather(1, order)


@torch.no_grad()
def encode_prompts(policy, prompts, negative_prompt=DEFAULT_NEGATIVE_PROMPT, device=None, dtype=None,
                   trim_padding=True):
    """Encode B prompts (and the negative prompt, once) with the pipeline's own `encode_prompt`.

    Returns PromptEmbeds with B rows; dtype defaults to the transformer's (as in the pipeline).
    trim_padding: drop the padding the transformer masks anyway (PromptEmbeds.trim_padding);
    False keeps the pipeline's 1000 + 256 tokens.
    """
    if isinstance(prompts, str) or not prompts:
        raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r}")
    pipeline = policy.pipeline
    device = device if device is not None else pipeline.transformer.device
    dtype = dtype if dtype is not None else pipeline.transformer.dtype
    embeds, mask, embeds_2, mask_2 = pipeline.encode_prompt(prompt=list(prompts), device=device, dtype=dtype,
                                                            batch_size=len(prompts))
    negative = pipeline.encode_prompt(prompt=[negative_prompt], device=device, dtype=dtype, batch_size=1)
    # the negative prompt is the same for every sample: encode once, expand to B rows
    negative_embeds, negative_mask, negative_embeds_2, negative_mask_2 = (t.expand(len(prompts), *t.shape[1:])
                                                                          for t in negative)
    prompt_embeds = PromptEmbeds(embeds, mask, embeds_2, mask_2,
                                 negative_embeds.contiguous(), negative_mask.contiguous(),
                                 negative_embeds_2.contiguous(), negative_mask_2.contiguous())
    return prompt_embeds.trim_padding() if trim_padding else prompt_embeds


class PromptCache:
    """`encode_prompts` for a training loop: each distinct prompt is encoded once and reused by later iterations.

    A run draws its groups' prompts from one file, so the same prompts come back every epoch (the video
    world's 8 in every iteration); the text encoders are frozen, so their embeddings never change. Each
    prompt is encoded alone (the pipeline pads every prompt to its fixed 1000 + 256 tokens, so a prompt's
    numbers do not depend on the others of its iteration, and a resumed run, whose cache starts empty, gets
    the same ones) and kept on the CPU with its real tokens only (~0.5 MB per prompt at the real model's
    widths in bf16), with the negative prompt's (the same each time: `encode_prompts` encodes both).
    `__call__(prompts)` returns the PromptEmbeds of those rows, each padded with zeros (mask 0) to the longest real length, as `PromptEmbeds.trim_padding`
    does: the transformer masks padding, so its values never matter. At most `capacity` prompts are kept;
    the least recently used goes first. offload: the text encoders live on the CPU and visit `device` only
    while a prompt is encoded (train.py --text_encoder_offload).
    """

    def __init__(self, policy, device, dtype, capacity=512, offload=False, negative_prompt=DEFAULT_NEGATIVE_PROMPT):
        if capacity < 1:
            raise ValueError(f"the prompt cache must hold at least 1 prompt, got capacity {capacity}")
        self.policy, self.device, self.dtype = policy, torch.device(device), dtype
        self.capacity, self.offload, self.negative_prompt = capacity, offload, negative_prompt
        self.rows = {}            # prompt -> its real tokens per stream (Hunyuan: text (L, D), glyph (L2, D2)), CPU
        self.negative = None      # the same for the negative prompt
        self.encoded = 0          # prompts encoded so far (the rest came from the cache)
        self.template = None      # an encoded PromptEmbeds of the family: rebuilds rows (from_real_tokens)

    def _encode(self, prompt):
        """One prompt's real tokens (each stream) and the negative prompt's, on the CPU."""
        e = self.policy.encode_prompts([prompt], self.negative_prompt, device=self.device, dtype=self.dtype,
                                       trim_padding=False)
        self.encoded, self.template = self.encoded + 1, e
        return e.real_tokens()

    def __call__(self, prompts):
        if isinstance(prompts, str) or not prompts:
            raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r}")
        missing = [p for p in dict.fromkeys(prompts) if p not in self.rows]
        encoders = self.policy.text_encoders
        for module in encoders if self.offload and missing else ():
            module.to(self.device)
        for prompt in missing:
            self.rows[prompt], self.negative = self._encode(prompt)
        for module in encoders if self.offload and missing else ():
            module.to("cpu")
        for prompt in prompts:  # most recently used last; evict from the front
            self.rows[prompt] = self.rows.pop(prompt)
        rows = [self.rows[p] for p in prompts]
        while len(self.rows) > self.capacity:
            del self.rows[next(iter(self.rows))]
        return self.template.from_real_tokens(rows, self.negative, self.device)


def _pad_tokens(embeds, length, mask_dtype):
    """Real tokens (L, D) -> (length, D) with zero padding, and the mask (length,): 1 real, 0 padding."""
    mask = torch.zeros(length, dtype=mask_dtype)
    mask[:embeds.shape[0]] = 1
    return torch.cat([embeds, embeds.new_zeros(length - embeds.shape[0], embeds.shape[1])]), mask


# ----------------------------------------------------------------------------------------------
# The policy velocity.

def cfg_velocity(transformer, latents, sigma, prompt_embeds, guidance_scale=DEFAULT_GUIDANCE_SCALE):
    """Classifier-free-guided velocity  v = v_uncond + s·(v_cond − v_uncond), in ONE forward of batch 2B.

    latents: (B, C, F, H, W) x_σ;  sigma: float or Tensor[B] (per-sample noise level);
    prompt_embeds: PromptEmbeds with B rows.  Returns the velocity (B, C, F, H, W) in float32.
    Differentiable in the transformer's parameters through both branches. With s = 1 (CFG-distilled
    checkpoints) only the conditional branch is run.
    """
    if latents.ndim != 5:
        raise ValueError(f"latents must be (B, C, F, H, W), got shape {tuple(latents.shape)}")
    batch_size = latents.shape[0]
    if len(prompt_embeds) != batch_size:
        raise ValueError(f"prompt_embeds has {len(prompt_embeds)} rows but latents have batch {batch_size}")
    model_dtype = next(transformer.parameters()).dtype
    sigma = sde.per_sample(sigma, latents).flatten().float()  # (B,): a float or Tensor[B], validated by sde.py

    # T2V input: [x, image-condition latents (0), image mask (0)] along channels  # (B, 2C+1, F, H, W)
    x = latents.to(model_dtype)
    condition = torch.zeros_like(x)
    condition_mask = torch.zeros_like(x[:, :1])
    model_input = torch.cat([x, condition, condition_mask], dim=1)
    timestep = (sigma * TIMESTEP_SCALE).to(model_dtype)  # (B,)  σ·1000

    use_cfg = guidance_scale != 1.0
    e = prompt_embeds
    if use_cfg:  # conditional rows first, then unconditional rows  # (2B, ...)
        model_input = torch.cat([model_input, model_input])
        timestep = torch.cat([timestep, timestep])
        text, text_mask = torch.cat([e.embeds, e.negative_embeds]), torch.cat([e.mask, e.negative_mask])
        glyph, glyph_mask = torch.cat([e.embeds_2, e.negative_embeds_2]), torch.cat([e.mask_2, e.negative_mask_2])
    else:
        text, text_mask, glyph, glyph_mask = e.embeds, e.mask, e.embeds_2, e.mask_2
    # all zero (here: empty) image slot = text-to-video  # (2B, 0, image_embed_dim)
    image_embeds = torch.zeros(model_input.shape[0], IMAGE_EMBED_TOKENS, transformer.config.image_embed_dim,
                               device=latents.device, dtype=model_dtype)

    velocity = transformer(hidden_states=model_input, timestep=timestep,
                           encoder_hidden_states=text.to(model_dtype), encoder_attention_mask=text_mask,
                           encoder_hidden_states_2=glyph.to(model_dtype), encoder_attention_mask_2=glyph_mask,
                           image_embeds=image_embeds, return_dict=False)[0].float()
    if not use_cfg:
        return velocity
    velocity_cond, velocity_uncond = velocity.chunk(2)
    # v = v_uncond + s·(v_cond − v_uncond)
    return velocity_uncond + guidance_scale * (velocity_cond - velocity_uncond)


# ----------------------------------------------------------------------------------------------
# Rollouts and their log-probabilities.

@dataclasses.dataclass
class Transition:
    """Recorded steps x_t -> x_{t+1}, one (possibly different) step t per sample."""
    latents: torch.Tensor       # (B, C, F, H, W) x_t
    next_latents: torch.Tensor  # (B, C, F, H, W) x_{t+1}
    sigma: torch.Tensor         # (B,) σ_t
    sigma_next: torch.Tensor    # (B,) σ_{t+1}
    log_prob: torch.Tensor      # (B,) log-prob under the rollout policy π_old
    mean: torch.Tensor          # (B, C, F, H, W) μ under π_old (step-wise trust region)
    std: torch.Tensor           # (B,) std of the step (0 for deterministic steps)


@dataclasses.dataclass
class Rollout:
    """B sampled trajectories of N steps.

    latents (B, N+1, C, F, H, W) x_{σ_0} … x_{σ_N} (float32; x_{σ_N} is the generated latent);
    log_probs (B, N) log N(x_{σ_{i+1}}; μ_i, std_i²), element-averaged, 0 for deterministic steps;
    means (B, N, C, F, H, W) μ_i; stds (B, N) std_i; sigmas (N+1,) float32, σ_0 = 1 … σ_N = 0;
    stochastic (N,) bool: which steps were sampled with the stochastic transition kernel (the rest are ODE steps);
    seeds (B,) the per-sample seeds that reproduce each sample.
    """
    latents: torch.Tensor
    log_probs: torch.Tensor
    means: torch.Tensor
    stds: torch.Tensor
    sigmas: torch.Tensor
    stochastic: torch.Tensor
    seeds: torch.Tensor

    @property
    def final_latents(self):
        return self.latents[:, -1]  # (B, C, F, H, W)

    def transitions(self, step_index):
        """The recorded step t_b of every sample b: step_index is a LongTensor (B,) or an int."""
        batch_size, num_steps = self.log_probs.shape
        step_index = torch.as_tensor(step_index, dtype=torch.long, device=self.latents.device)
        if step_index.ndim == 0:
            step_index = step_index.expand(batch_size)
        if step_index.shape != (batch_size,) or bool((step_index < 0).any() | (step_index >= num_steps).any()):
            raise ValueError(f"step_index must be an int or a LongTensor of shape [{batch_size}] with values in "
                             f"[0, {num_steps}), got {step_index.tolist()}")
        rows = torch.arange(batch_size, device=step_index.device)
        sigmas = self.sigmas.to(step_index.device)
        return Transition(latents=self.latents[rows, step_index], next_latents=self.latents[rows, step_index + 1],
                          sigma=sigmas[step_index], sigma_next=sigmas[step_index + 1],
                          log_prob=self.log_probs[rows, step_index], mean=self.means[rows, step_index],
                          std=self.stds[rows, step_index])


def initial_noise(seeds, latent_shape, device):
    """x_{σ_0} ~ N(0, I), one generator per sample so sample b depends only on seeds[b].

    Same draws as `HunyuanVideo15Pipeline(generator=[torch.Generator(device).manual_seed(s) for s in seeds])`.
    Returns the noise (B, C, F, H, W) and the generators (which go on to draw the step noise).
    """
    generators = [torch.Generator(device=device).manual_seed(int(seed)) for seed in seeds]
    noise = torch.cat([torch.randn((1, *latent_shape), generator=g, device=device, dtype=torch.float32)
                       for g in generators])
    return noise, generators


@torch.no_grad()
def rollout(transformer, prompt_embeds, seeds, latent_shape, sigmas, kernel="sage", eta=0.5,
            guidance_scale=DEFAULT_GUIDANCE_SCALE, sde_window=None, initial_seeds=None):
    """Sample B trajectories with the policy.  Returns Rollout.

    prompt_embeds: PromptEmbeds with B rows (use .repeat_interleave(G) for groups);
    seeds: B ints, one per sample (initial noise and every step's noise come from seeds[b] alone);
    latent_shape: (C, F, H, W), see HunyuanVideo15Policy.latent_shape;
    sigmas: Tensor[N+1] schedule, e.g. sde.shifted_sigmas(20, policy.shift);
    kernel, eta: the sde.py transition kernel of the stochastic steps;
    sde_window: (start, stop): only steps start ≤ i < stop use `kernel`, the others are ODE steps
                (None: all steps stochastic);
    initial_seeds: B ints or None. None: x_{σ_0} is drawn from seeds[b]'s generator, which goes on to
                draw the step noise (the pipeline's convention). Given: x_{σ_0} comes from
                initial_seeds[b] and the step noise from seeds[b]'s stream, so that the members of a GRPO
                group can share their initial noise (the same initial_seeds) and still explore apart.
    """
    sde.check_kernel(kernel)
    sde.check_schedule(sigmas)
    seeds = torch.as_tensor(list(seeds), dtype=torch.long)
    if seeds.numel() != len(prompt_embeds):
        raise ValueError(f"need one seed per sample: {len(prompt_embeds)} prompt rows, {seeds.numel()} seeds")
    num_steps = len(sigmas) - 1
    stochastic = sde.window_mask(num_steps, sde_window)  # (N,) True: `kernel`, False: the ODE step
    device = prompt_embeds.embeds.device

    # float32 schedule, the same numbers `Rollout.transitions` hands to `transition_log_prob` later, so the
    # recomputed step is the recorded one to round-off (on-policy ratio 1)
    sigmas = torch.as_tensor(sigmas).to(device=device, dtype=torch.float32)
    x, generators = initial_noise(seeds.tolist(), latent_shape, device)  # (B, C, F, H, W)
    if initial_seeds is not None:
        if len(initial_seeds) != len(seeds):
            raise ValueError(f"need one initial seed per sample: {len(seeds)} seeds, {len(initial_seeds)} initial seeds")
        # the step noise continues seeds[b]'s stream past its own initial draw (so it never repeats the
        # shared initial noise, not even for the member whose seed is the group's)
        x, _ = initial_noise(list(initial_seeds), latent_shape, device)
    batch_size = x.shape[0]
    latents, log_probs, means, stds = [x], [], [], []
    for i in range(num_steps):
        sigma, sigma_next = sigmas[i].expand(batch_size), sigmas[i + 1].expand(batch_size)  # (B,)
        velocity = prompt_embeds.guided_velocity(transformer, x, sigma, guidance_scale)  # the family's CFG forward
        step_kernel = kernel if stochastic[i] else "ode"
        # one sde.step per sample, each with its own generator: sample b's noise depends on seeds[b] only
        steps = [sde.step(step_kernel, x[b:b + 1], velocity[b:b + 1], sigma[b:b + 1], sigma_next[b:b + 1], eta,
                          generator=generators[b])
                 for b in range(batch_size)]
        x = torch.cat([s[0] for s in steps])
        latents.append(x)
        log_probs.append(torch.cat([s[1] for s in steps]))
        means.append(torch.cat([s[2] for s in steps]))
        stds.append(torch.cat([s[3].reshape(1) for s in steps]).float())
    return Rollout(latents=torch.stack(latents, dim=1), log_probs=torch.stack(log_probs, dim=1),
                   means=torch.stack(means, dim=1), stds=torch.stack(stds, dim=1),
                   sigmas=sigmas, stochastic=stochastic, seeds=seeds)


def transition_log_prob(transformer, prompt_embeds, transition, kernel="sage", eta=0.5,
                        guidance_scale=DEFAULT_GUIDANCE_SCALE):
    """(mean, std, log_prob) of recorded steps x_σ -> x_σ' under `transformer`, WITH gradients.

    transition: a `Transition` (`Rollout.transitions(step_index)`: each sample its own step);
    prompt_embeds: PromptEmbeds with B rows.  Returns mean (B, C, F, H, W), std (B, 1, 1, 1, 1),
    log_prob (B,). With the rollout's weights this reproduces Rollout.log_probs (on-policy ratio 1).
    """
    latents = transition.latents.float()  # (B, C, F, H, W) x_σ
    velocity = prompt_embeds.guided_velocity(transformer, latents, transition.sigma, guidance_scale)
    mean, std = sde.transition(kernel, latents, velocity, transition.sigma, transition.sigma_next, eta)
    return mean, std, sde.log_prob(transition.next_latents, mean, std)


# ----------------------------------------------------------------------------------------------
# Decoding.

# Spatial VAE tiling: diffusers' defaults for AutoencoderKLHunyuanVideo15 (256-pixel tiles overlapping by a
# quarter), which its HunyuanVideo-1.5 pipeline example switches on with `pipe.vae.enable_tiling()`.
VAE_TILE_SIZE = 256      # tile side in pixels (16 latent pixels with the real 16x VAE)
VAE_TILE_OVERLAP = 0.25  # fraction of a tile shared with the next one, cross-faded linearly


def set_vae_tiling(vae, enabled=None, tile_size=VAE_TILE_SIZE, overlap=VAE_TILE_OVERLAP):
    """Switch spatial tiling of the VAE decoder on or off for every later `decode_latents`; returns whether it is on.

    enabled: True / False, or None = on when the VAE sits on a CUDA device, off elsewhere. Untiled, the
    decoder of the real VAE holds whole-video activations (its last level alone: 128 channels x 81 x 352 x 624
    in bf16 = 4.5 GB per tensor) beside the policy; on a CPU (tests, --tiny, --world) frames are smaller
    than one tile and decode exactly.
    tile_size, overlap: the decoder runs on latent tiles of tile_size / 16 pixels (real VAE) that start every
    (1 - overlap) tile, and neighbouring decoded tiles are cross-faded over the overlap (diffusers
    `AutoencoderKLHunyuanVideo15.tiled_decode`; frames of at most one tile are decoded whole).

    Why tiled frames differ from untiled ones at all: each tile is decoded on its own, so (1) the decoder's
    mid-block self-attention attends over the tile instead of the whole frame, which can move any pixel a
    little; (2) its convolutions replicate the tile's edge instead of seeing the neighbour, which changes the
    pixels within the decoder's reach of a tile edge; the cross-fade over the overlap hides the seam (2)
    leaves when the overlap is wider than that reach. Measured on the tiny random VAE in
    tests/test_model.py (-k tiling) and reported in docs/measurements.md.
    """
    enabled = vae.device.type == "cuda" if enabled is None else bool(enabled)
    if not enabled:
        vae.disable_tiling()
        return False
    ratio = vae.spatial_compression_ratio
    latent_tile = tile_size // ratio
    # diffusers steps through the latent every int(latent_tile·(1 − overlap)) latent pixels and keeps the first
    # tile_size − int(tile_size·overlap) pixels of each decoded tile: they must be the same length, or the
    # assembled frame has gaps or repeated rows
    blend = int(tile_size * overlap)
    if tile_size % ratio or blend < 1 or int(latent_tile * (1 - overlap)) * ratio != tile_size - blend:
        raise ValueError(f"VAE tiles of {tile_size} pixels overlapping by {overlap} do not assemble: expected a tile "
                         f"size that is a multiple of the VAE's {ratio}x compression whose overlap is a whole number "
                         f"of latent pixels, e.g. {VAE_TILE_SIZE} and {VAE_TILE_OVERLAP}")
    vae.enable_tiling(tile_sample_min_height=tile_size, tile_sample_min_width=tile_size,
                      tile_latent_min_height=latent_tile, tile_latent_min_width=latent_tile,
                      tile_overlap_factor=overlap)
    return True


# The VAE decode's precision (train.py / eval.py --vae_precision). "model": the VAE's own dtype, the pipeline's (bf16
# on GPU for HunyuanVideo-1.5; float32 for Wan, as WanPipeline). "fp16": under autocast to float16, as the official
# trainer decodes its rollouts (its vae_precision "fp16"): fp16 keeps 10 mantissa bits to bf16's 7, so the frames the
# reward scores carry less round-off (README, "The official recipe").
VAE_PRECISIONS = ("model", "fp16")


def vae_autocast(vae, precision):
    """The context a decode runs in for `precision` (VAE_PRECISIONS): nothing, or autocast to float16 on the VAE's
    device (the weights stay in their dtype; convolutions and matmuls compute in float16, norms in float32)."""
    if precision not in VAE_PRECISIONS:
        raise ValueError(f"unknown VAE precision {precision!r}: expected one of {list(VAE_PRECISIONS)}")
    if precision == "model":
        return contextlib.nullcontext()
    return torch.autocast(vae.device.type, dtype=torch.float16)


@torch.no_grad()
def decode_latents(vae, latents):
    """Latents (B, C, F, H, W) -> frames (B, F_pixels, 3, H_pixels, W_pixels) in [0, 1], float32.

    As the pipeline: divide by the VAE's scaling factor exactly once, decode to [−1, 1], map to [0, 1].
    One sample at a time (the diffusers 0.42 HunyuanVideo-1.5 VAE fails at batch > 1).
    """
    if latents.ndim != 5:
        raise ValueError(f"latents must be (B, C, F, H, W), got shape {tuple(latents.shape)}")
    videos = []
    for z in latents:
        z = z[None].to(device=vae.device, dtype=vae.dtype) / vae.config.scaling_factor
        videos.append(vae.decode(z, return_dict=False)[0].float())  # (1, 3, F, H, W) in [−1, 1]
    video = torch.cat(videos)
    # [−1, 1] -> [0, 1], frames first  # (B, F, 3, H, W)
    return (video / 2 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4).contiguous()
