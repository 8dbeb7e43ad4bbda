"""Rollout quality before training: what each kernel's SDE rollouts of the pretrained world policy look like.

The kernels grid (world/runs.py --grid kernels) compares the four kernels at one η = 0.5, which is a different
injected noise for each kernel: before any update their rollouts already lie at different distances from the
manifold. This script measures, with no training, for each kernel at several η and at 8 and 20 steps:

    off_manifold        the rollouts' RMS distance to the data manifold (video_world.distance_to_manifold)
    on_manifold_reward  the reward of each rollout's nearest data video: the honest part of its reward
    reliability         within a group of G rollouts of one prompt, Spearman's rank correlation ρ between the
                        reward GRPO sees (the world's training reward) and the on-manifold reward of the same
                        rollouts, averaged over the groups: 1 = the advantages rank the group as honestly as the
                        manifold does, 0 = the ranking GRPO learns from is unrelated to the honest one
    injected std        √(mean_i std_i²) over the N steps of sde.step_std (deterministic: kernel, η, schedule)

Sampling is train.py's ROLLOUT for the world: model.rollout with the kernel and η, the world's checkpoint shift
and CFG scale, one seed per video, no shared initial noise (train.py's default), groups of G = 8 of one prompt
(world/runs.py's --group_size), one group for each of the world's 8 prompts per run seed. A video's seed is
seed·1_000_003 + prompt·G + member, the same for every kernel and η, so kernels are compared on the same initial
noise and the same noise streams (paired by seed). Each number is the mean over the run seeds ± the 95 %
t-interval of that mean.

Matched noise. For each kernel, the η whose untrained rollouts lie as far from the manifold as SAGE's at a
reference η (SAGE_REFERENCE_ETAS; 0.5 is the official η): the measured curve off_manifold(η) (mean over seeds)
is interpolated linearly between the two measured η that bracket the target, that η is then measured, and the
interpolation repeated with the new point included, until the measured distance at the interpolated η lies
within the target's own 95 % interval (at most MATCH_ROUNDS rounds). The distance is the criterion only where it
can tell noise levels apart: where SAGE's own distance does not rise with η (paired over seeds, from the lowest
to the highest ETAS; at 20 steps it is flat), every kernel is matched on the second criterion instead. So is a
kernel whose measured curve never reaches the target (CPS at 8 steps: its rollouts lie nearer the manifold than
the ODE's at every η). The second criterion is the total injected std √(Σ std²) (exact, from sde.step_std, on a
grid of η steps of 1e-3 within ETAS' range), measured there; a kernel that cannot inject SAGE's total std within
that range (DanceGRPO at 20 steps) has no matched η. The record says which criterion was used and why. The
result, with the verification's paired difference to SAGE, goes to assets/world_matched_eta.json, which
world/runs.py --grid matched | matched20 | frontier reads.

Every measurement is cached per (kernel, η, steps, seed) in assets/world_rollout_quality.json, keyed by the
world's pretrained weights, so a rerun computes only what is missing:

    python world/rollout_quality.py              # measure what is missing, write table, picture, matched η
    python world/rollout_quality.py --seeds 8    # more seeds (reuses the first ones)
"""
import argparse
import json
import math
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # the repository's modules when run as a script

from world import runs  # noqa: E402  (interval, pyplot, save: one home for the statistics and the pictures)

ASSETS = REPO / "assets"
CACHE = ASSETS / "world_rollout_quality.json"
MATCHED = ASSETS / "world_matched_eta.json"
TABLE = ASSETS / "world_rollout_quality.md"
PICTURE = ASSETS / "world_rollout_quality.png"
KERNELS = ("sage", "cps", "flow_grpo", "dance_grpo")
# η from low to high noise, the same for every kernel (cps's std σ'·sin(ηπ/2) is largest at η = 1).
ETAS = (0.1, 0.2, 0.3, 0.5, 0.7, 1.0)
STEPS = (8, 20)             # the world's (video_world.WORLD_NUM_STEPS) and the paper's
GROUP_SIZE = 8              # world/runs.py's --group_size
# run seeds 0 … n−1 per step count (each: 8 prompts x G videos); 20 steps cost 2.5x as much per seed
SEEDS = {8: 8, 20: 5}
# SAGE's η whose untrained off-manifold distance the other kernels are matched to: 0.5 is the official η (the
# matched grid); 0.25 and 0.75 add a lower and a higher noise level for the frontier grid.
SAGE_REFERENCE_ETAS = (0.25, 0.5, 0.75)
MATCH_ROUNDS = 3            # interpolate -> measure at most this many times per kernel and target
MEASURES = (("off_manifold", "off-manifold distance ↓"), ("on_manifold_reward", "on-manifold reward ↑"),
            ("reliability", "reward reliability: within-group Spearman ρ ↑"))


# ----------------------------------------------------------------------------------------------
# The measurements (pure functions, tested in tests/test_rollout_quality.py).

def ranks(values):
    """Ranks 1 … n of `values`, ties given the mean of the ranks they span (Spearman's convention)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1     # mean of ranks i+1 … j+1
        i = j + 1
    return out


def spearman(a, b):
    """Spearman's ρ: the Pearson correlation of the ranks. nan when either side is constant (no ranking)."""
    if len(a) != len(b) or len(a) < 2:
        raise ValueError(f"spearman needs two sequences of the same length >= 2, got {len(a)} and {len(b)}")
    ra, rb = ranks(a), ranks(b)
    ma, mb = statistics.fmean(ra), statistics.fmean(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    var_a, var_b = sum((x - ma) ** 2 for x in ra), sum((y - mb) ** 2 for y in rb)
    return cov / math.sqrt(var_a * var_b) if var_a > 0 and var_b > 0 else float("nan")


def group_reliability(reward, honest, group_size):
    """Mean over groups of Spearman ρ(reward, honest) within each group of `group_size` consecutive samples;
    groups where either is constant are left out. Returns (mean ρ, number of groups used)."""
    if len(reward) != len(honest) or len(reward) % group_size:
        raise ValueError(f"need equal lengths divisible by group_size {group_size}, got {len(reward)}, {len(honest)}")
    rhos = [spearman(reward[g:g + group_size], honest[g:g + group_size]) for g in range(0, len(reward), group_size)]
    rhos = [r for r in rhos if math.isfinite(r)]
    return (statistics.fmean(rhos) if rhos else float("nan")), len(rhos)


def injected_std(kernel, eta, sigmas):
    """(rms, total) of sde.step_std over the schedule's steps: √(mean_i std_i²) and √(Σ_i std_i²)."""
    import sde
    import torch
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
    variance = sde.step_std(kernel, sigmas[:-1], sigmas[1:], eta).double() ** 2      # (N,)
    return math.sqrt(float(variance.mean())), math.sqrt(float(variance.sum()))


def matched_eta(etas, values, target):
    """The η at which the piecewise-linear curve through (etas[i], values[i]) first reaches `target`, scanning η
    upwards; None when the measured range does not bracket it. etas need not be sorted; values are the curve's."""
    points = sorted(zip(etas, values))
    if len(points) < 2:
        raise ValueError(f"need at least 2 points of the curve, got {len(points)}")
    for (e0, v0), (e1, v1) in zip(points, points[1:]):
        if v0 == target:
            return e0
        if (v0 - target) * (v1 - target) < 0 or v1 == target:
            return e0 + (target - v0) * (e1 - e0) / (v1 - v0)
    return None


# ----------------------------------------------------------------------------------------------
# Sampling (train.py's ROLLOUT for the world).

class World:
    """The pretrained world policy, its prompts' embeddings and its reward, loaded once."""

    def __init__(self):
        import torch
        import model
        from world import pretrain, video_world
        self.torch, self.model, self.video_world = torch, model, video_world
        self.key = pretrain.cache_key(pretrain.WorldPretrainConfig())
        self.policy = model.load_hunyuan(pretrain.prepare_world(), dtype=torch.float32)
        self.prompts = list(video_world.WORLD_PROMPTS)
        rows = [p for p in self.prompts for _ in range(GROUP_SIZE)]   # group g = prompt g, G members
        self.rows = rows
        self.embeds = model.PromptCache(self.policy, "cpu", torch.float32)(rows)
        self.shape = self.policy.latent_shape(video_world.WORLD_NUM_FRAMES, video_world.WORLD_HEIGHT,
                                              video_world.WORLD_WIDTH)
        self.reward = video_world.WorldReward()

    def measure(self, kernel, eta, num_steps, seed):
        """One run seed of one setting: the mean of each number over the 8 prompts x G videos."""
        import sde
        sigmas = sde.shifted_sigmas(num_steps, self.policy.shift)
        seeds = [seed * 1_000_003 + i for i in range(len(self.rows))]
        with self.torch.no_grad():
            result = self.model.rollout(self.policy.transformer, self.embeds, seeds, self.shape, sigmas, kernel=kernel,
                                        eta=eta, guidance_scale=self.policy.guidance_scale)
        scores = {k: v.double().tolist() for k, v in self.reward(result.final_latents, self.rows).items()}
        rho, groups = group_reliability(scores["reward"], scores["on_manifold_reward"], GROUP_SIZE)
        rms, total = injected_std(kernel, eta, sigmas)
        return {"off_manifold": statistics.fmean(scores["off_manifold"]),
                "on_manifold_reward": statistics.fmean(scores["on_manifold_reward"]),
                "reward": statistics.fmean(scores["reward"]), "brightness": statistics.fmean(scores["brightness"]),
                "reliability": rho, "groups": groups, "std_rms": rms, "std_total": total}


# ----------------------------------------------------------------------------------------------
# The cache and the settings.

def setting_key(kernel, eta, num_steps, seed):
    return f"{kernel}|eta={eta:g}|steps={num_steps}|seed={seed}"


class Cache:
    """{setting key: numbers} in CACHE, for the world's current weights only (another key starts empty)."""

    def __init__(self, key, path=CACHE):
        self.path, self.key = path, key
        saved = json.loads(path.read_text()) if path.exists() else {}
        self.entries = saved.get("entries", {}) if saved.get("world") == key else {}

    def get(self, world, kernel, eta, num_steps, seed):
        name = setting_key(kernel, round(eta, 3), num_steps, seed)
        if name not in self.entries:
            self.entries[name] = world.measure(kernel, round(eta, 3), num_steps, seed)
            self.save()
            print(f"  {name}: off-manifold {self.entries[name]['off_manifold']:.4f}", flush=True)
        return self.entries[name]

    def save(self):
        text = json.dumps({"world": self.key, "group_size": GROUP_SIZE, "entries": self.entries}, indent=0,
                          sort_keys=True)
        self.path.with_suffix(".tmp").write_text(text)
        self.path.with_suffix(".tmp").replace(self.path)


def per_seed(cache, world, kernel, eta, num_steps, seeds):
    return [cache.get(world, kernel, eta, num_steps, s) for s in seeds]


def curve(cache, world, kernel, num_steps, seeds, extra=()):
    """{η: mean off-manifold over seeds} at ETAS and the η in `extra` (a match's own earlier rounds). Only these:
    the same cache gives the same first interpolation on every rerun, so a matched η (and the runs named after
    it) does not drift as verification points accumulate."""
    return {e: statistics.fmean(r["off_manifold"] for r in per_seed(cache, world, kernel, e, num_steps, seeds))
            for e in sorted(set(ETAS) | set(extra))}


def match(cache, world, kernel, num_steps, sage_eta, seeds):
    """The matched η of `kernel` to SAGE at `sage_eta` (module docstring), with how it was found."""
    reference = [r["off_manifold"] for r in per_seed(cache, world, "sage", sage_eta, num_steps, seeds)]
    target, target_half = runs.interval(reference)
    history = []
    for _ in range(MATCH_ROUNDS):
        points = curve(cache, world, kernel, num_steps, seeds, [h["eta"] for h in history])
        eta = matched_eta(list(points), list(points.values()), target)
        if eta is None:
            return {"eta": None, "target": target, "history": history,
                    "note": f"not bracketed by the measured η {sorted(points)} (distances "
                            f"{min(points.values()):.3f}-{max(points.values()):.3f})"}
        eta = round(eta, 3)
        measured = [r["off_manifold"] for r in per_seed(cache, world, kernel, eta, num_steps, seeds)]
        difference = runs.interval([m - r for m, r in zip(measured, reference)])
        history.append({"eta": eta, "measured": statistics.fmean(measured), "paired_difference": difference})
        if abs(statistics.fmean(measured) - target) <= target_half:
            break
    return {"eta": history[-1]["eta"], "target": target, "target_half_width": target_half, "history": history,
            "criterion": "off-manifold distance"}


def match_injected_std(cache, world, kernel, num_steps, sage_eta, seeds):
    """The η of `kernel` whose total injected std equals SAGE's at `sage_eta` (the fallback criterion), measured."""
    import sde
    sigmas = sde.shifted_sigmas(num_steps, world.policy.shift)
    target = injected_std("sage", sage_eta, sigmas)[1]
    grid = [i / 1000 for i in range(1, round(max(ETAS) * 1000) + 1)]   # η = 0.001 … max(ETAS)
    totals = [injected_std(kernel, e, sigmas)[1] for e in grid]
    eta = matched_eta(grid, totals, target)
    if eta is None:
        return {"eta": None, "target_std_total": target,
                "note": f"no η ≤ {grid[-1]:g} injects SAGE's total std {target:.3f} ({kernel}: {min(totals):.3f}-"
                        f"{max(totals):.3f})"}
    eta = round(eta, 3)
    reference = [r["off_manifold"] for r in per_seed(cache, world, "sage", sage_eta, num_steps, seeds)]
    measured = [r["off_manifold"] for r in per_seed(cache, world, kernel, eta, num_steps, seeds)]
    return {"eta": eta, "target_std_total": target, "measured": statistics.fmean(measured),
            "paired_difference": runs.interval([m - r for m, r in zip(measured, reference)])}


def distance_identifies_eta(cache, world, num_steps, seeds):
    """Whether the untrained distance can match noise at `num_steps`: SAGE's off-manifold distance at the highest
    ETAS minus at the lowest, paired over seeds, is positive with a 95 % interval that excludes 0. Where it is not
    (20 steps in this world: SAGE's curve is flat within seed noise from η 0.1 to 1), another kernel's curve crosses
    SAGE's anywhere or nowhere, and every kernel is matched on the total injected std. Returns (yes, (mean, half))."""
    low, high = (per_seed(cache, world, "sage", e, num_steps, seeds) for e in (min(ETAS), max(ETAS)))
    rise = runs.interval([h["off_manifold"] - lo["off_manifold"] for h, lo in zip(high, low)])
    return rise[0] > rise[1], rise


# ----------------------------------------------------------------------------------------------
# Table and picture.

def summarise(cache, world, seeds_of, steps):
    """{(kernel, η, steps): {measure: (mean, half-width)}} of every setting measured (ETAS and verifications) at
    the given step counts; seeds_of: {steps: seeds}."""
    out = {}
    for name in sorted(cache.entries):
        kernel, eta, num_steps, _ = name.split("|")
        key = (kernel, float(eta[4:]), int(num_steps[6:]))
        if key in out or key[0] not in KERNELS + ("ode",) or key[2] not in steps:
            continue
        rows = per_seed(cache, world, *key, seeds_of[key[2]])
        out[key] = {m: runs.interval(r[m] for r in rows if math.isfinite(r[m]))
                    for m in ("off_manifold", "on_manifold_reward", "reliability", "reward")}
        out[key]["std_rms"], out[key]["std_total"] = rows[0]["std_rms"], rows[0]["std_total"]
    return out


def table(summary, seeds_of, matched):
    seeds = ", ".join(f"{len(s)} seeds at {n} steps" for n, s in seeds_of.items())
    lines = [f"Rollout quality of the pretrained world policy, before training ({seeds}; each seed 8 prompts x "
             f"G = {GROUP_SIZE} videos per setting; mean ± 95 % t-interval over seeds). Injected std: "
             "√(mean over steps of std²) and √(Σ std²) of sde.step_std. Reliability: within-group Spearman ρ between "
             "the training reward and the on-manifold reward.\n",
             "| kernel | steps | η | injected std (rms / total) | off-manifold distance ↓ | on-manifold reward ↑ | "
             "reliability ρ ↑ | reward |", "|---|---|---|---|---|---|---|---|"]
    fmt = lambda m: f"{m[0]:.3f} ± {m[1]:.3f}"  # noqa: E731
    for (kernel, eta, steps), s in sorted(summary.items(), key=lambda kv: (kv[0][2], KERNELS.index(kv[0][0])
                                                                           if kv[0][0] in KERNELS else -1, kv[0][1])):
        lines.append(f"| {kernel} | {steps} | {eta:g} | {s['std_rms']:.3f} / {s['std_total']:.3f} | "
                     f"{fmt(s['off_manifold'])} | {fmt(s['on_manifold_reward'])} | {fmt(s['reliability'])} | "
                     f"{fmt(s['reward'])} |")
    lines += ["", "Matched η: each kernel's η whose untrained off-manifold distance equals SAGE's at the reference "
              "η (linear interpolation on the measured curve, then measured there; the paired difference is kernel − "
              "sage over the same seeds, 95 % t-interval); where no η reaches that distance, or where SAGE's distance "
              "does not rise with η (then for every kernel), the η whose total injected std equals SAGE's.\n",
              "| steps | SAGE η | target distance | kernel | matched η | measured distance | Δ distance (kernel − sage) | "
              "rounds | Δ on-manifold reward | Δ reliability ρ |", "|---|---|---|---|---|---|---|---|---|---|"]
    delta = lambda d: f"{d[0]:+.4f} ± {d[1]:.4f} ({'not significant' if abs(d[0]) <= d[1] else 'significant'})"  # noqa: E731
    for entry in matched:
        result = entry["result"]
        if result["eta"] is None:
            distance = "—" if result["target"] is None else f"{result['target']:.3f}"
            lines.append(f"| {entry['steps']} | {entry['sage_eta']:g} | {distance} | {entry['kernel']} | "
                         f"— | — | {result['note']} | — | — | — |")
            continue
        last = result["history"][-1]
        diff = last["paired_difference"]
        verdict = "not significant" if abs(diff[0]) <= diff[1] else "significant"
        target = (f"{result['target']:.3f} ± {result['target_half_width']:.3f}" if "target_half_width" in result
                  else f"{result['target']:.3f} (not reached: {result['note']}; matched on the total injected std "
                       f"{last['target_std_total']:.3f} instead)" if result["target"] is not None
                  else f"— ({result['note']}; matched on the total injected std {last['target_std_total']:.3f})")
        rounds = len(result["history"]) if result["criterion"] == "off-manifold distance" else "std"
        lines.append(f"| {entry['steps']} | {entry['sage_eta']:g} | {target} | {entry['kernel']} | {result['eta']:g} | "
                     f"{last['measured']:.3f} | {diff[0]:+.4f} ± {diff[1]:.4f} ({verdict}) | {rounds} | "
                     f"{delta(entry['paired']['on_manifold_reward'])} | {delta(entry['paired']['reliability'])} |")
    return "\n".join(lines) + "\n"


def same_eta_table(cache, world, seeds_of):
    """Each kernel against SAGE at the same η and the same seeds: paired differences (kernel − sage) of the three
    measures, with the two kernels' injected std (rms over steps)."""
    import sde
    lines = ["\nThe same η, paired by seed (kernel − sage, 95 % t-interval): how much farther from the manifold each "
             "kernel's rollouts lie for the same η, against how much noise each injects.\n",
             "| steps | η | kernel | injected std rms: kernel / sage | Δ off-manifold distance | Δ on-manifold reward | "
             "Δ reliability ρ |", "|---|---|---|---|---|---|---|"]
    delta = lambda d: f"{d[0]:+.4f} ± {d[1]:.4f} ({'not significant' if abs(d[0]) <= d[1] else 'significant'})"  # noqa: E731
    for num_steps, seeds in seeds_of.items():
        sigmas = sde.shifted_sigmas(num_steps, world.policy.shift)
        for eta in ETAS:
            sage = per_seed(cache, world, "sage", eta, num_steps, seeds)
            for kernel in KERNELS[1:]:
                own = per_seed(cache, world, kernel, eta, num_steps, seeds)
                cells = [delta(runs.interval([a[m] - b[m] for a, b in zip(own, sage)
                                              if math.isfinite(a[m]) and math.isfinite(b[m])]))
                         for m in ("off_manifold", "on_manifold_reward", "reliability")]
                lines.append(f"| {num_steps} | {eta:g} | {kernel} | {injected_std(kernel, eta, sigmas)[0]:.3f} / "
                             f"{injected_std('sage', eta, sigmas)[0]:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def noise_table(cache, world, seeds_of):
    """The paper's mechanism within each kernel: the three measures at the highest and a middle η against the lowest,
    paired by seed (the same initial noise and noise streams at every η), 95 % t-interval."""
    lines = ["\nMore noise within one kernel, paired by seed (measure at η − measure at the lowest η, 95 % t-interval): "
             "does excess noise lower rollout quality and the reward's reliability?\n",
             "| steps | kernel | η against " + f"{min(ETAS):g}" + " | Δ off-manifold distance | Δ on-manifold reward | "
             "Δ reliability ρ | Δ reward |", "|---|---|---|---|---|---|---|"]
    delta = lambda d: f"{d[0]:+.4f} ± {d[1]:.4f} ({'not significant' if abs(d[0]) <= d[1] else 'significant'})"  # noqa: E731
    for num_steps, seeds in seeds_of.items():
        for kernel in KERNELS:
            low = per_seed(cache, world, kernel, min(ETAS), num_steps, seeds)
            for eta in (0.5, max(ETAS)):
                high = per_seed(cache, world, kernel, eta, num_steps, seeds)
                cells = [delta(runs.interval([a[m] - b[m] for a, b in zip(high, low)
                                              if math.isfinite(a[m]) and math.isfinite(b[m])]))
                         for m in ("off_manifold", "on_manifold_reward", "reliability", "reward")]
                lines.append(f"| {num_steps} | {kernel} | {eta:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def picture(summary, path):
    """Rows: 8 steps against η, 8 steps against injected std, the same for 20; columns: the three measures."""
    plt = runs.pyplot()
    steps = sorted({k[2] for k in summary})
    figure, axes = plt.subplots(2 * len(steps), 3, figsize=(15, 4.2 * len(steps) * 2 / 2 * 1.6))
    for row, (num_steps, x_name) in enumerate((n, x) for n in steps for x in ("η", "std_rms")):
        for column, (measure, title) in enumerate(MEASURES):
            axis = axes[row, column]
            for kernel in KERNELS:
                points = sorted((eta if x_name == "η" else s["std_rms"], *s[measure])
                                for (k, eta, n), s in summary.items() if k == kernel and n == num_steps)
                if points:
                    xs, ys, hs = zip(*points)
                    axis.errorbar(xs, ys, yerr=hs, marker="o", markersize=3, capsize=2, label=kernel)
            ode = summary.get(("ode", 0.0, num_steps))
            if ode is not None:
                axis.axhline(ode[measure][0], color="black", linestyle=":", linewidth=1, label="ODE (η = 0)")
            axis.set_xlabel("η" if x_name == "η" else "injected std: √(mean over steps of std²)")
            axis.set_title(f"{title}, {num_steps} steps", fontsize=9)
            axis.legend(fontsize=7)
    runs.save(figure, path)


# ----------------------------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=None, help=f"run seeds 0 … n−1 per setting (default {SEEDS})")
    parser.add_argument("--steps", type=int, nargs="+", default=list(STEPS), help="sampling steps to measure")
    args = parser.parse_args(argv)
    import torch
    torch.set_num_threads(1)
    world = World()
    cache = Cache(world.key)
    seeds_of = {n: range(args.seeds or SEEDS.get(n, max(SEEDS.values()))) for n in args.steps}
    matched = []
    for num_steps in args.steps:
        seeds = seeds_of[num_steps]
        per_seed(cache, world, "ode", 0.0, num_steps, seeds)
        for kernel in KERNELS:
            for eta in ETAS:
                per_seed(cache, world, kernel, eta, num_steps, seeds)
        by_distance, rise = distance_identifies_eta(cache, world, num_steps, seeds)
        for sage_eta in SAGE_REFERENCE_ETAS:
            for kernel in KERNELS:
                if kernel == "sage":
                    result = {"eta": sage_eta, "target": None, "history": []}
                elif by_distance:
                    result = match(cache, world, kernel, num_steps, sage_eta, seeds)
                    why = "no η reaches the distance"
                else:
                    why = (f"the distance does not identify η at {num_steps} steps: SAGE's rises by {rise[0]:+.3f} ± "
                           f"{rise[1]:.3f} from η {min(ETAS):g} to {max(ETAS):g}")
                    result = {"eta": None, "target": None, "history": [], "note": why}
                if result["eta"] is None:   # match the total injected std instead
                    fallback = match_injected_std(cache, world, kernel, num_steps, sage_eta, seeds)
                    if fallback["eta"] is None:
                        result["note"] = f"{result['note']}; {fallback['note']}"
                    else:
                        result.update(eta=fallback["eta"], criterion=f"total injected std ({why})", history=[fallback])
                entry = {"steps": num_steps, "sage_eta": sage_eta, "kernel": kernel, "seeds": len(seeds), "result": result}
                if kernel != "sage" and result["eta"] is not None:   # the other measures, paired with SAGE's
                    own = per_seed(cache, world, kernel, result["eta"], num_steps, seeds)
                    sage = per_seed(cache, world, "sage", sage_eta, num_steps, seeds)
                    entry["paired"] = {m: runs.interval([a[m] - b[m] for a, b in zip(own, sage)
                                                         if math.isfinite(a[m]) and math.isfinite(b[m])])
                                       for m in ("on_manifold_reward", "reliability", "reward")}
                matched.append(entry)
    if MATCHED.exists():   # keep the other step counts' matches (a run with --steps 20 leaves 8's alone)
        saved = json.loads(MATCHED.read_text())
        if saved.get("world") == world.key:
            matched = [m for m in saved["matched"] if m["steps"] not in args.steps] + matched
    matched.sort(key=lambda m: (m["steps"], m["sage_eta"], KERNELS.index(m["kernel"])))
    MATCHED.write_text(json.dumps({"world": world.key, "group_size": GROUP_SIZE,
                                   "method": __doc__.split("Matched noise. ")[1].split("\n\n")[0],
                                   "matched": matched}, indent=1))
    summary = summarise(cache, world, seeds_of, args.steps)
    text = table(summary, seeds_of, [m for m in matched if m["kernel"] != "sage" and m["steps"] in args.steps])
    text += same_eta_table(cache, world, seeds_of)
    text += noise_table(cache, world, seeds_of)
    TABLE.write_text(text)
    picture(summary, PICTURE)
    print(text)
    print(f"table: {TABLE}; picture: {PICTURE}; matched η: {MATCHED}; cache: {CACHE}")


if __name__ == "__main__":
    main()
