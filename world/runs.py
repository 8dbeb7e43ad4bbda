"""The real train.py in the synthetic video world: the headline run and the paper's comparison.

Every run is `torchrun --standalone --nproc_per_node 2 train.py --world ...`: the unchanged trainer,
model and maths modules, on the world's pretrained tiny HunyuanVideo-1.5 (world/video_world.py). This
script only launches runs, reads their metrics.jsonl and draws pictures:

    python world/runs.py                  # headline: SAGE-GRPO, 3 seeds -> table + pictures
    python world/runs.py --comparison     # + kernels, equalizer on/off, KL modes, 3 seeds each
    python world/runs.py --grid beta      # the trust region's β sweep (dual KL, fixed β), 5 seeds
    python world/runs.py --grid modes     # KL modes at the calibrated β, 5 seeds
    python world/runs.py --grid kernels   # the four kernels at the calibrated β, 8 seeds, paired
    python world/runs.py --grid matched --nproc 1   # the kernels at matched noise (η from rollout_quality.py), 8 seeds
    python world/runs.py --grid matched20 --nproc 1 # the same at 20 sampling steps
    python world/runs.py --grid replicate20 --nproc 1  # its SAGE-vs-CPS difference on 8 fresh seeds
    python world/runs.py --grid frontier --nproc 1  # each kernel at 3-4 noise levels, 5 seeds: its frontier
    python world/runs.py --grid window    # SDE windows of 2, 4 and all 8 steps: reward against cost
    python world/runs.py --grid eval      # --eval_every 10 at the official and the calibrated β
    python world/runs.py --grid beta --jobs 2 --nproc 1   # two 1-rank runs at a time (same maths)

A finished run (its metrics.jsonl has every iteration) is reused, so a grid accumulates over several
sittings: stop it at any time, start it again, and it continues with the runs it lacks. Every grid
writes its table (mean and 95 % t-interval over seeds; for paired grids, the per-seed differences to a
reference method with their interval and whether it excludes 0) and its pictures under --out.

Numbers reported per run, from the rollouts the trainer logs (SDE samples of the policy being
trained, `--world` metrics):
    reward                the world's reward (mean over the iteration's rollouts)
    on_manifold_reward    the reward of each rollout's nearest data video: the honest part
    off_manifold          the exact RMS distance of the rollouts to the data manifold
    brightness            the reward component that only leaving the manifold can raise above 1 (hacking)
    activity              ‖∂(β·L_KL)/∂μ‖ / ‖∂L_policy/∂μ‖: how hard the trust region pushes (0 = inert)
"Before" is iteration 1 (the pretrained policy's rollouts, before its first update); "after" is the
mean of the last LAST iterations. Seeds differ in prompts order, noise and step order.

World settings that differ from the official video recipe, and why (the toy's reasons, one level up):
* lr 2e-4 with AdamW (official 1e-5 with Muon). The tiny transformer's log-probs are element means
  over 192 latent elements instead of ~10^6, and a run must show learning within minutes (a sweep of
  1e-4 / 2e-4 / 3e-4 / 1e-3 over 40-150 iterations: 1e-4 learns slowly, 2e-4 clearly, 3e-4 and 1e-3
  collapse off the manifold); the comparison uses AdamW for all methods alike.
* num_steps, shift and CFG scale are the world's (world/video_world.py), set in its checkpoint.
* group size 8 and 8 videos per rank (official 4 and 2): 16 videos per iteration, 2 groups, so that
  one iteration's reward is not all noise.
* --nproc 1 runs one rank with 16 videos instead of two ranks with 8: the same global batch, seeds and
  groups (train.py's 2-ranks-equal-1-rank test), equal up to float round-off, which a 150-iteration run
  amplifies into a different but equally likely outcome; two such runs at a time use the 2 cores with
  less waiting than one 2-rank run. The tables say which was used.
Everything else (η 0.5, clip 1e-4, advantage clip 5, the official β controller 1e-7 -> 1e-5, anchor
period 10, dual weights 1.0 / 0.1, one update per rollout) is the official value, except where a grid
varies it.
"""
import argparse
import concurrent.futures
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # the repository's modules (model, sde, world) when run as a script
OUT = Path(__file__).resolve().parent / "out" / "runs"
LAST = 10                     # iterations averaged for "after" (one iteration's mean of 16 rewards has std ~0.15)
ITERATIONS = 150              # per run
VIDEOS_PER_ITERATION = 16
# The world's learning settings (module docstring): official values except lr/optimizer.
WORLD_FLAGS = ["--world", "--num_steps", "8", "--optimizer", "adamw", "--lr", "2e-4", "--group_size", "8",
               "--checkpoint_every", "1000", "--sample_every", "0", "--keep_checkpoints", "1",
               "--no-train_glyph_projector"]
# A method is the train.py flags it sets on top of WORLD_FLAGS ({"kernel": "sage", "equalizer": True, ...}).
HEADLINE = {"kernel": "sage", "equalizer": True, "kl_mode": "dual"}
# The paper's comparison, one factor at a time around the headline method.
COMPARISON = [dict(HEADLINE, kernel=k) for k in ("flow_grpo", "dance_grpo", "cps")] + [
    dict(HEADLINE, equalizer=False), dict(HEADLINE, kl_mode="none"), dict(HEADLINE, kl_mode="fixed")]
# The β sweep: the dual trust region at a constant β, from the official ceiling (1e-5) to a β whose KL push
# dominates the policy term (activity ≈ 0.26·β in this world at the start, so β = 100 is ~25x the policy push).
BETAS = (1e-5, 1e-3, 1e-1, 1.0, 10.0, 100.0)
BETA_SWEEP = [dict(HEADLINE, beta_schedule="constant", beta_start=b) for b in BETAS]
# Calibrating the adaptive β: the KL target, from the KL the β sweep's fixed β hold (docs/world.md).
# Window 1 is PPO's per-update rule (it fails here: docs/world.md); 10, one anchor period, is train.py's default.
CALIBRATION = ([dict(HEADLINE, beta_schedule="adaptive", kl_target=t, beta_init=0.1, beta_window=1)
                for t in (3e-4, 1e-3)] +
               [dict(HEADLINE, beta_schedule="adaptive", kl_target=t, beta_init=0.1, beta_window=10)
                for t in (1.5e-3, 5e-3)])
# The calibrated trust region: the β sweep's knee, where the trust region first holds the policy near the
# manifold while the reward still rises (docs/world.md, "The trust region, made to act"). The same runs as the β
# sweep's β = 0.1, so the three grids share them.
CALIBRATED = dict(HEADLINE, beta_schedule="constant", beta_start=0.1)
MODES = [dict(CALIBRATED, kl_mode=m) for m in ("none", "fixed", "moving", "dual")] + [
    dict(CALIBRATED, kl_mode="step", updates_per_rollout=2)]     # the Gaussian step term is 0 at one update
KERNELS = [dict(CALIBRATED, kernel=k) for k in ("sage", "flow_grpo", "cps", "dance_grpo")]
# The kernels at matched noise: each kernel at the η whose untrained rollouts lie as far from the manifold as
# SAGE's at a reference η (world/rollout_quality.py finds them and writes MATCHED_ETA; the same runs otherwise as
# KERNELS). ETA is train.py's --eta default (the official η): a method at that η leaves the flag out, so that it
# is the same run (and record) as the grids above.
ETA = 0.5
MATCHED_ETA = REPO / "assets" / "world_matched_eta.json"
FRONTIER_LEVELS = (0.25, 0.5, 0.75)   # SAGE's η of the frontier grid's three noise levels


def at_eta(method, eta, num_steps=8):
    """`method` at η (and num_steps, the world's 8 by default): the flags are left out at their defaults."""
    method = dict(method, eta=eta) if eta != ETA else dict(method)
    return dict(method, num_steps=num_steps) if num_steps != 8 else method


def matched_methods(num_steps, sage_eta=ETA):
    """The calibrated kernels, each at its matched η for SAGE at `sage_eta` and `num_steps` (from MATCHED_ETA)."""
    if not MATCHED_ETA.exists():
        raise SystemExit(f"{MATCHED_ETA} is missing: run `python world/rollout_quality.py` first (it finds the η)")
    found = {(m["kernel"], m["steps"], m["sage_eta"]): m["result"]["eta"]
             for m in json.loads(MATCHED_ETA.read_text())["matched"]}
    methods = []
    for kernel in ("sage", "flow_grpo", "cps", "dance_grpo"):
        eta = found.get((kernel, num_steps, sage_eta))
        if eta is None:
            print(f"{kernel}: no matched η at {num_steps} steps for SAGE's η {sage_eta:g} in {MATCHED_ETA}: left out")
            continue
        methods.append(at_eta(dict(CALIBRATED, kernel=kernel), eta, num_steps))
    return methods


def frontier_methods():
    """The frontier grid's runs as blocks, run in this order (seed-major within a block), so that a grid stopped
    midway has whole blocks: every kernel at η 0.5 (the kernels grid's runs) and at SAGE's 0.5 level (the matched
    grid's), which exist; then the 0.75 level; then SAGE at 0.25, its third η; then the other kernels at 0.25."""
    low = matched_methods(8, FRONTIER_LEVELS[0])
    return [KERNELS, matched_methods(8, 0.5), matched_methods(8, FRONTIER_LEVELS[2]), low[:1], low[1:]]
# The SDE window (--sde_window K, a new random start every iteration) at the calibrated setting. K = 8 is every
# step, the same runs as CALIBRATED (train.py treats K = N as no window), rerun in the same sitting so that the
# wall times compare.
WINDOWS = [dict(CALIBRATED, sde_window=k, sde_window_placement="random") for k in (8, 4, 2)]
# The held-out evaluation during training (--eval_every): ODE samples of the world's prompts from fixed seeds.
EVALS = [dict(HEADLINE, eval_every=10, eval_videos_per_prompt=4), dict(CALIBRATED, eval_every=10, eval_videos_per_prompt=4)]
# name: (methods, seeds, reference method of the paired differences or None)
GRIDS = {"headline": ([HEADLINE], (0, 1, 2), None),
         "comparison": ([HEADLINE] + COMPARISON, (0, 1, 2), None),
         "beta": (BETA_SWEEP, (0, 1, 2, 3, 4), BETA_SWEEP[0]),
         "calibration": (CALIBRATION, (0, 1, 2), None),
         "modes": (MODES, (0, 1, 2, 3, 4), MODES[3]),
         "kernels": (KERNELS, tuple(range(8)), KERNELS[0]),
         "window": (WINDOWS, (0, 1, 2), WINDOWS[0]),
         "eval": (EVALS, (0,), None),
         # resolved when the grid is run (they read MATCHED_ETA); the reference is SAGE at η 0.5
         "matched": (lambda: matched_methods(8), tuple(range(8)), lambda: matched_methods(8)[0]),
         # 20 steps: the untrained distance is flat in η there, so every kernel is matched on its total injected std
         "matched20": (lambda: matched_methods(20), tuple(range(8)), lambda: matched_methods(20)[0]),
         # its SAGE-vs-CPS difference replicated on 8 fresh seeds (8-15), decided before they ran: at seeds 0-7 it
         # sat at the edge of significance. Same run names as matched20, so those records serve both.
         "replicate20": (lambda: [m for m in matched_methods(20) if m["kernel"] in ("sage", "cps")],
                         tuple(range(8, 16)), lambda: matched_methods(20)[0]),
         "frontier": (frontier_methods, (0, 1, 2, 3, 4), None)}
KEYS = ("reward_mean", "on_manifold_reward", "off_manifold", "brightness")


def flags(method, seed, iterations, nproc):
    out = WORLD_FLAGS + ["--videos_per_rank", str(VIDEOS_PER_ITERATION // nproc)]
    for key, value in method.items():
        out += [f"--{key}" if value else f"--no-{key}"] if isinstance(value, bool) else [f"--{key}", str(value)]
    return out + ["--seed", str(seed), "--max_iterations", str(iterations)]


def name(method):
    """'sage, equalizer on, KL dual' and whatever else the method sets: 'β fixed 10'."""
    text = f"{method['kernel']}, equalizer {'on' if method['equalizer'] else 'off'}, KL {method['kl_mode']}"
    if method.get("beta_schedule") == "constant":  # "β fixed": the records' names, from before the schedule's rename
        text += f", β fixed {method['beta_start']:g}"
    elif method.get("beta_schedule") == "adaptive":
        text += ", β adaptive" + "".join(f" {k} {method[k]:g}" for k in ("kl_target", "beta_init", "beta_window")
                                         if k in method)
    elif method.get("beta_schedule"):
        text += f", β {method['beta_schedule']}"
    if method.get("updates_per_rollout", 1) > 1:
        text += f", {method['updates_per_rollout']} updates/rollout"
    if method.get("sde_window"):
        text += f", SDE window {method['sde_window']} {method.get('sde_window_placement', 'static')}"
    if method.get("eval_every"):
        text += f", eval every {method['eval_every']}"
    if "eta" in method:
        text += f", η {method['eta']:g}"
    if "num_steps" in method:
        text += f", {method['num_steps']} steps"
    return text


def run_dir(out, method, seed):
    return out / f"{name(method).replace(', ', '_').replace(' ', '-')}_seed{seed}"


def launch(method, seed, iterations, out, nproc=2):
    """One train.py run with `nproc` ranks (gloo, CPU, one thread each) into `out` (cleared first). Returns its rows."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "train.py", *flags(method, seed, iterations, nproc), "--output_dir", str(out), "--overwrite"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    started = time.time()
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    rows = read_rows(out)
    rows[-1]["wall_seconds"] = time.time() - started
    (out / "run.json").write_text(json.dumps({"nproc": nproc, "wall_seconds": rows[-1]["wall_seconds"]}))
    return rows


def read_rows(out):
    """metrics.jsonl's rows, a torn last line (a killed run) ignored."""
    rows = []
    path = out / "metrics.jsonl"
    for line in (path.read_text().splitlines() if path.exists() else ()):
        try:
            rows.append(json.loads(line))
        except ValueError:
            break
    return [r for r in rows if "reward_mean" in r]  # the iterations (--eval_every's iteration-0 row is not one)


# Finished runs are also kept as compact records in the repository (the numbers the tables and pictures read,
# per iteration), so that a grid continues on another machine or after the run directories are gone.
RECORDS = REPO / "assets" / "world_runs"
RECORD_KEYS = ("iteration", "unix_time", "reward_mean", "on_manifold_reward", "off_manifold", "brightness",
               "alignment", "composition", "trust_region_activity", "kl_anchor", "kl_step", "beta", "time_rollout",
               "time_reward", "time_update", "forward_equivalents", "time_eval", "eval/after_iterations", "eval/reward",
               "eval/on_manifold_reward", "eval/off_manifold", "eval/brightness")


def save_record(out, rows, info):
    RECORDS.mkdir(parents=True, exist_ok=True)
    path = RECORDS / f"{out.name}.json"
    short = lambda v: float(f"{v:.6g}") if isinstance(v, float) else v  # noqa: E731  (6 digits, by column: ~20 kB)
    record = {"run": info, "columns": {k: [r.get(k) if k == "unix_time" else short(r.get(k)) for r in rows]
                                       for k in RECORD_KEYS}}
    path.with_suffix(".tmp").write_text(json.dumps(record, separators=(",", ":")))
    path.with_suffix(".tmp").replace(path)


def finished_rows(out, iterations):
    """The rows of a finished run in `out` (also kept as a record), or from its record; else None."""
    rows = read_rows(out)
    record = RECORDS / f"{out.name}.json"
    if len(rows) != iterations and record.exists():
        saved = json.loads(record.read_text())
        columns, info = saved["columns"], saved["run"]
        rows = [dict(zip(columns, values)) for values in zip(*columns.values())]
    else:
        info = json.loads((out / "run.json").read_text()) if (out / "run.json").exists() else {}
    if len(rows) != iterations:
        return None
    if not record.exists():
        save_record(out, rows, info)
    rows[-1]["wall_seconds"] = info.get("wall_seconds", rows[-1]["unix_time"] - rows[0]["unix_time"])
    rows[-1]["nproc"] = info.get("nproc", 2)
    return rows


def finite_mean(values):
    values = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return statistics.fmean(values) if values else float("nan")


def summary(rows):
    """Before (iteration 1) and after (mean of the last LAST iterations) of each number."""
    phases = {k: statistics.fmean(r[f"time_{k}"] for r in rows[1:]) for k in ("rollout", "reward", "update")}
    return {"before": {k: rows[0][k] for k in KEYS}, "after": {k: statistics.fmean(r[k] for r in rows[-LAST:]) for k in KEYS},
            "phases": phases, "wall_seconds": rows[-1]["wall_seconds"], "nproc": rows[-1].get("nproc", 2),
            "activity": finite_mean(r.get("trust_region_activity") for r in rows[-LAST:]),
            "kl_anchor": finite_mean(r.get("kl_anchor") for r in rows[-LAST:]),
            "beta": finite_mean(r.get("beta") for r in rows[-LAST:])}


# Student's t, two-sided 95 %: t_{0.975, df} for df = 1 … 30 (beyond: the normal 1.96 is within 2 %).
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def interval(values):
    """(mean, half-width of the 95 % t-interval of the mean) over seeds; half-width nan for one value."""
    values = list(values)
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, float("nan")
    df = len(values) - 1
    return mean, (T975[df - 1] if df <= len(T975) else 1.96) * statistics.stdev(values) / math.sqrt(len(values))


def cell(values, digits=3):
    mean, half = interval(values)
    return f"{mean:.{digits}f} ± {half:.{digits}f}" if math.isfinite(half) else f"{mean:.{digits}f}"


def table(results):
    """results: {method name: [summary per seed]} -> markdown: before -> after, mean ± 95 % CI over seeds."""
    lines = ["| run | seeds | reward ↑ (before → after) | on-manifold reward ↑ | off-manifold distance ↓ | "
             "brightness (>1: off the manifold) | trust-region activity | KL to the anchor | β (end) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for method, runs in results.items():
        cells = [f"{cell(r['before'][key] for r in runs)} → {cell(r['after'][key] for r in runs)}" for key in KEYS]
        activity, kl = interval(r["activity"] for r in runs), interval(r["kl_anchor"] for r in runs)
        lines.append(f"| {method} | {len(runs)} | " + " | ".join(cells) + f" | {activity[0]:.2g} ± {activity[1]:.1g} | "
                     f"{kl[0]:.2g} ± {kl[1]:.1g} | {statistics.fmean(r['beta'] for r in runs):.3g} |")
    return "\n".join(lines) + "\n"


# Seeds needed to resolve a paired difference: the smallest n with (t_0.975,n−1 + t_0.8,n−1)·sd/√n ≤ |mean|, the
# seeds at which a true difference equal to the observed mean, with the observed spread, gives a 95 % interval that
# excludes 0 with probability ~0.8 (a planning number from an uncertain sd, not a promise).
# One-sided t_0.8 for df = 1 … 30 (beyond: the normal 0.8416).
T80 = (1.376, 1.061, 0.978, 0.941, 0.920, 0.906, 0.896, 0.889, 0.883, 0.879, 0.876, 0.873, 0.870, 0.868, 0.866,
       0.865, 0.863, 0.862, 0.861, 0.860, 0.859, 0.858, 0.858, 0.857, 0.856, 0.856, 0.855, 0.855, 0.854, 0.854)


def seeds_needed(differences, limit=10_000):
    """Paired differences over seeds -> the seeds needed to resolve their mean (formula above); inf beyond limit."""
    mean, sd = abs(statistics.fmean(differences)), statistics.stdev(differences)
    for n in range(2, limit + 1):
        df = n - 1
        t = (T975[df - 1] + T80[df - 1]) if df <= len(T975) else (1.96 + 0.8416)
        if t * sd / math.sqrt(n) <= mean:
            return n
    return math.inf


def paired_table(results, reference, seeds_of, plan=False):
    """Per method: mean difference to `reference` over the seeds both ran, its 95 % t-interval, significant?
    plan: a not-significant cell also says how many seeds would resolve its mean (seeds_needed)."""
    lines = [f"Paired by seed, against **{reference}** (difference = method − reference, after; 95 % t-interval"
             + ("; for a difference that is not significant, the seeds that would resolve it at 80 % power, from the "
                "paired std" if plan else "") + "):\n",
             "| method | seeds | Δ reward | Δ on-manifold reward | Δ off-manifold distance | Δ brightness |",
             "|---|---|---|---|---|---|"]
    base = dict(zip(seeds_of[reference], results[reference]))
    for method, runs in results.items():
        if method == reference:
            continue
        pairs = [(run, base[seed]) for seed, run in zip(seeds_of[method], runs) if seed in base]
        cells = []
        for key in KEYS:
            diffs = [a["after"][key] - b["after"][key] for a, b in pairs]
            mean, half = interval(diffs) if diffs else (float("nan"), float("nan"))
            verdict = ("significant" if abs(mean) > half else "not significant") if math.isfinite(half) else "—"
            if plan and verdict == "not significant":
                verdict += f", ~{seeds_needed(diffs)} seeds to resolve"
            cells.append(f"{mean:+.3f} ± {half:.3f} ({verdict})")
        lines.append(f"| {method} | {len(pairs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# The three numbers every picture shows: (metrics.jsonl key, panel title).
PANELS = (("reward_mean", "reward ↑"), ("on_manifold_reward", "on-manifold reward ↑"),
          ("off_manifold", "off-manifold distance ↓"))


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save(figure, path):
    """Lay out, write (90 dpi) and close one of this module's figures."""
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    pyplot().close(figure)


def frontier(results, path):
    """The β sweep as one picture: on-manifold reward against off-manifold distance, one point per β with its
    95 % intervals, next to each number against β."""
    plt = pyplot()
    figure, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    points = []
    for method, runs in results.items():
        beta = float(method.rsplit("β fixed ", 1)[1]) if "β fixed" in method else float("nan")
        points.append((beta, interval(r["after"]["off_manifold"] for r in runs),
                       interval(r["after"]["on_manifold_reward"] for r in runs),
                       interval(r["after"]["brightness"] for r in runs), interval(r["activity"] for r in runs)))
    before_x = statistics.fmean(r["before"]["off_manifold"] for runs in results.values() for r in runs)
    before_y = statistics.fmean(r["before"]["on_manifold_reward"] for runs in results.values() for r in runs)
    axis = axes[0]
    for beta, (x, dx), (y, dy), _, _ in points:
        axis.errorbar(x, y, xerr=dx, yerr=dy, marker="o", capsize=3, label=f"β = {beta:g}")
    axis.plot(before_x, before_y, marker="*", markersize=12, color="black", linestyle="none", label="pretrained")
    axis.set_xlabel("off-manifold distance ↓ (last 10 iterations)")
    axis.set_ylabel("on-manifold reward ↑")
    axis.set_title("frontier: each β, mean ± 95 % CI over seeds", fontsize=9)
    axis.legend(fontsize=7)
    betas = [p[0] for p in points]
    for axis, index, label in ((axes[1], 1, "off-manifold distance ↓"), (axes[1], 3, "brightness (>1 = hacking)"),
                               (axes[2], 4, "trust-region activity")):
        axis.errorbar(betas, [p[index][0] for p in points], yerr=[p[index][1] for p in points], marker="o",
                      capsize=3, label=label)
        axis.set_xscale("log")
        axis.set_xlabel("β (fixed, dual KL)")
        axis.legend(fontsize=7)
    axes[2].set_yscale("log")
    axes[1].set_title("drift and hacking against β", fontsize=9)
    axes[2].set_title("how hard the KL pushes, against β", fontsize=9)
    save(figure, path)


def kernel_of(method):
    """(kernel, η) of a method's name: 'cps, …, η 0.384' -> ('cps', 0.384); no η in the name is train.py's ETA."""
    return method.split(",")[0], float(method.rsplit("η ", 1)[1].split(",")[0]) if ", η " in method else ETA


def kernel_points(results):
    """{kernel: [(η, gain, distance), …]} sorted by η: gain = the on-manifold reward's after − before per seed and
    distance = the off-manifold distance after, each (mean, 95 % half-width) over the seeds."""
    points = {}
    for method, runs in results.items():
        kernel, eta = kernel_of(method)
        gain = interval(r["after"]["on_manifold_reward"] - r["before"]["on_manifold_reward"] for r in runs)
        distance = interval(r["after"]["off_manifold"] for r in runs)
        points.setdefault(kernel, []).append((eta, gain, distance, len(runs)))
    return {k: sorted(v) for k, v in points.items()}


def kernel_frontier_table(results):
    lines = ["Each kernel's frontier: the on-manifold reward gained (after − before, per seed) and the off-manifold "
             "distance after training, at each η (mean ± 95 % t-interval over seeds):\n",
             "| kernel | η | seeds | on-manifold reward gained ↑ | off-manifold distance after ↓ |", "|---|---|---|---|---|"]
    for kernel, points in kernel_points(results).items():
        for eta, (g, dg), (d, dd), n in points:
            lines.append(f"| {kernel} | {eta:g} | {n} | {g:+.3f} ± {dg:.3f} | {d:.3f} ± {dd:.3f} |")
    return "\n".join(lines) + "\n"


def kernel_frontier(results, path):
    """The kernels' frontiers: on-manifold reward gained against off-manifold distance after training, one line
    per kernel through its η (labelled), with 95 % intervals over seeds both ways. Up and to the left is better."""
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(7.5, 5.2))
    for kernel, points in kernel_points(results).items():
        etas, gains, distances, _ = zip(*points)
        line = axis.errorbar([d[0] for d in distances], [g[0] for g in gains], xerr=[d[1] for d in distances],
                             yerr=[g[1] for g in gains], marker="o", capsize=3, label=kernel)
        for eta, g, d in zip(etas, gains, distances):
            axis.annotate(f"η {eta:g}", (d[0], g[0]), textcoords="offset points", xytext=(4, 4), fontsize=7,
                          color=line[0].get_color())
    axis.set_xlabel("off-manifold distance after training ↓ (mean of the last 10 iterations)")
    axis.set_ylabel("on-manifold reward gained ↑ (after − before)")
    axis.set_title("each kernel's frontier over η at the calibrated β (8 steps), mean ± 95 % CI over seeds",
                   fontsize=9)
    axis.legend(fontsize=8)
    save(figure, path)


def curves(all_rows, path):
    """Reward, on-manifold reward and off-manifold distance per iteration, one line per seed."""
    plt = pyplot()
    figure, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for axis, (key, title) in zip(axes, PANELS):
        for seed, rows in all_rows.items():
            axis.plot([r["iteration"] for r in rows], [r[key] for r in rows], label=f"seed {seed}")
        axis.set_title(title)
        axis.set_xlabel("iteration")
        axis.legend(fontsize=7)
    save(figure, path)


def comparison_curves(rows_per_method, path, window=10):
    """The comparison as pictures: per method, the mean over seeds of each number per iteration
    (a running mean over `window` iterations: one iteration's mean of 16 rewards is noisy)."""
    plt = pyplot()
    figure, axes = plt.subplots(1, 4, figsize=(18, 3.8))
    for axis, (key, title) in zip(axes, PANELS + (("brightness", "brightness (> 1 only off the manifold)"),)):
        for method, runs in rows_per_method.items():
            mean = [statistics.fmean(rows[i][key] for rows in runs) for i in range(min(len(r) for r in runs))]
            smooth = [statistics.fmean(mean[max(0, i - window + 1):i + 1]) for i in range(len(mean))]
            axis.plot(range(1, len(smooth) + 1), smooth, label=method, linewidth=1.2)
        axis.set_title(f"{title} (mean of {len(runs)} seeds, running mean {window})", fontsize=9)
        axis.set_xlabel("iteration")
    axes[0].legend(fontsize=6)
    save(figure, path)


def iteration_seconds(row):
    """The trainer's own time of one iteration: rollout + reward + update (advantage and logging are ~ms)."""
    return row["time_rollout"] + row["time_reward"] + row["time_update"]


def cost_table(rows_of):
    """The window grid's cost: per method, transformer forward-equivalents per video per iteration (counted by
    the run), seconds per iteration (median over its iterations, mean over seeds), the reward reached, and the
    reward at equal cost: at the forward-equivalents (and the seconds) the cheapest method spends in its whole run,
    each method's mean reward over the LAST iterations that end there."""
    lines = ["| run | seeds | forward-equivalents per video per iteration | seconds per iteration | "
             "reward after (last 10) | reward at equal forward-equivalents | reward at equal seconds |",
             "|---|---|---|---|---|---|---|"]
    cost = {method: (statistics.fmean(r["forward_equivalents"] for rows in runs for r in rows),
                     statistics.fmean(statistics.median(iteration_seconds(r) for r in rows) for rows in runs))
            for method, runs in rows_of.items()}
    iterations = min(len(rows) for runs in rows_of.values() for rows in runs)
    budgets = [min(c[i] for c in cost.values()) * iterations for i in (0, 1)]  # the cheapest method's whole run

    def reward_at(rows, spent_per_iteration, budget):
        end = max(LAST, min(len(rows), int(budget / spent_per_iteration)))
        return statistics.fmean(r["reward_mean"] for r in rows[end - LAST:end])
    for method, runs in rows_of.items():
        fe, seconds = cost[method]
        lines.append(f"| {method} | {len(runs)} | {fe:.0f} | {seconds:.2f} | "
                     f"{cell(statistics.fmean(r['reward_mean'] for r in rows[-LAST:]) for rows in runs)} | "
                     f"{cell(reward_at(rows, fe, budgets[0]) for rows in runs)} | "
                     f"{cell(reward_at(rows, seconds, budgets[1]) for rows in runs)} |")
    return "\n".join(lines) + "\n"


def cost_curves(rows_of, path, window=10):
    """Reward (mean over seeds, running mean over `window` iterations) against the cumulative transformer
    forward-equivalents per video and against the cumulative seconds of the trainer."""
    plt = pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(12, 4))
    for method, runs in rows_of.items():
        n = min(len(rows) for rows in runs)
        mean = [statistics.fmean(rows[i]["reward_mean"] for rows in runs) for i in range(n)]
        smooth = [statistics.fmean(mean[max(0, i - window + 1):i + 1]) for i in range(n)]
        for axis, cost in ((axes[0], lambda r: r["forward_equivalents"]), (axes[1], iteration_seconds)):
            spent = [statistics.fmean(sum(cost(r) for r in rows[:i + 1]) for rows in runs) for i in range(n)]
            axis.plot(spent, smooth, label=method, linewidth=1.2)
    axes[0].set_xlabel("transformer forward-equivalents per video (cumulative, counted)")
    axes[1].set_xlabel("trainer seconds (cumulative: rollout + reward + update, 2 shared CPU cores)")
    for axis in axes:
        axis.set_ylabel(f"reward (mean of seeds, running mean {window})")
        axis.legend(fontsize=7)
    save(figure, path)


def eval_curves(rows_of, path):
    """--eval_every's held-out numbers against the iterations done, next to the rollouts' own."""
    plt = pyplot()
    figure, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    for axis, (key, title) in zip(axes, PANELS):
        for (method, runs), colour in zip(rows_of.items(), ("tab:red", "tab:blue", "tab:green")):
            rows = runs[0]
            held_out = "eval/reward" if key == "reward_mean" else f"eval/{key}"
            # the iterations done: a row's own iteration (records before 2026-12-07 name it in eval/after_iterations)
            points = [(r["iteration"] if r.get("eval/after_iterations") is None else r["eval/after_iterations"],
                       r[held_out]) for r in rows if isinstance(r.get(held_out), (int, float))]
            axis.plot(*zip(*points), marker="o", color=colour, label=f"{method}: held-out ODE eval")
            axis.plot([r["iteration"] for r in rows], [r[key] for r in rows],
                      color=colour, alpha=0.3, linewidth=0.8, label=f"{method}: training rollouts (SDE)")
        axis.set_title(title, fontsize=9)
        axis.set_xlabel("iterations done")
    axes[0].legend(fontsize=6)
    save(figure, path)


def before_after(checkpoint, path, seeds=(0, 1, 2, 3)):
    """ODE samples of the pretrained world policy and of a trained checkpoint, same prompts and noise."""
    import torch
    from diffusers import HunyuanVideo15Transformer3DModel
    import model
    import sde
    from world import video_world, pretrain as world_pretrain
    base = world_pretrain.prepare_world()
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


def job_order(blocks, seeds):
    """[(method, seed)] in the order they run: block after block, seed-major within a block (after each round every
    method of the block has the same number of seeds, so a grid stopped midway is balanced); a method in two blocks
    (SAGE at η 0.5 is in several) runs once, in the first."""
    order = dict.fromkeys((name(m), s) for block in blocks for s in seeds for m in block)
    by_name = {name(m): m for block in blocks for m in block}
    return [(by_name[n], s) for n, s in order]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--comparison", action="store_true", help="the headline and the paper's comparison (--grid "
                        "comparison)")
    parser.add_argument("--grid", choices=list(GRIDS), default=None, help="which grid (default: headline)")
    parser.add_argument("--seeds", type=int, default=None, help="this many seeds from the grid's first (default: the grid's)")
    parser.add_argument("--iterations", type=int, default=ITERATIONS)
    parser.add_argument("--nproc", type=int, default=2, choices=(1, 2), help="ranks per run (16 videos either way)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time")
    parser.add_argument("--rerun", action="store_true", help="run again even where a finished run exists")
    parser.add_argument("--report_only", action="store_true", help="no new runs: tables and pictures of what exists")
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args(argv)
    grid = args.grid or ("comparison" if args.comparison else "headline")
    methods, seeds, reference = GRIDS[grid]
    methods = methods() if callable(methods) else methods
    blocks = methods if isinstance(methods[0], list) else [methods]   # a grid's runs in blocks, run in order
    reference = reference() if callable(reference) else reference
    seeds = seeds if args.seeds is None else tuple(range(seeds[0], seeds[0] + args.seeds))  # from the grid's first
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    jobs = job_order(blocks, seeds)
    todo = [(m, s) for m, s in jobs if args.rerun or finished_rows(run_dir(out, m, s), args.iterations) is None]
    if todo and not args.report_only:
        print(f"{grid}: {len(jobs) - len(todo)} of {len(jobs)} runs done, running {len(todo)} "
              f"({args.jobs} at a time, {args.nproc} rank(s) each)", flush=True)
        with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
            futures = {pool.submit(launch, m, s, args.iterations, run_dir(out, m, s), args.nproc): (m, s) for m, s in todo}
            for future in concurrent.futures.as_completed(futures):
                m, s = futures[future]
                rows = future.result()
                finished_rows(run_dir(out, m, s), args.iterations)  # its record, now: a grid stopped later keeps it
                print(f"  done: {name(m)}, seed {s}: reward {rows[0]['reward_mean']:.3f} -> "
                      f"{statistics.fmean(r['reward_mean'] for r in rows[-LAST:]):.3f}, "
                      f"{rows[-1]['wall_seconds']:.0f} s", flush=True)
    results, rows_of, seeds_of = {}, {}, {}
    for method, seed in jobs:
        rows = finished_rows(run_dir(out, method, seed), args.iterations)
        if rows is None:
            continue
        results.setdefault(name(method), []).append(summary(rows))
        rows_of.setdefault(name(method), []).append(rows)
        seeds_of.setdefault(name(method), []).append(seed)
    if not results:
        print(f"{grid}: no finished run yet in {out}")
        return
    nprocs = sorted({r["nproc"] for runs in results.values() for r in runs})
    text = (f"{grid}: {args.iterations} iterations per run, {VIDEOS_PER_ITERATION} videos per iteration on "
            f"{' or '.join(map(str, nprocs))} rank(s); after = mean of the last {LAST} iterations; mean ± 95 % "
            f"t-interval over seeds\n\n") + table(results)
    if reference is not None and name(reference) in results:
        text += "\n" + paired_table(results, name(reference), seeds_of, plan=grid.startswith(("matched", "replicate")))
    if grid == "frontier":   # each noise level against SAGE at that level
        for level in FRONTIER_LEVELS:
            level_methods = [name(m) for m in matched_methods(8, level) if name(m) in results]
            if level_methods and level_methods[0].startswith("sage"):
                text += f"\nNoise level of SAGE's η {level:g}:\n" + paired_table(
                    {m: results[m] for m in level_methods}, level_methods[0], seeds_of, plan=True)
        text += "\n" + kernel_frontier_table(results)
    walls = [r["wall_seconds"] for runs in results.values() for r in runs]
    text += f"\nWall time per run: median {statistics.median(walls):.0f} s (2 shared CPU cores).\n"
    (out / f"{grid}_table.md").write_text(text)
    pictures = [out / f"{grid}_curves.png"]
    comparison_curves(rows_of, pictures[0])
    if grid == "beta":
        pictures.append(out / "beta_frontier.png")
        frontier(results, pictures[-1])
    if grid == "frontier":
        pictures.append(out / "kernel_frontier.png")
        kernel_frontier(results, pictures[-1])
    if grid == "window":
        text += "\n" + cost_table(rows_of)
        (out / f"{grid}_table.md").write_text(text)
        pictures.append(out / "window_cost.png")
        cost_curves(rows_of, pictures[-1])
    if grid == "eval":
        pictures.append(out / "eval_held_out.png")
        eval_curves(rows_of, pictures[-1])
    if grid in ("headline", "comparison"):
        pictures.append(out / "headline_curves.png")
        curves(dict(zip(seeds_of[name(HEADLINE)], rows_of[name(HEADLINE)])), pictures[-1])
        checkpoint = run_dir(out, HEADLINE, seeds[0]) / "checkpoint-{:06d}".format(args.iterations)
        if checkpoint.exists():
            pictures.append(out / "before_after.png")
            before_after(checkpoint, pictures[-1])
    print(text)
    print("pictures: " + ", ".join(map(str, pictures)) + f"; table: {out / f'{grid}_table.md'}")


if __name__ == "__main__":
    main()
