"""The Wan2.1 family on the training machinery: FSDP2 per block, LoRA targets, Muon groups, Ulysses (CPU, gloo).

Fast tests check what the family object tells the shared code (LoRA targets, Muon's hidden blocks, the blocks
FSDP2 shards). The torchrun test (slow) runs on 2 ranks what train.py will run: distributed.load_policy on a
tiny Wan (rank-0 read, broadcast, FSDP2 per `blocks` entry, LoRA, gradient checkpointing) against the weights
on disk, and parallel.enable with sp = 2 against the unsplit forward and backward of one process.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

import distributed
import model
import optimizer
import parallel
import tiny
import wan

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_transformer():
    from diffusers import WanTransformer3DModel
    torch.manual_seed(0)
    return WanTransformer3DModel(**tiny.TINY_WAN_TRANSFORMER_CONFIG)


def test_the_family_names_the_blocks_fsdp_shards_and_muons_hidden_matrices():
    transformer = tiny_transformer()
    assert model.family_of_transformer(transformer) is wan.WanPolicy
    assert distributed.family_blocks(transformer) is transformer.blocks
    muon, adamw = optimizer.muon_groups(transformer.requires_grad_(True), grouping="hidden")
    matrices = {n for n, p in transformer.named_parameters() if p.ndim == 2}
    assert {n for n, _ in muon} == {n for n in matrices if n.startswith("blocks.")} != set()
    assert {n for n, _ in adamw} >= matrices - {n for n, _ in muon}  # embedders, proj_out: AdamW


def test_lora_targets_are_every_attention_projection_of_every_block():
    from peft import LoraConfig
    transformer = tiny_transformer()
    transformer.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=wan.LORA_TARGETS))
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in transformer.named_parameters() if ".lora_A." in n}
    expected = {f"blocks.{b}.{attention}.{projection}" for b in range(len(transformer.blocks))
                for attention in ("attn1", "attn2") for projection in ("to_q", "to_k", "to_v", "to_out.0")}
    assert adapted == expected


def torchrun(nproc, arguments, timeout=600):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] + arguments
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]


def worker(model_path, out_path):
    """Both ranks: (1) load_policy as train.py does, LoRA r 2, and compare with the disk weights' forward;
    (2) a plain tiny Wan, unsplit forward/backward, then split over the 2 ranks (sp = 2)."""
    import torch.distributed as dist
    from diffusers import WanTransformer3DModel
    from torch.distributed.fsdp import FSDPModule
    rank, world_size, device, mesh = distributed.setup(use_cuda=False)
    policy, anchor_module = distributed.load_policy(model_path, mesh, device, rank, torch.float32, lora_rank=2)
    disk = WanTransformer3DModel.from_pretrained(os.path.join(model_path, "transformer"), torch_dtype=torch.float32)
    generator = torch.Generator().manual_seed(rank)
    latents = torch.randn(1, 16, 3, 4, 4, generator=generator)
    text = torch.randn(2, 512, 32, generator=generator)
    embeds = wan.WanPromptEmbeds(text[:1], text[1:], torch.tensor([512]), torch.tensor([512]))
    with torch.no_grad():
        sharded = wan.cfg_velocity(policy, latents, 0.6, embeds)
        plain = wan.cfg_velocity(disk, latents, 0.6, embeds)
    trainable = sorted(n for n, p in policy.named_parameters() if p.requires_grad)
    result = {"load_max_abs_diff": (sharded - plain).abs().max().item(),
              "blocks_sharded": all(isinstance(b, FSDPModule) for b in policy.blocks),
              "checkpointing": policy.gradient_checkpointing,
              "trainable_are_lora": bool(trainable) and all(".lora_" in n for n in trainable)}

    transformer = tiny_transformer()
    g = torch.Generator().manual_seed(1)
    inputs = dict(hidden_states=torch.randn(2, 16, 3, 4, 4, generator=g), timestep=torch.tensor([500.0, 900.0]),
                  encoder_hidden_states=torch.randn(2, 7, 32, generator=g), return_dict=False)
    reference = transformer(**inputs)[0]
    reference.square().sum().backward()
    reference_grads = {n: p.grad.clone() for n, p in transformer.named_parameters() if p.grad is not None}
    transformer.zero_grad()
    parallel.enable(transformer, parallel.SequenceParallel(2), torch.device("cpu"))
    seen = []  # tokens each rank's blocks see: half of the 3 x 2 x 2 = 12 once split
    transformer.blocks[1].register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
    velocity = transformer(**inputs)[0]
    velocity.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in transformer.named_parameters() if p.grad is not None}
    for grad in grads.values():  # the full gradient is the sum over the group's ranks
        dist.all_reduce(grad)
    names = sorted(reference_grads)
    flat = lambda g: torch.cat([g[n].flatten() for n in names])  # noqa: E731
    result.update(velocity_max_abs_diff=(velocity - reference).abs().max().item(),
                  velocity_max_abs=reference.abs().max().item(),
                  gradient_relative_error=((flat(grads) - flat(reference_grads)).norm()
                                           / flat(reference_grads).norm()).item(),
                  same_parameters_have_gradients=sorted(grads) == names, block_tokens=seen[0])
    try:  # 3 x 2 x 1 = 6 tokens split over 2 ranks is fine; 3 x 2 x 1.5 is not a grid: use 3 x 1 x 1 = 3 tokens
        transformer(hidden_states=torch.randn(1, 16, 3, 2, 2), timestep=torch.tensor([500.0]),
                    encoder_hidden_states=torch.randn(1, 7, 32), return_dict=False)
        result["odd_tokens_error"] = None
    except ValueError as error:
        result["odd_tokens_error"] = str(error)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(result, f)
    dist.destroy_process_group()


@pytest.mark.slow
def test_wan_loads_sharded_with_lora_and_splits_over_two_ranks_like_one(tmp_path):
    path = tiny.build_tiny_wan(str(tmp_path / "wan"))
    out = tmp_path / "result.json"
    torchrun(2, [os.path.abspath(__file__), path, str(out)])
    result = json.loads(out.read_text())
    eps = torch.finfo(torch.float32).eps
    assert result["load_max_abs_diff"] == 0  # LoRA B = 0 at initialisation: the disk weights' forward exactly
    assert result["blocks_sharded"] and result["checkpointing"] and result["trainable_are_lora"]
    # a different summation order per rank: float32 round-off of the outputs' scale, ~ tokens x eps
    assert result["velocity_max_abs_diff"] <= 64 * eps * max(1.0, result["velocity_max_abs"])
    assert result["gradient_relative_error"] <= 64 * eps
    assert result["same_parameters_have_gradients"] and result["block_tokens"] == 6  # really split
    assert "must divide the number of video tokens: found 3 tokens" in result["odd_tokens_error"]


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2])
    distributed.exit_process(0)
