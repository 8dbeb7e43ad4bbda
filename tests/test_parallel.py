"""Sequence parallelism (parallel.py, train.py --sp_size) on CPU with gloo.

Every backend collective the plan needs exists on gloo (all-to-all, all-gather, all-reduce), so
everything is tested here, with the tiny random HunyuanVideo-1.5 (2 heads: sp = 2):
  * one forward and backward split over 2 ranks equals the unsplit forward of one process
    (velocity: max abs diff, float32 round-off; gradients: the SUM over the group);
  * one GRPO update, 2 ranks sp = 2 and 4 ranks dp = 2 x sp = 2, equals 1 rank on the same 4 videos;
  * a resumed sp = 2 run continues bit-identically.
Tolerances are the measured float noise with a margin (the 2-ranks-vs-1 test of test_train.py uses
the same ones): a missing sum over the group or a video counted twice gives errors of 0.5 or more.
"""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import config
import distributed
import parallel
from test_train import REPO, WEIGHTS, metrics, optimizer_state, relative_error, run, tiny_args, tiny_models  # noqa: F401

pytestmark = pytest.mark.slow  # the whole module: train.py / eval.py runs (README: Test)


def torchrun(nproc, arguments, timeout=600):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] + arguments
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]


# AdamW and the two-stage β in the equivalence runs: Adam's first moment is the sharpest check of the loss
# normalisation, and the official β controller counts (sample, step) pairs per rank, so it depends on
# videos per rank (dp 2 x sp 2 holds 2 per rank, 1 rank holds 4)
EQUIVALENCE = {"optimizer": "adamw", "beta_schedule": "two_stage"}


def train_sp(nproc, tiny_models, output_dir, *flags, **overrides):  # noqa: F811
    torchrun(nproc, ["train.py"] + tiny_args(tiny_models, output_dir, **{**EQUIVALENCE, **overrides}) + list(flags))


def flat(params):
    return torch.cat([params[k].flatten() for k in sorted(params)])


def first_moment(state):
    return torch.cat([state[k]["exp_avg"].flatten() for k in sorted(state)])


# ------------------------------------------------------------------------------------------------
# The split forward (run by torchrun on 2 ranks: this file is the script, see the bottom).

def split_forward_worker(out_path):
    """Both ranks: the unsplit forward/backward of a 2-block tiny transformer (reference), then the same
    transformer split over the 2 ranks. Rank 0 writes the velocity difference and the gradient error of
    the sum over ranks. Text: 7 + 2 tokens (odd: the padding hook must act), row 2 mostly padding."""
    import torch.distributed as dist
    from diffusers import HunyuanVideo15Transformer3DModel
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    transformer = HunyuanVideo15Transformer3DModel(
        in_channels=9, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2, num_refiner_layers=1,
        mlp_ratio=2.0, text_embed_dim=16, text_embed_2_dim=32, image_embed_dim=12, rope_axes_dim=(2, 2, 4),
        target_size=16, task_type="t2v")
    g = torch.Generator().manual_seed(1)
    inputs = dict(hidden_states=torch.randn(2, 9, 3, 4, 4, generator=g), timestep=torch.tensor([500.0, 900.0]),
                  encoder_hidden_states=torch.randn(2, 7, 16, generator=g),
                  encoder_attention_mask=torch.tensor([[1] * 7, [1] * 3 + [0] * 4]),
                  encoder_hidden_states_2=torch.randn(2, 2, 32, generator=g),
                  encoder_attention_mask_2=torch.tensor([[1, 0], [0, 0]]), image_embeds=torch.zeros(2, 0, 12),
                  return_dict=False)
    reference = transformer(**inputs)[0]  # (2, 4, 3, 4, 4)
    reference.square().sum().backward()
    reference_grads = {n: p.grad.clone() for n, p in transformer.named_parameters() if p.grad is not None}
    transformer.zero_grad()

    parallel.enable(transformer, parallel.SequenceParallel(2), torch.device("cpu"))
    velocity = transformer(**inputs)[0]
    velocity.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in transformer.named_parameters() if p.grad is not None}
    for grad in grads.values():  # the full gradient is the sum over the group's ranks
        dist.all_reduce(grad)
    if dist.get_rank() == 0:
        names = sorted(reference_grads)
        result = {"velocity_max_abs_diff": (velocity - reference).abs().max().item(),
                  "velocity_max_abs": reference.abs().max().item(),
                  "gradient_relative_error": relative_error(torch.cat([grads[n].flatten() for n in names]),
                                                            torch.cat([reference_grads[n].flatten() for n in names])),
                  "same_parameters_have_gradients": sorted(grads) == names}
        with open(out_path, "w") as f:
            json.dump(result, f)
    dist.destroy_process_group()


def test_a_forward_split_over_two_ranks_equals_the_unsplit_forward(tmp_path):
    out = tmp_path / "split.json"
    torchrun(2, [os.path.abspath(__file__), "split_forward", str(out)])
    result = json.loads(out.read_text())
    # measured: 2.4e-7 on velocities of magnitude ~2 (float32 round-off of a different summation order)
    assert result["velocity_max_abs_diff"] < 1e-5 * max(1.0, result["velocity_max_abs"])
    # measured ~1e-7: the sum of the 2 ranks' gradients is the unsplit gradient
    assert result["gradient_relative_error"] < 1e-5
    assert result["same_parameters_have_gradients"]


def test_every_video_of_a_group_is_scored_by_exactly_one_of_its_ranks():
    for sp in (1, 2, 3, 4):
        for batch in range(1, 7):
            rows = []
            for sp_rank in range(sp):
                layout = object.__new__(parallel.SequenceParallel)
                layout.sp_rank, layout.sp_size = sp_rank, sp
                rows += layout.scored_rows(batch)
            assert sorted(rows) == list(range(batch))


# ------------------------------------------------------------------------------------------------
# GRPO updates: the same 4 videos (one group of 4) on 1 rank, on 2 ranks sp = 2, on 4 ranks dp 2 x sp 2.

@pytest.fixture(scope="module")
def one_rank_run(tiny_models, tmp_path_factory):  # noqa: F811
    output_dir = tmp_path_factory.mktemp("one_rank")
    run(tiny_models, output_dir, group_size=4, videos_per_rank=4, max_iterations=1, **EQUIVALENCE)
    return output_dir


@pytest.fixture(scope="module")
def sp_run(tiny_models, tmp_path_factory):  # noqa: F811
    """2 ranks, sp = 2 (one sequence-parallel group holding all 4 videos), 2 iterations, a checkpoint after each."""
    output_dir = tmp_path_factory.mktemp("sp2")
    train_sp(2, tiny_models, output_dir, group_size=4, videos_per_rank=4, max_iterations=2, sp_size=2)
    return output_dir


def assert_same_update(one_dir, other_dir, tiny_models, tmp_path):  # noqa: F811
    one, other = (os.path.join(d, "checkpoint-000001") for d in (one_dir, other_dir))
    base = load_file(os.path.join(tiny_models[0], WEIGHTS))
    params_one, params_other = load_file(os.path.join(one, WEIGHTS)), load_file(os.path.join(other, WEIGHTS))
    assert (flat(params_one) - flat(base)).norm() > 1e-3 * flat(base).norm()  # the update moved the weights
    # measured 1.1e-5 (sp 2) and 7.8e-6 (dp 2 x sp 2): Adam's first step is ±lr per element, so
    # gradients that are round-off (e.g. attention key biases, exactly 0 in exact arithmetic) flip sign
    assert relative_error(flat(params_other), flat(params_one)) < 5e-5
    # Adam's first moment is 0.1 x the clipped gradient: measured 4.2e-5 for both; a factor 2 in the
    # loss (a video counted on both ranks of its group) would give 0.5
    moments = [first_moment(optimizer_state(c, tmp_path / name)) for c, name in ((one, "one"), (other, "other"))]
    assert relative_error(moments[1], moments[0]) < 2e-4
    row_one, row_other = metrics(one_dir)[0], metrics(other_dir)[0]
    for key in ("reward_mean", "reward_std", "vq", "mq", "ta", "grad_norm"):
        assert row_other[key] == pytest.approx(row_one[key], rel=1e-4), key


def test_one_grpo_update_with_sp2_on_two_ranks_equals_one_rank(one_rank_run, sp_run, tiny_models, tmp_path):  # noqa: F811
    assert_same_update(one_rank_run, sp_run, tiny_models, tmp_path)


def test_four_ranks_dp2_by_sp2_equal_one_rank_on_the_same_global_batch(one_rank_run, tiny_models, tmp_path):  # noqa: F811
    output_dir = tmp_path / "dp2sp2"
    train_sp(4, tiny_models, output_dir, group_size=4, videos_per_rank=2, max_iterations=1, sp_size=2)
    assert_same_update(one_rank_run, output_dir, tiny_models, tmp_path)


def test_an_sp2_run_resumed_from_its_first_checkpoint_continues_bit_identically(sp_run, tiny_models, tmp_path):  # noqa: F811
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(os.path.join(sp_run, "checkpoint-000001"), resumed / "checkpoint-000001")
    shutil.copy(os.path.join(sp_run, "metrics.jsonl"), resumed / "metrics.jsonl")  # cut back to 1 by --resume
    train_sp(2, tiny_models, resumed, "--resume", group_size=4, videos_per_rank=4, max_iterations=2, sp_size=2)
    a, b = (distributed.latest_checkpoint(str(d)) for d in (sp_run, resumed))
    assert os.path.basename(a) == os.path.basename(b) == "checkpoint-000002"
    params_a, params_b = load_file(os.path.join(a, WEIGHTS)), load_file(os.path.join(b, WEIGHTS))
    assert all(torch.equal(params_a[k], params_b[k]) for k in params_a)
    state_a, state_b = optimizer_state(a, tmp_path / "a"), optimizer_state(b, tmp_path / "b")
    assert all(torch.equal(state_a[k]["exp_avg_sq"], state_b[k]["exp_avg_sq"]) for k in state_a)
    assert [r["reward_mean"] for r in metrics(sp_run)] == [r["reward_mean"] for r in metrics(resumed)]


def test_an_sp_size_that_does_not_divide_the_world_or_the_heads_is_refused(tiny_models, tmp_path):  # noqa: F811
    import train
    cfg = config.parse_config(tiny_args(tiny_models, tmp_path, sp_size=3))
    with pytest.raises(config.ConfigError, match="--sp_size must be a divisor of the world size 2, got 3"):
        config.check_config(cfg, world_size=2)
    layout = object.__new__(parallel.SequenceParallel)
    layout.sp_size = 4

    class Config:
        num_attention_heads = 2

    with pytest.raises(ValueError, match="expected a divisor of 2, found 4"):
        parallel.enable(type("T", (), {"config": Config})(), layout, torch.device("cpu"))


if __name__ == "__main__" and sys.argv[1] == "split_forward":
    split_forward_worker(sys.argv[2])
    distributed.exit_process(0)  # no teardown of the gloo group by the interpreter (see distributed.exit_process)
