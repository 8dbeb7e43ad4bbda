"""`train.py --self_check`: the pre-flight table on the tiny models, and the bugs it must catch.

A check that cannot fail is no check: each test below breaks one thing the way a real bug would
(the UPDATE recomputing with another CFG scale or η than the ROLLOUT sampled with, a reward that turns
a failed video into a number, or one that moves the others' scores) and asserts that its line FAILs
and the exit status is 1. The reward line's grading is also checked on its own, against closed forms.
"""
import math
import os
import subprocess
import sys

import pytest
import torch

import config
import model
import reward
import self_check
import train

slow = pytest.mark.slow  # train.py runs (README: Test); the reward line's grading below is fast

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_STEPS = 4
LINES = ("on-policy ratio", "bf16 vs fp32", "batched CFG vs two forwards", "batch 1 vs batch 2", "reward:",
         "trust region at β", "equalizer weights")


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    import tiny
    root = tmp_path_factory.mktemp("tiny_models")
    return tiny.build_tiny_hunyuan(str(root / "hunyuan")), tiny.build_tiny_videoalign(str(root / "videoalign"))


def flags(tiny_models, output_dir, *extra):
    return ["--tiny", "--self_check", "--model_path", tiny_models[0], "--reward_path", tiny_models[1],
            "--output_dir", str(output_dir), "--num_steps", str(NUM_STEPS), "--group_size", "2",
            "--videos_per_rank", "2", *extra]


def statuses(output_dir):
    """{line: status} and the per-step rows, read back from self_check.md."""
    text = open(os.path.join(output_dir, "self_check.md")).read()
    summary, steps = text.split("\n\n")[:2]
    found = {}
    for row in summary.splitlines()[2:]:
        cells = [c.strip() for c in row.strip("|").split("|")]
        found[cells[0]] = cells[-1].strip("*")
    return found, steps.splitlines()[2:]


def status_of(found, line):
    (status,) = [s for name, s in found.items() if name.startswith(line)]
    return status


@slow
def test_on_two_ranks_every_line_is_measured_and_the_healthy_tiny_setup_fails_none(tiny_models, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "train.py", *flags(tiny_models, tmp_path)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    found, steps = statuses(tmp_path)
    assert len(found) == len(LINES) and all(any(name.startswith(l) for name in found) for l in LINES), found
    for line in ("on-policy ratio", "batched CFG", "batch 1 vs batch 2", "reward:", "equalizer"):
        assert status_of(found, line) == "PASS", (line, found)
    assert "FAIL" not in found.values()
    assert len(steps) == NUM_STEPS  # one row per denoising step
    assert "Self-check (passed" in done.stdout
    assert not os.path.exists(os.path.join(tmp_path, "metrics.jsonl"))  # nothing trained, nothing saved
    assert not [n for n in os.listdir(tmp_path) if n.startswith("checkpoint-")]


def another_recompute(**changes):
    """train.recompute_log_prob with one of the run's settings changed at update time (a real bug)."""
    def recompute(cfg, transformer, embeds, transition):
        settings = {"kernel": cfg.kernel, "eta": cfg.eta, "guidance_scale": cfg.cfg_scale, **changes}
        if callable(settings["guidance_scale"]):
            settings["guidance_scale"] = settings["guidance_scale"](cfg.cfg_scale)
        return model.transition_log_prob(transformer, embeds, transition, **settings)
    return recompute


@slow
@pytest.mark.parametrize("bug", ["cfg_scale_at_update", "eta_at_update"])
def test_a_recompute_that_differs_from_the_rollout_fails_the_ratio_line(bug, tiny_models, tmp_path, monkeypatch):
    broken = (another_recompute(guidance_scale=lambda s: s + 1.0) if bug == "cfg_scale_at_update"
              else another_recompute(eta=0.6))
    monkeypatch.setattr(train, "recompute_log_prob", broken)
    assert train.main(config.parse_config(flags(tiny_models, tmp_path))) == 1
    found, steps = statuses(tmp_path)
    assert status_of(found, "on-policy ratio") == "FAIL"


@slow
def test_a_reward_that_scores_a_failed_video_fails_the_reward_line(tiny_models, tmp_path, monkeypatch):
    real = reward.RewardMix.__call__
    monkeypatch.setattr(reward.RewardMix, "__call__",
                        lambda self, *a: {k: v.nan_to_num(0.0) for k, v in real(self, *a).items()})  # NaN -> 0
    assert train.main(config.parse_config(flags(tiny_models, tmp_path))) == 1
    found, _ = statuses(tmp_path)
    assert status_of(found, "reward:") == "FAIL" and status_of(found, "on-policy ratio") == "PASS"


@slow
def test_a_reward_normalised_over_its_batch_fails_the_reward_line(tiny_models, tmp_path, monkeypatch):
    """A reward that centres its scores on the mean of the batch it can score: the failed video leaves the batch,
    the mean moves, and every other video's score with it (by half the gap of two videos: 0.71 × their std)."""
    real = reward.RewardMix.__call__

    def centred(self, *a):
        scores = real(self, *a)
        good = torch.isfinite(scores["reward"])
        return {**scores, "reward": scores["reward"] - scores["reward"][good].mean()}
    monkeypatch.setattr(reward.RewardMix, "__call__", centred)
    assert train.main(config.parse_config(flags(tiny_models, tmp_path))) == 1
    found, _ = statuses(tmp_path)
    assert status_of(found, "reward:") == "FAIL" and status_of(found, "on-policy ratio") == "PASS"
    assert "others moved 7.1e-01 × std" in open(os.path.join(tmp_path, "self_check.md")).read()


@slow
def test_a_cfg_batch_that_mixes_up_the_branches_fails_the_cfg_line(tiny_models, tmp_path, monkeypatch):
    real = model.cfg_velocity

    def swapped(transformer, latents, sigma, embeds, guidance_scale=6.0):
        """v_c + s·(v_u − v_c): the conditional and unconditional rows of the batch taken the wrong way round."""
        if guidance_scale == 1.0:  # one branch, one forward: nothing to mix up (the check's reference)
            return real(transformer, latents, sigma, embeds, 1.0)
        guided, cond = real(transformer, latents, sigma, embeds, guidance_scale), real(transformer, latents, sigma, embeds, 1.0)
        uncond = (guided - guidance_scale * cond) / (1 - guidance_scale)  # from v_b = v_u + s·(v_c − v_u)
        return cond + guidance_scale * (uncond - cond)
    monkeypatch.setattr(model, "cfg_velocity", swapped)
    assert train.main(config.parse_config(flags(tiny_models, tmp_path))) == 1
    found, _ = statuses(tmp_path)
    assert status_of(found, "batched CFG") == "FAIL"
    assert status_of(found, "on-policy ratio") == "PASS"  # rollout and update share the bug: the ratio cannot see it


@slow
def test_with_the_mp4_reward_input_a_failed_video_is_scored_nan_not_a_crash(tiny_models, tmp_path):
    """The REWARD call the loop makes (train.score_videos), with the official mp4 input: a non-finite video is
    not encoded (the encoder refuses it) but left non-finite, so the reward scores it NaN and it is excluded."""
    status = train.main(config.parse_config(flags(tiny_models, tmp_path, "--reward_input", "mp4")))
    assert status == 0, open(os.path.join(tmp_path, "self_check.md")).read()  # the table names the failing line
    found, _ = statuses(tmp_path)
    assert status_of(found, "reward:") == "PASS"


# ------------------------------------------------------------------------------------------------
# The reward line's grading (self_check.reward_line), on numbers whose answer is known.

@pytest.mark.parametrize("moved, status", [(0.0, "PASS"), (2e-3, "PASS"), (0.05, "WARN"), (0.5, "FAIL"),
                                           (float("inf"), "FAIL")])
def test_the_reward_line_grades_the_others_change_relative_to_the_rewards_std(moved, status):
    """Rewards with std exactly 2 (±2 about 1, two videos of each): a change of 2e-3 × 2 is rounding (PASS), though
    it is 40 times an absolute 1e-4; 0.05 × 2 changes advantages by 5 % (WARN); 0.5 × 2 by half (FAIL)."""
    scores = torch.tensor([-1.0, -1.0, 3.0, 3.0], dtype=torch.float64)
    assert scores.std().item() == pytest.approx(2.0 * (4 / 3) ** 0.5)  # unbiased std of ±2: 2·sqrt(4/3)
    std = scores.std().item()
    line = self_check.reward_line(scores, float("nan"), moved * std, False, False)
    assert line.status == status, line
    if math.isfinite(moved):
        assert f"others moved {moved:.1e} × std" in line.measured


@pytest.mark.parametrize("what", ["good video not finite", "failed video scored"])
def test_the_reward_line_fails_a_non_finite_score_or_a_scored_failed_video_whatever_the_change(what):
    line = self_check.reward_line(torch.tensor([0.0, 1.0], dtype=torch.float64), 0.0, 0.0,
                                  what == "good video not finite", what == "failed video scored")
    assert line.status == "FAIL"


def test_with_equal_rewards_any_change_fails_and_none_passes():
    equal = torch.tensor([0.5, 0.5, 0.5], dtype=torch.float64)  # std 0: nothing to compare a change with
    assert self_check.reward_line(equal, float("nan"), 0.0, False, False).status == "PASS"
    assert self_check.reward_line(equal, float("nan"), 1e-12, False, False).status == "FAIL"
