"""model.py: the HunyuanVideo-1.5 policy, checked against diffusers and against separate forwards.

Every test runs on a tiny random HunyuanVideo-1.5 written in the real diffusers layout by
`build_tiny_hunyuan` and loaded through `load_hunyuan` (the code path a user runs); no weights are
downloaded. Comparisons are with independent computations: the diffusers `HunyuanVideo15Pipeline`
itself, or transformer forwards assembled by hand.
"""
import copy
import os

import pytest
import torch

import model
import tiny
import sde

PROMPTS = ["a red fox runs through snow", 'a shop sign that says "OPEN"']  # the 2nd exercises byT5
SEEDS = [11, 12]
ETA = 0.7
NUM_STEPS = 3
VIDEO = dict(num_frames=tiny.TINY_NUM_FRAMES, height=tiny.TINY_HEIGHT, width=tiny.TINY_WIDTH)
PARITY_ATOL = 1e-5  # fp32 parity bound with the diffusers pipeline (brief)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return tiny.build_tiny_hunyuan(str(tmp_path_factory.mktemp("hunyuan") / "tiny"), seed=0)


@pytest.fixture(scope="module")
def policy(tiny_path):
    return model.load_hunyuan(tiny_path, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def embeds(policy):
    return model.encode_prompts(policy, PROMPTS)


@pytest.fixture(scope="module")
def latent_shape(policy):
    return policy.latent_shape(**VIDEO)


@pytest.fixture(scope="module")
def sage_rollout(policy, embeds, latent_shape):
    """One stochastic rollout shared by the tests that only read it."""
    return model.rollout(policy.transformer, embeds, SEEDS, latent_shape, sde.shifted_sigmas(NUM_STEPS, policy.shift),
                         kernel="sage", eta=ETA)


def pipeline_generators(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def transformer_forward(transformer, latents, sigma, text, text_mask, glyph, glyph_mask):
    """One plain forward as HunyuanVideo15Pipeline.__call__ feeds it for T2V (written out independently)."""
    batch, channels, frames, height, width = latents.shape
    hidden_states = torch.cat([latents, torch.zeros_like(latents), torch.zeros(batch, 1, frames, height, width)], dim=1)
    image_embeds = torch.zeros(batch, 729, transformer.config.image_embed_dim)
    return transformer(hidden_states=hidden_states, timestep=torch.full((batch,), sigma * 1000.0),
                       encoder_hidden_states=text, encoder_attention_mask=text_mask,
                       encoder_hidden_states_2=glyph, encoder_attention_mask_2=glyph_mask,
                       image_embeds=image_embeds, return_dict=False)[0]


# ---------------------------------------------------------------------------------------------
# Loading.

def test_tiny_directory_loads_with_the_real_layout_and_configs(tiny_path, policy):
    for subfolder in ["transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2",
                      "scheduler", "guider"]:
        assert os.path.isdir(os.path.join(tiny_path, subfolder))
    assert os.path.isfile(os.path.join(tiny_path, "model_index.json"))
    assert policy.shift == 5.0 and policy.guidance_scale == 6.0
    assert type(policy.transformer).__name__ == "HunyuanVideo15Transformer3DModel"
    assert type(policy.pipeline.text_encoder).__name__ == "Qwen2_5_VLTextModel"
    assert type(policy.pipeline.text_encoder_2).__name__ == "T5EncoderModel"


def write_skeleton(root):
    """Empty files in the diffusers layout: enough for the layout check, which reads no weights."""
    files = ["model_index.json", "transformer/config.json", "transformer/diffusion_pytorch_model.safetensors",
             "vae/config.json", "vae/diffusion_pytorch_model.safetensors", "text_encoder/config.json",
             "text_encoder/model.safetensors", "tokenizer/tokenizer_config.json", "text_encoder_2/config.json",
             "text_encoder_2/model.safetensors", "tokenizer_2/tokenizer_config.json", "scheduler/scheduler_config.json"]
    for name in files:
        os.makedirs(os.path.dirname(os.path.join(root, name)), exist_ok=True)
        open(os.path.join(root, name), "w").close()


def test_complete_layout_passes_the_directory_check(tmp_path):
    write_skeleton(tmp_path)
    model.check_hunyuan_directory(str(tmp_path))  # no exception


@pytest.mark.parametrize("removed, named", [
    ("vae", "vae/"),
    ("tokenizer_2", "tokenizer_2/"),
    ("text_encoder", "text_encoder/"),
    ("scheduler/scheduler_config.json", "scheduler/scheduler_config.json"),
    ("transformer/diffusion_pytorch_model.safetensors", "transformer/ weights"),
    ("model_index.json", "model_index.json"),
])
def test_incomplete_directory_raises_an_error_naming_the_missing_piece(tmp_path, removed, named):
    write_skeleton(tmp_path)
    target = os.path.join(tmp_path, removed)
    if os.path.isdir(target):
        for name in os.listdir(target):
            os.remove(os.path.join(target, name))
        os.rmdir(target)
    else:
        os.remove(target)
    with pytest.raises(FileNotFoundError, match="incomplete") as error:
        model.load_hunyuan(str(tmp_path))
    assert named in str(error.value)


def test_missing_directory_raises_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"HunyuanVideo-1.5 '.*nowhere' is not a directory"):
        model.load_hunyuan(str(tmp_path / "nowhere"))


def test_latent_shape_matches_the_pipeline(policy, latent_shape):
    reference = policy.pipeline.prepare_latents(1, policy.vae.config.latent_channels, VIDEO["height"], VIDEO["width"],
                                                VIDEO["num_frames"], torch.float32, "cpu", None)
    assert latent_shape == tuple(reference.shape[1:]) == (4, 3, 4, 4)
    with pytest.raises(ValueError, match="frames"):
        policy.latent_shape(num_frames=6, height=16, width=16)


# ---------------------------------------------------------------------------------------------
# Parity with diffusers.

def test_ode_rollout_matches_diffusers_pipeline(policy, embeds, latent_shape):
    """Same seeds (hence the same initial latents), same prompts: our ODE rollout = the diffusers sampler."""
    reference = policy.pipeline(prompt=PROMPTS, num_inference_steps=NUM_STEPS, generator=pipeline_generators(SEEDS),
                                output_type="latent", **VIDEO).frames
    ours = model.rollout(policy.transformer, embeds, SEEDS, latent_shape, sde.shifted_sigmas(NUM_STEPS, policy.shift),
                         kernel="ode", guidance_scale=policy.guidance_scale)
    difference = (ours.final_latents - reference).abs().max().item()
    print(f"max |ours - diffusers| over final latents: {difference:.3g}")
    assert difference <= PARITY_ATOL
    assert reference.abs().max() > 0.1  # a non-trivial output


def test_initial_noise_matches_the_pipeline_draws(policy, latent_shape):
    noise, _ = model.initial_noise(SEEDS, latent_shape, "cpu")
    reference = policy.pipeline.prepare_latents(len(SEEDS), latent_shape[0], VIDEO["height"], VIDEO["width"],
                                                VIDEO["num_frames"], torch.float32, "cpu",
                                                pipeline_generators(SEEDS))
    assert torch.equal(noise, reference)


def test_decoded_frames_match_the_pipeline_video(policy, embeds, latent_shape):
    reference = policy.pipeline(prompt=PROMPTS[:1], num_inference_steps=2, generator=pipeline_generators(SEEDS[:1]),
                                output_type="pt", **VIDEO).frames  # (1, F, 3, H, W) in [0, 1]
    ours = model.rollout(policy.transformer, embeds.select([0]), SEEDS[:1], latent_shape,
                         sde.shifted_sigmas(2, policy.shift), kernel="ode", guidance_scale=policy.guidance_scale)
    frames = model.decode_latents(policy.vae, ours.final_latents)
    assert frames.shape == reference.shape == (1, VIDEO["num_frames"], 3, VIDEO["height"], VIDEO["width"])
    assert (frames - reference).abs().max() <= PARITY_ATOL


def test_decode_returns_batched_frames_in_unit_interval(policy, latent_shape):
    latents = 5 * torch.randn(2, *latent_shape, generator=torch.Generator().manual_seed(0))  # large: exercises clamp
    frames = model.decode_latents(policy.vae, latents)
    assert frames.shape == (2, VIDEO["num_frames"], 3, VIDEO["height"], VIDEO["width"])
    assert frames.min() >= 0 and frames.max() <= 1
    # per-sample decoding: row 1 is what a batch of one gives
    assert torch.allclose(frames[1:], model.decode_latents(policy.vae, latents[1:]), atol=1e-6)


# ---------------------------------------------------------------------------------------------
# VAE tiling (model.set_vae_tiling).
#
# A tiled decode differs from the untiled one for two reasons (set_vae_tiling's docstring): (1) the
# decoder's mid-block self-attention attends over a tile instead of the frame, which can move any pixel;
# (2) the convolutions replicate a tile's edge instead of seeing the neighbour, which changes the pixels
# within the decoder's reach of the edge, inside the overlap that is then cross-faded. The tests separate
# them: a spatially constant latent has no (1) (every position of a frame carries the same features, so a
# tile attends to the same values as the frame) and the tiny VAE's reach (between 8 and 12 pixels: an
# 8-pixel overlap leaks, 12 does not) is below the 16-pixel overlap used here, so everything outside the
# overlaps must be equal to round-off; a random latent has both, and is held to a measured tolerance.

TILE = 64          # pixels = 16 latent pixels of the tiny 4x VAE: tiles start every 12 latent pixels ...
OVERLAP = 0.25     # ... and neighbouring decoded tiles are cross-faded over 16 pixels
TILED_LATENT = (4, 3, 24, 24)  # (C, F, H, W): 2x2 tiles per frame ([0, 16) and [12, 24) per axis); video 5x96x96
# Overlap bands in pixels, per axis: [48, 64) (the second tile's first 16 pixels, over the first tile's last 16).
BAND = slice(12 * 4, 12 * 4 + int(TILE * OVERLAP))
# Random latent, N(0, 1): tiled vs untiled frames in [0, 1]. Measured over seeds 0-2: mean |diff| 0.0086-0.0094
# (6% of the frames' std, 0.15), max 0.16-0.21 (at the seams), PSNR 35.4-36.0 dB. Limits: about twice the worst
# mean, 5 dB below the worst PSNR.
RANDOM_LATENT_MEAN_ABS = 0.02
RANDOM_LATENT_MIN_PSNR = 30.0


@pytest.fixture
def vae(policy):
    """The loaded tiny VAE, copied: set_vae_tiling changes its state."""
    return copy.deepcopy(policy.vae)


def decode_untiled_and_tiled(vae, latents, tile_size=TILE, overlap=OVERLAP):
    """(untiled, tiled) frames (B, F, 3, H, W) in [0, 1] from model.decode_latents, the trainer's decoder."""
    model.set_vae_tiling(vae, False)
    untiled = model.decode_latents(vae, latents)
    model.set_vae_tiling(vae, True, tile_size=tile_size, overlap=overlap)
    return untiled, model.decode_latents(vae, latents)


def test_vae_tiling_switch_sets_the_tile_sizes_and_auto_is_off_on_cpu(vae):
    assert model.set_vae_tiling(vae, True) is True and vae.use_tiling
    ratio = vae.spatial_compression_ratio  # 4 for the tiny VAE (16 for the real one)
    assert (vae.tile_sample_min_height, vae.tile_sample_min_width) == (model.VAE_TILE_SIZE, model.VAE_TILE_SIZE)
    assert (vae.tile_latent_min_height, vae.tile_latent_min_width) == (model.VAE_TILE_SIZE // ratio,) * 2
    assert vae.tile_overlap_factor == model.VAE_TILE_OVERLAP
    assert model.set_vae_tiling(vae, None) is False and not vae.use_tiling  # auto: on with CUDA only
    assert model.set_vae_tiling(vae, True, tile_size=TILE) and vae.tile_latent_min_height == TILE // ratio
    assert model.set_vae_tiling(vae, False) is False and not vae.use_tiling


@pytest.mark.parametrize("tile_size, overlap", [(62, 0.25), (TILE, 0.0), (32, 0.3), (40, 0.25)])
def test_vae_tiling_refuses_tiles_that_would_not_assemble(vae, tile_size, overlap):
    # e.g. 32-pixel tiles overlapping by 0.3 would give a 108x108 frame instead of 96x96 (diffusers does not check)
    with pytest.raises(ValueError, match=f"VAE tiles of {tile_size} pixels overlapping by {overlap} do not assemble"):
        model.set_vae_tiling(vae, True, tile_size=tile_size, overlap=overlap)


def test_vae_tiling_decodes_a_frame_within_one_tile_exactly_as_untiled(vae, latent_shape):
    # the tiny video (16x16 pixels) is smaller than the default 256-pixel tile: decoded whole, bit for bit
    latents = torch.randn(1, *latent_shape, generator=torch.Generator().manual_seed(0))
    untiled, tiled = decode_untiled_and_tiled(vae, latents, tile_size=model.VAE_TILE_SIZE,
                                              overlap=model.VAE_TILE_OVERLAP)
    assert torch.equal(untiled, tiled)


def test_vae_tiling_of_a_spatially_constant_latent_changes_only_the_tile_overlaps(vae):
    channels, frames, height, width = TILED_LATENT
    per_frame = torch.randn(1, channels, frames, 1, 1, generator=torch.Generator().manual_seed(0))
    untiled, tiled = decode_untiled_and_tiled(vae, per_frame.expand(1, *TILED_LATENT).contiguous())
    diff = (untiled - tiled).abs()  # (1, F, 3, 96, 96)
    in_band = torch.zeros(height * 4, width * 4, dtype=torch.bool)
    in_band[BAND, :] = True
    in_band[:, BAND] = True
    assert diff[..., ~in_band].max() <= 1e-5   # measured 7.5e-7 to 1.0e-6 (seeds 0-2): round-off
    assert diff[..., in_band].max() >= 1e-2    # measured 0.04 to 0.07: the frame was really tiled, 2x2


def test_vae_tiling_of_a_random_latent_stays_within_the_measured_tolerance(vae):
    latents = torch.randn(1, *TILED_LATENT, generator=torch.Generator().manual_seed(0))
    untiled, tiled = decode_untiled_and_tiled(vae, latents)
    mean_abs = (untiled - tiled).abs().mean().item()
    psnr = 10 * torch.log10(1 / (untiled - tiled).pow(2).mean()).item()  # frames in [0, 1]: peak 1
    assert mean_abs <= RANDOM_LATENT_MEAN_ABS and psnr >= RANDOM_LATENT_MIN_PSNR, (mean_abs, psnr)
    assert mean_abs >= 1e-3  # and it was tiled (untiled-vs-untiled would be 0)


def test_the_fp16_decode_computes_in_float16_with_less_round_off_than_bf16(vae, latent_shape):
    # bf16 weights, as on a GPU: the reference decodes the same (bf16-rounded) weights in float64, so what is left
    # is the compute round-off alone. bf16 keeps 7 mantissa bits, fp16 10: the fp16 decode must be clearly nearer
    # (measured 2.1-4.1x on seeds 0-2; ops autocast leaves alone still run in bf16) yet far from float32's
    # round-off (measured ~6e-7 against ~2e-3): it really computed in float16.
    latents = torch.randn(2, *latent_shape, generator=torch.Generator().manual_seed(0))
    vae = vae.to(torch.bfloat16)
    reference = model.decode_latents(copy.deepcopy(vae).double(), latents)
    error = {}
    for precision in model.VAE_PRECISIONS:
        with model.vae_autocast(vae, precision):
            error[precision] = (model.decode_latents(vae, latents) - reference).abs().max().item()
    float32 = (model.decode_latents(copy.deepcopy(vae).float(), latents) - reference).abs().max().item()
    assert error["fp16"] < error["model"] / 1.5, error
    assert error["fp16"] > 100 * float32, (error, float32)
    with pytest.raises(ValueError, match=r"unknown VAE precision 'fp8': expected one of \['model', 'fp16'\]"):
        model.vae_autocast(vae, "fp8")


# ---------------------------------------------------------------------------------------------
# Classifier-free guidance.

def guidance_of_two_separate_forwards(transformer, latents, sigma, e, scale):
    """(v_uncond + s·(v_cond − v_uncond), v_cond, v_uncond) from two unbatched forwards, by hand."""
    with torch.no_grad():
        cond = transformer_forward(transformer, latents, sigma, e.embeds, e.mask, e.embeds_2, e.mask_2)
        uncond = transformer_forward(transformer, latents, sigma, e.negative_embeds, e.negative_mask,
                                     e.negative_embeds_2, e.negative_mask_2)
    return uncond + scale * (cond - uncond), cond, uncond


def test_cfg_velocity_equals_guidance_of_two_separate_forwards(policy, embeds, latent_shape):
    latents = torch.randn(2, *latent_shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model.cfg_velocity(policy.transformer, latents, 0.6, embeds, guidance_scale=6.0)
    reference, cond, uncond = guidance_of_two_separate_forwards(policy.transformer, latents, 0.6, embeds, 6.0)
    assert torch.allclose(ours, reference, atol=1e-5)
    assert not torch.allclose(cond, uncond, atol=1e-3)  # the two branches really differ


@pytest.mark.parametrize("prompts", [PROMPTS, ["a cat", "a red fox runs through snow"]])  # 2nd: no glyph text
def test_trimmed_prompt_embeds_give_the_velocity_of_the_padded_pipeline_inputs(policy, latent_shape, prompts):
    """Dropping the masked padding (text, glyph, the 729-token image slot) leaves the velocity unchanged."""
    padded = model.encode_prompts(policy, prompts, trim_padding=False)
    trimmed = model.encode_prompts(policy, prompts)
    real = lambda mask: int(mask.sum(1).max())  # noqa: E731
    assert padded.mask.shape[1] == 1000 and padded.mask_2.shape[1] == 256  # the pipeline's padding
    assert trimmed.mask.shape[1] == max(real(padded.mask), real(padded.negative_mask)) < 1000
    assert trimmed.mask_2.shape[1] == max(real(padded.mask_2), real(padded.negative_mask_2)) < 256
    for name in ("embeds", "embeds_2", "negative_embeds", "negative_embeds_2"):  # the real tokens, in order
        mask_name = name.replace("embeds", "mask")
        for row in range(len(prompts)):
            keep, kept = getattr(padded, mask_name)[row].bool(), getattr(trimmed, mask_name)[row].bool()
            assert torch.equal(getattr(padded, name)[row][keep], getattr(trimmed, name)[row][kept])
    latents = torch.randn(2, *latent_shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = model.cfg_velocity(policy.transformer, latents, 0.7, trimmed, guidance_scale=6.0)
    reference, _, _ = guidance_of_two_separate_forwards(policy.transformer, latents, 0.7, padded, 6.0)
    print(f"max |trimmed - padded| velocity: {(ours - reference).abs().max().item():.3g}")
    assert (ours - reference).abs().max() <= PARITY_ATOL


def test_the_prompt_cache_gives_the_velocity_of_encode_prompts_and_encodes_each_prompt_once(policy, latent_shape,
                                                                                        monkeypatch):
    """PromptCache rows: encode_prompts' real tokens and masks (each prompt encoded alone, padded with zeros
    instead of the pipeline's masked padding), the same velocity, and no encoder call for a prompt seen before."""
    prompts = [PROMPTS[1], PROMPTS[0], PROMPTS[1]]  # glyph text in rows 0 and 2, a repeat
    cache = model.PromptCache(policy, "cpu", torch.float32)
    reference = model.encode_prompts(policy, prompts)
    got = cache(prompts)
    assert cache.encoded == 2
    for name in ("mask", "mask_2", "negative_mask", "negative_mask_2"):
        assert torch.equal(getattr(got, name), getattr(reference, name)), name
    for name in ("embeds", "embeds_2", "negative_embeds", "negative_embeds_2"):
        mask = getattr(got, name.replace("embeds", "mask")).bool()
        ours, theirs = getattr(got, name), getattr(reference, name)
        assert ours.shape == theirs.shape and not ours[~mask].any(), name   # padding: zeros
        # real tokens: the same encoder on a batch of 1 instead of 2 rows: round-off of the encoder's outputs
        if mask.any():  # (the negative prompt quotes no text: no glyph token)
            assert (ours[mask] - theirs[mask]).abs().max() <= 1e-5 * max(theirs[mask].abs().max(), 1), name
    latents = torch.randn(3, *latent_shape, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ours = model.cfg_velocity(policy.transformer, latents, 0.7, got, guidance_scale=6.0)
        theirs = model.cfg_velocity(policy.transformer, latents, 0.7, reference, guidance_scale=6.0)
    assert (ours - theirs).abs().max() <= PARITY_ATOL
    # seen prompts come from the cache: the pipeline's encoder is not called again
    calls = []
    encode = policy.pipeline.encode_prompt
    monkeypatch.setattr(policy.pipeline, "encode_prompt", lambda *a, **k: calls.append(1) or encode(*a, **k))
    again = cache([PROMPTS[0]])
    assert not calls and cache.encoded == 2 and torch.equal(again.embeds[0], got.embeds[1][:again.embeds.shape[1]])


def test_the_prompt_cache_keeps_the_most_recently_used_prompts(policy):
    cache = model.PromptCache(policy, "cpu", torch.float32, capacity=2)
    for prompts in (["a"], ["b"], ["a"], ["c"]):  # "b" is the least recently used when "c" arrives
        cache(prompts)
    assert set(cache.rows) == {"a", "c"} and cache.encoded == 3
    cache(["b"])
    assert set(cache.rows) == {"c", "b"} and cache.encoded == 4
    with pytest.raises(ValueError, match="at least 1 prompt, got capacity 0"):
        model.PromptCache(policy, "cpu", torch.float32, capacity=0)


def test_cfg_runs_exactly_one_transformer_forward_per_step(policy, embeds, latent_shape):
    calls = []
    handle = policy.transformer.register_forward_hook(lambda module, args, kwargs_output: calls.append(1))
    try:
        model.rollout(policy.transformer, embeds.select([0]), SEEDS[:1], latent_shape,
                      sde.shifted_sigmas(2, policy.shift), kernel="sage", eta=ETA)
    finally:
        handle.remove()
    assert len(calls) == 2


def test_at_guidance_scale_1_one_forward_of_batch_b_gives_the_conditional_velocity(policy, embeds, latent_shape):
    """CFG-free (scale 1): v = v_uncond + 1·(v_cond − v_uncond) = v_cond, computed from the conditional rows alone."""
    rows = []
    handle = policy.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: rows.append(kwargs["hidden_states"].shape[0]), with_kwargs=True)
    latents = torch.randn(2, *latent_shape, generator=torch.Generator().manual_seed(4))
    try:
        with torch.no_grad():
            free = model.cfg_velocity(policy.transformer, latents, 0.6, embeds, guidance_scale=1.0)
    finally:
        handle.remove()
    assert rows == [2]  # one forward, B rows, no unconditional half
    with torch.no_grad():
        _, cond, _ = guidance_of_two_separate_forwards(policy.transformer, latents, 0.6, embeds, 6.0)
    assert (free - cond).abs().max() <= PARITY_ATOL


def test_cfg_gradients_flow_through_both_branches(policy, embeds, latent_shape):
    transformer = copy.deepcopy(policy.transformer).requires_grad_(True)
    text = embeds.embeds.clone().requires_grad_(True)
    negative_text = embeds.negative_embeds.clone().requires_grad_(True)
    e = model.PromptEmbeds(text, embeds.mask, embeds.embeds_2, embeds.mask_2, negative_text, embeds.negative_mask,
                           embeds.negative_embeds_2, embeds.negative_mask_2)
    latents = torch.randn(2, *latent_shape, generator=torch.Generator().manual_seed(2))
    velocity = model.cfg_velocity(transformer, latents, torch.tensor([0.9, 0.3]), e, guidance_scale=6.0)
    velocity.square().mean().backward()
    assert text.grad.abs().sum() > 0 and negative_text.grad.abs().sum() > 0
    assert transformer.proj_out.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# Rollouts.

@pytest.mark.parametrize("kernel", sde.STOCHASTIC_KERNELS)
def test_same_seed_gives_the_same_sample_and_other_seeds_differ(policy, embeds, latent_shape, kernel):
    """Rows 0 and 1 share prompt and seed, row 2 has another seed: one batch holds all three rollouts.

    Identical rows of one batch agree to float32 round-off (~1e-6 after CFG's ×6), not bitwise; separate
    calls are bitwise identical (test_a_sample_is_reproduced_by_its_seed_alone)."""
    result = model.rollout(policy.transformer, embeds.select([1, 1, 1]), [5, 5, 6], latent_shape,
                           sde.shifted_sigmas(2, policy.shift), kernel=kernel, eta=ETA)
    assert torch.allclose(result.latents[0], result.latents[1], atol=1e-5, rtol=0)
    assert torch.allclose(result.log_probs[0], result.log_probs[1], atol=1e-4, rtol=0)
    assert not torch.allclose(result.final_latents[0], result.final_latents[2], atol=1e-3)
    assert (result.stds[:, 0] > 0).all()  # the first step really is stochastic


def test_rollout_shapes(sage_rollout, latent_shape):
    assert sage_rollout.latents.shape == (2, NUM_STEPS + 1, *latent_shape)
    assert sage_rollout.means.shape == (2, NUM_STEPS, *latent_shape)
    assert sage_rollout.log_probs.shape == sage_rollout.stds.shape == (2, NUM_STEPS)
    assert sage_rollout.sigmas.shape == (NUM_STEPS + 1,) and sage_rollout.seeds.tolist() == SEEDS
    assert torch.isfinite(sage_rollout.log_probs).all()


def test_a_sample_is_reproduced_by_its_seed_alone(policy, embeds, latent_shape, sage_rollout):
    """Sample (prompt 1, seed 12): rerunning it alone repeats it exactly, and equals row 1 of the batch."""
    sigmas = sde.shifted_sigmas(NUM_STEPS, policy.shift)
    alone = model.rollout(policy.transformer, embeds.select([1]), SEEDS[1:], latent_shape, sigmas, kernel="sage", eta=ETA)
    again = model.rollout(policy.transformer, embeds.select([1]), SEEDS[1:], latent_shape, sigmas, kernel="sage", eta=ETA)
    assert torch.equal(alone.latents, again.latents) and torch.equal(alone.log_probs, again.log_probs)
    assert torch.allclose(sage_rollout.latents[1:], alone.latents, atol=1e-5)


def test_sde_window_leaves_the_other_steps_deterministic(policy, embeds, latent_shape):
    result = model.rollout(policy.transformer, embeds.select([0]), SEEDS[:1], latent_shape,
                           sde.shifted_sigmas(3, policy.shift), kernel="sage", eta=ETA, sde_window=(1, 2))
    assert result.stochastic.tolist() == [False, True, False]
    assert (result.stds[:, [0, 2]] == 0).all() and (result.log_probs[:, [0, 2]] == 0).all()
    assert (result.stds[:, 1] > 0).all()
    # a deterministic step lands exactly on its mean
    assert torch.equal(result.latents[:, 1], result.means[:, 0])
    with pytest.raises(ValueError, match="SDE window"):
        model.rollout(policy.transformer, embeds, SEEDS, latent_shape, sde.shifted_sigmas(2, 5.0), sde_window=(1, 5))


@pytest.mark.parametrize("kernel", ["sage", "cps"])
def test_recorded_log_probs_equal_recomputed_transition_log_probs(policy, embeds, latent_shape, sage_rollout, kernel):
    """On-policy consistency: with the rollout's weights, the update-time log-prob is the recorded one."""
    result = sage_rollout if kernel == "sage" else model.rollout(
        policy.transformer, embeds, SEEDS, latent_shape, sde.shifted_sigmas(NUM_STEPS, policy.shift), kernel=kernel,
        eta=ETA)
    transformer = copy.deepcopy(policy.transformer).requires_grad_(True)
    step_index = torch.tensor([1, NUM_STEPS - 1])  # a different step per sample, as in training
    recorded = result.transitions(step_index)
    mean, std, log_prob = model.transition_log_prob(transformer, embeds, recorded, kernel=kernel, eta=ETA)
    assert log_prob.shape == (2,) and log_prob.requires_grad
    assert torch.allclose(log_prob, recorded.log_prob, atol=1e-5, rtol=0)
    assert torch.allclose(torch.exp(log_prob - recorded.log_prob), torch.ones(2), atol=1e-5)
    assert torch.allclose(mean, recorded.mean, atol=1e-5)
    assert torch.allclose(std.flatten().float(), recorded.std, atol=1e-6)
    log_prob.sum().backward()
    assert transformer.proj_out.weight.grad.abs().sum() > 0


def test_transitions_gather_each_samples_own_step(sage_rollout):
    recorded = sage_rollout.transitions(torch.tensor([2, 0]))
    assert torch.equal(recorded.latents[0], sage_rollout.latents[0, 2])
    assert torch.equal(recorded.next_latents[1], sage_rollout.latents[1, 1])
    assert torch.equal(recorded.mean[0], sage_rollout.means[0, 2])
    assert recorded.sigma.tolist() == [sage_rollout.sigmas[2].item(), 1.0]
    with pytest.raises(ValueError, match="step_index"):
        sage_rollout.transitions(torch.tensor([0, NUM_STEPS]))


def test_prompt_embeds_repeat_into_groups(embeds):
    grouped = embeds.repeat_interleave(3)
    assert len(grouped) == 6
    assert torch.equal(grouped.embeds[2], embeds.embeds[0]) and torch.equal(grouped.embeds[3], embeds.embeds[1])
    assert torch.equal(grouped.negative_embeds[5], embeds.negative_embeds[1])


def test_shared_initial_seeds_give_one_initial_noise_and_separate_step_noise(policy, embeds, latent_shape):
    sigmas = sde.shifted_sigmas(3, policy.shift)
    batch = embeds.select([0, 0, 1, 1])
    shared = model.rollout(policy.transformer, batch, [10, 11, 12, 13], latent_shape, sigmas, kernel="sage", eta=ETA,
                           initial_seeds=[10, 10, 12, 12])
    plain = model.rollout(policy.transformer, batch, [10, 11, 12, 13], latent_shape, sigmas, kernel="sage", eta=ETA)
    x0 = shared.latents[:, 0]
    assert torch.equal(x0[0], x0[1]) and torch.equal(x0[2], x0[3]) and not torch.equal(x0[0], x0[2])
    assert torch.equal(x0[0], plain.latents[0, 0])                     # the group's noise is member 0's own
    noise_0 = shared.latents[0, 1] - shared.means[0, 0]                # the first SDE step's noise, per member
    noise_1 = shared.latents[1, 1] - shared.means[1, 0]
    assert not torch.allclose(noise_0, noise_1)                        # members still explore apart
    # member 0's step noise is not its initial noise again (the stream goes on past the initial draw)
    standardized = noise_0 / shared.stds[0, 0]
    assert not torch.allclose(standardized, x0[0], atol=1e-3)
