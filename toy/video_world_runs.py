"""The real train.py in the synthetic video world: the headline run and the paper's comparison.

Every run is `torchrun --standalone --nproc_per_node 2 train.py --world ...`: the unchanged trainer,
model and maths modules, on the world's pretrained tiny HunyuanVideo-1.5 (toy/video_world.py). This
script only launches runs, reads their metrics.jsonl and draws pictures:

    python toy/video_world_runs.py                # headline: SAGE-GRPO, 3 seeds -> table + pictures
    python toy/video_world_runs.py --comparison   # + kernels, equalizer on/off, KL modes, 3 seeds each

Numbers reported per run, from the rollouts the trainer logs (SDE samples of the policy being
trained, `--world` metrics):
    reward                the world's reward (mean over the iteration's rollouts)
    on_manifold_reward    the reward of each rollout's nearest data video: the honest part
    off_manifold          the exact RMS distance of the rollouts to the data manifold
"Before" is iteration 1 (the pretrained policy's rollouts, before its first update); "after" is the
mean of the last LAST iterations. Seeds differ in prompts order, noise and step order.

World settings that differ from the official video recipe, and why (the toy's reasons, one level up):
* lr 2e-4 with AdamW (official 1e-5 with Muon). The tiny transformer's log-probs are element means
  over 192 latent elements instead of ~10^6, and a run must show learning within minutes (a sweep of
  1e-4 / 2e-4 / 3e-4 / 1e-3 over 40-150 iterations: 1e-4 learns slowly, 2e-4 clearly, 3e-4 and 1e-3
  collapse off the manifold); the comparison uses AdamW for all methods alike.
* num_steps, shift and CFG scale are the world's (toy/video_world.py), set in its checkpoint.
* group size 8 and 8 videos per rank (official 4 and 2): 16 videos per iteration, 2 groups, so that
  one iteration's reward is not all noise.
Everything else (η 0.5, clip 1e-4, advantage clip 5, the official β controller 1e-7 -> 1e-5, anchor
period 10, dual weights 1.0 / 0.1, one update per rollout) is the official value.
"""
import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # the repository's modules (model, sde, toy) when run as a script
OUT = Path(__file__).resolve().parent / "out" / "video_world_runs"
LAST = 10                     # iterations averaged for "after" (one iteration's mean of 16 rewards has std ~0.15)
ITERATIONS = 150              # per run: ~4.5 minutes on 2 CPU cores
SEEDS = (0, 1, 2)
# The world's learning settings (module docstring): official values except lr/optimizer.
WORLD_FLAGS = ["--world", "--num_steps", "8", "--optimizer", "adamw", "--lr", "2e-4", "--group_size", "8", "--videos_per_rank", "8",
               "--checkpoint_every", "1000", "--sample_every", "0", "--keep_checkpoints", "1"]
HEADLINE = {"kernel": "sage", "equalizer": True, "kl_mode": "dual"}
# The paper's comparison, one factor at a time around the headline method.
COMPARISON = [dict(HEADLINE, kernel=k) for k in ("flow_grpo", "dance_grpo", "cps")] + [
    dict(HEADLINE, equalizer=False), dict(HEADLINE, kl_mode="none"), dict(HEADLINE, kl_mode="fixed")]


def flags(method, seed, iterations, extra=()):
    return WORLD_FLAGS + ["--kernel", method["kernel"], "--kl_mode", method["kl_mode"],
                          "--equalizer" if method["equalizer"] else "--no-equalizer",
                          "--seed", str(seed), "--max_iterations", str(iterations), *extra]


def name(method):
    return f"{method['kernel']}, equalizer {'on' if method['equalizer'] else 'off'}, KL {method['kl_mode']}"


def launch(method, seed, iterations, out, extra=(), nproc=2):
    """One train.py run with 2 ranks (gloo, CPU) into `out` (cleared first). Returns its metrics rows."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "train.py", *flags(method, seed, iterations, extra), "--output_dir", str(out), "--overwrite"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    started = time.time()
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    rows[-1]["wall_seconds"] = time.time() - started
    return rows


def summary(rows):
    """Before (iteration 1) and after (mean of the last LAST iterations) of the three numbers."""
    keys = ("reward_mean", "on_manifold_reward", "off_manifold")
    after = {k: statistics.fmean(r[k] for r in rows[-LAST:]) for k in keys}
    before = {k: rows[0][k] for k in keys}
    phases = {k: statistics.fmean(r[f"time_{k}"] for r in rows[1:]) for k in ("rollout", "reward", "update")}
    return {"before": before, "after": after, "phases": phases, "wall_seconds": rows[-1]["wall_seconds"],
            "activity": statistics.fmean(r["trust_region_activity"] for r in rows
                                         if isinstance(r.get("trust_region_activity"), float)
                                         and math.isfinite(r["trust_region_activity"])) if any(
                isinstance(r.get("trust_region_activity"), float) for r in rows) else float("nan"),
            "beta": rows[-1]["beta"]}


def mean_std(values):
    values = list(values)
    return statistics.fmean(values), (statistics.pstdev(values) if len(values) > 1 else 0.0)


def table(results):
    """results: {method name: [summary per seed]} -> markdown, mean ± std over seeds."""
    lines = ["| run | reward ↑ (before → after) | after, per seed | on-manifold reward ↑ | off-manifold distance ↓ | "
             "trust-region activity |", "|---|---|---|---|---|---|"]
    for method, runs in results.items():
        cells = []
        for key in ("reward_mean", "on_manifold_reward", "off_manifold"):
            b, bs = mean_std(r["before"][key] for r in runs)
            a, as_ = mean_std(r["after"][key] for r in runs)
            cells.append(f"{b:.3f} ± {bs:.3f} → {a:.3f} ± {as_:.3f}")
            if key == "reward_mean":  # a collapsed seed dominates a mean ± std of three: show each
                cells.append(" / ".join(f"{r['after'][key]:.2f}" for r in runs))
        act, act_s = mean_std(r["activity"] for r in runs)
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {act:.2e} ± {act_s:.1e} |")
    return "\n".join(lines) + "\n"


def curves(all_rows, path):
    """Reward, on-manifold reward and off-manifold distance per iteration, one line per seed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for axis, (key, title) in zip(axes, (("reward_mean", "reward ↑"), ("on_manifold_reward", "on-manifold reward ↑"),
                                         ("off_manifold", "off-manifold distance ↓"))):
        for seed, rows in all_rows.items():
            axis.plot([r["iteration"] for r in rows], [r[key] for r in rows], label=f"seed {seed}")
        axis.set_title(title)
        axis.set_xlabel("iteration")
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def comparison_curves(rows_per_method, path, window=10):
    """The comparison as pictures: per method, the mean over seeds of each number per iteration
    (a running mean over `window` iterations: one iteration's mean of 16 rewards is noisy)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for axis, (key, title) in zip(axes, (("reward_mean", "reward ↑"), ("on_manifold_reward", "on-manifold reward ↑"),
                                         ("off_manifold", "off-manifold distance ↓"))):
        for method, runs in rows_per_method.items():
            mean = [statistics.fmean(rows[i][key] for rows in runs) for i in range(min(len(r) for r in runs))]
            smooth = [statistics.fmean(mean[max(0, i - window + 1):i + 1]) for i in range(len(mean))]
            axis.plot(range(1, len(smooth) + 1), smooth, label=method, linewidth=1.2)
        axis.set_title(f"{title} (mean of {len(runs)} seeds, running mean {window})", fontsize=9)
        axis.set_xlabel("iteration")
    axes[0].legend(fontsize=6)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def before_after(checkpoint, path, seeds=(0, 1, 2, 3)):
    """ODE samples of the pretrained world policy and of a trained checkpoint, same prompts and noise."""
    import torch
    from diffusers import HunyuanVideo15Transformer3DModel
    import model
    import sde
    from toy import video_world
    base = video_world.prepare_world()
    pipe = model.load_hunyuan(base, dtype=torch.float32)
    prompts = list(video_world.WORLD_PROMPTS[:len(seeds)])
    embeds = model.encode_prompts(pipe, prompts)
    shape = pipe.latent_shape(video_world.WORLD_NUM_FRAMES, video_world.WORLD_HEIGHT, video_world.WORLD_WIDTH)
    sigmas = sde.shifted_sigmas(video_world.WORLD_NUM_STEPS, pipe.shift)
    rows, titles = [], []
    trained = HunyuanVideo15Transformer3DModel.from_pretrained(os.path.join(checkpoint, "transformer")).eval()
    for label, transformer in (("pretrained", pipe.transformer), ("after GRPO", trained)):
        result = model.rollout(transformer, embeds, list(seeds), shape, sigmas, kernel="ode", eta=0.0,
                               guidance_scale=pipe.guidance_scale)
        rows.append(result.final_latents)
        scores = video_world.WorldReward()(result.final_latents, prompts)
        titles += [f"{label}: r {r:.2f}, off {d:.2f}" for r, d in zip(scores["reward"], scores["off_manifold"])]
    video_world.render_latents(torch.cat(rows), str(path), prompts=prompts * 2, titles=titles)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--comparison", action="store_true", help="also run the paper's comparison (~1 hour)")
    parser.add_argument("--iterations", type=int, default=ITERATIONS)
    parser.add_argument("--rerun", action="store_true", help="run again even where a finished run exists")
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    methods = [HEADLINE] + (COMPARISON if args.comparison else [])
    results, headline_rows, all_rows = {}, {}, {}
    for method in methods:
        for seed in SEEDS:
            run_dir = out / f"{name(method).replace(', ', '_').replace(' ', '-')}_seed{seed}"
            print(f"{name(method)}, seed {seed} ...", flush=True)
            done = run_dir / "metrics.jsonl"
            rows = [json.loads(line) for line in open(done)] if done.exists() else []
            if len(rows) == args.iterations and not args.rerun:  # a finished run is reused (--rerun: run it again)
                rows[-1]["wall_seconds"] = rows[-1]["unix_time"] - rows[0]["unix_time"]  # first to last iteration
            else:
                rows = launch(method, seed, args.iterations, run_dir)
            results.setdefault(name(method), []).append(summary(rows))
            all_rows.setdefault(name(method), []).append(rows)
            if method is HEADLINE:
                headline_rows[seed] = rows
    text = table(results)
    headline = results[name(HEADLINE)]
    phases = {k: statistics.fmean(r["phases"][k] for r in headline) for k in ("rollout", "reward", "update")}
    total = sum(phases.values())
    text += (f"\nHeadline cost (2 ranks on 2 CPU cores, {args.iterations} iterations): "
             f"{statistics.fmean(r['wall_seconds'] for r in headline):.0f} s per run wall, "
             f"{total:.2f} s per iteration in the three phases: rollout {phases['rollout'] / total:.0%}, "
             f"reward {phases['reward'] / total:.0%}, update {phases['update'] / total:.0%}. "
             f"β at the end: {statistics.fmean(r['beta'] for r in headline):.2e}.\n")
    (out / "table.md").write_text(text)
    curves(headline_rows, out / "headline_curves.png")
    if args.comparison:
        comparison_curves(all_rows, out / "comparison_curves.png")
    before_after(out / f"{name(HEADLINE).replace(', ', '_').replace(' ', '-')}_seed0" / "checkpoint-{:06d}".format(
        args.iterations), out / "before_after.png")
    print(text)
    print(f"pictures: {out / 'headline_curves.png'}, {out / 'before_after.png'}"
          f"{', ' + str(out / 'comparison_curves.png') if args.comparison else ''}; table: {out / 'table.md'}")


if __name__ == "__main__":
    main()
