"""reward.py against independent computations: hand-merged LoRA weights, the transformers Qwen2-VL
forward and image processor, the official frame-count / resize rules, and CLIPModel's own logits.

Every model is a tiny random one written in the official on-disk layout and loaded through the same
`from_pretrained` a user calls with the real checkpoint; nothing is downloaded.
"""
import json
import logging
import math
import os
import shutil

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file
from transformers import Qwen2VLConfig, Qwen2VLModel

import reward
import tiny
import videoalign_checkpoint

PROMPTS = ["a red fox runs through snow", "two cats", "a city at night, rain"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models are dominated by threading overhead on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("videoalign")
    return {"full": tiny.build_tiny_videoalign(str(root / "full"), "full"),
            "adapter": tiny.build_tiny_videoalign(str(root / "adapter"), "adapter"),
            "full_1out": tiny.build_tiny_videoalign(str(root / "full_1out"), "full", output_dim=1, seed=1)}


@pytest.fixture(scope="module")
def models(checkpoints):
    return {name: reward.VideoAlignReward.from_pretrained(path) for name, path in checkpoints.items()}


def videos(seed=0):
    """Three videos of different lengths and sizes (sides multiples of 28, inside the tiny pixel range),
    values on the uint8 grid so that an image processor working on uint8 sees exactly the same pixels."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(9, 3, 56, 84), (6, 3, 84, 56), (12, 3, 56, 56)]
    return [(torch.rand(shape, generator=g) * 255).round() / 255 for shape in shapes]


# ----------------------------------------------------------------------------------------------
# Independent reference: the merged weights computed by hand from the raw files.

def legacy_to_v5(key):
    """transformers 4.45 Qwen2-VL names -> 5.x names, written out by hand."""
    if key.startswith("visual."):
        return "model.visual." + key[len("visual."):]
    if key.startswith("model."):
        return "model.language_model." + key[len("model."):]
    return key


def hand_merged_weights(path):
    """{name: tensor} of the reward model (Qwen2VLModel keys without 'model.', plus rm_head.weight)."""
    cfg = json.load(open(os.path.join(path, "model_config.json")))
    lora = cfg["peft_lora_config"]
    scale = lora["lora_alpha"] / lora["lora_r"]
    ckpt = os.path.join(path, "checkpoint-12")
    if os.path.exists(os.path.join(ckpt, "model.pth")):
        raw = torch.load(os.path.join(ckpt, "model.pth"), weights_only=True)
        raw = {k.removeprefix("base_model.model."): v for k, v in raw.items()}
        plain = {}
        for k, v in raw.items():
            if "lora_" in k or "original_module" in k or k.startswith("lm_head"):
                continue
            plain[k.replace(".base_layer", "").replace(".modules_to_save.default", "")] = v
        lora_a = {k.split(".lora_")[0]: v for k, v in raw.items() if ".lora_A." in k or ".lora_embedding_A" in k}
        lora_b = {k.split(".lora_")[0]: v for k, v in raw.items() if ".lora_B." in k or ".lora_embedding_B" in k}
        plain = {legacy_to_v5(k): v for k, v in plain.items()}
        lora_a = {legacy_to_v5(k): v for k, v in lora_a.items()}
        lora_b = {legacy_to_v5(k): v for k, v in lora_b.items()}
    else:
        base_dir = os.path.join(path, cfg["model_config"]["model_name_or_path"])
        # transformers 5 saves Qwen2-VL in the legacy layout (as the hub checkpoint is)
        plain = {legacy_to_v5(k): v for k, v in load_file(os.path.join(base_dir, "model.safetensors")).items()
                 if not k.startswith("lm_head")}
        non_lora = torch.load(os.path.join(ckpt, "non_lora_state_dict.pth"), weights_only=True)
        for k, v in non_lora.items():
            k = k.removeprefix("base_model.model.").replace(".base_layer", "").replace(".modules_to_save.default", "")
            plain[legacy_to_v5(k)] = v
        adapter = load_file(os.path.join(ckpt, "adapter_model.safetensors"))
        adapter = {legacy_to_v5(k.removeprefix("base_model.model.")): v for k, v in adapter.items()}
        lora_a = {k.split(".lora_")[0]: v for k, v in adapter.items() if "lora_A" in k or "lora_embedding_A" in k}
        lora_b = {k.split(".lora_")[0]: v for k, v in adapter.items() if "lora_B" in k or "lora_embedding_B" in k}
    assert lora_a and lora_a.keys() == lora_b.keys()
    merged = dict(plain)
    for module, a in lora_a.items():
        b = lora_b[module]
        w = merged[module + ".weight"]
        delta = scale * (b @ a)
        merged[module + ".weight"] = w + (delta.T if "embed_tokens" in module else delta)
    return {k.removeprefix("model."): v for k, v in merged.items()}, scale


@pytest.mark.parametrize("layout", ["full", "adapter"])
def test_loaded_weights_equal_hand_merged_lora(checkpoints, models, layout):
    expected, scale = hand_merged_weights(checkpoints[layout])
    loaded = {k.removeprefix("model."): v for k, v in models[layout].state_dict().items()}
    assert scale == 3.0
    assert loaded.keys() == expected.keys()
    diff = max((loaded[k] - expected[k]).abs().max().item() for k in expected)
    assert diff < 1e-6, diff
    # the LoRA deltas are real: without them the q_proj weight would be visibly different
    key = "language_model.layers.0.self_attn.q_proj.weight"
    raw_delta = (expected[key] - hand_unmerged(checkpoints[layout], key)).abs().max().item()
    assert raw_delta > 1e-2


def hand_unmerged(path, key):
    """The base (pre-LoRA) weight of `key` straight from the files."""
    ckpt = os.path.join(path, "checkpoint-12", "model.pth")
    if os.path.exists(ckpt):
        legacy = "base_model.model.model." + key[len("language_model."):].replace(".weight", ".base_layer.weight")
        return torch.load(ckpt, weights_only=True)[legacy]
    base_dir = os.path.join(path, tiny.TINY_BASE_DIR)
    return load_file(os.path.join(base_dir, "model.safetensors"))["model." + key[len("language_model."):]]


# ----------------------------------------------------------------------------------------------
# Independent reference: transformers' own Qwen2-VL forward on transformers' own preprocessing.

def processor_pixel_values(frames):
    """Video patches from transformers' Qwen2-VL image processor, frame by frame: each image patch row
    is (C, 2, p, p) with two equal time slices; a video patch row takes slice 0 of frames 2i and 2i+1."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    processor = Qwen2VLImageProcessorPil()
    images = [(f.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy() for f in frames]
    out = processor(images=images, return_tensors="pt")
    n, (_, h, w) = out["image_grid_thw"].shape[0], out["image_grid_thw"][0].tolist()
    per_frame = out["pixel_values"].reshape(n, h * w, 3, 2, 14, 14)[:, :, :, 0]  # (T, N, C, p, p)
    pairs = torch.stack([per_frame[0::2], per_frame[1::2]], dim=3)  # (T/2, N, C, 2, p, p)
    return pairs.reshape(-1, 3 * 2 * 14 * 14), torch.tensor([n // 2, h, w])


def reference_scores(path, frame_lists, prompts, weights=reward.DEFAULT_WEIGHTS, sequential_positions=True):
    """Scores by hand: merged weights in a fresh Qwen2VLModel, transformers' forward, the official formulas.
    sequential_positions=False lets transformers compute Qwen2-VL's 3-D M-RoPE video positions instead."""
    cfg = json.load(open(os.path.join(path, "model_config.json")))
    state, _ = hand_merged_weights(path)
    head = state.pop("rm_head.weight")
    base_dir = os.path.join(path, cfg["model_config"]["model_name_or_path"])
    config = Qwen2VLConfig.from_pretrained(base_dir)
    config.text_config.vocab_size = state["language_model.embed_tokens.weight"].shape[0]
    model = Qwen2VLModel(config).eval()
    model.load_state_dict(state)
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|VQ_reward|>", "<|MQ_reward|>", "<|TA_reward|>"]})
    stats = cfg["inference_config"]
    results = []
    for frames, prompt in zip(frame_lists, prompts):
        pixel_values, grid = processor_pixel_values(frames)
        n_tokens = int(grid.prod()) // 4
        text = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|>"
                + "<|video_pad|>" * n_tokens + "<|vision_end|>"
                + reward.DETAILED_SPECIAL_TEMPLATE.replace("{text_prompt}", prompt)
                + "<|im_end|>\n<|im_start|>assistant\n")
        ids = torch.tensor([tokenizer(text)["input_ids"]])
        positions = torch.arange(ids.shape[1]).view(1, 1, -1).expand(3, 1, -1)  # sequential, as VideoAlign trained
        positions = positions if sequential_positions else None
        with torch.no_grad():
            hidden = model(input_ids=ids, attention_mask=torch.ones_like(ids), position_ids=positions,
                           pixel_values_videos=pixel_values, video_grid_thw=grid[None],
                           mm_token_type_ids=2 * (ids == config.video_token_id).int()  # 2 = video (for M-RoPE)
                           ).last_hidden_state[0]
        scores = {}
        for k, (token, dim) in enumerate(zip(["<|VQ_reward|>", "<|MQ_reward|>", "<|TA_reward|>"], ["VQ", "MQ", "TA"])):
            h = hidden[(ids[0] == tokenizer.convert_tokens_to_ids(token)).nonzero()[0, 0]]
            row = head[k] if head.shape[0] == 3 else head[0]
            scores[dim.lower()] = ((row @ h).item() - stats[f"{dim}_mean"]) / stats[f"{dim}_std"]
        scores["reward"] = weights[0] * scores["vq"] + weights[1] * scores["mq"] + weights[2] * scores["ta"]
        results.append(scores)
    return {k: torch.tensor([r[k] for r in results]) for k in ("vq", "mq", "ta", "reward")}


@pytest.mark.parametrize("layout", ["full", "adapter", "full_1out"])
def test_scores_match_transformers_forward_on_merged_weights(checkpoints, models, layout):
    # 4 frames at fps = 2: the sampling keeps all four, so the processor sees the same frames
    frame_lists = [v[:4] for v in videos()]
    got = models[layout](frame_lists, PROMPTS, fps=2.0)
    expected = reference_scores(checkpoints[layout], frame_lists, PROMPTS)
    for key in ("vq", "mq", "ta", "reward"):
        torch.testing.assert_close(got[key], expected[key], atol=2e-5, rtol=0)
    assert got["vq"].std() > 1e-3  # the videos are told apart, so a mix-up could not pass


def test_positions_are_sequential_not_mrope(checkpoints, models):
    """VideoAlign's reward forward (transformers 4.45) gave every token position 0, 1, 2, …; Qwen2-VL's own
    3-D video positions would change the scores, so the choice is visible and we follow the training one."""
    frame_lists = [v[:4] for v in videos()][:2]
    got = models["full"](frame_lists, PROMPTS[:2], fps=2.0)
    mrope = reference_scores(checkpoints["full"], frame_lists, PROMPTS[:2], sequential_positions=False)
    assert (got["reward"] - mrope["reward"]).abs().max() > 1e-3


def test_full_and_adapter_layouts_give_the_same_scores(models):
    frames = videos()
    full, adapter = models["full"](frames, PROMPTS), models["adapter"](frames, PROMPTS)
    for key in full:
        torch.testing.assert_close(full[key], adapter[key], atol=1e-5, rtol=0)


def test_custom_weights_make_the_weighted_sum(checkpoints):
    model = reward.VideoAlignReward.from_pretrained(checkpoints["full"], weights=(1.0, -2.0, 3.0))
    out = model(videos()[:2], PROMPTS[:2])
    torch.testing.assert_close(out["reward"], out["vq"] - 2 * out["mq"] + 3 * out["ta"])


# ----------------------------------------------------------------------------------------------
# Preprocessing.

def test_preprocessing_matches_transformers_qwen2vl_processor(models):
    frames = (torch.rand(4, 3, 56, 84) * 255).round() / 255  # uint8-exact, so the processor sees the same pixels
    pixel_values, grid = models["full"].preprocess(frames, fps=2.0)  # fps 2 -> all 4 frames kept
    expected, expected_grid = processor_pixel_values(frames)
    assert grid.tolist() == expected_grid.tolist() == [2, 4, 6]
    torch.testing.assert_close(pixel_values, expected, atol=1e-5, rtol=0)


def test_odd_frame_count_repeats_the_last_frame():
    frames = torch.rand(3, 3, 28, 28)
    pixel_values, grid = reward.patchify(frames)
    repeated, _ = reward.patchify(torch.cat([frames, frames[-1:]]))
    assert grid.tolist() == [2, 2, 2]
    torch.testing.assert_close(pixel_values, repeated)
    # row layout (C, t, p, p): the first patch of the first pair is frames 0 and 1, top-left 14×14
    torch.testing.assert_close(pixel_values[0].view(3, 2, 14, 14), frames[:2, :, :14, :14].permute(1, 0, 2, 3))


@pytest.mark.parametrize("size, expected", [
    ((352, 624), (336, 588)),   # HunyuanVideo-1.5 480p rollouts: 219648 px > 448² -> shrink, floor to 28
    ((480, 848), (336, 588)),
    ((448, 448), (448, 448)),   # exactly at the limit: unchanged
    ((56, 84), (56, 84)),       # already on the grid and inside the range (with min 56²)
    ((16, 16), (56, 56)),       # below min_pixels 56² -> grow, ceil to 28
])
def test_frame_size_rule_hand_computed(size, expected):
    assert reward.frame_size(*size, min_pixels=56 * 56, max_pixels=448 * 448) == expected


def test_frame_size_rule_matches_transformers_smart_resize():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize
    for h in range(30, 1000, 37):
        for w in range(30, 1000, 53):
            assert reward.frame_size(h, w, 3136, 200704) == smart_resize(h, w, 28, 3136, 200704), (h, w)


def test_resize_is_bicubic_like_pil(models):
    from PIL import Image
    y, x = torch.meshgrid(torch.linspace(0, 1, 70), torch.linspace(0, 1, 100), indexing="ij")
    frame = torch.stack([x, y, (x + y) / 2])  # smooth, so interpolation kernels agree closely
    pixel_values, grid = models["full"].preprocess(frame[None].expand(4, -1, -1, -1), fps=2.0)
    assert grid.tolist() == [2, 4, 8]  # 70×100 -> 56×112 (sides rounded to 28, 6272 px within [56², 112²])
    image = Image.fromarray((frame.permute(1, 2, 0) * 255).round().byte().numpy()).resize((112, 56), Image.BICUBIC)
    pil = (torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255)
    mean, std = torch.tensor(reward.CLIP_MEAN).view(3, 1, 1), torch.tensor(reward.CLIP_STD).view(3, 1, 1)
    expected, _ = reward.patchify(((pil - mean) / std)[None].expand(4, -1, -1, -1))
    diff = (pixel_values - expected).abs().max()
    print("resize max abs diff (normalised units)", diff.item())
    assert diff < 0.03  # ≈ 2 uint8 levels: PIL rounds to uint8, we stay in float


@pytest.mark.parametrize("num_frames, fps, expected", [
    (81, 24, [0, 16, 32, 48, 64, 80]),         # 81/24·2 = 6.75 -> 6 (HunyuanVideo rollout)
    (121, 24, [0, 13, 27, 40, 53, 67, 80, 93, 107, 120]),  # 10.08 -> 10
    (33, 24, [0, 11, 21, 32]),                 # 2.75 -> at least 4
    (5, 24, [0, 1, 3, 4]),                     # 4 of 5
    (3, 24, [0, 2]),                           # max(4, ·) capped at ⌊3⌋₂ = 2
    (6, 2, [0, 1, 2, 3, 4, 5]),                # 2 fps source: every frame
    (9, 4, [0, 3, 5, 8]),                      # 4.5 -> round(2.25)·2 = 4
    (11, 4, [0, 2, 4, 6, 8, 10]),              # 5.5 -> round(2.75)·2 = 6
])
def test_frame_count_rule_hand_computed(num_frames, fps, expected):
    assert reward.sample_frame_indices(num_frames, fps) == expected


def test_frame_count_rule_caps_and_fixed_count():
    assert len(reward.sample_frame_indices(2000, 2)) == 768
    assert reward.sample_frame_indices(20, 24, target_frames=7) == torch.linspace(0, 19, 8).round().long().tolist()
    with pytest.raises(ValueError, match="at least 2 frames"):
        reward.sample_frame_indices(1, 24)


@given(st.integers(2, 3000), st.floats(1.0, 120.0))
def test_frame_count_is_even_spans_the_video_and_is_sorted(num_frames, fps):
    idx = reward.sample_frame_indices(num_frames, fps)
    assert len(idx) % 2 == 0 and 2 <= len(idx) <= min(num_frames, 768)
    assert idx[0] == 0 and idx[-1] == num_frames - 1 and idx == sorted(idx)


def test_template_is_the_official_detailed_special_text():
    t = reward.DETAILED_SPECIAL_TEMPLATE
    positions = [t.index(token) for token in reward.REWARD_TOKENS]
    assert positions == sorted(positions) and all(t.count(token) == 1 for token in reward.REWARD_TOKENS)
    assert t.count("{text_prompt}") == 1 and t.startswith("\nYou are tasked") and t.endswith("<|TA_reward|>\nEND\n")
    # Markdown line breaks of the trained prompt (editors must not strip them)
    for line in ("**Visual Quality:**  \n", "**Motion Quality:**  \n", "**Text Alignment:**  \n",
                 "acceptable.  \n", "lowest possible. \n"):
        assert line in t


def test_canonical_key_maps_peft_and_legacy_names():
    cases = {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight":
            "model.language_model.layers.0.self_attn.q_proj.lora_A.weight",
        "base_model.model.model.layers.0.mlp.up_proj.base_layer.weight":
            "model.language_model.layers.0.mlp.up_proj.base_layer.weight",
        "base_model.model.visual.blocks.1.attn.qkv.weight": "model.visual.blocks.1.attn.qkv.weight",
        "base_model.model.model.embed_tokens.lora_embedding_B": "model.language_model.embed_tokens.lora_embedding_B",
        "base_model.model.rm_head.modules_to_save.default.weight": "rm_head.weight",
        "base_model.model.rm_head.original_module.weight": None,
        "model.language_model.norm.weight": "model.language_model.norm.weight",
        "lm_head.weight": "lm_head.weight",
    }
    for key, expected in cases.items():
        assert videoalign_checkpoint.canonical_key(key) == expected, key


# ----------------------------------------------------------------------------------------------
# Batching, determinism, failures.

def test_batch_size_invariant_and_deterministic(models):
    model, frames = models["full"], videos(seed=3)
    batched = model(frames, PROMPTS)
    again = model(frames, PROMPTS)
    for key in batched:
        assert torch.equal(batched[key], again[key])
        alone = torch.cat([model([f], [p])[key] for f, p in zip(frames, PROMPTS)])
        torch.testing.assert_close(batched[key], alone, atol=1e-5, rtol=0)


def test_tensor_batch_equals_list(models):
    frames = torch.rand(2, 5, 3, 56, 56, generator=torch.Generator().manual_seed(5))
    as_tensor, as_list = models["full"](frames, PROMPTS[:2]), models["full"](list(frames), PROMPTS[:2])
    for key in as_tensor:
        torch.testing.assert_close(as_tensor[key], as_list[key], atol=1e-6, rtol=0)


def test_bad_videos_get_nan_and_the_others_are_unchanged(models, caplog):
    model, frames = models["full"], videos(seed=4)
    clean = model(frames, PROMPTS)
    bad = list(frames)
    bad[1] = bad[1].clone()
    bad[1][2, 0, 5, 5] = float("nan")
    with caplog.at_level(logging.WARNING, logger="reward"):
        out = model(bad, PROMPTS)
    assert "video 1 gets NaN" in caplog.text
    for key in out:
        assert torch.isnan(out[key][1]) and not torch.isnan(out[key][[0, 2]]).any()
        torch.testing.assert_close(out[key][[0, 2]], clean[key][[0, 2]], atol=1e-5, rtol=0)
    for broken in (torch.rand(5, 4, 56, 56), torch.rand(1, 3, 56, 56), torch.rand(3, 56, 56)):  # shape, 1 frame, 3-D
        out = model([frames[0], broken], PROMPTS[:2])
        assert torch.isnan(out["reward"][1]) and torch.isclose(out["reward"][0], clean["reward"][0], atol=1e-5)


def test_bfloat16_model_returns_float32_scores_close_to_float32(checkpoints, models):
    bf16 = reward.VideoAlignReward.from_pretrained(checkpoints["full"], dtype=torch.bfloat16)
    frames = videos(seed=6)
    low, full = bf16(frames, PROMPTS), models["full"](frames, PROMPTS)
    for key in full:
        assert low[key].dtype == torch.float32
        torch.testing.assert_close(low[key], full[key], atol=0.05, rtol=0)  # bf16 has ~3 significant digits


def test_mismatched_prompts_raise(models):
    with pytest.raises(ValueError, match="2 videos but 3 prompts"):
        models["full"](videos()[:2], PROMPTS)


# ----------------------------------------------------------------------------------------------
# Configuration errors name what was expected and what was found.

def copy_checkpoint(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def test_missing_files_raise_clear_errors(checkpoints, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"VideoAlign checkpoint '.*nowhere' is not a directory"):
        reward.VideoAlignReward.from_pretrained(str(tmp_path / "nowhere"))

    no_config = copy_checkpoint(checkpoints["full"], tmp_path / "a")
    os.remove(os.path.join(no_config, "model_config.json"))
    with pytest.raises(FileNotFoundError, match=r"model_config.json not found.*found \['checkpoint-12'"):
        reward.VideoAlignReward.from_pretrained(no_config)

    no_steps = copy_checkpoint(checkpoints["full"], tmp_path / "b")
    for step in ("checkpoint-12", "checkpoint-3"):
        shutil.rmtree(os.path.join(no_steps, step))
    with pytest.raises(FileNotFoundError, match=r"no checkpoint-<step>/ directory.*model_config.json"):
        reward.VideoAlignReward.from_pretrained(no_steps)

    no_weights = copy_checkpoint(checkpoints["adapter"], tmp_path / "c")
    os.remove(os.path.join(no_weights, "checkpoint-12", "non_lora_state_dict.pth"))
    with pytest.raises(FileNotFoundError, match=r"neither model.pth nor adapter_model.safetensors \+ "
                                                r"non_lora_state_dict.pth; found \['adapter_model.safetensors'\]"):
        reward.VideoAlignReward.from_pretrained(no_weights)

    with pytest.raises(FileNotFoundError, match=r"checkpoint-7 not in .*available steps: \[3, 12\]"):
        reward.VideoAlignReward.from_pretrained(checkpoints["full"], step=7)

    no_base = copy_checkpoint(checkpoints["full"], tmp_path / "d")
    shutil.rmtree(os.path.join(no_base, tiny.TINY_BASE_DIR))
    with pytest.raises(FileNotFoundError, match=r"base model 'tiny-Qwen2-VL'.*not found.*base_model_path="):
        reward.VideoAlignReward.from_pretrained(no_base)
    # a foreign absolute model_name_or_path is found by its basename inside the checkpoint directory
    foreign = copy_checkpoint(checkpoints["full"], tmp_path / "e")
    config_path = os.path.join(foreign, "model_config.json")
    cfg = json.load(open(config_path))
    cfg["model_config"]["model_name_or_path"] = "/authors/machine/" + tiny.TINY_BASE_DIR
    json.dump(cfg, open(config_path, "w"))
    assert reward.VideoAlignReward.from_pretrained(foreign).rm_head.weight.shape == (3, 32)
    # the same checkpoint loads when the base directory is given explicitly
    model = reward.VideoAlignReward.from_pretrained(no_base, base_model_path=os.path.join(checkpoints["full"],
                                                                                          tiny.TINY_BASE_DIR))
    assert model.rm_head.weight.shape == (3, 32)


def test_unsupported_template_raises(checkpoints, tmp_path):
    path = copy_checkpoint(checkpoints["full"], tmp_path / "t")
    config_path = os.path.join(path, "model_config.json")
    cfg = json.load(open(config_path))
    cfg["data_config"]["prompt_template_type"] = "simple"
    json.dump(cfg, open(config_path, "w"))
    with pytest.raises(ValueError, match="prompt_template_type 'simple'.*only 'detailed_special'"):
        reward.VideoAlignReward.from_pretrained(path)


# ----------------------------------------------------------------------------------------------
# CLIPScore and PickScore.

@pytest.fixture(scope="module")
def clip_path(tmp_path_factory):
    return tiny.build_tiny_clip(str(tmp_path_factory.mktemp("clip") / "clip"))


def clip_reference(path, frame_lists, prompts, num_frames):
    """Per-video (CLIPScore, PickScore) from CLIPModel.forward's logits_per_image = exp(t)·cos."""
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel
    model = CLIPModel.from_pretrained(path).eval()
    processor, tokenizer = AutoImageProcessor.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    text = tokenizer(prompts, padding=True, return_tensors="pt")
    clip_scores, pick_scores = [], []
    for b, frames in enumerate(frame_lists):
        idx = np.round(np.linspace(0, len(frames) - 1, min(num_frames, len(frames)))).astype(int)
        images = [(frames[i].permute(1, 2, 0) * 255).round().byte().numpy() for i in idx]
        with torch.no_grad():
            out = model(**text, pixel_values=processor(images=images, return_tensors="pt")["pixel_values"])
        logits = out.logits_per_image[:, b]  # (frames,) exp(t)·cos(image_f, text_b)
        cosine = logits / model.logit_scale.exp()
        clip_scores.append((100 * cosine.clamp(min=0)).mean())
        pick_scores.append(logits.mean())
    return torch.stack(clip_scores), torch.stack(pick_scores)


def test_clipscore_and_pickscore_match_clipmodel_logits(clip_path):
    g = torch.Generator().manual_seed(0)
    frame_lists = [torch.rand(5, 3, 40, 48, generator=g), torch.rand(12, 3, 36, 36, generator=g)]
    clip_score = reward.ClipScore.from_pretrained(clip_path, num_frames=4)
    pick_score = reward.PickScore.from_pretrained(clip_path, num_frames=4)
    expected_clip, expected_pick = clip_reference(clip_path, frame_lists, PROMPTS[:2], num_frames=4)
    torch.testing.assert_close(clip_score(frame_lists, PROMPTS[:2]), expected_clip, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pick_score(frame_lists, PROMPTS[:2]), expected_pick, atol=1e-5, rtol=1e-5)
    assert (expected_clip >= 0).all() and expected_pick.abs().max() > 0


def test_clipscore_clips_negative_cosines_and_pickscore_scales_by_logit_scale(clip_path):
    cosine = torch.tensor([-0.5, 0.0, 0.25])
    clip = reward.ClipScore.from_pretrained(clip_path)
    torch.testing.assert_close(clip.score(cosine), torch.tensor([0.0, 0.0, 25.0]))  # 100·max(cos, 0)
    pick = reward.PickScore.from_pretrained(clip_path)
    with torch.no_grad():
        pick.model.logit_scale.fill_(math.log(100.0))  # PickScore_v1's learned temperature: exp(t) = 100
    # 100·cos, negative cosines kept (a logit, not clipped like CLIPScore)
    torch.testing.assert_close(pick.score(cosine), torch.tensor([-50.0, 0.0, 25.0]))


def test_clip_bad_video_gets_nan_only(clip_path):
    clip_score = reward.ClipScore.from_pretrained(clip_path)
    good = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    bad = good.clone()
    bad[0, 0, 0, 0] = float("inf")
    out = clip_score([good, bad], PROMPTS[:2])
    assert torch.isfinite(out[0]) and torch.isnan(out[1])
    torch.testing.assert_close(out[0], clip_score([good], PROMPTS[:1])[0])


def test_clip_missing_directory_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"ClipScore model '.*missing' is not a directory"):
        reward.ClipScore.from_pretrained(str(tmp_path / "missing"))


# ------------------------------------------------------------------------------------------------
# Several training rewards (`--reward videoalign=1 pickscore=0.5`): RewardMix.

def test_a_reward_mix_is_the_weighted_sum_of_each_rewards_own_scores(checkpoints, clip_path):
    frame_lists = videos()
    mix = reward.load_training_rewards({"videoalign": 1.0, "pickscore": -0.5, "clipscore": 0.0},
                                       {"videoalign": checkpoints["full"], "pickscore": clip_path, "clipscore": clip_path},
                                       weight_items=["ta=2"])
    assert mix.components == ("vq", "mq", "ta", "videoalign", "pickscore", "clipscore")
    assert mix.formula() == "1·videoalign(0.5·vq + 0.5·mq + 2·ta) + -0.5·pickscore + 0·clipscore"
    scores = mix(frame_lists, None, PROMPTS)
    # each reward on its own, loaded directly
    alone = reward.VideoAlignReward.from_pretrained(checkpoints["full"], weights=(0.5, 0.5, 2.0))(frame_lists, PROMPTS)
    pick = reward.PickScore.from_pretrained(clip_path)(frame_lists, PROMPTS)
    for name in ("vq", "mq", "ta"):
        torch.testing.assert_close(scores[name], alone[name])
    torch.testing.assert_close(scores["videoalign"], alone["reward"])
    torch.testing.assert_close(scores["pickscore"], pick)
    torch.testing.assert_close(scores["reward"], alone["reward"] - 0.5 * pick, rtol=1e-5, atol=1e-5)
    assert pick.abs().min() > 0  # the second reward really contributes


def test_a_sample_that_an_optimised_reward_fails_is_excluded_but_not_for_a_logged_only_one(checkpoints, clip_path):
    good = videos()[0]
    bad = good.clone()
    bad[0, 0, 0, 0] = float("nan")
    paths = {"videoalign": checkpoints["full"], "pickscore": clip_path}
    both = reward.load_training_rewards({"videoalign": 1.0, "pickscore": 0.5}, paths)([good, bad], None, PROMPTS[:2])
    assert torch.isfinite(both["reward"][0]) and torch.isnan(both["reward"][1])
    # only PickScore sees a bad video: with weight 0 it is logged (NaN) and the total stays VideoAlign's
    class Spoiled(reward.PickScore):
        def forward(self, frames, prompts):
            return super().forward([frames[0], bad], prompts)
    mix = reward.load_training_rewards({"videoalign": 1.0, "pickscore": 0.0}, paths)
    mix.rewards["pickscore"].__class__ = Spoiled
    scores = mix([good, good], None, PROMPTS[:2])
    assert torch.isnan(scores["pickscore"][1]) and torch.isfinite(scores["reward"]).all()
    torch.testing.assert_close(scores["reward"], scores["videoalign"])


@pytest.mark.parametrize("items, message", [
    (["aesthetics"], r"--reward 'aesthetics': expected name or name=weight"),
    (["videoalign", "videoalign=2"], r"names 'videoalign' twice"),
    (["videoalign=0"], r"every weight is 0"),
    (["clipscore=inf"], r"expected a finite weight"),
    (["clipscore=x"], r"'x' is not a number"),
])
def test_reward_specs_are_checked(items, message):
    with pytest.raises(ValueError, match=message):
        reward.parse_reward_specs(items)


def plug_in(monkeypatch, name="square", components=("area", "edge"), defaults=(1.0, 0.5)):
    """A reward registered for this test only (reward.TRAINING_REWARDS restored after it); its loader returns
    what it was called with."""
    monkeypatch.setattr(reward, "TRAINING_REWARDS", dict(reward.TRAINING_REWARDS))
    reward.register_training_reward(name, components, defaults, path_flag=None,
                                    load=lambda path, device, dtype, weights, processor_path: ("loaded", path, weights))


def test_a_plugged_in_reward_is_a_reward_choice_with_its_components_and_weights(monkeypatch):
    plug_in(monkeypatch)
    assert reward.parse_reward_specs(["videoalign", "square=0.5"]) == {"videoalign": 1.0, "square": 0.5}
    assert reward.training_reward_components("square") == (("area", "edge"), (1.0, 0.5))
    # --reward_weights reach the plugged-in reward's loader, in the order of its components; the rest stay default
    assert reward.load_training_reward("square", "/some/dir", weight_items=["edge=3"]) == ("loaded", "/some/dir", (1.0, 3.0))
    with pytest.raises(ValueError, match=r"2 components but 1 default weights"):
        reward.register_training_reward("bad", ("a", "b"), (1.0,), load=None)
    with pytest.raises(ValueError, match=r"--reward 'circle': expected name or name=weight with name one of"):
        reward.parse_reward_specs(["circle"])


def test_component_weights_go_to_the_reward_that_owns_the_component(monkeypatch):
    plug_in(monkeypatch)
    assert reward.split_component_weights(["ta=2", "edge=0"], ("videoalign", "square")) == {
        "videoalign": ["ta=2"], "square": ["edge=0"]}
    with pytest.raises(ValueError, match=r"'ta=2': expected name=value with name a component of clipscore: \[\]"):
        reward.split_component_weights(["ta=2"], ("clipscore",))


# ------------------------------------------------------------------------------------------------
# Long prompts: every reward reads a prompt as far as its own text model does, and no further.

LONG_PROMPT = ("a red fox runs  through deep snow, é, then\nstops. " * 2000)[:100_000]  # 100k characters


def videoalign_limit_from_files(path):
    """min(tokenizer_config's model_max_length, config's max_position_embeddings), read from the checkpoint's base."""
    base = os.path.join(path, tiny.TINY_BASE_DIR)
    tokenizer_config = json.load(open(os.path.join(base, "tokenizer_config.json")))
    config = json.load(open(os.path.join(base, "config.json")))
    positions = config.get("text_config", config)["max_position_embeddings"]
    return min(tokenizer_config.get("model_max_length", positions), positions)


def kept_prompt(model, input_ids):
    """The prompt text inside the token sequence the model read: between the template's 'Textual prompt - ' and
    the line after it."""
    text = model.tokenizer.decode(input_ids[input_ids != model.pad_token_id])
    return text.split("Textual prompt - ", 1)[1].split("\nPlease provide the ratings of Text Alignment", 1)[0]


@pytest.mark.parametrize("model_max_length", [None, 1200])
def test_a_long_prompt_is_cut_at_the_videoalign_models_own_limit(checkpoints, tmp_path, model_max_length):
    path = checkpoints["full"]
    if model_max_length is not None:  # the tokenizer's stated limit is the one obeyed, whatever it is
        path = shutil.copytree(path, tmp_path / "copy")
        config_path = os.path.join(path, tiny.TINY_BASE_DIR, "tokenizer_config.json")
        tokenizer_config = json.load(open(config_path))
        tokenizer_config["model_max_length"] = model_max_length
        json.dump(tokenizer_config, open(config_path, "w"))
    limit = videoalign_limit_from_files(path)
    model = reward.VideoAlignReward.from_pretrained(path)
    video = videos()[0]
    inputs = model.build_inputs([video, video], [LONG_PROMPT, PROMPTS[0]])
    length = int(inputs["attention_mask"][0].sum())
    # at the limit: the prompt's first and last tokens may merge with the template's, so up to 2 fewer
    assert limit - 2 <= length <= limit, f"expected a sequence of {limit - 2}..{limit} tokens, found {length}"
    kept = kept_prompt(model, inputs["input_ids"][0])
    assert LONG_PROMPT.startswith(kept) and len(kept) > 100, f"not a prefix of the prompt: {kept[:80]!r}"
    # the short prompt beside it is read whole, as the tokenizer alone gives it
    assert inputs["input_ids"][1, :int(inputs["attention_mask"][1].sum())].tolist() == model.tokenizer(
        model.prompt_text(PROMPTS[0], int(inputs["video_grid_thw"][1].prod()) // 4), add_special_tokens=False)["input_ids"]
    # scoring the long prompt is scoring the part of it that was kept
    torch.testing.assert_close(model([video], [LONG_PROMPT])["reward"], model([video], [kept])["reward"])


def test_a_long_prompt_costs_videoalign_and_clip_a_few_times_a_normal_one(models, clip_path, monkeypatch):
    """What a prompt costs is the token sequence each text model reads, counted here (a timed ratio flaked on a loaded
    machine). The tiny VideoAlign reads at most its max_length (2048) tokens where a normal prompt makes ~920, so a
    cost between linear and quadratic in the length is 2.2x to 4.9x (a 100k-character prompt cost 1,400x before
    the cut); CLIP reads at most 77 tokens (its context) where the normal prompt makes 24, beside the same frames."""
    video = [videos()[0]]
    videoalign, clip = models["full"], reward.ClipScore.from_pretrained(clip_path)
    read = []
    features = clip.model.get_text_features
    monkeypatch.setattr(clip.model, "get_text_features", lambda **text: read.append(text["input_ids"].shape[1])
                        or features(**text))
    hook = videoalign.model.language_model.register_forward_pre_hook(  # the module-scoped model: removed below
        lambda module, args, kwargs: read.append(kwargs["inputs_embeds"].shape[1]), with_kwargs=True)
    try:
        # quadratic bound: VideoAlign's sequence is its cost; CLIP's 77 text tokens are small beside its frames
        for name, score, limit, bound in (("VideoAlign", videoalign, videoalign.max_length, 6.0),
                                          ("CLIPScore", clip, 77, math.inf)):
            read.clear()
            score(video, [PROMPTS[0]])
            score(video, [LONG_PROMPT])
            normal, long = read
            assert normal < long <= limit, f"{name}: the normal prompt read as {normal} tokens, the long one as " \
                                           f"{long}, expected at most {limit}"
            assert (long / normal) ** 2 < bound, f"{name}: a quadratic cost would be {(long / normal) ** 2:.1f}x"
    finally:
        hook.remove()


def test_clip_reads_a_long_prompt_as_its_tokenizer_truncates_it_at_its_context(clip_path, monkeypatch):
    from transformers import AutoTokenizer
    context = json.load(open(os.path.join(clip_path, "config.json")))["text_config"]["max_position_embeddings"]
    expected = AutoTokenizer.from_pretrained(clip_path)([LONG_PROMPT, PROMPTS[1]], truncation=True, max_length=context,
                                                        padding=True)["input_ids"]
    clip = reward.ClipScore.from_pretrained(clip_path)
    seen = []
    features = clip.model.get_text_features
    monkeypatch.setattr(clip.model, "get_text_features", lambda **text: seen.append(text["input_ids"]) or features(**text))
    clip(videos()[:2], [LONG_PROMPT, PROMPTS[1]])
    assert seen[0].tolist() == expected and len(expected[0]) == context


def test_prompt_cuts_name_each_prompt_a_reward_will_cut_with_its_length_and_limit(checkpoints, clip_path):
    from transformers import AutoTokenizer
    mix = reward.load_training_rewards({"videoalign": 1.0, "clipscore": 0.0},
                                       {"videoalign": checkpoints["full"], "clipscore": clip_path})
    video = videos()[0]
    num_frames, _, height, width = video.shape
    prompts = [PROMPTS[0], LONG_PROMPT, "a fox " * 40]  # the third: over CLIP's 75 tokens only
    cuts = reward.prompt_cuts(mix, prompts, num_frames, height, width)
    assert [(c.reward, c.index) for c in cuts] == [("videoalign", 1), ("clipscore", 1), ("clipscore", 2)]
    base = AutoTokenizer.from_pretrained(os.path.join(checkpoints["full"], tiny.TINY_BASE_DIR))
    assert cuts[0].tokens == len(base(LONG_PROMPT, add_special_tokens=False)["input_ids"])
    assert cuts[0].model_limit == videoalign_limit_from_files(checkpoints["full"])
    # VideoAlign's limit is what the forward keeps of the prompt, beside a video of that size (±2 merged tokens)
    videoalign = mix.rewards["videoalign"]
    kept = kept_prompt(videoalign, videoalign.build_inputs([video], [LONG_PROMPT])["input_ids"][0])
    assert abs(len(base(kept, add_special_tokens=False)["input_ids"]) - cuts[0].limit) <= 2
    context = json.load(open(os.path.join(clip_path, "config.json")))["text_config"]["max_position_embeddings"]
    clip_tokenizer = AutoTokenizer.from_pretrained(clip_path)
    assert [(c.tokens, c.limit, c.model_limit) for c in cuts[1:]] == [
        (len(clip_tokenizer(p, add_special_tokens=False)["input_ids"]), context - 2, context) for p in prompts[1:]]
    assert str(cuts[1]) == (f"clipscore: prompt 1 has {cuts[1].tokens} tokens, more than the {context - 2} it reads "
                            f"(the model reads {context} tokens in all): scored on its first {context - 2} tokens")
    assert reward.prompt_cuts(mix, PROMPTS, num_frames, height, width) == []


def test_the_video_token_count_is_the_one_the_inputs_hold(models):
    model = models["full"]
    for video in videos():
        grid = model.preprocess(video)[1]
        assert model.num_video_tokens(*video.shape[:1], *video.shape[2:]) == int(grid.prod()) // model.merge_size ** 2
