"""Experiment trackers: the rows of metrics.jsonl, the run's config and its sample videos, shown in
TensorBoard or Weights & Biases as the run goes (`train.py --report_to none | tensorboard | wandb`).

metrics.jsonl stays the record of a run (curves.png, the tests and the numbers in docs/ read it); a
tracker is a second view of the same rows for people who watch runs in a dashboard. Only rank 0 opens
one. Both packages are optional, imported only when chosen (`pip install tensorboard`, `pip install
wandb`; train.py checks that the chosen one is installed before it loads any model).

What is logged, at step = the row's `iteration` (1-based):
- every number of the row as a scalar under its metrics.jsonl name (`scalars` below): a boolean as
  0/1, a list of numbers as name/0, name/1, ... (ratio_max_dev_per_step: one per denoising step);
  text and lists of text (reward_components) are skipped, as are `iteration` (it is the step) and
  `unix_time` (every event carries its own wall time);
- the config, once per (re)start, at the iteration the run starts from: a markdown table of flags in
  TensorBoard's text tab; W&B's run config;
- each sample train.py saves (samples/iterNNNNNN.mp4, or .png for the world's latents) with its prompt:
  in TensorBoard an image (a PNG as it is, an mp4 as a strip of 8 evenly spaced frames: add_video
  would need moviepy), in W&B an Image or a Video.

Resume continues the same tracker run. The iterations logged after the checkpoint a run resumes from
(before the crash) are done again:
- TensorBoard (output_dir/tensorboard/): the writer opens with purge_step = start iteration + 1, and
  TensorBoard drops every event written before it at that step or later: each step is shown once,
  with the values of the resumed run, as in metrics.jsonl.
- W&B: the run id is kept in output_dir/wandb_run_id; the run is reopened with that id
  (`resume="allow"`). W&B never rewrites a step it already holds, so a re-done iteration keeps the
  values logged before the crash; a resumed run continues exactly, so they differ only in timings and
  peak memory.
  Offline (no account, no network): WANDB_MODE=offline; later `wandb sync output_dir/wandb/offline-run-*`.
  WANDB_PROJECT names the project (default "sage-grpo"); the run is named after output_dir.

--overwrite starts a new tracker run: train.py deletes tensorboard/ and wandb_run_id with the
previous run's metrics (W&B's own local files under output_dir/wandb/ belong to the old run id and
are left for `wandb sync`).
"""
import importlib.util
import os

TRACKERS = ("none", "tensorboard", "wandb")
TENSORBOARD_DIR = "tensorboard"  # under output_dir
WANDB_RUN_ID = "wandb_run_id"  # under output_dir: the W&B run a resumed run continues
PROJECT = "sage-grpo"  # the W&B project unless WANDB_PROJECT names another
NOT_SCALARS = ("iteration", "unix_time")  # the step itself, and the wall time every event already has
FRAMES_SHOWN = 8  # frames of an mp4 sample in TensorBoard's strip


def check_installed(kind):
    """ValueError with the pip command when the chosen tracker's package is missing. Every rank checks
    its flags; the package is looked up, not imported (only rank 0 imports it, in open_tracker)."""
    if kind != "none" and importlib.util.find_spec(kind) is None:
        raise ValueError(f"--report_to {kind} needs the optional package {kind}, which is not installed: "
                         f"pip install {kind} (or pip install -r requirements-dev.txt)")


def open_tracker(kind, output_dir, config, resume, start_iteration):
    """The tracker of this run (rank 0; other ranks pass kind "none"). config: {flag: value}, logged
    once; resume: continue the tracker run of output_dir; start_iteration: the iteration the run
    resumes from (0 for a fresh run). Use as a context manager, or call close()."""
    if kind == "tensorboard":
        return TensorBoard(output_dir, config, start_iteration)
    if kind == "wandb":
        return WandB(output_dir, config, resume)
    if kind == "none":
        return Tracker()
    raise ValueError(f"unknown --report_to {kind!r}: expected one of {list(TRACKERS)}")


def scalars(metrics):
    """The numbers of one metrics row, flat: {"reward_mean": 0.41, "anchor_refreshed": 1.0,
    "ratio_max_dev_per_step/0": 0.0, "ratio_max_dev_per_step/1": 0.0, ...}; text is skipped."""
    flat = {}
    for name, value in metrics.items():
        if name in NOT_SCALARS:
            continue
        if isinstance(value, (bool, int, float)):  # bool is an int: True -> 1.0
            flat[name] = float(value)
        elif isinstance(value, list) and value and all(isinstance(v, (bool, int, float)) for v in value):
            flat.update({f"{name}/{i}": float(v) for i, v in enumerate(value)})
    return flat


class Tracker:
    """--report_to none, and the interface: log a metrics row, log a saved sample, close."""

    def log(self, metrics, step):
        pass

    def log_video(self, path, step, caption):
        """path: a sample train.py wrote (.png, or .mp4); caption: its prompt."""
        pass

    def close(self, failed=False):
        pass

    def __enter__(self):
        return self

    def __exit__(self, error_type, error, traceback):
        self.close(failed=error_type is not None)


class TensorBoard(Tracker):
    """Event files under output_dir/tensorboard/ (torch's SummaryWriter; needs the tensorboard package)."""

    def __init__(self, output_dir, config, start_iteration):
        from torch.utils.tensorboard import SummaryWriter
        log_dir = os.path.join(output_dir, TENSORBOARD_DIR)
        # events at step >= purge_step written before this start are dropped: the iterations after the
        # checkpoint that were logged, then lost with the crash, are shown once, as this run logs them again
        self.writer = SummaryWriter(log_dir, purge_step=start_iteration + 1)
        self.writer.add_text("config", config_table(config), start_iteration)
        self.writer.flush()
        print(f"tensorboard: tensorboard --logdir {log_dir}", flush=True)

    def log(self, metrics, step):
        for name, value in scalars(metrics).items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()  # an iteration takes minutes: a crash must not lose the rows before it

    def log_video(self, path, step, caption):
        self.writer.add_image("sample", sample_picture(path), step, dataformats="HWC")
        self.writer.add_text("sample_prompt", caption, step)
        self.writer.flush()

    def close(self, failed=False):
        self.writer.close()


class WandB(Tracker):
    """A W&B run under output_dir/wandb/ whose id is kept in output_dir/wandb_run_id (WANDB_MODE=offline
    for no network)."""

    def __init__(self, output_dir, config, resume):
        import wandb
        self.wandb = wandb
        id_path = os.path.join(output_dir, WANDB_RUN_ID)
        run_id = None  # a fresh run: W&B draws an id
        if resume and os.path.isfile(id_path):
            with open(id_path) as f:
                run_id = f.read().strip()
        # allow_val_change: a resumed run may change the flags train.py allows (--max_iterations, ...)
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", PROJECT), name=os.path.basename(
                              os.path.abspath(output_dir)), id=run_id, resume="allow", dir=output_dir, config=config,
                              allow_val_change=True)
        with open(id_path + ".tmp", "w") as f:  # atomic: a torn id would start a new run on resume
            f.write(self.run.id)
        os.replace(id_path + ".tmp", id_path)

    def log(self, metrics, step):
        self.run.log(scalars(metrics), step=step)

    def log_video(self, path, step, caption):
        media = self.wandb.Video if path.endswith(".mp4") else self.wandb.Image  # Video from a file needs no moviepy
        self.run.log({"sample": media(path, caption=caption)}, step=step)

    def close(self, failed=False):
        self.run.finish(exit_code=1 if failed else 0)  # W&B marks a run that ended in an error as failed


# ------------------------------------------------------------------------------------------------
# TensorBoard's text and pictures.

def config_table(config):
    """{flag: value} -> a markdown table (TensorBoard renders its text tab as markdown)."""
    cells = {name: repr(value).replace("|", "\\|") for name, value in config.items()}  # a bare | would end the cell
    return "| flag | value |\n|---|---|\n" + "".join(f"| {name} | `{cell}` |\n" for name, cell in cells.items())


def sample_picture(path):
    """A saved sample as one (H, W, 3) uint8 picture: a PNG as it is; an mp4 as FRAMES_SHOWN evenly
    spaced frames side by side, (H, 8·W, 3), decoded with PyAV (a dependency of reward.py)."""
    import numpy as np
    if not path.endswith(".mp4"):
        from PIL import Image
        return np.asarray(Image.open(path).convert("RGB"))
    import av
    with av.open(path) as container:
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]  # F x (H, W, 3)
    shown = np.linspace(0, len(frames) - 1, min(FRAMES_SHOWN, len(frames))).round().astype(int)
    return np.concatenate([frames[i] for i in shown], axis=1)
