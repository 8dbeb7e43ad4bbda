"""The trust region as train.py's loop wires it, always with an active β (at the official β ~1e-7 any wiring
error is invisible: β·KL is ~1e-8 of the policy term).

Each test names the one-line bug it was written against and was checked to fail under it:
    the two KL weights swapped in the loop's dual_kl call       -> test_the_loss_is_the_policy_term_plus_beta_...
    failed-reward pairs entering β·KL (the mask dropped)         -> test_the_loss_is_the_policy_term_plus_beta_...
    two_stage switching one optimizer update early               -> test_two_stage_beta_switches_exactly_...
    the official controller fed the KL summed over ranks         -> test_the_official_controller_sees_the_kl_...
    the anchor's means not recomputed after a refresh            -> test_after_an_anchor_refresh_the_kl_is_...
    adaptive β moving the wrong way / not per optimizer update   -> test_adaptive_beta_doubles_each_update_...

Tiny random models (tests/test_train.py's), 2 denoising steps, one transformer block, CPU.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

import config
import train
import trust_region

pytestmark = pytest.mark.slow  # every test here runs train.py

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_train import metrics, run, tiny_args, tiny_models  # noqa: E402,F401  (tiny_models is a fixture)


def fail_first_video_of_each_group(monkeypatch, group_size):
    """The VideoAlign reward fails (NaN) on the first video of every group: those pairs must be excluded."""
    import reward
    forward = reward.VideoAlignReward.forward

    def partly_broken(self, frames, prompts, **kwargs):
        scores = forward(self, frames, prompts, **kwargs)
        failed = torch.arange(len(prompts)) % group_size == 0
        return {k: torch.where(failed.to(v.device), float("nan"), v) for k, v in scores.items()}
    monkeypatch.setattr(reward.VideoAlignReward, "forward", partly_broken)


def test_the_loss_is_the_policy_term_plus_beta_times_the_weighted_kls_over_the_valid_pairs(tiny_models, tmp_path,
                                                                                         monkeypatch):
    """loss = policy_loss + β·(w_anchor·KL_anchor + w_step·KL_step), every term a mean over the valid pairs only
    (a failed reward's pairs enter neither). Weights 0.7 / 0.3 and two updates per rollout, so that in the
    second iteration KL_anchor (to the pretrained anchor) and KL_step (to the rollout's policy) differ and a
    swap of the weights changes the loss."""
    fail_first_video_of_each_group(monkeypatch, group_size=2)
    beta, w_anchor, w_step = 30.0, 0.7, 0.3
    run(tiny_models, tmp_path, max_iterations=2, checkpoint_every=2, videos_per_rank=4, group_size=2,
        updates_per_rollout=2, beta_schedule="constant", beta_start=beta, beta_end=beta, kl_anchor_weight=w_anchor,
        kl_step_weight=w_step, optimizer="adamw")
    rows = metrics(tmp_path)
    for row in rows:
        assert row["num_failed_rewards"] == 2 and row["beta"] == pytest.approx(beta, rel=1e-7)
        expected = row["policy_loss"] + beta * (w_anchor * row["kl_anchor"] + w_step * row["kl_step"])
        # float32 sums of 2 x 2 x 2 pair terms: a few ulps of the terms' magnitudes
        scale = abs(row["policy_loss"]) + beta * (w_anchor * row["kl_anchor"] + w_step * row["kl_step"])
        assert row["loss"] == pytest.approx(expected, rel=0, abs=1e-5 * scale)
    second = rows[1]
    assert second["kl_anchor"] > 0 and second["kl_step"] > 0
    # a swap would move the loss by β·(w_anchor − w_step)·(KL_anchor − KL_step): far beyond the tolerance
    assert beta * (w_anchor - w_step) * abs(second["kl_anchor"] - second["kl_step"]) > 1e-3 * abs(second["loss"])
    assert beta * (w_anchor * second["kl_anchor"] + w_step * second["kl_step"]) > 0.05 * abs(second["policy_loss"])


def test_in_the_first_iteration_the_anchor_and_step_kls_agree(tiny_models, tmp_path):
    """Iteration 1, second update: the anchor (the pretrained model, period 10) and π_old (the rollout's policy)
    are the same model, so KL_anchor (recomputed through the anchor) equals KL_step (from the means recorded in
    the rollout) up to the round-off of a different batch composition: an independent check that KL_anchor is
    measured against the anchor's means on the rollout's own transitions."""
    run(tiny_models, tmp_path, max_iterations=1, updates_per_rollout=2, beta_schedule="constant", beta_start=1.0,
        beta_end=1.0, optimizer="adamw")
    (row,) = metrics(tmp_path)
    assert row["kl_step"] > 1e-8  # the second update moved the policy away from both references
    assert row["kl_anchor"] == pytest.approx(row["kl_step"], rel=1e-3)


def test_after_an_anchor_refresh_the_kl_is_measured_against_the_new_anchor(tiny_models, tmp_path):
    """Anchor period 1: after every optimizer update the anchor becomes the policy. Two updates per rollout:
    the first update's KL_anchor is 0 (the anchor is the rollout's policy), and after the refresh the second's
    is 0 again (the anchor is the policy it is measured from). Stale anchor means would give the second update
    KL_anchor = KL_step > 0."""
    run(tiny_models, tmp_path, max_iterations=2, checkpoint_every=2, updates_per_rollout=2, anchor_period=1,
        kl_mode="dual", beta_schedule="constant", beta_start=1.0, beta_end=1.0, optimizer="adamw")
    for row in metrics(tmp_path):
        assert row["kl_step"] > 1e-8 and row["anchor_refreshed"]
        assert row["kl_anchor"] < 1e-6 * row["kl_step"]


def test_two_stage_beta_switches_exactly_at_the_switch_step(tiny_models, tmp_path):
    """β = beta_start for optimizer updates 0 … switch−1, beta_end from update `switch` on. Two updates per
    rollout, switch 3: iteration 1 runs updates 0, 1 (0.5, 0.5), iteration 2 updates 2, 3 (0.5, 5), iteration 3
    updates 4, 5 (5, 5). The logged β is the iteration's mean over its updates."""
    run(tiny_models, tmp_path, max_iterations=3, checkpoint_every=3, updates_per_rollout=2, beta_schedule="two_stage",
        beta_start=0.5, beta_end=5.0, beta_switch_step=3, optimizer="adamw")
    assert [r["beta"] for r in metrics(tmp_path)] == pytest.approx([0.5, 2.75, 5.0], rel=1e-7)


def test_adaptive_beta_doubles_each_update_while_the_kl_is_above_target_and_halves_below(tiny_models, tmp_path):
    """--beta_schedule adaptive, one update per rollout: β of iteration i+1 is PPO's rule applied to iteration i's
    L_KL = KL_anchor + 0.1·KL_step. Target 1e-30: the first update's KL is exactly 0 (policy = anchor = π_old),
    below the band, so β halves (1 -> 0.5); from then on the policy has drifted and β doubles each update."""
    run(tiny_models, tmp_path / "up", max_iterations=4, checkpoint_every=4, beta_schedule="adaptive", beta_init=1.0,
        kl_target=1e-30, beta_min=1e-3, beta_max=1e4, beta_window=1, optimizer="adamw")
    rows = metrics(tmp_path / "up")
    assert [r["beta"] for r in rows] == [1.0, 0.5, 1.0, 2.0]
    assert rows[0]["kl_anchor"] == 0 and all(r["kl_anchor"] > 0 for r in rows[1:])
    betas, beta = [], 1.0  # the same rule, applied by hand to the logged KLs
    for row in rows:
        betas.append(beta)
        beta = trust_region.AdaptiveBeta(beta, 1e-30, 1e-3, 1e4, window=1).observe(row["kl_anchor"] + 0.1 * row["kl_step"])
    assert [r["beta"] for r in rows] == betas
    # a target far above any drift: β halves each update down to its floor
    run(tiny_models, tmp_path / "down", max_iterations=3, checkpoint_every=3, beta_schedule="adaptive",
        beta_init=8.0, kl_target=1e3, beta_min=2.0, beta_max=1e4, beta_window=1, optimizer="adamw")
    assert [r["beta"] for r in metrics(tmp_path / "down")] == [8.0, 4.0, 2.0]
    # a window of 2 updates (2 per rollout): one decision per iteration, on the mean of its two updates' KLs
    run(tiny_models, tmp_path / "window", max_iterations=2, checkpoint_every=2, beta_schedule="adaptive",
        beta_init=8.0, kl_target=1e3, beta_min=1e-3, beta_max=1e4, beta_window=2, updates_per_rollout=2,
        optimizer="adamw")
    assert [r["beta"] for r in metrics(tmp_path / "window")] == [8.0, 4.0]


def official_controller_worker(model_path, reward_path, output_dir):
    """Under torchrun, 2 ranks: a 2-iteration official-β run that records, on each rank, the per-pair KLs of its
    own batch (train.pair_betas' input) and the KLs its controller is fed; written to output_dir/rank{r}.json."""
    own, fed = [], []
    pair_betas, step = train.pair_betas, trust_region.OfficialBeta.step

    def recording_pair_betas(beta_schedule, kl, world_size):
        own.append(kl.tolist())
        return pair_betas(beta_schedule, kl, world_size)

    def recording_step(self, kl):
        fed.append(float(kl))
        return step(self, kl)
    train.pair_betas, trust_region.OfficialBeta.step = recording_pair_betas, recording_step
    args = tiny_args((model_path, reward_path), output_dir, max_iterations=2, checkpoint_every=2, group_size=4,
                     videos_per_rank=2, beta_schedule="official", beta_start=1.0, beta_end=100.0, optimizer="adamw")
    train.main(config.parse_config(args))
    with open(os.path.join(output_dir, f"rank{os.environ['RANK']}.json"), "w") as f:
        json.dump({"own": own, "fed": fed}, f)


def test_the_official_controller_sees_the_kl_averaged_over_ranks(tiny_models, tmp_path):
    """Each rank's controller is fed, pair by pair, the mean of the two ranks' KLs at that position, so β is the
    same on both ranks (the official code feeds each rank its own KL; a sum would double it). β from 1 to 100, so
    the KL is far above float noise after the first update."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
               *tiny_models, str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    ranks = [json.load(open(tmp_path / f"rank{r}.json")) for r in (0, 1)]
    own = [torch.tensor(r["own"], dtype=torch.float64).flatten() for r in ranks]  # (steps x pairs,) per rank
    expected = (own[0] + own[1]) / 2
    assert max(abs(x) for x in own[0].tolist() + own[1].tolist()) > 0  # the second iteration has drifted
    assert not torch.allclose(own[0], own[1])                           # the ranks' own KLs differ
    for r in ranks:
        torch.testing.assert_close(torch.tensor(r["fed"], dtype=torch.float64), expected, rtol=1e-6, atol=0)


if __name__ == "__main__":  # the torchrun worker of test_the_official_controller_sees_the_kl_averaged_over_ranks
    official_controller_worker(*sys.argv[1:])
