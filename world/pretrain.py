"""The video world's pretrained policy: a tiny real HunyuanVideo-1.5, trained by flow matching on the world.

Conditional flow matching in the conventions of sde.py, on the videos of video_world.py, with the
Monte-Carlo target ε − x_0 replaced by its conditional expectation, which the world has in closed form:

    x_σ = (1 − σ)·x_0 + σ·ε,   x_0 ~ world(prompt),  ε ~ N(0, I)
    v*(x_σ) = E[ε − x_0 | x_σ, prompt] = (x_σ − E[x_0 | x_σ, prompt])/σ      (video_world.ideal_velocity)
    L(θ) = E σ²‖v_θ(x_σ, σ·1000, text) − v*(x_σ)‖²      (mean over latent elements)

Same minimiser as the usual loss E‖v_θ − (ε − x_0)‖² (v* is its minimiser), but its gradient has no
variance from the x_0 that could have made x_σ, and its value is the model's excess error itself (0 for
the exact velocity). The weight σ² makes it the error of the predicted clean video x̂_0 = x_σ − σ·v:
with 1/σ² removed, small σ (which the 8-step sampler never queries below σ = 0.3) does not dominate.

The network is diffusers' `HunyuanVideo15Transformer3DModel` (a small config), fed exactly as the
trainer feeds it: `model.cfg_velocity` with guidance scale 1 (the conditional branch alone), the text
from `model.encode_prompts` through the real (random, seeded) Qwen2.5-VL and byT5 encoders. With
probability p_uncond a row's text is the empty negative prompt's and its target the unconditional v*
(all prompts equally likely), so classifier-free guidance has a meaningful unconditional branch. The
result is a complete diffusers directory (model_index.json, transformer/, vae/, text_encoder/,
tokenizer/, text_encoder_2/, tokenizer_2/, scheduler/, guider/) that `model.load_hunyuan` loads like
the real checkpoint; the VAE is random (the world lives in latent space, see video_world.py).

Choices
-------
* Text encoder with 4 layers. The pipeline reads the hidden state 3 from the top (it skips 2 layers);
  with 2 layers (tiny.build_tiny_hunyuan) that hidden state is the raw byte embedding, a bag of bytes
  in which one prompt differs from another by a few letters. After 2 causal layers the prompt's own
  tokens carry features of the whole prompt. `world_tokenizer` makes the pipeline's crop remove the
  system prompt, so the transformer sees the prompt's ~25 bytes and the template's 13 closing tokens.
* Training σ = shift(u), u ~ U(0, 1), with the sampling shift: the model is trained where the sampler
  asks it (a low-resolution analogue of the logit-normal σ density of SD3 / HunyuanVideo).
* Weights: the EMA (decay 0.995) of the last ~200 of 2000 AdamW steps of batch 16, lr 3e-3 warmed up
  over 5% and cosine-decayed.
* WORLD_SHIFT = 3, WORLD_NUM_STEPS = 8, WORLD_GUIDANCE_SCALE = 3 (video_world.py). With the exact
  velocity these settings land on M (tests/test_video_world.py); CFG 3 raises the amplitude towards a_max
  (exact velocity: brightness 0.82 at scale 1, 0.95 at 3), which leaves the reward's brightness little
  on-manifold headroom and its composition most of it.

Result (committed weights, 2 shared CPU cores)
----------------------------------------------
Cold pretraining 422 s; final excess loss 0.019 (x̂_0 RMS error ≈ 0.14). ODE samples (8 steps, shift 3,
CFG 3; 8 seeds per prompt): RMS distance to M 0.228 on average, 0.14-0.35 per prompt (blank video 0.5,
noise ≈ 0.95), alignment 0.93, composition 0.36, brightness 0.90, reward 1.56 (best on M: 2.0). The
squares have the prompt's colour and motion, with blurred edges; the distance is not yet at the level of
data noised to σ = 0.1 (≈ 0.1): more steps or width are the open work. A rollout of 4 samples with CFG
takes ≈ 0.06 s.

Caching: the directory is written under world/out/ (gitignored) keyed by a hash of the config and the
world's constants, written to a temporary directory and renamed (a concurrent caller never sees half
a directory). The transformer comes from WEIGHTS_FILE (assets/, committed, ≈ 1.7 MB) when its stored
hash matches the config; text encoders, VAE and tokenizers are rebuilt from the seed. Rebuild the
weights after changing the world or the config:

    python -m world.pretrain --retrain
"""
import argparse
import dataclasses
import hashlib
import inspect
import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import model
import sde
import tiny
from world import video_world as world

CACHE_DIR = Path(__file__).resolve().parent / "out"
# The pretrained transformer, committed (rebuild: python -m world.pretrain --retrain).
WEIGHTS_FILE = Path(__file__).resolve().parent.parent / "assets" / "video_world_transformer.safetensors"
# Transformer tensors that pretraining never changes (the byT5 glyph projection: no world prompt quotes
# text), rebuilt from the seed instead of stored.
UNTRAINED_PREFIX = "context_embedder_2."


@dataclass(frozen=True)
class WorldPretrainConfig:
    # --- optimisation
    steps: int = 2000
    """optimizer steps of flow matching"""
    batch_size: int = 16
    """videos per step"""
    lr: float = 3e-3
    """AdamW learning rate after a 5% linear warm-up, cosine-decayed to 0 (a tiny transformer tolerates it)"""
    ema_decay: float = 0.995
    """decay of the exponential moving average of the weights that is kept as the result (the usual diffusion
    practice: it averages out the last steps' gradient noise)"""
    p_uncond: float = 0.1
    """probability of the empty negative prompt (classifier-free guidance training, as the video models)"""
    seed: int = 0
    """seed of every random initialisation (transformer, text encoders, VAE) and of the data"""
    # --- the transformer (HunyuanVideo15Transformer3DModel)
    num_attention_heads: int = 4
    """attention heads"""
    attention_head_dim: int = 16
    """head width; hidden size = heads x head_dim = 64"""
    rope_axes_dim: tuple = (4, 6, 6)
    """RoPE dims for (frame, row, column); they sum to attention_head_dim"""
    num_layers: int = 2
    """double-stream transformer blocks"""
    mlp_ratio: float = 4.0
    """MLP width / hidden size"""
    # --- the text encoders (random, frozen)
    text_hidden: int = 32
    """Qwen2.5-VL hidden size (the transformer's text_embed_dim)"""
    text_layers: int = 4
    """Qwen2.5-VL layers: the pipeline reads the hidden state 3 from the top, so 4 gives 2 contextual layers"""
    # --- sampling settings written into the directory
    shift: float = world.WORLD_SHIFT
    """schedule shift, for scheduler/ and for the training σ density"""
    guidance_scale: float = world.WORLD_GUIDANCE_SCALE
    """CFG scale written into guider/"""


# ----------------------------------------------------------------------------------------------
# Building the (random) pipeline.

def build_world_pipeline(config):
    """A HunyuanVideo15Pipeline with random seeded components of the world's sizes (transformer untrained)."""
    from diffusers import (AutoencoderKLHunyuanVideo15, FlowMatchEulerDiscreteScheduler, HunyuanVideo15Pipeline,
                           HunyuanVideo15Transformer3DModel)
    from diffusers.guiders import ClassifierFreeGuidance
    from transformers import ByT5Tokenizer, Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel, T5Config, T5EncoderModel

    if sum(config.rope_axes_dim) != config.attention_head_dim:
        raise ValueError(f"rope_axes_dim must sum to attention_head_dim = {config.attention_head_dim}, "
                         f"got {config.rope_axes_dim} (sum {sum(config.rope_axes_dim)})")
    channels = world.WORLD_LATENT_SHAPE[0]
    tokenizer = world_tokenizer()
    tokenizer_2 = ByT5Tokenizer()
    torch.manual_seed(config.seed)
    text_encoder = Qwen2_5_VLTextModel(Qwen2_5_VLTextConfig(
        vocab_size=len(tokenizer), hidden_size=config.text_hidden, intermediate_size=2 * config.text_hidden,
        num_hidden_layers=config.text_layers, num_attention_heads=2, num_key_value_heads=2, rope_theta=1e6,
        rope_scaling={"mrope_section": [2, 3, 3], "rope_type": "default", "type": "default"},
        bos_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.pad_token_id, pad_token_id=tokenizer.pad_token_id))
    text_encoder_2 = T5EncoderModel(T5Config(vocab_size=len(tokenizer_2), d_model=32, d_kv=8, d_ff=32, num_layers=1,
                                             num_heads=2))
    transformer = HunyuanVideo15Transformer3DModel(
        in_channels=2 * channels + 1, out_channels=channels, num_attention_heads=config.num_attention_heads,
        attention_head_dim=config.attention_head_dim, num_layers=config.num_layers, num_refiner_layers=1,
        mlp_ratio=config.mlp_ratio, text_embed_dim=config.text_hidden, text_embed_2_dim=32, image_embed_dim=12,
        rope_axes_dim=tuple(config.rope_axes_dim), target_size=world.WORLD_HEIGHT, task_type="t2v")
    # the tiny VAE of model.build_tiny_hunyuan: 4 channels, 4x spatial, 2x temporal -> latent (4, 5, 8, 8)
    vae = AutoencoderKLHunyuanVideo15(latent_channels=channels, block_out_channels=(16, 16), layers_per_block=1,
                                      spatial_compression_ratio=4, temporal_compression_ratio=2,
                                      downsample_match_channel=False, upsample_match_channel=False)
    pipeline = HunyuanVideo15Pipeline(
        text_encoder=text_encoder.eval(), tokenizer=tokenizer, transformer=transformer, vae=vae.eval(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=config.shift), text_encoder_2=text_encoder_2.eval(),
        tokenizer_2=tokenizer_2, guider=ClassifierFreeGuidance(guidance_scale=config.guidance_scale))
    system_message, crop_start = _system_prompt()
    if (pipeline.system_message, pipeline.prompt_template_encode_start_idx) != (system_message, crop_start):
        raise RuntimeError("this diffusers version's HunyuanVideo15Pipeline encodes prompts with another system "
                           "message or crop than its _get_mllm_prompt_embeds defaults; world_tokenizer must follow it")
    return pipeline


def _system_prompt():
    """(system message, crop_start) with which HunyuanVideo15Pipeline.encode_prompt templates every prompt."""
    from diffusers import HunyuanVideo15Pipeline
    defaults = inspect.signature(HunyuanVideo15Pipeline._get_mllm_prompt_embeds).parameters
    return defaults["system_message"].default, defaults["crop_start"].default


def world_tokenizer():
    """model.tiny_qwen_tokenizer plus ONE added token, so that the pipeline's crop removes the system prompt.

    The pipeline templates every prompt as <|im_start|>system\n{system message}<|im_end|>\n<|im_start|>user\n
    {prompt}<|im_end|>\n<|im_start|>assistant\n and drops the first crop_start = 108 positions of the text
    encoder's output: the real Qwen2.5 tokenizer makes exactly that prefix 108 tokens, so the transformer only
    sees the prompt. The byte-level tiny tokenizer makes it ~500 tokens, so ~400 tokens of system message
    would reach the transformer (most of its attention cost, the same for every prompt). Folding the first
    characters of the system message into one added token makes the prefix exactly crop_start tokens
    (each remaining character stays one byte token): the transformer then sees the prompt's bytes and the
    template's closing tokens (~40), as with the real tokenizer; the text encoder still reads everything.
    """
    from tokenizers import AddedToken
    from diffusers.pipelines.hunyuan_video1_5.pipeline_hunyuan_video1_5 import format_text_input

    system_message, crop_start = _system_prompt()
    tokenizer = tiny.byte_level_qwen2_tokenizer(["<|im_start|>", "<|im_end|>"])
    tokenizer.chat_template = tiny.TINY_CHAT_TEMPLATE

    def prefix_length():
        # tokens before the user's text: template a marker prompt and find where it starts
        ids = tokenizer.apply_chat_template(format_text_input(["\x00"], system_message), add_generation_prompt=True,
                                            tokenize=True, return_dict=True)["input_ids"][0]
        return ids.index(tokenizer.convert_tokens_to_ids(tokenizer.tokenize("\x00"))[0])

    # n characters folded into one token shorten the prefix by n − 1
    fold = prefix_length() - crop_start + 1
    if fold > 1:
        tokenizer.add_tokens([AddedToken(system_message[:fold], normalized=False, special=False)])
    if prefix_length() != crop_start:
        raise RuntimeError(f"world tokenizer: the templated prefix is {prefix_length()} tokens, expected the "
                           f"pipeline's crop_start = {crop_start}")
    return tokenizer


# ----------------------------------------------------------------------------------------------
# Flow matching.

def conditioning(embeds, prompt_index, drop):
    """Rows of PromptEmbeds for a batch: prompt_index (B,) rows of `embeds` (one row per world prompt),
    the empty negative prompt's text where drop (B,) is True (classifier-free guidance training)."""
    rows = embeds.select(prompt_index)
    where = lambda d, a, b: torch.where(d.view(-1, *([1] * (a.ndim - 1))), a, b)
    return model.PromptEmbeds(
        embeds=where(drop, rows.negative_embeds, rows.embeds), mask=where(drop, rows.negative_mask, rows.mask),
        embeds_2=where(drop, rows.negative_embeds_2, rows.embeds_2),
        mask_2=where(drop, rows.negative_mask_2, rows.mask_2),
        negative_embeds=rows.negative_embeds, negative_mask=rows.negative_mask,
        negative_embeds_2=rows.negative_embeds_2, negative_mask_2=rows.negative_mask_2)


def flow_matching_loss(transformer, x0, sigma, noise, prompt_embeds, prompts):
    """E‖v_θ(x_σ, σ) − v*(x_σ)‖² over elements, v* = E[ε − x_0 | x_σ] (video_world.ideal_velocity).

    x0, noise: (B, C, F, H, W); sigma: (B,); prompts: B world prompts, None for a row trained unconditionally.
    """
    s = sigma.view(-1, 1, 1, 1, 1)
    # x_σ = (1 − σ)·x_0 + σ·ε
    x_sigma = (1 - s) * x0 + s * noise
    # v_θ exactly as the trainer computes it (conditional branch alone at guidance scale 1)
    velocity = model.cfg_velocity(transformer, x_sigma, sigma, prompt_embeds, guidance_scale=1.0)
    # target v* = E[ε − x_0 | x_σ, prompt]: the conditional one, or the unconditional one for dropped rows
    target = world.ideal_velocity(x_sigma, sigma, [p or world.WORLD_PROMPTS[0] for p in prompts])
    dropped = torch.tensor([p is None for p in prompts])
    if bool(dropped.any()):
        target[dropped] = world.ideal_velocity(x_sigma[dropped], sigma[dropped])
    # σ²‖v_θ − v*‖² = ‖x̂_0,θ − x̂_0*‖²: the error of the predicted clean video (x̂_0 = x_σ − σ·v)
    return (s * (velocity - target.float())).pow(2).mean()


def shifted(u, shift):
    """σ = s·u / (1 + (s − 1)·u): the sampling schedule's shift applied to u ∈ [0, 1]."""
    return shift * u / (1 + (shift - 1) * u)


def pretrain(policy, config, verbose=False, callback=None):
    """Train policy.transformer in place by flow matching on the world.  Returns the final losses' mean.

    callback(step, transformer), if given, runs after every 100th step (e.g. to keep snapshots)."""
    transformer = policy.transformer.train().requires_grad_(True)
    embeds = model.encode_prompts(policy, list(world.WORLD_PROMPTS), dtype=torch.float32)   # one row per prompt
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=config.lr, weight_decay=0.0)
    warmup = max(1, config.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: min((i + 1) / warmup, 0.5 * (1 + torch.cos(torch.tensor(torch.pi * i / max(config.steps, 1))).item())))
    templates = world.world_templates(dtype=torch.float32)
    ema = {name: p.detach().clone() for name, p in transformer.named_parameters()}
    losses = []
    for step in range(config.steps):
        # x_0: a random prompt, a random start of that prompt, a ~ U[a_min, a_max]
        prompt_index = torch.randint(len(world.WORLD_PROMPTS), (config.batch_size,), generator=generator)
        x0 = torch.stack([_random_template(templates, p, generator) for p in prompt_index.tolist()])
        amplitude = world.AMPLITUDE_MIN + (world.AMPLITUDE_MAX - world.AMPLITUDE_MIN) * torch.rand(
            config.batch_size, generator=generator)
        x0 = (amplitude[:, None] * x0).view(config.batch_size, *world.WORLD_LATENT_SHAPE)   # (B, C, F, H, W)
        sigma = shifted(torch.rand(config.batch_size, generator=generator), config.shift).clamp(1e-3, 1 - 1e-3)
        noise = torch.randn(x0.shape, generator=generator)
        drop = torch.rand(config.batch_size, generator=generator) < config.p_uncond
        prompts = [None if d else world.WORLD_PROMPTS[p] for p, d in zip(prompt_index.tolist(), drop.tolist())]
        loss = flow_matching_loss(transformer, x0, sigma, noise, conditioning(embeds, prompt_index, drop), prompts)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        with torch.no_grad():   # θ_ema <- d·θ_ema + (1 − d)·θ
            for name, p in transformer.named_parameters():
                ema[name].lerp_(p, 1 - config.ema_decay)
        losses.append(loss.item())
        if verbose and step % 100 == 0:
            print(f"world pretrain step {step:5d}  flow-matching loss {sum(losses[-100:]) / len(losses[-100:]):.4f}",
                  flush=True)
        if callback is not None and (step + 1) % 100 == 0:
            callback(step + 1, transformer)
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            p.copy_(ema[name])
    transformer.eval().requires_grad_(False)
    tail = losses[-max(1, config.steps // 10):]
    return sum(tail) / len(tail) if tail else float("nan")   # steps = 0: an untrained transformer (layout tests)


def _random_template(templates, prompt, generator):
    own = torch.nonzero(templates.prompt == prompt).flatten()
    return templates.videos[own[torch.randint(len(own), (1,), generator=generator)].item()]


# ----------------------------------------------------------------------------------------------
# Evaluation: how near the manifold the pretrained policy samples.

@torch.no_grad()
def sample(policy, prompts, seeds, kernel="ode", eta=0.0, num_steps=world.WORLD_NUM_STEPS,
           shift=world.WORLD_SHIFT, guidance_scale=world.WORLD_GUIDANCE_SCALE):
    """Final latents (B, C, F, H, W) of model.rollout for the prompts (one seed each)."""
    embeds = model.encode_prompts(policy, list(prompts), dtype=torch.float32)
    rollout = model.rollout(policy.transformer, embeds, seeds, world.WORLD_LATENT_SHAPE,
                            sde.shifted_sigmas(num_steps, shift), kernel=kernel, eta=eta, guidance_scale=guidance_scale)
    return rollout.final_latents


# ----------------------------------------------------------------------------------------------
# The cached directory.

def cache_key(config):
    """Hash of the pretraining config and the world's constants (a change of either retrains)."""
    constants = {name: getattr(world, name) for name in (
        "WORLD_LATENT_SHAPE", "OBJECT_SIZE", "SPEED", "AMPLITUDE_MIN", "AMPLITUDE_MAX", "COLOURS", "DIRECTIONS",
        "WORLD_PROMPTS")}
    blob = json.dumps({"config": dataclasses.asdict(config), "world": constants}, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:10]


def pretrained_transformer(config, verbose=False):
    """The pipeline of `config` with its transformer pretrained: the committed weights (WEIGHTS_FILE) when they
    were trained with this config, else flow matching now.  Returns (pipeline, info dict)."""
    from safetensors.torch import load_file, safe_open

    start = time.perf_counter()
    pipeline = build_world_pipeline(config)
    key = cache_key(config)
    if WEIGHTS_FILE.exists():
        with safe_open(str(WEIGHTS_FILE), "pt") as f:
            metadata = f.metadata() or {}
        if metadata.get("cache_key") == key:
            state = load_file(str(WEIGHTS_FILE))
            missing, unexpected = pipeline.transformer.load_state_dict(state, strict=False)
            # only the untrained glyph projection is left out of the file (it is rebuilt from the seed)
            if unexpected or any(not name.startswith(UNTRAINED_PREFIX) for name in missing):
                raise RuntimeError(f"{WEIGHTS_FILE} does not fit the transformer of {config}: missing "
                                   f"{[m for m in missing if not m.startswith(UNTRAINED_PREFIX)]}, unexpected {unexpected}")
            pipeline.transformer.eval().requires_grad_(False)
            return pipeline, {"source": str(WEIGHTS_FILE), "final_loss": float(metadata.get("final_loss", "nan")),
                              "seconds": time.perf_counter() - start}
        if verbose:
            print(f"{WEIGHTS_FILE} was trained with another config (cache key {metadata.get('cache_key')}, "
                  f"this one {key}): pretraining now")
    policy = model.HunyuanVideo15Policy(pipeline=pipeline, shift=config.shift, guidance_scale=config.guidance_scale)
    final_loss = pretrain(policy, config, verbose)
    return pipeline, {"source": "flow matching", "final_loss": final_loss, "seconds": time.perf_counter() - start}


def save_weights(pipeline, config, final_loss, path=None):
    """Write the trained transformer tensors (all but the glyph projection, ~1.7 MB) to WEIGHTS_FILE."""
    from safetensors.torch import save_file

    # The glyph (byT5) projection, 4.4M of the 4.8M parameters, gets no gradient (world prompts quote no
    # text): it must still be its seeded initial value, so that the file can leave it out.
    fresh = build_world_pipeline(config).transformer.state_dict()
    state = pipeline.transformer.state_dict()
    for name, tensor in state.items():
        if name.startswith(UNTRAINED_PREFIX) and not torch.equal(tensor, fresh[name]):
            raise RuntimeError(f"{name} changed during pretraining; it cannot be left out of {WEIGHTS_FILE}")
    trained = {name: t.contiguous() for name, t in state.items() if not name.startswith(UNTRAINED_PREFIX)}
    save_file(trained, str(path or WEIGHTS_FILE), metadata={"cache_key": cache_key(config),
                                                            "final_loss": f"{final_loss:.6f}"})


def build_world(path, config=WorldPretrainConfig(), verbose=False):
    """Write the world's pretrained HunyuanVideo-1.5 directory to `path` (atomically).  Returns path."""
    pipeline, info = pretrained_transformer(config, verbose)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=path.name + ".tmp", dir=path.parent))
    pipeline.save_pretrained(tmp)
    info["config"] = dataclasses.asdict(config)
    (tmp / "world_pretrain.json").write_text(json.dumps(info, indent=2))
    try:
        tmp.rename(path)   # atomic; fails if a concurrent caller finished first
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (path / "model_index.json").exists():
            raise
    if verbose:
        print(f"world transformer from {info['source']} in {info['seconds']:.1f} s "
              f"(final flow-matching loss {info['final_loss']:.4f}) -> {path}")
    return str(path)


def prepare_world(cache_dir=None, verbose=False, config=WorldPretrainConfig()):
    """Path of the pretrained world directory for `config`, built once and cached.

    cache_dir: where to keep it (default world/out/); the directory is <cache_dir>/video_world_<hash>.
    Cold start: a few seconds with the committed weights (WEIGHTS_FILE), otherwise minutes of pretraining.
    """
    path = Path(cache_dir or CACHE_DIR) / f"video_world_{cache_key(config)}"
    if (path / "model_index.json").exists():
        return str(path)
    return build_world(path, config, verbose)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache_dir", default=None, help="where the model directory goes (default world/out/)")
    parser.add_argument("--retrain", action="store_true",
                        help=f"pretrain from scratch (ignoring the committed weights) and overwrite {WEIGHTS_FILE}")
    args = parser.parse_args()
    config = WorldPretrainConfig()
    if args.retrain:
        pipeline = build_world_pipeline(config)
        policy = model.HunyuanVideo15Policy(pipeline=pipeline, shift=config.shift, guidance_scale=config.guidance_scale)
        start = time.perf_counter()
        final_loss = pretrain(policy, config, verbose=True)
        save_weights(pipeline, config, final_loss)
        print(f"pretrained in {time.perf_counter() - start:.1f} s (final loss {final_loss:.4f}) -> {WEIGHTS_FILE}")
        path = Path(args.cache_dir or CACHE_DIR) / f"video_world_{cache_key(config)}"
        shutil.rmtree(path, ignore_errors=True)   # the cached directory of the old weights
    print(prepare_world(args.cache_dir, verbose=True, config=config))


if __name__ == "__main__":
    main()
