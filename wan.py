"""The policy, second family: Wan2.1 text-to-video as the same stochastic sampler (model.py's rollout).

model.py's docstring derives the sampler; nothing of it changes here. A rollout is the chain of Gaussian
steps of sde.py whose velocity is the classifier-free-guided velocity of Wan2.1's transformer

    v_θ = v_uncond + s·(v_cond − v_uncond),     s = 5 (WanPipeline's default guidance_scale),

with timestep input σ·1000, conditional and unconditional rows in ONE forward of batch 2B. This file supplies
what is Wan's own: loading and checking a diffusers-format Wan2.1-T2V directory, the UMT5 prompt embeddings,
the transformer call, the latent shape of a video size, and decoding. `model.load_policy_family(path)` picks
this family when the checkpoint's model_index.json names `WanPipeline`; the sampler (model.rollout,
model.transition_log_prob) asks the prompt embeddings for the guided velocity and never which family it runs.

What this file does, top to bottom
----------------------------------
* `check_wan_directory(path)`: the layout of `WanPipeline.save_pretrained` (transformer/, vae/, text_encoder/,
  tokenizer/, scheduler/, model_index.json), every missing piece named before any weight is read; a Wan2.2
  checkpoint (transformer_2 / boundary_ratio, expand_timesteps, a 48-channel VAE) is refused in one line.
* `sampling_defaults(path)`: shift s from scheduler/scheduler_config.json (`flow_shift` of the
  UniPCMultistepScheduler the checkpoints ship: 3.0 for 480p, 5.0 for 720p; `shift` of the one revision that
  ships a FlowMatchEulerDiscreteScheduler) and the CFG scale 5.0 (WanPipeline.__call__'s default; Wan
  checkpoints carry no guider config). Our SDE steps replace the scheduler: only its shift is read.
* `load_wan(path)` -> `WanPolicy` (pipeline, shift, guidance scale); the VAE always in float32.
* `WanPolicy.encode_prompts` -> `WanPromptEmbeds`: exactly `WanPipeline.encode_prompt` (UMT5 run on 512 tokens
  with the padding mask, each embedding cut to its real length and zero-padded back to 512), conditional and
  negative; `model.PromptCache` caches them per prompt. `WanPolicy.release_text_encoder()` frees UMT5 once the
  cache holds every prompt.
* `cfg_velocity`: the guided velocity in one forward of batch 2B.
* `WanPolicy.latent_shape`, `WanPolicy.decode` (latents -> frames (B, F, 3, H, W) in [0, 1]).
* Training facts (used by distributed.py, optimizer.py, parallel.py, plan.py through the family object):
  the blocks FSDP2 shards one by one (`blocks`), the LoRA target modules, Muon's hidden blocks, the check of
  a sequence-parallel size against the attention heads.

A tiny random Wan2.1 in the same layout, for tests, is built by tiny.build_tiny_wan.

How the transformer is fed (matches `WanPipeline.__call__`, diffusers 0.42.1, Wan2.1 T2V)
------------------------------------------------------------------------------------------
* hidden_states = x (B, 16, F, H, W): the latent alone, no condition channels (T2V).
* timestep = σ·1000 per sample, in float32 whatever the transformer dtype: the pipeline passes the
  scheduler's float32 timesteps and the transformer's time embedder casts after the sinusoidal projection
  (a bf16 timestep would round σ·1000 = 987.3 to 988 before the sinusoid).
* encoder_hidden_states = UMT5 embeddings (B, 512, 4096), zero vectors after each prompt's real tokens. The
  transformer takes no text mask: the zero padding goes through its text projection (which has biases) and is
  attended to by cross-attention like any token. So padding can NOT be dropped here (unlike HunyuanVideo-1.5,
  whose transformer masks it): `tests/test_wan.py` shows the velocity changes when it is. Cross-attention over
  512 keys is ~1.5 % of the attention FLOPs at 480x832x81 (32,760 video tokens), so nothing is lost keeping it.
* no encoder_hidden_states_image (that is the I2V checkpoint's CLIP image slot; refused at loading).

Differences from WanPipeline, and why (in float32 the velocity and the ODE rollout equal the pipeline's to
round-off, tested in tests/test_wan.py)
* cond and uncond are one batch of 2B (the pipeline runs two forwards), conditional rows first;
* the schedule is sde.shifted_sigmas(N, s): linspace(1, 0, N+1) shifted, as HunyuanVideo-1.5's pipeline. The
  checkpoints' UniPC multistep solver is not a one-step Gaussian kernel and cannot carry a log-probability;
  WanPipeline with a FlowMatchEulerDiscreteScheduler(shift=s) samples linspace(1, 1/1000, N) shifted, which
  our rollout reproduces exactly when given those sigmas (the parity test does);
* the latent state is float32 between steps (the pipeline's too: its latents are float32);
* the negative prompt is the pipeline's default "" (`DEFAULT_NEGATIVE_PROMPT`, below, says why), and the
  long negative prompt of Wan's own sampler is available as `WAN_NEGATIVE_PROMPT`.
* decode: z·std + mean with the VAE config's latents_mean / latents_std (the pipeline writes it as
  z / (1/std) + mean: the same up to one rounding), float32 VAE, [−1, 1] -> [0, 1], frames first.

Memory and time of the text encoder (UMT5-XXL encoder, 5.7B parameters): 11.4 GB in bf16, 22.8 GB in fp32, on
the GPU while prompts are encoded; one prompt of 512 tokens is ~5.8 TFLOP (2·params·tokens), ~15 ms on an
H100 at 40 % MFU. A run's prompts are encoded once each (model.PromptCache, ~0.2 MB per prompt on the CPU:
real tokens only, typically < 30, x 4096 x bf16); after that `release_text_encoder()` (or the cache's offload)
returns the memory: 11.4 GB of an 80 GB card, a sixth of what the 1.3B policy's training needs.
"""
import dataclasses
import json
import os

import torch
from diffusers import AutoencoderKLWan, WanPipeline, WanTransformer3DModel
from diffusers.pipelines.wan.pipeline_wan import prompt_clean

import hub
import sde

# ----------------------------------------------------------------------------------------------
# Constants (each with where it comes from).

PIPELINE_CLASS = "WanPipeline"  # model_index.json _class_name of Wan-AI/Wan2.1-T2V-{1.3B,14B}-Diffusers
# CFG scale s: WanPipeline.__call__'s default guidance_scale (and the Wan2.1 T2V sampler's sample_guide_scale).
DEFAULT_GUIDANCE_SCALE = 5.0
# Model timestep input = σ·1000: the schedulers' num_train_timesteps.
TIMESTEP_SCALE = 1000.0
# UMT5 context length: WanPipeline.__call__'s max_sequence_length default (the transformer was trained on it).
TEXT_LENGTH = 512
# Negative prompt of the unconditional branch: WanPipeline's default (None -> ""). Chosen over Wan's long
# negative prompt because (1) the policy GRPO trains is then the one WanPipeline samples by default, which the
# parity test checks, (2) it is the same choice as the HunyuanVideo-1.5 family, so runs compare, and (3) a
# negative prompt is a sampling trick: it moves the sampled distribution, and a reward then scores that
# distribution, not the model's. Pass `negative_prompt=WAN_NEGATIVE_PROMPT` to sample as Wan's own scripts do.
DEFAULT_NEGATIVE_PROMPT = ""
# The English long negative prompt of diffusers' WanPipeline example (a translation of Wan's sample_neg_prompt).
WAN_NEGATIVE_PROMPT = ("Bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, images, "
                       "static, overall gray, worst quality, low quality, JPEG compression residue, ugly, incomplete, "
                       "extra fingers, poorly drawn hands, poorly drawn faces, deformed, disfigured, misshapen limbs, "
                       "fused fingers, still picture, messy background, three legs, many people in the background, "
                       "walking backwards")

# What `WanPipeline.save_pretrained` writes: subfolder -> the file that must be in it; weights are checked in
# MODEL_SUBFOLDERS.
REQUIRED_FILES = {
    "transformer": "config.json",
    "vae": "config.json",
    "text_encoder": "config.json",
    "tokenizer": "tokenizer_config.json",
    "scheduler": "scheduler_config.json",
}
MODEL_SUBFOLDERS = ("transformer", "vae", "text_encoder")
WEIGHT_SUFFIXES = (".safetensors", ".bin")
WAN21_LATENT_CHANNELS = 16  # AutoencoderKLWan z_dim of Wan2.1 (Wan2.2-TI2V-5B's VAE has 48)

# Rollout video size: 81 frames at 480x832, Wan2.1's 480p setting (and the 1.3B model's native size); the default
# of train.py / eval.py for this family (config.default_video_size).
DEFAULT_NUM_FRAMES = 81
DEFAULT_HEIGHT = 480
DEFAULT_WIDTH = 832

# Training facts of WanTransformer3DModel.
BLOCKS = "blocks"  # the repeated WanTransformerBlock list: FSDP2 shards each, gradient checkpointing wraps each
# LoRA targets: the four projections of both attentions of every block (self-attention attn1 and text
# cross-attention attn2 share the names), as flow_grpo's Wan trainer and diffusers' Wan LoRA scripts. Wan has no
# separate text stream (HunyuanVideo-1.5's add_q_proj … to_add_out), so this is every attention projection.
# The feed-forward (ffn.net.0.proj, ffn.net.2) is left out as the peers do: 2/3 of a block's weights, and
# the cheap part of a LoRA to add later if attention alone proves too weak.
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
# Muon's "hidden" grouping: the 2-D matrices inside the repeated blocks.
HIDDEN_BLOCKS = ("blocks.",)


# ----------------------------------------------------------------------------------------------
# The directory.

def read_model_index(path):
    """model_index.json of a diffusers pipeline directory, as a dict ({} when there is none)."""
    index = os.path.join(path, "model_index.json")
    if not os.path.isfile(index):
        return {}
    with open(index) as f:
        return json.load(f)


def check_wan_variant(path):
    """Raise ValueError (one line) for a Wan checkpoint this code does not sample: Wan2.2's two experts
    (transformer_2 with boundary_ratio), per-token timesteps (expand_timesteps) or 48-channel VAE."""
    index = read_model_index(path)
    found = []
    if index.get("boundary_ratio") is not None or (index.get("transformer_2") or [None])[0] is not None \
            or os.path.isdir(os.path.join(path, "transformer_2")):
        found.append(f"transformer_2 / boundary_ratio {index.get('boundary_ratio')}")
    if index.get("expand_timesteps"):
        found.append("expand_timesteps true")
    vae_config = os.path.join(path, "vae", "config.json")
    if os.path.isfile(vae_config):
        with open(vae_config) as f:
            z_dim = json.load(f).get("z_dim", WAN21_LATENT_CHANNELS)
        if z_dim != WAN21_LATENT_CHANNELS:
            found.append(f"a {z_dim}-channel VAE")
    if found:
        raise ValueError(f"{path!r} is a Wan2.2 checkpoint ({', '.join(found)}): supported is Wan2.1 text-to-video "
                         f"(one transformer, per-sample timestep, 16-channel VAE)")


def check_wan_directory(path):
    """Raise ValueError for a Wan2.2 checkpoint (check_wan_variant), FileNotFoundError naming every missing piece
    of a diffusers-format Wan2.1-T2V directory. Reads JSON only."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"Wan2.1 directory {path!r} does not exist (expected the diffusers-format directory "
                                f"written by WanPipeline.save_pretrained, e.g. Wan-AI/Wan2.1-T2V-1.3B-Diffusers)")
    check_wan_variant(path)
    missing = [] if os.path.isfile(os.path.join(path, "model_index.json")) else ["model_index.json"]
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
        raise FileNotFoundError(
            f"Wan2.1 directory {path!r} is incomplete: missing {', '.join(missing)}. Expected the diffusers layout of "
            f"WanPipeline.save_pretrained (model_index.json and {', '.join(s + '/' for s in REQUIRED_FILES)}); "
            f"found {sorted(os.listdir(path))}.")


def sampling_defaults(path):
    """(shift, guidance_scale) a Wan2.1 checkpoint samples with: the scheduler config's flow_shift (UniPC) or shift
    (FlowMatchEuler), and DEFAULT_GUIDANCE_SCALE. JSON only, no weights."""
    path = hub.resolve_path(path, "Wan2.1")
    check_wan_directory(path)
    with open(os.path.join(path, "scheduler", "scheduler_config.json")) as f:
        config = json.load(f)
    name = config.get("_class_name")
    if name == "UniPCMultistepScheduler":
        if config.get("prediction_type") != "flow_prediction" or not config.get("use_flow_sigmas"):
            raise ValueError(f"{path}/scheduler: expected a flow-matching UniPC scheduler (prediction_type "
                             f"flow_prediction, use_flow_sigmas true), found prediction_type "
                             f"{config.get('prediction_type')!r}, use_flow_sigmas {config.get('use_flow_sigmas')}")
        shift = config.get("flow_shift", 1.0)
    elif name == "FlowMatchEulerDiscreteScheduler":
        shift = config.get("shift", 1.0)
    else:
        raise ValueError(f"{path}/scheduler: expected UniPCMultistepScheduler or FlowMatchEulerDiscreteScheduler, "
                         f"found {name!r}")
    if config.get("use_dynamic_shifting", False):
        raise ValueError(f"{path}/scheduler uses dynamic (resolution-dependent) shifting; this code samples the "
                         f"fixed-shift schedule σ <- sσ/(1+(s−1)σ) (use_dynamic_shifting = false)")
    if config.get("num_train_timesteps", TIMESTEP_SCALE) != TIMESTEP_SCALE:
        raise ValueError(f"expected num_train_timesteps = {TIMESTEP_SCALE:g} in {path}/scheduler, "
                         f"found {config['num_train_timesteps']}")
    return float(shift), DEFAULT_GUIDANCE_SCALE


def check_sp_size(transformer_config, sp_size):
    """Raise ValueError unless `sp_size` divides the attention heads (Ulysses gives each rank heads/sp of them):
    Wan2.1-1.3B has 12 heads (sp 1, 2, 3, 4, 6, 12), 14B 40 (sp 1, 2, 4, 5, 8, 10, 20, 40)."""
    heads = transformer_config["num_attention_heads"]
    if sp_size < 1 or heads % sp_size:
        raise ValueError(f"--sp_size must divide Wan's {heads} attention heads (Ulysses splits heads): expected one of "
                         f"{[d for d in range(1, heads + 1) if heads % d == 0]}, found {sp_size}")


def load_wan(path, device="cpu", dtype=torch.bfloat16, load_transformer=True):
    """Load Wan2.1-T2V from a diffusers-format directory (or a hub id in the hub cache; never downloaded).

    dtype: of the transformer and the text encoder (bf16 on GPU, float32 for CPU tests). The VAE is float32
    always (peers report invalid videos from a half-precision Wan VAE). load_transformer False leaves
    `pipeline.transformer` None (train.py builds the sharded policy itself). Returns WanPolicy.
    """
    path = hub.resolve_path(path, "Wan2.1")
    shift, guidance_scale = sampling_defaults(path)
    # the VAE is read on its own in float32; the pipeline then casts only the components it loads itself
    extra = {"vae": AutoencoderKLWan.from_pretrained(os.path.join(path, "vae"), dtype=torch.float32)}
    if not load_transformer:
        extra["transformer"] = None
    pipeline = WanPipeline.from_pretrained(path, dtype=dtype, **extra).to(device)
    pipeline.set_progress_bar_config(disable=True)
    for module in (pipeline.transformer, pipeline.vae, pipeline.text_encoder):
        if module is not None:
            module.eval().requires_grad_(False)  # the trainer re-enables gradients on the transformer
    return WanPolicy(pipeline=pipeline, shift=shift, guidance_scale=guidance_scale)


# ----------------------------------------------------------------------------------------------
# The policy object.

@dataclasses.dataclass
class WanPolicy:
    """The loaded Wan2.1-T2V components (`pipeline`: WanPipeline) and what the sampler and trainer ask a family."""
    pipeline: WanPipeline
    shift: float            # s of σ <- sσ/(1+(s−1)σ), from scheduler/scheduler_config.json
    guidance_scale: float   # CFG scale (DEFAULT_GUIDANCE_SCALE)

    family = "wan"
    pipeline_class = PIPELINE_CLASS
    transformer_class = WanTransformer3DModel
    blocks = BLOCKS
    lora_targets = LORA_TARGETS
    hidden_blocks = HIDDEN_BLOCKS
    default_negative_prompt = DEFAULT_NEGATIVE_PROMPT
    default_video_size = (DEFAULT_NUM_FRAMES, DEFAULT_HEIGHT, DEFAULT_WIDTH)  # frames, height, width
    check_directory = staticmethod(check_wan_directory)
    sampling_defaults = staticmethod(sampling_defaults)
    check_sp_size = staticmethod(check_sp_size)
    load = staticmethod(load_wan)

    @property
    def transformer(self) -> WanTransformer3DModel:
        return self.pipeline.transformer

    @property
    def vae(self) -> AutoencoderKLWan:
        return self.pipeline.vae

    @property
    def text_encoders(self):
        """The frozen text encoders (model.PromptCache moves them with offload): UMT5."""
        return tuple(m for m in (self.pipeline.text_encoder,) if m is not None)

    def release_text_encoder(self):
        """Drop UMT5 (5.7B parameters: 11.4 GB in bf16) once every prompt of the run is in the prompt cache. A
        prompt not seen before then fails with a clear error instead of encoding. Returns the bytes freed."""
        encoder = self.pipeline.text_encoder
        if encoder is None:
            return 0
        freed = sum(p.numel() * p.element_size() for p in encoder.parameters())
        self.pipeline.text_encoder = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return freed

    @staticmethod
    def computed_buffers(transformer):
        """{name: tensor} of the transformer's non-persistent buffers, computed from its config alone: the RoPE
        tables (rope.freqs_cos / freqs_sin), which a module built on the meta device and materialised with
        to_empty would hold as garbage (distributed.load_policy writes these instead)."""
        from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed
        config = transformer.config
        rope = WanRotaryPosEmbed(config.attention_head_dim, config.patch_size, config.rope_max_seq_len)
        return {f"rope.{name}": buffer for name, buffer in rope.named_buffers()}

    def set_vae_tiling(self, enabled=None):
        """Spatial tiling of the VAE decoder, diffusers' AutoencoderKLWan defaults (256-pixel tiles every 192
        pixels); enabled None: on when the VAE is on a CUDA device. Returns whether it is on."""
        enabled = self.vae.device.type == "cuda" if enabled is None else bool(enabled)
        self.vae.enable_tiling() if enabled else self.vae.disable_tiling()
        return enabled

    def latent_shape(self, num_frames, height, width):
        """(C, F, H, W) of the latent of num_frames x height x width pixels, as WanPipeline.prepare_latents:
        F = (frames − 1)/4 + 1, H = height/8, W = width/8 (real VAE); e.g. 81x480x832 -> (16, 21, 60, 104).
        Frames must be 4k + 1 and sides multiples of 8·2 = 16 (VAE x patch), which the pipeline would round."""
        temporal = self.vae.config.scale_factor_temporal
        spatial = self.vae.config.scale_factor_spatial
        multiple = spatial * self.transformer_patch[1]
        if num_frames < 1 or (num_frames - 1) % temporal or height % multiple or width % multiple or height < 1 \
                or width < 1:
            raise ValueError(f"Wan video size must be (k·{temporal} + 1) frames x multiples of {multiple} pixels "
                             f"(VAE {spatial}x x patch {self.transformer_patch[1]}), got {num_frames} frames x "
                             f"{height} x {width}")
        return (self.vae.config.z_dim, (num_frames - 1) // temporal + 1, height // spatial, width // spatial)

    @property
    def transformer_patch(self):
        """The transformer's patch size (1, 2, 2), from its config (also when it was not loaded)."""
        if self.pipeline.transformer is not None:
            return tuple(self.pipeline.transformer.config.patch_size)
        return (1, 2, 2)

    @torch.no_grad()
    def encode_prompts(self, prompts, negative_prompt=DEFAULT_NEGATIVE_PROMPT, device=None, dtype=None,
                       trim_padding=False):
        """`WanPipeline.encode_prompt` of B prompts and of the negative prompt (once, expanded to B rows), at
        max_sequence_length TEXT_LENGTH. Returns WanPromptEmbeds; dtype defaults to the transformer's.
        trim_padding must stay False: the Wan transformer attends to the zero padding (module docstring)."""
        if isinstance(prompts, str) or not prompts:
            raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r}")
        if trim_padding:
            raise ValueError("Wan's transformer attends to its zero text padding (it takes no text mask): the "
                             "512-token embeddings cannot be trimmed without changing the velocity")
        if self.pipeline.text_encoder is None:
            raise RuntimeError(f"the UMT5 text encoder was released (WanPolicy.release_text_encoder); prompts "
                               f"{list(prompts)!r} are not in the prompt cache")
        transformer = self.pipeline.transformer
        device = device if device is not None else (transformer.device if transformer is not None else "cpu")
        dtype = dtype if dtype is not None else (transformer.dtype if transformer is not None else torch.float32)
        pipeline = self.pipeline
        embeds, negative = pipeline.encode_prompt(prompt=list(prompts), negative_prompt=negative_prompt,
                                                  do_classifier_free_guidance=True, max_sequence_length=TEXT_LENGTH,
                                                  device=device, dtype=dtype)
        return WanPromptEmbeds(embeds=embeds, negative_embeds=negative,
                               lengths=self.token_lengths(prompts).to(device),
                               negative_lengths=self.token_lengths([negative_prompt] * len(prompts)).to(device))

    def token_lengths(self, prompts):
        """Real tokens of each prompt (the tokenizer's mask, as in encode_prompt): (B,) long."""
        tokens = self.pipeline.tokenizer([prompt_clean(p) for p in prompts], padding="max_length",
                                         max_length=TEXT_LENGTH, truncation=True, add_special_tokens=True,
                                         return_attention_mask=True, return_tensors="pt")
        return tokens.attention_mask.gt(0).sum(1).long()

    @torch.no_grad()
    def decode(self, latents):
        """Latents (B, C, F, H, W) -> frames (B, F_pixels, 3, H_pixels, W_pixels) in [0, 1], float32.

        As WanPipeline: z·std + mean per channel (the VAE config's latents_std / latents_mean), the float32 VAE
        decodes to [−1, 1], mapped to [0, 1], frames first.
        """
        if latents.ndim != 5:
            raise ValueError(f"latents must be (B, C, F, H, W), got shape {tuple(latents.shape)}")
        vae = self.vae
        channels = vae.config.z_dim
        z = latents.to(device=vae.device, dtype=vae.dtype)
        mean = torch.tensor(vae.config.latents_mean, device=z.device, dtype=z.dtype).view(1, channels, 1, 1, 1)
        std = torch.tensor(vae.config.latents_std, device=z.device, dtype=z.dtype).view(1, channels, 1, 1, 1)
        # un-normalise: z_vae = z·std + mean  # (B, C, F, H, W)
        video = vae.decode(z * std + mean, return_dict=False)[0].float()  # (B, 3, F, H, W) in [−1, 1]
        # [−1, 1] -> [0, 1], frames first  # (B, F, 3, H, W)
        return (video / 2 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4).contiguous()


# ----------------------------------------------------------------------------------------------
# Prompt embeddings and the guided velocity.

@dataclasses.dataclass
class WanPromptEmbeds:
    """UMT5 conditioning of B samples: embeds (B, 512, D) with zero vectors after each prompt's lengths[b] real
    tokens (WanPipeline.encode_prompt's output), the same for the negative prompt. lengths (B,) long."""
    embeds: torch.Tensor
    negative_embeds: torch.Tensor
    lengths: torch.Tensor
    negative_lengths: torch.Tensor

    def _map(self, fn):
        return WanPromptEmbeds(**{f.name: fn(getattr(self, f.name)) for f in dataclasses.fields(self)})

    def __len__(self):
        return self.embeds.shape[0]

    def select(self, index):
        """Rows `index` (a LongTensor or list)."""
        index = torch.as_tensor(index, device=self.embeds.device, dtype=torch.long)
        return self._map(lambda t: t.index_select(0, index.to(t.device)))

    def repeat_interleave(self, group_size):
        """Each prompt `group_size` times in a row (GRPO groups)."""
        return self._map(lambda t: t.repeat_interleave(group_size, dim=0))

    def guided_velocity(self, transformer, latents, sigma, guidance_scale):
        """The family's CFG velocity (model.rollout and model.transition_log_prob call this)."""
        return cfg_velocity(transformer, latents, sigma, self, guidance_scale)

    def unconditional(self):
        """The same rows with the negative prompt as the conditional one (self_check's separate forwards)."""
        return dataclasses.replace(self, embeds=self.negative_embeds, lengths=self.negative_lengths)

    # model.PromptCache: one prompt's real tokens on the CPU, and rows rebuilt from them.
    def real_tokens(self):
        """Row 0's real tokens and the negative prompt's: ((L, D),), ((L', D),) on the CPU."""
        return ((self.embeds[0, :int(self.lengths[0])].cpu(),),
                (self.negative_embeds[0, :int(self.negative_lengths[0])].cpu(),))

    def from_real_tokens(self, rows, negative, device):
        """WanPromptEmbeds of `rows` (each `real_tokens()[0]`) and the negative row: zero-padded to TEXT_LENGTH,
        exactly as encode_prompt pads."""
        def pad(tokens):  # (L, D) -> (TEXT_LENGTH, D)
            return torch.cat([tokens, tokens.new_zeros(self.embeds.shape[1] - tokens.shape[0], tokens.shape[1])])
        batch = len(rows)
        return WanPromptEmbeds(
            embeds=torch.stack([pad(r[0]) for r in rows]).to(device),
            negative_embeds=pad(negative[0])[None].expand(batch, -1, -1).contiguous().to(device),
            lengths=torch.tensor([r[0].shape[0] for r in rows], device=device),
            negative_lengths=torch.full((batch,), negative[0].shape[0], device=device))


def cfg_velocity(transformer, latents, sigma, prompt_embeds, guidance_scale=DEFAULT_GUIDANCE_SCALE):
    """v = v_uncond + s·(v_cond − v_uncond) in ONE forward of batch 2B (conditional rows first).

    latents (B, 16, F, H, W) x_σ; sigma float or Tensor[B]; prompt_embeds WanPromptEmbeds with B rows.
    Returns (B, 16, F, H, W) float32, differentiable through both branches. s = 1: the conditional branch only.
    """
    if latents.ndim != 5:
        raise ValueError(f"latents must be (B, C, F, H, W), got shape {tuple(latents.shape)}")
    batch_size = latents.shape[0]
    if len(prompt_embeds) != batch_size:
        raise ValueError(f"prompt_embeds has {len(prompt_embeds)} rows but latents have batch {batch_size}")
    # the input's dtype is the patch embedding's: diffusers keeps some Wan parameters in float32 (the modulation
    # table, time embedder, norms) whatever the model dtype, and one of them is the first parameter
    model_dtype = transformer.patch_embedding.weight.dtype
    sigma = sde.per_sample(sigma, latents).flatten().float()  # (B,)
    x = latents.to(model_dtype)
    timestep = sigma * TIMESTEP_SCALE  # (B,) σ·1000, float32 as the pipeline's scheduler timesteps
    text = prompt_embeds.embeds
    use_cfg = guidance_scale != 1.0
    if use_cfg:  # (2B, ...)
        x, timestep = torch.cat([x, x]), torch.cat([timestep, timestep])
        text = torch.cat([prompt_embeds.embeds, prompt_embeds.negative_embeds])
    velocity = transformer(hidden_states=x, timestep=timestep, encoder_hidden_states=text.to(model_dtype),
                           return_dict=False)[0].float()
    if not use_cfg:
        return velocity
    velocity_cond, velocity_uncond = velocity.chunk(2)
    # v = v_uncond + s·(v_cond − v_uncond)
    return velocity_uncond + guidance_scale * (velocity_cond - velocity_uncond)
