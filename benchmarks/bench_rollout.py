"""Benchmark one policy rollout (model.rollout): median wall time and transformer forwards per step.

    python benchmarks/bench_rollout.py                      # tiny random model, CPU, 20 steps, CFG 6
    python benchmarks/bench_rollout.py --runs 10 --batch 4 --kernel flow_grpo
    python benchmarks/bench_rollout.py --path /ckpt/HunyuanVideo-1.5-Diffusers-480p_t2v --device cuda \\
        --dtype bfloat16 --frames 81 --height 352 --width 624 --batch 1 --runs 3

Without --path a tiny random HunyuanVideo-1.5 is written to a temporary directory by
tiny.build_tiny_hunyuan and loaded through model.load_hunyuan, like the tests. The forward count
is taken with a forward hook on the transformer: with batched CFG it must be exactly 1 per step.
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere
import model  # noqa: E402
import tiny  # noqa: E402
import sde  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path", default=None, help="diffusers-format HunyuanVideo-1.5 directory (default: tiny random model)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--steps", type=int, default=20, help="sampling steps (official SAGE-GRPO: 20)")
    parser.add_argument("--runs", type=int, default=5, help="timed rollouts (after one warm-up)")
    parser.add_argument("--batch", type=int, default=2, help="rollouts per call")
    parser.add_argument("--kernel", default="sage", choices=sde.KERNELS)
    parser.add_argument("--eta", type=float, default=0.5, help="official SAGE-GRPO default 0.5")
    parser.add_argument("--cfg_scale", type=float, default=None, help="guidance scale (default: the checkpoint's); "
                        "1 = CFG-free: the conditional branch alone, one forward of batch B per step")
    parser.add_argument("--frames", type=int, default=tiny.TINY_NUM_FRAMES)
    parser.add_argument("--height", type=int, default=tiny.TINY_HEIGHT)
    parser.add_argument("--width", type=int, default=tiny.TINY_WIDTH)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        path = args.path or tiny.build_tiny_hunyuan(os.path.join(tmp, "tiny"))
        policy = model.load_hunyuan(path, device=args.device, dtype=getattr(torch, args.dtype))
    embeds = model.encode_prompts(policy, ["a corgi surfing a wave at sunset"]).repeat_interleave(args.batch)
    latent_shape = policy.latent_shape(args.frames, args.height, args.width)
    sigmas = sde.shifted_sigmas(args.steps, policy.shift)
    scale = policy.guidance_scale if args.cfg_scale is None else args.cfg_scale

    forwards, rows = [], []  # forward passes, and the batch rows each one carries
    policy.transformer.register_forward_hook(lambda module, inputs, output: forwards.append(1))
    policy.transformer.register_forward_pre_hook(lambda module, args, kwargs: rows.append(kwargs["hidden_states"].shape[0]),
                                                 with_kwargs=True)

    def one_rollout(run):
        seeds = [1000 * run + b for b in range(args.batch)]
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        model.rollout(policy.transformer, embeds, seeds, latent_shape, sigmas, kernel=args.kernel, eta=args.eta,
                      guidance_scale=scale)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - start

    one_rollout(run=0)  # warm-up
    forwards.clear()
    rows.clear()
    times = [one_rollout(run) for run in range(1, args.runs + 1)]

    print(f"model: {'tiny random (build_tiny_hunyuan)' if args.path is None else args.path}; device {args.device}, "
          f"{args.dtype}, {torch.get_num_threads()} CPU threads")
    print(f"rollout: batch {args.batch}, latent {latent_shape}, {args.steps} steps, kernel {args.kernel}, "
          f"CFG {scale:g}")
    print(f"median rollout time over {args.runs} runs: {statistics.median(times):.3f} s "
          f"(min {min(times):.3f}, max {max(times):.3f}); per step {statistics.median(times) / args.steps * 1e3:.1f} ms")
    print(f"transformer forward passes per step: {len(forwards) / (args.runs * args.steps):g}, "
          f"{statistics.fmean(rows):g} rows each (batch {args.batch}; x2 with CFG)")
    print(f"text tokens per row: {embeds.mask.shape[1]} Qwen2.5-VL + {embeds.mask_2.shape[1]} byT5 + "
          f"{model.IMAGE_EMBED_TOKENS} image slot (padding trimmed; the pipeline feeds 1000 + 256 + 729)")


if __name__ == "__main__":
    main()
