"""The synthetic video world (world/video_world.py, world/pretrain.py): its exact manifold distance,
its reward's closed forms, and its pretrained policy in the real HunyuanVideo-1.5 layout."""
import functools
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import model
import sde
from world import video_world as world
from world import pretrain as world_pretrain

N = math.prod(world.WORLD_LATENT_SHAPE)   # elements of one latent video (192)
SQUARE_NORM = math.sqrt(world.WORLD_LATENT_SHAPE[1] * world.OBJECT_SIZE ** 2)   # ‖V‖: 3 frames x 4 pixels, unit colour


def template(prompt, start, amplitude=1.0):
    spec = world.parse_prompt(prompt)
    return world.render_video(spec.colour, spec.direction, start, amplitude)


# ----------------------------------------------------------------------------------------------
# The manifold and its distance.

def test_templates_are_the_prompt_squares_with_the_stated_norm():
    # hand-built: a red square moving right from (1, 0) covers rows 1-2 and columns t, 1+t at frame t
    video = template("a red square moving right", (1, 0), amplitude=2.0)
    for t in range(world.WORLD_LATENT_SHAPE[1]):
        expected = torch.zeros(world.WORLD_LATENT_SHAPE[2:], dtype=torch.float64)
        expected[1:3, t:2 + t] = 1.0
        for c in range(4):
            assert torch.equal(video[c, t], 2.0 * 0.5 * expected)   # red = (½, ½, ½, ½)
    assert video.norm().item() == pytest.approx(2.0 * SQUARE_NORM)
    assert world.start_positions("right").tolist() == [[0, 0], [1, 0], [2, 0]]
    assert world.start_positions("up").tolist() == [[2, 0], [2, 1], [2, 2]]
    with pytest.raises(ValueError, match="leaves the 4x4 frame"):
        template("a red square moving right", (0, 1))


def test_world_videos_lie_exactly_on_the_manifold():
    prompts = list(world.WORLD_PROMPTS) * 8
    x = world.sample_videos(prompts, torch.Generator().manual_seed(0), dtype=torch.float64)
    assert world.distance_to_manifold(x).max().item() < 1e-12
    assert world.distance_to_manifold(x, prompts).max().item() < 1e-12
    # the data's scale: RMS a/4 ∈ [0.5, 0.75] (the square, elements ±a/2, covers 1/4 of each frame), the unit
    # scale of the N(0, I) noise (not 1e-3, not 100)
    assert 0.5 < x.pow(2).mean().sqrt().item() < 0.75


@given(st.integers(0, 2 ** 31 - 1), st.floats(0.0, 0.1), st.floats(world.AMPLITUDE_MIN, world.AMPLITUDE_MAX))
def test_distance_of_an_orthogonal_perturbation_is_its_rms(seed, delta, amplitude):
    # x = a·V + δ√N·u with ‖u‖ = 1, u ⊥ V: the nearest point is a·V (u has no component along V), at RMS
    # distance δ, as long as no other point of M is nearer. The nearest other template overlaps V in at most
    # 6 of its 12 pixels, so ‖aV − bV'‖² ≥ 12(a² − ab + b²) ≥ 9a² ≥ 36: other points are ≥ 6 from a·V,
    # and δ√N ≤ 0.1·13.9 = 1.4 < 6 / 2.
    generator = torch.Generator().manual_seed(seed)
    prompts = [world.WORLD_PROMPTS[seed % len(world.WORLD_PROMPTS)]]
    V = template(prompts[0], world.start_positions(world.parse_prompt(prompts[0]).direction)[seed % 3])
    u = torch.randn(V.shape, generator=generator, dtype=torch.float64)
    u = u - (u * V).sum() / (V * V).sum() * V   # Gram-Schmidt against V
    u = u / u.norm()
    x = (amplitude * V + delta * math.sqrt(N) * u)[None]
    projection = world.project(x)
    assert projection.distance.item() == pytest.approx(delta, abs=1e-9)
    assert projection.amplitude.item() == pytest.approx(amplitude, abs=1e-9)
    assert torch.allclose(projection.nearest[0], amplitude * V, atol=1e-9)


@pytest.mark.parametrize("amplitude", [world.AMPLITUDE_MAX + 0.5, world.AMPLITUDE_MAX + 2.0, world.AMPLITUDE_MIN - 0.5])
def test_distance_outside_the_amplitude_range_is_the_overshoot(amplitude):
    # a·V with a outside [a_min, a_max]: nearest point clamp(a)·V, distance |a − clamp(a)|·‖V‖/√N
    V = template("a blue square moving down", (0, 1))
    clamped = min(max(amplitude, world.AMPLITUDE_MIN), world.AMPLITUDE_MAX)
    distance = world.distance_to_manifold((amplitude * V)[None]).item()
    assert distance == pytest.approx(abs(amplitude - clamped) * SQUARE_NORM / math.sqrt(N), abs=1e-12)


@functools.lru_cache(maxsize=1)
def all_templates():
    """Every (prompt, start) video of the world, rendered one by one with render_video."""
    videos = []
    for p in world.WORLD_PROMPTS:
        spec = world.parse_prompt(p)
        videos += [world.render_video(spec.colour, spec.direction, start) for start in world.start_positions(spec.direction)]
    return videos


@settings(max_examples=5)
@given(st.integers(0, 2 ** 31 - 1), st.floats(0.05, 1.5))
def test_distance_matches_a_brute_force_search(seed, noise_scale):
    # independent computation, no closed form: every template, the amplitude searched on a grid of 101 points,
    # then on 101 points around the best one (final spacing 1e-4, so the search misses the true minimum by at
    # most 5e-5·‖V‖/√N ≈ 1e-5 RMS, plus the parabola's curvature term, far smaller)
    generator = torch.Generator().manual_seed(seed)
    prompt = world.WORLD_PROMPTS[seed % len(world.WORLD_PROMPTS)]
    x = world.sample_videos([prompt], generator, dtype=torch.float64)
    x = x + noise_scale * torch.randn(x.shape, generator=generator, dtype=torch.float64)
    coarse = torch.linspace(world.AMPLITUDE_MIN, world.AMPLITUDE_MAX, 101, dtype=torch.float64)
    best = math.inf
    for V in all_templates():
        residual = lambda grid: (x[0][None] - grid[:, None, None, None, None] * V[None]).flatten(1).norm(dim=1)
        a = coarse[residual(coarse).argmin()]
        fine = torch.linspace(a - 0.01, a + 0.01, 101, dtype=torch.float64).clamp(world.AMPLITUDE_MIN,
                                                                                     world.AMPLITUDE_MAX)
        best = min(best, residual(fine).min().item() / math.sqrt(N))
    assert world.distance_to_manifold(x).item() == pytest.approx(best, abs=2e-5)
    assert world.distance_to_manifold(x).item() <= best + 1e-12   # the exact minimum is never above a grid point


def test_distance_to_the_prompts_own_part_is_at_least_the_distance_to_the_world():
    x = world.sample_videos(["a red square moving right"] * 4, torch.Generator().manual_seed(3), dtype=torch.float64)
    # a red rightward video is on M but far from the green leftward part of it
    assert world.distance_to_manifold(x).max().item() < 1e-12
    assert world.distance_to_manifold(x, ["a green square moving left"] * 4).min().item() > 0.1


# ----------------------------------------------------------------------------------------------
# The exact denoiser.

@pytest.mark.parametrize("sigma", [0.02, 0.3, 0.7, 0.97])
@pytest.mark.parametrize("conditional", [True, False])
def test_posterior_mean_matches_numerical_integration(sigma, conditional):
    # independent computation: E[x_0 | x_σ] = ∫ a·V_k p(x_σ | k, a) / ∫ p(x_σ | k, a), summed over the templates
    # and integrated over a ∈ [a_min, a_max] by the midpoint rule on 4000 points (no Gaussian algebra, no Φ)
    generator = torch.Generator().manual_seed(int(sigma * 100) + conditional)
    prompts = list(world.WORLD_PROMPTS[:4])
    x0 = world.sample_videos(prompts, generator, dtype=torch.float64)
    x = (1 - sigma) * x0 + sigma * torch.randn(x0.shape, generator=generator, dtype=torch.float64)
    edges = torch.linspace(world.AMPLITUDE_MIN, world.AMPLITUDE_MAX, 4001, dtype=torch.float64)
    grid = (edges[1:] + edges[:-1]) / 2                                  # (A,)
    expected = []
    for b, prompt in enumerate(prompts):
        videos = [template(p, start) for p in (world.WORLD_PROMPTS if not conditional else [prompt])
                  for start in world.start_positions(world.parse_prompt(p).direction)]
        V = torch.stack(videos).flatten(1)                                # (K, N)
        means = (1 - sigma) * grid[None, :, None] * V[:, None, :]         # (K, A, N)  (1 − σ)·a·V_k
        log_p = -((x[b].flatten() - means) ** 2).sum(-1) / (2 * sigma ** 2)   # (K, A)
        w = torch.softmax(log_p.flatten(), 0).view_as(log_p)
        expected.append(torch.einsum("ka,a,kn->n", w, grid, V).view(world.WORLD_LATENT_SHAPE))
    got = world.posterior_mean(x, torch.full((len(prompts),), sigma), prompts if conditional else None)
    assert torch.allclose(got, torch.stack(expected), atol=1e-4)


@pytest.mark.slow
def test_ideal_velocity_sampled_with_the_worlds_settings_lands_on_the_manifold():
    # the sampler of the world's settings (steps, shift, CFG scale) is not what keeps a policy off M: with
    # the exact velocity its ODE samples lie on their prompt's part of M
    prompts = list(world.WORLD_PROMPTS) * 2
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(len(prompts), *world.WORLD_LATENT_SHAPE, generator=generator, dtype=torch.float64)
    sigmas = sde.shifted_sigmas(world.WORLD_NUM_STEPS, world.WORLD_SHIFT).clamp(max=1 - 1e-9)
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        sigma = sigma.expand(len(prompts))
        unconditional, conditional = world.ideal_velocity(x, sigma), world.ideal_velocity(x, sigma, prompts)
        # v = v_uncond + s·(v_cond − v_uncond);  x_{σ'} = x_σ + (σ' − σ)·v
        velocity = unconditional + world.WORLD_GUIDANCE_SCALE * (conditional - unconditional)
        x = x + (sigma_next - sigma).view(-1, 1, 1, 1, 1) * velocity
    scores = world.WorldReward()(x, prompts)
    assert world.distance_to_manifold(x, prompts).max().item() < 1e-2
    assert scores["alignment"].min().item() > 0.99


# ----------------------------------------------------------------------------------------------
# The reward.

@pytest.mark.parametrize("prompt, start, centre", [
    ("a red square moving right", (1, 0), (1.5, 1.5)),    # the central start
    ("a red square moving right", (0, 0), (0.5, 1.5)),    # an edge: the largest distance, 1
    ("a green square moving down", (0, 2), (1.5, 2.5)),
    ("a yellow square moving up", (2, 1), (1.5, 1.5)),
])
@pytest.mark.parametrize("amplitude", [world.AMPLITUDE_MIN, 2.4, world.AMPLITUDE_MAX])
def test_reward_components_on_the_manifold_match_their_closed_forms(prompt, start, centre, amplitude):
    # on a·V: alignment 1, brightness a/a_max, composition 1 − ‖centre at the middle frame − (1.5, 1.5)‖/1
    scores = world.WorldReward()(template(prompt, start, amplitude)[None], [prompt])
    composition = 1 - math.dist(centre, (1.5, 1.5))
    assert scores["alignment"].item() == pytest.approx(1.0, abs=1e-6)
    assert scores["composition"].item() == pytest.approx(composition, abs=1e-6)
    assert scores["brightness"].item() == pytest.approx(amplitude / world.AMPLITUDE_MAX, abs=1e-6)
    assert scores["reward"].item() == pytest.approx(1.0 + 0.5 * composition + 0.5 * amplitude / world.AMPLITUDE_MAX,
                                                    abs=1e-6)
    assert scores["off_manifold"].item() == pytest.approx(0.0, abs=1e-6)
    assert scores["on_manifold_reward"].item() == pytest.approx(scores["reward"].item(), abs=1e-6)


@given(st.floats(0.5, 3.0), st.floats(0.0, 3.0))
def test_alignment_of_two_colours_is_the_cosine(a, b):
    # a·V_red + b·V_green (orthogonal colours) for the red prompt: cos = a/√(a² + b²), brightness a/a_max
    prompt = "a red square moving right"
    x = template(prompt, (2, 0), a) + template("a green square moving left", (0, 2), b)
    scores = world.WorldReward()(x[None], [prompt])
    assert scores["alignment"].item() == pytest.approx(a / math.hypot(a, b), abs=1e-6)
    assert scores["brightness"].item() == pytest.approx(a / world.AMPLITUDE_MAX, abs=1e-6)


def test_reward_is_the_weighted_sum_of_its_components():
    weights = {"alignment": 2.0, "composition": -1.0, "brightness": 0.25}
    x = torch.randn(6, *world.WORLD_LATENT_SHAPE, generator=torch.Generator().manual_seed(0))
    prompts = list(world.WORLD_PROMPTS[:6])
    scores = world.WorldReward(weights)(x, prompts)
    expected = sum(w * scores[name] for name, w in weights.items())
    assert torch.allclose(scores["reward"], expected, atol=1e-6)
    with pytest.raises(ValueError, match="unknown reward components"):
        world.WorldReward({"vq": 1.0})


def test_brightness_beyond_the_data_is_earned_only_off_the_manifold():
    # scaling the best video up: reward and off-manifold distance rise together, the on-manifold reward
    # (of the nearest point, a = a_max) stays at the best value of M
    prompt = "a red square moving right"
    reward = world.WorldReward()
    amplitudes = [world.AMPLITUDE_MAX, world.AMPLITUDE_MAX + 0.5, world.AMPLITUDE_MAX + 1.0, 2 * world.AMPLITUDE_MAX]
    x = torch.stack([template(prompt, (1, 0), a) for a in amplitudes])
    scores = reward(x, [prompt] * len(amplitudes))
    assert scores["reward"][0].item() == pytest.approx(reward.best_on_manifold_reward(), abs=1e-6)
    assert bool((scores["reward"].diff() > 0).all()) and bool((scores["off_manifold"].diff() > 0).all())
    assert torch.allclose(scores["on_manifold_reward"], torch.full((4,), reward.best_on_manifold_reward()), atol=1e-6)
    overshoot = torch.tensor(amplitudes) - world.AMPLITUDE_MAX
    assert torch.allclose(scores["brightness"], torch.tensor(amplitudes) / world.AMPLITUDE_MAX, atol=1e-6)
    assert torch.allclose(scores["off_manifold"], overshoot * SQUARE_NORM / math.sqrt(N), atol=1e-6)


def test_non_finite_latents_give_nan_reward_for_that_sample_only():
    prompts = ["a red square moving right", "a blue square moving down", "a green square moving left"]
    starts = {"right": (1, 0), "down": (0, 1), "left": (1, 2)}
    x = torch.stack([template(p, starts[world.parse_prompt(p).direction], 2.5) for p in prompts]).float()
    x[1, 2, 1, 3, 3] = math.nan
    x[2, 0, 0, 0, 0] = math.inf
    scores = world.WorldReward()(x, prompts)
    for name, value in scores.items():
        assert math.isfinite(value[0].item()), name
        assert math.isnan(value[1].item()) and math.isnan(value[2].item()), name


def test_reward_rejects_prompts_outside_the_world():
    x = torch.zeros(1, *world.WORLD_LATENT_SHAPE)
    with pytest.raises(ValueError, match="not a prompt of the video world"):
        world.WorldReward()(x, ["a corgi surfing a wave"])
    with pytest.raises(ValueError, match="one prompt per sample"):
        world.WorldReward()(x, list(world.WORLD_PROMPTS[:2]))
    with pytest.raises(ValueError, match="world's latent shape"):
        world.WorldReward()(torch.zeros(1, 4, 5, 8, 8), [world.WORLD_PROMPTS[0]])


def test_noise_scores_far_below_the_data():
    x = torch.randn(64, *world.WORLD_LATENT_SHAPE, generator=torch.Generator().manual_seed(0))
    prompts = list(world.WORLD_PROMPTS) * 8
    scores = world.WorldReward()(x, prompts)
    assert scores["off_manifold"].mean().item() > 0.9      # ≈ 1: N(0, I) is RMS 1 and barely fits a template
    assert scores["alignment"].mean().item() < 0.2
    assert scores["brightness"].mean().item() < 0.3


# ----------------------------------------------------------------------------------------------
# Pictures.

def test_rendered_colours_are_the_prompt_colours(tmp_path):
    x = torch.stack([template("a blue square moving down", (0, 2), 3.0), template("a yellow square moving up", (2, 0), 1.5)])
    rgb = world.latents_to_rgb(x)                                  # (B, F, H, W, 3)
    assert torch.allclose(rgb[0, 0, 1, 3], torch.tensor(world.COLOURS["blue"][1], dtype=torch.float64))
    assert torch.allclose(rgb[1, 2, 0, 0], 0.5 * torch.tensor(world.COLOURS["yellow"][1], dtype=torch.float64))
    assert rgb[0, 0, 0, 0].abs().max().item() == 0.0               # background is black
    path = world.render_latents(x, tmp_path / "world.png", prompts=["blue", "yellow"], titles=["r=1", "r=2"])
    assert path.stat().st_size > 1000


# ----------------------------------------------------------------------------------------------
# The pretrained policy in the real layout.

@pytest.fixture(scope="module")
def world_layout(tmp_path_factory):
    """The world's directory with an UNTRAINED transformer (seconds): everything but the pretraining."""
    path = tmp_path_factory.mktemp("world") / "video_world"
    world_pretrain.build_world(path, world_pretrain.WorldPretrainConfig(steps=0))
    return model.load_hunyuan(str(path), dtype=torch.float32)


@pytest.mark.slow
def test_world_directory_loads_with_the_worlds_settings(world_layout):
    assert world_layout.latent_shape(world.WORLD_NUM_FRAMES, world.WORLD_HEIGHT, world.WORLD_WIDTH) == \
        world.WORLD_LATENT_SHAPE
    assert world_layout.shift == world.WORLD_SHIFT
    assert world_layout.guidance_scale == world.WORLD_GUIDANCE_SCALE
    x = world_pretrain.sample(world_layout, list(world.WORLD_PROMPTS[:2]), seeds=[0, 1])
    assert x.shape == (2, *world.WORLD_LATENT_SHAPE)


@pytest.mark.slow
def test_the_transformer_sees_the_prompt_not_the_system_prompt(world_layout):
    # the world tokenizer makes the pipeline's crop remove the system prompt: what is left is the prompt's
    # bytes + <|im_end|> \n <|im_start|> "assistant\n" (13 tokens); the negative prompt "" is templated as " "
    embeds = model.encode_prompts(world_layout, list(world.WORLD_PROMPTS), dtype=torch.float32)
    for prompt, length in zip(world.WORLD_PROMPTS, embeds.mask.sum(1).tolist()):
        assert length == len(prompt) + 13
    assert embeds.negative_mask.sum(1).tolist() == [1 + 13] * len(world.WORLD_PROMPTS)


# Thresholds. The all-zero video lies a_min·‖V‖/√N = 0.5 from M, pure noise ≈ 0.95: a sampler that outputs
# blank or blurred videos scores ≈ 0.5. The committed weights' ODE samples of these 16 seeds measure 0.200
# (64 seeds: 0.228); half the blank video's distance leaves room for round-off across machines and still
# fails a blank policy. Alignment: another colour scores 0, the prompt's square 1; measured 0.949 here.
WORLD_DISTANCE_LIMIT = 0.25
WORLD_ALIGNMENT_MIN = 0.9


@pytest.mark.slow
def test_committed_weights_are_those_of_the_default_config():
    # otherwise prepare_world() would pretrain (minutes) in every fresh checkout: a change of the world's
    # constants or of WorldPretrainConfig must come with new weights (python -m world.pretrain --retrain)
    from safetensors import safe_open
    with safe_open(str(world_pretrain.WEIGHTS_FILE), "pt") as f:
        assert f.metadata()["cache_key"] == world_pretrain.cache_key(world_pretrain.WorldPretrainConfig())
    assert world_pretrain.WEIGHTS_FILE.stat().st_size < 5e6


@pytest.mark.slow
def test_pretrained_ode_samples_lie_near_the_manifold_and_follow_their_prompt():
    policy = model.load_hunyuan(world_pretrain.prepare_world(), dtype=torch.float32)
    prompts = list(world.WORLD_PROMPTS) * 2
    x = world_pretrain.sample(policy, prompts, seeds=range(len(prompts)))
    blank = torch.zeros(1, *world.WORLD_LATENT_SHAPE)
    assert world.distance_to_manifold(blank).item() == pytest.approx(0.5)
    assert world.distance_to_manifold(x, prompts).mean().item() < WORLD_DISTANCE_LIMIT
    assert world.WorldReward()(x, prompts)["alignment"].mean().item() > WORLD_ALIGNMENT_MIN


def test_prompt_file_lists_the_worlds_prompts():
    with open("prompts/video_world.txt") as f:
        assert tuple(line.strip() for line in f if line.strip()) == world.WORLD_PROMPTS
