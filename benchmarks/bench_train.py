"""Overhead of train.py's machinery: one GRPO iteration vs the same transformer calls made bare.

    python benchmarks/bench_train.py                  # tiny random models, CPU, 1 process (gloo, not sharded)
    python benchmarks/bench_train.py --runs 5 --steps 4 --kl_mode none
    python benchmarks/bench_train.py --frames 9 --height 64 --width 64   # more tokens per video

The tiny model's transformer calls cost milliseconds, so the fixed per-iteration cost of the rest
(optimizer step, gradient clipping, log-probs, the reward, prompt encoding, logging; one CPU process
trains the plain modules, without FSDP2's hooks: distributed.fsdp_needed) weighs far more than it will
next to the real model's minutes of transformer work; a larger tiny video (`--frames/--height/--width`)
shows the ratio as transformer work grows.

Numerator: the wall time of one train.py iteration on the tiny models (the time between two
consecutive rows of metrics.jsonl: every phase, no checkpoint write in between), median over
`--runs` iterations after one warm-up. Denominator: the transformer calls that iteration makes,
made bare on an unwrapped copy of the same transformer with the same inputs, in a loop:
    N rollout forwards (no grad, batch 2B for CFG)
    per trained step: 1 anchor forward (no grad, if the KL mode has an anchor) and
                      1 policy forward + backward (gradient checkpointing as in training: off on a CPU
                      unless --gradient_checkpointing).
Reported: the ratio with and without the reward phase (VAE decode + VideoAlign: real work, but
not transformer work), and the peak resident memory of the process.
"""
import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere
import config
import model  # noqa: E402
import parallel  # noqa: E402
import reward  # noqa: E402
import sde  # noqa: E402
import tiny  # noqa: E402
import trust_region  # noqa: E402
import train  # noqa: E402


def bare_iteration(transformer, embeds, latent_shape, sigmas, cfg_scale, anchor):
    """The transformer calls of one iteration, nothing else: seconds."""
    batch = len(embeds)
    start = time.perf_counter()
    x = torch.randn(batch, *latent_shape)
    with torch.no_grad():
        for i in range(len(sigmas) - 1):  # ROLLOUT
            model.cfg_velocity(transformer, x, float(sigmas[i]), embeds, cfg_scale)
    for i in range(len(sigmas) - 1):  # UPDATE, one trained step at a time
        sigma = sigmas[i].float().expand(batch)
        if anchor:
            with torch.no_grad():
                model.cfg_velocity(transformer, x, sigma, embeds, cfg_scale)
        model.cfg_velocity(transformer, x, sigma, embeds, cfg_scale).square().mean().backward()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="timed iterations (after one warm-up)")
    parser.add_argument("--steps", type=int, default=4, help="denoising steps N (all trained)")
    parser.add_argument("--videos", type=int, default=2, help="videos per rank = group size")
    parser.add_argument("--kl_mode", default="dual")
    parser.add_argument("--optimizer", default="adamw", help="adamw (the figures of docs/measurements.md) or muon (train.py's "
                        "default; its Newton-Schulz is measured on its own by bench_optimizer.py)")
    parser.add_argument("--gradient_checkpointing", action="store_true", help="on in both (train.py's CPU default: off)")
    parser.add_argument("--train_glyph_projector", action="store_true",
                        help="train the byT5 glyph projector as well (train.py's default). Off here: at the tiny "
                        "widths it is 87 %% of the parameters (diffusers fixes its width at 2048), so its optimizer "
                        "step and all-gathers would be measured as overhead; at the real model's it is 0.15 %%")
    parser.add_argument("--frames", type=int, default=tiny.TINY_NUM_FRAMES, help="video frames (4k+1)")
    parser.add_argument("--height", type=int, default=tiny.TINY_HEIGHT, help="video height in pixels")
    parser.add_argument("--width", type=int, default=tiny.TINY_WIDTH, help="video width in pixels")
    args = parser.parse_args()
    torch.set_num_threads(1)  # shared CPUs: one thread is the least noisy

    with tempfile.TemporaryDirectory() as root:
        hunyuan_path = tiny.build_tiny_hunyuan(os.path.join(root, "hunyuan"))
        reward_path = tiny.build_tiny_videoalign(os.path.join(root, "videoalign"))
        out = os.path.join(root, "run")
        train.main(config.parse_config([
            "--tiny", "--model_path", hunyuan_path, "--reward_path", reward_path, "--output_dir", out,
            "--num_steps", str(args.steps), "--group_size", str(args.videos), "--videos_per_rank", str(args.videos),
            "--kl_mode", args.kl_mode, "--max_iterations", str(args.runs + 1), "--optimizer", args.optimizer,
            "--checkpoint_every", str(10 ** 9), "--sample_every", "0",
            "--gradient_checkpointing" if args.gradient_checkpointing else "--no-gradient_checkpointing",
            "--train_glyph_projector" if args.train_glyph_projector else "--no-train_glyph_projector",
            "--num_frames", str(args.frames), "--height", str(args.height), "--width", str(args.width)]))
        with open(os.path.join(out, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f]
        # wall time of iteration i = time between the metrics rows of i-1 and i (no checkpoint in between)
        walls = [b["unix_time"] - a["unix_time"] for a, b in zip(rows, rows[1:])]
        rows = rows[1:]  # the warm-up iteration has no predecessor
        total = statistics.median(walls)
        without_reward = statistics.median(w - r["time_reward"] for w, r in zip(walls, rows))
        peak_train = max(r["peak_memory_gb"] for r in rows)

        pipe = model.load_hunyuan(hunyuan_path, dtype=torch.float32)
        transformer = pipe.transformer.requires_grad_(True)
        for block in transformer.transformer_blocks:  # the attention train.py runs (parallel.enable, sp 1)
            block.attn.set_processor(parallel.KeyMaskAttnProcessor())
        if args.gradient_checkpointing:
            transformer.enable_gradient_checkpointing()
        prompts = ["a cat"] * args.videos
        embeds = model.encode_prompts(pipe, prompts)
        latent_shape = pipe.latent_shape(args.frames, args.height, args.width)
        sigmas = sde.shifted_sigmas(args.steps, 5.0)
        anchor = trust_region.kl_weights(args.kl_mode, 1.0, 0.1)[0] > 0
        bare_iteration(transformer, embeds, latent_shape, sigmas, 6.0, anchor)  # warm-up
        bare = statistics.median(bare_iteration(transformer, embeds, latent_shape, sigmas, 6.0, anchor)
                                 for _ in range(args.runs))

    print(f"tiny GRPO iteration ({args.steps} steps, {args.videos} videos, kl_mode {args.kl_mode}, "
          f"{args.frames}x{args.height}x{args.width} video = latent {tuple(latent_shape)}), "
          f"median of {args.runs}, 1 CPU thread")
    print(f"  train.py iteration, all phases        {total:8.3f} s")
    print(f"  train.py iteration, without reward    {without_reward:8.3f} s")
    print(f"  bare transformer calls                {bare:8.3f} s")
    print(f"  overhead ratio (all phases)           {total / bare:8.3f}")
    print(f"  overhead ratio (without reward phase) {without_reward / bare:8.3f}   (target <= 1.15)")
    print(f"  peak RSS during training              {peak_train:8.3f} GiB")
    print(f"  peak RSS of this process              {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:8.3f} GiB")


if __name__ == "__main__":
    main()
