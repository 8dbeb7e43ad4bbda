"""Evaluate HunyuanVideo-1.5 checkpoints side by side: deterministic ODE samples scored by VideoAlign and CLIP/PickScore.

Every model (the base transformer of --model_path, then each --checkpoints directory, and the EMA of
a checkpoint that holds one) samples the same prompts from the same seeded noise with the
deterministic ODE (Euler) sampler, so the only difference between rows of the table is the
transformer weights. Each video is decoded once and
scored by
    VideoAlign  VQ (visual quality), MQ (motion quality), TA (text alignment) and
                overall = VQ + MQ + TA, the unweighted sum the paper's tables report
                (SAGE-GRPO: −0.477 − 0.238 + 1.522 = 0.807); the training reward's 0.5/0.5/1.0
                weighting is a training choice, not the reported metric;
    CLIPScore   CLIP image-text similarity, averaged over frames;
    PickScore   the PickScore CLIP model's image-text score, averaged over frames.
Writes output_dir/results.json (per model and per sample), output_dir/results.md (one table, one
row per model) and output_dir/videos/<model>/<prompt>_<seed>.mp4 (H.264 written by PyAV, the reward's
own mp4 writer; a PNG frame grid for an odd frame size). Both result files are rewritten after every model, each
written whole to a temporary file, flushed to disk and renamed over the old one, so a failure later (a bad
checkpoint, a kill) never loses or corrupts the scores already written.

Results are records. An evaluation into an output_dir that already holds results.json adds its rows to the ones
there when the settings match (the prompts, the seeds and SETTINGS: base model, reward models, steps, shift, CFG,
video size, VAE tiling), and is refused before any model is loaded, with one line naming results.json and the
setting that differs, when they do not; the earlier rows are kept either way. A model evaluated again (the base,
which every evaluation scores first, or the same checkpoint) gets a new row with its own date ("evaluated"),
its videos in videos/<model>_2/ (_3, ...), so no earlier video is overwritten.

The checkpoints are checked before any model is loaded, as train.py's --resume checks them
(distributed.verify_checkpoint): a train.py checkpoint-N/ must match its manifest.json (every file's
size and SHA-256, finite weights), else eval stops with one line naming the file and exit status 1;
an unfinished write (a checkpoint-N.tmp/, or a checkpoint-N/ without manifest) is skipped, with a
line saying so. A transformer directory that is not a train.py checkpoint has no manifest: its
weights are loaded as they are and must be finite. One evaluation writes to an output_dir at a time
(the lock of distributed.lock_run_directory).

--world evaluates the synthetic video world (world/video_world.py) instead: its pretrained policy as the
base, its prompts, video size and sampling settings, and its exact reward of the latents (reward,
alignment, composition, brightness, off-manifold distance, on-manifold reward) in place of VideoAlign,
CLIPScore and PickScore, e.g. on the checkpoints of a `train.py --world` run.

    # real weights, one GPU: hub ids already in the hub cache (`hf download <id>` once; nothing is downloaded
    # here) or local directories, e.g. --model_path ckpts/HunyuanVideo-1.5-480p_t2v
    python eval.py --model_path hunyuanvideo-community/HunyuanVideo-1.5-480p_t2v --reward_path KwaiVGI/VideoReward \\
        --clip_path openai/clip-vit-large-patch14 --pickscore_path yuvalkirstain/PickScore_v1 \\
        --pickscore_processor_path laion/CLIP-ViT-H-14-laion2B-s32B-b79K \\
        --checkpoints runs/sage/checkpoint-000500 --prompts prompts/example.txt --output_dir runs/eval
    # no weights, CPU: random tiny models, e.g. on the checkpoint of a `train.py --tiny` run
    python eval.py --tiny --model_path runs/tiny/tiny_hunyuan --reward_path runs/tiny/tiny_videoalign \\
        --checkpoints runs/tiny/checkpoint-000004 --output_dir runs/tiny_eval
    # the synthetic world, on the checkpoint of a `train.py --world` run
    python eval.py --world --num_steps 8 --checkpoints runs/world/checkpoint-000150 --output_dir runs/world_eval
"""
import dataclasses
import datetime
import json
import math
import os
import re
import sys
import typing
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

import distributed
import hub
import model
import reward
import sde
import tiny
import config
from config import DEFAULT_PROMPTS, load_prompts, parse_config, resolve_sampling
from run_directory import save_video


@dataclass
class EvalConfig:
    # --- models
    model_path: str = ""
    """diffusers-format HunyuanVideo-1.5, the base model and the frozen VAE / text encoders: a local directory or a
    hub id already in the hub cache (hunyuanvideo-community/HunyuanVideo-1.5-480p_t2v); never downloaded (hub.py)"""
    reward_path: str = ""
    """VideoAlign (VideoReward) checkpoint: a local directory or a hub id in the hub cache (KwaiVGI/VideoReward)"""
    clip_path: str = ""
    """CLIP for CLIPScore: a local directory or a hub id in the hub cache (openai/clip-vit-large-patch14)"""
    pickscore_path: str = ""
    """PickScore: a local directory or a hub id in the hub cache (yuvalkirstain/PickScore_v1)"""
    pickscore_processor_path: str = ""
    """its image processor + tokenizer (PickScore_v1 uses laion/CLIP-ViT-H-14-laion2B-s32B-b79K's), directory or
    hub id; empty = pickscore_path"""
    checkpoints: list[str] = field(default_factory=list)
    """transformer directories to compare with the base (a train.py checkpoint-N/, its transformer/ or its
    ema_transformer/; a checkpoint-N/ of a --ema_decay run is evaluated twice: its policy, then its EMA, "checkpoint-N-ema")"""
    # --- evaluation
    prompts: str = ""
    """prompt file (.txt / .csv / .jsonl, as train.py); default prompts/example.txt, or the world's with --world"""
    output_dir: str = "runs/eval"
    """results.json, results.md and videos/ go here; into a directory with results, the rows are added to them when
    prompts, seeds and settings match (a model evaluated again: a new row with its date), refused otherwise"""
    verbose: bool = False
    """keep diffusers' and transformers' own messages and progress bars (loading, "Guiders are an experimental
    feature"); without it eval prints its own lines and one progress bar per model"""
    tiny: bool = False
    """random tiny policy (--tiny_family), VideoAlign and CLIP models built on the fly, CPU"""
    tiny_family: str = "hunyuan"
    """--tiny with an empty --model_path: the tiny policy family built, hunyuan | wan"""
    world: bool = False
    """the synthetic video world (world/video_world.py), CPU: its pretrained policy as the base (unless --model_path),
    its prompts, video size, shift / CFG, and its exact reward of the latents instead of VideoAlign / CLIP / PickScore"""
    seed: int = 0
    """seed of the first video of each prompt; prompt i, video j uses seed + 1000·i + j"""
    videos_per_prompt: int = 1
    """seeds per prompt"""
    # --- sampling
    num_steps: int = 50
    """ODE steps (HunyuanVideo15Pipeline default num_inference_steps 50)"""
    shift: typing.Optional[float] = None
    """schedule shift; default: the base checkpoint's scheduler config (480p T2V: 5), as in training"""
    cfg_scale: typing.Optional[float] = None
    """classifier-free guidance scale; default: the base checkpoint's guider config (480p T2V: 6)"""
    num_frames: typing.Optional[int] = None
    """frames; default: the base checkpoint family's, as the training rollouts (HunyuanVideo-1.5 81, Wan2.1 81)"""
    height: typing.Optional[int] = None
    """height in pixels; default: the family's (HunyuanVideo-1.5 352, Wan2.1 480; tiny: 16, 32)"""
    width: typing.Optional[int] = None
    """width in pixels; default: the family's (HunyuanVideo-1.5 624, Wan2.1 832; tiny: 16, 32)"""
    batch_size: int = 2
    """videos sampled per forward batch"""
    vae_tiling: typing.Optional[bool] = None
    """decode in overlapping 256-pixel tiles (model.set_vae_tiling), as train.py: default on with CUDA, off on CPU;
    results.json stores the value used"""
    vae_precision: str = "model"
    """the VAE decode, as train.py's --vae_precision: "model" (the VAE's dtype) or "fp16" (autocast to float16, as the
    official trainer; model.vae_autocast)"""


class EvalError(RuntimeError):
    """A checkpoint that cannot be evaluated (corrupt, unreadable): the message names the file and why."""


# Result columns: VideoAlign / CLIPScore / PickScore, or the world's reward and its diagnostics (--world).
COLUMNS = {"vq": "VQ", "mq": "MQ", "ta": "TA", "overall": "VideoAlign overall", "clip_score": "CLIPScore",
           "pick_score": "PickScore"}
WORLD_COLUMNS = {"reward": "world reward", "alignment": "alignment", "composition": "composition",
                 "brightness": "brightness", "off_manifold": "off-manifold distance",
                 "on_manifold_reward": "on-manifold reward"}


def checked_checkpoints(paths, log=print):
    """The transformer directories to evaluate, checked as train.py's --resume checks its checkpoints, before any
    model is loaded: a train.py checkpoint (checkpoint-NNNNNN/, or one holding a manifest.json) must verify
    against its manifest (else EvalError naming every one that does not); an unfinished write (a .tmp directory,
    or a numbered checkpoint without manifest) is skipped and named (`log`). Returns [(given path, directory)]."""
    kept, corrupt = [], []
    for path in paths:
        normalised = os.path.normpath(path)
        inside = os.path.basename(normalised) in ("transformer", distributed.EMA_TRANSFORMER)
        root = os.path.dirname(normalised) if inside else normalised
        name = os.path.basename(root)
        has_manifest = os.path.isfile(os.path.join(root, distributed.MANIFEST))
        if name.endswith(".tmp"):
            log(f"eval: skipping {path}: an unfinished checkpoint write (.tmp, renamed only once complete)")
            continue
        if distributed.CHECKPOINT_NAME.fullmatch(name) and os.path.isdir(root) and not has_manifest:
            log(f"eval: skipping {path}: no {distributed.MANIFEST}, the checkpoint was never completed")
            continue
        if has_manifest:
            try:
                distributed.verify_checkpoint(root)
            except distributed.CheckpointError as error:
                corrupt.append(str(error))
                continue
        kept.append((path, transformer_dir(path)))
        if not inside and os.path.isdir(os.path.join(root, distributed.EMA_TRANSFORMER)):  # --ema_decay's average
            kept.append((os.path.join(path, distributed.EMA_TRANSFORMER),
                         transformer_dir(os.path.join(root, distributed.EMA_TRANSFORMER))))
    if corrupt:
        raise EvalError(f"{len(corrupt)} checkpoint(s) do not match their manifest, nothing was evaluated: "
                        + "; ".join(corrupt))
    return kept


def load_transformer(path, device, dtype):
    """A transformer directory's model, or EvalError naming the directory and the cause (no library traceback);
    non-finite weights (a directory without manifest that was corrupted) are an error too."""
    try:  # the saved class: either family's (model.transformer_class_of)
        transformer = model.transformer_class_of(path).from_pretrained(path, torch_dtype=dtype)
    except Exception as error:  # noqa: BLE001 - diffusers' OSError / safetensors' errors: one line with the cause
        raise EvalError(f"{path} could not be loaded ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})") from None
    bad = next((name for name, p in transformer.state_dict().items() if not torch.isfinite(p).all()), None)
    if bad is not None:
        raise EvalError(f"{path}: tensor {bad!r} holds NaN or inf")
    return transformer.to(device).eval()


def transformer_dir(path):
    """Accept a checkpoint-N/ directory or a transformer directory; raise if it is neither."""
    for candidate in (path, os.path.join(path, "transformer")):
        if os.path.isfile(os.path.join(candidate, "config.json")) and any(
                name.endswith(".safetensors") for name in os.listdir(candidate)):
            return candidate
    found = sorted(os.listdir(path)) if os.path.isdir(path) else "nothing (no such directory)"
    raise ValueError(f"checkpoint {path!r}: expected a diffusers transformer directory (config.json + *.safetensors) "
                     f"or a train.py checkpoint-N/ containing transformer/, found {found}")


def model_names(paths):
    """'base' then a short unique name per checkpoint (its checkpoint-N or directory name)."""
    names = ["base"]
    for path in paths:
        parts = os.path.normpath(path).split(os.sep)
        name = parts[-1]
        if parts[-1] in ("transformer", distributed.EMA_TRANSFORMER) and len(parts) > 1:  # inside a checkpoint
            name = parts[-2] + ("-ema" if parts[-1] == distributed.EMA_TRANSFORMER else "")
        names.append(name if name not in names else f"{name}_{len(names)}")
    return names


def markdown_table(results, columns=COLUMNS):
    lines = ["| model | evaluated | " + " | ".join(columns.values()) + " |", "|---" * (len(columns) + 2) + "|"]
    for r in results:
        lines.append(f"| {r['name']} | {r.get('evaluated', '—')} | " + " | ".join(f"{r[c]:.4f}" for c in columns) + " |")
    return "\n".join(lines) + "\n"


# What must match for rows to sit in one table (with the prompts and the seeds): what changes a video or its scores.
# Not compared: checkpoints (what is added), output_dir, batch_size, verbose.
SETTINGS = ("model_path", "reward_path", "clip_path", "pickscore_path", "pickscore_processor_path", "tiny", "tiny_family",
            "world", "seed", "videos_per_prompt", "num_steps", "shift", "cfg_scale", "num_frames", "height", "width", "vae_tiling",
            "vae_precision")
# Settings added after results.json files were first written: the value every earlier eval.py used.
EARLIER_DEFAULTS = {"vae_precision": "model"}


def settings_of(config, prompts):
    """The settings an evaluation's rows depend on: {setting: value} of a config (dict) and the prompt texts."""
    return {"prompts": list(prompts), **{name: config.get(name, EARLIER_DEFAULTS.get(name)) for name in SETTINGS}}


def earlier_results(output_dir, settings):
    """The rows already in output_dir/results.json ([] if none), or ValueError, one line, naming the file and the
    first setting that differs from `settings`."""
    path = os.path.join(output_dir, "results.json")
    if not os.path.exists(path):
        return []
    try:
        with open(path) as f:
            stored = json.load(f)
        models = stored["models"]
        earlier = stored.get("settings") or settings_of(  # a results.json of an eval.py before the settings were stored
            stored["config"], dict.fromkeys(s["prompt"] for s in models[0]["samples"]) if models else [])
    except (OSError, ValueError, KeyError, TypeError, IndexError) as error:
        raise ValueError(f"{path} exists but is not an eval.py results file ({type(error).__name__}: {error}): move it "
                         f"away or give another --output_dir") from None
    earlier = {**EARLIER_DEFAULTS, **earlier}
    for name, value in settings.items():
        if earlier.get(name) != value:
            if name == "prompts":
                old, new = earlier.get(name) or [], value
                i = next((i for i, (a, b) in enumerate(zip(old, new)) if a != b), min(len(old), len(new)))
                found = (f"{len(old)} prompts there, {len(new)} here, first difference at prompt {i}: "
                         f"{(old[i] if i < len(old) else None)!r:.60} there, {(new[i] if i < len(new) else None)!r:.60} here")
            else:
                found = f"{name} is {earlier.get(name)!r} there, {value!r} here"
            raise ValueError(f"{path} holds the results of other settings ({found}); its rows are added to only with "
                             f"the same prompts, seeds and settings: give those, or another --output_dir")
    return models


def write_text_atomically(path, text):
    """`path` holds `text` whole, or keeps what it held: written to path.tmp, flushed to disk, renamed over path."""
    with open(path + ".tmp", "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def write_results(cfg, settings, results, num_videos):
    """results.json and results.md for every row, the earlier evaluations' and this one's (atomic: each file is
    complete, the new one or the old one)."""
    os.makedirs(cfg.output_dir, exist_ok=True)
    table = markdown_table(results, WORLD_COLUMNS if cfg.world else COLUMNS)
    outputs = {"results.json": json.dumps({"config": dataclasses.asdict(cfg), "settings": settings, "models": results},
                                          indent=1),
               "results.md": f"{num_videos} videos per model, {cfg.num_steps} ODE steps, CFG {cfg.cfg_scale}, "
                             f"{cfg.num_frames} frames at {cfg.height}x{cfg.width}\n\n" + table}
    for name, text in outputs.items():
        write_text_atomically(os.path.join(cfg.output_dir, name), text)
    return table


def video_folder(name, results):
    """videos/<name>, or <name>_2, _3, ... when an earlier row's videos are there (a model evaluated again)."""
    taken = {r["samples"][0]["video"].split("/")[1] for r in results if r["samples"]}
    return next(folder for folder in [name] + [f"{name}_{k}" for k in range(2, len(taken) + 3)] if folder not in taken)


def main(cfg):
    if cfg.world and cfg.tiny:
        raise ValueError("--world and --tiny are two different small worlds: give one of them")
    if cfg.vae_precision not in model.VAE_PRECISIONS:
        raise ValueError(f"unknown --vae_precision {cfg.vae_precision!r}: expected one of {list(model.VAE_PRECISIONS)}")
    if cfg.tiny_family not in config.TINY_FAMILIES:
        raise ValueError(f"unknown --tiny_family {cfg.tiny_family!r}: expected one of {list(config.TINY_FAMILIES)}")
    if cfg.world:  # the world's prompts and video size unless given (its model below, its sampling in its configs)
        from world import video_world
        cfg = dataclasses.replace(cfg, prompts=cfg.prompts or video_world.PROMPTS_FILE,
                                  num_frames=cfg.num_frames or video_world.WORLD_NUM_FRAMES,
                                  height=cfg.height or video_world.WORLD_HEIGHT, width=cfg.width or video_world.WORLD_WIDTH)
    cfg = dataclasses.replace(cfg, prompts=cfg.prompts or DEFAULT_PROMPTS)
    prompts = load_prompts(cfg.prompts)  # bad input fails before any model is loaded
    if cfg.world:
        video_world.prompt_indices(prompts)  # ValueError naming a prompt the world's reward does not know
    for name in ("videos_per_prompt", "batch_size", "num_steps"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(cfg, name)}")
    for name in ("shift", "cfg_scale"):
        value = getattr(cfg, name)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ValueError(f"--{name} must be a finite number > 0, got {value}")
    paths = checked_checkpoints(cfg.checkpoints)  # [(given, transformer dir)]; corrupt ones: EvalError, now
    # each model a local directory, or a hub id resolved to its snapshot in the hub cache (hub.py; never
    # downloaded); with --tiny an empty path means "build a random tiny one"; --world reads no reward model
    for name in ("model_path",) + (() if cfg.world else ("reward_path", "clip_path", "pickscore_path",
                                                         "pickscore_processor_path")):
        value = getattr(cfg, name)
        if value or not (cfg.tiny or cfg.world or name == "pickscore_processor_path"):
            try:
                cfg = dataclasses.replace(cfg, **{name: hub.resolve_path(value, f"--{name}")})
            except FileNotFoundError as error:
                raise ValueError(f"{error}{'' if cfg.tiny else ', or use --tiny'}") from None
    try:
        lock = distributed.lock_run_directory(cfg.output_dir, "evaluation")  # one writer; released when eval ends
    except OSError as error:
        raise ValueError(f"--output_dir {cfg.output_dir!r} is not writable ({error.strerror or error})") from None
    if not cfg.verbose:
        hub.quiet_libraries()
    try:
        return evaluate(cfg, prompts, paths)
    finally:
        lock.close()


def evaluate(cfg, prompts, paths):
    model_path, reward_path, clip_path, pick_path = cfg.model_path, cfg.reward_path, cfg.clip_path, cfg.pickscore_path
    if cfg.tiny:  # random tiny models in the real layouts, the same code path as real weights (tiny.py)
        tiny_paths = tiny.tiny_model_paths(os.path.join(cfg.output_dir, "tiny_models"), **{cfg.tiny_family: model_path},
                                           videoalign=reward_path, clip=clip_path)
        model_path, reward_path, clip_path = tiny_paths[cfg.tiny_family], tiny_paths["videoalign"], tiny_paths["clip"]
        pick_path = pick_path or clip_path
    if cfg.world and not model_path:  # the world's pretrained policy (built once, cached)
        from world import pretrain as world_pretrain
        model_path = world_pretrain.prepare_world()
    cfg = dataclasses.replace(cfg, **dict(zip(("num_frames", "height", "width"),
                                              config.video_size(cfg.num_frames, cfg.height, cfg.width,
                                                                config.default_video_size(model_path, cfg.tiny)))))
    cfg, sources = resolve_sampling(cfg, model_path)  # shift and CFG scale: the base checkpoint's unless given
    device = torch.device("cuda" if torch.cuda.is_available() and not (cfg.tiny or cfg.world) else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    # VAE tiling: on with CUDA unless given (model.set_vae_tiling's default), decided here to be compared below
    cfg = dataclasses.replace(cfg, vae_tiling=device.type == "cuda" if cfg.vae_tiling is None else cfg.vae_tiling)
    settings = settings_of(dataclasses.asdict(cfg), prompts)
    results = earlier_results(cfg.output_dir, settings)  # refused here, before any model, if the settings differ

    # text encoders, VAE, scheduler only: each evaluated transformer, the base one included, is loaded below
    pipe = model.load_policy_family(model_path, device="cpu", dtype=dtype, load_transformer=False)
    for module in pipe.text_encoders + (pipe.vae,):
        module.to(device)
    pipe.set_vae_tiling(cfg.vae_tiling)
    print(f"eval: shift {cfg.shift:g} ({sources['shift']}), CFG scale {cfg.cfg_scale:g} ({sources['cfg_scale']}), "
          f"{cfg.num_steps} ODE steps, {cfg.num_frames} frames at {cfg.height}x{cfg.width}, "
          f"VAE tiling {'on' if cfg.vae_tiling else 'off'}, VAE decode {cfg.vae_precision}", flush=True)
    score = (world_scorer() if cfg.world else
             video_scorer(pipe, reward_path, clip_path, pick_path, cfg.pickscore_processor_path, device, dtype,
                          cfg.vae_precision))
    columns = WORLD_COLUMNS if cfg.world else COLUMNS
    embeds = pipe.encode_prompts(prompts, device=device, dtype=dtype)
    samples = [(i, j, cfg.seed + 1000 * i + j) for i in range(len(prompts)) for j in range(cfg.videos_per_prompt)]
    sigmas = sde.shifted_sigmas(cfg.num_steps, cfg.shift)
    latent_shape = pipe.latent_shape(cfg.num_frames, cfg.height, cfg.width)

    table = ""
    given = [p for p, _ in paths]
    for name, path in zip(model_names(given), [os.path.join(model_path, "transformer")] + [d for _, d in paths]):
        transformer = load_transformer(path, device, dtype)
        evaluated = datetime.datetime.now().isoformat(sep=" ", timespec="seconds")
        folder = video_folder(name, results)
        rows = []
        for start in tqdm(range(0, len(samples), cfg.batch_size), desc=name, unit="batch"):
            batch = samples[start:start + cfg.batch_size]
            batch_prompts = [prompts[i] for i, _, _ in batch]
            # ODE sampler: the same noise gives the same video for the same weights (all calls run without grad)
            rollout = model.rollout(transformer, embeds.select([i for i, _, _ in batch]), [s for _, _, s in batch],
                                    latent_shape, sigmas, kernel="ode", eta=0.0, guidance_scale=cfg.cfg_scale)
            scores, save = score(rollout.final_latents, batch_prompts)
            for b, (i, j, seed) in enumerate(batch):
                slug = re.sub(r"[^a-z0-9]+", "_", prompts[i].lower())[:40].strip("_")
                file = save(b, os.path.join(cfg.output_dir, "videos", folder, f"{i:03d}_{slug}_seed{seed}"))
                rows.append({"prompt": prompts[i], "seed": seed, **{k: float(scores[k][b]) for k in columns},
                             "video": os.path.relpath(file, cfg.output_dir)})
        del transformer
        means = {k: torch.tensor([r[k] for r in rows]).nanmean().item() for k in columns}
        first = next(iter(columns))
        results.append({"name": name, "evaluated": evaluated, "path": path, **means,
                        "num_failed": sum(r[first] != r[first] for r in rows), "samples": rows})
        table = write_results(cfg, settings, results, len(samples))  # each model's scores on disk as soon as they exist
    print(table)
    return results


def video_scorer(pipe, reward_path, clip_path, pick_path, processor_path, device, dtype, vae_precision):
    """score(final latents, prompts) -> ({column: (B,)}, save(b, path) -> file written): decoded once, VideoAlign
    (overall = VQ + MQ + TA), CLIPScore, PickScore; each video saved as mp4 (or a PNG frame grid)."""
    videoalign = reward.VideoAlignReward.from_pretrained(reward_path, device=device, dtype=dtype)
    clip_score = reward.ClipScore.from_pretrained(clip_path, device=device, dtype=dtype)
    pick_score = reward.PickScore.from_pretrained(pick_path, processor_path=processor_path or None,
                                                   device=device, dtype=dtype)

    def score(latents, prompts):
        with model.vae_autocast(pipe.vae, vae_precision):
            frames = pipe.decode(latents)  # (B, F, 3, H, W) in [0, 1]
        scores = dict(videoalign(frames, prompts))
        scores["overall"] = scores["vq"] + scores["mq"] + scores["ta"]
        scores["clip_score"], scores["pick_score"] = clip_score(frames, prompts), pick_score(frames, prompts)
        save = lambda b, path: save_video(frames[b], path)  # noqa: E731
        return scores, save
    return score


def world_scorer():
    """score(final latents, prompts) for --world: the world's exact reward of the latents and its diagnostics
    (world/video_world.WorldReward, default weights); each sample saved as a PNG of its latents."""
    from world import video_world
    world_reward = video_world.WorldReward()

    def score(latents, prompts):
        def save(b, path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            video_world.render_latents(latents[b:b + 1].cpu(), path + ".png", prompts=prompts[b:b + 1])
            return path + ".png"
        return world_reward(latents, prompts), save
    return score


if __name__ == "__main__":
    try:
        main(parse_config(cls=EvalConfig, description=__doc__))
    except (ValueError, EvalError, distributed.DirectoryLocked) as error:  # ours: one line, no traceback
        print(f"eval.py: error: {error}", file=sys.stderr, flush=True)
        sys.exit(2 if isinstance(error, ValueError) else 1)
