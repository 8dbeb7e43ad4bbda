"""reward.mp4_round_trip: the official reward input (8-bit H.264 mp4, libx264 crf 25, yuv420p, 24 fps)."""
import math

import pytest
import torch

import reward
import tiny


def smooth_video(num_frames=17, height=96, width=96):
    """A natural-ish test video: one slow colour wave across the frame, drifting in time.  (F, 3, H, W)"""
    t = torch.arange(num_frames, dtype=torch.float32).view(-1, 1, 1, 1)
    y = torch.linspace(0, 1, height).view(1, 1, -1, 1)
    x = torch.linspace(0, 1, width).view(1, 1, 1, -1)
    channel = torch.arange(3, dtype=torch.float32).view(1, 3, 1, 1)
    wave = torch.sin(2 * math.pi * (x + 0.6 * y + 0.04 * t + channel / 3)) * torch.cos(2 * math.pi * (0.5 * y - 0.02 * t))
    return (0.5 + 0.35 * wave).clamp(0, 1)


def psnr(a, b):
    # PSNR = 10·log10(peak² / MSE), peak 1 for frames in [0, 1]
    return 10 * math.log10(1.0 / (a.double() - b.double()).pow(2).mean().item())


def test_round_trip_keeps_shape_range_and_dtype():
    video = smooth_video()
    out = reward.mp4_round_trip(video)
    assert out.shape == video.shape and out.dtype == torch.float32
    assert 0 <= out.min() and out.max() <= 1
    # values are 8-bit levels
    torch.testing.assert_close(out * 255, (out * 255).round(), rtol=0, atol=1e-4)


def test_smooth_video_comes_back_at_high_thirties_psnr_not_exactly():
    video = smooth_video()
    value = psnr(reward.mp4_round_trip(video), video)
    # measured 37.1 dB; crf 20 gives 38.4, crf 30 gives 34.9, lossless H.264 (crf 0) 40.2 (4:2:0 chroma)
    assert 36 < value < 38.3, value
    # most of the loss is H.264 and 4:2:0, not the 8-bit rounding alone (≈ 59 dB)
    assert value < psnr((video * 255).round() / 255, video) - 10


def test_a_higher_crf_loses_more():
    video = smooth_video(num_frames=9)
    values = [psnr(reward.mp4_round_trip(video, crf=crf), video) for crf in (15, 25, 35)]
    assert values[0] > values[1] > values[2], values


def test_constant_colour_video_is_nearly_exact():
    video = torch.empty(9, 3, 32, 48)
    video[:] = torch.tensor([0.25, 0.5, 0.75]).view(1, 3, 1, 1)
    out = reward.mp4_round_trip(video)
    assert (out - video).abs().max() <= 3 / 255   # RGB -> limited-range YUV -> RGB rounding only


def test_round_trip_is_deterministic():
    video = smooth_video(num_frames=5)
    assert torch.equal(reward.mp4_round_trip(video), reward.mp4_round_trip(video))


def test_odd_frame_sizes_raise_a_clear_error():
    with pytest.raises(ValueError, match="even frame sizes, got H x W = 33 x 48"):
        reward.mp4_round_trip(torch.rand(3, 3, 33, 48))
    with pytest.raises(ValueError, match=r"expected frames \(F, 3, H, W\)"):
        reward.mp4_round_trip(torch.rand(3, 4, 32, 48))


def test_tiny_videoalign_scores_change_after_the_round_trip(tmp_path):
    path = tiny.build_tiny_videoalign(str(tmp_path / "videoalign"), "full")
    model = reward.VideoAlignReward.from_pretrained(path)
    video = smooth_video(num_frames=9, height=56, width=56)
    raw = model([video], ["a slow colour wave"])
    compressed = model([reward.mp4_round_trip(video)], ["a slow colour wave"])
    assert torch.isfinite(compressed["reward"]).all()
    assert (compressed["reward"] - raw["reward"]).abs().item() > 1e-6
    # and the same frames score the same: the change comes from the round trip
    torch.testing.assert_close(model([video], ["a slow colour wave"])["reward"], raw["reward"])
