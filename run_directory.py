"""The run directory and the run's life around the loop: what `train.py` writes, and how a run stops.

output_dir holds one run, written by one process at a time:

    checkpoint-NNNNNN/   atomic, verified checkpoints (distributed.py writes them; --keep_checkpoints newest kept)
    metrics.jsonl        one JSON row per iteration (rank 0 appends; a resume cuts it back to its checkpoint)
    curves.png           the curves practitioners watch, redrawn at every checkpoint (`plot_metrics`)
    samples/             a sample video every --sample_every iterations (`save_sample`)
    .lock                held by rank 0 while a run is live (distributed.lock_run_directory)

`prepare_output_dir` takes the lock, clears an --overwrite, and picks the checkpoint a --resume continues from.
`StopRequest` turns SIGTERM (preemption) and a first Ctrl-C into "checkpoint, one line, exit"; `RunError` is an
error we wrote, printed once by rank 0 without a traceback (config.report_error).
"""
import json
import math
import os
import shutil
import signal
import sys

import torch
import torch.distributed as dist

import config
import distributed
import reward
import tracking

class RunError(RuntimeError):
    """A run that must stop, with a message we wrote (printed once, by rank 0, without a traceback)."""




def collective_failure(error):
    """Whether an error is a collective that timed out or lost its peer (gloo raises plain RuntimeErrors)."""
    text = str(error).lower()
    return any(sign in text for sign in ("timed out", "timeout", "connection closed by peer", "connection reset"))




def prepare_output_dir(cfg, rank, on_exit):
    """Make output_dir ready (rank 0 works, every rank gets the result): first the directory's lock (one
    writer at a time; `on_exit` holds it until the run ends), then stale .tmp directories removed; with
    --overwrite the previous run's files deleted; with --resume the newest checkpoint that verifies chosen
    (each newer one that does not is named, with the reason) and metrics.jsonl cut back to its iteration,
    so that no row is repeated (a torn last line, from a crash mid-write, is dropped). Returns the
    checkpoint to resume from, or None."""
    chosen = [None]
    if rank == 0:
        try:
            on_exit.enter_context(distributed.lock_run_directory(cfg.output_dir))
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
                    config.check_resume_config(cfg, chosen[0], dist.get_world_size())
                with open(os.path.join(chosen[0], "trainer_state.json")) as f:
                    resumed_at = json.load(f)["iteration"]
                torn, lost = truncate_metrics(os.path.join(cfg.output_dir, "metrics.jsonl"), resumed_at)
                if lost:
                    print(f"resume: metrics.jsonl: the row of iteration {', '.join(map(str, lost))} is lost (torn by the "
                          f"crash while it was written; the weights of {os.path.basename(chosen[0])} hold that "
                          f"iteration's update, its logged numbers are gone)", flush=True)
                elif torn:
                    print(f"resume: metrics.jsonl: dropped {torn} unreadable line(s) (no iteration's row is missing)",
                          flush=True)
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
    unreadable (torn) lines; atomic. Returns (the number of lines dropped as unreadable, the iterations up to
    `iteration` that have no row left: those a torn line held)."""
    if not os.path.isfile(path):
        return 0, []
    rows, torn = read_metrics(path)
    kept = [row for row in rows if row["iteration"] <= iteration]
    with open(path + ".tmp", "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in kept)
    os.replace(path + ".tmp", path)
    logged = {row["iteration"] for row in kept}
    return torn, [i for i in range(1, iteration + 1) if i not in logged] if torn else []


class StopRequest:
    """SIGTERM (cluster schedulers send it before a kill; torchrun forwards it to every rank) or a first Ctrl-C
    (SIGINT) sets `.signal` to the signal's name: the loop then writes a checkpoint, prints one line and returns.
    A second Ctrl-C stops at once (KeyboardInterrupt). Used as a context manager: the previous handlers are
    restored on exit."""

    def __init__(self):
        self.signal = None  # None until a stop is requested

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.signal is not None:
            raise KeyboardInterrupt  # the second Ctrl-C
        self.signal = signal.Signals(signum).name
        if signum == signal.SIGINT and int(os.environ.get("RANK", 0)) == 0:
            print(f"\n{self.signal}: the run stops after this iteration's checkpoint (Ctrl-C again to stop at once)",
                  file=sys.stderr, flush=True)

    def __enter__(self):
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def print_summary(cfg):
    """Rank 0, at the end of a run: where everything went and how the reward moved."""
    rows, _ = read_metrics(os.path.join(cfg.output_dir, "metrics.jsonl"))
    rows = [r for r in rows if "reward_mean" in r]  # the iterations (not --eval_every's iteration-0 row)
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




def append_row(cfg, row, tracker):
    """Rank 0: append one row to output_dir/metrics.jsonl and send it to the tracker, at step row["iteration"]."""
    with open(os.path.join(cfg.output_dir, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")
    tracker.log(row, step=row["iteration"])


def log_metrics(cfg, metrics, bar, tracker):
    """Rank 0: an iteration's row (append_row), and the progress bar's numbers."""
    append_row(cfg, metrics, tracker)
    shown = {"reward": f"{metrics['reward_mean']:.3f}", "skip": metrics["skipped_updates_total"]}
    if cfg.updates_per_rollout > 1:  # with one update per rollout ρ = 1: approx_kl and clip are 0 by construction
        shown.update(kl=f"{metrics['approx_kl']:.1e}", clip=f"{metrics['clip_fraction']:.2f}")
    bar.set_postfix(shown)


def save_sample(cfg, iteration, frames, latents, prompts, tracker, render_latents=None):
    """Rank 0: the first video of this rank's batch under output_dir/samples/: decoded frames as a video,
    or, for a reward of latents (the world, whose random tiny VAE decodes to noise), a PNG drawn by
    `render_latents(latents, path, prompts=...)`; also sent to the tracker, with its prompt. Returns the path written."""
    path = os.path.join(cfg.output_dir, "samples", f"iter{iteration:06d}")
    if frames is not None:
        path = save_video(frames[0], path)  # (F, 3, H, W) in [0, 1]
    else:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        path += ".png"
        render_latents(latents[:1].cpu(), path, prompts=prompts[:1])
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
    # a resumed run may have logged an iteration twice (the later row wins); drawn in the order of the iterations
    rows = sorted({r["iteration"]: r for r in rows}.values(), key=lambda r: r["iteration"])
    components = tuple(next((r["reward_components"] for r in reversed(rows) if "reward_components" in r), ()))
    panels = []  # (title, {key: points}) of every panel with something to draw; a panel without data is left out
    for title, keys in CURVE_PANELS:
        lines = {}
        for key in keys + (components if title == "reward" else ()):
            # every number at its row's iteration: the iterations done (eval/ rows of runs before 2026-12-07 say
            # which policy they scored in eval/after_iterations)
            points = [(r.get("eval/after_iterations", r["iteration"]) if key.startswith("eval/") else r["iteration"],
                       r[key]) for r in rows if isinstance(r.get(key), (int, float))]
            if points:
                lines[key] = points
        if lines:
            panels.append((title, lines))
    columns = 3
    figure, axes = plt.subplots(max(1, math.ceil(len(panels) / columns)), columns, squeeze=False,
                                figsize=(13, 3.25 * max(1, math.ceil(len(panels) / columns))))
    for axis in axes.flat[len(panels):]:
        axis.set_visible(False)
    for axis, (title, lines) in zip(axes.flat, panels):
        for key, points in lines.items():
            axis.plot(*zip(*points), marker="." if len(points) < 30 else None, label=key)
        axis.set_title(title, fontsize=9)
        axis.set_xlabel("iteration")
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(png_path + ".tmp.png", dpi=80)
    drawn = {(axis.get_title(), line.get_label()): (list(line.get_xdata()), list(line.get_ydata()))
             for axis in axes.flat if axis.get_visible() for line in axis.get_lines()}
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
