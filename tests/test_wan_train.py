"""The trainer's defining properties on the second family, Wan2.1: a tiny random Wan through train.py and eval.py.

The same properties tests/test_train.py and tests/test_parallel.py check on HunyuanVideo-1.5, each on one shared
set of runs (module fixtures, so that each torchrun start is paid once):
  * 2 ranks x 2 videos equal 1 rank x 4 videos on the same global batch (weights, Adam's first moment, rewards);
  * 2 ranks with sp = 2 (each video's tokens split) equal the same 1-rank run;
  * a run SIGKILLed after its first checkpoint and resumed ends bit-identical to the uninterrupted run;
  * LoRA trains only the adapters, and the saved transformer/ is PEFT's own merge of them;
  * the self-check of `--tiny --tiny_family wan` (the tiny Wan built under output_dir, its own default size)
    measures every line and fails none;
  * eval.py scores the base and a checkpoint, whose transformer/ loads with diffusers' WanTransformer3DModel.
Nothing tells the trainer the family: it reads model_index.json. Tolerances are test_parallel.py's (float32
round-off of batch-4 against batch-2 matmuls, amplified by the group normalisation); a video counted twice or a
missing sum over ranks gives errors of 0.5 or more.
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import config
import distributed
import eval as evaluate
import tiny
import train
from test_train import REPO, WEIGHTS, metrics, optimizer_state, relative_error

pytestmark = pytest.mark.slow  # train.py / eval.py / torchrun runs (README: Test)

# Every piece of resumable state acts: two updates per rollout (the clip and the step-wise KL), β = 1 (the KL
# weighs), the anchor refreshed after updates 3 and 6, AdamW's moments. AdamW and a constant β in the equivalence runs:
# Adam's first moment is the sharpest check of the loss normalisation over ranks.
OPTIONS = {"num_steps": 2, "group_size": 4, "lr": 1e-3, "sample_every": 0, "checkpoint_every": 1,
           "keep_checkpoints": 3, "optimizer": "adamw", "beta_schedule": "two_stage", "beta_start": 1.0,
           "beta_end": 1.0, "updates_per_rollout": 2, "anchor_period": 3}
ITERATIONS = 3


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("wan_models")
    return (tiny.build_tiny_wan(str(root / "wan")), tiny.build_tiny_videoalign(str(root / "videoalign")),
            tiny.build_tiny_clip(str(root / "clip")))


def flags(models, output_dir, **overrides):
    options = {"model_path": models[0], "reward_path": models[1], "output_dir": str(output_dir), **OPTIONS,
               **overrides}
    return ["--tiny"] + [item for key, value in options.items() for item in (f"--{key}", str(value))]


def torchrun(nproc, arguments):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "train.py"] + arguments
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]


def flat(params):
    return torch.cat([params[k].flatten() for k in sorted(params)])


@pytest.fixture(scope="module")
def straight(models, tmp_path_factory):
    """1 rank x 4 videos (one group), 3 iterations uninterrupted, a checkpoint after each."""
    output_dir = tmp_path_factory.mktemp("wan_straight")
    train.main(config.parse_config(flags(models, output_dir, videos_per_rank=4, max_iterations=ITERATIONS)))
    return output_dir


def assert_same_first_update(one_dir, other_dir, models, tmp_path):
    one, other = (os.path.join(d, "checkpoint-000001") for d in (one_dir, other_dir))
    base = load_file(os.path.join(models[0], WEIGHTS))
    params_one, params_other = load_file(os.path.join(one, WEIGHTS)), load_file(os.path.join(other, WEIGHTS))
    assert params_one.keys() == params_other.keys() == base.keys()
    assert (flat(params_one) - flat(base)).norm() > 1e-3 * flat(base).norm()  # the updates moved the weights
    assert relative_error(flat(params_other), flat(params_one)) < 5e-5
    moment = lambda state: torch.cat([state[k]["exp_avg"].flatten() for k in sorted(state)])  # noqa: E731
    moments = [moment(optimizer_state(c, tmp_path / name)) for c, name in ((one, "one"), (other, "other"))]
    assert relative_error(moments[1], moments[0]) < 2e-4
    row_one, row_other = metrics(one_dir)[0], metrics(other_dir)[0]
    for key in ("reward_mean", "reward_std", "vq", "mq", "ta", "grad_norm"):
        assert row_other[key] == pytest.approx(row_one[key], rel=1e-4, abs=1e-9), key


def test_two_ranks_update_like_one_rank_on_the_same_global_batch(straight, models, tmp_path):
    torchrun(2, flags(models, tmp_path / "dp2", videos_per_rank=2, max_iterations=1))
    assert_same_first_update(straight, tmp_path / "dp2", models, tmp_path)


def test_sp2_on_two_ranks_updates_like_one_rank(straight, models, tmp_path):
    torchrun(2, flags(models, tmp_path / "sp2", videos_per_rank=4, max_iterations=1, sp_size=2))
    assert_same_first_update(straight, tmp_path / "sp2", models, tmp_path)


def test_a_run_killed_after_its_first_checkpoint_resumes_exactly_like_an_uninterrupted_run(straight, models, tmp_path):
    interrupted = tmp_path / "interrupted"
    arguments = flags(models, interrupted, videos_per_rank=4, max_iterations=ITERATIONS)
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()),  # the same float arithmetic as in-process
           "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen([sys.executable, "train.py"] + arguments, cwd=REPO, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not os.path.isdir(interrupted / "checkpoint-000001"):
        assert process.poll() is None, "the run ended before it could be killed"
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not os.path.isdir(interrupted / f"checkpoint-{ITERATIONS:06d}")
    train.main(config.parse_config(arguments + ["--resume"]))
    a, b = (distributed.latest_checkpoint(str(d)) for d in (straight, interrupted))
    assert os.path.basename(a) == os.path.basename(b) == f"checkpoint-{ITERATIONS:06d}"
    params_a, params_b = load_file(os.path.join(a, WEIGHTS)), load_file(os.path.join(b, WEIGHTS))
    assert params_a.keys() == params_b.keys() and all(torch.equal(params_a[k], params_b[k]) for k in params_a)
    state_a, state_b = optimizer_state(a, tmp_path / "a"), optimizer_state(b, tmp_path / "b")
    assert all(torch.equal(state_a[k][name], state_b[k][name]) for k in state_a for name in state_a[k] if name != "step")
    rows_a, rows_b = metrics(straight), metrics(interrupted)
    for key in ("reward_mean", "kl_anchor", "kl_step", "grad_norm"):
        assert [r[key] for r in rows_a] == [r[key] for r in rows_b], key
    assert [r["anchor_refreshed"] for r in rows_a] == [False, True, True]  # after updates 3 and 6 (2 per iteration)
    assert rows_a[-1]["kl_anchor"] > 0 and rows_a[-1]["kl_step"] > 0  # the trust region's state mattered


def test_lora_trains_only_the_adapters_and_saves_peft_s_merge(models, tmp_path):
    from diffusers import WanTransformer3DModel
    from peft import LoraConfig
    train.main(config.parse_config(flags(models, tmp_path, group_size=2, videos_per_rank=2, max_iterations=1,
                                         lora_rank=4)))
    path = str(tmp_path / "policy.pt")
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    dcp_to_torch_save(os.path.join(tmp_path, "checkpoint-000001", "policy"), path)
    policy = torch.load(path, weights_only=False)["policy"]
    base = load_file(os.path.join(models[0], WEIGHTS))
    lora_b = [k for k in policy if "lora_B" in k]
    assert lora_b and any(policy[k].abs().sum() > 0 for k in lora_b)  # B starts at 0 and was trained
    frozen = {k.replace(".base_layer", ""): v for k, v in policy.items() if "lora_" not in k}
    assert frozen.keys() == base.keys() and all(torch.equal(frozen[k], base[k]) for k in base)
    # every attention projection of both attentions (flow_grpo's Wan targets), merged by PEFT itself
    reference = WanTransformer3DModel.from_pretrained(os.path.join(models[0], "transformer"))
    reference.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    missing, unexpected = reference.load_state_dict(policy, strict=False)
    assert not unexpected and not [k for k in missing if "lora_" in k]
    for module in reference.modules():
        if hasattr(module, "merge") and hasattr(module, "base_layer"):
            module.merge()                                                   # peft: W += scale·B·A in place
    expected = {k.replace(".base_layer", ""): v for k, v in reference.state_dict().items() if "lora_" not in k}
    saved = WanTransformer3DModel.from_pretrained(os.path.join(tmp_path, "checkpoint-000001", "transformer"))
    assert saved.state_dict().keys() == expected.keys()
    assert max((saved.state_dict()[k] - expected[k]).abs().max().item() for k in expected) < 1e-6
    assert any(not torch.equal(saved.state_dict()[k], base[k]) for k in base)


def test_the_self_check_of_tiny_wan_builds_it_at_its_own_size_and_fails_no_line(models, tmp_path):
    from test_self_check import LINES, statuses
    output_dir = tmp_path / "check"
    arguments = ["--tiny", "--tiny_family", "wan", "--reward_path", models[1], "--output_dir", str(output_dir),
                 "--num_steps", "4", "--group_size", "2", "--videos_per_rank", "2", "--self_check"]
    assert train.main(config.parse_config(arguments)) == 0
    with open(output_dir / "tiny_wan" / "model_index.json") as f:
        assert json.load(f)["_class_name"] == "WanPipeline"  # built under output_dir, the family asked for
    found, steps = statuses(output_dir)
    assert len(found) == len(LINES) and all(any(name.startswith(line) for name in found) for line in LINES)
    assert "FAIL" not in found.values() and len(steps) == 4


def test_eval_scores_the_base_and_a_checkpoint_that_loads_with_diffusers(straight, models, tmp_path):
    from diffusers import WanTransformer3DModel
    checkpoint = distributed.latest_checkpoint(str(straight))
    with open(os.path.join(checkpoint, "transformer", "config.json")) as f:
        assert json.load(f)["_class_name"] == "WanTransformer3DModel"  # not FSDP2's wrapper name
    trained = WanTransformer3DModel.from_pretrained(os.path.join(checkpoint, "transformer"))
    base = WanTransformer3DModel.from_pretrained(os.path.join(models[0], "transformer"))
    assert any(not torch.equal(a, b) for a, b in zip(trained.state_dict().values(), base.state_dict().values()))
    results = evaluate.main(config.parse_config(
        ["--tiny", "--model_path", models[0], "--reward_path", models[1], "--clip_path", models[2],
         "--output_dir", str(tmp_path / "eval"), "--num_steps", "2", "--checkpoints", checkpoint],
        cls=evaluate.EvalConfig))
    assert len(results) == 2  # base and the checkpoint
    with open(tmp_path / "eval" / "results.json") as f:
        saved = json.load(f)
    text = json.dumps(saved)
    assert '"num_frames": 9' in text and '"height": 32' in text  # the tiny Wan's own size, none given
