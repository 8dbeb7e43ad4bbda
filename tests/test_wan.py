"""wan.py: Wan2.1-T2V as a policy family, checked against diffusers' WanPipeline and float64 recomputations.

Every test runs on a tiny random Wan2.1 written in the real diffusers layout by `tiny.build_tiny_wan` and loaded
through `model.load_policy_family` (the code path a user runs). References are independent: WanPipeline itself
(its sampler with a FlowMatchEulerDiscreteScheduler of the checkpoint's shift, its encode_prompt, its decode
path), and the same maths written out here in float64. Tolerances are not constants: a float32 result may
differ from the float64 one by a few times what the library's own float32 computation of it does
(`roundoff_bound`).
"""
import copy
import json
import os
import shutil

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

import model
import sde
import tiny
import wan

PROMPTS = ["a red fox runs through snow", "a cat"]  # different real lengths: the cut and the zero padding matter
SEEDS = [11, 12]
NUM_STEPS = 3
VIDEO = dict(num_frames=tiny.TINY_WAN_NUM_FRAMES, height=tiny.TINY_WAN_HEIGHT, width=tiny.TINY_WAN_WIDTH)
EPS32 = torch.finfo(torch.float32).eps
SLACK = 4  # ours may round a few times differently from the library (batched CFG, z·std vs z/(1/std))


def roundoff_bound(library32, reference64):
    """SLACK x the library's own float32 error against the float64 computation of the same maths, and at least
    SLACK float32 ulps of the output's scale (where the library happens to round exactly)."""
    scale = reference64.abs().max().item()
    return SLACK * max((library32.double() - reference64).abs().max().item(), EPS32 * scale)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return tiny.build_tiny_wan(str(tmp_path_factory.mktemp("wan") / "tiny"), seed=0)


@pytest.fixture(scope="module")
def policy(tiny_path):
    return model.load_policy_family(tiny_path, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def embeds(policy):
    return policy.encode_prompts(PROMPTS)


@pytest.fixture(scope="module")
def latent_shape(policy):
    return policy.latent_shape(**VIDEO)


def euler_pipeline(policy):
    """WanPipeline's own sampler with a FlowMatchEulerDiscreteScheduler of the checkpoint's shift (the ODE
    step x' = x + (σ' − σ)·v, which our kernel "ode" is), sharing the loaded components."""
    pipeline = copy.copy(policy.pipeline)
    pipeline.scheduler = FlowMatchEulerDiscreteScheduler(shift=policy.shift)
    return pipeline


def pipeline_sigmas(pipeline, num_steps):
    """The σ schedule WanPipeline samples with (N + 1 values, the last 0)."""
    scheduler = copy.deepcopy(pipeline.scheduler)
    scheduler.set_timesteps(num_steps)
    return scheduler.sigmas.float()


def pipeline_embeds(policy):
    """(cond, uncond) text embeddings as WanPipeline.__call__ makes them by default (its negative prompt "")."""
    with torch.no_grad():
        return policy.pipeline.encode_prompt(PROMPTS, negative_prompt=None, max_sequence_length=512)


def float64_ode(transformer, noise, sigmas, cond, uncond, guidance_scale):
    """The guided Euler ODE in float64, written out here: two separate forwards per step."""
    transformer = copy.deepcopy(transformer).double()
    x = noise.double()
    for sigma, sigma_next in zip(sigmas[:-1].double(), sigmas[1:].double()):
        timestep = torch.full((x.shape[0],), sigma.item() * 1000.0, dtype=torch.float64)
        v_cond = transformer(hidden_states=x, timestep=timestep, encoder_hidden_states=cond.double(), return_dict=False)[0]
        v_uncond = transformer(hidden_states=x, timestep=timestep, encoder_hidden_states=uncond.double(),
                               return_dict=False)[0]
        x = x + (sigma_next - sigma) * (v_uncond + guidance_scale * (v_cond - v_uncond))
    return x


# ---------------------------------------------------------------------------------------------
# The family, the directory.

def write_index(path, class_name, **extra):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "model_index.json"), "w") as f:
        json.dump({"_class_name": class_name, **extra}, f)
    return str(path)


def test_the_family_is_read_from_model_index(tiny_path, tmp_path):
    assert model.family_of(tiny_path) is wan.WanPolicy
    assert model.family_of(write_index(tmp_path / "h", "HunyuanVideo15Pipeline")) is model.HunyuanVideo15Policy
    assert isinstance(model.load_policy_family(tiny_path, dtype=torch.float32), wan.WanPolicy)


@pytest.mark.parametrize("class_name", ["WanImageToVideoPipeline", "HunyuanVideo15ImageToVideoPipeline", "FluxPipeline"])
def test_an_unsupported_pipeline_is_refused_in_one_line_naming_it_and_the_supported_ones(tmp_path, class_name):
    with pytest.raises(ValueError) as error:
        model.load_policy_family(write_index(tmp_path, class_name))
    message = str(error.value)
    assert class_name in message and "WanPipeline" in message and "HunyuanVideo15Pipeline" in message
    assert "\n" not in message


@pytest.mark.parametrize("change, named", [
    (lambda index, vae: index.update(boundary_ratio=0.875, transformer_2=["diffusers", "WanTransformer3DModel"]),
     "boundary_ratio 0.875"),
    (lambda index, vae: index.update(expand_timesteps=True), "expand_timesteps"),
    (lambda index, vae: vae.update(z_dim=48), "48-channel VAE"),
])
def test_a_wan22_checkpoint_is_refused_in_one_line(tiny_path, tmp_path, change, named):
    path = str(tmp_path / "wan22")
    shutil.copytree(tiny_path, path)
    files = [os.path.join(path, "model_index.json"), os.path.join(path, "vae", "config.json")]
    configs = [json.load(open(f)) for f in files]
    change(*configs)
    for f, config in zip(files, configs):
        json.dump(config, open(f, "w"))
    with pytest.raises(ValueError, match="Wan2.2 checkpoint") as error:
        model.load_policy_family(path)
    assert named in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("removed, named", [
    ("vae", "vae/"),
    ("tokenizer", "tokenizer/"),
    ("text_encoder/model.safetensors", "text_encoder/ weights"),
    ("scheduler/scheduler_config.json", "scheduler/scheduler_config.json"),
    ("transformer/diffusion_pytorch_model.safetensors", "transformer/ weights"),
])
def test_an_incomplete_directory_names_the_missing_piece_before_reading_weights(tiny_path, tmp_path, removed, named):
    path = str(tmp_path / "broken")
    shutil.copytree(tiny_path, path)
    target = os.path.join(path, removed)
    shutil.rmtree(target) if os.path.isdir(target) else os.remove(target)
    with pytest.raises(FileNotFoundError, match="incomplete") as error:
        model.load_policy_family(path)
    assert named in str(error.value)


def test_sampling_defaults_come_from_the_checkpoint(tmp_path):
    """shift: the UniPC scheduler's flow_shift (5.0 written here, 3.0 by default), or the shift of a
    FlowMatchEuler scheduler revision; CFG 5.0 (WanPipeline's default)."""
    path = tiny.build_tiny_wan(str(tmp_path / "w"), flow_shift=5.0)
    assert wan.sampling_defaults(path) == (5.0, 5.0)
    FlowMatchEulerDiscreteScheduler(shift=7.0).save_config(os.path.join(path, "scheduler"))
    assert model.family_of(path).sampling_defaults(path) == (7.0, 5.0)


def test_latent_shape_matches_the_pipeline_and_invalid_sizes_are_refused(policy, latent_shape):
    reference = policy.pipeline.prepare_latents(1, 16, VIDEO["height"], VIDEO["width"], VIDEO["num_frames"],
                                                torch.float32, "cpu", None)
    assert latent_shape == tuple(reference.shape[1:]) == (16, 3, 4, 4)
    for size in [(8, 32, 32), (9, 24, 32), (9, 32, 40), (0, 32, 32)]:  # frames 4k+1, sides multiples of 16
        with pytest.raises(ValueError, match="4 \\+ 1\\) frames x multiples of 16 pixels"):
            policy.latent_shape(*size)


def test_the_sequence_parallel_size_must_divide_the_heads():
    wan.check_sp_size({"num_attention_heads": 12}, 4)  # the 1.3B model
    with pytest.raises(ValueError, match="divide Wan's 12 attention heads.*found 8"):
        wan.check_sp_size({"num_attention_heads": 12}, 8)
    with pytest.raises(ValueError, match="40 attention heads"):
        wan.check_sp_size({"num_attention_heads": 40}, 3)


def test_tiny_model_paths_builds_a_wan(tmp_path):
    paths = tiny.tiny_model_paths(str(tmp_path), wan="")
    assert model.family_of(paths["wan"]) is wan.WanPolicy


# ---------------------------------------------------------------------------------------------
# Prompt embeddings.

def test_prompt_embeddings_are_umt5_cut_to_the_real_length_and_zero_padded_to_512(policy, embeds):
    """Written out: tokenize with the mask, run UMT5, keep each prompt's real tokens, zeros after them; and the
    same as WanPipeline.encode_prompt at the pipeline's max_sequence_length 512."""
    pipeline = policy.pipeline
    for prompt_list, ours in ((PROMPTS, embeds.embeds), ([""] * len(PROMPTS), embeds.negative_embeds)):
        tokens = pipeline.tokenizer(prompt_list, padding="max_length", max_length=512, truncation=True,
                                    return_attention_mask=True, return_tensors="pt")
        hidden = pipeline.text_encoder(tokens.input_ids, tokens.attention_mask).last_hidden_state
        lengths = tokens.attention_mask.sum(1)
        for row, length in enumerate(lengths):
            assert torch.allclose(ours[row, :length], hidden[row, :length], atol=0, rtol=0)
            assert not ours[row, length:].any()  # zero vectors, not the encoder's padding outputs
        assert ours.shape == (len(PROMPTS), 512, 32)
    # one token per character ("▁x" starts a word) + </s>: the real lengths differ by prompt
    assert embeds.lengths.tolist() == [len(p.replace(" ", "")) + 1 for p in PROMPTS] == [23, 5]
    reference, negative = pipeline.encode_prompt(PROMPTS, negative_prompt="", max_sequence_length=512)
    assert torch.equal(embeds.embeds, reference) and torch.equal(embeds.negative_embeds, negative)


def test_the_wan_transformer_attends_to_text_padding_so_it_is_kept(policy, embeds, latent_shape):
    """Why the 512 tokens are not trimmed (as HunyuanVideo-1.5's are): cutting the zero padding changes the
    velocity by far more than round-off; and encode_prompts refuses to."""
    latents = torch.randn(2, *latent_shape, generator=torch.Generator().manual_seed(3))
    length = int(torch.cat([embeds.lengths, embeds.negative_lengths]).max())
    trimmed = wan.WanPromptEmbeds(embeds.embeds[:, :length], embeds.negative_embeds[:, :length], embeds.lengths,
                                  embeds.negative_lengths)
    with torch.no_grad():
        full = wan.cfg_velocity(policy.transformer, latents, 0.7, embeds, 5.0)
        cut = wan.cfg_velocity(policy.transformer, latents, 0.7, trimmed, 5.0)
    assert (full - cut).abs().max() > 1e3 * EPS32 * full.abs().max()
    with pytest.raises(ValueError, match="cannot be trimmed"):
        policy.encode_prompts(PROMPTS, trim_padding=True)


def test_the_prompt_cache_gives_encode_prompts_rows_and_survives_releasing_the_encoder(tiny_path, latent_shape):
    own = model.load_policy_family(tiny_path, dtype=torch.float32)  # this test releases its text encoder
    cache = model.PromptCache(own, "cpu", torch.float32)
    prompts = [PROMPTS[1], PROMPTS[0], PROMPTS[1]]
    got, reference = cache(prompts), own.encode_prompts(prompts)
    assert cache.encoded == 2
    for name in ("embeds", "negative_embeds"):  # the encoder on 1 row instead of 3: its round-off
        ours, theirs = getattr(got, name), getattr(reference, name)
        assert ours.shape == theirs.shape and (ours - theirs).abs().max() <= SLACK * EPS32 * theirs.abs().max() * 32
        assert torch.equal(ours == 0, theirs == 0)  # the same zero padding
    assert torch.equal(got.lengths, reference.lengths)
    assert own.release_text_encoder() > 0 and own.text_encoders == ()
    again = cache([PROMPTS[0]])  # cached: no encoder needed
    assert torch.equal(again.embeds[0], got.embeds[1]) and cache.encoded == 2
    with pytest.raises(RuntimeError, match="released"):
        cache(["a prompt never seen"])


# ---------------------------------------------------------------------------------------------
# The velocity and the sampler: parity with WanPipeline.

def test_cfg_is_one_forward_of_batch_2b_equal_to_two_separate_forwards(policy, embeds, latent_shape):
    latents = torch.randn(2, *latent_shape, generator=torch.Generator().manual_seed(1))
    batches = []
    handle = policy.transformer.register_forward_pre_hook(lambda m, a, k: batches.append(k["hidden_states"].shape[0]),
                                                          with_kwargs=True)
    try:
        with torch.no_grad():
            ours = wan.cfg_velocity(policy.transformer, latents, 0.6, embeds, 5.0)
    finally:
        handle.remove()
    assert batches == [4]
    with torch.no_grad():
        timestep = torch.full((2,), 600.0)
        forward = lambda text: policy.transformer(hidden_states=latents, timestep=timestep,  # noqa: E731
                                                  encoder_hidden_states=text, return_dict=False)[0]
        cond, uncond = forward(embeds.embeds), forward(embeds.negative_embeds)
    reference = uncond + 5.0 * (cond - uncond)
    assert (ours - reference).abs().max() <= SLACK * EPS32 * 16 * reference.abs().max()
    assert (cond - uncond).abs().max() > 1e-3  # the branches really differ (a swap would show)


def test_ode_rollout_equals_wanpipeline_latents(policy, embeds, latent_shape):
    """Same seeds, same prompts and negative prompt, the pipeline's own σ schedule: model.rollout with kernel
    "ode" reproduces WanPipeline(output_type="latent") with a FlowMatchEuler scheduler of the checkpoint's shift."""
    pipeline = euler_pipeline(policy)
    reference = pipeline(prompt=PROMPTS, num_inference_steps=NUM_STEPS, guidance_scale=policy.guidance_scale,
                         generator=[torch.Generator().manual_seed(s) for s in SEEDS], output_type="latent",
                         **VIDEO).frames
    sigmas = pipeline_sigmas(pipeline, NUM_STEPS)
    ours = model.rollout(policy.transformer, embeds, SEEDS, latent_shape, sigmas, kernel="ode",
                         guidance_scale=policy.guidance_scale).final_latents
    noise, _ = model.initial_noise(SEEDS, latent_shape, "cpu")
    exact = float64_ode(policy.transformer, noise, sigmas, *pipeline_embeds(policy), policy.guidance_scale)
    difference = (ours - reference).abs().max().item()
    scale = reference.abs().max().item()
    print(f"Wan ODE parity: max |ours - WanPipeline| = {difference:.3g}, scale {scale:.3g}, ratio "
          f"{difference / scale:.3g}; pipeline vs float64 {(reference.double() - exact).abs().max().item():.3g}")
    assert (ours.double() - exact).abs().max() <= roundoff_bound(reference, exact)
    assert difference <= 2 * roundoff_bound(reference, exact)
    assert scale > 0.1 and (reference - noise).abs().max() > 0.1  # a non-trivial output


def test_with_the_projects_schedule_the_rollout_equals_the_pipeline_given_those_sigmas(policy, embeds, latent_shape):
    """sde.shifted_sigmas(N, s) (what training samples with) fed to the same pipeline through its scheduler."""
    pipeline = euler_pipeline(policy)
    sigmas = sde.shifted_sigmas(NUM_STEPS, policy.shift)
    unshifted = torch.linspace(1, 0, NUM_STEPS + 1)[:-1].numpy()  # FlowMatchEuler shifts what it is given
    set_timesteps = pipeline.scheduler.set_timesteps
    pipeline.scheduler.set_timesteps = lambda n, device=None: set_timesteps(sigmas=unshifted, device=device)
    reference = pipeline(prompt=PROMPTS, num_inference_steps=NUM_STEPS, guidance_scale=policy.guidance_scale,
                         generator=[torch.Generator().manual_seed(s) for s in SEEDS], output_type="latent",
                         **VIDEO).frames
    assert torch.allclose(pipeline.scheduler.sigmas.double(), sigmas, atol=1e-6)
    ours = model.rollout(policy.transformer, embeds, SEEDS, latent_shape, sigmas, kernel="ode",
                         guidance_scale=policy.guidance_scale).final_latents
    noise, _ = model.initial_noise(SEEDS, latent_shape, "cpu")
    exact = float64_ode(policy.transformer, noise, sigmas.float(), *pipeline_embeds(policy), policy.guidance_scale)
    assert (ours.double() - exact).abs().max() <= roundoff_bound(reference, exact)


def test_decode_equals_the_pipelines_decode_path(policy, latent_shape):
    """WanPipeline(output_type="pt") decodes the latents it was given after 1 step; ours decodes the same latents
    (the pipeline's own output_type="latent" run); float64 VAE as the exact reference."""
    pipeline = euler_pipeline(policy)
    kwargs = dict(prompt=PROMPTS[:1], num_inference_steps=1, guidance_scale=5.0, **VIDEO)
    latents = pipeline(generator=torch.Generator().manual_seed(5), output_type="latent", **kwargs).frames
    video = pipeline(generator=torch.Generator().manual_seed(5), output_type="pt", **kwargs).frames  # (1, F, 3, H, W)
    frames = policy.decode(latents)
    vae64 = copy.deepcopy(policy.vae).double()
    mean = torch.tensor(vae64.config.latents_mean, dtype=torch.float64).view(1, 16, 1, 1, 1)
    std = torch.tensor(vae64.config.latents_std, dtype=torch.float64).view(1, 16, 1, 1, 1)
    with torch.no_grad():
        exact = (vae64.decode(latents.double() * std + mean).sample / 2 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4)
    assert frames.shape == video.shape == (1, VIDEO["num_frames"], 3, VIDEO["height"], VIDEO["width"])
    print(f"Wan decode parity: max |ours - WanPipeline| = {(frames - video).abs().max().item():.3g}")
    assert (frames.double() - exact).abs().max() <= roundoff_bound(video, exact)
    assert frames.min() >= 0 and frames.max() <= 1 and frames.std() > 1e-3


def test_recorded_log_probs_equal_recomputed_transition_log_probs(policy, embeds, latent_shape):
    """The shared sampler on the Wan family: a sage rollout's log-probs are recomputed by transition_log_prob."""
    sigmas = sde.shifted_sigmas(NUM_STEPS, policy.shift)
    rollout = model.rollout(policy.transformer, embeds, SEEDS, latent_shape, sigmas, kernel="sage", eta=0.7,
                            guidance_scale=policy.guidance_scale)
    for step in range(NUM_STEPS - 1):  # the last step (σ' = 0) is deterministic for sage
        _, _, log_prob = model.transition_log_prob(policy.transformer, embeds, rollout.transitions(step), "sage", 0.7,
                                                   policy.guidance_scale)
        assert torch.allclose(log_prob, rollout.log_probs[:, step], atol=1e-4)


def test_the_config_check_refuses_an_sp_size_that_does_not_divide_the_checkpoints_heads(tiny_path, tmp_path):
    """config.check_inputs asks the checkpoint's family (here Wan, 2 heads in the tiny model) before loading."""
    import config
    os.makedirs(tmp_path / "reward")
    cfg = config.parse_config(["--model_path", tiny_path, "--reward_path", str(tmp_path / "reward"), "--sp_size", "4",
                               "--output_dir", str(tmp_path / "out")])
    with pytest.raises(config.ConfigError, match=r"--sp_size must divide Wan's 2 attention heads.*found 4"):
        config.check_inputs(cfg, 4)
