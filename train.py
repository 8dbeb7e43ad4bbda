"""SAGE-GRPO post-training of HunyuanVideo-1.5 against the VideoAlign reward.

One iteration, straight through (the banners in `main` follow it):

    ROLLOUT    G videos per prompt with a stochastic transition kernel (`--kernel sage`); a group may span ranks;
               every sample has its own seed, a function of (seed, iteration, global sample index)
    REWARD     decode, score with VideoAlign: r = w_vq·VQ + w_mq·MQ + w_ta·TA (NaN = failed video); or several
               rewards summed with weights (`--reward videoalign=1 pickscore=0.5`, reward.RewardMix)
    ADVANTAGE  all-gather the rewards, group statistics over the whole group (grpo.group_advantages; with
               several rewards each is normalised first by default, grpo.decoupled_advantages)
    UPDATE     equalized clipped policy loss + β·dual KL over the trained denoising steps (all N in a
               per-sample random order by default), gradients accumulated over those steps;
               `--updates_per_rollout` optimizer updates per rollout; a non-finite loss or gradient
               skips the update
    ANCHOR     hard copy policy -> anchor every `--anchor_period` optimizer updates
    LOG        tqdm on rank 0, output_dir/metrics.jsonl, sample videos, curves.png; the same rows and samples in
               TensorBoard or W&B with `--report_to tensorboard|wandb` (tracking.py)
    CHECKPOINT atomic (temp dir + rename): diffusers-format transformer, optimizer, anchor, RNG,
               sampler position; `--resume` continues exactly

Launch (the HunyuanVideo-1.5 480p T2V checkpoint in diffusers format and the VideoAlign checkpoint, each a
local directory or a hub id already in the hub cache; nothing is ever downloaded, see hub.py):

    # once, on a machine with internet access: into the hub cache (HF_HUB_CACHE / HF_HOME)
    hf download hunyuanvideo-community/HunyuanVideo-1.5-480p_t2v; hf download KwaiVGI/VideoReward
    hf download Qwen/Qwen2-VL-2B-Instruct   # VideoReward's base model, looked up by the id its model_config.json names
    # 1 GPU (one group of G = 4 videos per iteration needs 4 videos on the one rank)
    python train.py --model_path hunyuanvideo-community/HunyuanVideo-1.5-480p_t2v --reward_path KwaiVGI/VideoReward \\
        --prompts prompts/example.txt --output_dir runs/sage --videos_per_rank 4
    # the same with local directories
    python train.py --model_path ckpts/HunyuanVideo-1.5-480p_t2v --reward_path ckpts/VideoReward ...
    # 8 GPUs on one node (the paper's per-node setting)
    torchrun --standalone --nproc_per_node 8 train.py --model_path ... --reward_path ... --prompts ...
    # 8 nodes x 8 GPUs = 64 (the recommended setting): run on every node, NODE_RANK = 0..7,
    # MASTER_ADDR = node 0's address; output_dir must be on a filesystem every node sees
    torchrun --nnodes 8 --nproc_per_node 8 --node_rank $NODE_RANK --rdzv_id sage \\
        --rdzv_backend c10d --rdzv_endpoint $MASTER_ADDR:29500 train.py --model_path ... (same flags)
    # no weights, CPU: the same code on random tiny models built on the fly (gloo backend)
    torchrun --standalone --nproc_per_node 2 train.py --tiny --num_steps 4 --max_iterations 4 --output_dir runs/tiny
    # no weights, CPU, and it learns: the synthetic video world (world/video_world.py), ~5 minutes
    torchrun --standalone --nproc_per_node 2 train.py --world --num_steps 8 --optimizer adamw --lr 2e-4 \\
        --group_size 8 --videos_per_rank 8 --max_iterations 150 --output_dir runs/world
    # resume from the newest complete checkpoint in output_dir (same flags, plus --resume)
    torchrun --standalone --nproc_per_node 8 train.py ... --resume
    # will it fit? per-GPU memory by component and time per iteration (plan.py; no weights, no GPU)
    python train.py --plan --world_size 64 --sp_size 2 --optimizer muon

Settings have one source each. Sampling shift and CFG scale: the checkpoint's scheduler and guider
configs unless --shift / --cfg_scale are given (the run prints which). Reward weights: the reward
model's defaults (VideoAlign: paper setting B) unless --reward_weights names others. Video size:
81×352×624, or 5×16×16 with --tiny, unless --num_frames / --height / --width are given.

Parallelism, loading and checkpoints (FSDP2 per transformer block, rank-0 broadcast load, atomic
sharded checkpoints, exact resume) live in distributed.py. Loss normalisation: the loss is the mean
over the valid (sample, trained step) pairs of the *global* batch: each rank divides its sum by the
global count and FSDP averages gradients over ranks, so 2 ranks x 2 videos give the same update as
1 rank x 4 videos (tested).

Defaults follow the official recipe (Tencent-Hunyuan/SAGE-GRPO post_train.py: Muon, the β controller,
sequence parallelism via --sp_size and parallel.py); the departures (failed rewards excluded instead
of set to 0, β identical on every rank, a seed per sample and iteration, ...) are listed and explained
in docs/official_recipe.md.
"""
import argparse
import ast
import contextlib
import csv
import dataclasses
import inspect
import json
import math
import os
import random
import resource
import shutil
import signal
import sys
import time
import typing
from dataclasses import dataclass

import torch
import torch.distributed as dist
from tqdm import tqdm

import distributed
import equalizer
import grpo
import hub
import model
import optimizer
import parallel
import reward
import sde
import tiny
import tracking
import videoalign_checkpoint
import trust_region


@dataclass
class Config:
    # --- model and data
    model_path: str = ""
    """diffusers-format HunyuanVideo-1.5 (transformer/, vae/, text_encoder/, ...): a local directory or a hub id
    (hunyuanvideo-community/HunyuanVideo-1.5-480p_t2v[@revision]) already in the hub cache; never downloaded
    (hub.py). Checkpoints store the resolved directory: a snapshot path names the exact commit"""
    reward_path: str = ""
    """VideoAlign (VideoReward) checkpoint: a local directory or a hub id (KwaiVGI/VideoReward) already in the hub
    cache; never downloaded"""
    clip_path: str = ""
    """CLIP, for --reward clipscore: a local directory or a hub id (openai/clip-vit-large-patch14) in the hub cache"""
    pickscore_path: str = ""
    """PickScore, for --reward pickscore: a local directory or a hub id (yuvalkirstain/PickScore_v1) in the hub cache"""
    pickscore_processor_path: str = ""
    """its image processor + tokenizer (PickScore_v1 uses laion/CLIP-ViT-H-14-laion2B-s32B-b79K's); empty = pickscore_path"""
    prompts: str = ""
    """prompt file: .txt (one per line), .csv (column `prompt`) or .jsonl ({"prompt": ...}), UTF-8 (a BOM is
    allowed); default prompts/example.txt, or the world's prompts/video_world.txt with --world"""
    world: bool = False
    """the synthetic video world (world/video_world.py), CPU: its pretrained tiny HunyuanVideo-1.5 (built once, cached),
    prompts, video size, shift / CFG (its checkpoint's configs) and exact, hackable reward (--reward world)"""
    tiny: bool = False
    """random tiny HunyuanVideo-1.5 and VideoAlign (tiny.py), CPU, gloo: the pipeline without weights; an empty
    --model_path / --reward_path is built once under output_dir"""
    num_frames: typing.Optional[int] = None
    """video frames, 4k+1; default 81 (official sample_n_frames), 5 with --tiny"""
    height: typing.Optional[int] = None
    """video height in pixels, multiple of 16; default 352 (official 480p bucket 352x624), 16 with --tiny"""
    width: typing.Optional[int] = None
    """video width in pixels, multiple of 16; default 624 (official 480p bucket 352x624), 16 with --tiny"""
    # --- run
    output_dir: str = "runs/sage_grpo"
    """checkpoints, metrics.jsonl and sample videos go here (shared filesystem for multi-node)"""
    resume: bool = False
    """continue exactly from the newest complete checkpoint in output_dir"""
    allow_config_change: bool = False
    """with --resume, accept flags that differ from the checkpoint's (otherwise an error lists them)"""
    overwrite: bool = False
    """start afresh in an output_dir that holds a run: first delete its numbered checkpoints, metrics.jsonl,
    curves.png, samples/ and the tracker's tensorboard/ and wandb_run_id (nothing else); without it (or --resume)
    such a directory is refused"""
    seed: int = 42
    """base seed of prompt order, rollout noise and step order (official post_train.py: 42)"""
    max_iterations: int = 10000
    """number of rollout iterations (official max_steps 10000)"""
    self_check: bool = False
    """instead of training, the pre-flight check of this setup (self_check.py): one rollout, then the on-policy
    ratio per step, bf16 vs fp32 log-probs, batched CFG vs two forwards, batch 1 vs B, the reward and a failed
    video, the trust region's activity at β, the equalizer weights; a pass/fail table, printed and written to
    output_dir/self_check.md; exit status 1 on a FAIL. Nothing is saved; an output_dir holding a run is untouched"""
    # --- sampling (rollouts)
    num_steps: int = 20
    """denoising steps N per rollout (paper / official grpo_sampling_steps 20)"""
    shift: typing.Optional[float] = None
    """schedule shift s, σ <- sσ/(1+(s-1)σ); default: the checkpoint's scheduler config (480p T2V: 5, = official
    infer_flow_shift_video)"""
    eta: float = 0.5
    """noise level η of the transition kernel (paper / official eta 0.5)"""
    kernel: str = "sage"
    """stochastic transition kernel: sage | flow_grpo | dance_grpo | cps (sde.STOCHASTIC_KERNELS)"""
    cfg_scale: typing.Optional[float] = None
    """classifier-free guidance scale; default: the checkpoint's guider config (480p T2V: 6, = official cfg_scale)"""
    sde_window: int = 0
    """K > 0: only a window of K consecutive steps is stochastic and trained, the others are ODE steps, so the update
    recomputes K steps instead of N (MixGRPO; Flow-Factory num_sde_steps, VeRL-Omni sde_window_size); 0: all N steps
    (official). docs/cost_options.md """
    sde_window_placement: str = "fixed"
    """where the window lies: fixed (steps sde_window_start … +K−1) | random (a new start every iteration, the same
    on every rank) | moving (MixGRPO's progressive window: it starts at step 0, the highest noise, moves one step
    towards low noise every --sde_window_shift_every iterations and stays at the last K steps)"""
    sde_window_start: int = 0
    """first step of a fixed window (0 = σ 1, the highest noise)"""
    sde_window_shift_every: int = 25
    """iterations per one-step move of a moving window"""
    # --- GRPO
    group_size: int = 4
    """rollouts per prompt G (official num_generations 4)"""
    same_noise_per_group: bool = False
    """every member of a group starts from the same initial noise; the SDE noise still differs (official
    use_same_noise False; FlowGRPO same_latent, DanceGRPO use_same_noise)"""
    videos_per_rank: typing.Optional[int] = None
    """rollouts each rank makes per iteration; default: the fewest, at least 2, that fill whole groups of
    --group_size over the data-parallel ranks: 2 on 8 ranks (official batch_size 2), 4 on one process"""
    clip_range: float = grpo.CLIP_RANGE
    """PPO clip ε on the per-step ratio (official clip_range 1e-4)"""
    adv_clip: float = grpo.ADVANTAGE_CLIP
    """advantage clamp (official adv_clip_max 5)"""
    train_step_fraction: float = 1.0
    """fraction of the N steps (of the SDE window's K with --sde_window) trained per sample, in a per-sample random
    order (official timestep_fraction 1.0)"""
    equalizer: bool = True
    """gradient-norm equalizer S_t on the policy loss (official use_grad_balancing True)"""
    equalizer_median: str = "geometric"
    """geometric (ours: the geometric mean of the two middle N_t, so median(S) = 1) | lower (official torch.median:
    the lower middle value, every S_t 1/1.0871 of ours at 20 steps); equalizer.py"""
    updates_per_rollout: int = 1
    """optimizer updates per rollout; > 1 makes the clip and the step-wise KL act (official 1)"""
    # --- trust region
    kl_mode: str = "dual"
    """none | fixed | step | moving | dual (official use_moving_KL + use_dual_kl = dual)"""
    anchor_period: int = trust_region.ANCHOR_PERIOD
    """optimizer updates between hard copies policy -> anchor (official update_ref_model_step 10)"""
    kl_anchor_weight: float = trust_region.ANCHOR_WEIGHT
    """weight of KL(π_θ‖π_anchor) in L_KL (official dual_kl_moving_weight 1.0)"""
    kl_step_weight: float = trust_region.STEP_WEIGHT
    """weight of KL(π_θ‖π_old) in L_KL (official dual_kl_step_weight 0.1)"""
    kl_step_estimator: str = "gaussian"
    """the step-wise term: gaussian (ours: KL of the step means, exactly 0 at the first update after a rollout) |
    k1 (official: the sample log-ratio mean(log p_old - log p_θ); 0 in value on-policy, but its gradient adds
    +kl_step_weight·β/S_t to every advantage); trust_region.py"""
    beta_schedule: str = "official"
    """official (ramp beta_start -> beta_end over 100 (sample, step) pairs, then x0.9 while the KL is above 1.5e-5,
    x1.1 below 5e-6, as the official controller; identical on every rank; inert: its β is ~1e-8 of the policy
    term) | adaptive (PPO's rule in the usual direction: every beta_window updates, β x2 if their mean KL is above
    1.5 kl_target, /2 if below kl_target/1.5, from beta_init within [beta_min, beta_max]) | two_stage (beta_start,
    then beta_end from beta_switch_step) | fixed (beta_start throughout); trust_region.BetaController,
    trust_region.AdaptiveBeta"""
    beta_start: float = trust_region.BETA_START
    """smallest / first β (official kl_coef = kl_min_coef 1e-7)"""
    beta_end: float = trust_region.BETA_END
    """largest / last β, and the official controller's KL target (official kl_weight 1e-5)"""
    kl_target: float = 1.5e-3
    """adaptive only: the L_KL per (sample, step) pair that β holds (ours: the KL a fixed β of 0.1 holds in the
    synthetic world; there the adaptive rule drifts to its floor, and a fixed β chosen by its activity is what
    worked: docs/world.md, "The trust region, made to act")"""
    beta_init: float = 0.1
    """adaptive only: the first β (ours: the β sweep's knee in the synthetic world, docs/world.md)"""
    beta_min: float = 1e-3
    """adaptive only: β's floor"""
    beta_max: float = 1e4
    """adaptive only: β's ceiling"""
    beta_window: int = trust_region.ANCHOR_PERIOD
    """adaptive only: optimizer updates per β decision, made on their mean KL (ours: the anchor period, over which
    the moving anchor's KL rises from 0; 1 = PPO's per-update rule)"""
    beta_switch_step: int = 100
    """two_stage only: optimizer update at which β switches (ours: the paper gives the two values, not the switch)"""
    # --- reward
    reward: list[str] = dataclasses.field(default_factory=lambda: ["videoalign"])
    """the rewards optimised, each name or name=weight: videoalign (the paper's, --reward_path) | clipscore
    (--clip_path) | pickscore (--pickscore_path) | world (the synthetic world's, with --world, its default). Several
    are summed with their weights, e.g. --reward videoalign=1 clipscore=0.5, and each is logged by name; a weight
    of 0 logs a reward without optimising it"""
    reward_normalization: str = "per_reward"
    """with several rewards: per_reward (normalise each in its group, then the weighted sum: the weights are shares
    of the advantage whatever the rewards' scales, GDPO-style) | total (normalise the weighted sum: a reward's
    weight is multiplied by its spread); with one reward both are the paper's advantage (grpo.py)"""
    reward_input: str = "frames"
    """frames: the decoded frames go to the reward model as they are | mp4: first through an in-memory 8-bit H.264
    mp4 (24 fps, crf 25, yuv420p), as the official code scores saved videos (reward.mp4_round_trip)"""
    reward_weights: list[str] = dataclasses.field(default_factory=list)
    """name=value per reward component to reweight, e.g. --reward_weights ta=2; unnamed components keep the
    reward's defaults (VideoAlign: vq=0.5 mq=0.5 ta=1.0, paper setting B / official reward_weights; the world:
    alignment=1 composition=0.5 brightness=0.5)"""
    # --- optimizer
    optimizer: str = "muon"
    """muon (official use_muon: Newton-Schulz on every 2-D weight, lr matched to AdamW's update RMS, AdamW for
    the rest; whole matrices under FSDP2) | adamw; optimizer.py"""
    lr: float = 1e-5
    """learning rate (official train_grpo.sh learning_rate 1e-5)"""
    weight_decay: float = 0.01
    """decoupled weight decay (official 0.01)"""
    grad_clip: float = 1.0
    """global gradient-norm clip (official max_grad_norm 1.0)"""
    lora_rank: int = 0
    """0 = full fine-tune (official default); > 0 trains LoRA adapters of this rank (needs peft)"""
    train_glyph_projector: bool = True
    """full fine-tune: train the byT5 glyph projector too (official: the whole transformer). It only gets a gradient
    from prompts that quote text to render; --no-train_glyph_projector freezes it and keeps it whole on every rank
    instead of sharding it (no all-gather per forward). Our choice for the video world (its prompts quote no text,
    and the projector is 87 % of its parameters)"""
    ema_decay: float = 0.0
    """d in (0, 1): keep θ_ema <- d·θ_ema + (1 − d)·θ after every update, in each checkpoint (ema/ for --resume,
    ema_transformer/ in diffusers format, which eval.py evaluates beside transformer/); 0: none (official).
    FlowGRPO's ema; docs/cost_options.md """
    # --- parallelism and memory
    sp_size: int = 1
    """sequence parallelism: this many consecutive ranks hold the same videos and split each one's tokens (Ulysses,
    parallel.py); must divide the world size and the 16 heads (official sp_size 2 on 64 GPUs)"""
    gradient_checkpointing: typing.Optional[bool] = None
    """recompute block activations in backward (official enable_gradient_checkpointing). Default: on with CUDA
    (the 8.3B model's activations do not fit otherwise), off on CPU (--tiny, --world: small activations, and one
    transformer forward fewer per trained step); --gradient_checkpointing / --no-gradient_checkpointing force it"""
    anchor_offload: bool = False
    """keep the anchor's shards on CPU (FSDP2 CPUOffloadPolicy; official reference_mode_offload)"""
    text_encoder_offload: bool = False
    """keep the text encoders (Qwen2.5-VL-7B: 15 GB bf16) on CPU, on the GPU only while encoding prompts; our choice"""
    prompt_cache: int = 512
    """prompts whose embeddings are kept (on the CPU, real tokens only: ~0.5 MB each at the real model's widths)
    and reused when they come back in a later iteration (model.PromptCache); our choice: the text encoders are
    frozen, so a prompt is encoded once per run instead of once per iteration"""
    vae_tiling: typing.Optional[bool] = None
    """decode the rollouts in overlapping 256-pixel tiles (model.set_vae_tiling; diffusers' tile defaults, as its
    HunyuanVideo-1.5 example): far less decoder memory at 81x352x624, frames differ slightly at the tile seams
    (measured in docs/measurements.md). Default: on with CUDA, off on CPU, where videos are smaller than a tile anyway;
    --no-vae_tiling / --vae_tiling force it. Checkpoints store the value used"""
    # --- logging and tracking
    sample_every: int = 50
    """iterations between saved sample videos (official validation_interval 50); 0 = never"""
    eval_every: int = 0
    """N > 0: before iteration 1 and every N iterations, the policy's ODE samples of --eval_prompts from fixed seeds,
    scored by every loaded reward (one of weight 0 too: a hacking monitor), logged as eval/<name> in
    metrics.jsonl, curves.png and the tracker; 0: none (official). docs/cost_options.md """
    eval_prompts: str = ""
    """held-out prompt file for --eval_every (formats as --prompts); default with --world: the world's prompts"""
    eval_videos_per_prompt: int = 1
    """--eval_every's videos per held-out prompt, each from its own fixed seed"""
    report_to: str = "none"
    """none | tensorboard (output_dir/tensorboard/) | wandb (WANDB_MODE=offline for no network): the metrics rows,
    the config and the sample videos also go to this experiment tracker, from rank 0; resume continues its run
    (tracking.py; the packages are optional: pip install tensorboard / wandb)"""
    verbose: bool = False
    """keep diffusers' and transformers' own messages and progress bars (loading, weight conversion warnings); without
    it the run prints one line per setup phase and its progress bar"""
    # --- reliability
    checkpoint_every: int = 100
    """iterations between checkpoints (official save_interval 100); the last iteration is always saved"""
    checkpoint_every_minutes: float = 60.0
    """also checkpoint once this many minutes have passed since the last one (0 = off; ours: at ~5 min per
    iteration, 100 iterations are 8 hours); SIGTERM (preemption) always writes one, then the run exits"""
    keep_checkpoints: int = 2
    """newest complete checkpoints kept, deleted only once a newer one is complete; 2 so that a corrupt newest
    one can fall back to the previous (ours: disk)"""
    max_failed_iterations: int = 10
    """stop after this many consecutive iterations without an optimizer update (every reward failed, or the loss
    or gradient was not finite): a broken reward model must not burn days (ours)"""
    collective_timeout_minutes: float = 30.0
    """a collective (all-reduce, barrier, ...) waiting longer than this fails the run with a message naming the
    likely cause, a hung or dead rank (ours; torch's defaults: 10 min NCCL, 30 min gloo)"""


# ------------------------------------------------------------------------------------------------
# Two small pieces of the loop (the others are below main).

def sample_seed(seed, iteration, index, videos_per_iteration):
    """Seed of global sample `index` at `iteration`: independent of how samples are split over ranks."""
    return seed * 1_000_003 + iteration * videos_per_iteration + index


def sample_rollout(cfg, policy, embeds, seeds, latent_shape, sigmas, initial_seeds=None, window=None):
    """ROLLOUT's sampler call (the self-check makes its rollout with the same); window: sde_window's."""
    return model.rollout(policy, embeds, seeds, latent_shape, sigmas, cfg.kernel, cfg.eta, cfg.cfg_scale,
                         sde_window=window, initial_seeds=initial_seeds)


def recompute_log_prob(cfg, transformer, embeds, transition):
    """UPDATE's (mean, std, log-prob) of recorded transitions, with gradients (the self-check checks this call
    against the rollout's own log-probs: the ratio at the first update must be 1)."""
    return model.transition_log_prob(transformer, embeds, transition, cfg.kernel, cfg.eta, cfg.cfg_scale)


def score_videos(cfg, pipe, reward_model, latents, prompts):
    """REWARD's scoring of final latents (b, C, F, H, W) (the self-check scores with the same). Decoded to frames
    (b, F, 3, H, W) in [0, 1] when a reward reads frames, with --reward_input mp4 each video round-tripped through
    an 8-bit H.264 mp4 as the official code scores saved videos. A non-finite video (a failed decode) is not
    encoded: it stays non-finite and every reward scores it NaN. Returns (frames or None, scores)."""
    frames = None
    if reward_model.needs_frames:
        frames = model.decode_latents(pipe.vae, latents)
        if cfg.reward_input == "mp4":
            frames = torch.stack([reward.mp4_round_trip(video) if torch.isfinite(video).all() else video
                                  for video in frames.cpu()]).to(frames.device)
    # {component: (b,), reward name: (b,), "reward": (b,), diagnostics...}, NaN = failed video
    return frames, reward_model(frames, latents, prompts)


def trained_steps(seeds, num_steps, fraction, window=None):
    """Per-sample random order of the N steps (of the window's, steps start … stop−1), first ceil(fraction·n) kept
    -> LongTensor (B, n_kept). E.g. seeds [7, 8], N = 4, fraction 0.5 -> [[2, 0], [3, 1]]: each sample trains its
    own steps."""
    start, stop = (0, num_steps) if window is None else window
    keep = max(1, math.ceil(fraction * (stop - start)))
    return torch.stack([start + torch.randperm(stop - start, generator=torch.Generator().manual_seed(s + 1))[:keep]
                        for s in seeds])


def step_weights(cfg, sigmas, window, device):
    """Tensor[N] of the policy loss's step weights: S_t (equalizer) or 1 per stochastic step; 0 for a deterministic
    step (no log-prob) and for a step outside the SDE window (the equalizer's median is over the window's steps)."""
    return equalizer.step_weights(cfg.kernel, sigmas, cfg.eta, cfg.equalizer, cfg.equalizer_median, window).float().to(device)


SDE_WINDOW_PLACEMENTS = ("fixed", "random", "moving")


def sde_window(cfg, iteration):
    """(start, stop) of the steps that are stochastic and trained at `iteration` (0-based), None for all N steps.
    Every rank computes the same window (random: from --seed and the iteration only)."""
    size, last = cfg.sde_window, cfg.num_steps - cfg.sde_window  # last: the largest start
    if not size or size == cfg.num_steps:
        return None
    if cfg.sde_window_placement == "fixed":
        start = cfg.sde_window_start
    elif cfg.sde_window_placement == "random":
        start = int(torch.randint(last + 1, (1,), generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + iteration)))
    else:  # moving: high noise first, one step later every sde_window_shift_every iterations, then the last K steps
        start = min(iteration // cfg.sde_window_shift_every, last)
    return start, start + size


EVAL_SEED = 10 ** 9  # --eval_every's seeds: EVAL_SEED + row, never a rollout seed of a run with --seed < 1000


@torch.no_grad()
def held_out_eval(cfg, pipe, policy, reward_model, prompt_cache, prompts, latent_shape, sigmas, layout, device,
                  iteration):
    """--eval_every: the policy's deterministic (ODE) samples of the held-out prompts, the same seeds every time,
    scored by every loaded reward. Returns {"eval/<name>": mean over the videos} for the total reward, each reward
    (a weight-0 one too), each component and diagnostic (the world's off-manifold distance and on-manifold
    reward), and "eval/after_iterations". The videos are split over the data-parallel ranks, --videos_per_rank
    at a time; a rank with fewer videos runs its missing batches on a repeated video and drops it (every rank
    runs the same number of forwards: FSDP's collectives).""" 
    rows = [(p, v) for p in range(len(prompts)) for v in range(cfg.eval_videos_per_prompt)]  # (prompt, video)
    per_rank = math.ceil(len(rows) / layout.dp_size)
    mine = rows[layout.dp_rank * per_rank:(layout.dp_rank + 1) * per_rank]
    names = list(dict.fromkeys(("reward", *reward_model.components, *reward_model.diagnostics)))  # + each reward's total
    values = {name: [] for name in names}
    for start in range(0, per_rank, cfg.videos_per_rank):
        chunk = mine[start:start + cfg.videos_per_rank]
        real = len(chunk)  # a rank past its share still runs the batch's forwards, on one repeated video
        chunk = chunk or [(mine or rows)[-1]]
        batch_prompts = [prompts[p] for p, _ in chunk]
        seeds = [EVAL_SEED + p * cfg.eval_videos_per_prompt + v for p, v in chunk]
        result = model.rollout(policy, prompt_cache(batch_prompts), seeds, latent_shape, sigmas, "ode",
                               guidance_scale=cfg.cfg_scale)
        own = layout.own_rows(len(chunk))
        _, scores = (score_videos(cfg, pipe, reward_model, result.final_latents[own], [batch_prompts[i] for i in own])
                     if own else (None, {}))
        scores = layout.gather_rows(scores, own, len(chunk), names, device)
        for name in names:
            values[name].append(scores[name][:real])
    means = {}
    for name in names:  # every rank's videos (padded to per_rank with NaN), then the mean over the finite ones
        local = torch.cat(values[name]) if values[name] else torch.zeros(0, device=device)
        padded = torch.full((per_rank,), float("nan"), device=device)
        padded[:len(local)] = local
        means[f"eval/{name}"] = distributed.all_gather_cat(padded, layout.dp_group).nanmean().item()
    return {**means, "eval/after_iterations": iteration}


# ------------------------------------------------------------------------------------------------

class RunError(RuntimeError):
    """A run that must stop, with a message we wrote (printed once, by rank 0, without a traceback)."""


def main(cfg):
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    cfg, prompts = check_config(cfg, world_size)  # every input error raises here, before any model is loaded
    if not cfg.verbose:
        quiet_libraries()
    rank, world_size, device, mesh = distributed.setup(use_cuda=not (cfg.tiny or cfg.world),
                                                       timeout_minutes=cfg.collective_timeout_minutes)
    try:
        # closing: what train opens that must be closed on every exit, normal, SIGTERM or error (the tracker)
        with sigterm_flag() as preempted, contextlib.ExitStack() as closing:
            return train(cfg, prompts, rank, world_size, device, mesh, preempted, closing)
    except distributed.CheckpointError as error:
        raise RunError(str(error)) from error
    except (dist.DistError, RuntimeError) as error:  # a collective timed out, or a peer died mid-collective
        if isinstance(error, RunError) or not (isinstance(error, dist.DistError) or collective_failure(error)):
            raise
        raise RunError(f"a collective failed on rank {rank} ({type(error).__name__}: {str(error)[:300]}): another rank "
                       f"is hung or dead (waited up to --collective_timeout_minutes {cfg.collective_timeout_minutes:g}); "
                       f"the newest intact checkpoint is {distributed.latest_checkpoint(cfg.output_dir)}, "
                       f"resume from it with --resume") from error
    finally:
        dist.destroy_process_group()


def train(cfg, prompts, rank, world_size, device, mesh, preempted, closing):
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    reward_specs = reward.parse_reward_specs(cfg.reward)  # {name: weight}
    model_path = cfg.model_path
    reward_paths = {name: getattr(cfg, reward.TRAINING_REWARDS[name].path_flag) for name in reward_specs
                    if reward.TRAINING_REWARDS[name].path_flag}
    if cfg.tiny:  # random tiny models in the real on-disk layouts, loaded by the same code as real ones
        if rank == 0:
            tiny.tiny_model_paths(cfg.output_dir, hunyuan=model_path, **reward_paths)
        dist.barrier()
        paths = tiny.tiny_model_paths(cfg.output_dir, hunyuan=model_path, **reward_paths)
        model_path, reward_paths = paths.pop("hunyuan"), paths
    if cfg.world and not model_path:  # the world's pretrained policy: built (or read from its cache) by rank 0
        from world import pretrain as world_pretrain
        if rank == 0:
            world_pretrain.prepare_world()
        dist.barrier()
        model_path = world_pretrain.prepare_world()
    cfg, sources = resolve_sampling(cfg, model_path)  # shift and CFG scale: the checkpoint's unless given
    compute_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    check_schedule(cfg)  # sage's first step, the smallest step std at --eta: flag errors, before any model
    # one writer per output_dir (a lock held by rank 0 until the run ends), then the verified checkpoint to resume
    # from, or None (the self-check never deletes a run: no --overwrite for it)
    checkpoint = prepare_output_dir(dataclasses.replace(cfg, overwrite=False) if cfg.self_check else cfg, rank, closing)

    # Frozen parts (text encoders, VAE) in the compute dtype; the policy in fp32 (master weights),
    # from the checkpoint when resuming. The pipeline is loaded without its transformer: the policy's
    # weights are read once, by rank 0 (distributed.load_policy).
    say = print if rank == 0 else (lambda *args, **kwargs: None)
    say(f"setup: text encoders and VAE from {model_path}", flush=True)
    pipe = model.load_hunyuan(model_path, device="cpu", dtype=compute_dtype, load_transformer=False)
    policy_path = checkpoint if checkpoint and cfg.lora_rank == 0 else model_path  # where the policy's weights are
    if cfg.gradient_checkpointing is None:  # on with CUDA, off on CPU
        cfg = dataclasses.replace(cfg, gradient_checkpointing=device.type == "cuda")
    w_anchor, _ = trust_region.kl_weights(cfg.kl_mode, cfg.kl_anchor_weight, cfg.kl_step_weight)
    say(f"setup: the policy from {policy_path} (FSDP2 over {world_size} rank(s){', with its anchor' if w_anchor else ''})",
        flush=True)
    policy, anchor_module = distributed.load_policy(
        policy_path, mesh, device, rank, compute_dtype,
        lora_rank=cfg.lora_rank, gradient_checkpointing=cfg.gradient_checkpointing, with_anchor=w_anchor > 0,
        anchor_offload=cfg.anchor_offload, train_glyph_projector=cfg.train_glyph_projector)
    # --sp_size: the ranks of a sequence-parallel group split each video's tokens (policy and anchor alike)
    layout = parallel.SequenceParallel(cfg.sp_size, device.type)
    for module in (policy, anchor_module):
        if module is not None:
            parallel.enable(module, layout, device)
    text_encoders = (pipe.pipeline.text_encoder, pipe.pipeline.text_encoder_2)
    for module in (pipe.vae,) + (() if cfg.text_encoder_offload else text_encoders):
        module.to(device)
    cfg = dataclasses.replace(cfg, vae_tiling=model.set_vae_tiling(pipe.vae, cfg.vae_tiling))  # None: on with CUDA
    prompt_cache = model.PromptCache(pipe, device, compute_dtype, capacity=cfg.prompt_cache,
                                     offload=cfg.text_encoder_offload)
    trainable = [p for p in policy.parameters() if p.requires_grad]
    optim = optimizer.build_optimizer(policy, cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay)
    ema = optimizer.WeightEMA(policy, cfg.ema_decay) if cfg.ema_decay else None  # sharded like the policy
    beta_controller = None  # β: the two simple schedules need no state
    if cfg.beta_schedule == "official":  # steps once per (sample, step) pair
        beta_controller = trust_region.BetaController("official", cfg.beta_start, cfg.beta_end)
    elif cfg.beta_schedule == "adaptive":  # decides once per --beta_window optimizer updates
        beta_controller = trust_region.AdaptiveBeta(cfg.beta_init, cfg.kl_target, cfg.beta_min, cfg.beta_max,
                                                    cfg.beta_window)
    anchor = None
    if anchor_module is not None:
        anchor = trust_region.MovingAnchor(policy, trust_region.anchor_period_for(cfg.kl_mode, cfg.anchor_period),
                                           anchor=anchor_module)
    # the rewards and their weights; the total is computed by the mix (reward.RewardMix), train.py reads "reward"
    say(f"setup: reward {', '.join(f'{n} ({reward_paths[n]})' if n in reward_paths else n for n in reward_specs)}",
        flush=True)
    reward_model = reward.load_training_rewards(reward_specs, reward_paths, device=device, dtype=compute_dtype,
                                                weight_items=cfg.reward_weights,
                                                processor_paths={"pickscore": cfg.pickscore_processor_path or None})

    group_size, videos_per_rank = cfg.group_size, cfg.videos_per_rank
    videos_per_iteration = layout.dp_size * videos_per_rank  # the sp ranks of a group hold the same videos
    first = layout.dp_rank * videos_per_rank  # global index of this rank's first sample; a group's are contiguous
    sampler = PromptSampler(len(prompts), videos_per_iteration // group_size, cfg.seed)
    sigmas = sde.shifted_sigmas(cfg.num_steps, cfg.shift)  # (N+1,) σ_0 = 1 … σ_N = 0
    latent_shape = pipe.latent_shape(cfg.num_frames, cfg.height, cfg.width)  # (C, F, H, W)
    state = {"iteration": 0, "update_step": 0, "skipped_updates": 0}
    if checkpoint:
        state = distributed.load_checkpoint(checkpoint, policy, optim, anchor, rank, ema)
        if state.pop("ema_started_at_resume") and rank == 0:
            print(f"--ema_decay: {checkpoint} holds no EMA; the average starts from its weights", flush=True)
        for line in resume_notes(state, run_fingerprint(prompts, world_size), sampler) if rank == 0 else ():
            print(line, flush=True)
        sampler.load_state_dict(state["sampler"])
        if beta_controller is not None:
            beta_controller.load_state_dict(state["beta_controller"])
        if anchor is not None:
            anchor.last_refresh = state["anchor_last_refresh"]
    if cfg.self_check:  # the pre-flight check on exactly this setup, instead of training
        return run_self_check(cfg, rank, world_size, device, compute_dtype, pipe=pipe, policy=policy, anchor=anchor,
                              optim=optim, reward_model=reward_model, prompts=prompts, sigmas=sigmas,
                              step_weights=step_weights(cfg, sigmas, sde_window(cfg, 0), device), layout=layout, latent_shape=latent_shape,
                              model_path=policy_path)
    last_save, failed_iterations = time.monotonic(), 0
    # --report_to: the rows and samples also go to TensorBoard / W&B (tracking.py), from rank 0 only
    tracker = closing.enter_context(tracking.open_tracker(cfg.report_to if rank == 0 else "none", cfg.output_dir,
                                                          dataclasses.asdict(cfg), resume=checkpoint is not None,
                                                          start_iteration=state["iteration"]))
    if rank == 0:
        print(f"SAGE-GRPO: world {world_size} (sp {layout.sp_size}), {videos_per_iteration} videos/iteration in groups of {group_size}, "
              f"latent {tuple(latent_shape)}, {sum(p.numel() for p in trainable) / 1e6:.3g}M trainable, "
              f"{'resuming ' + checkpoint if checkpoint else 'from ' + model_path}\n"
              f"  shift {cfg.shift:g} ({sources['shift']}), CFG scale {cfg.cfg_scale:g} ({sources['cfg_scale']}), "
              f"VAE tiling {'on' if cfg.vae_tiling else 'off'}, "
              f"reward = {reward_model.formula()}" + (f" ({cfg.reward_normalization} normalisation)"
                                                      if len(reward_specs) > 1 else ""),
              flush=True)

    forwards = ForwardCount(policy, anchor.anchor if anchor is not None else None, videos_per_rank,
                            cfg.gradient_checkpointing)
    eval_prompts = load_prompts(cfg.eval_prompts) if cfg.eval_every else []
    bar = tqdm(range(state["iteration"], cfg.max_iterations), disable=rank != 0, initial=state["iteration"],
               total=cfg.max_iterations, desc="iterations")
    for iteration in bar:
        timer = PhaseTimer(device)
        evaluation = {}  # --eval_every: the held-out prompts' scores of the policy as it enters this iteration
        if cfg.eval_every and iteration % cfg.eval_every == 0:
            timer("eval")
            forwards.evaluating = True
            evaluation = held_out_eval(cfg, pipe, policy, reward_model, prompt_cache, eval_prompts, latent_shape, sigmas,
                                       layout, device, iteration)
            forwards.evaluating = False
        # ======================================================================== ROLLOUT
        timer("rollout")
        group_prompts = [prompts[i] for i in sampler.next_indices()]  # one prompt per group, all ranks agree
        sample_prompts = [group_prompts[(first + b) // group_size] for b in range(videos_per_rank)]
        seeds = [sample_seed(cfg.seed, iteration, first + b, videos_per_iteration) for b in range(videos_per_rank)]
        embeds = prompt_cache(sample_prompts)  # each distinct prompt encoded once per run, then reused
        # same_noise_per_group: every member starts from the noise of its group's first member
        initial_seeds = [sample_seed(cfg.seed, iteration, (first + b) // group_size * group_size, videos_per_iteration)
                         for b in range(videos_per_rank)] if cfg.same_noise_per_group else None
        window = sde_window(cfg, iteration)  # None: every step stochastic (official)
        rollout = sample_rollout(cfg, policy, embeds, seeds, latent_shape, sigmas, initial_seeds, window)

        # ======================================================================== REWARD
        timer("reward")
        # this rank's share of the videos: all B, or with --sp_size a part, so that each video is scored once
        own = layout.own_rows(videos_per_rank)
        logged = reward_model.components + reward_model.diagnostics
        # frames: None when only rewards of latents (the world's) are used; scores then shared over the sp group
        frames, scores = (score_videos(cfg, pipe, reward_model, rollout.final_latents[own],
                                       [sample_prompts[i] for i in own]) if own else (None, {}))
        scores = layout.gather_rows(scores, own, videos_per_rank, (*logged, "reward"), device)
        rewards = scores["reward"]  # (B,) the weighted sum, computed by the reward model

        # ======================================================================== ADVANTAGE
        timer("advantage")
        all_rewards = distributed.all_gather_cat(rewards, layout.dp_group)  # (dp·B,) group g = [gG, (g+1)G)
        if len(reward_specs) > 1 and cfg.reward_normalization == "per_reward":  # each reward normalised, then the sum
            per_reward = torch.stack([distributed.all_gather_cat(scores[n], layout.dp_group) for n in reward_specs])
            all_advantages = grpo.decoupled_advantages(per_reward.cpu(), list(reward_specs.values()), group_size,
                                                       cfg.adv_clip).float().to(device)
        else:
            all_advantages = grpo.group_advantages(all_rewards, group_size, cfg.adv_clip)  # (W·B,) NaN = failed
        advantages = all_advantages[first:first + videos_per_rank]  # (B,) this rank's samples
        steps = trained_steps(seeds, cfg.num_steps, cfg.train_step_fraction, window).to(device)  # (B, K)
        pair_weights = step_weights(cfg, sigmas, window, device)[steps]  # (B, K) S_t of each (sample, trained step)
        valid = torch.isfinite(advantages)[:, None] & (pair_weights > 0)  # (B, K) pairs that enter the loss
        num_pairs = int(distributed.all_reduce(valid.sum(), group=layout.dp_group))  # loss: mean over the global pairs

        # ======================================================================== UPDATE
        timer("update")
        diagnostics = UpdateDiagnostics(cfg.num_steps)  # what the update measures besides the loss (LOG reads it)
        grad_norms, skipped_now, refreshed = [], 0, False
        anchor_means = {}  # μ_anchor per trained step k, reused by every update of this rollout until a refresh
        for _ in range(cfg.updates_per_rollout if num_pairs else 0):
            loss_finite, update_kl = True, 0.0  # update_kl: this rank's sum of L_KL over the update's valid pairs
            # Gradient accumulation over the trained steps. Gradients are reduce-scattered after every
            # step (not only the last): FSDP2's no-sync mode would hold full unsharded bf16 gradients
            # (16.6 GB for 8.3B) and sum 20 steps in bf16; this way they accumulate sharded, in fp32.
            for k in range(steps.shape[1]):
                step = rollout.transitions(steps[:, k])  # the recorded transition of each sample at its k-th step
                mean, std, log_prob = recompute_log_prob(cfg, policy, embeds, step)
                policy_loss, stats = grpo.clipped_policy_loss(log_prob, step.log_prob, advantages, pair_weights[:, k],
                                                              cfg.clip_range)
                if anchor is not None and k not in anchor_means:
                    with torch.no_grad():
                        anchor_means[k], _, _ = recompute_log_prob(cfg, anchor.anchor, embeds, step)
                # the step-wise term is always measured (μ_old is recorded), weighted only in its modes
                kl, kl_terms = trust_region.dual_kl(mean, std, anchor_means.get(k), step.mean, cfg.kl_mode,
                                                    cfg.kl_anchor_weight, cfg.kl_step_weight, cfg.kl_step_estimator,
                                                    log_prob, step.log_prob)
                mask = valid[:, k]
                beta = pair_betas(cfg, beta_controller, kl.detach(), state["update_step"], world_size)  # (B,)
                # mean over the global valid pairs of  loss_it + β_i·L_KL;  × W undoes FSDP's gradient averaging over
                # all W ranks (with --sp_size the group's ranks each hold part of a video's gradient: they sum)
                n = stats["num_valid_pairs"]
                kl_loss = (beta * kl)[mask].sum()
                update_kl += kl.detach()[mask].sum().item()
                loss = (policy_loss * n + kl_loss) * world_size / num_pairs
                # before the backward (it reads the graph): the trust region's push, the KL terms, ρ
                loss_value = diagnostics.record(policy_loss * n, kl_loss, mean, stats, kl_terms, mask, log_prob,
                                                step.log_prob, steps[:, k], beta)
                loss.backward()
                loss_finite &= math.isfinite(loss_value)
            if cfg.beta_schedule == "adaptive":  # β of the next update, from this one's mean L_KL over all ranks
                beta_controller.update(distributed.all_reduce(torch.tensor(update_kl, dtype=torch.float64,
                                                                           device=device)) / num_pairs)
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
            grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
            finite = int(distributed.all_reduce(torch.tensor(int(loss_finite), device=device))) == world_size
            if finite and math.isfinite(grad_norm):  # a non-finite loss or gradient never reaches the weights
                optim.step()
                state["update_step"] += 1
                if ema is not None:
                    ema.update()
                # ================================================================ ANCHOR
                if anchor is not None and anchor.update_if_due(state["update_step"]):  # hard copy every period
                    refreshed = True
                    anchor_means.clear()  # a new anchor: its means must be recomputed
            else:
                skipped_now += 1
                state["skipped_updates"] += 1
            optim.zero_grad(set_to_none=True)
            grad_norms.append(grad_norm)

        # ======================================================================== LOG
        timer("log")
        components = {k: distributed.all_gather_cat(scores[k], layout.dp_group) for k in logged}
        metrics = {
            "iteration": iteration + 1, "update_step": state["update_step"], "unix_time": time.time(),
            **grpo.reward_stats(all_rewards.cpu(), group_size),
            **{k: v.nanmean().item() for k, v in components.items()},
            "reward_components": list(reward_model.components),
            "advantage_abs_mean": all_advantages.nan_to_num().abs().mean().item(),
            **diagnostics.metrics(device),  # loss terms, β, the trust region's activity, max |ρ − 1| per step
            "grad_norm": grad_norms[-1] if grad_norms else float("nan"),
            "skipped_update": skipped_now, "skipped_updates_total": state["skipped_updates"],
            "anchor_refreshed": refreshed,
            **{k: round(v, 4) for k, v in timer.times.items()}, "peak_memory_gb": peak_memory_gb(device),
            **forwards.take(),  # transformer forwards per video this iteration, counted (ForwardCount)
            **evaluation,
        }
        if rank == 0:
            log_metrics(cfg, metrics, bar, tracker)
            if cfg.sample_every and iteration % cfg.sample_every == 0:
                save_sample(cfg, iteration + 1, frames, rollout.final_latents, sample_prompts, tracker)

        failed_iterations = 0 if skipped_now < cfg.updates_per_rollout and num_pairs else failed_iterations + 1
        if failed_iterations >= cfg.max_failed_iterations:  # nothing learnt for K iterations in a row: stop
            cause = ("every reward failed (NaN): check the reward model and the decoded videos" if not num_pairs else
                     "the loss or the gradient was not finite: check the learning rate, β and the inputs")
            raise RunError(f"no optimizer update in the last {failed_iterations} iterations "
                           f"(--max_failed_iterations {cfg.max_failed_iterations}): {cause}; the newest intact "
                           f"checkpoint is {distributed.latest_checkpoint(cfg.output_dir)}")

        # ======================================================================== CHECKPOINT
        timer(None)
        # every rank must take the same decision: the slowest clock and any SIGTERM count
        due = (time.monotonic() - last_save) / 60 >= cfg.checkpoint_every_minutes > 0
        due, stop = (bool(x) for x in distributed.all_reduce(torch.tensor([int(due), int(preempted[0])], device=device),
                                                             op=dist.ReduceOp.MAX).tolist())
        if due or stop or (iteration + 1) % cfg.checkpoint_every == 0 or iteration + 1 == cfg.max_iterations:
            state.update(iteration=iteration + 1, sampler=sampler.state_dict(), **run_fingerprint(prompts, world_size),
                         anchor_last_refresh=anchor.last_refresh if anchor is not None else 0,
                         beta_controller=beta_controller and beta_controller.state_dict(), config=dataclasses.asdict(cfg))
            saved = distributed.save_checkpoint(cfg.output_dir, iteration + 1, state, policy, optim, anchor, rank,
                                                lora=cfg.lora_rank > 0, keep=cfg.keep_checkpoints, ema=ema)
            last_save = time.monotonic()
            if rank == 0:
                plot_metrics(os.path.join(cfg.output_dir, "metrics.jsonl"), os.path.join(cfg.output_dir, "curves.png"))
            if stop:
                if rank == 0:
                    print(f"\nSIGTERM: {saved} written after iteration {iteration + 1}; continue with the same flags "
                          f"and --resume", flush=True)
                return saved
    if rank == 0:
        print_summary(cfg)
    return distributed.latest_checkpoint(cfg.output_dir)


# ------------------------------------------------------------------------------------------------
# Pieces of the loop.

def run_fingerprint(prompts, world_size):
    """What a checkpoint records about the run's inputs and machine beyond its flags, so that a resume can name
    what changed (resume_notes): the prompts (count and SHA-256 of their text), the world size and the CPU threads."""
    import hashlib
    return {"num_prompts": len(prompts), "prompts_sha256": hashlib.sha256("\n".join(prompts).encode()).hexdigest(),
            "world_size": world_size, "num_threads": torch.get_num_threads()}


def resume_notes(saved, now, sampler):
    """Lines rank 0 prints at a resume for every input that differs from the checkpoint's (`saved`: its trainer
    state; `now`: run_fingerprint of this run). A checkpoint without a field (older code) is not compared on it."""
    notes = []
    if "prompts_sha256" in saved and saved["prompts_sha256"] != now["prompts_sha256"]:
        notes.append(f"resume: the prompts changed since the checkpoint ({saved['num_prompts']} prompts then, "
                     f"{now['num_prompts']} now, SHA-256 {saved['prompts_sha256'][:12]} -> {now['prompts_sha256'][:12]}): "
                     f"the run continues with the new prompts, so it is not the run it would have been")
    position = saved.get("sampler", {}).get("position", 0)
    if position >= sampler.num_prompts:
        notes.append(f"resume: the prompt sampler stood at position {position} of epoch {saved['sampler']['epoch']}, "
                     f"past the end of the {sampler.num_prompts} prompts now: that epoch ends, the next one starts")
    if "world_size" in saved and saved["world_size"] != now["world_size"]:  # only with --allow_config_change
        notes.append(f"resume: {now['world_size']} ranks now, {saved['world_size']} when the checkpoint was written "
                     f"(--allow_config_change): the batch per iteration changes and every rank's random state is "
                     f"re-seeded, not restored")
    if "num_threads" in saved and saved["num_threads"] != now["num_threads"]:
        notes.append(f"resume: {now['num_threads']} CPU threads per rank now, {saved['num_threads']} when the checkpoint "
                     f"was written (OMP_NUM_THREADS / torch.set_num_threads): CPU reductions sum in a thread-dependent "
                     f"order, so the run continues correctly but not bit-identically to an uninterrupted one")
    return notes


class UpdateDiagnostics:
    """What one iteration's UPDATE measures besides its loss, summed over its (update, trained step, sample) pairs
    and over the ranks once, at LOG:

    * the loss terms (loss, policy_loss, approx_kl, clip_fraction, kl_anchor, kl_step): means over the valid pairs;
    * beta: the mean β of the pairs;
    * trust_region_activity = ‖∂(β·L_KL)/∂μ‖ / ‖∂L_policy/∂μ‖ summed over the steps: how hard the trust region
      pushes the step means μ against the policy term (~0: inert at this β). Both terms reach the weights through
      the same μ(θ), so their gradients with respect to μ compare them exactly: two backward passes through the
      loss formulas only, not through the transformer;
    * ratio_max_dev_per_step: max |ρ − 1| per denoising step, ρ = exp(log p_θ − log p_old) (0 at the first update:
      the on-policy check).
    Every number starts at 0, so an iteration without an update still logs every metric."""

    NAMES = ("pairs", "loss", "policy_loss", "approx_kl", "clip_fraction", "kl_anchor", "kl_step", "push_policy",
             "push_kl")

    def __init__(self, num_steps):
        self.sums = dict.fromkeys(self.NAMES, 0.0)
        self.ratio_deviation = torch.zeros(num_steps, dtype=torch.float64)
        self.betas = []

    def record(self, policy_term, kl_loss, mean, stats, kl_terms, mask, log_prob, old_log_prob, steps, beta):
        """One trained step's pairs, before its backward. policy_term: the clipped policy loss x its valid pairs;
        kl_loss: Σ β·L_KL over the valid pairs; mean: the recomputed μ (B, ...) both depend on. Returns this rank's
        loss sum policy_term + kl_loss as a float (one device sync per step: the skip test and the logs)."""
        push_policy = torch.autograd.grad(policy_term, mean, retain_graph=True)[0].norm().item()
        push_kl = torch.autograd.grad(kl_loss, mean, retain_graph=True)[0].norm().item() if kl_loss.requires_grad else 0.0
        n, value = stats["num_valid_pairs"], (policy_term + kl_loss).item()
        for name, amount in (("pairs", n), ("loss", value), ("policy_loss", policy_term.item()),
                             ("approx_kl", stats["approx_kl"] * n), ("clip_fraction", stats["clip_fraction"] * n),
                             ("kl_step", kl_terms["kl_step"][mask].sum().item()),
                             ("kl_anchor", kl_terms["kl_anchor"][mask].sum().item() if "kl_anchor" in kl_terms else 0.0),
                             ("push_policy", push_policy), ("push_kl", push_kl)):
            self.sums[name] += float(amount)
        with torch.no_grad():
            deviation = torch.where(mask, (log_prob - old_log_prob).exp().sub(1).abs(), 0).double().cpu()
            self.ratio_deviation.scatter_reduce_(0, steps.cpu(), deviation, reduce="amax")
        self.betas.append(beta.mean().item())
        return value

    def metrics(self, device):
        """The iteration's numbers over every rank: one all-reduce of the sums, one of the ratio deviations."""
        names = sorted(self.sums)
        summed = dict(zip(names, distributed.all_reduce(torch.tensor([self.sums[n] for n in names], dtype=torch.float64,
                                                                     device=device)).tolist()))
        pairs = max(summed.pop("pairs"), 1.0)
        push_policy, push_kl = summed.pop("push_policy"), summed.pop("push_kl")
        deviation = distributed.all_reduce(self.ratio_deviation.to(device), op=dist.ReduceOp.MAX).cpu()
        return {**{name: total / pairs for name, total in summed.items()},
                "beta": sum(self.betas) / len(self.betas) if self.betas else float("nan"),
                "trust_region_activity": push_kl / push_policy if push_policy > 0 else float("nan"),
                "ratio_max_dev_per_step": deviation.tolist()}


def run_self_check(cfg, rank, world_size, device, compute_dtype, latent_shape, reward_model, **setup):
    """--self_check: self_check.py's checks with this file's own ROLLOUT and UPDATE calls; the table is printed
    and written to output_dir/self_check.md on rank 0. Returns 0 if no line FAILs, else 1."""
    import self_check
    lines, per_step, sigma_pairs = self_check.run(
        cfg, **setup, device=device, compute_dtype=compute_dtype, rank=rank, world_size=world_size,
        sample=lambda policy, embeds, seeds: sample_rollout(cfg, policy, embeds, seeds, latent_shape,
                                                            setup["sigmas"], window=sde_window(cfg, 0)),
        recompute=lambda transformer, embeds, step: recompute_log_prob(cfg, transformer, embeds, step),
        score=lambda latents, prompts: score_videos(cfg, setup["pipe"], reward_model, latents, prompts)[1],
        seed_of=lambda b: sample_seed(cfg.seed, 0, b, cfg.videos_per_rank * world_size))
    failed = any(line.status == "FAIL" for line in lines)
    if rank == 0:
        table = self_check.render(lines, per_step, sigma_pairs)
        with open(os.path.join(cfg.output_dir, "self_check.md.tmp"), "w") as f:
            f.write(table)
        os.replace(os.path.join(cfg.output_dir, "self_check.md.tmp"), os.path.join(cfg.output_dir, "self_check.md"))
        print(f"\nSelf-check ({'FAILED' if failed else 'passed'}; also in {os.path.join(cfg.output_dir, 'self_check.md')}):"
              f"\n\n{table}", flush=True)
    return 1 if failed else 0


def pair_betas(cfg, controller, kl, update_step, world_size):
    """β of each (sample, step) pair of this rank's batch, (B,). official: the controller steps once per
    pair, fed the pair's L_KL averaged over ranks (position b of every rank together), so β is the same
    on every rank; adaptive: the controller's β of this optimizer update; two_stage: by optimizer update;
    fixed: beta_start."""
    if cfg.beta_schedule == "official":
        kl_mean = distributed.all_reduce(kl.float()) / world_size  # (B,)
        return torch.tensor(controller.betas_for(kl_mean.cpu()), device=kl.device)
    if cfg.beta_schedule == "adaptive":  # one β per optimizer update (the loop updates it after the update)
        return torch.full(kl.shape, controller.beta, dtype=torch.float32, device=kl.device)
    beta = (trust_region.kl_coefficient(update_step, cfg.beta_start, cfg.beta_end, cfg.beta_switch_step)
            if cfg.beta_schedule == "two_stage" else cfg.beta_start)
    return torch.full(kl.shape, beta, dtype=torch.float32, device=kl.device)


def collective_failure(error):
    """Whether an error is a collective that timed out or lost its peer (gloo raises plain RuntimeErrors)."""
    text = str(error).lower()
    return any(sign in text for sign in ("timed out", "timeout", "connection closed by peer", "connection reset"))


# ------------------------------------------------------------------------------------------------
# Configuration: flags, checks (all before any model is loaded), the settings read from the checkpoint.

def _field_docs(cls):
    """({field: the string literal under it}, {field: its group}): cleanrl-style field docs reused as --help, and the
    `# --- title` comment above each field, which groups the flags in --help."""
    source = inspect.getsource(cls)
    body = ast.parse(source).body[0].body
    docs = {a.target.id: b.value.value for a, b in zip(body, body[1:])
            if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant)}
    titles, title = [], "options"
    for line in source.splitlines():
        title = line.strip()[len("# --- "):] if line.strip().startswith("# --- ") else title
        titles.append(title)
    groups = {a.target.id: titles[a.lineno - 1] for a in body if isinstance(a, ast.AnnAssign)}
    return docs, groups


def parse_config(argv=None, cls=Config, description=__doc__, extra=(), usage=None):
    """Every field of the config dataclass is a flag: --name value; booleans --name / --no-name; lists
    nargs; an Optional field left out stays None ("from the checkpoint" or "the default size"). --help lists them
    in the groups of the dataclass's `# --- title` comments. extra: (flag, help) of flags handled before parsing
    (train.py's --plan), listed in --help only."""
    parser = argparse.ArgumentParser(description=description.splitlines()[0], usage=usage,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    docs, groups = _field_docs(cls)
    sections = {}
    for field in dataclasses.fields(cls):
        group = groups.get(field.name, "options")
        if group not in sections:
            sections[group] = parser.add_argument_group(group)
        default = field.default_factory() if field.default is dataclasses.MISSING else field.default
        help = " ".join(docs.get(field.name, "").split()).replace("%", "%%") or " "  # argparse formats with %
        kind = field.type
        if typing.get_origin(kind) is typing.Union:  # Optional[X] -> X
            kind = next(t for t in typing.get_args(kind) if t is not type(None))
        if kind is bool:
            sections[group].add_argument(f"--{field.name}", action=argparse.BooleanOptionalAction, default=default,
                                         help=help)
        elif typing.get_origin(kind) is list:
            sections[group].add_argument(f"--{field.name}", nargs="*", type=typing.get_args(kind)[0], default=default,
                                         help=help)
        else:
            sections[group].add_argument(f"--{field.name}", type=kind, default=default, help=help)
    for flag, help in extra:
        parser.add_argument(flag, action="store_true", help=help)
    args = vars(parser.parse_args(argv))
    for flag, _ in extra:
        args.pop(flag.lstrip("-"))
    return cls(**args)


USAGE = ("python train.py [flags]   |   torchrun --nproc_per_node N train.py [flags]   |   "
         "python train.py --plan [plan.py flags]")
PLAN_HELP = ("instead of training: plan.py's memory per GPU and time per iteration for the plan.py flags that follow "
             "(e.g. --plan --world_size 8 --sp_size 2 --sde_window 4; python plan.py --help); no weights, no GPU")


class ConfigError(ValueError):
    """Bad input found before any model is loaded: the message says what was expected and what was found."""


def check_config(cfg, world_size):
    """Raise ConfigError with what was expected and what was found, before any model is loaded or a
    process group started. Returns (cfg with the video size filled in, prompts)."""
    try:
        return _check_config(cfg, world_size)
    except ConfigError:
        raise
    except ValueError as error:  # the checks of sde.py, trust_region.py, reward.py raise plain ValueErrors
        raise ConfigError(str(error)) from None


DEFAULT_PROMPTS = "prompts/example.txt"
"""--prompts when none is given (--world: the world's own file)"""

# Numeric flags and the range each must lie in (every float flag must also be finite).
POSITIVE = ("lr", "clip_range", "adv_clip", "eta", "grad_clip", "shift", "cfg_scale", "collective_timeout_minutes")
NON_NEGATIVE = ("weight_decay", "beta_start", "beta_end", "kl_anchor_weight", "kl_step_weight", "kl_target", "beta_init",
                "beta_min", "beta_max", "sde_window", "sde_window_start", "ema_decay", "eval_every",
                "checkpoint_every_minutes")


def _check_config(cfg, world_size):
    for field in dataclasses.fields(cfg):
        value = getattr(cfg, field.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"--{field.name} must be a finite number, got {value}")
        if value is not None and ((field.name in POSITIVE and not value > 0) or (field.name in NON_NEGATIVE and value < 0)):
            raise ConfigError(f"--{field.name} must be {'> 0' if field.name in POSITIVE else '>= 0'}, got {value}")
    if isinstance(cfg.reward, str):  # Config(reward="videoalign") from Python, as a one-item list
        cfg = dataclasses.replace(cfg, reward=[cfg.reward])
    if cfg.world:  # the world's own model, prompts and reward unless the user gave others
        from world import video_world
        if cfg.tiny:
            raise ConfigError("--world and --tiny are two different small worlds: give one of them")
        cfg = dataclasses.replace(cfg, reward=["world"] if cfg.reward == Config().reward else cfg.reward,
                                  prompts=cfg.prompts or video_world.PROMPTS_FILE, num_frames=cfg.num_frames or video_world.WORLD_NUM_FRAMES,
                                  height=cfg.height or video_world.WORLD_HEIGHT, width=cfg.width or video_world.WORLD_WIDTH)
    if "world" in (item.partition("=")[0] for item in cfg.reward):
        if not cfg.world:
            raise ConfigError("--reward world scores the synthetic world's latents: it needs --world (its model and prompts)")
        from world import video_world  # noqa: F401  (registers the world's reward with reward.py)
    try:
        reward_specs = reward.parse_reward_specs(cfg.reward)
        for name, items in reward.split_component_weights(cfg.reward_weights, tuple(reward_specs)).items():
            reward.parse_weights(items, *reward.training_reward_components(name))
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if cfg.reward_normalization not in ("per_reward", "total"):
        raise ConfigError(f"unknown --reward_normalization {cfg.reward_normalization!r}: expected one of "
                          f"['per_reward', 'total']")
    # A local directory, or a hub id resolved to its snapshot in the local hub cache (hub.py; never downloaded):
    # from here on, the checks, the loaders and the config saved in checkpoints see the local directory.
    # Needed: the policy's, and the directory of every reward that has one (--tiny builds the missing ones,
    # --world has its own policy).
    path_flags = [reward.TRAINING_REWARDS[name].path_flag for name in reward_specs
                  if reward.TRAINING_REWARDS[name].path_flag]
    for name in ("model_path", *path_flags, "pickscore_processor_path"):
        path = getattr(cfg, name)
        needed = name != "pickscore_processor_path" and not cfg.tiny and not (cfg.world and name == "model_path")
        if not path and needed:
            raise ConfigError(f"--{name} is required (a local directory or a hub id already downloaded; weights are "
                              f"never downloaded){'' if cfg.world else ', or use --tiny'}")
        try:
            cfg = dataclasses.replace(cfg, **{name: hub.resolve_path(path, f"--{name}")}) if path else cfg
        except FileNotFoundError as error:
            hint = (f"; with --tiny, give an existing (tiny) model, or leave --{name} empty to build a random tiny one "
                    f"in output_dir") if cfg.tiny else ""
            raise ConfigError(f"{error}{hint}") from None
    if not (cfg.tiny or cfg.world):
        if not os.path.isdir(os.path.join(cfg.model_path, "transformer")):
            raise ValueError(f"--model_path {cfg.model_path!r} is not a diffusers HunyuanVideo-1.5 directory: "
                             f"expected a 'transformer' subdirectory, found {sorted(os.listdir(cfg.model_path))[:8]}")
        try:
            model.check_hunyuan_directory(cfg.model_path)  # every piece present (file names only, no weights read)
        except FileNotFoundError as error:
            raise ConfigError(f"--model_path: {error}") from None
        if "videoalign" in reward_specs and not os.path.isfile(os.path.join(cfg.reward_path, videoalign_checkpoint.MODEL_CONFIG_FILE)):
            raise ValueError(f"--reward_path {cfg.reward_path!r} is not a VideoAlign (VideoReward) directory: expected "
                             f"{videoalign_checkpoint.MODEL_CONFIG_FILE} and checkpoint-<step>/, found {sorted(os.listdir(cfg.reward_path))[:8]}")
    sde.check_kernel(cfg.kernel)
    if cfg.kernel not in sde.STOCHASTIC_KERNELS:
        raise ValueError(f"unknown kernel {cfg.kernel!r} for training: expected one of {sde.STOCHASTIC_KERNELS} "
                         "(ode has no noise, hence nothing to explore)")
    trust_region.check_kl_mode(cfg.kl_mode)
    for name, choices in (("beta_schedule", trust_region.BETA_SCHEDULES), ("optimizer", optimizer.OPTIMIZERS),
                          ("kl_step_estimator", trust_region.STEP_ESTIMATORS), ("equalizer_median", equalizer.MEDIANS),
                          ("sde_window_placement", SDE_WINDOW_PLACEMENTS),
                          ("reward_input", ("frames", "mp4")), ("report_to", tracking.TRACKERS)):
        if getattr(cfg, name) not in choices:
            raise ConfigError(f"unknown --{name} {getattr(cfg, name)!r}: expected one of {list(choices)}")
    tracking.check_installed(cfg.report_to)  # an optional package: missing is an error now, not after loading
    if cfg.beta_schedule == "official" and not 0 < cfg.beta_start <= cfg.beta_end:
        raise ConfigError(f"--beta_schedule official needs 0 < beta_start <= beta_end, got {cfg.beta_start} and "
                          f"{cfg.beta_end}")
    if cfg.beta_schedule == "adaptive" and not (0 < cfg.beta_min <= cfg.beta_init <= cfg.beta_max and cfg.kl_target > 0):
        raise ConfigError(f"--beta_schedule adaptive needs 0 < beta_min <= beta_init <= beta_max and kl_target > 0, got "
                          f"{cfg.beta_min}, {cfg.beta_init}, {cfg.beta_max} and {cfg.kl_target}")
    if cfg.reward_input == "mp4" and ((cfg.height or 0) % 2 or (cfg.width or 0) % 2):
        raise ConfigError(f"--reward_input mp4 needs an even height and width (yuv420p), got {cfg.height}x{cfg.width}")
    if cfg.group_size < 2:
        raise ValueError(f"group_size must be >= 2 (a group of one has no baseline), got {cfg.group_size}")
    if cfg.sp_size >= 1 and world_size % cfg.sp_size == 0 and cfg.videos_per_rank is None:
        cfg = dataclasses.replace(cfg, videos_per_rank=default_videos_per_rank(cfg.group_size, world_size // cfg.sp_size))
    if cfg.videos_per_rank is not None and cfg.videos_per_rank < 1:
        raise ValueError(f"videos_per_rank must be >= 1, got {cfg.videos_per_rank}")
    if cfg.sp_size < 1 or world_size % cfg.sp_size:
        raise ValueError(f"--sp_size must be a divisor of the world size {world_size}, got {cfg.sp_size}")
    videos = world_size // cfg.sp_size * cfg.videos_per_rank  # the sp ranks of a group hold the same videos
    if videos % cfg.group_size:
        raise ValueError(f"world_size / sp_size x videos_per_rank = {world_size} / {cfg.sp_size} x {cfg.videos_per_rank} = {videos} videos per "
                         f"iteration cannot hold whole groups of group_size {cfg.group_size}: it must be a multiple of it")
    if not 0 < cfg.train_step_fraction <= 1:
        raise ValueError(f"train_step_fraction must be in (0, 1], got {cfg.train_step_fraction}")
    check_sde_window(cfg)
    if not 0 <= cfg.ema_decay < 1:
        raise ConfigError(f"--ema_decay must be in [0, 1) (0: no EMA; FlowGRPO uses 0.9), got {cfg.ema_decay}")
    if not cfg.eta > 0:
        raise ValueError(f"eta must be > 0 for exploration, got {cfg.eta}")
    num_frames, height, width = tiny.video_size(cfg.num_frames, cfg.height, cfg.width, cfg.tiny)
    cfg = dataclasses.replace(cfg, num_frames=num_frames, height=height, width=width)
    if (num_frames - 1) % 4 or height % 16 or width % 16:
        raise ValueError(f"video must be 4k+1 frames and a multiple of 16 pixels (VAE 4x temporal, 16x spatial), "
                         f"got {num_frames} frames at {height}x{width}")
    for name in ("num_steps", "updates_per_rollout", "anchor_period", "beta_window", "sde_window_shift_every",
                 "eval_videos_per_prompt",
                 "checkpoint_every", "keep_checkpoints", "max_iterations"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.prompt_cache < 1:
        raise ValueError(f"prompt_cache must be >= 1 (prompts kept), got {cfg.prompt_cache}")
    if cfg.lora_rank < 0:
        raise ValueError(f"lora_rank must be >= 0 (0 = full fine-tune), got {cfg.lora_rank}")
    if cfg.lora_rank > 0:
        try:
            import peft  # noqa: F401
        except ImportError:
            raise ValueError("--lora_rank > 0 needs the optional dependency peft (pip install peft)") from None
    cfg = dataclasses.replace(cfg, prompts=cfg.prompts or DEFAULT_PROMPTS)
    prompts = load_prompts(cfg.prompts)
    if cfg.world:  # the world's reward knows its own prompts only: any other is an error, never replaced
        from world import video_world
        unknown = [p for p in prompts if p not in video_world.WORLD_PROMPTS]
        if unknown:
            raise ConfigError(f"--world: prompt file {cfg.prompts!r} holds {len(unknown)} prompt(s) the world's reward "
                              f"does not know, the first {unknown[0]!r}; expected only prompts of "
                              f"{video_world.PROMPTS_FILE} (exactly as written there): {list(video_world.WORLD_PROMPTS)}")
    if cfg.eval_every:  # the held-out prompts, read now so that a missing or empty file fails before any work
        if not cfg.eval_prompts and not cfg.world:
            raise ConfigError("--eval_every needs --eval_prompts: a file of held-out prompts (formats as --prompts)")
        cfg = dataclasses.replace(cfg, eval_prompts=cfg.eval_prompts or video_world.PROMPTS_FILE)
        unknown = [p for p in load_prompts(cfg.eval_prompts) if cfg.world and p not in video_world.WORLD_PROMPTS]
        if unknown:
            raise ConfigError(f"--world: --eval_prompts {cfg.eval_prompts!r} holds a prompt the world's reward does not "
                              f"know, {unknown[0]!r}; expected only prompts of {video_world.PROMPTS_FILE}")
    check_output_dir(cfg)
    if cfg.resume and distributed.latest_checkpoint(cfg.output_dir):
        check_resume_config(cfg, distributed.latest_checkpoint(cfg.output_dir), world_size)
    return cfg, prompts


def check_output_dir(cfg):
    """output_dir must be writable; a directory that holds a run needs --resume or --overwrite; --resume
    needs a complete checkpoint."""
    try:
        os.makedirs(cfg.output_dir, exist_ok=True)
        probe = os.path.join(cfg.output_dir, f".write_test_{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as error:
        raise ConfigError(f"--output_dir {cfg.output_dir!r} is not writable ({error.strerror or error})") from None
    previous = [os.path.basename(path) for _, path in distributed.checkpoints(cfg.output_dir)]
    previous += [name for name in ("metrics.jsonl",) if os.path.isfile(os.path.join(cfg.output_dir, name))]
    if cfg.resume and cfg.overwrite:
        raise ConfigError("--resume continues the run in output_dir and --overwrite deletes it: give one of them")
    if previous and not (cfg.resume or cfg.overwrite or cfg.self_check):
        raise ConfigError(f"--output_dir {cfg.output_dir!r} already holds a run ({', '.join(previous[-3:])}): add "
                          f"--resume to continue it, --overwrite to delete it and start afresh, or choose another "
                          f"--output_dir")
    if cfg.resume and distributed.latest_checkpoint(cfg.output_dir) is None:
        raise ConfigError(f"--resume: no complete checkpoint (checkpoint-NNNNNN/ with its {distributed.MANIFEST}) "
                          f"in {cfg.output_dir!r}")


# The smallest std a stochastic step may have. The log-prob is built on (x′ − μ)/std, and x′, μ are fp32 latents of
# order 1, rounded to ~6e-8: at std ≥ 1e-4 that quotient is exact to ~1e-3. Below it the log-probs are round-off (at
# --eta 1e-6 the tiny model's gradient norm reaches 4.6e4) and at --eta 1e-30 std² underflows to 0 (ours).
MIN_STEP_STD = 1e-4


def check_schedule(cfg):
    """Flag errors that need the resolved shift (so they come after resolve_sampling, before any model is loaded):
    sage's first step too short for its σ clamp (too many --num_steps), and a --eta so small that some step's std
    is below MIN_STEP_STD (float64, so that the check itself does not underflow)."""
    sigmas = sde.shifted_sigmas(cfg.num_steps, cfg.shift).double()
    try:
        std = sde.step_std(cfg.kernel, sigmas[:-1], sigmas[1:], cfg.eta)  # (N,)
    except ValueError as error:
        raise ConfigError(f"--num_steps {cfg.num_steps} with --kernel {cfg.kernel} at shift {cfg.shift:g}: {error}") from None
    if cfg.kernel == "cps":  # its last step (σ′ = 0) is deterministic by construction, at any η
        std = std[:-1]
    if not len(std):
        return  # no stochastic step at all: equalizer.step_weights says so
    low = std.min().item()
    if not low >= MIN_STEP_STD:
        k = int(torch.nonzero(std == low)[0])
        raise ConfigError(f"--eta {cfg.eta:g} gives step {k} (σ {sigmas[k]:.3g} -> {sigmas[k + 1]:.3g}) a std of "
                          f"{low:.2g}, below {MIN_STEP_STD:g}: its log-probs would be fp32 round-off; expected --eta >= "
                          f"{cfg.eta * MIN_STEP_STD / low:.3g} for --kernel {cfg.kernel}, {cfg.num_steps} steps, shift "
                          f"{cfg.shift:g}" if low > 0 else f"--eta {cfg.eta:g}: every step's std underflows to 0")


def default_videos_per_rank(group_size, dp_size):
    """The fewest videos per rank, at least 2, whose total over `dp_size` data-parallel ranks is a multiple of
    the group size: (4, 8) -> 2 (the official layout), (4, 1) -> 4, (8, 2) -> 4, (4, 3) -> 4."""
    return next(v for v in range(2, 2 * group_size + 1) if (v * dp_size) % group_size == 0)


def check_sde_window(cfg):
    """--sde_window K: at most --num_steps; a fixed window inside the schedule; every window the run can place holds a
    stochastic step (cps's last step is deterministic: a window of only that step would train nothing)."""
    if not cfg.sde_window:
        return
    if cfg.sde_window > cfg.num_steps:
        raise ConfigError(f"--sde_window {cfg.sde_window} is more than the {cfg.num_steps} steps (--num_steps): expected "
                          f"1 … {cfg.num_steps}, or 0 for every step")
    last = cfg.num_steps - cfg.sde_window
    if cfg.sde_window_placement == "fixed" and cfg.sde_window_start > last:
        raise ConfigError(f"--sde_window_start {cfg.sde_window_start} puts a window of {cfg.sde_window} steps past step "
                          f"{cfg.num_steps - 1} (--num_steps {cfg.num_steps}): expected a start of 0 … {last}")
    starts = [cfg.sde_window_start] if cfg.sde_window_placement == "fixed" else range(last + 1)
    sigmas = sde.shifted_sigmas(cfg.num_steps, cfg.shift or 1.0)  # which steps are deterministic does not depend on it
    stochastic = sde.step_std(cfg.kernel, sigmas[:-1], sigmas[1:], cfg.eta) > 0
    empty = [s for s in starts if not stochastic[s:s + cfg.sde_window].any()]
    if empty:
        raise ConfigError(f"--sde_window {cfg.sde_window} ({cfg.sde_window_placement}) can lie on steps {empty[0]} … "
                          f"{empty[0] + cfg.sde_window - 1}, where --kernel {cfg.kernel} is deterministic: nothing to "
                          f"train; expected a larger window")


def resolve_sampling(cfg, model_path):
    """Fill in shift and cfg_scale from the checkpoint (model.sampling_defaults) where the user gave none.
    Returns (cfg, {"shift": where it came from, "cfg_scale": ...}) for the run's log."""
    shift, guidance_scale = model.sampling_defaults(model_path)
    sources = {name: "--" + name if getattr(cfg, name) is not None else "the checkpoint's "
               + ("scheduler" if name == "shift" else "guider") + " config" for name in ("shift", "cfg_scale")}
    cfg = dataclasses.replace(cfg, shift=shift if cfg.shift is None else cfg.shift,
                              cfg_scale=guidance_scale if cfg.cfg_scale is None else cfg.cfg_scale)
    return cfg, sources


# Flags that may change between a run and its resumption without breaking "continues exactly".
RESUMABLE_CHANGES = {"resume", "allow_config_change", "max_iterations", "checkpoint_every", "keep_checkpoints",
                     "sample_every", "output_dir", "model_path", "reward_path", "prompts", "text_encoder_offload",
                     "prompt_cache", "anchor_offload", "overwrite", "checkpoint_every_minutes", "max_failed_iterations",
                     "collective_timeout_minutes", "report_to"}


def check_resume_config(cfg, checkpoint, world_size):
    """A resumed run must use the checkpoint's settings: list every flag that differs (unless
    --allow_config_change), and a world size that differs (it changes the batch). Always refused: a
    --max_iterations below the checkpoint's iteration, and LoRA against a full checkpoint or the reverse.
    A setting left to the checkpoint (None: shift, cfg_scale) is the checkpoint's by definition. An
    unreadable state file is left to the verification at load time, which names it."""
    try:
        with open(os.path.join(checkpoint, "trainer_state.json")) as f:
            state = json.load(f)
        saved = state.get("config", {})
    except (OSError, ValueError):
        return
    if cfg.max_iterations < state.get("iteration", 0):
        raise ConfigError(f"--resume from {checkpoint!r}, which is at iteration {state['iteration']}, with --max_iterations "
                          f"{cfg.max_iterations}: nothing to do; expected --max_iterations >= {state['iteration']}")
    lora_checkpoint = os.path.isdir(os.path.join(checkpoint, "policy"))  # the sharded adapters exist only with LoRA
    if (cfg.lora_rank > 0) != lora_checkpoint:
        raise ConfigError(
            f"--resume from {checkpoint!r} with --lora_rank {cfg.lora_rank}: the checkpoint was written by a "
            + ("LoRA run (its policy/ holds the adapters); resume it with its --lora_rank "
               f"{saved.get('lora_rank', '(see its trainer_state.json)')}" if lora_checkpoint else
               "full fine-tune (no policy/ adapters); resume it without --lora_rank")
            + ", or start a new run in another --output_dir")
    if "world_size" in state and state["world_size"] != world_size and not cfg.allow_config_change:
        raise ConfigError(f"--resume from {checkpoint!r} on {world_size} rank(s): it was written by {state['world_size']}, "
                          f"and each rank makes --videos_per_rank {cfg.videos_per_rank} videos, so the batch would change "
                          f"from {state['world_size'] // cfg.sp_size * cfg.videos_per_rank} to "
                          f"{world_size // cfg.sp_size * cfg.videos_per_rank} videos per iteration; use "
                          f"{state['world_size']} ranks, or add --allow_config_change to continue anyway")
    if cfg.allow_config_change:
        return
    changed = {k: (saved[k], v) for k, v in dataclasses.asdict(cfg).items()
               if k in saved and k not in RESUMABLE_CHANGES and v is not None and saved[k] != v}
    if changed:
        listing = ", ".join(f"--{k} {new!r} (checkpoint: {old!r})" for k, (old, new) in sorted(changed.items()))
        raise ConfigError(f"--resume from {checkpoint!r} with different settings: {listing}; "
                         "use the checkpoint's flags, or add --allow_config_change to continue anyway")


def prepare_output_dir(cfg, rank, closing):
    """Make output_dir ready (rank 0 works, every rank gets the result): first the directory's lock (one
    writer at a time; `closing` holds it until the run ends), then stale .tmp directories removed; with
    --overwrite the previous run's files deleted; with --resume the newest checkpoint that verifies chosen
    (each newer one that does not is named, with the reason) and metrics.jsonl cut back to its iteration,
    so that no row is repeated (a torn last line, from a crash mid-write, is dropped). Returns the
    checkpoint to resume from, or None."""
    chosen = [None]
    if rank == 0:
        try:
            closing.enter_context(distributed.lock_run_directory(cfg.output_dir))
            distributed.remove_stale_tmp(cfg.output_dir)
            if cfg.overwrite:
                for _, path in distributed.checkpoints(cfg.output_dir):
                    shutil.rmtree(path)
                for name in ("metrics.jsonl", "curves.png", tracking.WANDB_RUN_ID):  # a new W&B run, too
                    if os.path.isfile(os.path.join(cfg.output_dir, name)):
                        os.remove(os.path.join(cfg.output_dir, name))
                for name in ("samples", tracking.TENSORBOARD_DIR):
                    shutil.rmtree(os.path.join(cfg.output_dir, name), ignore_errors=True)
            if cfg.resume:
                chosen[0] = distributed.find_resumable(cfg.output_dir, log=lambda line: print(line, flush=True))
                if chosen[0] != distributed.latest_checkpoint(cfg.output_dir):
                    check_resume_config(cfg, chosen[0], dist.get_world_size())
                with open(os.path.join(chosen[0], "trainer_state.json")) as f:
                    torn = truncate_metrics(os.path.join(cfg.output_dir, "metrics.jsonl"), json.load(f)["iteration"])
                if torn:
                    print(f"resume: metrics.jsonl: dropped {torn} unreadable line(s) (a row torn by the crash)", flush=True)
        except (distributed.CheckpointError, distributed.DirectoryLocked, ValueError) as error:
            chosen[0] = error
    dist.broadcast_object_list(chosen, src=0)
    if isinstance(chosen[0], Exception):
        raise RunError(str(chosen[0]))
    return chosen[0]


def read_metrics(path):
    """(rows of metrics.jsonl as dicts, number of unreadable lines). An appended file may end in a line torn by a
    crash (or hold one written by hand): such a line is counted, never an error."""
    rows, torn = [], 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                row = None
            if isinstance(row, dict) and isinstance(row.get("iteration"), int):
                rows.append(row)
            else:
                torn += 1
    return rows, torn


def truncate_metrics(path, iteration):
    """Keep the rows of metrics.jsonl up to `iteration` (a resumed run logs the later ones again) and drop
    unreadable (torn) lines; atomic. Returns the number of lines dropped as unreadable."""
    if not os.path.isfile(path):
        return 0
    rows, torn = read_metrics(path)
    with open(path + ".tmp", "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows if row["iteration"] <= iteration)
    os.replace(path + ".tmp", path)
    return torn


@contextlib.contextmanager
def sigterm_flag():
    """A one-element list that SIGTERM sets to True (torchrun forwards it to every rank; cluster schedulers
    send it before a kill): the loop then checkpoints and returns. The previous handler is restored."""
    flag = [False]
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: flag.__setitem__(0, True))
    try:
        yield flag
    finally:
        signal.signal(signal.SIGTERM, previous)


def print_summary(cfg):
    """Rank 0, at the end of a run: where everything went and how the reward moved."""
    rows, _ = read_metrics(os.path.join(cfg.output_dir, "metrics.jsonl"))
    if not rows:  # resumed at --max_iterations: nothing trained now, nothing logged
        print(f"\ndone: nothing to train (--max_iterations {cfg.max_iterations} reached); checkpoint "
              f"{distributed.latest_checkpoint(cfg.output_dir)}", flush=True)
        return
    first, last = rows[0], rows[-1]
    print(f"\ndone: {last['iteration']} iterations, {last['update_step']} updates "
          f"({last['skipped_updates_total']} skipped); reward_mean {first['reward_mean']:.4f} (iteration "
          f"{first['iteration']}) -> {last['reward_mean']:.4f} (iteration {last['iteration']})\n"
          f"  checkpoint  {distributed.latest_checkpoint(cfg.output_dir)}\n"
          f"  metrics     {os.path.join(cfg.output_dir, 'metrics.jsonl')}\n"
          f"  curves      {os.path.join(cfg.output_dir, 'curves.png')}", flush=True)


def load_prompts(path):
    """Prompts from .txt (one per line), .csv (column `prompt`) or .jsonl ({"prompt": ...}); every error
    names the file and, where there is one, the line."""
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), path)
    if not os.path.exists(path) and os.path.isfile(here):
        path = here  # the default, from any directory
    if os.path.isdir(path):
        raise ValueError(f"prompt file {path!r} is a directory: expected a .txt, .csv or .jsonl file")
    if not os.path.isfile(path):
        raise ValueError(f"prompt file {path!r} does not exist")
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".txt", ".csv", ".jsonl"):
        raise ValueError(f"prompt file {path!r}: expected a .txt, .csv or .jsonl file, found {ext or 'no extension'!r}")
    try:
        with open(path, encoding="utf-8-sig") as f:  # -sig: a byte-order mark (Windows editors) is not text
            text = f.read()
    except UnicodeDecodeError as error:
        line = open(path, "rb").read()[:error.start].count(b"\n") + 1
        raise ValueError(f"prompt file {path!r} line {line}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    if ext == ".txt":
        prompts = [line.strip() for line in text.splitlines()]
    elif ext == ".csv":
        reader = csv.DictReader(text.splitlines())
        if "prompt" not in (reader.fieldnames or []):
            raise ValueError(f"prompt file {path!r}: expected a CSV column 'prompt', found columns {reader.fieldnames}")
        prompts = [(row["prompt"] or "").strip() for row in reader]
    else:
        prompts = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as error:
                raise ValueError(f"prompt file {path!r} line {number}: not JSON ({error})") from None
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                raise ValueError(f"prompt file {path!r} line {number}: expected an object with a string 'prompt', "
                                 f"found {line.strip()[:80]!r}")
            prompts.append(record["prompt"].strip())
    prompts = [p for p in prompts if p]
    if not prompts:
        raise ValueError(f"prompt file {path!r} contains no prompts")
    return prompts


class PromptSampler:
    """Prompt indices per iteration, identical on every rank; a fresh permutation every epoch.

    Each iteration takes `per_iteration` prompts (the global number of groups); an epoch is one
    pass over the file; the order of epoch e is randperm(seed + e), so (epoch, position) is the
    whole state and resuming continues the same sequence.
    """

    def __init__(self, num_prompts, per_iteration, seed):
        self.num_prompts, self.per_iteration, self.seed = num_prompts, per_iteration, seed
        self.epoch, self.position = 0, 0

    def _order(self):
        return torch.randperm(self.num_prompts, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()

    def next_indices(self):
        indices, order = [], self._order()
        while len(indices) < self.per_iteration:
            indices.append(order[self.position])
            self.position += 1
            if self.position == self.num_prompts:  # next epoch, next permutation
                self.epoch, self.position = self.epoch + 1, 0
                order = self._order()
        return indices

    def state_dict(self):
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state):
        """A position at or past the end of a prompt file that shrank since the state was saved ends that
        epoch: the next permutation starts (train.resume_notes says so)."""
        self.epoch, self.position = state["epoch"], state["position"]
        if self.position >= self.num_prompts:
            self.epoch, self.position = self.epoch + 1, 0


# ------------------------------------------------------------------------------------------------
# Logging: metrics.jsonl, the progress bar, sample videos, curves.png, phase timing.

def log_metrics(cfg, metrics, bar, tracker):
    """Rank 0: append one row to output_dir/metrics.jsonl, send it to the tracker, update the progress bar."""
    with open(os.path.join(cfg.output_dir, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(metrics) + "\n")
    tracker.log(metrics, step=metrics["iteration"])
    shown = {"reward": f"{metrics['reward_mean']:.3f}", "skip": metrics["skipped_updates_total"]}
    if cfg.updates_per_rollout > 1:  # with one update per rollout ρ = 1: approx_kl and clip are 0 by construction
        shown.update(kl=f"{metrics['approx_kl']:.1e}", clip=f"{metrics['clip_fraction']:.2f}")
    bar.set_postfix(shown)


def save_sample(cfg, iteration, frames, latents, prompts, tracker):
    """Rank 0: the first video of this rank's batch under output_dir/samples/: decoded frames as a video,
    or, for a reward of latents (the world, whose random tiny VAE decodes to noise), a PNG of the latents;
    also sent to the tracker, with its prompt. Returns the path written."""
    path = os.path.join(cfg.output_dir, "samples", f"iter{iteration:06d}")
    if frames is not None:
        path = save_video(frames[0], path)  # (F, 3, H, W) in [0, 1]
    else:
        from world import video_world
        os.makedirs(os.path.dirname(path), exist_ok=True)
        path += ".png"
        video_world.render_latents(latents[:1].cpu(), path, prompts=prompts[:1])
    tracker.log_video(path, step=iteration, caption=prompts[0])
    return path


# The panels of curves.png: (title, metrics.jsonl keys drawn in it).
# "reward" also draws the reward's own components, named in each row (VideoAlign: vq, mq, ta).
CURVE_PANELS = (("reward", ("reward_mean",)), ("KL terms", ("kl_anchor", "kl_step", "approx_kl")),
                ("trust region: ‖∂βKL/∂μ‖ / ‖∂policy/∂μ‖", ("trust_region_activity",)), ("β", ("beta",)),
                ("clip fraction", ("clip_fraction",)), ("gradient norm", ("grad_norm",)),
                ("groups with equal rewards", ("zero_std_ratio",)),
                ("seconds per phase", ("time_rollout", "time_reward", "time_update")),
                ("world: off-manifold distance of the rollouts", ("off_manifold",)),
                ("held-out eval (ODE, fixed seeds; --eval_every)", ("eval/reward", "eval/on_manifold_reward",
                                                                    "eval/off_manifold")))


def plot_metrics(metrics_path, png_path):
    """metrics.jsonl -> a PNG of the curves practitioners watch, one panel each, written atomically.
    Returns what was drawn, read back from the figure: {(panel title, metric): (iterations, values)}."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows, _ = read_metrics(metrics_path)
    rows = list({r["iteration"]: r for r in rows}.values())  # a resumed run may have logged an iteration twice
    figure, axes = plt.subplots(4, 3, figsize=(13, 13))
    components = tuple(rows[-1].get("reward_components", ())) if rows else ()
    for axis, (title, keys) in zip(axes.flat, CURVE_PANELS):
        for key in keys + (components if title == "reward" else ()):
            # an eval/ number is of the policy as it entered its row's iteration: drawn at the iterations done
            points = [(r.get("eval/after_iterations", r["iteration"]) if key.startswith("eval/") else r["iteration"],
                       r[key]) for r in rows if isinstance(r.get(key), (int, float))]
            if points:
                axis.plot(*zip(*points), marker="." if len(points) < 30 else None, label=key)
        axis.set_title(title, fontsize=9)
        axis.set_xlabel("iteration")
        if axis.get_lines():
            axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(png_path + ".tmp.png", dpi=80)
    drawn = {(axis.get_title(), line.get_label()): (list(line.get_xdata()), list(line.get_ydata()))
             for axis in axes.flat for line in axis.get_lines()}
    plt.close(figure)
    os.replace(png_path + ".tmp.png", png_path)
    return drawn


def save_video(frames, path):
    """frames: (F, 3, H, W) float in [0, 1] -> path.mp4 (H.264, reward.encode_mp4: the same writer as the reward's
    mp4 input), or, for an odd frame size that yuv420p cannot hold, path.png (a grid of the frames). Returns the
    path written."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    _, _, height, width = frames.shape
    if height % 2 == 0 and width % 2 == 0:
        with open(path + ".mp4", "wb") as f:
            f.write(reward.encode_mp4(frames.cpu(), fps=SAMPLE_FPS))
        return path + ".mp4"
    from PIL import Image
    pixels = (frames.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()  # (F, H, W, 3)
    f, h, w, _ = pixels.shape
    cols = min(f, 8)
    rows = math.ceil(f / cols)
    grid = torch.zeros(rows * h, cols * w, 3, dtype=torch.uint8)
    for i in range(f):
        grid[(i // cols) * h:(i // cols + 1) * h, (i % cols) * w:(i % cols + 1) * w] = pixels[i]
    Image.fromarray(grid.numpy()).save(path + ".png")
    return path + ".png"


SAMPLE_FPS = 24  # HunyuanVideo-1.5's frame rate


def peak_memory_gb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux


class ForwardCount:
    """Transformer forwards of one iteration per video, counted by forward pre-hooks on the policy and the anchor:
    the hardware-independent cost (docs/cost_options.md). One video through the transformer is one forward, so a
    CFG pair (a batch of 2B) counts 2 per video. rollout: the policy without gradients; update: the policy's
    recomputes with gradients; anchor: the anchor's forwards (once per trained step and rollout, again after an
    anchor refresh); eval: --eval_every's samples (per training video, not part of the training cost).
    forward_equivalents adds the backward passes at the usual 2 forwards each, and 1 more with
    gradient checkpointing (each block's forward is recomputed in the backward)."""

    PHASES = ("rollout", "update", "anchor", "eval")

    def __init__(self, policy, anchor, videos, gradient_checkpointing):
        self.videos, self.backward = videos, 2 + int(bool(gradient_checkpointing))
        self.counts = dict.fromkeys(self.PHASES, 0)
        self.evaluating = False  # held_out_eval's forwards: counted apart, not a training cost
        policy.register_forward_pre_hook(self._hook(False), with_kwargs=True)
        if anchor is not None:
            anchor.register_forward_pre_hook(self._hook(True), with_kwargs=True)

    def _hook(self, is_anchor):
        def count(module, args, kwargs):
            phase = ("anchor" if is_anchor else "eval" if self.evaluating else
                     "update" if torch.is_grad_enabled() else "rollout")
            self.counts[phase] += kwargs["hidden_states"].shape[0]
        return count

    def take(self):
        """{forwards_<phase>: per video, forward_equivalents: per video} of the iteration so far; restarts the count."""
        per_video = {f"forwards_{phase}": n / self.videos for phase, n in self.counts.items()}
        self.counts = dict.fromkeys(self.PHASES, 0)
        if not per_video["forwards_eval"]:
            del per_video["forwards_eval"]  # only in the rows of iterations that evaluated
        per_video["forward_equivalents"] = (per_video["forwards_rollout"] + per_video["forwards_anchor"]
                                            + (1 + self.backward) * per_video["forwards_update"])
        return per_video


class PhaseTimer:
    """Wall time per phase (synchronising CUDA so that time is not attributed to the wrong phase)."""

    def __init__(self, device):
        self.device, self.times, self.start = device, {}, None

    def __call__(self, name):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        if self.start is not None:
            self.times[f"time_{self.start[0]}"] = now - self.start[1]
        self.start = (name, now) if name else None


def quiet_libraries():
    """diffusers' and transformers' info and warnings (loading reports, "Guiders are an experimental feature", the
    float32-modules note) and their progress bars off: the run's own lines stay readable; --verbose keeps them."""
    import diffusers
    import huggingface_hub
    import transformers
    for library in (diffusers, transformers):
        library.utils.logging.set_verbosity_error()
        library.utils.logging.disable_progress_bar()
    huggingface_hub.utils.disable_progress_bars()


def report_error(message):
    """Print a one-line error on rank 0 only. Under torchrun also write it to the rank's error file
    (TORCHELASTIC_ERROR_FILE), so that torchrun's failure summary, which it prints after its own traceback
    whenever a rank exits non-zero (nothing a rank can prevent), names the cause instead of a link."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(message, file=sys.stderr, flush=True)
    if os.environ.get("TORCHELASTIC_ERROR_FILE"):
        with contextlib.suppress(OSError), open(os.environ["TORCHELASTIC_ERROR_FILE"], "w") as f:
            json.dump({"message": message, "timestamp": int(time.time())}, f)


if __name__ == "__main__":
    if "--plan" in sys.argv[1:]:  # the memory/time planner (plan.py): meta-device models, no weights, no GPU
        import plan
        sys.exit(plan.main([arg for arg in sys.argv[1:] if arg != "--plan"]))
    try:
        result = main(parse_config(extra=[("--plan", PLAN_HELP)], usage=USAGE))
        status = result if "--self_check" in sys.argv[1:] else 0  # self-check: 1 if a check FAILed
    except (ConfigError, RunError) as error:  # our own message: once (rank 0), without a traceback
        report_error(f"train.py: error: {error}")
        status = 2 if isinstance(error, ConfigError) else 1
    distributed.exit_process(status)  # not sys.exit: the gloo group must not be torn down by the interpreter
