"""Cost of one optimizer step: Muon + AdamW (optimizer.py, the official default) vs AdamW alone.

    python benchmarks/bench_optimizer.py                 # tiny and medium transformer, CPU, 1 process
    python benchmarks/bench_optimizer.py --runs 11

Two HunyuanVideo15Transformer3DModel configs, unsharded, fp32, gradients from one real backward:
* tiny: the test model of tiny.build_tiny_hunyuan (hidden 16, one block; 4.3 M parameters, most
  of them the byT5 projection's fixed 2048 x 2048 matrix);
* medium: hidden 512 (8 heads x 64), 2 blocks, one refiner block, mlp ratio 4: a model where the step
  costs measurable time, next to one forward + backward on the tokens of a 17x96x96 video through
  the tiny VAE (9 x 24 x 24 = 5,184 latent tokens), the setting of bench_train.py's largest row.
Reported: median step time over --runs steps after one warm-up, the Muon / AdamW ratio, and the
Muon step as a fraction of the forward + backward. Muon's extra cost is Newton-Schulz: 5 x 3
bf16 matmuls per matrix, O(A·B·min(A, B)), on every rank for sharded matrices.
"""
import argparse
import os
import statistics
import sys
import time

import torch
from diffusers import HunyuanVideo15Transformer3DModel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere
import optimizer  # noqa: E402

CONFIGS = {
    "tiny": dict(num_attention_heads=2, attention_head_dim=8, num_layers=1, num_refiner_layers=1, mlp_ratio=2.0),
    "medium": dict(num_attention_heads=8, attention_head_dim=64, num_layers=2, num_refiner_layers=1, mlp_ratio=4.0),
}
LATENT = (4, 9, 24, 24)   # (C, F, H, W): 17x96x96 frames through the tiny VAE (4x spatial, 2x temporal)


def build(name):
    torch.manual_seed(0)
    return HunyuanVideo15Transformer3DModel(in_channels=2 * 4 + 1, out_channels=4, text_embed_dim=16, text_embed_2_dim=32,
                                            image_embed_dim=12, rope_axes_dim=(2, 2, 4) if name == "tiny" else (16, 24, 24),
                                            target_size=16, task_type="t2v", **CONFIGS[name])


def forward_backward(transformer):
    """One T2V forward + backward on a 17x96x96 video's latent: seconds."""
    hidden_states = torch.randn(1, 2 * LATENT[0] + 1, *LATENT[1:])
    start = time.perf_counter()
    output = transformer(hidden_states=hidden_states, timestep=torch.tensor([600.0]),
                         encoder_hidden_states=torch.randn(1, 7, 16), encoder_attention_mask=torch.ones(1, 7),
                         encoder_hidden_states_2=torch.randn(1, 7, 32), encoder_attention_mask_2=torch.ones(1, 7),
                         image_embeds=torch.zeros(1, 0, 12), return_dict=False)[0]
    output.pow(2).mean().backward()
    return time.perf_counter() - start


def median_step_time(transformer, kind, runs):
    opt = optimizer.build_optimizer(transformer, kind)
    times = []
    for _ in range(runs + 1):                      # the first step (state allocation) is a warm-up
        start = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="timed optimizer steps per (model, optimizer)")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU; median of {args.runs} steps")
    print("| model | parameters | Muon step | AdamW step | Muon / AdamW | fwd+bwd 17x96x96 | Muon step / fwd+bwd |")
    print("|---|---|---|---|---|---|---|")
    for name in CONFIGS:
        transformer = build(name)
        fwd_bwd = forward_backward(transformer)      # also leaves the gradients the steps use
        muon, adamw = (median_step_time(transformer, kind, args.runs) for kind in ("muon", "adamw"))
        count = sum(p.numel() for p in transformer.parameters())
        print(f"| {name} | {count / 1e6:.1f} M | {muon * 1e3:.0f} ms | {adamw * 1e3:.1f} ms | {muon / adamw:.0f}x "
              f"| {fwd_bwd:.2f} s | {muon / fwd_bwd:.2f} |")


if __name__ == "__main__":
    main()
