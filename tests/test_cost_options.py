"""The cost options of train.py (docs/cost_options.md): the SDE window, CFG-free training, and the transformer
forwards a run counts, against the planner's prediction.

The SDE window (`--sde_window K`): the stochastic kernel only on K consecutive steps, the ODE step elsewhere; only
the window's steps carry log-probs, are recomputed in the update and enter the loss, and the equalizer's median is
taken over them. Closed forms here: the window's placement per iteration, the weights' median over the window (an
independent sort of the window's N_t), and in a tiny run the steps that the rollout made stochastic and that the
update recomputed. The forward counts of a run (meters.ForwardCount, hooks on the transformers) are compared with
plan.forward_equivalents, which derives them from the flags alone.
"""
import json
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import meters
import config
import equalizer
import model
import plan
import sde
import train

from test_train import tiny_args, tiny_models  # noqa: F401  (the module fixture)


# ------------------------------------------------------------------------------------------------
# Where the window lies.

def window_config(**overrides):
    return config.Config(**{"num_steps": 8, "sde_window": 3, **overrides})


def test_a_fixed_window_stays_at_its_start_and_no_window_is_every_step():
    cfg = window_config(sde_window_placement="static", sde_window_start=2)
    assert {train.sde_window(cfg, i) for i in range(50)} == {(2, 5)}
    assert train.sde_window(window_config(sde_window=0), 7) is None
    assert train.sde_window(window_config(sde_window=8), 7) is None  # K = N: every step, the official rollout


def test_a_moving_window_starts_at_the_highest_noise_moves_one_step_per_period_and_stays_at_the_end():
    cfg = window_config(sde_window_placement="moving", sde_window_shift_every=4)
    starts = [train.sde_window(cfg, i)[0] for i in range(40)]
    # closed form: start = min(⌊i / 4⌋, N − K) = min(⌊i / 4⌋, 5)
    assert starts == [min(i // 4, 5) for i in range(40)]
    assert all(train.sde_window(cfg, i)[1] - train.sde_window(cfg, i)[0] == 3 for i in range(40))


def test_a_random_window_depends_on_the_seed_and_iteration_only_and_reaches_every_start():
    cfg = window_config(sde_window_placement="random")
    starts = [train.sde_window(cfg, i)[0] for i in range(400)]
    assert starts == [train.sde_window(window_config(sde_window_placement="random"), i)[0] for i in range(400)]
    assert set(starts) == set(range(6))                            # every start 0 … N − K
    # uniform over the 6 starts: each count within 4.5 binomial standard deviations of 400/6
    sd = math.sqrt(400 * (1 / 6) * (5 / 6))
    assert all(abs(starts.count(s) - 400 / 6) < 4.5 * sd for s in range(6))
    assert starts != [train.sde_window(window_config(sde_window_placement="random", seed=7), i)[0] for i in range(400)]


def test_trained_steps_in_a_window_are_a_per_sample_order_of_the_window_and_none_is_every_step():
    steps = train.trained_steps([1, 2, 3], 20, 1.0, window=(5, 9))
    assert all(sorted(row.tolist()) == [5, 6, 7, 8] for row in steps)
    assert train.trained_steps([1, 2, 3], 20, 0.5, window=(5, 9)).shape == (3, 2)
    assert torch.equal(train.trained_steps([4, 5], 20, 0.5), train.trained_steps([4, 5], 20, 0.5, window=(0, 20)))


# ------------------------------------------------------------------------------------------------
# The equalizer inside a window.

@given(kernel=st.sampled_from(sde.STOCHASTIC_KERNELS), num_steps=st.integers(2, 30), data=st.data())
def test_window_weights_are_the_median_over_the_window_over_n_and_zero_outside(kernel, num_steps, data):
    size = data.draw(st.integers(1, num_steps))
    start = data.draw(st.integers(0, num_steps - size))
    sigmas = sde.shifted_sigmas(num_steps, 5.0)
    scales = equalizer.gradient_scales(kernel, sigmas, 0.5)
    inside = torch.zeros(num_steps, dtype=torch.bool)
    inside[start:start + size] = True
    trained = inside & (scales > 0)
    if not trained.any():                                           # cps: a window of only its deterministic last step
        with pytest.raises(ValueError, match="no stochastic step inside the SDE window"):
            equalizer.step_weights(kernel, sigmas, 0.5, window=(start, start + size))
        return
    weights = equalizer.step_weights(kernel, sigmas, 0.5, window=(start, start + size))
    assert bool((weights[~trained] == 0).all())
    # the median of the window's N_t by a sort: the middle one, or the geometric mean of the middle two
    n = scales[trained].sort().values
    k = len(n)
    median = n[k // 2] if k % 2 else (n[k // 2 - 1] * n[k // 2]).sqrt()
    # S = median/(N + ε): relative deviation from median/N at most ε/min(N), plus float64 round-off of the log-median
    tolerance = 2 * equalizer.EQUALIZER_EPS / n.min().item() + 1e-12
    torch.testing.assert_close(weights[trained], median / scales[trained], rtol=tolerance, atol=0)
    plain = equalizer.step_weights(kernel, sigmas, 0.5, equalize=False, window=(start, start + size))
    assert plain.tolist() == trained.double().tolist()


# ------------------------------------------------------------------------------------------------
# In a run: the rollout's window, the recomputed steps, the counted forwards.

def record_calls(monkeypatch):
    """Record each rollout's sde_window and the σ of every recomputed (policy, with gradients) transition."""
    calls = {"windows": [], "recomputed": []}
    rollout, transition_log_prob = model.rollout, model.transition_log_prob

    def recording_rollout(*args, **kwargs):
        calls["windows"].append(kwargs.get("sde_window"))
        return rollout(*args, **kwargs)

    def recording_log_prob(transformer, embeds, transition, *args, **kwargs):
        if torch.is_grad_enabled():
            calls["recomputed"].extend(transition.sigma.tolist())
        return transition_log_prob(transformer, embeds, transition, *args, **kwargs)
    monkeypatch.setattr(model, "rollout", recording_rollout)
    monkeypatch.setattr(model, "transition_log_prob", recording_log_prob)
    return calls


@pytest.mark.slow
def test_a_moving_window_run_samples_and_trains_only_the_windows_steps(tiny_models, tmp_path, monkeypatch):  # noqa: F811
    calls = record_calls(monkeypatch)
    train.main(config.parse_config(tiny_args(tiny_models, tmp_path, num_steps=4, sde_window=2, max_iterations=3,
                                            sde_window_placement="moving", sde_window_shift_every=1, cfg_scale=6.0,
                                            shift=5.0)))
    assert calls["windows"] == [(0, 2), (1, 3), (2, 4)]
    sigmas = sde.shifted_sigmas(4, 5.0).float()
    videos = 2
    for i, (start, stop) in enumerate(calls["windows"]):
        recomputed = sorted(calls["recomputed"][i * 2 * videos:(i + 1) * 2 * videos], reverse=True)
        # each video trains both of the window's steps, once each: σ_start, σ_start+1 twice
        expected = sorted([sigmas[k].item() for k in range(start, stop)] * videos, reverse=True)
        assert recomputed == pytest.approx(expected, abs=0)
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["sde_window_start"] for r in rows] == [start for start, _ in calls["windows"]]  # logged in every row
    # the on-policy check reads 0 on the window's steps and nothing (0) elsewhere
    assert all(r["ratio_max_dev_per_step"] == [0.0] * 4 for r in rows)
    # and the run counted what the planner predicts: 4 rollout steps, 2 recomputed and 2 anchored, CFG pairs
    predicted = plan.forward_equivalents(plan.Setup(num_steps=4, sde_window=2, cfg_scale=6.0, gradient_checkpointing=False))
    assert all({k: r[k] for k in COUNTS} == {k: predicted[k] for k in COUNTS} for r in rows), (rows[0], predicted)


COUNTS = ("forwards_rollout", "forwards_update", "forwards_anchor", "forward_equivalents")
RUNS = {  # name: (train.py flags, the same setup for the planner)
    # two updates: the recomputes twice, the anchor's forwards once (its means are reused until a refresh)
    "cfg-free, window of 2 of 4, half trained, two updates": (
        {"num_steps": 4, "cfg_scale": 1.0, "sde_window": 2, "train_step_fraction": 0.5, "sde_window_placement": "random",
         "updates_per_rollout": 2},
        {"num_steps": 4, "cfg_scale": 1.0, "sde_window": 2, "train_step_fraction": 0.5, "updates_per_rollout": 2}),
    "no anchor": ({"num_steps": 3, "cfg_scale": 6.0, "kl_mode": "none"}, {"num_steps": 3, "cfg_scale": 6.0, "kl_mode": "none"}),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RUNS))
def test_the_forwards_a_run_counts_are_the_planners_prediction(name, tiny_models, tmp_path):  # noqa: F811
    flags, setup = RUNS[name]
    train.main(config.parse_config(tiny_args(tiny_models, tmp_path, **flags)))  # one iteration
    predicted = plan.forward_equivalents(plan.Setup(gradient_checkpointing=False, **setup))
    for row in (json.loads(line) for line in open(tmp_path / "metrics.jsonl")):
        counted = {k: row[k] for k in COUNTS}
        assert counted == {k: predicted[k] for k in counted}, (name, counted, predicted)


def test_the_official_recipe_costs_240_forward_equivalents_per_video_and_the_options_less():
    """docs/cost_options.md's cost table, by hand: 20 steps, CFG pair, dual KL (anchor), gradient checkpointing."""
    official = plan.forward_equivalents(plan.Setup())
    # rollout 20 x 2 + anchor 20 x 2 + update 20 x 2 x (1 + 2 + 1)
    assert official["forward_equivalents"] == 40 + 40 + 160 == 240
    assert plan.forward_equivalents(plan.Setup(cfg_scale=1.0))["forward_equivalents"] == 120
    assert plan.forward_equivalents(plan.Setup(sde_window=4))["forward_equivalents"] == 40 + 8 + 32


@pytest.mark.slow
@pytest.mark.parametrize("flags, message", [
    (["--num_steps", "4", "--sde_window", "5"], r"--sde_window 5 is more than the 4 steps"),
    (["--num_steps", "4", "--sde_window", "2", "--sde_window_start", "3"], r"expected a start of 0 … 2"),
    (["--num_steps", "4", "--sde_window", "1", "--kernel", "cps", "--sde_window_placement", "random"],
     r"can lie on steps 3 … 3, where --kernel cps is deterministic"),
    (["--sde_window", "2", "--sde_window_placement", "sliding"], r"unknown --sde_window_placement 'sliding'"),
    (["--sde_window", "-1"], r"--sde_window must be >= 0"),
    (["--sde_window", "2", "--sde_window_placement", "moving", "--sde_window_shift_every", "0"],
     r"sde_window_shift_every must be >= 1"),
    (["--ema_decay", "1"], r"--ema_decay must be in \[0, 1\)"),
    (["--eval_every", "5"], r"--eval_every needs --eval_prompts"),
    (["--eval_every", "-1"], r"--eval_every must be >= 0"),
    (["--eval_every", "5", "--eval_prompts", "/nonexistent/held_out.txt"], r"'/nonexistent/held_out.txt' does not exist"),
    (["--world", "--eval_every", "5", "--eval_prompts", "HELD_OUT"], r"--eval_prompts .* holds a prompt the world's "
                                                                       r"reward does not know, 'a cat'"),
])
def test_a_cost_option_that_cannot_work_is_a_flag_error(flags, message, tmp_path):
    (tmp_path / "held_out.txt").write_text("a cat\n")
    flags = [str(tmp_path / "held_out.txt") if f == "HELD_OUT" else f for f in flags]
    world = ["--videos_per_rank", "2"] if "--world" in flags else ["--tiny"]
    with pytest.raises(ValueError, match=message):
        train.main(config.parse_config(world + ["--group_size", "2", "--output_dir", str(tmp_path / "run")] + flags))


@pytest.mark.parametrize("flags, message", [
    (["--beta_schedule", "adaptive", "--kl_mode", "none"], r"--beta_schedule adaptive has no effect with --kl_mode none"),
    (["--kl_target", "0.01"], r"--kl_target 0.01 has no effect without --beta_schedule adaptive"),
    (["--beta_schedule", "two_stage", "--beta_window", "3"], r"--beta_window 3 has no effect without --beta_schedule "
                                                               r"adaptive"),
    (["--beta_switch_step", "7"], r"--beta_switch_step 7 has no effect without --beta_schedule two_stage"),
    (["--sde_window_start", "2"], r"--sde_window_start 2 has no effect without --sde_window K > 0"),
    (["--sde_window", "2", "--sde_window_placement", "random", "--sde_window_start", "1"],
     r"--sde_window_start 1 has no effect without --sde_window_placement static"),
    (["--sde_window", "2", "--sde_window_shift_every", "3"], r"--sde_window_shift_every 3 has no effect without "
                                                             r"--sde_window_placement moving"),
    (["--eval_videos_per_prompt", "3"], r"--eval_videos_per_prompt 3 has no effect without --eval_every N > 0"),
])
def test_a_flag_that_would_have_no_effect_is_a_one_line_flag_error(flags, message):
    """Such a flag used to be accepted and ignored (the log then showed β 0.1 with no KL term, or a window start
    that no window used); it is refused before anything is imported or loaded (config.check_flags)."""
    with pytest.raises(config.ConfigError, match=message):
        config.check_flags(config.parse_config(["--tiny", "--num_steps", "4"] + flags), world_size=1)
    assert config.check_flags(config.parse_config(["--tiny"]), world_size=1)  # the defaults pass
