"""eval.py on random tiny models: a side-by-side table of deterministic ODE samples, and clear errors."""
import json
import os
import re

import pytest
import torch

import config
import distributed
import eval as evaluate

pytestmark = pytest.mark.slow  # the whole module: train.py / eval.py runs (README: Test)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Tiny HunyuanVideo-1.5, VideoAlign and CLIP in their real layouts, a 2-prompt file, and a
    'trained' checkpoint: the base transformer with perturbed weights in a checkpoint-N/transformer dir."""
    import tiny as builders
    from diffusers import HunyuanVideo15Transformer3DModel
    root = tmp_path_factory.mktemp("tiny_eval")
    paths = {"model_path": builders.build_tiny_hunyuan(str(root / "hunyuan")),
             "reward_path": builders.build_tiny_videoalign(str(root / "videoalign")),
             "clip_path": builders.build_tiny_clip(str(root / "clip"))}
    transformer = HunyuanVideo15Transformer3DModel.from_pretrained(os.path.join(paths["model_path"], "transformer"))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in transformer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    transformer.save_pretrained(str(root / "run" / "checkpoint-000007" / "transformer"))
    distributed.write_manifest(str(root / "run" / "checkpoint-000007"))  # complete, as train.py writes it
    (root / "prompts.txt").write_text("a red car drives through rain\na cat jumps onto a sofa\n")
    return root, paths


def eval_args(tiny, output_dir, checkpoints):
    root, paths = tiny
    args = ["--tiny", "--prompts", str(root / "prompts.txt"), "--output_dir", str(output_dir), "--num_steps", "2"]
    for key, value in paths.items():
        args += [f"--{key}", value]
    return args + ["--checkpoints"] + checkpoints


def test_eval_writes_a_side_by_side_table_of_deterministic_scores(tiny, tmp_path):
    root, paths = tiny
    checkpoints = [str(root / "run" / "checkpoint-000007"), os.path.join(paths["model_path"], "transformer")]
    results = evaluate.main(config.parse_config(eval_args(tiny, tmp_path, checkpoints), cls=evaluate.EvalConfig))

    assert [r["name"] for r in results] == ["base", "checkpoint-000007", "hunyuan"]
    with open(tmp_path / "results.json") as f:
        assert json.load(f)["models"] == results
    for r in results:
        assert len(r["samples"]) == 2 and r["num_failed"] == 0
        for s in r["samples"]:
            assert all(torch.isfinite(torch.tensor(s[k])) for k in ("vq", "mq", "ta", "clip_score", "pick_score"))
            assert s["overall"] == pytest.approx(s["vq"] + s["mq"] + s["ta"])  # the paper's unweighted sum
            assert os.path.isfile(tmp_path / s["video"])
    base, trained, base_again = results
    # ODE sampling from fixed seeds: the same weights give the same videos and scores, bit for bit ...
    assert [s["vq"] for s in base_again["samples"]] == [s["vq"] for s in base["samples"]]
    # ... and different weights give different ones
    assert [s["vq"] for s in trained["samples"]] != [s["vq"] for s in base["samples"]]
    table = (tmp_path / "results.md").read_text().splitlines()
    assert "| model | evaluated | VQ | MQ | TA | VideoAlign overall | CLIPScore | PickScore |" in table
    assert sum(line.startswith("| checkpoint-000007 |") for line in table) == 1


def test_the_vae_tiling_and_precision_flags_reach_the_vae_that_decodes_the_samples(tiny, tmp_path, monkeypatch):
    import model
    seen, decode = [], model.decode_latents
    def recording_decode(vae, latents):
        seen.append((vae.use_tiling, torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.float16))
        return decode(vae, latents)
    monkeypatch.setattr(model, "decode_latents", recording_decode)
    evaluate.main(config.parse_config(eval_args(tiny, tmp_path, []) + ["--vae_tiling", "--vae_precision", "fp16"],
                                      cls=evaluate.EvalConfig))
    assert seen == [(True, True)]  # one batch of 2 prompts, one model; decoded under autocast to float16
    with open(tmp_path / "results.json") as f:
        saved = json.load(f)["config"]
    assert saved["vae_tiling"] is True and saved["vae_precision"] == "fp16"


def test_eval_rejects_a_checkpoint_in_the_wrong_layout(tiny, tmp_path):
    (tmp_path / "not_a_checkpoint").mkdir()
    (tmp_path / "not_a_checkpoint" / "weights.pt").write_bytes(b"")
    args = eval_args(tiny, tmp_path, [str(tmp_path / "not_a_checkpoint")])
    with pytest.raises(ValueError, match=r"expected a diffusers transformer directory .* found \['weights.pt'\]"):
        evaluate.main(config.parse_config(args, cls=evaluate.EvalConfig))
    with pytest.raises(ValueError, match="no such directory"):
        evaluate.transformer_dir(str(tmp_path / "missing"))


def test_eval_without_tiny_needs_a_directory_or_a_cached_hub_id(tmp_path):
    (tmp_path / "p.txt").write_text("a cat\n")
    cfg = evaluate.EvalConfig(model_path=str(tmp_path / "nope"), prompts=str(tmp_path / "p.txt"))
    with pytest.raises(ValueError, match=r"--model_path .* is not a directory \(expected a local directory, or a "
                                         r"Hugging Face hub id.*, or use --tiny"):
        evaluate.main(cfg)


def test_eval_uses_the_checkpoints_sampling_settings_and_every_size_flag_given(tiny, tmp_path, monkeypatch):
    """--tiny changes only the defaults: no silent cap on the steps, explicit sizes kept, shift / CFG
    from the base checkpoint unless given."""
    import model
    import tiny as builders
    root, paths = tiny
    base = builders.build_tiny_hunyuan(str(tmp_path / "shift3"), shift=3.0, guidance_scale=4.0)
    calls = []
    rollout = model.rollout

    def recording(transformer, embeds, seeds, latent_shape, sigmas, **kwargs):
        calls.append((torch.as_tensor(sigmas).clone(), kwargs["guidance_scale"], tuple(latent_shape)))
        return rollout(transformer, embeds, seeds, latent_shape, sigmas, **kwargs)
    monkeypatch.setattr(model, "rollout", recording)
    args = eval_args(tiny, tmp_path / "out", []) + ["--model_path", base, "--num_steps", "6", "--num_frames", "9"]
    evaluate.main(config.parse_config(args, cls=evaluate.EvalConfig))
    sigmas, guidance_scale, latent_shape = calls[0]
    assert len(sigmas) == 7  # 6 steps, as asked (--tiny used to cap them at 4)
    expected = 3.0 * torch.linspace(1, 0, 7) / (1 + 2.0 * torch.linspace(1, 0, 7))  # shift 3, by hand
    assert torch.allclose(sigmas.float(), expected) and guidance_scale == 4.0
    assert latent_shape == (4, 5, 4, 4)  # 9 frames -> (9 - 1)/2 + 1 = 5 latent frames (tiny VAE: 2x temporal)
    with open(tmp_path / "out" / "results.json") as f:
        saved = json.load(f)["config"]
    assert (saved["num_steps"], saved["num_frames"], saved["shift"], saved["cfg_scale"]) == (6, 9, 3.0, 4.0)


def test_eval_keeps_the_scores_of_models_already_evaluated_when_a_later_checkpoint_fails(tiny, tmp_path):
    root, paths = tiny
    broken = tmp_path / "broken" / "transformer"
    broken.mkdir(parents=True)
    (broken / "config.json").write_text((root / "run" / "checkpoint-000007" / "transformer" / "config.json").read_text())
    (broken / "diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(Exception):
        evaluate.main(config.parse_config(eval_args(tiny, tmp_path / "out", [str(broken.parent)]), cls=evaluate.EvalConfig))
    with open(tmp_path / "out" / "results.json") as f:
        models = json.load(f)["models"]
    assert [m["name"] for m in models] == ["base"] and len(models[0]["samples"]) == 2  # the base scores survive
    assert "| base |" in (tmp_path / "out" / "results.md").read_text()


@pytest.mark.parametrize("flag, value, message", [("--videos_per_prompt", "0", r"--videos_per_prompt must be >= 1, got 0"),
                                                  ("--batch_size", "0", r"--batch_size must be >= 1, got 0"),
                                                  ("--cfg_scale", "nan", r"--cfg_scale must be a finite number > 0")])
def test_eval_refuses_counts_below_one_before_any_model(flag, value, message, tiny, tmp_path):
    with pytest.raises(ValueError, match=message):
        evaluate.main(config.parse_config(eval_args(tiny, tmp_path, []) + [flag, value], cls=evaluate.EvalConfig))


# ------------------------------------------------------------------------------------------------
# The checkpoints are checked as --resume checks them, before any model is loaded.

def manifested_checkpoint(tiny, directory):
    """A train.py-style checkpoint: the trained transformer/ and a manifest.json of its files."""
    import shutil

    import distributed
    root, _ = tiny
    shutil.copytree(root / "run" / "checkpoint-000007" / "transformer", directory / "transformer")
    distributed.write_manifest(str(directory))
    return directory


@pytest.mark.parametrize("how, reason", [
    ("truncated", r"diffusion_pytorch_model.safetensors has \d+ bytes, the manifest says \d+"),
    ("bytes changed", r"diffusion_pytorch_model.safetensors: SHA-256 differs from the manifest"),
])
def test_eval_refuses_a_checkpoint_that_does_not_match_its_manifest_before_any_model(how, reason, tiny, tmp_path,
                                                                                     monkeypatch):
    import model
    monkeypatch.setattr(model, "load_hunyuan", lambda *a, **k: pytest.fail("reached the models"))
    checkpoint = manifested_checkpoint(tiny, tmp_path / "run" / "checkpoint-000008")
    weights = checkpoint / "transformer" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    weights.write_bytes(bytes(data[:len(data) // 2]) if how == "truncated" else
                        bytes(data[:len(data) // 2]) + b"\x7f" * 8 + bytes(data[len(data) // 2 + 8:]))
    args = eval_args(tiny, tmp_path / "out", [str(checkpoint)])
    with pytest.raises(evaluate.EvalError, match=r"1 checkpoint\(s\) do not match their manifest, nothing was "
                                                 r"evaluated: .*checkpoint-000008/transformer/" + reason):
        evaluate.main(config.parse_config(args, cls=evaluate.EvalConfig))
    assert not (tmp_path / "out" / "results.json").exists()


def test_eval_skips_unfinished_checkpoint_writes_and_says_so(tiny, tmp_path, capsys):
    unfinished = manifested_checkpoint(tiny, tmp_path / "run" / "checkpoint-000009.tmp")  # killed before its rename
    no_manifest = manifested_checkpoint(tiny, tmp_path / "run" / "checkpoint-000010")
    os.remove(no_manifest / "manifest.json")                                           # killed before its manifest
    sound = manifested_checkpoint(tiny, tmp_path / "run" / "checkpoint-000011")
    results = evaluate.main(config.parse_config(eval_args(tiny, tmp_path / "out", [str(unfinished), str(no_manifest),
                                                                                   str(sound)]), cls=evaluate.EvalConfig))
    out = capsys.readouterr().out
    assert f"eval: skipping {unfinished}: an unfinished checkpoint write (.tmp" in out
    assert f"eval: skipping {no_manifest}: no manifest.json, the checkpoint was never completed" in out
    assert [r["name"] for r in results] == ["base", "checkpoint-000011"]


def test_eval_errors_are_one_line_with_a_nonzero_status_and_no_traceback(tiny, tmp_path):
    import subprocess
    import sys
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    checkpoint = manifested_checkpoint(tiny, tmp_path / "run" / "checkpoint-000008")
    (checkpoint / "transformer" / "config.json").write_text("{}")                  # changed after the manifest
    for given, status, message in ((str(checkpoint), 1, "config.json has 2 bytes, the manifest says"),
                                   (str(tmp_path / "missing"), 2, "nothing (no such directory)")):
        done = subprocess.run([sys.executable, "eval.py"] + eval_args(tiny, tmp_path / "out", [given]), cwd=repo,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == status, done.stderr[-3000:]
        assert done.stderr.startswith("eval.py: error: ") and message in done.stderr, done.stderr[-3000:]
        assert "Traceback" not in done.stderr and done.stderr.count("\n") == 1


def test_eval_of_a_world_checkpoint_scores_with_the_worlds_reward(tmp_path):
    from diffusers import HunyuanVideo15Transformer3DModel

    from world import video_world, pretrain as world_pretrain
    transformer = HunyuanVideo15Transformer3DModel.from_pretrained(os.path.join(world_pretrain.prepare_world(),
                                                                                "transformer"))
    with torch.no_grad():
        for p in transformer.parameters():
            p.mul_(0.5)                                                  # a different policy than the pretrained one
    transformer.save_pretrained(str(tmp_path / "run" / "checkpoint-000003" / "transformer"))
    distributed.write_manifest(str(tmp_path / "run" / "checkpoint-000003"))
    cfg = evaluate.EvalConfig(world=True, num_steps=2, checkpoints=[str(tmp_path / "run" / "checkpoint-000003")],
                              output_dir=str(tmp_path / "out"))
    base, trained = evaluate.main(cfg)
    assert len(base["samples"]) == len(video_world.WORLD_PROMPTS)       # the world's own prompts
    world_reward = video_world.WorldReward()
    for result in (base, trained):
        for s in result["samples"]:
            # the reward is the weighted sum of its components, as the world defines it
            assert s["reward"] == pytest.approx(sum(world_reward.weights[c] * s[c] for c in world_reward.components),
                                                rel=1e-6)
            assert all(torch.isfinite(torch.tensor(s[k])) for k in evaluate.WORLD_COLUMNS)
    assert [s["reward"] for s in base["samples"]] != [s["reward"] for s in trained["samples"]]
    assert "| model | evaluated | world reward | alignment |" in (tmp_path / "out" / "results.md").read_text()


def test_a_second_evaluation_into_the_same_directory_is_refused(tiny, tmp_path):
    import distributed
    held = distributed.lock_run_directory(str(tmp_path))
    try:
        with pytest.raises(distributed.DirectoryLocked, match=r"is in use by another evaluation"):
            evaluate.main(config.parse_config(eval_args(tiny, tmp_path, []), cls=evaluate.EvalConfig))
    finally:
        held.close()


def test_a_second_evaluation_adds_its_rows_quietly_and_a_model_evaluated_again_gets_a_dated_row(tiny, tmp_path):
    """eval.py into a directory with results: the earlier rows stay, the new ones are added (the base, scored first by
    every evaluation, gets a second dated row and its own videos); other settings are refused before any model.
    The first run, a subprocess, is also as quiet as train.py: no library progress bars or warnings."""
    import subprocess
    import sys
    root, _ = tiny
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "eval.py"] + eval_args(tiny, out, []), cwd=repo, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for noise in ("Guiders are currently an experimental feature", "Loading", "it/s]"):
        assert noise not in done.stdout + done.stderr, f"{noise!r} printed: {done.stderr[-2000:]}"
    first = json.loads((out / "results.json").read_text())["models"]

    results = evaluate.main(config.parse_config(eval_args(tiny, out, [str(root / "run" / "checkpoint-000007")]),
                                               cls=evaluate.EvalConfig))
    assert [r["name"] for r in results] == ["base", "base", "checkpoint-000007"]
    assert results[0] == first[0]                                        # the earlier row, as it was
    assert [s["vq"] for s in results[1]["samples"]] == [s["vq"] for s in first[0]["samples"]]  # ODE: same scores
    assert results[1]["evaluated"] >= first[0]["evaluated"]
    folders = [{os.path.dirname(s["video"]) for s in r["samples"]} for r in results]
    assert folders == [{"videos/base"}, {"videos/base_2"}, {"videos/checkpoint-000007"}]
    assert all(os.path.isfile(out / s["video"]) for r in results for s in r["samples"])
    table = (out / "results.md").read_text().splitlines()
    assert [line.split(" | ")[0] for line in table if line.startswith("| ") and "---" not in line][1:] == \
        ["| base", "| base", "| checkpoint-000007"]

    before = (out / "results.json").read_bytes()
    with pytest.raises(ValueError, match=re.escape(f"{out / 'results.json'} holds the results of other settings "
                                                   f"(num_steps is 2 there, 3 here)")):
        evaluate.main(config.parse_config(eval_args(tiny, out, []) + ["--num_steps", "3"], cls=evaluate.EvalConfig))
    assert (out / "results.json").read_bytes() == before
