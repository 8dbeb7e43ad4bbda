"""The planner (plan.py): its measurements against independent counts, its fit, its suggestions.

Shard sizes and optimizer states are checked on a 2-block HunyuanVideo-1.5 (same block shapes as the
8.3B model, fast) against a count of rank 0's FSDP2 chunk done here by hand; FLOPs of the real block
against the closed form; the activation fit against a fourth CPU measurement.
"""
import dataclasses
import math

import pytest

import optimizer as optim
import plan

pytestmark = pytest.mark.slow  # the whole module: train.py / eval.py runs (README: Test)


def rank0_chunk(shape, world_size):
    """Elements of rank 0's FSDP2 shard of a parameter: dim 0 cut in ceil(d0 / W) rows (torch.chunk)."""
    rows = min(shape[0], math.ceil(shape[0] / world_size)) if shape else 1
    return rows * math.prod(shape[1:])


@pytest.mark.parametrize("kind", ["adamw", "muon"])
@pytest.mark.parametrize("num_layers", [2, 5])  # 2: measured directly; 5: extended from 1 and 2 blocks
def test_sharded_weights_gradients_and_optimizer_states_are_rank0s_chunks(kind, num_layers):
    world_size = 4
    measured = plan.measure_states(world_size, 0, kind, num_layers=num_layers)
    model = plan.build_transformer(0, num_layers=num_layers)
    chunks = {name: rank0_chunk(tuple(p.shape), world_size) for name, p in model.named_parameters()}
    assert measured["weights"] == 4 * sum(chunks.values())  # fp32 master shards
    assert measured["gradients"] == 4 * sum(chunks.values())  # every parameter trainable
    if kind == "adamw":  # exp_avg + exp_avg_sq per parameter, + a float32 step counter each
        expected = 2 * 4 * sum(chunks.values()) + 4 * len(chunks)
    else:  # Muon: one momentum buffer per matrix; AdamW (2 buffers + step) for the rest
        muon, adamw = optim.muon_groups(model)
        expected = 4 * sum(chunks[n] for n, _ in muon) + 2 * 4 * sum(chunks[n] for n, _ in adamw) + 4 * len(adamw)
    assert measured["optimizer"] == expected
    assert measured["anchor"] == measured["weights"] // 2  # the same shards in bf16


def test_the_planner_builds_the_real_8_3b_transformer():
    assert sum(p.numel() for p in plan.build_transformer().parameters()) == 8_326_608_160
    assert len(plan.build_transformer().transformer_blocks) == 54


def test_block_flops_are_the_closed_form_and_backward_is_twice_forward():
    video, text, d = 1000, 50, 2048
    flops = plan.measure_flops(video, text)
    length = video + text
    # per token: q, k, v, out (4·D²) + feed-forward (2·4·D²) = 12·D² weights, 2 FLOPs each (video and text
    # streams have their own, every token uses one set); attention QKᵀ and PV: 2·2·L²·D; AdaLN-zero
    # modulation of both streams: 2 x (D -> 6D) on the one timestep embedding
    modulation = 2 * 2 * d * 6 * d
    assert flops["block_forward"] == 2 * 12 * d * d * length + 4 * length * length * d + modulation
    # backward: gradients of inputs and of weights, twice the forward; the modulation's input (the timestep
    # embedding) needs no gradient in this measurement, so it costs one forward's worth
    assert flops["block_backward"] == 2 * (flops["block_forward"] - modulation) + modulation
    assert flops["num_blocks"] == 54


def test_the_activation_fit_predicts_a_length_it_was_not_fitted_on():
    fit = plan.calibrate_activations()
    length = 384 + plan.CALIBRATION_TEXT
    predicted = fit["constant"] + fit["per_token"] * length + fit["per_token_squared"] * length ** 2
    assert plan.saved_activation_bytes(384) == pytest.approx(predicted, rel=0.01)
    assert 50 * 1024 < fit["per_token"] < 500 * 1024  # tens of KiB per token per block in bf16


def test_a_setup_that_does_not_fit_gets_changes_that_make_it_fit():
    limits = {"gpu_memory_gib": 65.0}  # the default 8-GPU setup (Muon) needs 68.2 GiB
    setup = plan.Setup("8 GPUs", world_size=8)
    assert not plan.plan(setup, **limits)["fits"]
    suggestions = plan.suggest(setup, max_suggestions=2, **limits)
    # --anchor_offload alone saves too little (1.9 GiB), --sp_size 4 does not divide the 18,018 video tokens
    assert [text for text, _ in suggestions] == ["--text_encoder_offload", "--sp_size 2"]
    assert all(plan.plan(changed, **limits)["fits"] for _, changed in suggestions)
    assert plan.suggest(dataclasses.replace(setup, sp_size=2), **limits) == []  # fits: nothing to change


def test_sequence_parallelism_divides_the_activations_and_the_block_flops():
    one, two = (plan.plan(plan.Setup(world_size=8, sp_size=sp)) for sp in (1, 2))
    name = "activations (update, checkpointed)"
    assert one["memory_gib"][name] / two["memory_gib"][name] == pytest.approx(2.0, rel=0.01)
    assert one["flops"]["iteration"] / two["flops"]["iteration"] == pytest.approx(2.0, rel=0.01)


def test_invalid_setups_are_refused_with_what_was_expected():
    with pytest.raises(ValueError, match="must divide the 18018 video tokens"):
        plan.plan(plan.Setup(world_size=8, sp_size=4))
    with pytest.raises(ValueError, match="expected a multiple of --group_size 4"):
        plan.plan(plan.Setup(world_size=1, videos_per_rank=2))


def test_the_command_prints_the_table_and_what_to_change(capsys):
    assert plan.main(["--world_size", "8", "--anchor_offload", "--gpu_memory_gib", "60"]) == 0
    printed = capsys.readouterr()
    out = printed.out
    assert "| **total GiB** (H100: 60.0) |" in out and "fits with: `--text_encoder_offload`" in out
    # progress while it measures, on stderr (the table alone on stdout): the setup, then the search for changes
    assert "plan: measuring custom: states over 8 fake rank(s)" in printed.err
    assert "plan: custom does not fit: trying up to 3 changes" in printed.err and "plan:" not in out


def test_the_report_says_no_quadratic_term_instead_of_printing_round_off():
    assert plan.quadratic_term({"per_token_squared": -0.0}) == " (no L² term)"
    assert plan.quadratic_term({"per_token_squared": 3e-9}) == " (no L² term)"
    assert plan.quadratic_term({"per_token_squared": 2.5}) == " + 2.5e+00 B x L"


# ------------------------------------------------------------------------------------------------
# Wan2.1 (--family wan): the published configs, counted by hand.

def wan_parameters(D, F, layers, text=4096, freq=256, channels=16, patch=4):
    """WanTransformer3DModel's parameter count in closed form (hidden D, feed-forward F)."""
    attention = 4 * (D * D + D) + 2 * D  # q, k, v, out (with biases), RMS norms of q and k across heads
    block = 2 * attention + 2 * D + (D * F + F + F * D + D) + 6 * D  # self + cross attention, norm2, ffn, modulation
    root = ((channels * patch * D + D) + (freq * D + D + D * D + D) + (D * 6 * D + 6 * D)  # patch, time, time_proj
            + (text * D + D + D * D + D) + (D * channels * patch + channels * patch) + 2 * D)  # text, head, table
    return layers * block + root


@pytest.mark.parametrize("size, width, ffn, layers", [("1.3B", 1536, 8960, 30), ("14B", 5120, 13824, 40)])
def test_the_planner_builds_the_published_wan_transformers(size, width, ffn, layers):
    transformer = plan.build_transformer(name=f"wan-{size}")
    assert sum(p.numel() for p in transformer.parameters()) == wan_parameters(width, ffn, layers)
    assert len(transformer.blocks) == layers and transformer.config.num_attention_heads * 128 == width


def test_wan_block_flops_are_the_closed_form():
    video, text, d, f = 1000, 512, 1536, 8960
    flops = plan.measure_flops(video, text, name="wan-1.3B")
    # self-attention q, k, v, out and cross-attention q, out on the video tokens (6·D² each), cross-attention
    # k, v on the text keys (2·D²), feed-forward 2·D·F; QKᵀ and PV of self (L²) and cross (L·T) attention
    forward = 2 * 6 * video * d * d + 2 * 2 * text * d * d + 4 * video * video * d + 4 * video * text * d \
        + 2 * 2 * video * d * f
    assert flops["block_forward"] == forward
    # backward twice the forward, except the text keys' input gradient (the text is not trained through)
    assert flops["block_backward"] == 2 * forward - 2 * 2 * text * d * d
    assert flops["num_blocks"] == 30


def test_wan_setups_plan_480p_and_240p_on_one_gpu_and_refuse_a_head_split_that_does_not_divide():
    setups = {s.name: s for s in plan.WAN_STANDARD_SETUPS}
    assert len(setups) == 4
    small = plan.plan(setups["1xH100 240p 33x240x416 LoRA"])
    assert small["tokens"] == 9 * 15 * 26 and small["fits"]  # 240x416x33 -> 3,510 latent tokens
    large = plan.plan(setups["1xH100 480p 81x480x832 full"])
    assert large["tokens"] == 21 * 30 * 52  # 32,760
    assert large["parameters"] == wan_parameters(1536, 8960, 30)
    with pytest.raises(ValueError, match="divide Wan's 12 attention heads"):
        plan.plan(dataclasses.replace(setups["1xH100 240p 33x240x416 LoRA"], world_size=8, sp_size=8))
    with pytest.raises(ValueError, match="--family wan --model_size 7B: expected one of"):
        plan.plan(plan.Setup(family="wan", model_size="7B"))


def test_the_command_plans_wan_by_family_and_size(capsys):
    assert plan.main(["--family", "wan", "--model_size", "1.3B", "--gpu_memory_gib", "80"]) == 0
    out = capsys.readouterr().out
    assert "1xH100 480p 81x480x832 full" in out and "text encoder (UMT5-XXL)" in out
    assert "transformer parameters 1.419B" in out
