"""Reading VideoAlign (VideoReward) checkpoints as released: the files, their two layouts, and LoRA merging.

reward.py's `VideoAlignReward.from_pretrained` reads a VideoReward directory with this module and builds the reward
model from the tensors it returns. A VideoReward directory holds model_config.json (read by reward.py: the prompt
template, the LoRA settings, the normalisation statistics) and checkpoint-<step>/ in one of two layouts:

    full     model.pth: every tensor of the fine-tuned Qwen2-VL and its reward head
    adapter  adapter_model.safetensors (LoRA pairs) + non_lora_state_dict.pth (the head and any fully trained
             module), over the base Qwen2-VL-2B-Instruct weights (a local directory or the hub cache, never
             downloaded)

Keys are mapped to the transformers-5 Qwen2-VL layout (`canonical_key`) and LoRA pairs are folded into plain
weights in float32 (`merge_lora`, also used by distributed.py to export a LoRA-trained policy).
"""
import glob
import os
import re

import torch

import hub

# Checkpoint file names (VideoAlign utils.load_model_from_checkpoint).
MODEL_CONFIG_FILE = "model_config.json"
FULL_CHECKPOINT_FILE = "model.pth"
ADAPTER_FILE = "adapter_model.safetensors"
NON_LORA_FILE = "non_lora_state_dict.pth"


def find_checkpoint(path, step=None):
    """The `checkpoint-<step>` directory to load: `step` if given, else the highest step."""
    found = {}
    for d in glob.glob(os.path.join(path, "checkpoint-*")):
        tail = os.path.basename(d)[len("checkpoint-"):]
        if os.path.isdir(d) and tail.isdigit():
            found[int(tail)] = d
    if not found:
        raise FileNotFoundError(f"no checkpoint-<step>/ directory in {path}: expected the VideoReward layout "
                                f"({MODEL_CONFIG_FILE} + checkpoint-<step>/), found {sorted(os.listdir(path))}")
    if step is None:
        return found[max(found)]
    if step not in found:
        raise FileNotFoundError(f"checkpoint-{step} not in {path}; available steps: {sorted(found)}")
    return found[step]


def canonical_key(key):
    """Map a VideoAlign state-dict key to the transformers-5 Qwen2-VL layout (None: drop the key).

    * PEFT wrapper: strip `base_model.model.` and the adapter name `.default`; a modules_to_save
      copy becomes the module's own weight and its frozen `original_module` is dropped.
    * transformers 4.45 layout -> 5: `visual.` -> `model.visual.`, `model.X` -> `model.language_model.X`
      (the same renaming transformers applies to legacy Qwen2-VL checkpoints).
    """
    if key.startswith("base_model.model."):
        key = key[len("base_model.model."):]
    key = re.sub(r"\.default(?=\.|$)", "", key)
    if ".original_module." in key:
        return None
    key = key.replace(".modules_to_save.", ".")
    if key.startswith("visual."):
        key = "model." + key
    elif key.startswith("model.") and not key.startswith(("model.language_model.", "model.visual.")):
        key = "model.language_model." + key[len("model."):]
    return key


def merge_lora(state, lora_scale):
    """Fold LoRA pairs into plain weights, in place: W = W_0 + s·B·A (embedding: W_0 + s·(B·A)ᵀ).

    `state` holds canonical keys; a LoRA-wrapped module P has `P.base_layer.weight` (or a plain
    `P.weight` from the base model) and `P.lora_A.weight` / `P.lora_B.weight` (embeddings:
    `P.lora_embedding_A` / `P.lora_embedding_B`). The merge is done in float32.
    """
    prefixes = {k[:-len(".lora_A.weight")] for k in state if k.endswith(".lora_A.weight")}
    prefixes |= {k[:-len(".lora_embedding_A")] for k in state if k.endswith(".lora_embedding_A")}
    for name in list(state):  # base_layer.* -> the module's own parameters
        if ".base_layer." in name:
            state[name.replace(".base_layer.", ".")] = state.pop(name)
    for prefix in sorted(prefixes):
        weight_key = prefix + ".weight"
        if weight_key not in state:
            raise KeyError(f"LoRA weights for {prefix} but no base weight {weight_key} in the checkpoint or base model")
        w0 = state[weight_key]
        if prefix + ".lora_A.weight" in state:
            a, b = state.pop(prefix + ".lora_A.weight").float(), state.pop(prefix + ".lora_B.weight").float()
            delta = b @ a  # (out, r) @ (r, in) = (out, in)
        else:  # embedding: A (r, num_embeddings), B (dim, r); the table is (num_embeddings, dim)
            a, b = state.pop(prefix + ".lora_embedding_A").float(), state.pop(prefix + ".lora_embedding_B").float()
            delta = (b @ a).T
        if delta.shape != w0.shape:
            raise ValueError(f"LoRA delta for {prefix} has shape {tuple(delta.shape)}, base weight {tuple(w0.shape)}")
        state[weight_key] = w0.float() + lora_scale * delta  # float32; the module's dtype decides later
    return state


def load_torch(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def read_safetensors_dir(path):
    """All tensors of the *.safetensors files in `path` (a base model directory), canonical keys."""
    from safetensors.torch import load_file
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in the base model directory {path}: the adapter layout "
                                f"({ADAPTER_FILE} + {NON_LORA_FILE}) needs the base Qwen2-VL weights")
    state = {}
    for f in files:
        state.update({canonical_key(k): v for k, v in load_file(f).items()})
    return state


def read_checkpoint_tensors(checkpoint_dir):
    """(layout, tensors with canonical keys) of one checkpoint-<step> directory."""
    full, adapter, non_lora = (os.path.join(checkpoint_dir, f) for f in (FULL_CHECKPOINT_FILE, ADAPTER_FILE,
                                                                         NON_LORA_FILE))
    if os.path.isfile(full):
        layout, raw = "full", load_torch(full)
    elif os.path.isfile(adapter) and os.path.isfile(non_lora):
        from safetensors.torch import load_file
        layout, raw = "adapter", {**load_torch(non_lora), **load_file(adapter)}
    else:
        raise FileNotFoundError(f"{checkpoint_dir} holds neither {FULL_CHECKPOINT_FILE} nor {ADAPTER_FILE} + "
                                f"{NON_LORA_FILE}; found {sorted(os.listdir(checkpoint_dir))}")
    tensors = {}
    for k, v in raw.items():
        key = canonical_key(k)
        if key is not None and not key.startswith("lm_head."):  # the LM head is unused by the reward
            tensors[key] = v
    return layout, tensors


def resolve_base_model(path, model_name_or_path, base_model_path):
    """Directory of the base Qwen2-VL (config.json + tokenizer): base_model_path if given (a directory or a
    hub id in the hub cache), else `path`/model_name_or_path, `path`/basename(model_name_or_path),
    model_name_or_path itself, and last, when it is a hub id (e.g. "Qwen/Qwen2-VL-2B-Instruct"), its
    snapshot in the hub cache (hub.py; never downloaded)."""
    if base_model_path:
        candidates = [hub.resolve_path(base_model_path, "base_model_path")]
    else:
        candidates = [os.path.join(path, model_name_or_path.lstrip("/")),
                      os.path.join(path, os.path.basename(model_name_or_path.rstrip("/"))), model_name_or_path]
        if hub.parse_repo_id(model_name_or_path):
            try:
                candidates.append(hub.resolve_path(model_name_or_path, "base model"))
            except FileNotFoundError:
                pass  # not in the hub cache either: the error below says how to get it
        candidates = list(dict.fromkeys(candidates))
    for c in candidates:
        if c and os.path.isfile(os.path.join(c, "config.json")):
            return c
    is_id = bool(hub.parse_repo_id(model_name_or_path)) and not base_model_path
    download = (f"`hf download {model_name_or_path}` (into the hub cache)" if is_id else
                f"`hf download Qwen/Qwen2-VL-2B-Instruct --local-dir {os.path.join(path, 'Qwen2-VL-2B-Instruct')}`")
    raise FileNotFoundError(
        f"base model {model_name_or_path!r} (model_config.json: model_name_or_path) not found: looked for "
        f"config.json in {candidates}{' and in the hub cache' if is_id else ''}. Download it once (this code never "
        f"downloads) with {download}, or pass base_model_path=")
