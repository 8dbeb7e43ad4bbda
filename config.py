"""The trainer's configuration: every flag, its default and where the default comes from, and every check
of the flags, made before any model is loaded.

`Config` is one flat dataclass (cleanrl's `Args`): one field per flag, its docstring is the flag's `--help`,
and the `# --- title` comments above the fields are `--help`'s groups. `parse_config` turns it into argparse
flags (booleans get --x / --no-x). Defaults follow the official recipe (Tencent-Hunyuan/SAGE-GRPO
post_train.py and its launch scripts); each field names its source, and where we differ on purpose the
README's official-recipe page says why.

Checks, in two phases, so that a wrong flag costs seconds, not a model load:

* `check_flags(cfg, world_size)`: the flags alone (ranges, choices, sizes, the batch layout). This file
  imports neither torch nor diffusers at module level, so `python train.py --help` and a flag error answer
  before any of them is imported (the maths modules' constants are read from their source, `module_constant`).
* `check_inputs(cfg, world_size)`: what the flags point to (model and reward directories, the prompt files,
  the output directory and the checkpoint a `--resume` continues, the schedule at the resolved shift).

`check_config` runs both and returns (cfg with its defaults resolved, prompts). The default video size is the
checkpoint family's, resolved in `check_inputs` (`default_video_size`): HunyuanVideo-1.5 81×352×624 (the official
480p bucket, model.py), Wan2.1 81×480×832 (480p, wan.py), each tiny family's own with --tiny (tiny.py), the
world's with --world. One source each; the sizes given are checked against the rule both families share in
`check_flags`.
Every error is a `ConfigError` whose message says what was expected and what was found.
"""
import argparse
import contextlib
import ast
import csv
import dataclasses
import inspect
import json
import math
import os
import sys
import time
import typing
from dataclasses import dataclass

REPO = os.path.dirname(os.path.abspath(__file__))


def module_constant(module, name):
    """The value of `name = <literal>` at the top level of a maths module (sde.py, grpo.py, trust_region.py,
    equalizer.py, optimizer.py, tracking.py), read from its source: the constant keeps one home, and the flags can
    be parsed and checked without importing torch. A name that is not a literal there is an error, not a guess."""
    path = os.path.join(REPO, module + ".py")
    for node in ast.parse(open(path, encoding="utf-8").read()).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise LookupError(f"{module}.py has no top-level literal {name}")



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
    """random tiny models (tiny.py: the policy, VideoAlign), CPU, gloo: the pipeline without weights; an empty
    --model_path / --reward_path is built once under output_dir"""
    tiny_family: str = "hunyuan"
    """--tiny with an empty --model_path: the tiny policy family built, hunyuan | wan"""
    num_frames: typing.Optional[int] = None
    """video frames, 4k+1; default: the family's (HunyuanVideo-1.5 81, Wan2.1 81; tiny: 5, 9)"""
    height: typing.Optional[int] = None
    """video height in pixels, multiple of 16; default: the family's (HunyuanVideo-1.5 352, Wan2.1 480; tiny: 16, 32)"""
    width: typing.Optional[int] = None
    """video width in pixels, multiple of 16; default: the family's (HunyuanVideo-1.5 624, Wan2.1 832; tiny: 16, 32)"""
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
    sde_window_placement: str = "static"
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
    clip_range: float = module_constant("grpo", "CLIP_RANGE")
    """PPO clip ε on the per-step ratio (official clip_range 1e-4)"""
    adv_clip: float = module_constant("grpo", "ADVANTAGE_CLIP")
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
    anchor_period: int = module_constant("trust_region", "ANCHOR_PERIOD")
    """optimizer updates between hard copies policy -> anchor (official update_ref_model_step 10)"""
    kl_anchor_weight: float = module_constant("trust_region", "ANCHOR_WEIGHT")
    """weight of KL(π_θ‖π_anchor) in L_KL (official dual_kl_moving_weight 1.0)"""
    kl_step_weight: float = module_constant("trust_region", "STEP_WEIGHT")
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
    then beta_end from optimizer update beta_switch_step) | constant (beta_start throughout); trust_region.py, one object
    per schedule"""
    beta_start: float = module_constant("trust_region", "BETA_START")
    """smallest / first β (official kl_coef = kl_min_coef 1e-7)"""
    beta_end: float = module_constant("trust_region", "BETA_END")
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
    beta_window: int = module_constant("trust_region", "ANCHOR_PERIOD")
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
    instead of sharding it (no all-gather per forward). Our choice for the video world, whose prompts quote no text
    (docs/world.md)"""
    ema_decay: float = 0.0
    """d in (0, 1): keep θ_ema <- d·θ_ema + (1 − d)·θ after every update, in each checkpoint (ema/ for --resume,
    ema_transformer/ in diffusers format, which eval.py evaluates beside transformer/); 0: none (official).
    FlowGRPO's ema; docs/cost_options.md """
    # --- parallelism and memory
    sp_size: int = 1
    """sequence parallelism: this many consecutive ranks hold the same videos and split each one's tokens (Ulysses,
    parallel.py); must divide the world size and the attention heads (16 HunyuanVideo-1.5, 12 Wan2.1-1.3B; official
    sp_size 2 on 64 GPUs)"""
    gradient_checkpointing: typing.Optional[bool] = None
    """recompute block activations in backward (official enable_gradient_checkpointing). Default: on with CUDA
    (the 8.3B model's activations do not fit otherwise), off on CPU (--tiny, --world: small activations, and one
    transformer forward fewer per trained step); --gradient_checkpointing / --no-gradient_checkpointing force it"""
    anchor_offload: bool = False
    """keep the anchor's shards on CPU (FSDP2 CPUOffloadPolicy; official reference_mode_offload)"""
    text_encoder_offload: bool = False
    """keep the text encoders (Qwen2.5-VL-7B: 15 GB bf16) on CPU, on the GPU only while encoding prompts; our choice"""
    prompt_cache: int = 512
    """prompts whose embeddings are kept (on the CPU, real tokens only; their size: docs/scaling.md)
    and reused when they come back in a later iteration (model.PromptCache); our choice: the text encoders are
    frozen, so a prompt is encoded once per run instead of once per iteration"""
    vae_tiling: typing.Optional[bool] = None
    """decode the rollouts in overlapping 256-pixel tiles (model.set_vae_tiling; diffusers' tile defaults, as its
    HunyuanVideo-1.5 example): far less decoder memory at 81x352x624, frames differ slightly at the tile seams
    (measured in docs/measurements.md). Default: on with CUDA, off on CPU, where videos are smaller than a tile anyway;
    --no-vae_tiling / --vae_tiling force it. Checkpoints store the value used"""
    vae_precision: str = "model"
    """the rollouts' VAE decode: "model" in the VAE's dtype (the pipeline's: bf16 on GPU; float32 for Wan), "fp16"
    under autocast to float16 as the official trainer (model.vae_autocast); the frames the reward scores differ by
    round-off"""
    # --- logging and tracking
    sample_every: int = 50
    """iterations between saved sample videos (official validation_interval 50); 0 = never"""
    eval_every: int = 0
    """N > 0: before training, after every N-th iteration and after the last, the policy's ODE samples of
    --eval_prompts from fixed seeds, scored by every loaded reward (one of weight 0 too: a hacking monitor), logged
    as eval/<name> in the row of the iterations done (iteration 0: the pretrained policy) of metrics.jsonl,
    curves.png and the tracker; 0: none (official). docs/cost_options.md"""
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


def parse_flags_or_exit(argv, description):
    """train.py's command line, read before torch or a model library is imported: --help prints the flags (and
    --plan, which train.py hands to plan.py before this); a flag error prints one line (rank 0 under torchrun) and
    exits with 2. Returns the Config with the flag checks passed (check_flags); check_inputs follows in train.main."""
    cfg = parse_config(argv, description=description, extra=[("--plan", PLAN_HELP)], usage=USAGE)
    try:
        return check_flags(cfg, int(os.environ.get("WORLD_SIZE", 1)))
    except ConfigError as error:
        report_error(f"train.py: error: {error}")
        sys.exit(2)


def report_error(message):
    """Print a one-line error on rank 0 only. Under torchrun also write it to the rank's error file
    (TORCHELASTIC_ERROR_FILE), so that torchrun's failure summary, which it prints after its own traceback
    whenever a rank exits non-zero (nothing a rank can prevent), names the cause instead of a link."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(message, file=sys.stderr, flush=True)
    if os.environ.get("TORCHELASTIC_ERROR_FILE"):
        with contextlib.suppress(OSError), open(os.environ["TORCHELASTIC_ERROR_FILE"], "w") as f:
            json.dump({"message": message, "timestamp": int(time.time())}, f)


def check_config(cfg, world_size):
    """Both phases of the checks (module docstring), before any model is loaded or a process group started.
    Returns (cfg with the video size, the batch layout and the prompt files filled in, prompts)."""
    return check_inputs(check_flags(cfg, world_size), world_size)


DEFAULT_PROMPTS = "prompts/example.txt"
"""--prompts when none is given (--world: the world's own file)"""

# Numeric flags and the range each must lie in (every float flag must also be finite).
POSITIVE = ("lr", "clip_range", "adv_clip", "eta", "grad_clip", "shift", "cfg_scale", "collective_timeout_minutes")
NON_NEGATIVE = ("weight_decay", "beta_start", "beta_end", "kl_anchor_weight", "kl_step_weight", "kl_target", "beta_init",
                "beta_min", "beta_max", "sde_window", "sde_window_start", "ema_decay", "eval_every",
                "checkpoint_every_minutes")
AT_LEAST_ONE = ("num_steps", "updates_per_rollout", "anchor_period", "beta_window", "sde_window_shift_every",
                "eval_videos_per_prompt", "checkpoint_every", "keep_checkpoints", "max_iterations")
SDE_WINDOW_PLACEMENTS = ("static", "random", "moving")
TINY_FAMILIES = ("hunyuan", "wan")  # the policy families tiny.py builds (tiny.tiny_model_paths' names)


def choices():
    """{flag: its allowed values}, each from the module that implements them."""
    return {"kernel": module_constant("sde", "STOCHASTIC_KERNELS"), "kl_mode": module_constant("trust_region", "KL_MODES"),
            "beta_schedule": module_constant("trust_region", "BETA_SCHEDULES"),
            "optimizer": module_constant("optimizer", "OPTIMIZERS"),
            "kl_step_estimator": module_constant("trust_region", "STEP_ESTIMATORS"),
            "equalizer_median": module_constant("equalizer", "MEDIANS"), "sde_window_placement": SDE_WINDOW_PLACEMENTS,
            "reward_input": ("frames", "mp4"), "report_to": module_constant("tracking", "TRACKERS"),
            "reward_normalization": ("per_reward", "total"), "tiny_family": TINY_FAMILIES,
            "vae_precision": module_constant("model", "VAE_PRECISIONS")}


def check_flags(cfg, world_size):
    """Phase 1: the flags alone, no import of torch or a model library. Returns cfg with --videos_per_rank and the
    video size of a non-world run filled in."""
    for field in dataclasses.fields(cfg):
        value = getattr(cfg, field.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"--{field.name} must be a finite number, got {value}")
        if value is not None and ((field.name in POSITIVE and not value > 0) or (field.name in NON_NEGATIVE and value < 0)):
            raise ConfigError(f"--{field.name} must be {'> 0' if field.name in POSITIVE else '>= 0'}, got {value}")
    if isinstance(cfg.reward, str):  # Config(reward="videoalign") from Python, as a one-item list
        cfg = dataclasses.replace(cfg, reward=[cfg.reward])
    if cfg.world and cfg.tiny:
        raise ConfigError("--world and --tiny are two different small worlds: give one of them")
    if cfg.kernel == "ode":
        raise ConfigError(f"unknown kernel 'ode' for training: expected one of {list(choices()['kernel'])} (ode has no "
                          "noise, hence nothing to explore)")
    for name, allowed in choices().items():
        if getattr(cfg, name) not in allowed:
            what = {"kernel": "kernel", "kl_mode": "KL mode"}.get(name, f"--{name}")
            raise ConfigError(f"unknown {what} {getattr(cfg, name)!r}: expected one of {list(allowed)}")
    if cfg.beta_schedule == "official" and not 0 < cfg.beta_start <= cfg.beta_end:
        raise ConfigError(f"--beta_schedule official needs 0 < beta_start <= beta_end, got {cfg.beta_start} and "
                          f"{cfg.beta_end}")
    if cfg.beta_schedule == "adaptive" and not (0 < cfg.beta_min <= cfg.beta_init <= cfg.beta_max and cfg.kl_target > 0):
        raise ConfigError(f"--beta_schedule adaptive needs 0 < beta_min <= beta_init <= beta_max and kl_target > 0, got "
                          f"{cfg.beta_min}, {cfg.beta_init}, {cfg.beta_max} and {cfg.kl_target}")
    check_flags_have_effect(cfg)
    if cfg.reward_input == "mp4" and ((cfg.height or 0) % 2 or (cfg.width or 0) % 2):
        raise ConfigError(f"--reward_input mp4 needs an even height and width (yuv420p), got {cfg.height}x{cfg.width}")
    if cfg.group_size < 2:
        raise ConfigError(f"group_size must be >= 2 (a group of one has no baseline), got {cfg.group_size}")
    if cfg.sp_size >= 1 and world_size % cfg.sp_size == 0 and cfg.videos_per_rank is None:
        cfg = dataclasses.replace(cfg, videos_per_rank=default_videos_per_rank(cfg.group_size, world_size // cfg.sp_size))
    if cfg.videos_per_rank is not None and cfg.videos_per_rank < 1:
        raise ConfigError(f"videos_per_rank must be >= 1, got {cfg.videos_per_rank}")
    if cfg.sp_size < 1 or world_size % cfg.sp_size:
        raise ConfigError(f"--sp_size must be a divisor of the world size {world_size}, got {cfg.sp_size}")
    videos = world_size // cfg.sp_size * cfg.videos_per_rank  # the sp ranks of a group hold the same videos
    if videos % cfg.group_size:
        raise ConfigError(f"world_size / sp_size x videos_per_rank = {world_size} / {cfg.sp_size} x {cfg.videos_per_rank} = "
                          f"{videos} videos per iteration cannot hold whole groups of group_size {cfg.group_size}: it must "
                          f"be a multiple of it")
    if not 0 < cfg.train_step_fraction <= 1:
        raise ConfigError(f"train_step_fraction must be in (0, 1], got {cfg.train_step_fraction}")
    if cfg.sde_window > cfg.num_steps:
        raise ConfigError(f"--sde_window {cfg.sde_window} is more than the {cfg.num_steps} steps (--num_steps): expected "
                          f"1 … {cfg.num_steps}, or 0 for every step")
    if cfg.sde_window and cfg.sde_window_placement == "static" and cfg.sde_window_start > cfg.num_steps - cfg.sde_window:
        raise ConfigError(f"--sde_window_start {cfg.sde_window_start} puts a window of {cfg.sde_window} steps past step "
                          f"{cfg.num_steps - 1} (--num_steps {cfg.num_steps}): expected a start of 0 … "
                          f"{cfg.num_steps - cfg.sde_window}")
    if not 0 <= cfg.ema_decay < 1:
        raise ConfigError(f"--ema_decay must be in [0, 1) (0: no EMA; FlowGRPO uses 0.9), got {cfg.ema_decay}")
    check_video_size(cfg)  # the sizes given; the defaults are the family's (check_inputs)
    for name in AT_LEAST_ONE:
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.prompt_cache < 1:
        raise ConfigError(f"prompt_cache must be >= 1 (prompts kept), got {cfg.prompt_cache}")
    if cfg.lora_rank < 0:
        raise ConfigError(f"lora_rank must be >= 0 (0 = full fine-tune), got {cfg.lora_rank}")
    if cfg.resume and cfg.overwrite:
        raise ConfigError("--resume continues the run in output_dir and --overwrite deletes it: give one of them")
    return cfg


# Flags that act only with another flag's value: (flag, what it needs, whether it has it). A flag set away from its
# default without what it needs would be accepted and ignored: it is an error instead.
def check_flags_have_effect(cfg):
    """One-line errors for flags given where they do nothing (they were silently ignored before)."""
    default = Config()
    needs = [(name, "--beta_schedule adaptive", cfg.beta_schedule == "adaptive")
             for name in ("kl_target", "beta_init", "beta_min", "beta_max", "beta_window")]
    needs += [("beta_switch_step", "--beta_schedule two_stage", cfg.beta_schedule == "two_stage")]
    needs += [(name, "--sde_window K > 0", cfg.sde_window > 0)
              for name in ("sde_window_start", "sde_window_placement", "sde_window_shift_every")]
    needs += [("sde_window_start", "--sde_window_placement static", cfg.sde_window_placement == "static"),
              ("sde_window_shift_every", "--sde_window_placement moving", cfg.sde_window_placement == "moving"),
              ("eval_prompts", "--eval_every N > 0", cfg.eval_every > 0),
              ("eval_videos_per_prompt", "--eval_every N > 0", cfg.eval_every > 0)]
    for name, needed, present in needs:
        if getattr(cfg, name) != getattr(default, name) and not present:
            raise ConfigError(f"--{name} {getattr(cfg, name)!r} has no effect without {needed}: drop it, or add "
                              f"{needed.split(' ')[0]}")
    if cfg.tiny_family != default.tiny_family and not (cfg.tiny and not cfg.model_path):
        raise ConfigError(f"--tiny_family {cfg.tiny_family} has no effect without --tiny and an empty --model_path "
                          f"(a given checkpoint's family is read from its model_index.json): drop it, or add --tiny")
    if cfg.kl_mode == "none" and cfg.beta_schedule != default.beta_schedule:
        raise ConfigError(f"--beta_schedule {cfg.beta_schedule} has no effect with --kl_mode none (no KL term for β to "
                          f"weigh): drop it, or choose a --kl_mode with a KL term")


def video_size(num_frames=None, height=None, width=None, default=None):
    """(num_frames, height, width) of a run: each value the user gave, the others from `default`, the family's
    (`default_video_size`). E.g. video_size(None, 32, None, default=(9, 32, 32)) -> (9, 32, 32)."""
    return tuple(d if v is None else v for v, d in zip((num_frames, height, width), default))


def default_video_size(model_path, tiny=False, tiny_family=TINY_FAMILIES[0]):
    """The default (frames, height, width) of a policy: its family's (model_index.json, model.family_of), or with
    --tiny its tiny family's (tiny.TINY_VIDEO_SIZES: what the tiny VAE turns into a small latent), the family of
    the given --model_path or, when it is empty, --tiny_family. Imports the model code (check_inputs only)."""
    import model
    import tiny as tiny_models
    family = model.family_of(model_path) if model_path else None
    if tiny:
        return tiny_models.TINY_VIDEO_SIZES[family.family if family else tiny_family]
    return family.default_video_size


def check_video_size(cfg):
    """A size both families' VAE and patching can take, for every value given or resolved: 4k+1 frames (VAE 4x
    temporal) and sides a multiple of 16 (HunyuanVideo-1.5: VAE 16x; Wan2.1: VAE 8x x patch 2)."""
    wrong = [f"--{name} {value}" for name, value, step in (("num_frames", cfg.num_frames, 4), ("height", cfg.height, 16),
                                                           ("width", cfg.width, 16))
             if value is not None and (value - (name == "num_frames")) % step]
    if wrong:
        raise ConfigError(f"video must be 4k+1 frames and a multiple of 16 pixels (VAE 4x temporal; HunyuanVideo-1.5 "
                          f"VAE 16x spatial, Wan2.1 VAE 8x x patch 2), got {', '.join(wrong)}")


def check_inputs(cfg, world_size):
    """Phase 2: what the flags point to. Imports the model and reward modules (torch, diffusers, transformers).
    Returns (cfg with the world's settings, resolved paths and prompt files, prompts)."""
    try:
        return _check_inputs(cfg, world_size)
    except ConfigError:
        raise
    except ValueError as error:  # the checks of sde.py, trust_region.py, reward.py raise plain ValueErrors
        raise ConfigError(str(error)) from None


def _check_inputs(cfg, world_size):
    import distributed
    import hub
    import model
    import reward
    import tracking
    import videoalign_checkpoint
    if cfg.world:  # the world's own model, prompts, video size and reward unless the user gave others
        from world import video_world
        cfg = dataclasses.replace(cfg, reward=["world"] if cfg.reward == Config().reward else cfg.reward,
                                  prompts=cfg.prompts or video_world.PROMPTS_FILE,
                                  num_frames=cfg.num_frames or video_world.WORLD_NUM_FRAMES,
                                  height=cfg.height or video_world.WORLD_HEIGHT, width=cfg.width or video_world.WORLD_WIDTH)
        check_video_size(cfg)
    if "world" in (item.partition("=")[0] for item in cfg.reward):
        if not cfg.world:
            raise ConfigError("--reward world scores the synthetic world's latents: it needs --world (its model and prompts)")
        from world import video_world  # noqa: F401  (registers the world's reward with reward.py)
    reward_specs = reward.parse_reward_specs(cfg.reward)
    for name, items in reward.split_component_weights(cfg.reward_weights, tuple(reward_specs)).items():
        reward.parse_weights(items, *reward.training_reward_components(name))
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
            raise ConfigError(f"--model_path {cfg.model_path!r} is not a diffusers HunyuanVideo-1.5 or Wan2.1 directory: "
                              f"expected a 'transformer' subdirectory, found {sorted(os.listdir(cfg.model_path))[:8]}")
        try:
            # the family (model_index.json), then every piece present (file names only, no weights read), then
            # --sp_size against the transformer's attention heads (Ulysses splits heads)
            family = model.family_of(cfg.model_path)
            family.check_directory(cfg.model_path)
            with open(os.path.join(cfg.model_path, "transformer", "config.json")) as f:
                family.check_sp_size(json.load(f), cfg.sp_size)
        except (FileNotFoundError, ValueError) as error:
            raise ConfigError(f"--model_path: {error}") from None
        if "videoalign" in reward_specs and not os.path.isfile(os.path.join(cfg.reward_path,
                                                                             videoalign_checkpoint.MODEL_CONFIG_FILE)):
            raise ConfigError(f"--reward_path {cfg.reward_path!r} is not a VideoAlign (VideoReward) directory: expected "
                              f"{videoalign_checkpoint.MODEL_CONFIG_FILE} and checkpoint-<step>/, found "
                              f"{sorted(os.listdir(cfg.reward_path))[:8]}")
    if cfg.tiny:  # --sp_size against the tiny policy's heads: its directory's config, or the one tiny.py builds with
        import tiny
        try:
            if cfg.model_path:
                family = model.family_of(cfg.model_path)
                with open(os.path.join(cfg.model_path, "transformer", "config.json")) as f:
                    transformer_config = json.load(f)
            else:
                family = model.family_named(cfg.tiny_family)
                transformer_config = tiny.TINY_TRANSFORMER_CONFIGS[cfg.tiny_family]
            family.check_sp_size(transformer_config, cfg.sp_size)
        except (FileNotFoundError, ValueError) as error:
            raise ConfigError(f"--tiny{' --model_path' if cfg.model_path else ' --tiny_family ' + cfg.tiny_family}: "
                              f"{error}") from None
    if not cfg.world:  # the sizes the flags left open: the family's default (the world's were filled in above)
        try:
            default = default_video_size(cfg.model_path, cfg.tiny, cfg.tiny_family)
        except ValueError as error:
            raise ConfigError(f"--model_path: {error}") from None
        cfg = dataclasses.replace(cfg, **dict(zip(("num_frames", "height", "width"),
                                                  video_size(cfg.num_frames, cfg.height, cfg.width, default))))
    tracking.check_installed(cfg.report_to)  # an optional package: missing is an error now, not after loading
    check_sde_window(cfg)
    if cfg.lora_rank > 0:
        try:
            import peft  # noqa: F401 (only whether it is installed)
        except ImportError:
            raise ConfigError("--lora_rank > 0 needs the optional dependency peft (pip install peft)") from None
    cfg = dataclasses.replace(cfg, prompts=cfg.prompts or DEFAULT_PROMPTS)
    prompts = load_prompts(cfg.prompts)
    if cfg.world:  # the world's reward knows its own prompts only: any other is an error, never replaced
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
        notes = check_resume_config(cfg, distributed.latest_checkpoint(cfg.output_dir), world_size)
        for line in notes if int(os.environ.get("RANK", 0)) == 0 else ():
            print(line, flush=True)
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
    import distributed
    holder = distributed.lock_holder(cfg.output_dir) if int(os.environ.get("RANK", 0)) == 0 else None
    if holder:  # a live run writes here: that is the cause, whatever else the directory holds
        raise ConfigError(f"--output_dir {cfg.output_dir!r} is in use by another run ({holder}): one writer at a time; "
                          f"wait for it to finish or stop it (Ctrl-C or SIGTERM checkpoints it), then --resume")
    previous = [os.path.basename(path) for _, path in distributed.checkpoints(cfg.output_dir)]
    previous += [name for name in ("metrics.jsonl",) if os.path.isfile(os.path.join(cfg.output_dir, name))]
    if previous and not (cfg.resume or cfg.overwrite or cfg.self_check):
        raise ConfigError(f"--output_dir {cfg.output_dir!r} already holds a run ({', '.join(previous[-3:])}): add "
                          f"--resume to continue it, --overwrite to delete it and start afresh, or choose another "
                          f"--output_dir")
    if cfg.resume and distributed.latest_checkpoint(cfg.output_dir) is None:
        raise ConfigError(f"--resume: no complete checkpoint (checkpoint-NNNNNN/ with its {distributed.MANIFEST}) "
                          f"in {cfg.output_dir!r}")


# The smallest std a stochastic step may have. The log-prob is built on (x′ − μ)/std, and x′, μ are fp32 latents of
# order 1, rounded to ~6e-8: at std ≥ 1e-4 that quotient is exact to ~1e-3. Below it the log-probs are round-off (at


# The smallest std a stochastic step may have. The log-prob is built on (x′ − μ)/std, and x′, μ are fp32 latents of
# order 1, rounded to ~6e-8: at std ≥ 1e-4 that quotient is exact to ~1e-3. Below it the log-probs are round-off (at
# --eta 1e-6 the tiny model's gradient norm reaches 4.6e4) and at --eta 1e-30 std² underflows to 0 (ours).
MIN_STEP_STD = 1e-4


def check_step_stds(cfg):
    """Flag errors that need the resolved shift (so they come after resolve_sampling, before any model is loaded):
    sage's first step too short for its σ clamp (too many --num_steps), and a --eta so small that some step's std
    is below MIN_STEP_STD (float64, so that the check itself does not underflow)."""
    import torch

    import sde
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
    """--sde_window K: every window the run can place holds a stochastic step (cps's last step is deterministic: a
    window of only that step would train nothing). Its size and a fixed start are flag checks (check_flags)."""
    if not cfg.sde_window:
        return
    import sde
    last = cfg.num_steps - cfg.sde_window
    starts = [cfg.sde_window_start] if cfg.sde_window_placement == "static" else range(last + 1)
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
    import model
    shift, guidance_scale = model.family_of(model_path).sampling_defaults(model_path)
    guider = os.path.isdir(os.path.join(model_path, "guider"))  # Wan checkpoints carry none: WanPipeline's default
    sources = {name: "--" + name if getattr(cfg, name) is not None else "the checkpoint's scheduler config"
               if name == "shift" else "the checkpoint's guider config" if guider else "the pipeline's default"
               for name in ("shift", "cfg_scale")}
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
    unreadable state file is left to the verification at load time, which names it. Returns the lines that say
    what --allow_config_change accepted (empty without it)."""
    try:
        with open(os.path.join(checkpoint, "trainer_state.json")) as f:
            state = json.load(f)
        saved = state.get("config", {})
    except (OSError, ValueError):
        return []
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
    changed = {k: (saved[k], v) for k, v in dataclasses.asdict(cfg).items()
               if k in saved and k not in RESUMABLE_CHANGES and v is not None and saved[k] != v}
    if cfg.allow_config_change:  # accepted, and each change said (rank 0 prints them)
        notes = [f"resume: --allow_config_change accepts --{k} {new!r} (checkpoint: {old!r})"
                 for k, (old, new) in sorted(changed.items())]
        if "ema_decay" in changed and not changed["ema_decay"][1]:
            notes.append(f"resume: --ema_decay dropped: the checkpoints written from now on hold no ema/, and the "
                         f"average of {checkpoint!r} is lost once the older checkpoints rotate out (--keep_checkpoints)")
        return notes
    if changed:
        listing = ", ".join(f"--{k} {new!r} (checkpoint: {old!r})" for k, (old, new) in sorted(changed.items()))
        raise ConfigError(f"--resume from {checkpoint!r} with different settings: {listing}; "
                         "use the checkpoint's flags, or add --allow_config_change to continue anyway")
    return []




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

