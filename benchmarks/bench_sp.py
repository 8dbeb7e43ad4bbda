"""Per-iteration overhead of sequence parallelism: 2 ranks sp = 2 vs 2 ranks sp = 1, same global batch.

    python benchmarks/bench_sp.py                                   # 17x96x96 video, tiny models, CPU (gloo)
    python benchmarks/bench_sp.py --frames 5 --height 16 --width 16 --runs 3

Both runs: 2 ranks (1 CPU thread each), one group of 4 videos per iteration, the same steps.
sp = 1: each rank makes 2 whole videos (data parallel). sp = 2: both ranks hold all 4 videos and
each computes half of every video's tokens (Ulysses). The transformer work per rank is the same
(half the tokens of twice the videos; attention: 4·(L/2)·L = 2·L·L either way), so the ratio is the
cost of sequence parallelism itself: all-to-alls and gathers, the embedders and text refiner that
every rank of a group runs whole, prompt encoding on both ranks; decoding and scoring are shared.
Wall time per iteration: the time between consecutive rows of metrics.jsonl (no checkpoint in
between), median over --runs iterations after one warm-up.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import tiny  # noqa: E402


def iteration_seconds(output_dir, runs):
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return statistics.median(b["unix_time"] - a["unix_time"] for a, b in zip(rows, rows[1:])), rows[1:runs + 1]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="timed iterations (after one warm-up)")
    parser.add_argument("--steps", type=int, default=4, help="denoising steps N (all trained)")
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--height", type=int, default=96)
    parser.add_argument("--width", type=int, default=96)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        hunyuan = tiny.build_tiny_hunyuan(os.path.join(root, "hunyuan"))
        videoalign = tiny.build_tiny_videoalign(os.path.join(root, "videoalign"))
        seconds, rows = {}, {}
        for sp, videos_per_rank in ((1, 2), (2, 4)):
            out = os.path.join(root, f"sp{sp}")
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
                       "--tiny", "--model_path", hunyuan, "--reward_path", videoalign, "--output_dir", out,
                       "--num_steps", str(args.steps), "--group_size", "4", "--videos_per_rank", str(videos_per_rank),
                       "--sp_size", str(sp), "--max_iterations", str(args.runs + 1), "--checkpoint_every", str(10 ** 9),
                       "--sample_every", "0", "--num_frames", str(args.frames), "--height", str(args.height),
                       "--width", str(args.width)]
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            subprocess.run(command, cwd=REPO, env=env, check=True, capture_output=True)
            seconds[sp], rows[sp] = iteration_seconds(out, args.runs)
    phases = ("time_rollout", "time_reward", "time_update")
    print(f"tiny GRPO iteration, {args.frames}x{args.height}x{args.width} video, {args.steps} steps, 4 videos on "
          f"2 ranks (1 CPU thread each), median of {args.runs} after a warm-up")
    for sp in (1, 2):
        detail = ", ".join(f"{p[5:]} {statistics.median(r[p] for r in rows[sp]):.2f}" for p in phases)
        print(f"  sp = {sp}: {seconds[sp]:7.2f} s per iteration ({detail})")
    print(f"  ratio sp=2 / sp=1: {seconds[2] / seconds[1]:.3f}")


if __name__ == "__main__":
    main()
