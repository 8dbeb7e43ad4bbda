"""optimizer.py: Muon + AdamW equals torch's optimizers built by hand; FSDP2 equals one process; resume.

The two-rank checks run this file under torchrun (gloo, CPU): `sharded_worker` at the bottom.
"""
import contextlib
import copy
import os
import subprocess
import sys

import pytest
import torch
from diffusers import HunyuanVideo15Transformer3DModel

import optimizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LR = 1e-2          # large enough that two steps move every weight visibly
NUM_STEPS = 2


class TinyNet(torch.nn.Module):
    """Embedding, two repeated blocks, a 3-D conv weight, an output projection."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(5, 8)
        self.conv = torch.nn.Conv1d(8, 8, kernel_size=1)
        self.transformer_blocks = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Linear(8, 12), torch.nn.LayerNorm(12), torch.nn.GELU(), torch.nn.Linear(12, 8))
            for _ in range(2))
        self.proj_out = torch.nn.Linear(8, 3)

    def forward(self, tokens):                                   # (B, L) -> (B, L, 3)
        hidden = self.conv(self.embed(tokens).transpose(1, 2)).transpose(1, 2)
        for block in self.transformer_blocks:
            hidden = hidden + block(hidden)
        return self.proj_out(hidden)


def tiny_transformer(seed=0):
    """The tiny HunyuanVideo-1.5 transformer of tiny.build_tiny_hunyuan (one block, one refiner block)."""
    torch.manual_seed(seed)
    return HunyuanVideo15Transformer3DModel(
        in_channels=2 * 4 + 1, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
        num_refiner_layers=1, mlp_ratio=2.0, text_embed_dim=16, text_embed_2_dim=32, image_embed_dim=12,
        rope_axes_dim=(2, 2, 4), target_size=16, task_type="t2v")


def transformer_loss(transformer, step, dtype=torch.float32):
    """A T2V forward on random inputs fixed by `step` (the same on every rank), and a quadratic loss. The inputs
    are drawn in fp32 whatever `dtype` (a float64 model sees the same values)."""
    generator = torch.Generator().manual_seed(step)
    hidden_states = torch.randn(1, 9, 3, 4, 4, generator=generator)     # (B, 2C+1, F, H, W)
    # no glyph tokens (a prompt without quoted text, as in training here): the 2048 x 2048 byT5 projector then gets
    # no gradient, whose bf16 Newton-Schulz would take minutes on a CPU without AVX-512
    text, glyph = torch.randn(1, 7, 16, generator=generator), torch.randn(1, 0, 32, generator=generator)
    output = transformer(hidden_states=hidden_states.to(dtype), timestep=torch.tensor([600.0], dtype=dtype),
                         encoder_hidden_states=text.to(dtype), encoder_attention_mask=torch.ones(1, 7),
                         encoder_hidden_states_2=glyph.to(dtype), encoder_attention_mask_2=torch.ones(1, 0),
                         image_embeds=torch.zeros(1, 0, 12, dtype=dtype), return_dict=False)[0]
    return output.pow(2).mean()


def train_steps(transformer, opt, steps):
    for step in steps:
        opt.zero_grad()
        transformer_loss(transformer, step).backward()
        opt.step()


# ----------------------------------------------------------------------------------------------
# One process.

def test_muon_step_equals_torch_muon_and_adamw_built_by_hand_bit_for_bit():
    torch.manual_seed(0)
    ours_model = TinyNet()
    hand_model = copy.deepcopy(ours_model)
    ours = [optimizer.build_optimizer(ours_model, "muon", lr=LR, weight_decay=0.1)]
    # by hand: the official grouping is "every 2-D parameter"; the 3-D conv weight joins AdamW
    matrices = [p for p in hand_model.parameters() if p.ndim == 2]
    others = [p for p in hand_model.parameters() if p.ndim != 2]
    hand = [torch.optim.Muon(matrices, lr=LR, weight_decay=0.1, momentum=0.95, nesterov=True,
                             adjust_lr_fn="match_rms_adamw"),
            torch.optim.AdamW(others, lr=LR, betas=(0.95, 0.95), eps=1e-8, weight_decay=0.1, fused=True)]
    tokens = torch.randint(0, 5, (4, 6), generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        for model, optimizers in ((ours_model, ours), (hand_model, hand)):
            for opt in optimizers:
                opt.zero_grad()
            model(tokens).pow(2).mean().backward()
            for opt in optimizers:
                opt.step()
    for (name, a), b in zip(ours_model.named_parameters(), hand_model.parameters()):
        assert torch.equal(a, b), name
    assert not torch.equal(ours_model.proj_out.weight, TinyNet().proj_out.weight)


def test_adamw_kind_is_torch_adamw_with_the_official_betas_on_every_trainable_parameter():
    model = TinyNet()
    model.embed.requires_grad_(False)
    opt = optimizer.build_optimizer(model, "adamw", lr=LR, weight_decay=0.01)
    assert type(opt) is torch.optim.AdamW
    assert opt.param_groups[0]["betas"] == (0.9, 0.999) and opt.param_groups[0]["eps"] == 1e-8
    assert {id(p) for p in opt.param_groups[0]["params"]} == {id(p) for p in model.parameters() if p.requires_grad}


def _names(pairs):
    return {name for name, _ in pairs}


def test_official_grouping_gives_muon_every_matrix_and_hidden_only_the_block_matrices():
    model = TinyNet()
    muon, adamw = optimizer.muon_groups(model, "official")
    assert _names(muon) == {"embed.weight", "proj_out.weight", "transformer_blocks.0.0.weight",
                            "transformer_blocks.0.3.weight", "transformer_blocks.1.0.weight",
                            "transformer_blocks.1.3.weight"}
    assert _names(adamw) == {n for n, _ in model.named_parameters()} - _names(muon)   # conv (3-D), biases, norm
    muon, adamw = optimizer.muon_groups(model, "hidden")
    assert _names(muon) == {n for n in _names(optimizer.muon_groups(model, "official")[0])
                            if n.startswith("transformer_blocks.")}
    assert {"embed.weight", "proj_out.weight", "conv.weight"} <= _names(adamw)


def test_muon_groups_of_the_tiny_transformer_cover_its_parameters_once():
    transformer = tiny_transformer()
    muon, adamw = optimizer.muon_groups(transformer, "official")
    assert sorted(_names(muon) | _names(adamw)) == sorted(n for n, _ in transformer.named_parameters())
    assert not _names(muon) & _names(adamw)
    assert "x_embedder.proj.weight" in _names(adamw)            # 5-D Conv3d: torch.optim.Muon takes 2-D only
    assert {"proj_out.weight", "cond_type_embed.weight", "context_embedder_2.linear_2.weight"} <= _names(muon)


def test_lora_matrices_go_to_muon_in_the_official_grouping_and_by_location_in_the_hidden_one():
    from peft import LoraConfig
    transformer = tiny_transformer()
    transformer.requires_grad_(False)
    transformer.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "proj_out"]))
    lora = {n for n, p in transformer.named_parameters() if p.requires_grad}
    assert lora and all(".lora_A." in n or ".lora_B." in n for n in lora)
    muon, adamw = optimizer.muon_groups(transformer, "official")
    assert _names(muon) == lora and not adamw                    # official: every 2-D parameter, adapters too
    muon, adamw = optimizer.muon_groups(transformer, "hidden")
    assert _names(adamw) == {n for n in lora if n.startswith("proj_out.")}   # outside the blocks: AdamW
    assert all("transformer_blocks." in n or "refiner_blocks." in n for n in _names(muon)) and muon


@pytest.mark.slow  # four Muon steps: Newton-Schulz of a 2048x2048 matrix in bf16 is slow on a CPU
def test_state_dict_round_trip_gives_the_same_next_step_in_one_process():
    model = tiny_transformer()
    opt = optimizer.build_optimizer(model, lr=LR)
    train_steps(model, opt, range(NUM_STEPS))
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    train_steps(model, opt, [NUM_STEPS])
    resumed = tiny_transformer(seed=1)
    resumed.load_state_dict(saved_model)
    resumed_opt = optimizer.build_optimizer(resumed, lr=LR)
    resumed_opt.load_state_dict(saved_opt)
    train_steps(resumed, resumed_opt, [NUM_STEPS])
    for (name, a), b in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name


def test_invalid_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="unknown optimizer kind 'sgd'"):
        optimizer.build_optimizer(TinyNet(), "sgd")
    with pytest.raises(ValueError, match="unknown grouping 'all'"):
        optimizer.muon_groups(TinyNet(), "all")
    with pytest.raises(ValueError, match="no parameters"):
        optimizer.build_optimizer(TinyNet().requires_grad_(False))


# ----------------------------------------------------------------------------------------------
# Two ranks, FSDP2 (gloo on CPU).

@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory):
    """The worker's results: full parameters after NUM_STEPS sharded steps, and its resume check."""
    output_dir = str(tmp_path_factory.mktemp("sharded"))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
               output_dir]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return torch.load(os.path.join(output_dir, "result.pt"))


@contextlib.contextmanager
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def synthetic_gradients(transformer, step):
    """Full-size gradients fixed by `step`, the same on every rank: {name: Tensor}. The byT5 glyph projector
    (context_embedder_2) gets zeros, as in training on prompts without quoted text: its 2048 x 2048 matrix would
    otherwise need a bf16 Newton-Schulz that takes minutes on a CPU without AVX-512 (every other matrix still
    goes through the gathered, orthogonalised, cut-back path)."""
    generator = torch.Generator().manual_seed(100 + step)
    gradients = {name: torch.randn(p.shape, generator=generator) for name, p in transformer.named_parameters()}
    return {name: g.zero_() if name.startswith("context_embedder_2.") else g for name, g in gradients.items()}


@pytest.mark.slow
def test_two_ranks_fsdp2_optimizer_step_equals_one_process_bit_for_bit_on_the_same_gradients(sharded_run):
    # the sharded Newton-Schulz sees the gathered matrix, so the update is exactly the unsharded one
    # (one thread, as the worker: bf16 matmuls sum in a thread-dependent order)
    model = tiny_transformer()
    opt = optimizer.build_optimizer(model, lr=LR)
    with single_thread():
        for step in range(NUM_STEPS):
            gradients = synthetic_gradients(model, step)
            for name, p in model.named_parameters():
                p.grad = gradients[name]
            opt.step()
    for name, parameter in model.named_parameters():
        assert torch.equal(sharded_run["synthetic_params"][name], parameter.detach()), name


def roundoff_bound(transformer, gradients):
    """A bound on the fp32 round-off of a gradient of `transformer`: n·u·max|g|, with u = 2^-24 the fp32 unit
    round-off, max|g| the largest gradient entry (the scale every sum in the backward works at) and n the
    number of floating-point additions a gradient entry can accumulate along its path: the longest sum of one
    layer (its fan-in or fan-out, or the tokens a weight gradient sums over) times the number of layers."""
    layers = [m for m in transformer.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv3d))]
    widest = max(max(m.weight.shape[0], m.weight[0].numel()) for m in layers)
    tokens = 3 * 4 * 4 + 7 + 7                                          # video (F·H·W after patching) + two texts
    n = max(widest, tokens) * len(layers)
    return n * 2.0 ** -24 * max(g.abs().max().item() for g in gradients.values())


@pytest.mark.slow
def test_two_ranks_fsdp2_gradients_equal_one_process_gradients_to_fp32_round_off(sharded_run):
    """Every rank feeds the same inputs, so FSDP2's averaged gradient is, exactly, the one-process gradient at the
    same weights; in fp32 the two differ by round-off only (another summation order; measured 4e-9 on one
    machine, 1.4e-6 after Adam on another). So each step's gradient is compared, at the worker's own weights
    before that step, with a float64 one-process reference, within the fp32 round-off bound above (a wrong
    average, a missing or doubled reduction, a shard mix-up are O(|g|) errors, far above it). That the optimizer
    then takes the same step from the same gradients is exact (the bit-for-bit test above); weights after the
    steps are not compared to a fixed tolerance: AdamW turns a round-off gradient (the key bias's, 0 in exact
    arithmetic: softmax ignores it) into a step of up to lr·|g|/ε, and that is no defect of the sharding."""
    for step in range(NUM_STEPS):
        reference = tiny_transformer().double()
        reference.load_state_dict({n: p.double() for n, p in sharded_run["params_before"][step].items()}, strict=False)
        transformer_loss(reference, step, torch.float64).backward()
        expected = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
        sharded = sharded_run["gradients"][step]
        assert sorted(sharded) == sorted(expected)
        bound = roundoff_bound(reference, expected)
        worst = max((sharded[n].double() - expected[n]).abs().max().item() for n in expected)
        assert worst <= bound, (step, worst, bound)
        print(f"step {step}: max |g_fsdp - g_float64| = {worst:.2e}, bound {bound:.2e}")
    initial = tiny_transformer().state_dict()
    moved = [n for n, p in sharded_run["params"].items() if not torch.equal(p, initial[n])]
    assert "transformer_blocks.0.attn.to_q.weight" in moved and "proj_out.weight" in moved


@pytest.mark.slow
def test_two_ranks_resume_from_dcp_optimizer_state_gives_the_same_next_step(sharded_run):
    assert sharded_run["resume_max_difference"] == 0.0


def sharded_worker(output_dir):
    """Run under torchrun with 2 ranks: FSDP2 (fully_shard per block, then the root) as train.py."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import distribute_tensor
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))

    def sharded_transformer(seed=0):
        transformer = tiny_transformer(seed)
        for block in transformer.transformer_blocks:
            fully_shard(block, mesh=mesh)
        return fully_shard(transformer, mesh=mesh)

    def full_params(transformer):
        return {name: p.full_tensor().detach().clone() for name, p in transformer.named_parameters()}

    # the optimizer alone: the same full gradients on every rank, each rank given its shard
    transformer = sharded_transformer()
    opt = optimizer.build_optimizer(transformer, lr=LR)
    for step in range(NUM_STEPS):
        gradients = synthetic_gradients(transformer, step)
        for name, p in transformer.named_parameters():
            p.grad = distribute_tensor(gradients[name], p.device_mesh, p.placements)
        opt.step()
    synthetic_params = full_params(transformer)
    # training: forward, backward (FSDP2 reduce-scatters the gradients), step
    transformer = sharded_transformer()
    opt = optimizer.build_optimizer(transformer, lr=LR)
    params_before, gradients = [], []
    for step in range(NUM_STEPS):  # train_steps, recording each step's weights and averaged full gradients
        opt.zero_grad()
        params_before.append(full_params(transformer))
        transformer_loss(transformer, step).backward()
        gradients.append({name: p.grad.full_tensor().detach().clone() for name, p in transformer.named_parameters()
                          if p.grad is not None})
        opt.step()
    params = full_params(transformer)
    # resume: save model and optimizer with DCP, take one more step; load both into fresh objects, step again
    checkpoint = os.path.join(output_dir, "checkpoint")
    dcp.save({"model": get_model_state_dict(transformer), "optimizer": get_optimizer_state_dict(transformer, opt)},
             checkpoint_id=checkpoint)
    train_steps(transformer, opt, [NUM_STEPS])
    resumed = sharded_transformer(seed=1)
    resumed_opt = optimizer.build_optimizer(resumed, lr=LR)
    state = {"model": get_model_state_dict(resumed), "optimizer": get_optimizer_state_dict(resumed, resumed_opt)}
    # partial: parameters that never get a gradient (the text-stream output of the last block) have no state
    dcp.load(state, checkpoint_id=checkpoint, planner=DefaultLoadPlanner(allow_partial_load=True))
    set_model_state_dict(resumed, state["model"])
    set_optimizer_state_dict(resumed, resumed_opt, state["optimizer"])
    train_steps(resumed, resumed_opt, [NUM_STEPS])
    after, after_resumed = full_params(transformer), full_params(resumed)
    difference = max((after[n] - after_resumed[n]).abs().max().item() for n in after)
    if dist.get_rank() == 0:
        torch.save({"synthetic_params": synthetic_params, "params": params, "params_before": params_before,
                    "gradients": gradients, "resume_max_difference": difference}, os.path.join(output_dir, "result.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":  # the torchrun worker of the two-rank tests above
    import distributed
    sharded_worker(*sys.argv[1:])
    distributed.exit_process(0)  # no teardown of the gloo group by the interpreter (see distributed.exit_process)


def test_newton_schulz_returns_torchs_result_and_zero_for_a_zero_matrix_without_iterating():
    """optimizer.newton_schulz short-cuts an all-zero momentum (a weight that never gets a gradient): the result must
    be torch's own NS_5 bit for bit, for a zero matrix (0) and for any other."""
    from torch.optim._muon import _zeropower_via_newtonschulz
    args = ((3.4445, -4.775, 2.0315), 5, 1e-7)
    for matrix in (torch.zeros(6, 4), torch.randn(6, 4, generator=torch.Generator().manual_seed(0))):
        ours, theirs = optimizer.newton_schulz(matrix, *args), _zeropower_via_newtonschulz(matrix, *args)
        assert ours.dtype == theirs.dtype == torch.bfloat16 and torch.equal(ours, theirs)
