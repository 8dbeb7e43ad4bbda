"""The default video size is the checkpoint family's, the tiny families' their own, and --tiny_family picks one.

The sizes are typed here from their sources (the official HunyuanVideo-1.5 480p bucket of post_train.py; Wan2.1's
480p, 81 x 480 x 832; tiny.py's tiny sizes), not read from the code under test. A tiny family's default size must be
one its tiny VAE encodes to the latent the family's `latent_shape` predicts. Flag errors (a size off the shared
4k+1 / 16-pixel rule, a --tiny_family that does nothing or is unknown, an --sp_size that does not divide the tiny
heads) are one line, before any model is built.
"""
import pytest
import torch

import config
import model
import tiny
import train

HUNYUAN_480P = (81, 352, 624)  # post_train.py sample_n_frames 81, the 352x624 bucket
WAN_480P = (81, 480, 832)      # Wan2.1-T2V 480p (DESIGN: 480x832x81 -> 21x30x52 tokens)
TINY = {"hunyuan": (5, 16, 16), "wan": (9, 32, 32)}


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {"hunyuan": tiny.build_tiny_hunyuan(str(root / "hunyuan")), "wan": tiny.build_tiny_wan(str(root / "wan"))}


@pytest.mark.parametrize("family, real", [("hunyuan", HUNYUAN_480P), ("wan", WAN_480P)])
def test_the_default_size_is_the_checkpoint_familys_and_the_tiny_familys_with_tiny(family, real, family_dirs):
    path = family_dirs[family]
    assert config.default_video_size(path) == real                       # a real run on this family's checkpoint
    assert config.default_video_size(path, tiny=True) == TINY[family]   # --tiny --model_path <a tiny one>
    assert config.default_video_size("", tiny=True, tiny_family=family) == TINY[family]  # --tiny --tiny_family
    assert config.video_size(None, 64, None, default=real) == (real[0], 64, real[2])   # a flag given wins


@pytest.mark.parametrize("family", ["hunyuan", "wan"])
def test_each_tiny_familys_default_size_is_one_its_tiny_vae_encodes_to_the_predicted_latent(family, family_dirs):
    pipe = model.load_policy_family(family_dirs[family], dtype=torch.float32, load_transformer=False)
    frames, height, width = TINY[family]
    video = torch.rand(1, 3, frames, height, width) * 2 - 1  # (B, C, F, H, W) in [-1, 1]
    with torch.no_grad():
        latent = pipe.vae.encode(video).latent_dist.mean
    assert tuple(latent.shape[1:]) == pipe.latent_shape(frames, height, width)


@pytest.mark.parametrize("family", ["hunyuan", "wan"])
def test_check_config_fills_the_tiny_familys_size_and_keeps_the_ones_given(family, tmp_path):
    flags = ["--tiny", "--tiny_family", family, "--output_dir", str(tmp_path), "--group_size", "2"]
    cfg, _ = config.check_config(config.parse_config(flags), world_size=1)
    assert (cfg.num_frames, cfg.height, cfg.width) == TINY[family]
    cfg, _ = config.check_config(config.parse_config(flags + ["--height", "48"]), world_size=1)
    assert (cfg.num_frames, cfg.height, cfg.width) == (TINY[family][0], 48, TINY[family][2])


@pytest.mark.parametrize("flags, message", [
    (["--num_frames", "8"], r"^video must be 4k\+1 frames and a multiple of 16 pixels .*Wan2.1 VAE 8x x patch 2\), "
                            r"got --num_frames 8$"),
    (["--height", "40", "--width", "24"], r"got --height 40, --width 24$"),
    (["--tiny_family", "ltx"], r"^unknown --tiny_family 'ltx': expected one of \['hunyuan', 'wan'\]$"),
])
def test_a_size_off_the_rule_or_an_unknown_tiny_family_is_one_flag_error(flags, message):
    with pytest.raises(config.ConfigError, match=message):
        config.check_flags(config.parse_config(["--tiny"] + flags), world_size=1)


def test_a_tiny_family_without_tiny_or_beside_a_model_path_is_an_error(tmp_path):
    for flags in (["--tiny_family", "wan"], ["--tiny", "--model_path", str(tmp_path), "--tiny_family", "wan"]):
        with pytest.raises(config.ConfigError, match=r"--tiny_family wan has no effect without --tiny and an empty "
                                                     r"--model_path"):
            config.check_flags(config.parse_config(flags), world_size=1)


@pytest.mark.parametrize("family", ["hunyuan", "wan"])
def test_an_sp_size_that_does_not_divide_the_tiny_heads_is_refused_before_any_model(family, tmp_path, monkeypatch):
    monkeypatch.setattr(train.distributed, "setup", lambda *a, **k: pytest.fail("reached the process group"))
    heads = tiny.TINY_TRANSFORMER_CONFIGS[family]["num_attention_heads"]  # 2 in both tiny transformers
    flags = ["--tiny", "--tiny_family", family, "--output_dir", str(tmp_path), "--group_size", "2",
             "--videos_per_rank", "2", "--sp_size", str(2 * heads)]
    with pytest.raises(config.ConfigError, match=rf"^--tiny --tiny_family {family}: --sp_size must divide .*{heads}.*"
                                                 rf"found {2 * heads}$"):
        config.check_config(config.parse_config(flags), world_size=2 * heads)
