"""Tiny random models in the real on-disk layouts: the whole pipeline without downloading a weight.

Tests, `train.py --tiny` and `eval.py --tiny` build these instead of the real checkpoints. Each
builder writes a directory with the SAME library classes and the SAME layout as the real
checkpoint, so that it is loaded by the same code a user runs (`model.load_hunyuan`,
`reward.VideoAlignReward.from_pretrained`, `reward.ClipScore.from_pretrained`); only the sizes and
the (seeded, random) values differ. Nothing here is used by a real run.

    build_tiny_hunyuan(path)      HunyuanVideo-1.5: transformer, VAE, Qwen2.5-VL + byT5 text encoders
    build_tiny_wan(path)          Wan2.1-T2V: transformer, VAE, UMT5 text encoder, UniPC scheduler config
    build_tiny_videoalign(path)   VideoAlign (VideoReward): a Qwen2-VL base + LoRA checkpoint
    build_tiny_clip(path)         a CLIP model for CLIPScore / PickScore
    tiny_model_paths(root, ...)   what a `--tiny` run uses: the paths given, the others built once

Tokenizers are built offline: byte-level Qwen2 BPE (`byte_level_qwen2_tokenizer`), byT5's needs no files,
and Wan's UMT5 tokenizer is a T5 Unigram model over single characters (`character_t5_tokenizer`).
"""
import json
import os

import torch
from diffusers import (AutoencoderKLHunyuanVideo15, FlowMatchEulerDiscreteScheduler, HunyuanVideo15Pipeline,
                       HunyuanVideo15Transformer3DModel)
from diffusers.guiders import ClassifierFreeGuidance

import model
import reward
import videoalign_checkpoint

# The tiny models' video size, 5×16×16: the tiny HunyuanVideo-1.5 turns it into a (4, 3, 4, 4) latent (VAE 4×
# spatial, 2× temporal): a --tiny run's default size for this family (TINY_VIDEO_SIZES).
TINY_NUM_FRAMES, TINY_HEIGHT, TINY_WIDTH = 5, 16, 16
# The tiny transformer (diffusers' HunyuanVideo-1.5 pipeline tests): 4 latent channels (input: latent, image
# condition, mask = 2·4 + 1), one block of 2 heads x 8, widths of the tiny text encoders below (16, byT5's 32).
# benchmarks/gpu_check.py --tiny measures it in place of the real 8.3B model.
TINY_TRANSFORMER_CONFIG = dict(
    in_channels=2 * 4 + 1, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
    num_refiner_layers=1, mlp_ratio=2.0, text_embed_dim=16, text_embed_2_dim=32, image_embed_dim=12,
    rope_axes_dim=(2, 2, 4), target_size=16, task_type="t2v")


def tiny_model_paths(root, **paths):
    """The model directories of a `--tiny` run, e.g. tiny_model_paths(root, hunyuan="", videoalign="x").

    A path the user gave is used as it is and must exist (a random model is never written to a path
    the user chose); an empty one is built once under `root` (root/tiny_<name>) and reused after.
    Call on one process only (train.py: rank 0). Returns {name: path}.
    """
    # clipscore / pickscore: the training rewards' names for a CLIP model (train.py --reward)
    builders = {"hunyuan": build_tiny_hunyuan, "wan": build_tiny_wan, "videoalign": build_tiny_videoalign, "clip": build_tiny_clip,
                "clipscore": build_tiny_clip, "pickscore": build_tiny_clip}
    resolved = {}
    for name, path in paths.items():
        if name not in builders:
            raise ValueError(f"unknown tiny model {name!r}: expected one of {sorted(builders)}")
        if path:
            if not os.path.isdir(path):
                raise ValueError(f"--tiny with a given path for {name}: {path!r} does not exist (leave the flag "
                                 f"empty to build a random tiny {name} under {root!r})")
            resolved[name] = path
        else:
            resolved[name] = os.path.join(root, f"tiny_{name}")
            if not os.path.isdir(resolved[name]):
                builders[name](resolved[name] + ".tmp")
                os.replace(resolved[name] + ".tmp", resolved[name])  # complete or absent, never half-written
    return resolved


# ----------------------------------------------------------------------------------------------
# Tokenizers, built offline.

# Byte-level chat template in Qwen2.5's format (<|im_start|>role\ncontent<|im_end|>\n …).
TINY_CHAT_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
                      "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def byte_level_qwen2_tokenizer(special_tokens, bpe_text=None, vocab_size=1000):
    """A Qwen2 byte-level BPE tokenizer built offline: the 256 byte symbols, `special_tokens`, and BPE
    merges learned from `bpe_text` (up to `vocab_size` entries) or none (one token per byte).
    Merges keep long fixed texts short (VideoAlign's prompt template: a few hundred tokens, not
    thousands of bytes). Pads on the right, as Qwen2-VL / Qwen2.5-VL do."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if bpe_text is None:
        vocab, merges = {symbol: i for i, symbol in enumerate(sorted(alphabet))}, []
    else:
        bpe = Tokenizer(models.BPE())
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        bpe.train_from_iterator([bpe_text], trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=alphabet,
                                                                show_progress=False))
        vocab, merges = bpe.get_vocab(), [tuple(m) for m in json.loads(bpe.to_str())["model"]["merges"]]
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, padding_side="right")
    tokenizer.add_special_tokens({"additional_special_tokens": list(special_tokens)})
    return tokenizer


# ----------------------------------------------------------------------------------------------
# HunyuanVideo-1.5 (model.load_hunyuan reads it).

def build_tiny_hunyuan(path, seed=0, shift=5.0, guidance_scale=model.DEFAULT_GUIDANCE_SCALE):
    """Write a complete random tiny HunyuanVideo-1.5 directory to `path` (≈ 20 MB, a few seconds).

    Same classes and layout as the real checkpoint (loads with `load_hunyuan`); sizes from the diffusers
    HunyuanVideo-1.5 pipeline tests: 4 latent channels, VAE 4× spatial / 2× temporal, one transformer
    block; video TINY_NUM_FRAMES × TINY_HEIGHT × TINY_WIDTH -> latent (4, 3, 4, 4). `shift` and
    `guidance_scale` go to scheduler/ and guider/ as in the real 480p T2V checkpoint (5 and 6 there;
    tests write others to check that a run samples with the checkpoint's values). Returns path.
    """
    from transformers import ByT5Tokenizer, Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel, T5Config, T5EncoderModel
    tokenizer = byte_level_qwen2_tokenizer(["<|im_start|>", "<|im_end|>"])
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    tokenizer_2 = ByT5Tokenizer()  # byte-level, needs no files

    torch.manual_seed(seed)
    text_encoder = Qwen2_5_VLTextModel(Qwen2_5_VLTextConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, rope_theta=1e6,
        rope_scaling={"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
        bos_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.pad_token_id, pad_token_id=tokenizer.pad_token_id))
    text_encoder_2 = T5EncoderModel(T5Config(vocab_size=len(tokenizer_2), d_model=32, d_kv=8, d_ff=32, num_layers=1,
                                             num_heads=2))
    transformer = HunyuanVideo15Transformer3DModel(**TINY_TRANSFORMER_CONFIG)
    vae = AutoencoderKLHunyuanVideo15(latent_channels=4, block_out_channels=(16, 16), layers_per_block=1,
                                      spatial_compression_ratio=4, temporal_compression_ratio=2,
                                      downsample_match_channel=False, upsample_match_channel=False)
    pipeline = HunyuanVideo15Pipeline(
        text_encoder=text_encoder.eval(), tokenizer=tokenizer, transformer=transformer.eval(), vae=vae.eval(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=shift),  # 5: HunyuanVideo-1.5 480p T2V
        text_encoder_2=text_encoder_2.eval(), tokenizer_2=tokenizer_2,
        guider=ClassifierFreeGuidance(guidance_scale=guidance_scale))
    pipeline.save_pretrained(path)
    return path


# ----------------------------------------------------------------------------------------------
# Wan2.1-T2V (model.load_policy_family / wan.load_wan read it).

# A video size the tiny Wan turns into a (16, 3, 4, 4) latent: the real VAE's 4x temporal, 8x spatial
# compression (the tiny VAE keeps both), frames 4k + 1, sides multiples of 16 (VAE 8 x patch 2).
TINY_WAN_NUM_FRAMES = 9
TINY_WAN_HEIGHT = 32
TINY_WAN_WIDTH = 32
# The tiny transformer (diffusers' Wan pipeline tests): 16 latent channels as the real VAE's z_dim, patch
# (1, 2, 2), 2 blocks of 2 heads x 12 (heads divide sp 2), text width = the tiny UMT5's d_model.
TINY_WAN_TRANSFORMER_CONFIG = dict(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
    text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
    rope_max_seq_len=32)


# Each tiny family's default video size (config.default_video_size, --tiny) and transformer config (the heads
# --sp_size must divide, checked before the model is built), by tiny_model_paths' family name.
TINY_VIDEO_SIZES = {"hunyuan": (TINY_NUM_FRAMES, TINY_HEIGHT, TINY_WIDTH),
                    "wan": (TINY_WAN_NUM_FRAMES, TINY_WAN_HEIGHT, TINY_WAN_WIDTH)}
TINY_TRANSFORMER_CONFIGS = {"hunyuan": TINY_TRANSFORMER_CONFIG, "wan": TINY_WAN_TRANSFORMER_CONFIG}


def character_t5_tokenizer():
    """A T5 (UMT5-style) tokenizer built offline: a Unigram model over printable ASCII characters, each also in its
    word-initial form ("▁a"), plus <pad> (id 0, as UMT5's), </s> (appended to every prompt) and <unk>. It tokenises
    the way UMT5's sentencepiece model does (metaspace pre-tokenizer, </s> at the end, right padding) with one
    token per character, so prompt lengths differ by prompt and the cut-to-real-length step is exercised."""
    import string

    from transformers import T5Tokenizer
    characters = sorted(set(string.ascii_letters + string.digits + string.punctuation))
    vocab = ([("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
             + [(c, -3.0) for c in characters] + [("▁" + c, -2.5) for c in characters])
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def build_tiny_wan(path, seed=0, flow_shift=3.0, transformer_config=None):
    """Write a complete random tiny Wan2.1-T2V directory to `path` (≈ 2 MB, a second or two); returns path.

    Same classes and layout as Wan-AI/Wan2.1-T2V-1.3B-Diffusers (what `WanPipeline.save_pretrained` writes):
    transformer/ WanTransformer3DModel, vae/ AutoencoderKLWan (z_dim 16 and the real latents_mean / latents_std,
    4x temporal / 8x spatial, 3 base channels), text_encoder/ UMT5EncoderModel (2 layers, width 32), tokenizer/
    (`character_t5_tokenizer`), scheduler/ UniPCMultistepScheduler with flow_prediction, use_flow_sigmas and
    `flow_shift` (3.0: the real 480p config; tests write others to check that it is read). Video
    TINY_WAN_NUM_FRAMES x TINY_WAN_HEIGHT x TINY_WAN_WIDTH -> latent (16, 3, 4, 4), 12 tokens.
    transformer_config: keyword arguments over TINY_WAN_TRANSFORMER_CONFIG (e.g. more heads for a test, or the real
    1.3B config for benchmarks/gpu_check.py: the transformer is built once, in float32 on the CPU with its own random
    init, and written; the tiny UMT5's width follows its text_dim).
    """
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel
    tokenizer = character_t5_tokenizer()
    transformer_config = {**TINY_WAN_TRANSFORMER_CONFIG, **(transformer_config or {})}
    torch.manual_seed(seed)
    text_encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=len(tokenizer), d_model=transformer_config["text_dim"], d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id))
    transformer = WanTransformer3DModel(**transformer_config)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        flow_shift=flow_shift)  # as the real checkpoint's scheduler_config.json
    pipeline = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder.eval(), transformer=transformer.eval(),
                           vae=vae.eval(), scheduler=scheduler)
    pipeline.save_pretrained(path)
    return path


# ----------------------------------------------------------------------------------------------
# VideoAlign (reward.VideoAlignReward.from_pretrained reads it).

TINY_BASE_DIR = "tiny-Qwen2-VL"  # model_name_or_path of the tiny checkpoint, inside its directory
TINY_LORA_R, TINY_LORA_ALPHA = 2, 6  # s = 3: a wrong scale cannot go unnoticed
TINY_LORA_TARGETS = ("q_proj", "v_proj", "o_proj", "up_proj", "embed_tokens")
# Means / stds of VideoReward's inference_config (as published with the checkpoint's config).
TINY_INFERENCE_CONFIG = {"VQ_mean": 3.6757, "VQ_std": 2.2476, "MQ_mean": 1.1646, "MQ_std": 1.3811,
                         "TA_mean": 2.8105, "TA_std": 2.5121}


def _tiny_lora_entries(key, weight, generator):
    """Non-zero PEFT LoRA tensors for one target module, keys as PEFT names them ('default' adapter)."""
    prefix = key[:-len(".weight")]
    if "embed_tokens" in prefix:  # PEFT Embedding: A (r, num_embeddings), B (dim, r)
        a = torch.randn(TINY_LORA_R, weight.shape[0], generator=generator) * 0.1
        b = torch.randn(weight.shape[1], TINY_LORA_R, generator=generator) * 0.1
        return {prefix + ".lora_embedding_A.default": a, prefix + ".lora_embedding_B.default": b}
    return {prefix + ".lora_A.default.weight": torch.randn(TINY_LORA_R, weight.shape[1], generator=generator) * 0.1,
            prefix + ".lora_B.default.weight": torch.randn(weight.shape[0], TINY_LORA_R, generator=generator) * 0.1}


TINY_VIDEOALIGN_MAX_LENGTH = 2048


def build_tiny_videoalign(path, layout="full", output_dim=3, seed=0):
    """Write a tiny random VideoReward directory to `path` in the official layout; returns path.

    layout "full": checkpoint-N/model.pth holds the whole LoRA-wrapped model (PEFT key names,
    transformers-4.45 Qwen2-VL layout, rm_head as a modules_to_save copy); "adapter":
    checkpoint-N/adapter_model.safetensors (LoRA A/B) + non_lora_state_dict.pth (rm_head and the
    embedding table, which holds the trained reward-token rows), base weights in the base directory.
    LoRA deltas are non-zero. The base model (`TINY_BASE_DIR`) is a random Qwen2-VL whose embedding
    table has spare rows, as the real 2B has (151936 rows for 151657 tokens).
    """
    from safetensors.torch import save_file
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    if layout not in ("full", "adapter"):
        raise ValueError(f"layout must be 'full' or 'adapter', got {layout!r}")
    os.makedirs(path, exist_ok=True)
    tokenizer = byte_level_qwen2_tokenizer(reward.QWEN2VL_SPECIAL_TOKENS, bpe_text=reward.DETAILED_SPECIAL_TEMPLATE)
    vocab = tokenizer.get_vocab()
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed + 1)
    config = Qwen2VLConfig(
        text_config={"vocab_size": len(tokenizer) + 8, "hidden_size": 32, "intermediate_size": 64,
                     "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                     "rope_scaling": {"type": "mrope", "mrope_section": [2, 1, 1]}, "rope_theta": 1e6,
                     "max_position_embeddings": 4096, "initializer_range": 0.1, "pad_token_id": tokenizer.pad_token_id,
                     "bos_token_id": tokenizer.pad_token_id, "eos_token_id": vocab["<|im_end|>"]},
        vision_config={"depth": 2, "embed_dim": 16, "hidden_size": 32, "num_heads": 2, "mlp_ratio": 2,
                       "patch_size": 14, "temporal_patch_size": 2, "spatial_merge_size": 2,
                       "initializer_range": 0.1},  # larger than 0.02 so that the video visibly moves the scores
        image_token_id=vocab["<|image_pad|>"], video_token_id=vocab["<|video_pad|>"],
        vision_start_token_id=vocab["<|vision_start|>"], vision_end_token_id=vocab["<|vision_end|>"],
        tie_word_embeddings=True)
    base = Qwen2VLForConditionalGeneration(config).eval()
    base_dir = os.path.join(path, TINY_BASE_DIR)
    base.save_pretrained(base_dir)
    # the tokenizer states the longest sequence, as Qwen2-VL-2B-Instruct's does (model_max_length 32768, its
    # positions); 2048 here: a prompt cut at the limit costs the tiny model a few times a normal one (~920 tokens)
    tokenizer.model_max_length = TINY_VIDEOALIGN_MAX_LENGTH
    tokenizer.save_pretrained(base_dir)

    # The trained model, in transformers 4.45 names (model.layers…, visual…) wrapped by PEFT.
    num_tokens = len(tokenizer) + len(reward.REWARD_TOKENS)  # resize_token_embeddings(len(tokenizer)) after adding them
    trained = {}
    for key, value in base.state_dict().items():
        if key.startswith("lm_head."):
            continue
        legacy = key.replace("model.language_model.", "model.").replace("model.visual.", "visual.")
        value = value.clone()
        if legacy == "model.embed_tokens.weight":  # cut to the tokenizer; the reward-token rows are trained
            value = value[:num_tokens]
            value[-len(reward.REWARD_TOKENS):] = torch.randn(len(reward.REWARD_TOKENS), value.shape[1], generator=generator)
        trained[legacy] = value
    trained["rm_head.weight"] = torch.randn(output_dim, config.text_config.hidden_size, generator=generator) * 0.3

    lora, full = {}, {}
    for legacy, value in trained.items():
        name = "base_model.model." + legacy
        module = legacy[:-len(".weight")]
        if legacy.startswith("model.") and legacy.endswith(".weight") and module.split(".")[-1] in TINY_LORA_TARGETS:
            full[name.replace(".weight", ".base_layer.weight")] = value
            entries = _tiny_lora_entries(name, value, generator)
            full.update(entries)
            lora.update(entries)
        elif legacy == "rm_head.weight":  # modules_to_save: frozen original + trained copy
            full["base_model.model.rm_head.original_module.weight"] = torch.zeros_like(value)
            full["base_model.model.rm_head.modules_to_save.default.weight"] = value
        else:
            full[name] = value
    full["base_model.model.lm_head.weight"] = trained["model.embed_tokens.weight"]  # tied, unused by the reward

    checkpoint_dir = os.path.join(path, "checkpoint-12")
    os.makedirs(checkpoint_dir, exist_ok=True)
    if layout == "full":
        torch.save(full, os.path.join(checkpoint_dir, videoalign_checkpoint.FULL_CHECKPOINT_FILE))
    else:  # PEFT saves adapters without the adapter name; non-LoRA = trainable non-LoRA parameters
        save_file({k.replace(".default", ""): v.contiguous() for k, v in lora.items()},
                  os.path.join(checkpoint_dir, videoalign_checkpoint.ADAPTER_FILE))
        embed = "base_model.model.model.embed_tokens.base_layer.weight"
        torch.save({"base_model.model.rm_head.modules_to_save.default.weight": trained["rm_head.weight"],
                    embed: trained["model.embed_tokens.weight"]}, os.path.join(checkpoint_dir, videoalign_checkpoint.NON_LORA_FILE))
    os.makedirs(os.path.join(path, "checkpoint-3"), exist_ok=True)  # an older, empty step: the highest wins

    model_config = {
        "data_config": {"meta_data": "", "data_dir": "", "fps": reward.DEFAULT_SAMPLE_FPS, "num_frames": None,
                        "max_frame_pixels": 112 * 112, "min_frame_pixels": 56 * 56,  # tiny frames (our key)
                        "eval_dim": ["VQ", "MQ", "TA"], "prompt_template_type": reward.SUPPORTED_TEMPLATE,
                        "sample_type": "uniform"},
        "model_config": {"model_name_or_path": TINY_BASE_DIR, "output_dim": output_dim, "use_special_tokens": True,
                         "reward_token": "special"},
        "peft_lora_config": {"lora_enable": True, "vision_lora": False, "lora_r": TINY_LORA_R,
                             "lora_alpha": TINY_LORA_ALPHA, "lora_dropout": 0.05,
                             "lora_namespan_exclude": ["visual", "lm_head", "rm_head"], "use_rslora": False},
        "inference_config": TINY_INFERENCE_CONFIG,
    }
    with open(os.path.join(path, videoalign_checkpoint.MODEL_CONFIG_FILE), "w") as f:
        json.dump(model_config, f, indent=2)
    return path


# ----------------------------------------------------------------------------------------------
# CLIP, for CLIPScore and PickScore (reward.ClipScore.from_pretrained reads it).

def build_tiny_clip(path, seed=0):
    """Write a tiny random CLIPModel with its image processor and tokenizer to `path`; returns path."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPTokenizer
    from tokenizers import pre_tokenizers
    os.makedirs(path, exist_ok=True)
    # CLIP's BPE over a byte alphabet with end-of-word symbols; no merges (text is one token per byte)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {s: i for i, s in enumerate(alphabet + [s + "</w>" for s in alphabet])}
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    with open(os.path.join(path, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(path, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    tokenizer = CLIPTokenizer(os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt"))
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config={"vocab_size": len(vocab), "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 77,  # CLIP's text context
                     "bos_token_id": vocab["<|startoftext|>"], "eos_token_id": vocab["<|endoftext|>"],
                     "pad_token_id": vocab["<|endoftext|>"]},
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=8)
    CLIPModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return path
