"""The first command on a GPU: train.py end to end on CUDA, then the real 8.3B transformer against plan.py.

    python benchmarks/gpu_check.py                  # one GPU (an H100): a few minutes, runs/gpu_check/gpu_check.json
    python benchmarks/gpu_check.py --tiny --output_dir runs/gpu_check_tiny  # the same code paths on the CPU (~1 min)
    python benchmarks/gpu_check.py --sections forward block  # a rerun of some sections only

Nothing here has been measured on a GPU before this command runs: it is written to work the first time and
is tested on the CPU through `--tiny` (tests/test_gpu_check.py). Seven sections, each independent (an
exception is recorded as {"status": "error", "error": "<one line>"} and the next section runs), in this order:

    train       train.py on tiny random models, 1 rank under torchrun, 2 iterations, into a temporary directory:
                exit status, wall seconds, every metrics.jsonl row's reward_mean, grad_norm, peak_memory_gb
                and time_* phases; the device train.py chose, read back from the checkpoint it wrote
    self_check  the same flags with --self_check: exit status and every line's PASS / WARN / FAIL (self_check.md)
    forward     the real transformer (plan.build_transformer: diffusers' 8.3B T2V config), random bf16 weights on
                the GPU: one CFG forward (model.cfg_velocity, batch 2 = one video's two branches), no grad, at
                plan.py's token counts (81x352x624 -> 18,018 video tokens, plan.PROMPT_TOKENS text tokens)
    block       one real dual-stream block, forward + backward at the same token count, batch 2: what every
                block does in the update under gradient checkpointing (recompute, then backward), the unit of
                plan.py's activation model
    muon        one Muon step (optimizer.MuonWithAdamW, Newton-Schulz in bf16) on the largest matrix Muon
                orthogonalises (a block's AdaLN modulation, 12288 x 2048, in the real model)
    wan_forward the second family: Wan2.1-1.3B (plan.WAN21_CONFIGS), random bf16 weights, one CFG forward
                (wan.cfg_velocity, batch 2) at 480x832x81 (32,760 video tokens, 512 text keys), against
                plan.py's FLOPs and parameter count
    wan_train   Wan2.1-1.3B end to end: train.py (torchrun, 1 rank) on a Wan directory with the real 1.3B transformer
                config and random weights (written once by tiny.build_tiny_wan, no second copy), a tiny UMT5 and
                VAE and the tiny VideoAlign, 2 GRPO iterations at 33x240x416 (4 steps, one group of 2): rollout,
                reward and update seconds and peak memory of the last iteration, beside plan.py's prediction for
                the same setup (its memory less the text encoder, VAE and reward model, tiny here)

Why the train sections do not pass --tiny: train.py --tiny always runs on the CPU with gloo (it is the CPU
mode). Here the same tiny models are built first (tiny.build_tiny_hunyuan, tiny.build_tiny_videoalign, what
--tiny builds) and handed to train.py as ordinary --model_path / --reward_path directories, so train.py
picks its device as for a real run: CUDA when there is one, hence NCCL (distributed.setup) and bf16 compute
(train.py's compute dtype); on a CPU gloo and fp32. Which it picked is read back from the checkpoint's
config: --vae_tiling defaults to on exactly when the VAE sits on CUDA.

Predictions (plan.py's functions, the planner's own numbers): time = FLOPs (plan.measure_flops, counted on
meta tensors) / (H100 dense bf16 peak x plan.MFU); MFU = those FLOPs / (measured time x peak); weights =
parameters x 2 bytes; activations = plan.calibrate_activations' fit (CPU calibration, extrapolated to the
full length). Every figure is {"measured", "prediction", "ratio" = measured / prediction, "unit", "basis"};
an item plan.py does not predict has "prediction": null and a "reason". Reading a ratio: time ratio < 1
means faster than plan.py assumes (MFU above its 40%); an activation ratio far from 1 means the GPU's
attention kernel saves something else than the CPU calibration (e.g. an L x L matrix), and plan.py's memory
table is wrong by that factor.

--tiny: the same script on the CPU with the tiny models' configurations (tiny.TINY_TRANSFORMER_CONFIG, the tiny Wan's
in wan_forward and wan_train, at its own 9x32x32) and a small token count, CPU timers instead of CUDA events, memory null (no allocator statistics on a CPU), and the
train sections forced to the CPU (gloo, fp32). Its time ratios compare a CPU with an H100 and mean nothing;
it exists so that every code path has run before the GPU time is spent.

A global time guard: the elapsed time (from the start of the process) is printed after every section, and
once it passes --budget_s the remaining sections are "skipped"; a train.py run is stopped at the budget or
after --train_timeout_s, whichever comes first, so that a hung NCCL start cannot eat the model sections'
time. The report is rewritten after every section, so what was measured survives a kill.
"""
import argparse
import datetime
import gc
import json
import math
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

START = time.monotonic()  # the budget counts from here: importing torch and diffusers is part of the wall time

import torch  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # run from anywhere
import config  # noqa: E402
import model  # noqa: E402
import optimizer  # noqa: E402
import parallel  # noqa: E402
import plan  # noqa: E402
import tiny  # noqa: E402
import wan  # noqa: E402

SECTIONS = ("train", "self_check", "forward", "block", "muon", "wan_forward", "wan_train")
OUTPUT_DIR = os.path.join("runs", "gpu_check")  # as train.py's runs/<name>: ignored by git, never in the repository root
REPORT = "gpu_check.json"
BUDGET_S = 540.0  # of the 10 minutes one command may run on a lent GPU: the rest is start-up and a margin
# One train.py run at most (a tiny run takes well under a minute): a hung NCCL start must not eat the whole budget
TRAIN_TIMEOUT_S = 150.0
# The tiny train.py runs: 2 iterations of 2 denoising steps, one group of 2 videos on the one rank
TRAIN_FLAGS = ("--num_steps", "2", "--group_size", "2", "--videos_per_rank", "2", "--max_iterations", "2")
# Timed repetitions after one warm-up call (kernel selection, allocator); the median is reported
REPEATS = {"forward": 3, "block": 5, "muon": 5, "wan_forward": 3}
WAN_MODEL = "wan-1.3B"  # plan.py's key of the Wan2.1 transformer measured
WAN_VIDEO = (81, 480, 832)  # Wan2.1's 480p: the latent (16, 21, 60, 104), 21 x 30 x 52 tokens
# wan_train: whole GRPO iterations of the 1.3B through train.py at the peers' training size (flow_grpo, Pref-GRPO:
# 33 x 240 x 416 -> 9 x 15 x 26 = 3,510 tokens), one group of 2 videos, 4 steps, 2 iterations: ~1 minute of GPU
# after a ~1 minute build (plan.py: 23 GiB); a timeout of its own, as the build and load of 5 GB take longer
WAN_TRAIN_VIDEO = (33, 240, 416)
WAN_TRAIN_VIDEOS, WAN_TRAIN_STEPS = 2, 4
WAN_TRAIN_FLAGS = ("--num_steps", str(WAN_TRAIN_STEPS), "--group_size", str(WAN_TRAIN_VIDEOS), "--videos_per_rank",
                   str(WAN_TRAIN_VIDEOS), "--max_iterations", "2")
WAN_TRAIN_TIMEOUT_S = 240.0
CFG_BATCH = 2  # one video's conditional and unconditional rows: model.cfg_velocity's batch, plan.py's "2·videos"
INIT_STD = 0.02  # random weights: matrices N(0, 0.02²) (the usual transformer init), norm scales 1, biases 0
# --tiny: the model sections' sizes (the tiny transformer is 16 wide; 192 video tokens = 3 x 8 x 8 latents)
TINY_LATENT_GRID = (3, 8, 8)
TINY_TEXT_TOKENS = plan.CALIBRATION_TEXT


# ------------------------------------------------------------------------------------------------
# Measuring: timers, memory, figures.

def timed(device, fn, repeats):
    """Median seconds of `repeats` calls of fn() after one warm-up call: CUDA events on a GPU (the kernels'
    time, queued work included), perf_counter on a CPU."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end) / 1e3)  # ms -> s
        else:
            begin = time.perf_counter()
            fn()
            times.append(time.perf_counter() - begin)
    return statistics.median(times)


def peak_gib(device, fn):
    """Peak memory fn() allocates above what was allocated before it, GiB (CUDA); None on a CPU."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / plan.GIB


def figure(measured, unit, prediction=None, basis="", reason=None):
    """One reported number beside plan.py's prediction: ratio = measured / prediction (None if either is)."""
    ratio = measured / prediction if measured is not None and prediction else None
    entry = {"measured": measured, "prediction": prediction, "ratio": ratio, "unit": unit, "basis": basis}
    if reason:
        entry["reason"] = reason
    return entry


NO_MEMORY = "no allocator statistics on a CPU (--tiny)"


def seconds_at_mfu(flops):
    """plan.py's time for `flops`: FLOPs / (H100 dense bf16 peak x the MFU it assumes)."""
    return flops / (plan.H100_PEAK_TFLOPS * 1e12 * plan.MFU)


def mfu(flops, seconds):
    """Model FLOPs utilisation of an H100: FLOPs / (seconds x dense bf16 peak)."""
    return flops / (seconds * plan.H100_PEAK_TFLOPS * 1e12)


def time_figures(flops, seconds, what):
    """The time of `what` and its MFU, each beside plan.py's."""
    basis = f"{flops / 1e12:.4g} TFLOP ({what}, plan.measure_flops) / ({plan.H100_PEAK_TFLOPS:g} TFLOP/s x MFU)"
    return {"time_s": figure(seconds, "s", seconds_at_mfu(flops), basis),
            "mfu": figure(mfu(flops, seconds), "fraction of H100 peak", plan.MFU, "plan.MFU, assumed")}


@torch.no_grad()
def random_init(module, seed=0):
    """Random weights without reading any: matrices N(0, INIT_STD²), 1-D norm scales 1, biases 0."""
    torch.manual_seed(seed)
    for name, parameter in module.named_parameters():
        if parameter.ndim >= 2:
            parameter.normal_(0.0, INIT_STD)
        elif name.endswith("bias"):
            parameter.zero_()
        else:
            parameter.fill_(1.0)
    return module


def release(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------
# The sections. Each takes the run's context and returns its report (status "ok" unless it says otherwise).

class Context:
    """What the sections share: device, sizes (real or tiny), the temporary directory, the time budget."""

    def __init__(self, args):
        self.tiny, self.args = args.tiny, args
        self.device = torch.device("cpu") if args.tiny else torch.device("cuda", 0)
        self.dtype = torch.bfloat16  # the model sections compute in bf16 on both (plan.py's calibration does)
        # the transformer measured: the real 8.3B (plan.transformer_kwargs' ()) or the tiny one
        self.config = tuple(sorted(tiny.TINY_TRANSFORMER_CONFIG.items())) if args.tiny else ()
        self.latent_grid = TINY_LATENT_GRID if args.tiny else plan.latent_grid(plan.Setup())  # (F, H, W)
        self.text_tokens = TINY_TEXT_TOKENS if args.tiny else plan.PROMPT_TOKENS
        self.video_tokens = math.prod(self.latent_grid)
        self.work_dir = args.work_dir or tempfile.mkdtemp(prefix="gpu_check_")
        self.models = None

    def elapsed(self):
        return time.monotonic() - START

    def remaining(self):
        return self.args.budget_s - self.elapsed()

    def tiny_models(self):
        """The tiny HunyuanVideo-1.5 and VideoAlign directories (what train.py --tiny builds), built once."""
        if self.models is None:
            root = os.path.join(self.work_dir, "models")
            self.models = tiny.tiny_model_paths(root, hunyuan="", videoalign="")
        return self.models


def run_train(ctx, *extra, model_path=None, size=None, flags=TRAIN_FLAGS, timeout_s=None):
    """torchrun, 1 rank, train.py on the tiny models (or the policy at `model_path`, at `size`) with `flags` and
    `extra`: (exit status, wall seconds, output_dir, the last 3,000 characters of its output, the command). Raises
    TimeoutError if it was stopped (past the budget or timeout_s, default --train_timeout_s)."""
    models = ctx.tiny_models()
    output_dir = tempfile.mkdtemp(prefix="run_", dir=ctx.work_dir)
    num_frames, height, width = size or tiny.TINY_VIDEO_SIZES["hunyuan"]
    timeout_s = timeout_s or ctx.args.train_timeout_s
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
               os.path.join(REPO, "train.py"), "--model_path", model_path or models["hunyuan"],
               "--reward_path", models["videoalign"],
               "--num_frames", str(num_frames), "--height", str(height), "--width", str(width), *flags,
               "--output_dir", output_dir, *extra]
    env = dict(os.environ)
    if ctx.tiny:  # the CPU, whatever the machine has: gloo and fp32, as a CPU-only machine runs it
        env["CUDA_VISIBLE_DEVICES"] = ""
        env.setdefault("OMP_NUM_THREADS", "1")
    log_path = output_dir + ".log"
    begin = time.monotonic()
    with open(log_path, "w") as log:
        # its own process group, so that a run past the budget is stopped with every worker torchrun started
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            status = process.wait(timeout=max(min(ctx.remaining(), timeout_s), 1.0))
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            status = None
    wall = time.monotonic() - begin
    with open(log_path, errors="replace") as log:
        tail = log.read()[-3000:]
    if status is None:
        raise TimeoutError(f"train.py still running after {wall:.0f} s (timeout {timeout_s:g} s, "
                           f"--budget_s {ctx.args.budget_s:g}): stopped; its output ends: {' '.join(tail.split()[-40:])}")
    return status, wall, output_dir, tail, " ".join(command[2:])


def check_train(ctx):
    """A tiny train.py run, 2 iterations; its metrics rows and the device it chose."""
    status, wall, output_dir, tail, command = run_train(ctx)
    report = {"command": command, "exit_status": status, "wall_s": wall}
    rows = []
    if os.path.isfile(os.path.join(output_dir, "metrics.jsonl")):
        with open(os.path.join(output_dir, "metrics.jsonl")) as f:
            for line in f:
                row = json.loads(line)
                rows.append({key: row[key] for key in ("iteration", "reward_mean", "grad_norm", "peak_memory_gb")}
                            | {key: value for key, value in row.items() if key.startswith("time_")})
    report["rows"] = rows
    checkpoint = os.path.join(output_dir, f"checkpoint-{len(rows):06d}", "trainer_state.json")
    if os.path.isfile(checkpoint):
        with open(checkpoint) as f:
            config = json.load(f)["config"]
        # --vae_tiling was left to its default: on exactly when train.py put the VAE on CUDA (model.set_vae_tiling)
        device = "cuda" if config["vae_tiling"] else "cpu"
        report.update(device=device, backend="nccl" if device == "cuda" else "gloo",
                      compute_dtype="bfloat16" if device == "cuda" else "float32",
                      gradient_checkpointing=config["gradient_checkpointing"])
    expected = int(TRAIN_FLAGS[TRAIN_FLAGS.index("--max_iterations") + 1])
    finite = all(math.isfinite(row[key]) for row in rows for key in row)
    report["status"] = "ok" if status == 0 and len(rows) == expected and finite else "fail"
    if report["status"] != "ok":
        report["output_tail"] = tail
    return report


def check_self_check(ctx):
    """The same flags with --self_check: {line: status} from output_dir/self_check.md."""
    status, wall, output_dir, tail, command = run_train(ctx, "--self_check")
    report = {"command": command, "exit_status": status, "wall_s": wall, "lines": {}}
    path = os.path.join(output_dir, "self_check.md")
    if os.path.isfile(path):
        with open(path) as f:
            summary = f.read().split("\n\n")[0]  # the pass/fail table; the per-step rows follow
        for row in summary.splitlines()[2:]:
            cells = [cell.strip() for cell in row.strip("|").split("|")]
            report["lines"][cells[0]] = cells[-1].strip("*")
    # "fail": a line FAILed (exit status 1, "lines" says which) or the check did not finish (see output_tail)
    report["status"] = "ok" if status == 0 and report["lines"] else "fail"
    if report["status"] != "ok":
        report["output_tail"] = tail
    return report


def random_prompt_embeds(config, text_tokens, device, dtype):
    """model.PromptEmbeds of one prompt and the negative prompt: `text_tokens` valid Qwen2.5-VL tokens each and no
    byT5 glyph token (a prompt that quotes no text: trim_padding leaves none), random values."""
    text = torch.randn(1, text_tokens, config.text_embed_dim, device=device, dtype=dtype)     # (1, Lt, D_text)
    mask = torch.ones(1, text_tokens, device=device)                                         # (1, Lt)
    glyph = torch.zeros(1, 0, config.text_embed_2_dim, device=device, dtype=dtype)          # (1, 0, D_glyph)
    glyph_mask = torch.zeros(1, 0, device=device)                                            # (1, 0)
    return model.PromptEmbeds(text, mask, glyph, glyph_mask, torch.randn_like(text), mask.clone(), glyph.clone(),
                              glyph_mask.clone())


def check_forward(ctx):
    """One CFG forward (batch 2, no grad) of the whole transformer, random bf16 weights on the device."""
    device, dtype = ctx.device, ctx.dtype
    release(device)
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    transformer = plan.build_transformer(dtype=dtype, config=ctx.config)  # meta: shapes only, no weights read
    parameters = sum(p.numel() for p in transformer.parameters())
    transformer = random_init(transformer.to_empty(device=device)).requires_grad_(False).eval()
    weights = (torch.cuda.memory_allocated(device) - before) / plan.GIB if device.type == "cuda" else None
    for block in transformer.transformer_blocks:  # the attention train.py runs (parallel.enable, sp 1)
        block.attn.set_processor(parallel.KeyMaskAttnProcessor())
    embeds = random_prompt_embeds(transformer.config, ctx.text_tokens, device, dtype)
    latents = torch.randn(1, transformer.config.out_channels, *ctx.latent_grid, device=device)  # (1, C, F, H, W)
    outputs = []

    def forward():
        with torch.no_grad():
            outputs[:] = [model.cfg_velocity(transformer, latents, 0.5, embeds, model.DEFAULT_GUIDANCE_SCALE)]

    seconds = timed(device, forward, REPEATS["forward"])
    peak = peak_gib(device, forward)
    flops = CFG_BATCH * plan.forward_flops(plan.measure_flops(ctx.video_tokens, ctx.text_tokens, config=ctx.config))
    figures = time_figures(flops, seconds, f"forward of {CFG_BATCH} sequences")
    figures["weights_gib"] = figure(weights, "GiB", parameters * plan.BF16 / plan.GIB,
                                    f"{parameters:,} parameters (plan.build_transformer) x 2 bytes",
                                    reason=None if weights is not None else NO_MEMORY)
    figures["peak_gib_above_weights"] = figure(
        peak, "GiB", None, "max_memory_allocated during the forward, minus what was allocated before it",
        reason="plan.py models the update's memory (checkpointed training), not a no-grad forward's"
        + ("" if peak is not None else "; " + NO_MEMORY))
    report = {"parameters": parameters, "batch": CFG_BATCH, "latent_grid": list(ctx.latent_grid),
              "video_tokens": ctx.video_tokens, "text_tokens": ctx.text_tokens,
              "output_finite": bool(torch.isfinite(outputs[0]).all()), "figures": figures, "status": "ok"}
    del transformer, outputs, embeds, latents
    release(device)
    return report


def check_block(ctx):
    """One real block forward + backward at the full token count, batch 2, and what autograd saves."""
    device, dtype = ctx.device, ctx.dtype
    release(device)
    block = plan.build_block(device, dtype, config=ctx.config).requires_grad_(True)  # full fine-tune: weight grads
    block.attn.set_processor(parallel.KeyMaskAttnProcessor())
    inputs = plan.block_inputs(device, dtype, ctx.video_tokens, ctx.text_tokens, batch=CFG_BATCH, config=ctx.config)

    def forward_backward():
        hidden, text = block(*inputs)
        (hidden.float().sum() + text.float().sum()).backward()  # as plan.measure_flops counts it
        block.zero_grad(set_to_none=True)
        inputs[0].grad = inputs[1].grad = None

    seconds = timed(device, forward_backward, REPEATS["block"])
    peak = peak_gib(device, forward_backward)
    flops = plan.measure_flops(ctx.video_tokens, ctx.text_tokens, config=ctx.config)
    figures = time_figures(CFG_BATCH * (flops["block_forward"] + flops["block_backward"]), seconds,
                           f"block forward + backward of {CFG_BATCH} sequences")
    # What autograd saves in one sequence's forward, counted as the calibration counts it, on this device's
    # kernels, against the CPU calibration's fit extrapolated to this length: the basis of plan.py's activations
    length = ctx.video_tokens + ctx.text_tokens
    fit = plan.calibrate_activations(ctx.config)
    saved = plan.saved_activation_bytes(ctx.video_tokens, ctx.text_tokens, config=ctx.config, block=block)
    figures["saved_activations_gib_per_sequence"] = figure(
        saved / plan.GIB, "GiB", (fit["constant"] + plan.block_activation_bytes(fit, length)) / plan.GIB,
        f"plan.calibrate_activations: {fit['per_token'] / 1024:.1f} KiB x L + {fit['per_token_squared']:.2g} B x L² "
        f"+ {fit['constant'] / 2**20:.1f} MiB at L = {length:,}")
    # plan.py: the recomputed block holds twice its activations during its backward (an assumption)
    figures["peak_gib_forward_backward"] = figure(
        peak, "GiB", CFG_BATCH * 2 * plan.block_activation_bytes(fit, length) / plan.GIB,
        f"plan.py: {CFG_BATCH} sequences x 2 x (a·L + b·L²); measured: above the weights and inputs, weight and "
        f"input gradients included", reason=None if peak is not None else NO_MEMORY)
    report = {"batch": CFG_BATCH, "video_tokens": ctx.video_tokens, "text_tokens": ctx.text_tokens,
              "figures": figures, "status": "ok"}
    del block, inputs
    release(device)
    return report


def newton_schulz_flops(shape, steps):
    """FLOPs of torch's NS_k on an (A, B) matrix, m = min(A, B), n = max(A, B): per step X·Xᵀ (2m²n), the
    quintic's Gram update (2m³) and its product with X (2m²n)."""
    m, n = sorted(shape)
    return steps * (4 * m * m * n + 2 * m ** 3)


def check_muon(ctx):
    """One Muon step on the largest matrix Muon orthogonalises inside the blocks (the largest of the real model)."""
    device = ctx.device
    release(device)
    meta = plan.build_transformer(config=ctx.config)
    matrices, _ = optimizer.muon_groups(meta)  # every 2-D weight (official grouping)
    in_blocks, _ = optimizer.muon_groups(meta, grouping="hidden")
    name, largest = max(in_blocks, key=lambda item: item[1].numel())
    shape = tuple(largest.shape)
    torch.manual_seed(0)
    # an fp32 master weight, as FSDP2 holds it, with a gradient; the optimizer train.py builds for it
    weight = torch.nn.Parameter(torch.randn(shape, device=device) * INIT_STD)
    weight.grad = torch.randn(shape, device=device) * 1e-3
    opt = optimizer.MuonWithAdamW([weight], [])
    steps = opt.param_groups[0]["ns_steps"]
    seconds = timed(device, opt.step, REPEATS["muon"])
    peak = peak_gib(device, opt.step)
    flops = newton_schulz_flops(shape, steps)
    all_flops = sum(newton_schulz_flops(tuple(p.shape), steps) for _, p in matrices)
    no_prediction = "plan.py predicts the optimizer's memory (its state tensors), not the time of its step"
    figures = {
        "time_s": figure(seconds, "s", None, f"one step: momentum, NS_{steps} in bf16, update", reason=no_prediction),
        "tflops_per_s": figure(flops / seconds / 1e12, "TFLOP/s", None,
                               f"{flops / 1e12:.3g} TFLOP of NS_{steps} (closed form) / time", reason=no_prediction),
        "all_matrices_s": figure(seconds * all_flops / flops, "s", None,
                                 f"every one of the {len(matrices)} Muon matrices ({all_flops / 1e12:.3g} TFLOP) at "
                                 f"this matrix's rate: the NS work every rank repeats per update",
                                 reason=no_prediction),
        "peak_gib": figure(peak, "GiB", None, "max_memory_allocated during the step, above what was allocated before",
                           reason=no_prediction + ("" if peak is not None else "; " + NO_MEMORY)),
    }
    largest_overall = max(matrices, key=lambda item: item[1].numel())[0]
    report = {"matrix": name, "shape": list(shape), "largest_matrix_of_the_model": largest_overall,
              "figures": figures, "status": "ok"}
    del weight, opt
    release(device)
    return report


def check_wan_forward(ctx):
    """One CFG forward (batch 2, no grad) of Wan2.1-1.3B (or the tiny Wan), random bf16 weights on the device."""
    device, dtype = ctx.device, ctx.dtype
    release(device)
    config = tuple(sorted(tiny.TINY_WAN_TRANSFORMER_CONFIG.items())) if ctx.tiny else ()
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    transformer = plan.build_transformer(dtype=dtype, config=config, name=WAN_MODEL)  # meta: no weights read
    parameters = sum(p.numel() for p in transformer.parameters())
    transformer = random_init(transformer.to_empty(device=device)).requires_grad_(False).eval()
    with torch.no_grad():  # the RoPE tables to_empty left unset (as distributed.load_policy writes them)
        for name, value in wan.WanPolicy.computed_buffers(transformer).items():
            dict(transformer.named_buffers())[name].copy_(value)
    weights = (torch.cuda.memory_allocated(device) - before) / plan.GIB if device.type == "cuda" else None
    grid = TINY_LATENT_GRID if ctx.tiny else plan.latent_grid(plan.Setup(
        family="wan", model_size="1.3B", num_frames=WAN_VIDEO[0], height=WAN_VIDEO[1], width=WAN_VIDEO[2]))
    video_tokens, text_tokens = math.prod(grid), plan.WAN_TEXT_TOKENS
    latents = torch.randn(1, 16, grid[0], 2 * grid[1], 2 * grid[2], device=device)  # (1, C, F, H, W): patch 2 x 2
    text = torch.randn(2, text_tokens, transformer.config.text_dim, device=device, dtype=dtype)
    lengths = torch.full((1,), text_tokens, device=device)
    embeds = wan.WanPromptEmbeds(text[:1], text[1:], lengths, lengths)
    outputs = []

    def forward():
        with torch.no_grad():
            outputs[:] = [wan.cfg_velocity(transformer, latents, 0.5, embeds, wan.DEFAULT_GUIDANCE_SCALE)]

    seconds = timed(device, forward, REPEATS["wan_forward"])
    flops = CFG_BATCH * plan.forward_flops(plan.measure_flops(video_tokens, text_tokens, config=config,
                                                              name=WAN_MODEL))
    figures = time_figures(flops, seconds, f"Wan forward of {CFG_BATCH} sequences")
    figures["weights_gib"] = figure(weights, "GiB", parameters * plan.BF16 / plan.GIB,
                                    f"{parameters:,} parameters (plan.build_transformer) x 2 bytes",
                                    reason=None if weights is not None else NO_MEMORY)
    report = {"parameters": parameters, "batch": CFG_BATCH, "latent_grid": list(grid), "video_tokens": video_tokens,
              "text_tokens": text_tokens, "output_finite": bool(torch.isfinite(outputs[0]).all()), "figures": figures,
              "status": "ok" if torch.isfinite(outputs[0]).all() else "fail"}
    del transformer, outputs, embeds, latents
    release(device)
    return report


def wan_train_setup():
    """plan.py's Setup of the wan_train run: what the planner predicts for the same flags on one GPU."""
    frames, height, width = WAN_TRAIN_VIDEO
    return plan.Setup("1xH100 Wan2.1-1.3B gpu_check", world_size=1, family="wan", model_size="1.3B",
                      videos_per_rank=WAN_TRAIN_VIDEOS, group_size=WAN_TRAIN_VIDEOS, num_frames=frames, height=height,
                      width=width, num_steps=WAN_TRAIN_STEPS)


def build_wan_policy(ctx):
    """A Wan2.1 directory in the diffusers layout with the REAL 1.3B transformer (plan.WAN21_CONFIGS, random
    weights; the tiny one with --tiny), the tiny UMT5 (as wide as the transformer's text_dim) and the tiny VAE
    (the real 4x / 8x compression). tiny.build_tiny_wan builds the transformer once, in float32 on the CPU with
    diffusers' own init, and save_pretrained writes it: one allocation (5.2 GB for 1.3B), no copy; train.py then
    reads it as any checkpoint (rank 0 reads, FSDP2 shards). Returns the directory."""
    path = os.path.join(ctx.work_dir, "wan_policy")
    if not os.path.isdir(path):
        config = {} if ctx.tiny else plan.WAN21_CONFIGS[WAN_MODEL.split("-")[1]]
        tiny.build_tiny_wan(path + ".tmp", transformer_config=config)
        os.replace(path + ".tmp", path)
    return path


def check_wan_train(ctx):
    """train.py end to end on Wan2.1-1.3B (real transformer config, random weights; the tiny Wan with --tiny), a tiny
    text encoder and the tiny VideoAlign: seconds of rollout, reward and update (metrics.jsonl time_*) and peak
    memory of the last iteration, beside plan.py's prediction for the same setup. plan.py's memory counts the
    real UMT5-XXL, VAE and VideoAlign; these are tiny here, so the prediction compared leaves them out."""
    begin = time.monotonic()
    policy = build_wan_policy(ctx)
    build_s = time.monotonic() - begin
    size = tiny.TINY_VIDEO_SIZES["wan"] if ctx.tiny else WAN_TRAIN_VIDEO
    status, wall, output_dir, tail, command = run_train(ctx, model_path=policy, size=size, flags=WAN_TRAIN_FLAGS,
                                                        timeout_s=WAN_TRAIN_TIMEOUT_S)
    rows = []
    if os.path.isfile(os.path.join(output_dir, "metrics.jsonl")):
        with open(os.path.join(output_dir, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f]
    rows = [{k: v for k, v in row.items() if k in ("iteration", "reward_mean", "grad_norm", "peak_memory_gb")
             or k.startswith("time_")} for row in rows if "reward_mean" in row]
    report = {"command": command, "exit_status": status, "build_s": build_s, "wall_s": wall, "video": list(size),
              "rows": rows}
    expected = int(WAN_TRAIN_FLAGS[WAN_TRAIN_FLAGS.index("--max_iterations") + 1])
    finite = all(math.isfinite(v) for row in rows for v in row.values())
    report["status"] = "ok" if status == 0 and len(rows) == expected and finite else "fail"
    if report["status"] != "ok":
        report["output_tail"] = tail
        return report
    setup = wan_train_setup()
    predicted = plan.plan(setup)
    last = rows[-1]  # the first iteration also compiles kernels and fills the prompt cache
    per_second = plan.H100_PEAK_TFLOPS * 1e12 * plan.MFU
    basis = f"plan.py {setup.flags()} --family wan --world_size 1: FLOPs / (H100 peak x MFU {plan.MFU:g})"
    tiny_parts = [k for k in predicted["memory_gib"] if k.startswith(("text encoder", "VAE", "reward model"))]
    memory = predicted["total_gib"] - sum(predicted["memory_gib"][k] for k in tiny_parts)
    report["figures"] = {
        "rollout_s": figure(last["time_rollout"], "s", predicted["flops"]["rollout"] / per_second, basis),
        "reward_s": figure(last["time_reward"], "s", None, reason="plan.py does not predict the reward's time"),
        "update_s": figure(last["time_update"], "s", predicted["flops"]["update"] / per_second, basis),
        "peak_memory_gib": figure(last["peak_memory_gb"] if ctx.device.type == "cuda" else None,  # GiB (meters.py)
                                  "GiB", memory, f"plan.py total less {', '.join(tiny_parts)} (tiny here)",
                                  reason=None if ctx.device.type == "cuda" else NO_MEMORY)}
    report["plan"] = {"total_gib": predicted["total_gib"], "seconds_per_iteration": predicted["seconds"],
                      "flags": setup.flags()}
    return report


CHECKS = {"train": check_train, "self_check": check_self_check, "forward": check_forward, "block": check_block,
          "muon": check_muon, "wan_forward": check_wan_forward, "wan_train": check_wan_train}


# ------------------------------------------------------------------------------------------------
# The report.

def environment(ctx):
    import diffusers
    import transformers
    info = {"mode": "tiny" if ctx.tiny else "gpu", "python": platform.python_version(), "torch": torch.__version__,
            "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "cpu_threads": torch.get_num_threads()}
    info["device"] = "cpu"
    if ctx.device.type == "cuda":
        try:  # a failed probe must not stop the checks
            properties = torch.cuda.get_device_properties(ctx.device)
            info.update(device=properties.name, device_memory_gib=properties.total_memory / plan.GIB,
                        cuda=torch.version.cuda, nccl=".".join(map(str, torch.cuda.nccl.version())))
        except Exception as error:  # noqa: BLE001
            info["device_probe_error"] = one_line(error)
    if ctx.tiny:
        info["note"] = ("tiny sizes on a CPU: the time and MFU predictions are an H100's, so those ratios mean "
                        "nothing here; the run checks that every code path works")
    return info


def one_line(error):
    return f"{type(error).__name__}: {' '.join(str(error).split())}"[:500]


def number(value):
    return "—" if value is None else f"{value:.3g}" if isinstance(value, float) else str(value)


def summary(report):
    """The readable tables: sections, figures beside their predictions, the train rows, the self-check lines."""
    lines = [f"gpu_check on {report['environment']['device']} ({report['environment']['mode']}), "
             f"{report['elapsed_s']:.0f} s of a {report['budget_s']:g} s budget", "",
             *([report["environment"]["note"], ""] if "note" in report["environment"] else []),
             "| section | status | seconds | note |", "|---|---|---|---|"]
    for name, section in report["sections"].items():
        note = section.get("error") or section.get("reason") or ""
        if name == "train" and "device" in section:
            note = f"{section['device']}, {section['backend']}, {section['compute_dtype']}"
        if name == "wan_train" and "build_s" in section:
            note = f"{section['video'][0]}x{section['video'][1]}x{section['video'][2]}: build {section['build_s']:.0f} s, " \
                   f"train.py {section['wall_s']:.0f} s"
        if name == "self_check" and section.get("lines"):
            statuses = list(section["lines"].values())
            note = ", ".join(f"{s} {statuses.count(s)}" for s in ("PASS", "WARN", "FAIL", "SKIP") if s in statuses)
        lines.append(f"| {name} | {section['status']} | {number(section.get('seconds'))} | {note} |")
    lines += ["", "| section | figure | measured | plan.py | measured / plan.py | unit |", "|---|---|---|---|---|---|"]
    for name, section in report["sections"].items():
        for key, value in section.get("figures", {}).items():
            lines.append(f"| {name} | {key} | {number(value['measured'])} | {number(value['prediction'])} | "
                         f"{number(value['ratio'])} | {value['unit']} |")
    rows = report["sections"].get("train", {}).get("rows", [])
    if rows:
        keys = list(rows[0])
        lines += ["", "| train.py " + " | ".join(keys) + " |", "|---" * len(keys) + "|"]
        lines += ["| " + " | ".join(number(row.get(k)) for k in keys) + " |" for row in rows]
    checks = report["sections"].get("self_check", {}).get("lines", {})
    if checks:
        lines += ["", "| self-check line | status |", "|---|---|"] + [f"| {k} | {v} |" for k, v in checks.items()]
    return "\n".join(lines)


def write(report, path):
    with open(path + ".tmp", "w") as f:
        json.dump(report, f, indent=1)
    os.replace(path + ".tmp", path)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="CPU, tiny sizes: every code path, no GPU needed")
    parser.add_argument("--output_dir", default=OUTPUT_DIR, help=f"the JSON report goes to output_dir/{REPORT} "
                        "(rewritten after every section); the default is under runs/, which git ignores")
    parser.add_argument("--budget_s", type=float, default=BUDGET_S,
                        help="seconds after which the remaining sections are skipped (and a train.py run stopped)")
    parser.add_argument("--train_timeout_s", type=float, default=TRAIN_TIMEOUT_S,
                        help="seconds after which one train.py run is stopped (a hung start must not eat the budget)")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="which to run")
    parser.add_argument("--work_dir", default="", help="keep the tiny models and train.py runs here (default: a "
                        "temporary directory, removed at the end)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if not args.tiny and not torch.cuda.is_available():
        print("gpu_check: error: no CUDA device: this measures the real 8.3B model on a GPU; on a CPU run "
              "`python benchmarks/gpu_check.py --tiny` (the same code paths, tiny sizes)", file=sys.stderr)
        return 2
    import huggingface_hub
    from diffusers.utils import logging
    logging.set_verbosity_error()  # "modules that should be kept in float32: []" on every meta build
    logging.disable_progress_bar()
    huggingface_hub.utils.disable_progress_bars()  # "Writing model shards" of the tiny models' save_pretrained
    os.makedirs(args.output_dir, exist_ok=True)
    out = os.path.join(args.output_dir, REPORT)
    ctx = Context(args)
    report = {"tool": "benchmarks/gpu_check.py", "environment": environment(ctx), "budget_s": args.budget_s,
              "elapsed_s": 0.0, "sections": {}}
    try:
        for name in args.sections:
            if ctx.remaining() <= 0:
                section = {"status": "skipped", "reason": f"past --budget_s {args.budget_s:g} s"}
            else:
                begin = time.monotonic()
                try:
                    section = CHECKS[name](ctx)
                except Exception as error:  # noqa: BLE001 -- one section's failure must not cost the others
                    section = {"status": "error", "error": one_line(error)}
                    release(ctx.device)
                section["seconds"] = time.monotonic() - begin
            report["sections"][name] = section
            report["elapsed_s"] = ctx.elapsed()
            write(report, out)
            print(f"[gpu_check {ctx.elapsed():6.1f} s] {name}: {section['status']}"
                  + (f" in {section['seconds']:.1f} s" if "seconds" in section else "")
                  + (f" -- {section.get('error') or section.get('reason')}" if section["status"] in ("error", "skipped") else ""),
                  flush=True)
    finally:
        if not args.work_dir:
            shutil.rmtree(ctx.work_dir, ignore_errors=True)
    report["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # this process (KiB on Linux)
    write(report, out)
    print("\n" + summary(report) + f"\n\nreport: {os.path.abspath(out)}", flush=True)
    return 0 if all(s["status"] == "ok" for s in report["sections"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
