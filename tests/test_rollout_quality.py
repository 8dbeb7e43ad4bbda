"""The rollout-quality measurements (world/rollout_quality.py) and the matched grids' statistics (world/runs.py),
against closed forms: no model, no sampling (fast tier)."""
import math
import statistics

import pytest
import torch

import sde
from world import rollout_quality as rq
from world import runs


def spearman_closed_form(a, b):
    """ρ = 1 − 6·Σd²/(n(n²−1)) for values without ties, d the rank differences (ranks from sorting)."""
    rank = lambda v: {x: i + 1 for i, x in enumerate(sorted(v))}  # noqa: E731
    ra, rb = rank(a), rank(b)
    n = len(a)
    return 1 - 6 * sum((ra[x] - rb[y]) ** 2 for x, y in zip(a, b)) / (n * (n * n - 1))


@pytest.mark.parametrize("seed", range(20))
def test_spearman_equals_the_closed_form_without_ties(seed):
    generator = torch.Generator().manual_seed(seed)
    a, b = torch.randn(8, generator=generator).tolist(), torch.randn(8, generator=generator).tolist()
    assert rq.spearman(a, b) == pytest.approx(spearman_closed_form(a, b), abs=1e-12)


def test_spearman_of_monotone_maps_is_plus_or_minus_one():
    a = [0.3, -1.0, 2.5, 0.0, 7.0]
    assert rq.spearman(a, [math.exp(x) for x in a]) == pytest.approx(1.0)
    assert rq.spearman(a, [-x ** 3 for x in a]) == pytest.approx(-1.0)


def test_tied_values_share_their_mean_rank():
    # 1.0 twice occupies ranks 2 and 3 -> 2.5 each; ρ is then the Pearson correlation of the ranks
    assert rq.ranks([0.0, 1.0, 1.0, 5.0]) == [1.0, 2.5, 2.5, 4.0]
    x, y = [1, 2.5, 2.5, 4], [1, 2, 3, 4]
    mx, my = statistics.fmean(x), statistics.fmean(y)
    pearson = sum((u - mx) * (v - my) for u, v in zip(x, y)) / math.sqrt(
        sum((u - mx) ** 2 for u in x) * sum((v - my) ** 2 for v in y))
    assert rq.spearman([0.0, 1.0, 1.0, 5.0], [10, 20, 30, 40]) == pytest.approx(pearson)


def test_constant_group_has_no_ranking_and_is_left_out():
    assert math.isnan(rq.spearman([1.0] * 4, [1, 2, 3, 4]))
    # two groups of 4: the first constant (left out), the second perfectly reversed
    rho, groups = rq.group_reliability([1.0] * 4 + [1, 2, 3, 4], [1, 2, 3, 4] + [4, 3, 2, 1], group_size=4)
    assert (rho, groups) == (pytest.approx(-1.0), 1)


def test_group_reliability_rejects_a_batch_that_groups_do_not_divide():
    with pytest.raises(ValueError, match="divisible by group_size"):
        rq.group_reliability([1, 2, 3], [1, 2, 3], group_size=2)


def test_matched_eta_inverts_a_linear_curve_exactly():
    etas = [0.1, 0.3, 0.5, 1.0]
    line = lambda e: 0.2 + 0.4 * e  # noqa: E731
    for target in (0.25, 0.33, 0.5):
        assert rq.matched_eta(etas, [line(e) for e in etas], target) == pytest.approx((target - 0.2) / 0.4)


def test_matched_eta_interpolates_a_monotone_curve_between_its_bracketing_points():
    etas = [1.0, 0.0, 0.5, 0.25, 0.75]        # unsorted on purpose
    values = [e ** 2 for e in etas]
    # target 0.1 lies between η 0.25 (0.0625) and 0.5 (0.25): the chord's η
    assert rq.matched_eta(etas, values, 0.1) == pytest.approx(0.25 + (0.1 - 0.0625) * 0.25 / (0.25 - 0.0625))
    assert rq.matched_eta(etas, values, 0.25) == pytest.approx(0.5)       # a measured point is returned as is
    assert rq.matched_eta(etas, values, 2.0) is None                     # not bracketed: no answer, no guess


def test_injected_std_is_the_rms_and_the_root_sum_of_the_step_stds():
    sigmas = sde.shifted_sigmas(8, 3.0)
    stds = [float(sde.step_std("flow_grpo", sigmas[i], sigmas[i + 1], 0.7)) for i in range(8)]
    rms, total = rq.injected_std("flow_grpo", 0.7, sigmas)
    assert rms == pytest.approx(math.sqrt(sum(s * s for s in stds) / 8))
    assert total == pytest.approx(math.sqrt(sum(s * s for s in stds)))


def test_sage_injects_the_same_total_variance_at_any_number_of_steps():
    # Σ_i V(σ_i, σ_{i+1}) telescopes to η²·[ln(1 − 0) − ln(1 − σ_max) − (1 − 0)] whatever the schedule
    for steps in (8, 20):
        _, total = rq.injected_std("sage", 0.5, sde.shifted_sigmas(steps, 3.0))
        assert total ** 2 == pytest.approx(0.25 * (-math.log(1 - sde.SAGE_SIGMA_MAX) - 1), rel=1e-9)


def test_seeds_needed_is_the_smallest_n_whose_t_power_bound_reaches_the_mean():
    diffs = [0.01, 0.03, -0.01, 0.02, 0.0]   # mean 0.01, sd = √(0.00025): sd/mean = 1.581
    # by hand: n = 21 gives (2.086 + 0.860)/√21 = 0.643 > 1/1.581 = 0.632; n = 22 gives (2.080 + 0.859)/√22 = 0.627
    assert runs.seeds_needed(diffs) == 22
    # many seeds: t -> z, the normal formula ((1.96 + 0.8416)·sd/mean)² within a seed or two
    wide = [0.01 + 0.1 * (-1) ** i for i in range(10)]
    normal = ((1.960 + 0.8416) * statistics.stdev(wide) / statistics.fmean(wide)) ** 2
    assert abs(runs.seeds_needed(wide) - normal) < 0.02 * normal + 2
    assert runs.seeds_needed([0.1, -0.1]) == math.inf


def test_a_method_at_the_official_eta_and_8_steps_is_the_same_run_as_before():
    method = runs.at_eta(dict(runs.CALIBRATED, kernel="sage"), runs.ETA)
    assert runs.name(method) == runs.name(runs.KERNELS[0])
    other = runs.at_eta(dict(runs.CALIBRATED, kernel="cps"), 0.73, num_steps=20)
    assert runs.name(other).endswith(", η 0.73, 20 steps")
    assert runs.flags(other, 0, 150, 1)[-8:-4] == ["--eta", "0.73", "--num_steps", "20"]
    assert runs.run_dir(runs.OUT, method, 0) != runs.run_dir(runs.OUT, other, 0)


def test_paired_table_says_not_significant_plainly_and_how_many_seeds_would_resolve_it():
    def run(value):
        return {"after": {k: value for k in runs.KEYS}}
    results = {"ref": [run(1.0), run(1.0), run(1.0)], "noisy": [run(1.01), run(0.98), run(1.02)],
               "clear": [run(1.5), run(1.51), run(1.49)]}
    seeds_of = {name: [0, 1, 2] for name in results}
    text = runs.paired_table(results, "ref", seeds_of, plan=True)
    noisy, clear = (next(line for line in text.splitlines() if line.startswith(f"| {m} ")) for m in ("noisy", "clear"))
    needed = runs.seeds_needed([0.01, -0.02, 0.02])
    assert f"(not significant, ~{needed} seeds to resolve)" in noisy
    assert "(significant)" in clear and "seeds to resolve" not in clear


def test_grid_jobs_run_block_after_block_seed_major_within_each_and_a_shared_method_once():
    a, b, c = (dict(runs.CALIBRATED, kernel=k) for k in ("sage", "cps", "flow_grpo"))
    order = [(runs.name(m).split(",")[0], s) for m, s in runs.job_order([[a, b], [a, c]], (0, 1, 2))]
    assert order == [("sage", 0), ("cps", 0), ("sage", 1), ("cps", 1), ("sage", 2), ("cps", 2),
                     ("flow_grpo", 0), ("flow_grpo", 1), ("flow_grpo", 2)]


def test_kernel_and_eta_are_read_back_from_a_methods_name():
    for kernel, eta, steps in (("cps", 0.384, 8), ("flow_grpo", 0.499, 20), ("sage", runs.ETA, 8)):
        method = runs.at_eta(dict(runs.CALIBRATED, kernel=kernel), eta, steps)
        assert runs.kernel_of(runs.name(method)) == (kernel, eta)


def test_kernel_frontier_points_are_the_per_seed_gain_and_the_distance_after_with_their_intervals():
    def run(before, after, distance):
        keys = dict.fromkeys(runs.KEYS, 0.0)
        return {"before": dict(keys, on_manifold_reward=before),
                "after": dict(keys, on_manifold_reward=after, off_manifold=distance)}
    cps = runs.name(runs.at_eta(dict(runs.CALIBRATED, kernel="cps"), 0.384))
    seeds = [run(1.5, 1.9, 0.15), run(1.6, 1.9, 0.16), run(1.4, 1.9, 0.14)]
    (eta, gain, distance, n), = runs.kernel_points({cps: seeds})["cps"]
    gains = [0.4, 0.3, 0.5]   # after − before per seed; t_0.975,2 = 4.303
    assert (eta, n) == (0.384, 3)
    assert gain[0] == pytest.approx(0.4) and gain[1] == pytest.approx(4.303 * statistics.stdev(gains) / math.sqrt(3))
    assert distance[0] == pytest.approx(0.15) and distance[1] == pytest.approx(4.303 * 0.01 / math.sqrt(3))


class FakeCache:
    """rq.per_seed's cache with SAGE's off-manifold distance given per η and seed (nothing is measured)."""

    def __init__(self, distances):
        self.distances = distances

    def get(self, world, kernel, eta, num_steps, seed):
        return {"off_manifold": self.distances[eta][seed]}


def test_the_distance_matches_noise_only_where_sages_own_distance_rises_significantly_with_eta():
    low, high = min(rq.ETAS), max(rq.ETAS)
    rising = FakeCache({low: [0.24, 0.25, 0.23, 0.26, 0.24], high: [0.34, 0.36, 0.33, 0.35, 0.35]})
    flat = FakeCache({low: [0.21, 0.23, 0.20, 0.22, 0.21], high: [0.20, 0.24, 0.19, 0.22, 0.21]})
    falling = FakeCache({low: [0.24, 0.25, 0.23, 0.26, 0.24], high: [0.14, 0.16, 0.13, 0.15, 0.15]})
    for cache, expected in ((rising, True), (flat, False), (falling, False)):
        yes, (mean, half) = rq.distance_identifies_eta(cache, None, 20, range(5))
        differences = [h - lo for h, lo in zip(cache.distances[high], cache.distances[low])]
        assert mean == pytest.approx(statistics.fmean(differences))
        assert half == pytest.approx(2.776 * statistics.stdev(differences) / math.sqrt(5))   # t_0.975,4
        assert yes is expected


def test_the_noise_table_pairs_each_eta_with_the_lowest_eta_of_the_same_kernel_and_seed():
    measures = ("off_manifold", "on_manifold_reward", "reliability", "reward")

    class Cache:
        def get(self, world, kernel, eta, num_steps, seed):   # a value that differs per kernel, η and seed
            base = {"sage": 0.0, "cps": 10.0, "flow_grpo": 20.0, "dance_grpo": 30.0}[kernel] + seed * seed
            return {m: base + eta * (i + 1) * (1 + 0.1 * seed) for i, m in enumerate(measures)}
    text = rq.noise_table(Cache(), None, {8: range(3)})
    row = next(line for line in text.splitlines() if line.startswith("| 8 | cps | 1 |"))
    for i, cell in enumerate(row.split(" | ")[3:]):
        differences = [(1.0 - min(rq.ETAS)) * (i + 1) * (1 + 0.1 * seed) for seed in range(3)]  # the seed's base cancels
        assert cell.startswith(f"{statistics.fmean(differences):+.4f} ± "
                               f"{4.303 * statistics.stdev(differences) / math.sqrt(3):.4f}")   # t_0.975,2
