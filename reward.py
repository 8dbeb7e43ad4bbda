"""The reward model: VideoAlign (VideoReward), the reward SAGE-GRPO trains against; at the end, in a
section of their own, the evaluation scorers CLIPScore and PickScore.

SAGE-GRPO scores every rollout with
VideoAlign's VideoReward (Liu et al., "Improving Video Generation with Human Feedback",
arXiv 2501.13918; code KwaiVGI/VideoAlign): a Qwen2-VL-2B whose last hidden state is read by a
linear reward head at three special tokens placed in the prompt,

    h = Qwen2-VL(video, prompt)                       (B, L, D) last hidden states
    r_k = W_k · h[pos(<|k_reward|>)]                  k ∈ {VQ, MQ, TA}; W: rm_head, (N, D), no bias
    r̃_k = (r_k − mean_k) / std_k                       the checkpoint's own statistics (inference_config)
    reward = w_VQ·r̃_VQ + w_MQ·r̃_MQ + w_TA·r̃_TA         paper setting B: w = (0.5, 0.5, 1.0)

With N = 3 outputs, dimension k reads row k of the head at token k (the official "diagonal");
with N = 1 the single row is read at all three tokens. VQ = visual quality, MQ = motion quality,
TA = text alignment. The normalised scores are what the official `VideoVLMRewardInference.reward`
returns with use_norm=True, and what the paper reports.

What the reward model sees (the official inference path, re-derived here in torch)
----------------------------------------------------------------------------------
Frames arrive from the VAE decoder as float tensors (F, 3, H, W) in [0, 1]; there is no mp4 round
trip. Each video then goes through exactly the steps the official pipeline applies to a decoded
mp4 (qwen-vl-utils `fetch_video` in VideoAlign's `vision_process.py`, then the Qwen2-VL processor):

1. Frame count (`sample_frame_indices`). At sampling rate f_s = 2 fps from a source at f fps
   (HunyuanVideo-1.5 writes 24 fps), n = F/f·f_s, clamped to [4, ⌊min(768, F)⌋₂] and rounded to
   a multiple of 2 (⌊·⌋₂: down to a multiple of 2; rounding is Python's round-half-to-even). The
   kept frames are round(linspace(0, F − 1, n)). Example: 81 frames at 24 fps -> n = 6.75 -> 6,
   frames 0, 16, 32, 48, 64, 80.
2. Frame size (`frame_size`). Sides rounded to multiples of 28 (= patch 14 × merge 2); if the area
   exceeds max_pixels (checkpoint: 448² = 200704) both sides shrink by √(HW/max_pixels) and are
   floored to multiples of 28; if it is below min_pixels (qwen-vl-utils: 128·28²) they grow by
   √(min_pixels/HW) and are ceiled. 352×624 -> 336×588. Resize: bicubic with antialiasing.
3. CLIP normalisation: (x − mean)/std with the OpenAI CLIP mean/std (Qwen2-VL's preprocessor).
4. Patchify (`patchify`, Qwen2-VL): frames grouped in pairs (temporal patch 2; an odd count repeats
   the last frame), 14×14 patches, ordered so that each 2×2 block of patches (one merged visual
   token) is contiguous: pixel_values_videos (T/2·H/14·W/14, 3·2·14·14) and video_grid_thw
   (T/2, H/14, W/14). The prompt holds T/2·H/14·W/14 / 4 <|video_pad|> tokens.
5. Text: the "detailed_special" template with the user prompt inserted, after the video, in
   Qwen2-VL's chat format (default system prompt, generation prompt appended); batches are padded
   on the right.

Positions. VideoAlign was trained with transformers 4.45, where its reward model fed the text
decoder `inputs_embeds` without position ids, so every token (video tokens included) got the
plain sequential position 0, 1, 2, … in all three M-RoPE sections, not Qwen2-VL's 3-D video
positions. We do the same, or the checkpoint would be scored off its training distribution.

The checkpoint (`VideoAlignReward.from_pretrained`)
--------------------------------------------------
    VideoReward/
        model_config.json           data_config, model_config, peft_lora_config, inference_config
        checkpoint-<step>/          the highest step is used (or `step=`)
            model.pth               the whole LoRA-wrapped model's state dict, or
            adapter_model.safetensors + non_lora_state_dict.pth  (LoRA A/B + trained non-LoRA tensors)
        Qwen2-VL-2B-Instruct/       the base model (basename of model_config.model_name_or_path, or that
                                    path itself, or its hub snapshot when it is a hub id such as
                                    Qwen/Qwen2-VL-2B-Instruct, or base_model_path=): config.json and
                                    tokenizer always, its weights only for the adapter layout

Both directories may be given as hub ids already in the local hub cache (hub.py; never downloaded).

The LoRA deltas are merged into plain weights once at load time,

    W = W_0 + s·B·A,  s = lora_alpha / r  (lora_alpha / √r with rsLoRA),   embeddings: W = W_0 + s·(B·A)ᵀ,

and the keys are mapped from the PEFT wrapper and the transformers-4.45 Qwen2-VL layout
(`base_model.model.model.layers…`, `base_model.model.visual…`) to the transformers-5 one
(`model.language_model.layers…`, `model.visual…`). As in the official loader, the three reward
tokens are added to the base tokenizer and the embedding matrix is cut (or grown) to its length.

CLIPScore and PickScore (`ClipScore`, `PickScore`): a transformers `CLIPModel` scores `num_frames`
frames sampled uniformly from each video, and the per-frame scores are averaged:

    CLIPScore = mean_f 100·max(cos(e_img_f, e_txt), 0)      (torchmetrics / most T2V papers)
    PickScore = mean_f exp(logit_scale)·cos(e_img_f, e_txt) (Kirstain et al. 2023, its inference code)

Failures. A video whose frames are unusable (wrong shape, too few frames, NaN/inf) gets NaN for
every score, with a warning; the others in the batch are scored as usual. Configuration errors
(missing files, wrong layout, unknown template) raise and say what was expected and what was found.

Differences from the official code (deliberate): no mp4 encode/decode (frames are not quantised
to uint8 nor h264-compressed before resizing); LoRA is merged instead of kept as a PEFT wrapper;
a failed video gives NaN (SAGE-GRPO's official fallback is -1 or NaN depending on the path);
`forward` returns tensors, not Python floats.
"""
import dataclasses
import json
import logging
import math
import os
import typing

import torch
import torch.nn.functional as F
from torch import nn

import hub
import videoalign_checkpoint

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------
# Constants, each with its source.

# The three reward tokens, in the order they appear in the prompt (VideoAlign train_reward.py).
REWARD_TOKENS = ("<|VQ_reward|>", "<|MQ_reward|>", "<|TA_reward|>")
DIMENSIONS = ("vq", "mq", "ta")
# Reward weights w_VQ, w_MQ, w_TA: paper setting B / official SAGE-GRPO reward_config.
DEFAULT_WEIGHTS = (0.5, 0.5, 1.0)
# HunyuanVideo-1.5 writes its videos at 24 fps (its pipeline's default export fps).
DEFAULT_SOURCE_FPS = 24.0
# Frame sampling (qwen-vl-utils as vendored in VideoAlign vision_process.py; fps 2 is also
# VideoReward's data_config.fps).
DEFAULT_SAMPLE_FPS = 2.0
FRAME_FACTOR = 2
FPS_MIN_FRAMES = 4
FPS_MAX_FRAMES = 768
# Frame size: VideoReward's data_config.max_frame_pixels (448² = 256·28²) and qwen-vl-utils'
# VIDEO_MIN_PIXELS (128·28²), its default when the video element sets no min_pixels.
DEFAULT_MAX_FRAME_PIXELS = 448 * 448
DEFAULT_MIN_FRAME_PIXELS = 128 * 28 * 28
MAX_ASPECT_RATIO = 200  # qwen-vl-utils / transformers smart_resize
# OpenAI CLIP mean/std (Qwen2-VL's preprocessor_config.json: image_mean / image_std).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Qwen2-VL's chat template rendered for one user turn [video, text] with add_generation_prompt=True
# (Qwen2-VL-2B-Instruct chat_template; the default system prompt is added when none is given).
QWEN2VL_CHAT_FORMAT = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                       "<|im_start|>user\n<|vision_start|>{video}<|vision_end|>{text}<|im_end|>\n"
                       "<|im_start|>assistant\n")
VIDEO_PAD_TOKEN = "<|video_pad|>"
QWEN2VL_SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                          "<|vision_pad|>", "<|image_pad|>", VIDEO_PAD_TOKEN)

# VideoAlign prompt_template.py, template type "detailed_special" (VideoReward's data_config),
# verbatim: the model was trained on exactly this text. Some lines end in two spaces (Markdown line
# breaks) or one; they are part of the prompt and must survive editors that strip whitespace.
DETAILED_SPECIAL_TEMPLATE = """
You are tasked with evaluating a generated video based on three distinct criteria: Visual Quality, Motion Quality, and Text Alignment. Please provide a rating from 0 to 10 for each of the three categories, with 0 being the worst and 10 being the best. Each evaluation should be independent of the others.

**Visual Quality:**  
Evaluate the overall visual quality of the video, with a focus on static factors. The following sub-dimensions should be considered:
- **Reasonableness:** The video should not contain any significant biological or logical errors, such as abnormal body structures or nonsensical environmental setups.
- **Clarity:** Evaluate the sharpness and visibility of the video. The image should be clear and easy to interpret, with no blurring or indistinct areas.
- **Detail Richness:** Consider the level of detail in textures, materials, lighting, and other visual elements (e.g., hair, clothing, shadows).
- **Aesthetic and Creativity:** Assess the artistic aspects of the video, including the color scheme, composition, atmosphere, depth of field, and the overall creative appeal. The scene should convey a sense of harmony and balance.
- **Safety:** The video should not contain harmful or inappropriate content, such as political, violent, or adult material. If such content is present, the image quality and satisfaction score should be the lowest possible. 

Please provide the ratings of Visual Quality: <|VQ_reward|>
END

**Motion Quality:**  
Assess the dynamic aspects of the video, with a focus on dynamic factors. Consider the following sub-dimensions:
- **Stability:** Evaluate the continuity and stability between frames. There should be no sudden, unnatural jumps, and the video should maintain stable attributes (e.g., no fluctuating colors, textures, or missing body parts).
- **Naturalness:** The movement should align with physical laws and be realistic. For example, clothing should flow naturally with motion, and facial expressions should change appropriately (e.g., blinking, mouth movements).
- **Aesthetic Quality:** The movement should be smooth and fluid. The transitions between different motions or camera angles should be seamless, and the overall dynamic feel should be visually pleasing.
- **Fusion:** Ensure that elements in motion (e.g., edges of the subject, hair, clothing) blend naturally with the background, without obvious artifacts or the feeling of cut-and-paste effects.
- **Clarity of Motion:** The video should be clear and smooth in motion. Pay attention to any areas where the video might have blurry or unsteady sections that hinder visual continuity.
- **Amplitude:** If the video is largely static or has little movement, assign a low score for motion quality.

Please provide the ratings of Motion Quality: <|MQ_reward|>
END

**Text Alignment:**  
Assess how well the video matches the textual prompt across the following sub-dimensions:
- **Subject Relevance** Evaluate how accurately the subject(s) in the video (e.g., person, animal, object) align with the textual description. The subject should match the description in terms of number, appearance, and behavior.
- **Motion Relevance:** Evaluate if the dynamic actions (e.g., gestures, posture, facial expressions like talking or blinking) align with the described prompt. The motion should match the prompt in terms of type, scale, and direction.
- **Environment Relevance:** Assess whether the background and scene fit the prompt. This includes checking if real-world locations or scenes are accurately represented, though some stylistic adaptation is acceptable.  
- **Style Relevance:** If the prompt specifies a particular artistic or stylistic style, evaluate how well the video adheres to this style.
- **Camera Movement Relevance:** Check if the camera movements (e.g., following the subject, focus shifts) are consistent with the expected behavior from the prompt.

Textual prompt - {text_prompt}
Please provide the ratings of Text Alignment: <|TA_reward|>
END
"""
SUPPORTED_TEMPLATE = "detailed_special"


# CLIPScore = CLIPSCORE_SCALE·max(cos, 0): the torchmetrics convention, which is what T2V papers
# report as "CLIPScore" (values ~20-35). Hessel et al.'s CLIP-S uses w = 2.5 instead of 100; only
# the scale differs. PickScore uses the model's own exp(logit_scale) (≈ 100 for PickScore_v1).
CLIPSCORE_SCALE = 100.0
# Frames per video for CLIPScore / PickScore (uniformly spaced, first and last included): our choice.
CLIP_NUM_FRAMES = 8


# ----------------------------------------------------------------------------------------------
# Frame preprocessing, pure torch (steps 1-4 of the module docstring).

def _round_to(x, factor):
    """Nearest multiple of `factor` (Python round: halves go to the even multiple)."""
    return round(x / factor) * factor


def sample_frame_indices(num_frames, fps, sample_fps=DEFAULT_SAMPLE_FPS, target_frames=None):
    """Indices of the frames the reward model sees: round(linspace(0, F − 1, n)) (step 1).

    n = F/fps·sample_fps clamped to [4, ⌊min(768, F)⌋₂] and rounded to a multiple of 2, or
    `target_frames` rounded to a multiple of 2 when the checkpoint fixes the count
    (data_config.num_frames). Raises ValueError when fewer than 2 frames would remain.
    """
    if fps <= 0 or sample_fps <= 0:
        raise ValueError(f"fps and sample_fps must be > 0, got fps={fps}, sample_fps={sample_fps}")
    if target_frames is not None:
        n = _round_to(target_frames, FRAME_FACTOR)
    else:
        min_frames = math.ceil(FPS_MIN_FRAMES / FRAME_FACTOR) * FRAME_FACTOR
        max_frames = math.floor(min(FPS_MAX_FRAMES, num_frames) / FRAME_FACTOR) * FRAME_FACTOR
        n = num_frames / fps * sample_fps
        n = _round_to(min(max(n, min_frames), max_frames), FRAME_FACTOR)
    n = min(n, num_frames)
    if n < FRAME_FACTOR:
        raise ValueError(f"a video needs at least {FRAME_FACTOR} frames for the reward model, got {num_frames}")
    return torch.linspace(0, num_frames - 1, n).round().long().tolist()


def frame_size(height, width, min_pixels=DEFAULT_MIN_FRAME_PIXELS, max_pixels=DEFAULT_MAX_FRAME_PIXELS,
               factor=28):
    """(height, width) after resizing: multiples of `factor`, area within [min_pixels, max_pixels] (step 2)."""
    if min(height, width) < 1 or max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(f"frame size {height}x{width}: expected positive sides with aspect ratio "
                         f"<= {MAX_ASPECT_RATIO}")
    h, w = max(factor, _round_to(height, factor)), max(factor, _round_to(width, factor))
    if h * w > max_pixels:  # shrink by β = √(HW / max_pixels), floor to the grid
        beta = math.sqrt(height * width / max_pixels)
        h = math.floor(height / beta / factor) * factor
        w = math.floor(width / beta / factor) * factor
    elif h * w < min_pixels:  # grow by β = √(min_pixels / HW), ceil to the grid
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def patchify(frames, patch_size=14, temporal_patch_size=2, merge_size=2):
    """Normalised frames (T, C, H, W) -> (pixel_values (T'·h·w, C·t·p·p), grid_thw (3,)) (step 4).

    T' = T/t, h = H/p, w = W/p. Patch rows are ordered (t', h-block, w-block, h-in-block,
    w-in-block) with merge_size² consecutive rows forming one merged visual token; each row is laid
    out (C, t, p, p), the layout of Qwen2-VL's Conv3d patch embedding. An odd frame count repeats
    the last frame (transformers' Qwen2-VL video processor does the same).
    """
    T, C, H, W = frames.shape
    p, t, m = patch_size, temporal_patch_size, merge_size
    if H % (p * m) or W % (p * m):
        raise ValueError(f"frame size {H}x{W} must be a multiple of patch_size·merge_size = {p * m}")
    if T % t:
        frames = torch.cat([frames, frames[-1:].expand(t - T % t, C, H, W)])
    grid_t, grid_h, grid_w = frames.shape[0] // t, H // p, W // p
    x = frames.reshape(grid_t, t, C, grid_h // m, m, p, grid_w // m, m, p)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # (t', h/m, w/m, m_h, m_w, C, t, p, p)
    pixel_values = x.reshape(grid_t * grid_h * grid_w, C * t * p * p)
    return pixel_values, torch.tensor([grid_t, grid_h, grid_w])


def check_frames(frames):
    """Raise ValueError unless `frames` is a finite float tensor (F, 3, H, W)."""
    if not torch.is_tensor(frames) or frames.ndim != 4 or frames.shape[1] != 3 or frames.numel() == 0:
        raise ValueError(f"expected frames (F, 3, H, W), got "
                         f"{tuple(frames.shape) if torch.is_tensor(frames) else type(frames).__name__}")
    if not torch.isfinite(frames).all():
        raise ValueError("frames contain NaN or inf")


def _as_video_list(frames, prompts):
    """Tensor (B, F, 3, H, W) or list of (F, 3, H, W) -> list of B videos; checks len(prompts) == B."""
    if torch.is_tensor(frames):
        if frames.ndim != 5:
            raise ValueError(f"frames must be (B, F, 3, H, W) or a list of (F, 3, H, W), got {tuple(frames.shape)}")
        frames = list(frames)
    if isinstance(prompts, str):
        raise ValueError("prompts must be a list of strings, one per video, not a single string")
    if len(frames) != len(prompts):
        raise ValueError(f"got {len(frames)} videos but {len(prompts)} prompts")
    return list(frames)


# ----------------------------------------------------------------------------------------------
# Prompt length: what every reward reads of a prompt is bounded the way its own text model bounds it.
#
# A text model reads at most model_max_length tokens: its tokenizer's model_max_length (Qwen2-VL-2B-Instruct:
# 32768; openai/clip-vit-large-patch14: 77), capped by the positions of its config (max_position_embeddings, the
# same numbers for the real checkpoints; a tokenizer saved without the field reports transformers' 1e30 sentinel).
# A longer prompt is scored on its first tokens: CLIP by the tokenizer's own truncation, VideoAlign by cutting the
# prompt inside its template so that the whole chat sequence (template, video tokens, prompt, the three reward
# tokens after it) fits. Unbounded, a 200 kB prompt made VideoAlign's batched forward ask for 40.7 GB.
# `prompt_cuts` tells which prompts a set of loaded rewards will cut, for the trainer to print when it loads them.

def model_max_length(tokenizer, max_position_embeddings):
    """The longest token sequence a text model reads: min(tokenizer.model_max_length, max_position_embeddings)."""
    return min(int(tokenizer.model_max_length), int(max_position_embeddings))


def token_window(tokenizer, text, max_tokens):
    """(piece, encoding): `text` itself if it has at most max_tokens tokens, else a prefix of it, ending before a
    space, with more than max_tokens tokens whose first max_tokens are the text's own; encoding: the piece's
    tokens (no special tokens) with their character offsets. Tokenises about as much text as it keeps, not a
    100 kB prompt on every call. Why the first tokens agree: BPE tokenisers (Qwen2's, CLIP's) split the text
    into pieces that never run across a space preceded by a non-space, and encode each piece on its own."""
    window = 8 * max_tokens + 64  # characters: a token covers at least one, so one window usually suffices
    while True:
        end = len(text)
        if end > window:
            end = text.rfind(" ", 0, window)
            while end > 0 and text[end - 1].isspace():  # cut at a space right after a non-space
                end = text.rfind(" ", 0, end)
            end = end if end > 0 else window  # one word longer than the window: cut inside it
        encoding = tokenizer(text[:end], add_special_tokens=False, return_offsets_mapping=True)
        if len(encoding["input_ids"]) > max_tokens or end == len(text):
            return text[:end], encoding
        window *= 2


def leading_text(tokenizer, text, max_tokens):
    """The prefix of `text` that holds its first max_tokens tokens (the text itself if it is not longer)."""
    piece, encoding = token_window(tokenizer, text, max_tokens)
    if len(encoding["input_ids"]) <= max_tokens:
        return piece
    return text[:encoding["offset_mapping"][max_tokens - 1][1]] if max_tokens > 0 else ""


@dataclasses.dataclass(frozen=True)
class PromptCut:
    """Prompt `index` has `tokens` tokens (its own, by `reward`'s tokenizer); `reward` scores its first `limit`
    of them: what is left of the model's `model_limit` tokens once the reward's own text (and video) is in."""
    reward: str
    index: int
    tokens: int
    limit: int
    model_limit: int

    def __str__(self):
        return (f"{self.reward}: prompt {self.index} has {self.tokens} tokens, more than the {self.limit} it reads "
                f"(the model reads {self.model_limit} tokens in all): scored on its first {self.limit} tokens")


def prompt_cuts(rewards, prompts, num_frames, height, width, fps=DEFAULT_SOURCE_FPS):
    """Which prompts the loaded rewards will cut, and where: [PromptCut], in reward then prompt order; empty
    when every reward reads every prompt whole.

    rewards: a RewardMix, a {name: reward} dict or one reward; a reward without a text model (the world's
    exact reward) is skipped. num_frames, height, width, fps: the videos the rewards will score (VideoAlign's
    room for the prompt is what its template and these videos' tokens leave). For the trainer, once the
    prompts and rewards are loaded:

        for cut in reward.prompt_cuts(rewards, prompts, cfg.num_frames, cfg.height, cfg.width):
            print(f"prompts: {cut}")
    prints e.g. "prompts: videoalign: prompt 3 has 41233 tokens, more than the 30980 it reads (the model reads
    32768 tokens in all): scored on its first 30980 tokens".
    """
    if isinstance(rewards, RewardMix):
        rewards = rewards.rewards
    elif not isinstance(rewards, dict):
        rewards = {type(rewards).__name__: rewards}
    cuts = []
    for name, model in rewards.items():
        if not hasattr(model, "prompt_token_limit"):
            continue
        limit = model.prompt_token_limit(num_frames, height, width, fps)
        for index, prompt in enumerate(prompts):
            tokens = len(model.tokenizer(prompt, add_special_tokens=False, verbose=False)["input_ids"])
            if tokens > limit:
                cuts.append(PromptCut(name, index, tokens, limit, model.max_length))
    return cuts


# ----------------------------------------------------------------------------------------------
# The official reward input: an 8-bit H.264 mp4 round trip (optional, for parity).
#
# The official trainer writes every rollout to an mp4 file and VideoAlign scores the decoded file,
# so its reward sees 8-bit colour, 4:2:0 chroma and H.264 artefacts. `mp4_round_trip` reproduces
# that in memory (no file), with the settings below; the frames then go through the steps of the
# module docstring as usual. Measured on a smooth synthetic video: PSNR 37 dB against the input.

# 24 fps: HunyuanVideo-1.5's export frame rate; libx264 at constant quality crf 25, 4:2:0 chroma.
MP4_FPS = 24
MP4_CRF = 25
MP4_CODEC = "libx264"
MP4_PIXEL_FORMAT = "yuv420p"


def encode_mp4(frames, fps=MP4_FPS, crf=MP4_CRF):
    """Frames (F, 3, H, W), float in [0, 1] (clamped), as the bytes of an 8-bit H.264 mp4 (yuv420p, CRF `crf`).

    H and W must be even (4:2:0 chroma halves both; an odd size raises ValueError rather than padding, which
    would change what the reward sees). Colours are rounded to 8 bits and converted RGB -> YUV 4:2:0 by
    FFmpeg's default (BT.601) conversion, as FFmpeg's command line does. The one video writer of the
    project: the reward's mp4 input (mp4_round_trip) and the saved sample / evaluation videos.
    """
    import io

    import av  # PyAV: FFmpeg with libx264 in its wheel; imported here so that reward.py works without it
    check_frames(frames)
    _, _, height, width = frames.shape
    if height % 2 or width % 2:
        raise ValueError(f"mp4 ({MP4_PIXEL_FORMAT}) needs even frame sizes, got H x W = {height} x {width}")
    # (F, 3, H, W) float -> (F, H, W, 3) uint8, rounded
    pixels = (frames.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream(MP4_CODEC, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, MP4_PIXEL_FORMAT
        stream.options = {"crf": str(crf)}
        for index, image in enumerate(pixels):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = index
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))  # flush the encoder's delayed frames
    return buffer.getvalue()


def decode_mp4(data):
    """The bytes of an mp4 -> its frames (F, 3, H, W), uint8 (CPU)."""
    import io

    import av
    with av.open(io.BytesIO(data), mode="r") as container:
        decoded = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    return torch.stack([torch.from_numpy(image) for image in decoded]).permute(0, 3, 1, 2)


def mp4_round_trip(frames, fps=MP4_FPS, crf=MP4_CRF):
    """Encode frames as an 8-bit H.264 mp4 in memory and decode it back.  (F, 3, H, W) -> (F, 3, H, W).

    frames: float in [0, 1] (clamped), H and W even (encode_mp4). Returns float32 in [0, 1] on frames' device.
    """
    video = decode_mp4(encode_mp4(frames, fps, crf))  # (F, 3, H, W) uint8
    if len(video) != len(frames):
        raise RuntimeError(f"the mp4 round trip returned {len(video)} frames for {len(frames)}")
    return (video.float() / 255).to(frames.device)


# ----------------------------------------------------------------------------------------------
# Reading the official checkpoint (its files: videoalign_checkpoint.py).

def _read_json(path):
    with open(path) as f:
        return json.load(f)


def _read_model_config(path):
    """model_config.json -> (data_config, model_config, peft_lora_config, inference_config), validated."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"VideoAlign checkpoint directory {path} does not exist")
    config_path = os.path.join(path, videoalign_checkpoint.MODEL_CONFIG_FILE)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{config_path} not found: expected the VideoReward layout ({videoalign_checkpoint.MODEL_CONFIG_FILE} + "
                                f"checkpoint-<step>/), found {sorted(os.listdir(path))}")
    cfg = _read_json(config_path)
    missing = [k for k in ("data_config", "model_config", "peft_lora_config") if k not in cfg]
    if missing:
        raise ValueError(f"{config_path} lacks {missing}; found keys {sorted(cfg)}")
    data, model, lora = cfg["data_config"], cfg["model_config"], cfg["peft_lora_config"]
    template = data.get("prompt_template_type")
    if template != SUPPORTED_TEMPLATE:
        raise ValueError(f"prompt_template_type {template!r} in {config_path}: only {SUPPORTED_TEMPLATE!r} "
                         f"(the VideoReward release) is implemented")
    if not model.get("use_special_tokens", False):
        raise ValueError(f"{config_path}: expected model_config.use_special_tokens = true (reward read at "
                         f"{REWARD_TOKENS}), found {model.get('use_special_tokens')}")
    inference = cfg.get("inference_config")
    if inference is None:
        logger.warning("%s has no inference_config: VQ/MQ/TA are returned unnormalised", config_path)
    return data, model, lora, inference


# ----------------------------------------------------------------------------------------------
# What a training reward offers train.py (VideoAlignReward does; so does any reward added later).
#   components   the names of its scores, e.g. ("vq", "mq", "ta")
#   weights      {component: weight}: reward = Σ_k w_k·score_k, computed by the reward itself
#                (the one place the weights are applied; train.py only reads scores["reward"])
#   input        "frames" (decoded video, (B, F, 3, H, W) in [0, 1]) or "latents" ((B, C, F, H, W))
#   __call__(videos, prompts) -> {component: (B,), "reward": (B,), ...}; NaN marks a failed video
#                (CLIPScore / PickScore: no components, and __call__ returns the (B,) score itself)
# Several rewards are summed with weights by RewardMix (`--reward videoalign=1 clipscore=0.5`).

def parse_weights(items, components, defaults):
    """Weights from `name=value` strings, e.g. ["ta=2"] -> (0.5, 0.5, 2.0) for components (vq, mq, ta)
    with defaults (0.5, 0.5, 1.0): a component not named keeps its default. Values must be finite."""
    weights = dict(zip(components, defaults))
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or name not in weights:
            raise ValueError(f"reward weight {item!r}: expected name=value with name one of {list(components)}")
        try:
            weights[name] = float(value)
        except ValueError:
            raise ValueError(f"reward weight {item!r}: {value!r} is not a number") from None
        if not math.isfinite(weights[name]):
            raise ValueError(f"reward weight {item!r}: expected a finite number, found {value!r}")
    return tuple(weights[name] for name in components)


@dataclasses.dataclass(frozen=True)
class TrainingReward:
    """What train.py knows of a reward it can optimise before loading it: its components and their default
    weights (for the flag checks), the train.py flag that holds its directory (None: it needs none), and
    load(path, device, dtype, weights, processor_path) -> the reward (the interface above)."""
    components: tuple
    default_weights: tuple
    path_flag: typing.Optional[str]
    load: typing.Callable


# name -> TrainingReward: the three rewards of this file, and any other plugged in with register_training_reward
# (the synthetic video world's exact reward registers itself when world/video_world.py is imported: this file
# never imports the toy).
TRAINING_REWARDS = {}


def register_training_reward(name, components, default_weights, load, path_flag=None):
    """Make `name` a `--reward` choice. load(path, device, dtype, weights, processor_path) returns the reward:
    called with the reward's directory (the value of `--<path_flag>`) and its component weights in the order of
    `components`. Registering a name again replaces it (a module imported twice)."""
    if len(components) != len(default_weights):
        raise ValueError(f"reward {name!r}: {len(components)} components but {len(default_weights)} default weights")
    TRAINING_REWARDS[name] = TrainingReward(tuple(components), tuple(default_weights), path_flag, load)


register_training_reward(
    "videoalign", DIMENSIONS, DEFAULT_WEIGHTS, path_flag="reward_path",
    load=lambda path, device, dtype, weights, processor_path: VideoAlignReward.from_pretrained(
        path, device=device, dtype=dtype, weights=weights))
register_training_reward(   # CLIPScore and PickScore are one number each: no components (their total is their score)
    "clipscore", (), (), path_flag="clip_path",
    load=lambda path, device, dtype, weights, processor_path: ClipScore.from_pretrained(
        path, processor_path=processor_path, device=device, dtype=dtype))
register_training_reward(
    "pickscore", (), (), path_flag="pickscore_path",
    load=lambda path, device, dtype, weights, processor_path: PickScore.from_pretrained(
        path, processor_path=processor_path, device=device, dtype=dtype))


def training_reward_components(name):
    """(components, default weights) of a training reward, without loading it (for flag checks)."""
    if name not in TRAINING_REWARDS:
        raise ValueError(f"unknown reward {name!r}: expected one of {list(TRAINING_REWARDS)}")
    return TRAINING_REWARDS[name].components, TRAINING_REWARDS[name].default_weights


def parse_reward_specs(items):
    """`--reward` items -> {name: weight}: "videoalign" (weight 1) or "clipscore=0.5". At least one
    reward, each once, finite weights, not all zero (a zero weight logs a reward without optimising it)."""
    if isinstance(items, str):
        items = [items]
    if not items:
        raise ValueError(f"--reward needs at least one of {list(TRAINING_REWARDS)}, e.g. --reward videoalign")
    specs = {}
    for item in items:
        name, sep, value = item.partition("=")
        if name not in TRAINING_REWARDS:
            raise ValueError(f"--reward {item!r}: expected name or name=weight with name one of {list(TRAINING_REWARDS)}")
        if name in specs:
            raise ValueError(f"--reward names {name!r} twice: give each reward once")
        try:
            specs[name] = float(value) if sep else 1.0
        except ValueError:
            raise ValueError(f"--reward {item!r}: {value!r} is not a number") from None
        if not math.isfinite(specs[name]):
            raise ValueError(f"--reward {item!r}: expected a finite weight, found {value!r}")
    if not any(specs.values()):
        raise ValueError(f"--reward {' '.join(items)}: every weight is 0, nothing would be optimised")
    return specs


def split_component_weights(items, names):
    """`--reward_weights` items -> {reward name: its items}: each `component=value` goes to the reward that
    has that component. Component names are unique across the training rewards (vq/mq/ta, alignment/...)."""
    owner = {c: name for name in names for c in training_reward_components(name)[0]}
    split = {name: [] for name in names}
    for item in items:
        component = item.partition("=")[0]
        if component not in owner:
            raise ValueError(f"reward weight {item!r}: expected name=value with name a component of "
                             f"{' / '.join(names)}: {list(owner)}")
        split[owner[component]].append(item)
    return split


def load_training_reward(name, path="", device="cpu", dtype=torch.float32, weight_items=(), processor_path=None):
    """One reward train.py can optimise (TRAINING_REWARDS), with the interface above: "videoalign" (the
    checkpoint at `path`), "clipscore" / "pickscore" (a CLIP / PickScore directory at `path`, its processor at
    `processor_path` if elsewhere), or one plugged in with register_training_reward. weight_items:
    "component=value" strings (`--reward_weights`), applied by the reward itself."""
    components, defaults = training_reward_components(name)
    weights = parse_weights(weight_items, components, defaults)
    return TRAINING_REWARDS[name].load(path, device, dtype, weights, processor_path)


class RewardMix:
    """Several training rewards and their weights: total = Σ_r w_r·reward_r (`--reward videoalign=1 clipscore=0.5`).

    Called as mix(frames, latents, prompts): each reward gets the input it declares (decoded frames or
    final latents). Returns {each reward's components, each reward's total under its name (when there
    are several), its diagnostics, "reward": the weighted total}, every value (B,). A sample for which
    a reward with a non-zero weight failed (NaN) gets a NaN total, so it is excluded and counted as today;
    a reward with weight 0 is only logged. With one reward, the output is that reward's own, unchanged.
    """

    def __init__(self, rewards, weights):
        self.rewards, self.weights = dict(rewards), dict(weights)  # {name: model}, {name: weight}
        self.names = tuple(self.rewards)
        many = len(self.names) > 1
        # logged per sample: the components of every reward, then (with several) each reward's total
        self.components = tuple(c for r in self.rewards.values() for c in r.components) + (self.names if many else ())
        self.diagnostics = tuple(d for r in self.rewards.values() for d in getattr(r, "diagnostics", ()))
        self.needs_frames = any(r.input == "frames" for r in self.rewards.values())

    def formula(self):
        """The total as a readable sum, e.g. "1·videoalign(0.5·vq + 0.5·mq + 1·ta) + 0.5·clipscore"; one
        reward alone: its own sum ("0.5·vq + 0.5·mq + 1·ta")."""
        sums = {n: " + ".join(f"{w:g}·{c}" for c, w in self.rewards[n].weights.items()) for n in self.names}
        if len(self.names) == 1:
            return sums[self.names[0]] or self.names[0]
        return " + ".join(f"{self.weights[n]:g}·{n}" + (f"({sums[n]})" if sums[n] else "") for n in self.names)

    def __call__(self, frames, latents, prompts):
        scores = {}
        for name, model in self.rewards.items():
            out = model(frames if model.input == "frames" else latents, prompts)
            out = out if isinstance(out, dict) else {"reward": out}  # CLIPScore / PickScore: one (B,) score
            scores.update({k: v for k, v in out.items() if k != "reward"})
            scores[name] = out["reward"]
        if len(self.names) == 1:
            scores["reward"] = scores.pop(self.names[0])
            return scores
        # r = Σ_r w_r·reward_r over the rewards with a non-zero weight (NaN in any of them: NaN)
        scores["reward"] = sum(w * scores[n].float() for n, w in self.weights.items() if w)
        return scores


def load_training_rewards(specs, paths, device="cpu", dtype=torch.float32, weight_items=(), processor_paths=None):
    """RewardMix of `specs` ({name: weight}, parse_reward_specs); paths: {name: directory} per reward that
    needs one; weight_items: `--reward_weights`, each sent to the reward owning that component."""
    split = split_component_weights(weight_items, tuple(specs))
    rewards = {name: load_training_reward(name, paths.get(name, ""), device, dtype, split[name],
                                          (processor_paths or {}).get(name))
               for name in specs}
    return RewardMix(rewards, specs)


# ----------------------------------------------------------------------------------------------
# VideoAlign.

class VideoAlignReward(nn.Module):
    """VideoReward: Qwen2-VL + linear head at the three reward tokens -> normalised VQ, MQ, TA, reward.

    Build with `from_pretrained`; call as `reward_model(frames, prompts, fps=24)`.
    """
    components = DIMENSIONS  # the training-reward interface (section above)
    input = "frames"

    def __init__(self, backbone, rm_head, tokenizer, *, means=(0.0, 0.0, 0.0), stds=(1.0, 1.0, 1.0),
                 weights=DEFAULT_WEIGHTS, sample_fps=DEFAULT_SAMPLE_FPS, target_frames=None,
                 min_pixels=DEFAULT_MIN_FRAME_PIXELS, max_pixels=DEFAULT_MAX_FRAME_PIXELS,
                 template=DETAILED_SPECIAL_TEMPLATE):
        super().__init__()
        if len(weights) != 3:
            raise ValueError(f"weights must be (w_vq, w_mq, w_ta), got {weights}")
        if min(stds) <= 0:
            raise ValueError(f"reward stds must be > 0, got {stds}")
        self.model = backbone  # transformers Qwen2VLModel
        self.rm_head = rm_head  # nn.Linear(D, N), N = 1 or 3
        self.tokenizer = tokenizer
        self.means, self.stds = tuple(float(m) for m in means), tuple(float(s) for s in stds)  # float64, any dtype
        self.weights = dict(zip(DIMENSIONS, (float(w) for w in weights)))  # {"vq": w_vq, "mq": w_mq, "ta": w_ta}
        self.sample_fps, self.target_frames = sample_fps, target_frames
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        self.template = template
        vocab = tokenizer.get_vocab()
        missing = [t for t in REWARD_TOKENS + QWEN2VL_SPECIAL_TOKENS if t not in vocab]
        if missing:
            raise ValueError(f"tokenizer lacks the Qwen2-VL / reward tokens {missing}")
        self.reward_token_ids = [vocab[t] for t in REWARD_TOKENS]
        self.video_token_id = vocab[VIDEO_PAD_TOKEN]
        if self.video_token_id != backbone.config.video_token_id:
            raise ValueError(f"tokenizer's {VIDEO_PAD_TOKEN} id {self.video_token_id} differs from the model "
                             f"config's video_token_id {backbone.config.video_token_id}")
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        vision = backbone.config.vision_config
        self.patch_size, self.temporal_patch_size = vision.patch_size, vision.temporal_patch_size
        self.merge_size = vision.spatial_merge_size
        # the longest sequence the model reads, and the tokens of the chat text around the prompt (no video)
        self.max_length = model_max_length(tokenizer, backbone.config.text_config.max_position_embeddings)
        self.chat_tokens = len(tokenizer(self.prompt_text("", 0), add_special_tokens=False)["input_ids"])

    # ---------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, path, device="cpu", dtype=torch.float32, weights=DEFAULT_WEIGHTS,
                        base_model_path=None, step=None):
        """Load the official VideoReward directory (layout in the module docstring).

        path: the directory with model_config.json and checkpoint-<step>/, or a hub id (KwaiVGI/VideoReward)
        already in the hub cache (hub.py). base_model_path: the base Qwen2-VL-2B-Instruct directory or hub id
        (default: model_config's model_name_or_path, looked up inside `path` first, then in the hub cache).
        step: which checkpoint-<step> (default: the highest).
        """
        from transformers import AutoTokenizer, Qwen2VLConfig, Qwen2VLModel
        from transformers.initialization import no_init_weights

        path = hub.resolve_path(path, "VideoAlign checkpoint")

        data, model_cfg, lora_cfg, inference = _read_model_config(path)
        checkpoint_dir = videoalign_checkpoint.find_checkpoint(path, step)
        base = videoalign_checkpoint.resolve_base_model(path, model_cfg.get("model_name_or_path", ""), base_model_path)

        # Tokenizer: the base one plus the three reward tokens, as VideoAlign's create_model_and_processor.
        tokenizer = AutoTokenizer.from_pretrained(base)
        tokenizer.add_special_tokens({"additional_special_tokens": list(REWARD_TOKENS)})

        layout, tensors = videoalign_checkpoint.read_checkpoint_tensors(checkpoint_dir)
        state = {}
        if layout == "adapter":  # base weights, embedding table resized to the tokenizer (resize_token_embeddings)
            state = {k: v for k, v in videoalign_checkpoint.read_safetensors_dir(base).items() if not k.startswith("lm_head.")}
            embed_key = "model.language_model.embed_tokens.weight"
            table = state[embed_key]
            if len(tokenizer) <= table.shape[0]:
                state[embed_key] = table[:len(tokenizer)]
            elif embed_key not in tensors and embed_key.replace(".weight", ".base_layer.weight") not in tensors:
                raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the base embedding only "
                                 f"{table.shape[0]} rows and the checkpoint does not provide the table")
        state.update(tensors)
        if lora_cfg.get("lora_enable", False) or any(".lora_" in k for k in state):
            r, alpha = lora_cfg.get("lora_r"), lora_cfg.get("lora_alpha")
            if not r or alpha is None:
                raise ValueError(f"{path}/{videoalign_checkpoint.MODEL_CONFIG_FILE}: LoRA weights present but peft_lora_config has "
                                 f"lora_r={r}, lora_alpha={alpha}")
            # s = α / r (PEFT), α / √r with rsLoRA
            lora_scale = alpha / math.sqrt(r) if lora_cfg.get("use_rslora", False) else alpha / r
            videoalign_checkpoint.merge_lora(state, lora_scale)

        head = state.pop("rm_head.weight", None)
        if head is None:
            raise KeyError(f"no reward head (rm_head.weight) in {checkpoint_dir}")
        config = Qwen2VLConfig.from_pretrained(base)
        config.text_config.vocab_size = state["model.language_model.embed_tokens.weight"].shape[0]
        if len(tokenizer) > config.text_config.vocab_size:
            raise ValueError(f"tokenizer has {len(tokenizer)} tokens, the embedding table "
                             f"{config.text_config.vocab_size} rows")
        config.text_config.use_cache = False
        with no_init_weights(), torch.device(device):  # built in place, every parameter overwritten below
            backbone = Qwen2VLModel._from_config(config, dtype=dtype)
        result = backbone.load_state_dict({k[len("model."):]: v for k, v in state.items()}, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise KeyError(f"{checkpoint_dir} does not match Qwen2-VL: missing {result.missing_keys[:5]} "
                           f"({len(result.missing_keys)}), unexpected {result.unexpected_keys[:5]} "
                           f"({len(result.unexpected_keys)})")
        rm_head = nn.Linear(head.shape[1], head.shape[0], bias=False)
        with torch.no_grad():
            rm_head.weight.copy_(head)
        if head.shape[0] not in (1, 3):
            raise ValueError(f"rm_head has {head.shape[0]} outputs; expected 1 or 3 (VQ, MQ, TA)")
        dims = ("VQ", "MQ", "TA")
        means = tuple(inference[f"{d}_mean"] for d in dims) if inference else (0.0, 0.0, 0.0)
        stds = tuple(inference[f"{d}_std"] for d in dims) if inference else (1.0, 1.0, 1.0)
        model = cls(backbone, rm_head, tokenizer, means=means, stds=stds, weights=weights,
                    sample_fps=data.get("fps") or DEFAULT_SAMPLE_FPS, target_frames=data.get("num_frames"),
                    min_pixels=data.get("min_frame_pixels", DEFAULT_MIN_FRAME_PIXELS),
                    max_pixels=data.get("max_frame_pixels") or DEFAULT_MAX_FRAME_PIXELS)
        return model.to(device=device, dtype=dtype).eval().requires_grad_(False)

    # ---------------------------------------------------------------- inputs
    def preprocess(self, frames, fps=DEFAULT_SOURCE_FPS):
        """One video (F, 3, H, W) in [0, 1] -> (pixel_values_videos, video_grid_thw (3,)) (steps 1-4)."""
        check_frames(frames)
        frames = frames[sample_frame_indices(frames.shape[0], fps, self.sample_fps, self.target_frames)]
        frames = frames.float().clamp(0, 1)
        height, width = frame_size(frames.shape[-2], frames.shape[-1], self.min_pixels, self.max_pixels,
                                   self.patch_size * self.merge_size)
        if (height, width) != tuple(frames.shape[-2:]):
            frames = F.interpolate(frames, size=(height, width), mode="bicubic", align_corners=False,
                                   antialias=True).clamp(0, 1)
        mean = torch.tensor(CLIP_MEAN, device=frames.device).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD, device=frames.device).view(1, 3, 1, 1)
        return patchify((frames - mean) / std, self.patch_size, self.temporal_patch_size, self.merge_size)

    def prompt_text(self, prompt, num_video_tokens):
        """Chat text for one video: template with the prompt, after num_video_tokens <|video_pad|> (step 5)."""
        text = self.template.format(text_prompt=prompt)
        return QWEN2VL_CHAT_FORMAT.format(video=VIDEO_PAD_TOKEN * num_video_tokens, text=text)

    def num_video_tokens(self, num_frames, height, width, fps=DEFAULT_SOURCE_FPS):
        """<|video_pad|> tokens of a video of that size: (T/2)·(H/14)·(W/14) / 2², T frames kept, H x W resized."""
        kept = len(sample_frame_indices(num_frames, fps, self.sample_fps, self.target_frames))
        h, w = frame_size(height, width, self.min_pixels, self.max_pixels, self.patch_size * self.merge_size)
        grid_t = math.ceil(kept / self.temporal_patch_size)  # an odd count repeats the last frame (patchify)
        return grid_t * (h // self.patch_size) * (w // self.patch_size) // self.merge_size ** 2

    def prompt_token_limit(self, num_frames, height, width, fps=DEFAULT_SOURCE_FPS):
        """Tokens of a prompt the model reads beside a video of that size: max_length less the chat text and the
        video's tokens (prompt_cuts)."""
        return self.max_length - self.chat_tokens - self.num_video_tokens(num_frames, height, width, fps)

    def prompt_ids(self, prompt, num_video_tokens):
        """Token ids of the chat text for one video (step 5). A prompt longer than the model reads is cut to its
        first tokens, so that the whole sequence, the reward tokens after the prompt included, fits max_length."""
        budget = self.max_length - self.chat_tokens - num_video_tokens
        text = prompt
        while True:
            if budget < 1:
                raise ValueError(f"a video of {num_video_tokens} tokens and the template's {self.chat_tokens} leave no "
                                 f"room for the prompt within the model's {self.max_length} tokens")
            text = leading_text(self.tokenizer, text, budget)
            ids = self.tokenizer(self.prompt_text(text, num_video_tokens), add_special_tokens=False)["input_ids"]
            if len(ids) <= self.max_length:
                return ids
            budget -= len(ids) - self.max_length  # the prompt's first / last token merged with the template's

    def build_inputs(self, videos, prompts, fps=DEFAULT_SOURCE_FPS):
        """Lists of videos and prompts -> model inputs: input_ids, attention_mask (B, L) right-padded,
        pixel_values_videos (ΣN, 1176), video_grid_thw (B, 3)."""
        pixel_values, grids, ids = [], [], []
        for video, prompt in zip(videos, prompts):
            pv, grid = self.preprocess(video, fps)
            num_video_tokens = int(grid.prod()) // self.merge_size ** 2
            ids.append(self.prompt_ids(prompt, num_video_tokens))
            pixel_values.append(pv)
            grids.append(grid)
        length = max(len(i) for i in ids)
        input_ids = torch.full((len(ids), length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(ids), length), dtype=torch.long)
        for b, i in enumerate(ids):
            input_ids[b, :len(i)] = torch.tensor(i)
            attention_mask[b, :len(i)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask,
                "pixel_values_videos": torch.cat(pixel_values), "video_grid_thw": torch.stack(grids)}

    # ---------------------------------------------------------------- scoring
    def raw_scores(self, input_ids, attention_mask, pixel_values_videos, video_grid_thw):
        """Unnormalised (VQ, MQ, TA) per video, (B, 3) float32: the head at the three reward tokens."""
        device = self.rm_head.weight.device
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        embeds = self.model.get_input_embeddings()(input_ids)  # (B, L, D)
        video_embeds = self.model.get_video_features(pixel_values_videos.to(device, self.model.visual.dtype),
                                                     video_grid_thw.to(device)).pooler_output
        video_embeds = torch.cat(video_embeds).to(embeds.dtype)  # (ΣN/4, D): one row per <|video_pad|>
        video_mask = (input_ids == self.video_token_id)[..., None]
        if video_mask.sum() != video_embeds.shape[0]:
            raise ValueError(f"{int(video_mask.sum())} video tokens in the text but "
                             f"{video_embeds.shape[0]} video embeddings")
        embeds = embeds.masked_scatter(video_mask, video_embeds)
        # Sequential positions in all three M-RoPE sections, as VideoAlign was trained (docstring).
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # (B, L)
        hidden = self.model.language_model(inputs_embeds=embeds, attention_mask=attention_mask,
                                           position_ids=positions[None].expand(3, -1, -1),
                                           use_cache=False).last_hidden_state  # (B, L, D)
        token_ids = torch.tensor(self.reward_token_ids, device=device)
        is_reward_token = input_ids[:, None, :] == token_ids[None, :, None]  # (B, 3, L)
        if not (is_reward_token.sum(-1) == 1).all():
            raise ValueError(f"every prompt must contain each of {REWARD_TOKENS} exactly once")
        reward_hidden = hidden[torch.arange(len(hidden), device=device)[:, None], is_reward_token.int().argmax(-1)]
        logits = self.rm_head(reward_hidden).float()  # (B, 3, N)
        # N = 3: dimension k reads output k at token k; N = 1: the single output at each token.
        return logits.diagonal(dim1=1, dim2=2) if logits.shape[-1] == 3 else logits[..., 0]

    def combine(self, raw):
        """(B, 3) raw scores -> dict of normalised vq, mq, ta and the weighted reward, each (B,)."""
        means = torch.tensor(self.means, dtype=raw.dtype, device=raw.device)
        stds = torch.tensor(self.stds, dtype=raw.dtype, device=raw.device)
        normalised = (raw - means) / stds  # r̃_k = (r_k − mean_k) / std_k
        scores = {name: normalised[:, k] for k, name in enumerate(DIMENSIONS)}
        # reward = w_vq·VQ + w_mq·MQ + w_ta·TA
        scores["reward"] = sum(self.weights[name] * scores[name] for name in DIMENSIONS)
        return scores

    @torch.no_grad()
    def forward(self, frames, prompts, fps=DEFAULT_SOURCE_FPS):
        """Score B videos. frames: (B, F, 3, H, W) in [0, 1] or a list of (F, 3, H, W); prompts: B strings;
        fps: frame rate of the source videos. Returns {"vq", "mq", "ta", "reward"}, each float32 (B,)
        on the model's device; NaN for a video that could not be scored (warning logged)."""
        videos = _as_video_list(frames, prompts)
        raw = torch.full((len(videos), 3), float("nan"), device=self.rm_head.weight.device)
        valid = []
        for b, video in enumerate(videos):
            try:
                check_frames(video)
                sample_frame_indices(video.shape[0], fps, self.sample_fps, self.target_frames)
                valid.append(b)
            except ValueError as error:
                logger.warning("VideoAlign: video %d gets NaN: %s", b, error)
        if valid:
            try:  # one batched forward for all valid videos
                raw[valid] = self.raw_scores(**self.build_inputs([videos[b] for b in valid],
                                                                 [prompts[b] for b in valid], fps))
            except Exception as error:  # noqa: BLE001 - isolate the failing video(s), one at a time
                logger.warning("VideoAlign: batched scoring failed (%s); scoring videos one by one", error)
                for b in valid:
                    try:
                        raw[b] = self.raw_scores(**self.build_inputs([videos[b]], [prompts[b]], fps))[0]
                    except Exception as single_error:  # noqa: BLE001
                        logger.warning("VideoAlign: video %d gets NaN: %s", b, single_error)
        return self.combine(raw)


# ==============================================================================================
# Evaluation scorers, not VideoAlign: CLIPScore and PickScore (eval.py reports them beside VideoAlign).
# ==============================================================================================

def _clip_frame_indices(num_frames, count):
    """`count` frame indices spread uniformly over [0, num_frames − 1], ends included."""
    return torch.linspace(0, num_frames - 1, min(count, num_frames)).round().long().tolist()


class ClipScore(nn.Module):
    """CLIPScore of each video: mean over sampled frames of 100·max(cos(image, text), 0).

    `from_pretrained(path)`: a transformers CLIPModel directory or hub id (hub.py); `processor_path` holds the
    image processor and tokenizer when they live elsewhere (PickScore_v1 uses the processor of
    laion/CLIP-ViT-H-14-laion2B-s32B-b79K).
    """

    input, components, weights = "frames", (), {}  # as a training reward: one number, of decoded frames

    def __init__(self, model, image_processor, tokenizer, num_frames=CLIP_NUM_FRAMES):
        super().__init__()
        self.model, self.image_processor, self.tokenizer = model, image_processor, tokenizer
        self.num_frames = num_frames
        # CLIP's text context (openai/clip-vit-large-patch14: 77 tokens, start and end tokens included)
        self.max_length = model_max_length(tokenizer, model.config.text_config.max_position_embeddings)

    def prompt_token_limit(self, num_frames=None, height=None, width=None, fps=None):
        """Tokens of a prompt CLIP reads: its context less the start / end tokens (prompt_cuts; no video in it)."""
        return self.max_length - self.tokenizer.num_special_tokens_to_add()

    @classmethod
    def from_pretrained(cls, path, processor_path=None, device="cpu", dtype=torch.float32, num_frames=CLIP_NUM_FRAMES):
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel
        path = hub.resolve_path(path, f"{cls.__name__} model")  # a directory, or a hub id in the hub cache
        processor_path = hub.resolve_path(processor_path, f"{cls.__name__} processor") if processor_path else path
        for d, need in ((path, "config.json"), (processor_path, "preprocessor_config.json")):
            if not os.path.isfile(os.path.join(d, need)):
                found = sorted(os.listdir(d)) if os.path.isdir(d) else "no such directory"
                raise FileNotFoundError(f"{os.path.join(d, need)} not found (a local CLIP model directory with "
                                        f"config.json, weights, preprocessor_config.json and tokenizer); found {found}")
        model = CLIPModel.from_pretrained(path, dtype=dtype).to(device).eval().requires_grad_(False)
        return cls(model, AutoImageProcessor.from_pretrained(processor_path),
                   AutoTokenizer.from_pretrained(processor_path), num_frames)

    def score(self, cosine):
        """Per-frame score from cos(image, text); CLIPScore = 100·max(cos, 0)."""
        return CLIPSCORE_SCALE * cosine.clamp(min=0)

    def _video_score(self, video, text_embed):
        check_frames(video)
        frames = video[_clip_frame_indices(video.shape[0], self.num_frames)]
        # uint8 HWC images, as CLIP's image processor expects (bicubic resize + centre crop + normalise)
        images = list((frames.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy())
        pixel_values = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        device, dtype = self.model.logit_scale.device, self.model.visual_projection.weight.dtype
        image_embeds = self.model.get_image_features(pixel_values=pixel_values.to(device, dtype)).pooler_output
        cosine = F.normalize(image_embeds.float(), dim=-1) @ text_embed  # (frames,)
        return self.score(cosine).mean()

    @torch.no_grad()
    def forward(self, frames, prompts):
        """frames: (B, F, 3, H, W) in [0, 1] or a list of (F, 3, H, W); prompts: B strings -> (B,) float32."""
        videos = _as_video_list(frames, prompts)
        device = self.model.logit_scale.device
        # the tokenizer's own truncation to CLIP's context, on a window of each prompt (token_window), not 100 kB
        pieces = [token_window(self.tokenizer, prompt, self.prompt_token_limit())[0] for prompt in prompts]
        text = self.tokenizer(pieces, padding=True, truncation=True, max_length=self.max_length,
                              return_tensors="pt").to(device)
        text_embeds = F.normalize(self.model.get_text_features(**text).pooler_output.float(), dim=-1)  # (B, D)
        scores = torch.full((len(videos),), float("nan"), device=device)
        for b, video in enumerate(videos):
            try:
                scores[b] = self._video_score(video, text_embeds[b])
            except Exception as error:  # noqa: BLE001 - one bad video must not stop the evaluation
                logger.warning("%s: video %d gets NaN: %s", type(self).__name__, b, error)
        return scores


class PickScore(ClipScore):
    """PickScore of each video: mean over sampled frames of exp(logit_scale)·cos(image, text)."""

    def score(self, cosine):
        return self.model.logit_scale.exp().float() * cosine
