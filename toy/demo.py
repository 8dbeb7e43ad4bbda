"""The toy demo: SAGE-GRPO's claims on a 2-D manifold, on a CPU, in under a minute.

    python toy/demo.py              # Gaussian check, experiment 1, headline of experiment 2, pictures
    python toy/demo.py --ablation   # + the full grid of experiment 2 -> toy/out/ablation.md (minutes)
    python toy/demo.py --fast       # a few seconds: the setting tests/test_toy.py runs

Experiments:
  0. Gaussian data, exact: the excess variance each kernel injects on a thin manifold.
  1. Rollouts of the pretrained model per kernel at the same η and 10/20/40 steps: off-manifold
     distance next to the per-step injected noise (the paper's Fig. 1).
  2. GRPO with a hackable reward: FlowGRPO-style (flow_grpo kernel, no equalizer, fixed KL) versus
     SAGE-GRPO (sage kernel, equalizer, dual moving KL), with SAGE-GRPO without any KL as the
     reference for reward hacking; reward, reward projected onto the circle (the part earned by
     moving along it) and off-manifold distance, mean ± (population) std over seeds.
The demo states, from the numbers it just computed, which claims of the paper reproduce here.
"""
import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # `python toy/demo.py` from anywhere

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

import equalizer
import sde
import trust_region
from toy import gaussian_check
from toy.manifold import RADIUS, distance_to_manifold, random_labels
from toy.pretrain import load_or_pretrain
from toy.rollout import rollout
from toy.target_reward import targets
from toy.trainer import Config, evaluate, train

KERNELS = sde.KERNELS                  # ode, flow_grpo, dance_grpo, cps, sage
GRPO_KERNELS = sde.STOCHASTIC_KERNELS  # the ODE has no log-prob to train
KL_MODES = trust_region.KL_MODES       # none, fixed, step, moving, dual
HEADLINE = {"FlowGRPO-style": dict(kernel="flow_grpo", equalizer=False, kl_mode="fixed"),
            "SAGE-GRPO": dict(kernel="sage", equalizer=True, kl_mode="dual"),
            # reference: what the hackable reward does with no trust region at all
            "SAGE-GRPO, no KL": dict(kernel="sage", equalizer=True, kl_mode="none")}


@dataclass
class Settings:
    rollout_samples: int = 2048
    """experiment 1: samples per kernel and step count"""
    step_counts: tuple = (10, 20, 40)
    """experiment 1: sampling steps compared"""
    eta: float = 0.5
    """η of every kernel (official SAGE-GRPO default)"""
    iterations: int = Config.iterations
    """experiment 2: rollout batches per run"""
    num_seeds: int = 3
    """experiment 2: replicas per configuration (mean ± std)"""
    eval_samples: int = Config.eval_samples
    """ODE samples per prompt and replica in the evaluation"""
    eval_every: int = Config.eval_every
    """iterations between evaluations (training curves)"""


FAST = Settings(rollout_samples=256, iterations=12, num_seeds=2, eval_samples=64, eval_every=4)


def mean_std(values):
    values = torch.as_tensor(values, dtype=torch.float64)
    return f"{values.mean():.3f} ± {values.std(unbiased=False):.3f}"


def draw_circle(ax):
    theta = torch.linspace(0, 2 * torch.pi, 200)
    ax.plot(RADIUS * torch.cos(theta), RADIUS * torch.sin(theta), color="0.6", lw=0.8, zorder=0)
    ax.set_aspect("equal"), ax.set_xlim(-1.9, 1.9), ax.set_ylim(-1.9, 1.9), ax.set_xticks([]), ax.set_yticks([])


LEGEND_ROOM = (0, 0.07, 1, 1)  # tight_layout's rect for a figure with scatter's legend below it


def scatter(ax, x, labels, title, legend=False):
    """Samples coloured by their prompt (blue: prompt 0, red: prompt 1) around the data manifold (grey circle), and
    each prompt's reward target (hollow star of its colour). legend: explain them below the figure (the caller
    leaves room: tight_layout(rect=LEGEND_ROOM))."""
    draw_circle(ax)
    ax.scatter(x[:, 0], x[:, 1], c=labels, cmap="coolwarm", s=2, alpha=0.5, vmin=0, vmax=1)
    t = targets(torch.arange(2))
    # hollow stars: a policy that hacks the reward piles its samples right on them
    ax.scatter(t[:, 0], t[:, 1], marker="*", s=160, facecolors="none", edgecolors=["tab:blue", "tab:red"], zorder=3)
    ax.set_title(title, fontsize=9)
    if legend:
        from matplotlib.lines import Line2D
        handles = [Line2D([], [], color="0.6", lw=0.8, label="data manifold (circle)"),
                   Line2D([], [], ls="", marker="o", color=plt.get_cmap("coolwarm")(0.0), label="sample, prompt 0"),
                   Line2D([], [], ls="", marker="o", color=plt.get_cmap("coolwarm")(1.0), label="sample, prompt 1"),
                   Line2D([], [], ls="", marker="*", markersize=10, markerfacecolor="none", color="0.3",
                          label="reward target of the prompt (off the manifold: a hacking policy piles its samples here)")]
        ax.figure.legend(handles=handles, fontsize=7, loc="lower center", ncol=4, frameon=False)


# ----------------------------------------------------------------------------------------------

def experiment_1(model, settings, out):
    """Off-manifold distance of SDE rollouts per kernel and step count; per-step std per kernel."""
    labels = random_labels(settings.rollout_samples, 1)
    distance, samples = {}, {}
    for kernel in KERNELS:
        for n in settings.step_counts:
            generator = torch.Generator().manual_seed(0)   # the same noise for every kernel
            trajectory = rollout(model, labels, sde.shifted_sigmas(n, Config.shift), kernel, settings.eta, generator)
            distance[kernel, n] = distance_to_manifold(trajectory.states[-1]).mean().item()
            samples[kernel, n] = trajectory.states[-1]
    n_mid = settings.step_counts[len(settings.step_counts) // 2]
    sigmas = sde.shifted_sigmas(n_mid, Config.shift)
    stds = {k: sde.step_std(k, sigmas[:-1], sigmas[1:], settings.eta) for k in KERNELS}

    lines = [f"Experiment 1: pretrained model, η = {settings.eta}, shift {Config.shift}, "
             f"{settings.rollout_samples} SDE rollouts per cell: mean distance of the samples to the circle",
             "", "| kernel | " + " | ".join(f"{n} steps" for n in settings.step_counts)
             + f" | injected std, first / last step ({n_mid} steps) |", "|" + "---|" * (len(settings.step_counts) + 2)]
    for k in KERNELS:
        stochastic = stds[k][stds[k] > 0]
        first_last = f"{stochastic[0]:.3f} / {stochastic[-1]:.3f}" if len(stochastic) else "0 / 0"
        lines.append(f"| {k} | " + " | ".join(f"{distance[k, n]:.4f}" for n in settings.step_counts) + f" | {first_last} |")

    # pictures: rollouts per kernel (a row of scatter plots), and the paper's Fig. 1 analogue
    fig, axes = plt.subplots(1, len(KERNELS), figsize=(3 * len(KERNELS), 4.1))
    for ax, k in zip(axes, KERNELS):
        scatter(ax, samples[k, n_mid], labels, f"{k}: {n_mid} steps\noff-manifold {distance[k, n_mid]:.4f}",
                legend=ax is axes[0])
    fig.tight_layout(rect=LEGEND_ROOM), fig.savefig(out / "rollouts_per_kernel.png", dpi=110), plt.close(fig)

    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(15, 3.8))
    for k in GRPO_KERNELS:
        left.plot(range(n_mid), stds[k], marker="o", ms=3, label=k)
        scales = equalizer.gradient_scales(k, sigmas, settings.eta)
        middle.plot(range(n_mid), torch.where(scales > 0, scales, torch.nan), marker="o", ms=3, label=k)
        right.plot(settings.step_counts, [distance[k, n] for n in settings.step_counts], marker="o", label=k)
    right.plot(settings.step_counts, [distance["ode", n] for n in settings.step_counts], "k--", label="ode")
    left.set(yscale="log", xlabel=f"step t ({n_mid} steps, σ: 1 → 0)", ylabel="std of the step",
             title=f"injected noise per step, η = {settings.eta}")
    right.set(yscale="log", xlabel="sampling steps", ylabel="mean distance to the circle",
              title="off-manifold distance of rollouts")
    middle.set(yscale="log", xlabel=f"step t ({n_mid} steps, σ: 1 → 0)", ylabel="N_t = |∂μ/∂v| / std",
               title="gradient scale per step (the equalizer divides it out)")
    left.legend(fontsize=8), middle.legend(fontsize=8), right.legend(fontsize=8)
    fig.tight_layout(), fig.savefig(out / "injected_noise.png", dpi=110), plt.close(fig)
    return distance, "\n".join(lines)


def train_config(model, settings, **overrides):
    config = Config(**overrides, iterations=settings.iterations, num_seeds=settings.num_seeds,
                    eval_samples=settings.eval_samples, eval_every=settings.eval_every, eta=settings.eta)
    policy, history = train(config, model)
    metrics, samples = evaluate(policy, config)
    return config, metrics, samples, history


def result_row(name, metrics):
    return (f"| {name} | {mean_std(metrics['reward'])} | {mean_std(metrics['projected_reward'])} | "
            f"{mean_std(metrics['off_manifold'])} |")


TABLE_HEAD = ["| run | reward ↑ | reward projected on the circle ↑ | off-manifold distance ↓ |", "|---|---|---|---|"]


def experiment_2(model, settings, out):
    """The headline: FlowGRPO-style versus SAGE-GRPO, same seeds, same budget."""
    base = Config(num_seeds=1, eval_samples=settings.eval_samples, eta=settings.eta)
    pretrained_metrics, pretrained_samples = evaluate(model.replicate(1), base)
    results = {name: train_config(model, settings, **overrides) for name, overrides in HEADLINE.items()}

    lines = [f"Experiment 2: GRPO, {settings.iterations} iterations × {Config.num_groups * Config.group_size} "
             f"rollouts, {settings.num_seeds} seeds, evaluated with the ODE sampler (mean ± std over seeds)",
             f"reward = −distance to a target off the circle: best on the circle −0.600, hacking reaches 0",
             "", *TABLE_HEAD, result_row("pretrained", pretrained_metrics)]
    lines += [result_row(f"{name} ({c.kernel}, equalizer {'on' if c.equalizer else 'off'}, KL {c.kl_mode})", m)
              for name, (c, m, _, _) in results.items()]

    # samples before / after (seed 0), and training curves (mean ± std band over seeds)
    fig, axes = plt.subplots(1, 1 + len(results), figsize=(3.2 * (1 + len(results)), 4.2))
    x, labels = pretrained_samples
    scatter(axes[0], x[0], labels[0], f"pretrained\nreward {pretrained_metrics['reward'][0]:.3f}, "
                                      f"off {pretrained_metrics['off_manifold'][0]:.3f}", legend=True)
    for ax, (name, (_, m, (x, labels), _)) in zip(axes[1:], results.items()):
        scatter(ax, x[0], labels[0], f"{name} (seed 0)\nreward {m['reward'][0]:.3f}, off {m['off_manifold'][0]:.3f}")
    fig.tight_layout(rect=LEGEND_ROOM), fig.savefig(out / "samples_before_after.png", dpi=110), plt.close(fig)

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
    for name, (_, _, _, history) in results.items():
        steps = history["eval_iteration"]
        for ax, key in zip(axes, ("eval_reward", "eval_projected_reward", "eval_off_manifold")):
            mean, std = history[key].mean(1), history[key].std(1, unbiased=False)
            ax.plot(steps, mean, label=name), ax.fill_between(steps, mean - std, mean + std, alpha=0.25)
    for ax, title in zip(axes, ("reward (ODE samples)", "reward projected on the circle", "off-manifold distance")):
        ax.set(xlabel="iteration", title=title), ax.legend(fontsize=8)
    axes[1].axhline(-0.6, color="0.5", ls=":", lw=1)
    fig.tight_layout(), fig.savefig(out / "training_curves.png", dpi=110), plt.close(fig)
    return pretrained_metrics, results, "\n".join(lines)


def ablation(model, settings, out):
    """Experiment 2, full grid: kernels × equalizer on/off × KL mode, `num_seeds` seeds each."""
    lines = [f"# Toy ablation: {settings.iterations} iterations, {settings.num_seeds} seeds, η = {settings.eta}, "
             f"evaluated with the ODE sampler (mean ± std over seeds)", "",
             "| kernel | equalizer | KL | reward ↑ | reward projected on the circle ↑ | off-manifold distance ↓ |",
             "|---|---|---|---|---|---|"]
    grid, start = {}, time.time()
    for kernel in GRPO_KERNELS:
        for use_equalizer in (True, False):
            for kl_mode in KL_MODES:
                _, m, _, _ = train_config(model, settings, kernel=kernel, equalizer=use_equalizer, kl_mode=kl_mode)
                grid[kernel, use_equalizer, kl_mode] = m
                lines.append(f"| {kernel} | {'on' if use_equalizer else 'off'} | {kl_mode} | {mean_std(m['reward'])} "
                             f"| {mean_std(m['projected_reward'])} | {mean_std(m['off_manifold'])} |")
                print(lines[-1], f"({time.time() - start:.0f} s)", flush=True)
    lines += ["", ablation_verdicts(grid)]
    (out / "ablation.md").write_text("\n".join(lines) + "\n")
    return "\n".join(lines)


def ablation_verdicts(grid):
    """What the grid says about the equalizer, the KL modes and the kernels, counted cell by cell."""
    mean = lambda m, key: m[key].mean().item()
    spread = lambda m: m["reward"].std(unbiased=False).item()
    pairs = [(grid[k, True, kl], grid[k, False, kl]) for k in GRPO_KERNELS for kl in KL_MODES]
    # a difference counts when it exceeds TIE (the projected reward saturates at −0.600 in most cells)
    TIE = 0.005
    better = lambda a, b: sum(x < y - TIE for x, y in zip(a, b))
    on_off = lambda key: ([mean(on, key) for on, _ in pairs], [mean(off, key) for _, off in pairs])
    off_on, off_off = on_off("off_manifold")
    proj_on, proj_off = on_off("projected_reward")
    lines = ["Claims of the paper, counted over the grid (a cell = kernel × KL mode; differences under "
             f"{TIE} count as ties):",
             f"- Equalizer on vs off: nearer the circle in {better(off_on, off_off)}/{len(pairs)} cells (farther in "
             f"{better(off_off, off_on)}); smaller spread of the reward over seeds in "
             f"{sum(spread(on) < spread(off) - TIE for on, off in pairs)}/{len(pairs)} (larger in "
             f"{sum(spread(off) < spread(on) - TIE for on, off in pairs)}); more on-circle reward in "
             f"{better(proj_off, proj_on)}/{len(pairs)} (less in {better(proj_on, proj_off)})."]
    lines.append("- Equalizer on / off with an anchor that moves (where it matters most), off-manifold distance: "
                 + ", ".join(f"{k} {kl} {mean(grid[k, True, kl], 'off_manifold'):.3f} / {mean(grid[k, False, kl], 'off_manifold'):.3f}"
                             for k in GRPO_KERNELS for kl in ("moving", "dual")) + ".")
    for use_equalizer in (True, False):
        cells = [(k, {kl: grid[k, use_equalizer, kl] for kl in KL_MODES}) for k in GRPO_KERNELS]
        beats_fixed = sum(mean(c["dual"], "projected_reward") > mean(c["fixed"], "projected_reward") for _, c in cells)
        nearer_than_none = sum(mean(c["dual"], "off_manifold") < mean(c["none"], "off_manifold") for _, c in cells)
        nearer_than_moving = sum(mean(c["dual"], "off_manifold") < mean(c["moving"], "off_manifold") for _, c in cells)
        lines.append(f"- Dual KL (equalizer {'on' if use_equalizer else 'off'}): more on-circle reward than fixed KL for "
                     f"{beats_fixed}/{len(cells)} kernels; nearer the circle than no KL for {nearer_than_none}/{len(cells)}, "
                     f"than the moving anchor alone for {nearer_than_moving}/{len(cells)}.")
    dual = {k: grid[k, True, "dual"] for k in GRPO_KERNELS}
    lines.append("- Kernels with equalizer + dual KL, off-manifold distance: "
                 + ", ".join(f"{k} {mean(m, 'off_manifold'):.3f}" for k, m in sorted(dual.items(), key=lambda i: mean(i[1], 'off_manifold')))
                 + "; reward: " + ", ".join(f"{k} {mean(m, 'reward'):.3f}" for k, m in dual.items()) + ".")
    return "\n".join(lines)


def verdicts(distance, pretrained, results, settings):
    """Which claims of the paper the numbers above reproduce, stated from those numbers."""
    lines = ["Claims of the paper, checked on the numbers above:"]
    nearer = [n for n in settings.step_counts if distance["sage", n] < distance["flow_grpo", n]]
    lines.append(f"- SAGE's rollouts lie nearer the manifold than FlowGRPO's at the same η: "
                 f"{'REPRODUCES' if len(nearer) == len(settings.step_counts) else 'PARTLY' if nearer else 'DOES NOT REPRODUCE'}"
                 f" (at {nearer} of {list(settings.step_counts)} steps).")
    best = min(GRPO_KERNELS, key=lambda k: distance[k, settings.step_counts[1]])
    if best != "sage":
        lines.append(f"- But SAGE is not the nearest: {best} is ({distance[best, settings.step_counts[1]]:.4f} vs "
                     f"{distance['sage', settings.step_counts[1]]:.4f} at {settings.step_counts[1]} steps). "
                     + ("CPS keeps the coefficients of x_0 and ε exact, so on an accurate model its rollouts sit "
                        "where the ODE's do." if best == "cps" else ""))
    n_mid = settings.step_counts[len(settings.step_counts) // 2]
    sigmas = sde.shifted_sigmas(n_mid, Config.shift)
    sage_std, flow_std = (sde.step_std(k, sigmas[:-1], sigmas[1:], settings.eta) for k in ("sage", "flow_grpo"))
    more = torch.nonzero(sage_std >= flow_std).flatten().tolist()
    lines.append(f"- SAGE injects less noise than FlowGRPO at {n_mid - len(more)}/{n_mid} steps"
                 + (f"; not at step(s) {more}: at σ = 1 SAGE integrates up to its clamp 1 − 3e-3 while FlowGRPO "
                    "substitutes σ_1 (the Gaussian table's first-step column shows the excess)." if more else "."))
    flow, sage, free = (results[name][1] for name in ("FlowGRPO-style", "SAGE-GRPO", "SAGE-GRPO, no KL"))
    gain = lambda m: (m["projected_reward"].mean() - pretrained["projected_reward"].mean()).item()
    off = lambda m: m["off_manifold"].mean().item()
    reproduces = gain(sage) > gain(flow) and off(sage) < off(free) / 2
    lines.append(f"- Dual moving KL keeps the reward rising while limiting drift: SAGE-GRPO gains {gain(sage):+.3f} "
                 f"of on-circle reward at off-manifold {off(sage):.3f}, against {off(free):.3f} with no KL (the reward "
                 f"hacked); FlowGRPO-style (fixed KL, same β) gains {gain(flow):+.3f} at {off(flow):.3f}: "
                 + ("REPRODUCES." if reproduces else "DOES NOT REPRODUCE.")
                 + (f" Note the fixed KL drifts least ({off(flow):.3f} vs {off(sage):.3f}): it buys that by hardly "
                    "training." if off(flow) < off(sage) else ""))
    if sage["reward"].mean() > sage["projected_reward"].mean():
        lines.append(f"- Part of SAGE-GRPO's reward is hacked all the same: {sage['reward'].mean() - sage['projected_reward'].mean():+.3f} "
                     "comes from leaving the circle (reward minus projected reward); the moving anchor lets the drift "
                     "accumulate slowly once the on-circle optimum is reached (training_curves.png).")
    flow_history = results["FlowGRPO-style"][3]
    flow_peak = flow_history["eval_projected_reward"].mean(1).max().item()
    if flow_peak - flow["projected_reward"].mean() > 0.05:
        lines.append(f"- The FlowGRPO-style run is held by its fixed anchor: it peaked at {flow_peak:.3f} of on-circle "
                     "reward, then the fixed KL pulled it back towards the pretrained model once β switched to its "
                     "larger value half-way (training_curves.png).")
    lines.append("- Which of kernel, equalizer and KL mode does the work is for --ablation to say (toy/out/ablation.md).")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="tiny budgets (seconds), for the tests")
    parser.add_argument("--ablation", action="store_true", help="also run the full grid -> ablation.md")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out", help="output folder")
    args = parser.parse_args(argv)
    # The toy's tensors are tiny: with 2 threads on 2 shared cores, thread synchronisation made the
    # matmuls ~15× slower than with 1 (measured); one thread is the fast setting here.
    torch.set_num_threads(1)
    settings = FAST if args.fast else Settings()
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.time()

    model = load_or_pretrain()
    print(gaussian_check.table(s=0.01, eta=settings.eta, step_counts=settings.step_counts, shift=Config.shift), "\n")
    distance, table_1 = experiment_1(model, settings, args.out)
    print(table_1, "\n")
    pretrained, results, table_2 = experiment_2(model, settings, args.out)
    print(table_2, "\n")
    print(verdicts(distance, pretrained, results, settings), "\n")
    if args.ablation:
        print(ablation(model, settings, args.out), "\n")
    print("pictures:", *sorted(str(p) for p in args.out.glob("*.png")), sep="\n  ")
    if args.ablation:
        print("ablation table:", args.out / "ablation.md")
    print(f"wall time {time.time() - start:.1f} s")
    return pretrained, results


if __name__ == "__main__":
    main()
