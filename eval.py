"""Evaluate HunyuanVideo-1.5 checkpoints side by side: deterministic ODE samples, scored by VideoAlign,
CLIPScore and PickScore.

Every model (the base transformer of --model_path, then each --checkpoints directory) samples the
same prompts from the same seeded noise with the deterministic ODE (Euler) sampler, so the only
difference between rows of the table is the transformer weights. Each video is decoded once and
scored by
    VideoAlign  VQ (visual quality), MQ (motion quality), TA (text alignment) and
                overall = VQ + MQ + TA, the unweighted sum the paper's tables report
                (SAGE-GRPO: −0.477 − 0.238 + 1.522 = 0.807); the training reward's 0.5/0.5/1.0
                weighting is a training choice, not the reported metric;
    CLIPScore   CLIP image-text similarity, averaged over frames;
    PickScore   the PickScore CLIP model's image-text score, averaged over frames.
Writes output_dir/results.json (per model and per sample), output_dir/results.md (one table, one
row per model) and output_dir/videos/<model>/<prompt>_<seed>.mp4 (a PNG frame grid when
imageio-ffmpeg is not installed). Both result files are rewritten after every model, so a failure
later (a bad checkpoint, a kill) never loses the scores of the models already evaluated.

    # real weights, one GPU: hub ids already in the hub cache (`hf download <id>` once; nothing is downloaded
    # here) or local directories, e.g. --model_path ckpts/HunyuanVideo-1.5-480p_t2v
    python eval.py --model_path hunyuanvideo-community/HunyuanVideo-1.5-480p_t2v --reward_path KwaiVGI/VideoReward \\
        --clip_path openai/clip-vit-large-patch14 --pickscore_path yuvalkirstain/PickScore_v1 \\
        --pickscore_processor_path laion/CLIP-ViT-H-14-laion2B-s32B-b79K \\
        --checkpoints runs/sage/checkpoint-000500 --prompts prompts/example.txt --output_dir runs/eval
    # no weights, CPU: random tiny models, e.g. on the checkpoint of a `train.py --tiny` run
    python eval.py --tiny --model_path runs/tiny/tiny_hunyuan --reward_path runs/tiny/tiny_videoalign \\
        --checkpoints runs/tiny/checkpoint-000004 --output_dir runs/tiny_eval
"""
import dataclasses
import json
import math
import os
import re
import typing
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

import hub
import model
import reward
import sde
import tiny
from train import load_prompts, parse_config, resolve_sampling, save_video


@dataclass
class EvalConfig:
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
    """transformer directories to compare with the base (a train.py checkpoint-N/ or its transformer/)"""
    prompts: str = "prompts/example.txt"
    """prompt file (.txt / .csv / .jsonl, as train.py)"""
    output_dir: str = "runs/eval"
    """results.json, results.md and videos/ go here"""
    tiny: bool = False
    """random tiny HunyuanVideo-1.5, VideoAlign and CLIP models built on the fly, CPU"""
    seed: int = 0
    """seed of the first video of each prompt; prompt i, video j uses seed + 1000·i + j"""
    videos_per_prompt: int = 1
    """seeds per prompt"""
    num_steps: int = 50
    """ODE steps (HunyuanVideo15Pipeline default num_inference_steps 50)"""
    shift: typing.Optional[float] = None
    """schedule shift; default: the base checkpoint's scheduler config (480p T2V: 5), as in training"""
    cfg_scale: typing.Optional[float] = None
    """classifier-free guidance scale; default: the base checkpoint's guider config (480p T2V: 6)"""
    num_frames: typing.Optional[int] = None
    """frames; default 81 as the training rollouts (official sample_n_frames), 5 with --tiny"""
    height: typing.Optional[int] = None
    """height in pixels; default 352 (official 480p bucket 352x624), 16 with --tiny"""
    width: typing.Optional[int] = None
    """width in pixels; default 624 (official 480p bucket 352x624), 16 with --tiny"""
    batch_size: int = 2
    """videos sampled per forward batch"""
    vae_tiling: typing.Optional[bool] = None
    """decode in overlapping 256-pixel tiles (model.set_vae_tiling), as train.py: default on with CUDA, off on CPU;
    results.json stores the value used"""


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
        name = parts[-2] if parts[-1] == "transformer" and len(parts) > 1 else parts[-1]
        names.append(name if name not in names else f"{name}_{len(names)}")
    return names


def markdown_table(results):
    columns = ["vq", "mq", "ta", "overall", "clip_score", "pick_score"]
    lines = ["| model | VQ | MQ | TA | VideoAlign overall | CLIPScore | PickScore |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['name']} | " + " | ".join(f"{r[c]:.4f}" for c in columns) + " |")
    return "\n".join(lines) + "\n"


def write_results(cfg, results, num_videos):
    """results.json and results.md for the models evaluated so far (atomic: each file is complete or absent)."""
    os.makedirs(cfg.output_dir, exist_ok=True)
    table = markdown_table(results)
    outputs = {"results.json": json.dumps({"config": dataclasses.asdict(cfg), "models": results}, indent=1),
               "results.md": f"{num_videos} videos per model, {cfg.num_steps} ODE steps, CFG {cfg.cfg_scale}, "
                             f"{cfg.num_frames} frames at {cfg.height}x{cfg.width}\n\n" + table}
    for name, text in outputs.items():
        with open(os.path.join(cfg.output_dir, name + ".tmp"), "w") as f:
            f.write(text)
        os.replace(os.path.join(cfg.output_dir, name + ".tmp"), os.path.join(cfg.output_dir, name))
    return table


def main(cfg):
    prompts = load_prompts(cfg.prompts)  # bad input fails before any model is loaded
    for name in ("videos_per_prompt", "batch_size", "num_steps"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(cfg, name)}")
    for name in ("shift", "cfg_scale"):
        value = getattr(cfg, name)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ValueError(f"--{name} must be a finite number > 0, got {value}")
    paths = [transformer_dir(p) for p in cfg.checkpoints]
    # each model a local directory, or a hub id resolved to its snapshot in the hub cache (hub.py; never
    # downloaded); with --tiny an empty path means "build a random tiny one"
    for name in ("model_path", "reward_path", "clip_path", "pickscore_path", "pickscore_processor_path"):
        value = getattr(cfg, name)
        if value or not (cfg.tiny or name == "pickscore_processor_path"):
            try:
                cfg = dataclasses.replace(cfg, **{name: hub.resolve_path(value, f"--{name}")})
            except FileNotFoundError as error:
                raise ValueError(f"{error}{'' if cfg.tiny else ', or use --tiny'}") from None
    from diffusers import HunyuanVideo15Transformer3DModel

    model_path, reward_path, clip_path, pick_path = cfg.model_path, cfg.reward_path, cfg.clip_path, cfg.pickscore_path
    if cfg.tiny:  # random tiny models in the real layouts, the same code path as real weights (tiny.py)
        tiny_paths = tiny.tiny_model_paths(os.path.join(cfg.output_dir, "tiny_models"), hunyuan=model_path,
                                      videoalign=reward_path, clip=clip_path)
        model_path, reward_path, clip_path = tiny_paths["hunyuan"], tiny_paths["videoalign"], tiny_paths["clip"]
        pick_path = pick_path or clip_path
    cfg = dataclasses.replace(cfg, **dict(zip(("num_frames", "height", "width"),
                                              tiny.video_size(cfg.num_frames, cfg.height, cfg.width, cfg.tiny))))
    cfg, sources = resolve_sampling(cfg, model_path)  # shift and CFG scale: the base checkpoint's unless given
    device = torch.device("cuda" if torch.cuda.is_available() and not cfg.tiny else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    # text encoders, VAE, scheduler only: each evaluated transformer, the base one included, is loaded below
    pipe = model.load_hunyuan(model_path, device="cpu", dtype=dtype, load_transformer=False)
    for module in (pipe.pipeline.text_encoder, pipe.pipeline.text_encoder_2, pipe.vae):
        module.to(device)
    cfg = dataclasses.replace(cfg, vae_tiling=model.set_vae_tiling(pipe.vae, cfg.vae_tiling))  # None: on with CUDA
    print(f"eval: shift {cfg.shift:g} ({sources['shift']}), CFG scale {cfg.cfg_scale:g} ({sources['cfg_scale']}), "
          f"{cfg.num_steps} ODE steps, {cfg.num_frames} frames at {cfg.height}x{cfg.width}, "
          f"VAE tiling {'on' if cfg.vae_tiling else 'off'}", flush=True)
    videoalign = reward.VideoAlignReward.from_pretrained(reward_path, device=device, dtype=dtype)
    clip_score = reward.ClipScore.from_pretrained(clip_path, device=device, dtype=dtype)
    pick_score = reward.PickScore.from_pretrained(pick_path, processor_path=cfg.pickscore_processor_path or None,
                                                   device=device, dtype=dtype)
    embeds = model.encode_prompts(pipe, prompts, device=device, dtype=dtype)
    samples = [(i, j, cfg.seed + 1000 * i + j) for i in range(len(prompts)) for j in range(cfg.videos_per_prompt)]
    sigmas = sde.shifted_sigmas(cfg.num_steps, cfg.shift)
    latent_shape = pipe.latent_shape(cfg.num_frames, cfg.height, cfg.width)

    results = []
    for name, path in zip(model_names(paths), [os.path.join(model_path, "transformer")] + paths):
        transformer = HunyuanVideo15Transformer3DModel.from_pretrained(path, torch_dtype=dtype).to(device).eval()
        rows = []
        for start in tqdm(range(0, len(samples), cfg.batch_size), desc=name, unit="batch"):
            batch = samples[start:start + cfg.batch_size]
            batch_prompts = [prompts[i] for i, _, _ in batch]
            # ODE sampler: the same noise gives the same video for the same weights (all calls run without grad)
            rollout = model.rollout(transformer, embeds.select([i for i, _, _ in batch]), [s for _, _, s in batch],
                                    latent_shape, sigmas, kernel="ode", eta=0.0, guidance_scale=cfg.cfg_scale)
            frames = model.decode_latents(pipe.vae, rollout.final_latents)  # (B, F, 3, H, W) in [0, 1]
            va = videoalign(frames, batch_prompts)
            clip, pick = clip_score(frames, batch_prompts), pick_score(frames, batch_prompts)
            for b, (i, j, seed) in enumerate(batch):
                slug = re.sub(r"[^a-z0-9]+", "_", prompts[i].lower())[:40].strip("_")
                video = (frames[b].permute(0, 2, 3, 1) * 255).round().to(torch.uint8).cpu()  # (F, H, W, 3)
                file = save_video(video, os.path.join(cfg.output_dir, "videos", name, f"{i:03d}_{slug}_seed{seed}"))
                vq, mq, ta = (float(va[k][b]) for k in ("vq", "mq", "ta"))
                rows.append({"prompt": prompts[i], "seed": seed, "vq": vq, "mq": mq, "ta": ta, "overall": vq + mq + ta,
                             "clip_score": float(clip[b]), "pick_score": float(pick[b]),
                             "video": os.path.relpath(file, cfg.output_dir)})
        del transformer
        means = {k: torch.tensor([r[k] for r in rows]).nanmean().item()
                 for k in ("vq", "mq", "ta", "overall", "clip_score", "pick_score")}
        results.append({"name": name, "path": path, **means,
                        "num_failed": sum(r["vq"] != r["vq"] for r in rows), "samples": rows})
        table = write_results(cfg, results, len(samples))  # each model's scores on disk as soon as they exist
    print(table)
    return results


if __name__ == "__main__":
    main(parse_config(cls=EvalConfig, description=__doc__))
