"""Wan2.1 through the entry points: train.py, its self-check and eval.py on a tiny random Wan (CPU, one process).

`--tiny --model_path <a tiny Wan>` runs the same code as a real Wan2.1 run: the family is read from the
checkpoint's model_index.json, nothing else is told. The checkpoint's transformer must load with diffusers'
WanTransformer3DModel, and eval.py must score it beside the base model.
"""
import json
import os

import pytest
import torch

import config
import eval as evaluate
import tiny
import train

pytestmark = pytest.mark.slow  # train.py / eval.py runs (README: Test)

SIZE = ["--num_frames", str(tiny.TINY_WAN_NUM_FRAMES), "--height", str(tiny.TINY_WAN_HEIGHT),
        "--width", str(tiny.TINY_WAN_WIDTH)]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("wan_models")
    return (tiny.build_tiny_wan(str(root / "wan")), tiny.build_tiny_videoalign(str(root / "videoalign")),
            tiny.build_tiny_clip(str(root / "clip")))


def test_train_self_check_and_eval_run_on_a_tiny_wan(models, tmp_path):
    from diffusers import WanTransformer3DModel
    wan_path, reward_path, clip_path = models
    flags = ["--tiny", "--model_path", wan_path, "--reward_path", reward_path, "--num_steps", "2", "--group_size", "2",
             "--videos_per_rank", "2", "--lr", "1e-3", "--sample_every", "0", "--checkpoint_every", "1"] + SIZE
    train.main(config.parse_config(flags + ["--output_dir", str(tmp_path / "run"), "--max_iterations", "2"]))
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) == 2 and all(torch.isfinite(torch.tensor(row["reward_mean"])) for row in rows)
    checkpoint = tmp_path / "run" / "checkpoint-000002"
    with open(checkpoint / "transformer" / "config.json") as f:
        assert json.load(f)["_class_name"] == "WanTransformer3DModel"  # not FSDP2's wrapper name
    trained = WanTransformer3DModel.from_pretrained(str(checkpoint / "transformer"))
    base = WanTransformer3DModel.from_pretrained(os.path.join(wan_path, "transformer"))
    assert any(not torch.equal(a, b) for a, b in zip(trained.state_dict().values(), base.state_dict().values()))

    # the self-check: every line but the WARNs of a 2-step tiny run passes
    assert train.main(config.parse_config(flags + ["--output_dir", str(tmp_path / "check"), "--self_check"])) == 0

    results = evaluate.main(config.parse_config(
        ["--tiny", "--model_path", wan_path, "--reward_path", reward_path, "--clip_path", clip_path,
         "--output_dir", str(tmp_path / "eval"), "--num_steps", "2", "--checkpoints", str(checkpoint)] + SIZE,
        cls=evaluate.EvalConfig))
    assert len(results) == 2  # base and the checkpoint
