"""A synthetic video world with an exact data manifold and a hackable reward, for the real trainer on a CPU.

The 2-D toy (manifold.py, target_reward.py) shows the method on a circle; this file lifts the same
experiment to the real video stack: real HunyuanVideo-1.5 classes, real text encoders, `train.py`.
What a reward model and a data manifold are for real videos (VideoAlign, the pretraining data) is
unknowable; here both are closed forms, so "the policy left the manifold" is a number.

The world lives in latent space
-------------------------------
A "video" is a latent (C, F, H, W) = WORLD_LATENT_SHAPE = (4, 3, 4, 4): what the tiny VAE (4 latent
channels, 2x temporal, 4x spatial compression) makes of the tiny model's default 5-frame 16x16 video
(48 video tokens: a cold pretraining of minutes and a GRPO step of seconds on a CPU). The VAE is random, so
decoded pixels mean nothing: the world, its distance and its reward are defined on the latent itself
(the trainer hands the reward latents: `WorldReward.input = "latents"`).

One video: a 2x2 square of colour c_p (a unit direction in channel space) and amplitude a, starting
at (y0, x0) and moving one latent pixel per latent frame in the prompt's direction (dy, dx):

    x[:, t, y, x'] = a·c_p   if  y0 + t·dy ≤ y < y0 + t·dy + 2  and  x0 + t·dx ≤ x' < x0 + t·dx + 2,
                     0       elsewhere.

The prompt fixes colour and direction ("a red square moving right"); the start position (any that
keeps the square inside all frames: 3 per direction, a row or a column) and a ~ U[a_min, a_max] are random. The four
colours are orthonormal (rows of a 4x4 Hadamard matrix / 2), so every colour touches every channel,
like a real latent. Inside the square an element is ±a/2 ∈ ±[1, 1.5]; the RMS of a whole video is
a/4 ∈ [0.5, 0.75] (the square covers 1/4 of each frame), the scale of the N(0, I) noise of
x_σ = (1−σ)x_0 + σε.

The manifold and its exact distance
-----------------------------------
With V_k the unit-amplitude video ("template") of prompt p_k at start s_k, the data manifold is

    M = { a·V_k :  k ∈ templates of all WORLD_PROMPTS,  a ∈ [a_min, a_max] }.

For one template, ‖x − a·V‖² = ‖x‖² − 2a⟨x, V⟩ + a²‖V‖² is a convex parabola in a, so its minimiser
on the interval is the clamped least-squares amplitude a* = clamp(⟨x, V⟩/‖V‖², a_min, a_max); the
minimum over the finite set of templates (8 prompts x 3 starts = 24) is then exact, not a search:

    dist(x, M) = min_k ‖x − a*_k·V_k‖ / √N,      N = C·F·H·W = 192 elements,

i.e. the RMS per latent element of the residual (pure noise: ≈ 0.95; the all-zero video: a_min·‖V‖/√N
= 0.5; data: 0). `project` returns the
nearest point, `distance_to_manifold` the distance; `prompts=` restricts M to each sample's prompt.

The reward (VideoAlign-shaped: named components, weighted total)
----------------------------------------------------------------
A reward model that "detects" the prompt's object by a matched filter: k* = argmax ⟨x, V_k⟩ over the
templates of the sample's prompt (all have the same norm, so it is the best-correlated start). Then

    alignment   = ⟨x, V_k*⟩ / (‖x‖·‖V_k*‖)           text alignment (TA): cosine with the prompt's video;
                                                     1 on the prompt's part of M, 0 for another colour
    composition = 1 − ‖centre_k* − frame centre‖ / D   the square should cross the frame's centre at the
                                                     middle frame; D = the largest such distance in M
                                                     (1 pixel), so composition ∈ {0, 1} on M: 1 for the
                                                     central start of the 3, 0 for the two at the edges
    brightness  = ⟨x, V_k*⟩ / (‖V_k*‖²·a_max)         the fitted amplitude over a_max: ∈ [a_min/a_max, 1]
                                                     on M, UNBOUNDED above — brighter than any data video

    reward = 1.0·alignment + 0.5·composition + 0.5·brightness     (VideoAlign setting B's 1.0 TA + 0.5 VQ
                                                                  + 0.5 MQ, the weights transposed)

A policy can raise it honestly, on M: follow the prompt (alignment), put the square in the middle
(composition: the data puts it at each of the 3 starts alike, so the pretrained model does too: ≈ 1/3
on average), pick a = a_max. The best on-manifold reward is 1 + 0.5 + 0.5 = 2. Beyond
that the only gain is brightness > 1, which exists only OFF the manifold (a > a_max, distance
(a − a_max)·‖V‖/√N): reward hacking, exactly like the toy's target point outside the circle. Each
call also returns the diagnostics `off_manifold` (dist(x, M)) and `on_manifold_reward` (the reward
of the nearest point of M, the toy's "reward projected on the circle"), which split a gain into its
honest and its hacked part. A sample with a non-finite element gets NaN everywhere (a failed video).

The exact denoiser
------------------
The data is a finite mixture of templates with a uniform amplitude, so E[x_0 | x_σ] has a closed form
(`posterior_mean`: a truncated-normal amplitude per template, templates weighted by their evidence) and
so has the velocity v* = E[ε − x_0 | x_σ] = (x_σ − x̂_0)/σ (`ideal_velocity`), the minimiser of the
flow-matching loss. Sampled with the world's settings, v* lands on M (tests/test_video_world.py); the
pretraining regresses on it instead of on the noisy target ε − x_0 (pretrain.py).

Pictures: `render_latents` maps each latent pixel to RGB through the colour directions (frames side
by side, one row per sample). The pretrained policy of this world is in pretrain.py;
`world_pretrain.prepare_world` returns its diffusers-format directory.
"""
import dataclasses
import math
import re

import torch

import reward

# ----------------------------------------------------------------------------------------------
# The world's geometry (each constant: why this value).

# Pixel video size the trainer passes (train.py --num_frames/--height/--width): the tiny model's default
# video (tiny.TINY_NUM_FRAMES x TINY_HEIGHT x TINY_WIDTH); with the tiny VAE's 2x temporal / 4x spatial
# compression, latent_shape(5, 16, 16) = (4, 3, 4, 4).
WORLD_NUM_FRAMES = 5
WORLD_HEIGHT = 16
WORLD_WIDTH = 16
# (C, F, H, W): 4 latent channels (the tiny HunyuanVideo-1.5 VAE), 3 latent frames, 4x4 latent pixels
# = 48 video tokens: a cold pretraining of minutes and a GRPO step of a second on a CPU.
WORLD_LATENT_SHAPE = (4, 3, 4, 4)
# Side of the square in latent pixels, and its speed in latent pixels per latent frame. Over 3 frames
# it travels 2 pixels, so 3 starts (one row or column of 3) keep it inside the 4x4 frame.
OBJECT_SIZE = 2
SPEED = 1
# Range of the amplitude a of the data (uniform). Elements inside the square are ±a/2.
AMPLITUDE_MIN = 2.0
AMPLITUDE_MAX = 3.0

# Colour directions: rows of the 4x4 Hadamard matrix divided by 2, an orthonormal basis of the 4
# latent channels, so colours are orthogonal (another colour scores alignment 0) and each spreads
# over all channels. `rgb` is only for pictures.
COLOURS = {
    "red": ((0.5, 0.5, 0.5, 0.5), (1.0, 0.15, 0.15)),
    "green": ((0.5, -0.5, 0.5, -0.5), (0.15, 0.9, 0.15)),
    "blue": ((0.5, 0.5, -0.5, -0.5), (0.2, 0.35, 1.0)),
    "yellow": ((0.5, -0.5, -0.5, 0.5), (1.0, 0.9, 0.1)),
}
# (dy, dx) per latent frame: y grows downwards (image rows), x to the right.
DIRECTIONS = {"right": (0, 1), "left": (0, -1), "down": (1, 0), "up": (-1, 0)}
# The prompts: every colour with two directions and every direction with two colours, so neither
# word alone tells the video (the model must read both).
WORLD_PROMPTS = (
    "a red square moving right",
    "a red square moving up",
    "a green square moving left",
    "a green square moving down",
    "a blue square moving right",
    "a blue square moving down",
    "a yellow square moving left",
    "a yellow square moving up",
)
PROMPT_PATTERN = re.compile(r"a (\w+) square moving (\w+)")
# The same prompts as a file, for train.py --world (its default --prompts).
PROMPTS_FILE = "prompts/video_world.txt"

# Sampling settings of the world's pretrained policy (pretrain.py measures them; the
# trainer passes them as --num_steps / --shift / --cfg_scale; the same shift and CFG scale are written
# to the model directory's scheduler/ and guider/).
WORLD_NUM_STEPS = 8
"""denoising steps of a rollout: with the exact velocity 8 land on M; a rollout of 4 samples with CFG ≈ 0.06 s"""
WORLD_SHIFT = 3.0
"""schedule shift s: see pretrain.py (the square's position is decided at high noise)"""
WORLD_GUIDANCE_SCALE = 3.0
"""CFG scale: see pretrain.py (3 raises the amplitude towards a_max and sharpens the prompt)"""

# Default reward weights: VideoAlign setting B gives 1.0 to text alignment and 0.5 to each quality
# score; here alignment is the text-alignment analogue, composition and brightness the quality ones.
DEFAULT_WEIGHTS = {"alignment": 1.0, "composition": 0.5, "brightness": 0.5}


# ----------------------------------------------------------------------------------------------
# Prompts -> (colour, direction).

@dataclasses.dataclass(frozen=True)
class PromptSpec:
    colour: str
    direction: str


def parse_prompt(prompt):
    """"a red square moving right" -> PromptSpec("red", "right"); any other text is a ValueError."""
    match = PROMPT_PATTERN.fullmatch(prompt.strip())
    if match is None or match[1] not in COLOURS or match[2] not in DIRECTIONS:
        raise ValueError(f"not a prompt of the video world: {prompt!r}; expected 'a <colour> square moving "
                         f"<direction>' with colour in {tuple(COLOURS)} and direction in {tuple(DIRECTIONS)}, "
                         f"e.g. {WORLD_PROMPTS[0]!r}")
    return PromptSpec(match[1], match[2])


def prompt_indices(prompts):
    """Index of each prompt in WORLD_PROMPTS.  list[str] of length B -> LongTensor[B]."""
    if isinstance(prompts, str):
        raise ValueError(f"prompts must be a list of strings, got the string {prompts!r}")
    indices = []
    for prompt in prompts:
        parse_prompt(prompt)   # a readable error for malformed text
        if prompt.strip() not in WORLD_PROMPTS:
            raise ValueError(f"{prompt!r} is not one of the world's prompts {WORLD_PROMPTS}")
        indices.append(WORLD_PROMPTS.index(prompt.strip()))
    return torch.tensor(indices, dtype=torch.long)


def colour_vector(colour, dtype=torch.float64):
    """Unit colour direction in channel space.  -> Tensor[C]."""
    return torch.tensor(COLOURS[colour][0], dtype=dtype)


# ----------------------------------------------------------------------------------------------
# Templates: the unit-amplitude videos V_k.

def start_positions(direction, latent_shape=WORLD_LATENT_SHAPE):
    """Every start (y0, x0) that keeps the moving square inside all frames.  -> LongTensor[K, 2].

    Inside means 0 ≤ y0 + t·dy and y0 + t·dy + size ≤ H for t = 0 … F−1 (same for x).
    """
    _, num_frames, height, width = latent_shape
    dy, dx = DIRECTIONS[direction]
    travel = (num_frames - 1) * SPEED
    # the first and the last frame bound the range (the motion is linear)
    ys = range(max(0, -dy * travel), min(height - OBJECT_SIZE, height - OBJECT_SIZE - dy * travel) + 1)
    xs = range(max(0, -dx * travel), min(width - OBJECT_SIZE, width - OBJECT_SIZE - dx * travel) + 1)
    return torch.tensor([(y, x) for y in ys for x in xs], dtype=torch.long)


def render_video(colour, direction, start, amplitude=1.0, latent_shape=WORLD_LATENT_SHAPE, dtype=torch.float64):
    """The video a·V of one (colour, direction, start).  start: (y0, x0).  -> Tensor[C, F, H, W]."""
    _, num_frames, height, width = latent_shape
    dy, dx = DIRECTIONS[direction]
    y0, x0 = (int(v) for v in start)
    video = torch.zeros(latent_shape, dtype=dtype)
    for t in range(num_frames):
        y, x = y0 + t * dy * SPEED, x0 + t * dx * SPEED
        if not (0 <= y <= height - OBJECT_SIZE and 0 <= x <= width - OBJECT_SIZE):
            raise ValueError(f"start {start} moving {direction} leaves the {height}x{width} frame at frame {t}; "
                             f"valid starts are start_positions({direction!r})")
        # x[:, t, square] = a·c
        video[:, t, y:y + OBJECT_SIZE, x:x + OBJECT_SIZE] = amplitude * colour_vector(colour, dtype)[:, None, None]
    return video


@dataclasses.dataclass
class Templates:
    """All unit-amplitude videos of the world, flattened.

    videos (M, N) the V_k; prompt (M,) index in WORLD_PROMPTS of each; start (M, 2) its (y0, x0);
    centre (M, 2) the square's centre at the middle frame, in latent pixels (row, column).
    """
    videos: torch.Tensor
    prompt: torch.Tensor
    start: torch.Tensor
    centre: torch.Tensor


def world_templates(latent_shape=WORLD_LATENT_SHAPE, dtype=torch.float64):
    """Templates of every prompt of WORLD_PROMPTS at every start (8 x 21 = 168)."""
    num_frames = latent_shape[1]
    videos, owners, starts, centres = [], [], [], []
    for p, prompt in enumerate(WORLD_PROMPTS):
        spec = parse_prompt(prompt)
        dy, dx = DIRECTIONS[spec.direction]
        for start in start_positions(spec.direction, latent_shape):
            videos.append(render_video(spec.colour, spec.direction, start, 1.0, latent_shape, dtype).flatten())
            owners.append(p)
            starts.append(start)
            # centre at the middle frame t_m = (F−1)/2: start + t_m·speed·(dy, dx) + (size−1)/2
            middle = (num_frames - 1) / 2 * SPEED
            centres.append(start.to(dtype) + middle * torch.tensor([dy, dx], dtype=dtype) + (OBJECT_SIZE - 1) / 2)
    return Templates(torch.stack(videos), torch.tensor(owners), torch.stack(starts), torch.stack(centres))


# ----------------------------------------------------------------------------------------------
# Data: samples of the manifold.

def sample_videos(prompts, generator=None, latent_shape=WORLD_LATENT_SHAPE, dtype=torch.float32):
    """Videos of the world for the given prompts: start uniform over the valid ones, a ~ U[a_min, a_max].

    prompts: list of B world prompts.  Returns (B, C, F, H, W).
    """
    index = prompt_indices(prompts)
    templates = world_templates(latent_shape)
    videos = []
    for p in index.tolist():
        own = torch.nonzero(templates.prompt == p).flatten()
        k = own[torch.randint(len(own), (1,), generator=generator)]
        amplitude = AMPLITUDE_MIN + (AMPLITUDE_MAX - AMPLITUDE_MIN) * torch.rand(1, generator=generator, dtype=torch.float64)
        videos.append(amplitude * templates.videos[k])
    return torch.cat(videos).view(len(index), *latent_shape).to(dtype)


# ----------------------------------------------------------------------------------------------
# The exact distance to the manifold.

@dataclasses.dataclass
class Projection:
    """Nearest point of the manifold to each of B samples.

    nearest (B, C, F, H, W) a*·V_k; distance (B,) RMS per element ‖x − a*V_k‖/√N; amplitude (B,) a*;
    template (B,) index k into world_templates().
    """
    nearest: torch.Tensor
    distance: torch.Tensor
    amplitude: torch.Tensor
    template: torch.Tensor


def _flatten(latents):
    """(B, C, F, H, W) latents -> (B, N) float64, checking the world's shape."""
    if latents.ndim != 5 or tuple(latents.shape[1:]) != WORLD_LATENT_SHAPE:
        raise ValueError(f"latents must be (B, {', '.join(map(str, WORLD_LATENT_SHAPE))}) (the world's latent shape; "
                         f"video {WORLD_NUM_FRAMES}x{WORLD_HEIGHT}x{WORLD_WIDTH}), got shape {tuple(latents.shape)}")
    return latents.detach().to("cpu", torch.float64).flatten(1)


def project(latents, prompts=None):
    """Exact nearest point of M (or, with prompts, of each sample's own prompt's part of M).

    latents (B, C, F, H, W); prompts: None or B world prompts.  Returns Projection (float64).
    """
    x = _flatten(latents)                                          # (B, N)
    templates = world_templates()
    V = templates.videos                                           # (M, N)
    norm2 = (V * V).sum(1)                                         # (M,)  ‖V_k‖²
    dots = x @ V.T                                                 # (B, M)  ⟨x, V_k⟩
    # a*_k = clamp(⟨x, V_k⟩/‖V_k‖², a_min, a_max)
    amplitude = (dots / norm2).clamp(AMPLITUDE_MIN, AMPLITUDE_MAX)
    # ‖x − a·V‖² = ‖x‖² − 2a⟨x, V⟩ + a²‖V‖²
    residual2 = (x * x).sum(1, keepdim=True) - 2 * amplitude * dots + amplitude ** 2 * norm2
    if prompts is not None:
        own = templates.prompt[None, :] == prompt_indices(prompts)[:, None]   # (B, M)
        residual2 = residual2.masked_fill(~own, math.inf)
    k = residual2.argmin(1)                                        # (B,)
    rows = torch.arange(x.shape[0])
    a = amplitude[rows, k]
    nearest = a[:, None] * V[k]                                    # (B, N)
    # the residual recomputed directly (the expanded form above loses digits by cancellation)
    distance = (x - nearest).norm(dim=1) / math.sqrt(x.shape[1])
    return Projection(nearest.view(latents.shape), distance, a, k)


def distance_to_manifold(latents, prompts=None):
    """dist(x, M) = min over the manifold of ‖x − y‖/√N (RMS per element).  (B, C, F, H, W) -> Tensor[B]."""
    return project(latents, prompts).distance


# ----------------------------------------------------------------------------------------------
# The exact denoiser: the velocity a perfectly trained flow-matching model has.

def _log_normal_mass(alpha, beta):
    """log(Φ(β) − Φ(α)) for α ≤ β, accurate in both tails (the upper tail mirrored to the lower one)."""
    upper = alpha > 0
    # Φ(β) − Φ(α) = Φ(−α) − Φ(−β)
    alpha, beta = torch.where(upper, -beta, alpha), torch.where(upper, -alpha, beta)
    log_beta, log_alpha = torch.special.log_ndtr(beta), torch.special.log_ndtr(alpha)
    return log_beta + torch.log1p(-torch.exp(log_alpha - log_beta).clamp(max=1 - 1e-16))


def posterior_mean(latents, sigma, prompts=None):
    """x̂_0 = E[x_0 | x_σ] under the world's data, exactly.  latents (B, C, F, H, W) x_σ; sigma (B,) in (0, 1);
    prompts: B world prompts (the conditional data), or None (all prompts equally likely: the unconditional
    data, what classifier-free guidance's empty prompt stands for).  Returns (B, C, F, H, W) float64.

    x_σ = c·a·V_k + σ·ε with c = 1 − σ. For a template k, the likelihood is Gaussian in a,

        p(x_σ | k, a) ∝ exp(−‖x_σ − c·a·V_k‖²/(2σ²)) ∝ exp(⟨x_σ, V_k⟩²/(2σ²‖V_k‖²)) · N(a; m_k, s²),
        m_k = ⟨x_σ, V_k⟩/(c‖V_k‖²),   s = σ/(c‖V_k‖),

    so with the prior a ~ U[a_min, a_max] (α, β = (a_min − m_k)/s, (a_max − m_k)/s) the template's evidence is
    w_k ∝ exp(⟨x_σ, V_k⟩²/(2σ²‖V_k‖²))·s·(Φ(β) − Φ(α)), and a | k, x_σ is a truncated normal of mean

        E[a | k, x_σ] = m_k + s·(φ(α) − φ(β))/(Φ(β) − Φ(α)),     x̂_0 = Σ_k w_k·E[a | k, x_σ]·V_k / Σ_k w_k.
    """
    x = _flatten(latents)                                          # (B, N)
    sigma = torch.as_tensor(sigma, dtype=torch.float64).flatten()
    if sigma.shape != (x.shape[0],) or not bool(((sigma > 0) & (sigma < 1)).all()):
        raise ValueError(f"sigma must be ({x.shape[0]},) with values in (0, 1), got {sigma.tolist()}")
    templates = world_templates()
    V = templates.videos                                           # (M, N)
    norm = V.norm(dim=1)                                           # (M,)  ‖V_k‖
    dots = x @ V.T                                                 # (B, M)  ⟨x_σ, V_k⟩
    s_, c = sigma[:, None], 1 - sigma[:, None]                     # (B, 1)
    m = dots / (c * norm ** 2)                                     # (B, M)  m_k
    s = s_ / (c * norm)                                            # (B, M)  std of a given k
    alpha, beta = (AMPLITUDE_MIN - m) / s, (AMPLITUDE_MAX - m) / s
    log_mass = _log_normal_mass(alpha, beta)                       # log(Φ(β) − Φ(α))
    log_w = dots ** 2 / (2 * s_ ** 2 * norm ** 2) + torch.log(s) + log_mass
    if prompts is not None:
        own = templates.prompt[None, :] == prompt_indices(prompts)[:, None]   # (B, M)
        log_w = log_w.masked_fill(~own, -math.inf)
    w = torch.softmax(log_w, dim=1)                                # (B, M)
    log_phi = lambda z: -z ** 2 / 2 - 0.5 * math.log(2 * math.pi)
    # E[a | k] = m + s·(φ(α) − φ(β))/(Φ(β) − Φ(α)), clamped against round-off to the prior's support
    amplitude = (m + s * (torch.exp(log_phi(alpha) - log_mass) - torch.exp(log_phi(beta) - log_mass)))
    amplitude = amplitude.clamp(AMPLITUDE_MIN, AMPLITUDE_MAX)
    return ((w * amplitude) @ V).view(latents.shape)


def ideal_velocity(latents, sigma, prompts=None):
    """v*(x_σ) = E[ε − x_0 | x_σ] = (x_σ − x̂_0)/σ: the minimiser of the flow-matching loss (the Monte-Carlo
    target ε − x_0 averaged over every x_0 that could have made x_σ).  Shapes as posterior_mean."""
    x = latents.detach().to("cpu", torch.float64)
    sigma = torch.as_tensor(sigma, dtype=torch.float64).flatten()
    return (x - posterior_mean(latents, sigma, prompts)) / sigma.view(-1, 1, 1, 1, 1)


# ----------------------------------------------------------------------------------------------
# The reward.

class WorldReward:
    """The world's reward model: `reward(latents, prompts)` -> {component: Tensor[B], "reward": …, diagnostics}.

    weights: {component: weight}, missing ones from DEFAULT_WEIGHTS. The equations are in the module
    docstring. Returned tensors are float32 on the latents' device; a sample with a non-finite element
    gets NaN in every entry (a failed video, which the GRPO advantage excludes).
    """
    input = "latents"   # the trainer passes final latents (B, C, F, H, W), not decoded frames
    components = ("alignment", "composition", "brightness")
    diagnostics = ("off_manifold", "on_manifold_reward")

    def __init__(self, weights=None):
        weights = dict(weights or {})
        unknown = set(weights) - set(self.components)
        if unknown:
            raise ValueError(f"unknown reward components {sorted(unknown)}: expected a subset of {self.components}")
        self.weights = {**DEFAULT_WEIGHTS, **weights}
        self.templates = world_templates()
        # D: the largest distance of a template's middle-frame centre from the frame centre
        self.frame_centre = torch.tensor([(WORLD_LATENT_SHAPE[2] - 1) / 2, (WORLD_LATENT_SHAPE[3] - 1) / 2],
                                         dtype=torch.float64)
        self.max_centre_distance = (self.templates.centre - self.frame_centre).norm(dim=1).max()

    def scores(self, latents, prompts):
        """The components alone, {name: Tensor[B] float64 on CPU}, and the weighted total "reward"."""
        x = _flatten(latents)                                      # (B, N)
        if len(prompts) != x.shape[0]:
            raise ValueError(f"need one prompt per sample: {x.shape[0]} latents, {len(prompts)} prompts")
        V = self.templates.videos                                  # (M, N)
        own = self.templates.prompt[None, :] == prompt_indices(prompts)[:, None]   # (B, M)
        dots = x @ V.T                                             # (B, M)  ⟨x, V_k⟩
        # matched filter: k* = argmax over the prompt's templates of ⟨x, V_k⟩ (all ‖V_k‖ equal)
        k = dots.masked_fill(~own, -math.inf).argmax(1)            # (B,)
        rows = torch.arange(x.shape[0])
        dot, norm = dots[rows, k], V[k].norm(dim=1)                # ⟨x, V_k*⟩, ‖V_k*‖
        scores = {
            # ⟨x, V⟩ / (‖x‖‖V‖)   (0 for the all-zero video)
            "alignment": dot / (x.norm(dim=1) * norm).clamp_min(torch.finfo(torch.float64).tiny),
            # 1 − ‖centre_k* − frame centre‖ / D
            "composition": 1 - (self.templates.centre[k] - self.frame_centre).norm(dim=1) / self.max_centre_distance,
            # ⟨x, V⟩ / (‖V‖²·a_max)
            "brightness": dot / (norm ** 2 * AMPLITUDE_MAX),
        }
        # r = Σ_c w_c·score_c
        scores["reward"] = sum(self.weights[name] * scores[name] for name in self.components)
        return scores

    def __call__(self, latents, prompts):
        """{alignment, composition, brightness, reward, off_manifold, on_manifold_reward}: Tensor[B] each."""
        scores = self.scores(latents, prompts)
        projection = project(latents)
        scores["off_manifold"] = projection.distance
        scores["on_manifold_reward"] = self.scores(projection.nearest, prompts)["reward"]
        failed = ~torch.isfinite(latents.detach().cpu().flatten(1)).all(1)   # (B,) NaN/inf anywhere: a failed video
        return {name: value.masked_fill(failed, math.nan).to(device=latents.device, dtype=torch.float32)
                for name, value in scores.items()}

    def best_on_manifold_reward(self):
        """The highest reward of any video of M: alignment 1, composition 1 (if a start is central), a = a_max."""
        best = {"alignment": 1.0, "brightness": 1.0,
                "composition": float(1 - (self.templates.centre - self.frame_centre).norm(dim=1).min()
                                     / self.max_centre_distance)}
        return sum(self.weights[name] * best[name] for name in self.components)


# ----------------------------------------------------------------------------------------------
# Pictures.

def latents_to_rgb(latents):
    """Latent colours -> RGB in [0, 1]: each pixel's coordinate along each colour direction, divided by
    a_max and clamped to [0, 1], times that colour's RGB, summed.  (B, C, F, H, W) -> (B, F, H, W, 3)."""
    x = latents.detach().to("cpu", torch.float64)
    basis = torch.stack([colour_vector(c) for c in COLOURS])                # (K, C) orthonormal rows
    rgb = torch.tensor([COLOURS[c][1] for c in COLOURS], dtype=torch.float64)  # (K, 3)
    coordinates = torch.einsum("kc,bcfhw->bfhwk", basis, x)                  # (B, F, H, W, K)
    intensity = (coordinates / AMPLITUDE_MAX).clamp(0, 1)
    return (intensity @ rgb).clamp(0, 1)                                     # (B, F, H, W, 3)


def render_latents(latents, path, prompts=None, titles=None, pixel=8):
    """Write a PNG: one row per sample, its latent frames left to right (each latent pixel `pixel`
    screen pixels). prompts label the rows; titles (optional, one per row) are appended to the labels.
    A non-finite latent is drawn grey. Returns path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rgb = latents_to_rgb(torch.nan_to_num(latents.float(), nan=0.0))       # (B, F, H, W, 3)
    batch, frames = rgb.shape[:2]
    failed = ~torch.isfinite(latents.detach().cpu().flatten(1)).all(1)
    height, width = WORLD_LATENT_SHAPE[2], WORLD_LATENT_SHAPE[3]
    fig, axes = plt.subplots(batch, frames, squeeze=False,
                             figsize=(frames * width * pixel / 100 + 2.5, batch * (height * pixel / 100 + 0.25)))
    for b in range(batch):
        for f in range(frames):
            ax = axes[b, f]
            ax.imshow((torch.full_like(rgb[b, f], 0.5) if failed[b] else rgb[b, f]).numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
        label = prompts[b] if prompts is not None else f"sample {b}"
        if titles is not None:
            label += f"\n{titles[b]}"
        axes[b, 0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=7)
    for f in range(frames):
        axes[0, f].set_title(f"t={f}", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# The world's reward as a train.py `--reward` choice ("world"): plugged into reward.py's registry from here, so
# that the product (reward.py, train.py's flag checks) never imports the toy; train.py imports this module for --world.
reward.register_training_reward(
    "world", WorldReward.components, tuple(DEFAULT_WEIGHTS[c] for c in WorldReward.components),
    load=lambda path, device, dtype, weights, processor_path: WorldReward(dict(zip(WorldReward.components, weights))))
