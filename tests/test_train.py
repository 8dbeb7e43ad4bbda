"""train.py end to end on random tiny models (CPU, gloo): distributed equivalence, exact resume,
atomic checkpoints, non-finite updates skipped, and input errors raised before any model is loaded.

Every run is tiny (2 denoising steps, 5x16x16 video -> latent (4, 3, 4, 4), one transformer block);
the learning rate is raised to 1e-3 so that one update is far above float noise.
"""
import dataclasses
import json
import os
import re
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

import run_directory
import config
import distributed
import grpo
import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WEIGHTS = os.path.join("transformer", "diffusion_pytorch_model.safetensors")


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """A tiny HunyuanVideo-1.5 and a tiny VideoAlign, written once in the real on-disk layouts."""
    import tiny
    root = tmp_path_factory.mktemp("tiny_models")
    return tiny.build_tiny_hunyuan(str(root / "hunyuan")), tiny.build_tiny_videoalign(str(root / "videoalign"))


def tiny_args(tiny_models, output_dir, train_glyph_projector=False, **overrides):
    """The flags of a tiny run. The byT5 glyph projector is frozen unless asked (--no-train_glyph_projector): it is
    87 % of the tiny model's parameters, gets no gradient from these prompts, and would triple every checkpoint's
    size. The 2-rank run below trains it, as train.py does by default."""
    options = {"model_path": tiny_models[0], "reward_path": tiny_models[1], "output_dir": str(output_dir),
               "num_steps": 2, "group_size": 2, "videos_per_rank": 2, "lr": 1e-3, "sample_every": 0,
               "max_iterations": 1, "checkpoint_every": 1, **overrides}
    return (["--tiny"] + ([] if train_glyph_projector else ["--no-train_glyph_projector"])
            + [item for key, value in options.items() for item in (f"--{key}", str(value))])


def run(tiny_models, output_dir, *flags, **overrides):
    train.main(config.parse_config(tiny_args(tiny_models, output_dir, **overrides) + list(flags)))


def torchrun(nproc, tiny_models, output_dir, *flags, **overrides):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "train.py"] + tiny_args(tiny_models, output_dir, **overrides) + list(flags)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]


def metrics(output_dir, eval_rows=False):
    """The rows of the iterations; with eval_rows, --eval_every's iteration-0 row (the pretrained policy's) too."""
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [row for row in map(json.loads, f) if eval_rows or "reward_mean" in row]


def optimizer_state(checkpoint, tmp_path):
    """The sharded (DCP) optimizer state of a checkpoint as one plain dict."""
    os.makedirs(tmp_path, exist_ok=True)
    path = str(tmp_path / f"{os.path.basename(checkpoint)}_optimizer.pt")
    dcp_to_torch_save(os.path.join(checkpoint, "optimizer"), path)
    return torch.load(path, weights_only=False)["optimizer"]["state"]


def relative_error(a, b):
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


# ------------------------------------------------------------------------------------------------

EMA_DECAY = 0.75
HELD_OUT = ("a red kite over a hill", "a slow river at dawn", "a dog chasing a ball")  # 3 videos on 2 ranks: 2 + 1


@pytest.fixture(scope="module")
def two_rank_run(tiny_models, tmp_path_factory):
    """torchrun, 2 ranks x 2 videos, one group of 4 spanning both ranks, 2 iterations, an EMA of the weights."""
    output_dir = tmp_path_factory.mktemp("two_ranks")
    _write(output_dir.parent / "held_out.txt", "\n".join(HELD_OUT) + "\n")
    torchrun(2, tiny_models, output_dir, group_size=4, videos_per_rank=2, max_iterations=2, sample_every=1,
             optimizer="adamw", beta_schedule="two_stage", train_glyph_projector=True, ema_decay=EMA_DECAY,
             eval_every=1, eval_prompts=output_dir.parent / "held_out.txt")
    return output_dir


# The official recipe's values (paper; Tencent-Hunyuan/SAGE-GRPO post_train.py, train_grpo.sh), each named in its
# Config field's docstring. β's schedule is left to the trust-region tests (its default is a measured choice).
OFFICIAL_DEFAULTS = {"num_steps": 20, "eta": 0.5, "kernel": "sage", "group_size": 4,
                     "videos_per_rank": None,  # derived: 2 on the official 8 ranks (test below), 4 on one process
                     "same_noise_per_group": False, "clip_range": 1e-4, "adv_clip": 5.0, "train_step_fraction": 1.0,
                     "equalizer": True, "updates_per_rollout": 1, "kl_mode": "dual", "anchor_period": 10,
                     "sde_window": 0, "ema_decay": 0.0,  # every step stochastic and trained; no EMA
                     "kl_anchor_weight": 1.0, "kl_step_weight": 0.1, "optimizer": "muon", "lr": 1e-5,
                     "weight_decay": 0.01, "grad_clip": 1.0, "lora_rank": 0,
                     "seed": 42, "max_iterations": 10000, "checkpoint_every": 100, "sample_every": 50,
                     "reward": ["videoalign"], "beta_schedule": "official", "beta_start": 1e-7, "beta_end": 1e-5,
                     # None: on with CUDA (the official enable_gradient_checkpointing), off on a CPU
                     "gradient_checkpointing": None}


def test_config_defaults_are_the_official_recipes_values():
    defaults = config.parse_config([])  # what a user gets with no flags, through the real parser
    assert {name: getattr(defaults, name) for name in OFFICIAL_DEFAULTS} == OFFICIAL_DEFAULTS
    # videos per rank: the official batch_size 2 on its 8 ranks; on fewer ranks the fewest that fill whole groups
    assert [config.default_videos_per_rank(4, ranks) for ranks in (8, 4, 2, 1)] == [2, 2, 2, 4]
    assert config.default_videos_per_rank(8, 1) == 8 and config.default_videos_per_rank(4, 3) == 4


@pytest.mark.slow
def test_the_tiny_defaults_run_on_one_process(tmp_path):
    """`python train.py --tiny --num_steps 2 --max_iterations 1 --output_dir X`: no other flag needed on one process."""
    train.main(config.parse_config(["--tiny", "--num_steps", "2", "--max_iterations", "1", "--output_dir", str(tmp_path)]))
    (row,) = metrics(tmp_path)
    assert row["update_step"] == 1 and json.load(open(tmp_path / "checkpoint-000001" / "trainer_state.json"))[
        "config"]["videos_per_rank"] == 4   # one group of the default 4


def test_training_curves_are_drawn_from_the_metrics(tmp_path):
    from PIL import Image
    rows = [{"iteration": 1, "reward_mean": 0.1, "grad_norm": 3.0, "vq": 0.3}, {"iteration": 2, "reward_mean": 0.5},
            {"iteration": 3, "reward_mean": 0.2, "grad_norm": float("nan")},
            {"iteration": 2, "reward_mean": 0.4, "grad_norm": 2.0},  # iteration 2 again, after a resume: it wins
            {"iteration": 4, "reward_mean": 0.9, "vq": 0.7, "mq": "n/a", "reward_components": ["vq", "mq"],
             "eval/reward": 0.6},  # the held-out eval of the policy after 4 iterations
            {"iteration": 0, "eval/reward": 0.5}]  # --eval_every's row of the pretrained policy
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    drawn = run_directory.plot_metrics(str(tmp_path / "metrics.jsonl"), str(tmp_path / "curves.png"))
    assert drawn[("reward", "reward_mean")] == ([1, 2, 3, 4], [0.1, 0.4, 0.2, 0.9])
    xs, ys = drawn[("gradient norm", "grad_norm")]  # a NaN is drawn as a gap, a missing value is skipped
    assert xs == [1, 2, 3] and ys[:2] == [3.0, 2.0] and ys[2] != ys[2]
    assert drawn[("reward", "vq")] == ([1, 4], [0.3, 0.7])  # the components the rows name, where numeric
    assert ("reward", "mq") not in drawn and ("KL terms", "kl_step") not in drawn  # nothing numeric to draw
    assert drawn[("held-out eval (ODE, fixed seeds; --eval_every)", "eval/reward")] == ([0, 4], [0.5, 0.6])
    # three panels have data (reward, gradient norm, held-out eval): one row of three, no empty axes
    assert {title for title, _ in drawn} == {"reward", "gradient norm", "held-out eval (ODE, fixed seeds; --eval_every)"}
    image = Image.open(tmp_path / "curves.png")
    assert image.size == (13 * 80, 3.25 * 80)
    assert len(image.convert("L").getcolors(maxcolors=10 ** 6)) > 10  # drawn, not blank


@pytest.mark.slow
def test_a_run_draws_its_curves_from_its_own_metrics(two_rank_run):
    drawn = run_directory.plot_metrics(str(two_rank_run / "metrics.jsonl"), str(two_rank_run / "curves_again.png"))
    rewards = [r["reward_mean"] for r in metrics(two_rank_run)]
    assert drawn[("reward", "reward_mean")] == ([1, 2], rewards)
    os.remove(two_rank_run / "curves_again.png")


@pytest.mark.slow
def test_torchrun_two_ranks_trains_and_writes_a_checkpoint_that_eval_scores(two_rank_run, tiny_models, tmp_path):
    import eval as evaluate
    from diffusers import HunyuanVideo15Transformer3DModel
    rows = metrics(two_rank_run)
    assert [r["iteration"] for r in rows] == [1, 2]
    assert all(r["update_step"] == i + 1 and r["skipped_update"] == 0 for i, r in enumerate(rows))
    for key in ("reward_mean", "vq", "mq", "ta", "approx_kl", "clip_fraction", "kl_anchor", "kl_step", "beta",
                "grad_norm", "zero_std_ratio", "num_failed_rewards", "time_rollout", "time_update", "peak_memory_gb"):
        assert all(key in r for r in rows), key
    # on-policy (one update per rollout): the recomputed log-probs equal the recorded ones, ρ = 1 exactly
    assert all(r["ratio_max_dev_per_step"] == [0.0, 0.0] and r["approx_kl"] == 0 for r in rows)
    checkpoint = distributed.latest_checkpoint(str(two_rank_run))
    assert os.path.basename(checkpoint) == "checkpoint-000002"
    assert sorted(os.listdir(two_rank_run)) == [".lock", "checkpoint-000001", "checkpoint-000002", "curves.png", "metrics.jsonl",
                                                "samples"]  # --keep_checkpoints 2 by default
    transformer = HunyuanVideo15Transformer3DModel.from_pretrained(os.path.join(checkpoint, "transformer"))
    assert all(torch.isfinite(p).all() for p in transformer.parameters())
    assert os.listdir(os.path.join(two_rank_run, "samples"))
    prompts = _write(tmp_path / "prompts.txt", "a dog runs on a beach\na kite in the wind\n")
    results = evaluate.main(config.parse_config(
        ["--tiny", "--model_path", tiny_models[0], "--reward_path", tiny_models[1], "--checkpoints", checkpoint,
         "--prompts", prompts, "--output_dir", str(tmp_path / "eval"), "--num_steps", "2"], cls=evaluate.EvalConfig))
    assert [r["name"] for r in results] == ["base", "checkpoint-000002", "checkpoint-000002-ema"]  # and its EMA
    assert all(r["num_failed"] == 0 and torch.isfinite(torch.tensor(r["overall"])) for r in results)
    assert results[1]["samples"] != results[2]["samples"]


@pytest.mark.slow
def test_the_held_out_eval_of_a_two_rank_run_scores_the_weights_it_had_like_a_single_process(two_rank_run,
                                                                                              tiny_models):
    """Each row's eval/ numbers are the policy's ODE samples of the held-out prompts from the fixed seeds, scored by
    VideoAlign: recomputed here in one process from the weights on disk (the tiny model in the iteration-0 row, each
    checkpoint in the row of its iteration), with model.rollout and the reward model directly."""
    import model
    import reward
    import sde
    import tiny
    rows = metrics(two_rank_run)
    pipe = model.load_hunyuan(tiny_models[0], dtype=torch.float32)
    scorer = reward.load_training_rewards({"videoalign": 1.0}, {"videoalign": tiny_models[1]})
    sigmas = sde.shifted_sigmas(2, pipe.shift)
    shape = pipe.latent_shape(*tiny.TINY_VIDEO_SIZES["hunyuan"])
    embeds = model.encode_prompts(pipe, list(HELD_OUT))
    seeds = [train.EVAL_SEED + p for p in range(len(HELD_OUT))]
    rows = metrics(two_rank_run, eval_rows=True)
    assert [r["iteration"] for r in rows] == [0, 1, 2]  # before training, then after each iteration (the last too)
    for row, weights in zip(rows, [tiny_models[0], *(os.path.join(two_rank_run, f"checkpoint-00000{i}") for i in (1, 2))]):
        transformer = type(pipe.transformer).from_pretrained(os.path.join(weights, "transformer"))
        result = model.rollout(transformer, embeds, seeds, shape, sigmas, "ode", guidance_scale=pipe.guidance_scale)
        frames = model.decode_latents(pipe.vae, result.final_latents)
        scores = scorer(frames, result.final_latents, list(HELD_OUT))
        for name in ("reward", "vq", "mq", "ta"):
            expected = scores[name].double().mean().item()
            # fp32 end to end in both; the sharded forward sums in another order: a few ulps of each score
            assert row[f"eval/{name}"] == pytest.approx(expected, rel=1e-5, abs=1e-5), (name, row[f"eval/{name}"], expected)
        # 3 prompts x 2 steps x a CFG pair, per rank: rank 0 runs 2 of them, i.e. 12 forwards / 2 training videos
        assert row["forwards_eval"] == 2 * 2 * 2 / 2


@pytest.mark.slow
def test_the_ema_of_a_sharded_run_is_the_closed_form_average_of_its_weights(two_rank_run, tiny_models):
    """θ_ema after 2 updates = d²·θ_0 + d(1 − d)·θ_1 + (1 − d)·θ_2, from the weights on disk (the tiny model and the two
    checkpoints), in float64; the 2-rank run holds its EMA sharded, the checkpoint exports it whole."""
    d = EMA_DECAY
    theta = [load_file(os.path.join(tiny_models[0], WEIGHTS))] + [
        load_file(os.path.join(two_rank_run, f"checkpoint-00000{i}", WEIGHTS)) for i in (1, 2)]
    ema = load_file(os.path.join(two_rank_run, "checkpoint-000002", distributed.EMA_TRANSFORMER,
                                 "diffusion_pytorch_model.safetensors"))
    assert set(ema) == set(theta[2])
    moved = 0
    for name in ema:
        t0, t1, t2 = (t[name].double() for t in theta)
        expected = d * d * t0 + d * (1 - d) * t1 + (1 - d) * t2
        # two fp32 lerps, each rounding to half an ulp of the largest value involved
        bound = 2 * 2.0 ** -24 * max(t.abs().max().item() for t in (t0, t1, t2)) + 1e-30
        assert (ema[name].double() - expected).abs().max().item() <= bound, name
        moved += not torch.equal(t2, t0)
    assert moved > 10  # the run trained: the average is not the trivial one


def broadcast_load_worker(model_path, output_dir):
    """Run under torchrun (see the test below): load the policy as train.py does, check it on every rank."""
    import model
    import trust_region
    from diffusers import HunyuanVideo15Transformer3DModel as Transformer
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.tensor import DTensor
    rank, world_size, device, mesh = distributed.setup(use_cuda=False)
    policy, anchor_module = distributed.load_policy(model_path, mesh, device, rank, torch.float32)
    assert all(isinstance(p, DTensor) for m in (policy, anchor_module) for p in m.parameters())  # 2 ranks: sharded
    trust_region.MovingAnchor(policy, anchor=anchor_module)  # fills the anchor from the policy's shards
    disk = Transformer.from_pretrained(os.path.join(model_path, "transformer"), torch_dtype=torch.float32)
    reference = disk.state_dict()
    assert world_size == 2 and not list(disk.buffers())  # no buffers for to_empty to leave uninitialised
    for module in (policy, anchor_module):
        full = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True))  # every rank
        assert full.keys() == reference.keys()
        assert max((full[k] - reference[k]).abs().max().item() for k in reference) == 0
    # the same forward, sharded and plain (each rank its own input: the ranks are really independent)
    generator = torch.Generator().manual_seed(rank)
    latents = torch.randn(1, 4, 3, 4, 4, generator=generator)  # the tiny model's latent (C, F, H, W)
    text, glyph = (torch.randn(2, 7, dim, generator=generator) for dim in (16, 32))  # cond, negative
    embeds = model.PromptEmbeds(text[:1], torch.ones(1, 7), glyph[:1], torch.ones(1, 7),
                                text[1:], torch.ones(1, 7), glyph[1:], torch.ones(1, 7))
    with torch.no_grad():
        sharded = model.cfg_velocity(policy, latents, 0.6, embeds)
        plain = model.cfg_velocity(disk, latents, 0.6, embeds)
    assert torch.equal(sharded, plain), (sharded - plain).abs().max()
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_broadcast_load_gives_every_rank_the_weights_on_disk_and_the_plain_forward(tiny_models, tmp_path):
    """Rank 0 reads the weights, rank 1 builds on the meta device: afterwards both hold the disk weights."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
               tiny_models[0], str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]


def test_one_cpu_process_trains_the_plain_modules_unsharded(tiny_models, tmp_path, monkeypatch):
    """One CPU process: FSDP2 would shard over a single rank (copies, hooks), so train.py loads plain modules."""
    from torch.distributed.tensor import DTensor
    loaded, load_policy = [], distributed.load_policy
    monkeypatch.setattr(distributed, "load_policy", lambda *a, **k: loaded.append(load_policy(*a, **k)) or loaded[-1])
    run(tiny_models, tmp_path)
    (policy, anchor_module), = loaded
    assert anchor_module is not None  # the default KL has an anchor
    assert not any(isinstance(p, DTensor) for m in (policy, anchor_module) for p in m.parameters())
    assert not any(isinstance(p.grad, DTensor) for p in policy.parameters())


@pytest.mark.slow
def test_two_ranks_update_like_one_rank_on_the_same_global_batch(two_rank_run, tiny_models, tmp_path):
    # the same 4 videos (seeds are a function of the global sample index) on one rank, same 2 updates: FSDP2 over
    # two ranks against the plain module of one process (distributed.fsdp_needed)
    run(tiny_models, tmp_path, group_size=4, videos_per_rank=4, max_iterations=2, optimizer="adamw",
        beta_schedule="two_stage", train_glyph_projector=True)
    one, two = (distributed.latest_checkpoint(str(d)) for d in (tmp_path, two_rank_run))
    base = load_file(os.path.join(tiny_models[0], WEIGHTS))
    params_one, params_two = load_file(os.path.join(one, WEIGHTS)), load_file(os.path.join(two, WEIGHTS))
    flat = lambda params: torch.cat([params[k].flatten() for k in sorted(base)])  # noqa: E731
    assert (flat(params_one) - flat(base)).norm() > 1e-3 * flat(base).norm()  # the updates moved the weights
    assert relative_error(flat(params_two), flat(params_one)) < 1e-5
    # Adam's first moment is a running mean of the (clipped) gradient itself: the sharpest check of
    # the loss normalisation over ranks (a factor 2 would give 0.5). Measured: 2e-5, the float noise
    # of batch-4 vs batch-2 matmuls, amplified by the group normalisation of nearly equal rewards.
    state_one, state_two = optimizer_state(one, tmp_path / "one"), optimizer_state(two, tmp_path / "two")
    moment = lambda state: torch.cat([state[k]["exp_avg"].flatten() for k in sorted(state_one)])  # noqa: E731
    assert relative_error(moment(state_two), moment(state_one)) < 1e-4


@pytest.mark.slow
def test_a_frozen_glyph_projector_stays_put_and_the_rest_trains_as_before(two_rank_run, tiny_models, tmp_path):
    """--no-train_glyph_projector on 2 ranks: the projector (kept whole on each rank, not sharded) ends exactly
    as loaded, and every other weight as in the same run that trains it, since the tiny prompts quote no text
    and give the projector a zero gradient. The runs differ only in the projector's weight decay."""
    torchrun(2, tiny_models, tmp_path, group_size=4, videos_per_rank=2, max_iterations=2, sample_every=1,
             optimizer="adamw", beta_schedule="two_stage")
    base = load_file(os.path.join(tiny_models[0], WEIGHTS))
    frozen = load_file(os.path.join(distributed.latest_checkpoint(str(tmp_path)), WEIGHTS))
    trained = load_file(os.path.join(distributed.latest_checkpoint(str(two_rank_run)), WEIGHTS))
    glyph = [k for k in base if k.startswith("context_embedder_2.")]
    assert glyph and frozen.keys() == base.keys()
    assert all(torch.equal(frozen[k], base[k]) for k in glyph)
    assert any(not torch.equal(trained[k], base[k]) for k in glyph)  # weight decay moved it in the default run
    rest = sorted(set(base) - set(glyph))
    flat = lambda params: torch.cat([params[k].flatten() for k in rest])  # noqa: E731
    assert (flat(frozen) - flat(base)).norm() > 1e-3 * flat(base).norm()  # the rest trained
    assert relative_error(flat(frozen), flat(trained)) < 1e-6
    assert [r["reward_mean"] for r in metrics(tmp_path)] == [r["reward_mean"] for r in metrics(two_rank_run)]


@pytest.mark.slow
# Muon (momentum buffers), the official β controller's state and an EMA; AdamW's moments and the two-stage β resume
# bit-identically in tests/test_parallel.py (test_an_sp2_run_resumed_from_its_first_checkpoint_continues_bit_identically)
@pytest.mark.parametrize("optimizer, beta", [("muon", "official")])
def test_a_run_killed_after_iteration_two_resumes_exactly_like_an_uninterrupted_run(optimizer, beta, tiny_models,
                                                                                     tmp_path):
    # every piece of state matters here: 2 updates per rollout (clip and step-wise KL act), a large β (or the
    # official controller's state), the anchor refreshed after updates 3 and 6 (the checkpoint at update 4
    # holds the update-3 anchor), the optimizer's moments (AdamW) or momentum buffers (Muon)
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    options = {"max_iterations": 4, "checkpoint_every": 2, "updates_per_rollout": 2, "anchor_period": 3,
               "optimizer": optimizer, "beta_schedule": beta}
    if beta == "two_stage":
        options.update(beta_start=1.0, beta_end=1.0)
    else:  # and an EMA of the weights, whose average must resume too
        options.update(ema_decay=0.9)
    run(tiny_models, straight, **options)
    # the same run in its own process, SIGKILLed as soon as its iteration-2 checkpoint is complete
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()),  # same float arithmetic as in-process
           "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen([sys.executable, "train.py"] + tiny_args(tiny_models, interrupted, **options),
                               cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not os.path.isdir(interrupted / "checkpoint-000002"):
        assert process.poll() is None, "the run ended before it could be killed"
        time.sleep(0.01)
    process.kill()
    process.wait()
    assert not os.path.isdir(interrupted / "checkpoint-000004")
    run(tiny_models, interrupted, "--resume", **options)
    a, b = (distributed.latest_checkpoint(str(d)) for d in (straight, interrupted))
    assert os.path.basename(a) == os.path.basename(b) == "checkpoint-000004"
    params_a, params_b = load_file(os.path.join(a, WEIGHTS)), load_file(os.path.join(b, WEIGHTS))
    assert all(torch.equal(params_a[k], params_b[k]) for k in params_a)
    if "ema_decay" in options:  # the EMA, bit-identical, and not the weights themselves
        ema = os.path.join(distributed.EMA_TRANSFORMER, "diffusion_pytorch_model.safetensors")
        ema_a, ema_b = load_file(os.path.join(a, ema)), load_file(os.path.join(b, ema))
        assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)
        assert not all(torch.equal(ema_a[k], params_a[k]) for k in ema_a)
    state_a, state_b = optimizer_state(a, tmp_path / "a"), optimizer_state(b, tmp_path / "b")
    # every moment / momentum buffer of every parameter that has one (the resumed optimizer also holds empty
    # entries for parameters that never had a gradient)
    assert all(torch.equal(state_a[k][name], state_b[k][name]) for k in state_a for name in state_a[k] if name != "step")
    rows_a = metrics(straight)
    rows_b = metrics(interrupted)  # a row the killed run logged after its checkpoint was cut on resume
    assert [r["reward_mean"] for r in rows_a] == [r["reward_mean"] for r in rows_b]
    assert [r["kl_anchor"] for r in rows_a] == [r["kl_anchor"] for r in rows_b]
    assert [r["beta"] for r in rows_a] == [r["beta"] for r in rows_b]
    assert [r["anchor_refreshed"] for r in rows_a] == [False, True, True, False]  # after updates 3 and 6
    assert rows_a[-1]["kl_anchor"] > 0 and rows_a[-1]["kl_step"] > 0


@pytest.mark.slow
def test_a_crash_while_writing_a_checkpoint_leaves_the_previous_one_loadable(tiny_models, tmp_path, monkeypatch):
    run(tiny_models, tmp_path, max_iterations=1)
    previous = load_file(os.path.join(tmp_path, "checkpoint-000001", WEIGHTS))

    rename = os.rename

    def crash(source, destination):  # all of checkpoint-000002.tmp is written, then the job dies
        if os.path.basename(destination).startswith("checkpoint-"):
            raise RuntimeError("killed during the checkpoint write")
        rename(source, destination)
    monkeypatch.setattr(distributed.os, "rename", crash)
    with pytest.raises(run_directory.RunError, match=r"checkpoint-000002 could not be written \(RuntimeError: killed during the "
                       r"checkpoint write\); its partial files were removed; the newest intact checkpoint is "
                       r".*checkpoint-000001"):
        run(tiny_models, tmp_path, "--resume", max_iterations=2)
    monkeypatch.undo()

    assert not os.path.isdir(tmp_path / "checkpoint-000002.tmp")  # a failed write leaves nothing behind
    assert distributed.latest_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-000001")
    reloaded = load_file(os.path.join(tmp_path, "checkpoint-000001", WEIGHTS))
    assert all(torch.equal(previous[k], reloaded[k]) for k in previous)
    run(tiny_models, tmp_path, "--resume", max_iterations=2, keep_checkpoints=1)  # and training goes on from it
    assert sorted(d for d in os.listdir(tmp_path) if d.startswith("checkpoint")) == ["checkpoint-000002"]
    run(tiny_models, tmp_path, "--resume", max_iterations=4, keep_checkpoints=2)  # retention
    assert sorted(d for d in os.listdir(tmp_path) if d.startswith("checkpoint")) == ["checkpoint-000003", "checkpoint-000004"]


KILLED_MID_WRITE = """
import os, sys, time
sys.path.insert(0, {repo!r})
import safetensors.torch
import config
import train

def torn_write_then_hang(tensors, path, *args, **kwargs):
    # what a SIGKILL in the middle of writing the weights leaves: a torn file inside checkpoint-N.tmp
    with open(path, "wb") as f:
        f.write(b"torn")
    open({marker!r}, "w").close()
    time.sleep(600)

safetensors.torch.save_file = torn_write_then_hang
train.main(config.parse_config(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_sigkill_in_the_middle_of_a_checkpoint_write_leaves_the_previous_one_loadable(tiny_models, tmp_path):
    run(tiny_models, tmp_path, max_iterations=1)
    previous = load_file(os.path.join(tmp_path, "checkpoint-000001", WEIGHTS))
    # a second process resumes, and is SIGKILLed while it writes checkpoint-000002's weights
    marker = tmp_path.parent / (tmp_path.name + "-writing")
    script = tmp_path.parent / (tmp_path.name + "-killed_mid_write.py")
    script.write_text(KILLED_MID_WRITE.format(repo=REPO, marker=str(marker)))
    process = subprocess.Popen([sys.executable, str(script)] + tiny_args(tiny_models, tmp_path, max_iterations=2)
                               + ["--resume"], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not marker.exists():
        assert process.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.05)
    process.kill()
    process.wait()

    torn = tmp_path / "checkpoint-000002.tmp" / WEIGHTS
    assert torn.read_bytes() == b"torn"                       # the kill really left a half-written checkpoint
    assert distributed.latest_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-000001")
    reloaded = load_file(os.path.join(tmp_path, "checkpoint-000001", WEIGHTS))
    assert all(torch.equal(previous[k], reloaded[k]) for k in previous)
    run(tiny_models, tmp_path, "--resume", max_iterations=2)  # training goes on from the intact one
    # the torn .tmp is cleaned at start; both numbered checkpoints are kept (--keep_checkpoints 2)
    assert sorted(d for d in os.listdir(tmp_path) if d.startswith("checkpoint")) == ["checkpoint-000001",
                                                                                     "checkpoint-000002"]


@pytest.mark.slow
def test_resuming_with_different_settings_is_an_error_that_lists_them(tiny_models, tmp_path):
    run(tiny_models, tmp_path, max_iterations=1)
    with pytest.raises(ValueError, match=r"--eta 0.7 \(checkpoint: 0.5\).*--kernel 'flow_grpo' \(checkpoint: 'sage'\)"):
        run(tiny_models, tmp_path, "--resume", max_iterations=2, kernel="flow_grpo", eta=0.7)
    # a longer run is not a different setting, and --allow_config_change overrides the check
    config.check_config(config.parse_config(tiny_args(tiny_models, tmp_path, max_iterations=9) + ["--resume"]), 1)
    config.check_config(config.parse_config(tiny_args(tiny_models, tmp_path, max_iterations=2, kernel="flow_grpo")
                                          + ["--resume", "--allow_config_change"]), 1)


@pytest.mark.slow
def test_a_transformer_saved_in_shards_loads_with_diffusers_like_the_single_file(two_rank_run, tmp_path):
    from diffusers import HunyuanVideo15Transformer3DModel
    single = HunyuanVideo15Transformer3DModel.from_pretrained(os.path.join(two_rank_run, "checkpoint-000002", "transformer"))
    distributed.save_transformer(single, str(tmp_path / "sharded"), rank=0, max_shard_size="2MB")
    files = sorted(os.listdir(tmp_path / "sharded"))
    assert "diffusion_pytorch_model.safetensors.index.json" in files
    assert sum(f.endswith(".safetensors") for f in files) > 1
    sharded = HunyuanVideo15Transformer3DModel.from_pretrained(str(tmp_path / "sharded"))
    a, b = single.state_dict(), sharded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_a_non_finite_loss_skips_the_update_and_never_writes_nan_weights(tiny_models, tmp_path, monkeypatch):
    clipped_policy_loss = grpo.clipped_policy_loss

    def nan_loss(*args, **kwargs):
        loss, stats = clipped_policy_loss(*args, **kwargs)
        return loss * float("nan"), stats
    monkeypatch.setattr(grpo, "clipped_policy_loss", nan_loss)
    run(tiny_models, tmp_path, max_iterations=1)
    (row,) = metrics(tmp_path)
    assert row["skipped_update"] == 1 and row["update_step"] == 0
    base = load_file(os.path.join(tiny_models[0], WEIGHTS))
    saved = load_file(os.path.join(tmp_path, "checkpoint-000001", WEIGHTS))
    assert all(torch.equal(base[k], saved[k]) for k in base)


@pytest.mark.slow
def test_lora_trains_only_the_adapters(tiny_models, tmp_path):
    pytest.importorskip("peft")  # optional dependency
    run(tiny_models, tmp_path, lora_rank=4)
    path = str(tmp_path / "policy.pt")
    dcp_to_torch_save(os.path.join(tmp_path, "checkpoint-000001", "policy"), path)
    policy = torch.load(path, weights_only=False)["policy"]
    base = load_file(os.path.join(tiny_models[0], WEIGHTS))
    lora_b = [k for k in policy if "lora_B" in k]
    assert lora_b and any(policy[k].abs().sum() > 0 for k in lora_b)  # B starts at 0 and was trained
    frozen = {k.replace(".base_layer", ""): v for k, v in policy.items() if "lora_" not in k}
    assert frozen.keys() == base.keys() and all(torch.equal(frozen[k], base[k]) for k in base)
    # transformer/ holds the merged weights: they equal PEFT's own merge of the same adapters
    from diffusers import HunyuanVideo15Transformer3DModel
    from peft import LoraConfig
    reference = HunyuanVideo15Transformer3DModel.from_pretrained(os.path.dirname(os.path.join(tiny_models[0], WEIGHTS)))
    reference.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0", "add_q_proj",
                                                                       "add_k_proj", "add_v_proj", "to_add_out"]))
    missing, unexpected = reference.load_state_dict(policy, strict=False)
    assert not unexpected and not [k for k in missing if "lora_" in k]
    for module in reference.modules():
        if hasattr(module, "merge") and hasattr(module, "base_layer"):
            module.merge()                                                   # peft: W += scale·B·A in place
    expected = {k.replace(".base_layer", ""): v for k, v in reference.state_dict().items() if "lora_" not in k}
    saved = HunyuanVideo15Transformer3DModel.from_pretrained(os.path.join(tmp_path, "checkpoint-000001", "transformer"))
    assert saved.state_dict().keys() == expected.keys()
    assert max((saved.state_dict()[k] - expected[k]).abs().max().item() for k in expected) < 1e-6
    assert any(not torch.equal(saved.state_dict()[k], base[k]) for k in base)  # the adapters changed something


@pytest.mark.slow
def test_muon_on_two_ranks_updates_like_one_rank(tiny_models, tmp_path):
    """train.py with Muon on 2 ranks (every matrix sharded in two, orthogonalised whole) updates like 1 rank.

    Not to float precision: Newton-Schulz sets every singular value of the momentum to ~1, including the
    near-null directions where the gradient is float noise (e.g. a key bias's gradient is exactly 0 in
    exact arithmetic), so the round-off of batch-4 vs batch-2 gradients becomes a visible part of the
    update. Measured: 2.6 % of the update (one thread on both sides). With the same gradients the sharded
    optimizer equals the unsharded one bit for bit (tests/test_optimizer.py); here the bound is 10 %."""
    torchrun(2, tiny_models, tmp_path / "two", group_size=4, videos_per_rank=2, beta_schedule="two_stage")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun rank: bf16 matmuls (Newton-Schulz) sum in a thread-dependent order
    try:
        run(tiny_models, tmp_path / "one", group_size=4, videos_per_rank=4, beta_schedule="two_stage")
    finally:
        torch.set_num_threads(threads)
    base = load_file(os.path.join(tiny_models[0], WEIGHTS))
    one, two = (load_file(os.path.join(tmp_path / d, "checkpoint-000001", WEIGHTS)) for d in ("one", "two"))
    flat = lambda params: torch.cat([params[k].flatten() for k in sorted(base)])  # noqa: E731
    update_one, update_two = flat(one) - flat(base), flat(two) - flat(base)
    assert update_one.norm() > 1e-4 * flat(base).norm()  # the update is far above float noise
    assert relative_error(update_two, update_one) < 0.1


@pytest.mark.slow
def test_the_official_beta_ramps_once_per_sample_and_step_pair(tiny_models, tmp_path):
    # 2 samples x 2 steps = 4 controller updates per iteration; the pair n's loss uses the β before update n:
    # β_n = 1e-7 + (1e-5 - 1e-7)·n/100, so iteration 1 averages n = 0..3 and iteration 2 n = 4..7
    run(tiny_models, tmp_path, max_iterations=2, checkpoint_every=2)
    ramp = lambda n: 1e-7 + (1e-5 - 1e-7) * n / 100  # noqa: E731
    expected = [sum(ramp(n) for n in range(4)) / 4, sum(ramp(n) for n in range(4, 8)) / 4]
    assert [r["beta"] for r in metrics(tmp_path)] == pytest.approx(expected, rel=1e-9)


@pytest.mark.slow
def test_same_noise_per_group_gives_a_group_one_initial_noise_and_its_own_sde_noise(tiny_models, tmp_path,
                                                                                   monkeypatch):
    import model
    calls = record_rollouts(monkeypatch, model)
    captured = []
    rollout = model.rollout

    def keep(*args, **kwargs):
        result = rollout(*args, **kwargs)
        captured.append(result.latents)
        return result
    monkeypatch.setattr(model, "rollout", keep)
    run(tiny_models, tmp_path, "--same_noise_per_group", group_size=2, videos_per_rank=4)
    latents = captured[-1]  # (4, N+1, C, F, H, W): groups (0, 1) and (2, 3)
    assert torch.equal(latents[0, 0], latents[1, 0]) and torch.equal(latents[2, 0], latents[3, 0])
    assert not torch.equal(latents[0, 0], latents[2, 0])
    assert not torch.equal(latents[0, 1], latents[1, 1])  # the first SDE step already differs within a group
    assert calls


@pytest.mark.slow
def test_the_mp4_reward_input_scores_the_round_tripped_videos(tiny_models, tmp_path):
    run(tiny_models, tmp_path / "frames")
    run(tiny_models, tmp_path / "mp4", reward_input="mp4")
    (frames,), (mp4,) = metrics(tmp_path / "frames"), metrics(tmp_path / "mp4")
    # the same videos (same seeds, same weights), scored after an 8-bit crf-25 encode: close, not equal
    assert frames["vq"] != mp4["vq"] and abs(frames["vq"] - mp4["vq"]) < 0.05


# ------------------------------------------------------------------------------------------------
# One source for every setting.

def record_rollouts(monkeypatch, module):
    """Wrap module.rollout so that every call's schedule and CFG scale are recorded."""
    calls, rollout = [], module.rollout

    def recording(transformer, embeds, seeds, latent_shape, sigmas, kernel="sage", eta=0.5, guidance_scale=6.0, **kw):
        calls.append({"sigmas": torch.as_tensor(sigmas).clone(), "guidance_scale": guidance_scale,
                      "latent_shape": tuple(latent_shape)})
        return rollout(transformer, embeds, seeds, latent_shape, sigmas, kernel, eta, guidance_scale, **kw)
    monkeypatch.setattr(module, "rollout", recording)
    return calls


@pytest.fixture(scope="module")
def shift3_model(tmp_path_factory):
    """A tiny HunyuanVideo-1.5 whose scheduler says shift 3 and whose guider says CFG 4 (the real one: 5, 6)."""
    import tiny
    return tiny.build_tiny_hunyuan(str(tmp_path_factory.mktemp("shift3") / "hunyuan"), shift=3.0, guidance_scale=4.0)


@pytest.mark.slow
def test_a_run_samples_with_the_checkpoints_shift_and_cfg_scale_unless_flags_override(shift3_model, tiny_models,
                                                                                      tmp_path, monkeypatch, capsys):
    import model
    calls = record_rollouts(monkeypatch, model)
    run((shift3_model, tiny_models[1]), tmp_path / "from_checkpoint")
    # the schedule re-derived by hand: σ_i = linspace(1, 0, 3), shifted with s = 3 -> [1, 0.75, 0]
    assert torch.allclose(calls[-1]["sigmas"].float(), torch.tensor([1.0, 0.75, 0.0]))
    assert calls[-1]["guidance_scale"] == 4.0
    assert "shift 3 (the checkpoint's scheduler config), CFG scale 4 (the checkpoint's guider config)" in capsys.readouterr().out
    with open(tmp_path / "from_checkpoint" / "checkpoint-000001" / "trainer_state.json") as f:
        saved = json.load(f)["config"]
    assert (saved["shift"], saved["cfg_scale"]) == (3.0, 4.0)  # what the run used, not None
    run((shift3_model, tiny_models[1]), tmp_path / "overridden", shift=1.0, cfg_scale=2.5)
    assert torch.allclose(calls[-1]["sigmas"].float(), torch.tensor([1.0, 0.5, 0.0])) and calls[-1]["guidance_scale"] == 2.5
    assert "shift 1 (--shift), CFG scale 2.5 (--cfg_scale)" in capsys.readouterr().out


@pytest.mark.slow
def test_the_reward_weights_are_applied_once_by_the_reward_model(tiny_models, tmp_path):
    run(tiny_models, tmp_path, "--reward_weights", "vq=0", "ta=2")
    (row,) = metrics(tmp_path)
    # every sample's reward is 0·VQ + 0.5·MQ (default kept) + 2·TA, so the means obey the same sum
    assert row["reward_mean"] == pytest.approx(0.5 * row["mq"] + 2.0 * row["ta"], rel=1e-5, abs=1e-6)
    assert row["reward_mean"] != pytest.approx(0.5 * row["vq"] + 0.5 * row["mq"] + row["ta"], rel=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("normalization", ["per_reward", "total"])
def test_two_rewards_are_logged_by_name_and_their_advantages_follow_the_normalization(normalization, tiny_models,
                                                                                      tmp_path, monkeypatch):
    import reward
    seen, used = [], []
    mix_call, loss = reward.RewardMix.__call__, grpo.clipped_policy_loss
    monkeypatch.setattr(reward.RewardMix, "__call__", lambda self, *a: seen.append(mix_call(self, *a)) or seen[-1])
    monkeypatch.setattr(grpo, "clipped_policy_loss", lambda lp, old, adv, *a: used.append(adv.clone()) or loss(lp, old, adv, *a))
    run(tiny_models, tmp_path, "--reward", "videoalign=1", "pickscore=0.5", "--reward_normalization", normalization,
        group_size=4, videos_per_rank=4)
    (row,) = metrics(tmp_path)
    (scores,) = seen
    va, pick = scores["videoalign"].double(), scores["pickscore"].double()
    assert row["videoalign"] == pytest.approx(va.mean().item(), rel=1e-6)  # logged by name
    assert row["pickscore"] == pytest.approx(pick.mean().item(), rel=1e-6)
    assert row["reward_mean"] == pytest.approx(row["videoalign"] + 0.5 * row["pickscore"], rel=1e-5)
    assert pick.std() > 0 and va.std() > 0

    def z(x):  # one group of 4: (x − mean)/(population std + ε), written out
        return (x - x.mean()) / (x.std(unbiased=False) + grpo.ADVANTAGE_EPS)
    expected = z(z(va) + 0.5 * z(pick)) if normalization == "per_reward" else z(va + 0.5 * pick)
    for advantages in used:  # every trained step of the one update sees the same advantages
        torch.testing.assert_close(advantages.double(), expected, rtol=1e-4, atol=1e-5)
    other = z(va + 0.5 * pick) if normalization == "per_reward" else z(z(va) + 0.5 * z(pick))
    assert not torch.allclose(expected, other, atol=1e-2)  # the two modes really differ on these rewards


@pytest.mark.slow
def test_the_vae_tiling_and_precision_flags_reach_the_vae_that_decodes_the_rollouts(tiny_models, tmp_path, monkeypatch):
    import model
    seen, decode = [], model.decode_latents
    def recording_decode(vae, latents):
        fp16 = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.float16
        seen.append((vae.use_tiling, vae.tile_latent_min_height, fp16))
        return decode(vae, latents)
    monkeypatch.setattr(model, "decode_latents", recording_decode)
    run(tiny_models, tmp_path / "on", "--vae_tiling", "--vae_precision", "fp16")
    run(tiny_models, tmp_path / "auto")  # the default: on with CUDA only, so off here; the VAE's own dtype
    assert seen == [(True, model.VAE_TILE_SIZE // 4, True), (False, seen[1][1], False)]  # the tiny VAE compresses 4x
    for run_dir, used, precision in (("on", True, "fp16"), ("auto", False, "model")):  # the values used, not None
        with open(tmp_path / run_dir / "checkpoint-000001" / "trainer_state.json") as f:
            saved = json.load(f)["config"]
        assert saved["vae_tiling"] is used and saved["vae_precision"] == precision


# ------------------------------------------------------------------------------------------------
# Bad input: a clear ValueError before any model is loaded or a process group started.

def _write(path, text):
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("case, message", [
    ("missing_model", r"--model_path '/nonexistent/hunyuan' is not a directory"),
    ("not_diffusers", r"expected a 'transformer' subdirectory"),
    ("missing_reward", r"--reward_path '/nonexistent/videoalign' is not a directory"),
    ("group_too_big", r"1 x 2 = 2 videos per iteration cannot hold whole groups of group_size 4"),
    ("unknown_kernel", r"unknown kernel 'euler'"),
    ("ode_kernel", r"unknown kernel 'ode'.*ode has no noise"),
    ("unknown_kl_mode", r"unknown KL mode 'adaptive'"),
    ("empty_prompts", r"contains no prompts"),
    ("csv_without_prompt_column", r"expected a CSV column 'prompt'"),
    ("missing_prompts", r"prompt file '/nonexistent/prompts.txt' does not exist"),
    ("resume_without_checkpoint", r"--resume: no complete checkpoint"),
    ("lora_without_peft", r"--lora_rank > 0 needs the optional dependency peft"),
    ("tiny_missing_model", r"--model_path '/nonexistent/tiny' is not a directory.*with --tiny, give an existing"),
    ("nan_reward_weight", r"reward weight 'vq=nan': expected a finite number"),
    ("unknown_reward_weight", r"reward weight 'aesthetics=1': expected name=value with name a component of "
                              r"videoalign: \['vq', 'mq', 'ta'\]"),
    ("unknown_reward", r"--reward 'aesthetics': expected name or name=weight with name one of"),
    ("world_reward_without_world", r"--reward world scores the synthetic world's latents: it needs --world"),
    ("clip_reward_without_path", r"--clip_path is required \(a local directory or a hub id"),
    ("unknown_normalization", r"unknown --reward_normalization 'zscore'"),
])
@pytest.mark.slow
def test_bad_input_raises_a_clear_error_before_any_work(case, message, tmp_path, monkeypatch):
    if case == "lora_without_peft":  # hide peft whether or not it is installed
        monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` then raises ImportError
    def not_reached(*args):
        raise AssertionError("the checks must run before the process group and the models")
    monkeypatch.setattr(distributed, "setup", not_reached)
    real = tmp_path / "model"
    (real / "transformer").mkdir(parents=True)
    args = {"missing_model": ["--model_path", "/nonexistent/hunyuan", "--reward_path", str(tmp_path)],
            "not_diffusers": ["--model_path", str(tmp_path / "model" / "transformer"), "--reward_path", str(tmp_path)],
            "missing_reward": ["--model_path", str(real), "--reward_path", "/nonexistent/videoalign"],
            "group_too_big": ["--tiny", "--group_size", "4", "--videos_per_rank", "2"],
            "unknown_kernel": ["--tiny", "--kernel", "euler"],
            "ode_kernel": ["--tiny", "--kernel", "ode"],
            "unknown_kl_mode": ["--tiny", "--kl_mode", "adaptive"],
            "empty_prompts": ["--tiny", "--prompts", _write(tmp_path / "empty.txt", "\n  \n")],
            "csv_without_prompt_column": ["--tiny", "--prompts", _write(tmp_path / "p.csv", "text\na cat\n")],
            "missing_prompts": ["--tiny", "--prompts", "/nonexistent/prompts.txt"],
            "resume_without_checkpoint": ["--tiny", "--resume", "--output_dir", str(tmp_path / "empty_run")],
            "lora_without_peft": ["--tiny", "--lora_rank", "8"],
            "tiny_missing_model": ["--tiny", "--model_path", "/nonexistent/tiny"],
            "nan_reward_weight": ["--tiny", "--reward_weights", "vq=nan"],
            "unknown_reward_weight": ["--tiny", "--reward_weights", "aesthetics=1"],
            "unknown_reward": ["--tiny", "--reward", "aesthetics"],
            "world_reward_without_world": ["--tiny", "--reward", "world"],
            "clip_reward_without_path": ["--world", "--reward", "world", "clipscore", "--videos_per_rank", "2"],
            "unknown_normalization": ["--tiny", "--reward_normalization", "zscore"],
            }[case]
    if "--group_size" not in args:
        args += ["--group_size", "2"]  # a group of 2: the fewest videos per rank (2) on one process
    with pytest.raises(ValueError, match=message):
        train.main(config.parse_config(args))


# ------------------------------------------------------------------------------------------------
# The small pieces.

def test_help_lists_every_flag_in_its_group_and_the_planner(capsys):
    with pytest.raises(SystemExit):
        config.parse_config(["--help"], extra=[("--plan", config.PLAN_HELP)], usage=config.USAGE)
    text = capsys.readouterr().out
    titles = ["model and data:", "run:", "sampling (rollouts):", "GRPO:", "trust region:", "reward:", "optimizer:",
              "parallelism and memory:", "logging and tracking:", "reliability:"]
    positions = [text.index("\n" + title + "\n") for title in titles]
    assert positions == sorted(positions)                                   # the groups, in this order
    sections = dict(zip(titles, [text[a:b] for a, b in zip(positions, positions[1:] + [len(text)])]))
    assert "--sde_window " in sections["sampling (rollouts):"] and "--beta_schedule" in sections["trust region:"]
    assert "--sp_size" in sections["parallelism and memory:"] and "--checkpoint_every " in sections["reliability:"]
    assert "--plan" in text[:positions[0]] and "python train.py --plan [plan.py flags]" in text
    for field in dataclasses.fields(config.Config):                          # every field, once
        assert len(re.findall(rf"^  --{field.name}\b", text, re.MULTILINE)) == 1, field.name


def test_a_saved_video_is_an_h264_mp4_of_the_frames_and_an_odd_size_a_png_grid(tmp_path):
    import reward
    from PIL import Image
    greys = torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9])
    frames = greys[:, None, None, None].expand(5, 3, 16, 16)                # 5 flat grey frames
    path = run_directory.save_video(frames, str(tmp_path / "samples" / "iter000001"))
    assert path.endswith(".mp4") and open(path, "rb").read(12)[4:8] == b"ftyp"  # an ISO mp4
    decoded = reward.decode_mp4(open(path, "rb").read()).float() / 255    # (5, 3, 16, 16)
    # a flat frame survives 8-bit rounding and 4:2:0 H.264 to within a few levels of 255
    assert decoded.shape == (5, 3, 16, 16) and (decoded.mean(dim=(1, 2, 3)) - greys).abs().max() < 3 / 255
    odd = run_directory.save_video(frames[:, :, :15, :], str(tmp_path / "odd"))   # yuv420p needs even sizes
    assert odd.endswith(".png") and Image.open(odd).size == (5 * 16, 15)


@pytest.mark.slow
def test_every_config_field_is_a_command_line_flag():
    cfg = config.parse_config(["--eta", "0.3", "--no-equalizer", "--kernel", "flow_grpo", "--lora_rank", "8",
                              "--anchor_offload", "--kl_mode", "moving", "--train_step_fraction", "0.5"])
    assert (cfg.eta, cfg.equalizer, cfg.kernel, cfg.lora_rank, cfg.anchor_offload, cfg.kl_mode,
            cfg.train_step_fraction) == (0.3, False, "flow_grpo", 8, True, "moving", 0.5)
    assert config.parse_config([]) == config.Config()
    docs, _ = config._field_docs(config.Config)
    assert set(docs) == {f.name for f in dataclasses.fields(config.Config)} and all(docs.values())


@pytest.mark.slow
def test_prompt_sampler_reshuffles_every_epoch_deterministically_and_resumes():
    sampler = train.PromptSampler(num_prompts=6, per_iteration=2, seed=0)
    epochs = [sum((sampler.next_indices() for _ in range(3)), []) for _ in range(3)]
    assert all(sorted(e) == list(range(6)) for e in epochs)  # every prompt once per epoch
    assert epochs[0] != epochs[1] != epochs[2]
    again = train.PromptSampler(6, 2, seed=0)
    assert sum((again.next_indices() for _ in range(9)), []) == sum(epochs, [])
    resumed = train.PromptSampler(6, 2, seed=0)
    resumed.load_state_dict(train.PromptSampler(6, 2, seed=0).state_dict() | {"epoch": 1, "position": 2})
    assert resumed.next_indices() == epochs[1][2:4]


@pytest.mark.slow
@pytest.mark.parametrize("ext, text", [(".txt", "a cat\n\na dog\n"), (".csv", "id,prompt\n1,a cat\n2,a dog\n"),
                                       (".jsonl", '{"prompt": "a cat"}\n{"prompt": "a dog"}\n')])
def test_prompt_files_in_three_formats(ext, text, tmp_path):
    assert config.load_prompts(_write(tmp_path / f"p{ext}", text)) == ["a cat", "a dog"]


@pytest.mark.slow
def test_trained_steps_are_a_per_sample_random_order_of_a_fraction_of_the_steps():
    steps = train.trained_steps([1, 2, 3], num_steps=20, fraction=1.0)
    assert steps.shape == (3, 20) and all(sorted(row.tolist()) == list(range(20)) for row in steps)
    assert not torch.equal(steps[0], steps[1])
    assert train.trained_steps([1, 2, 3], 20, 0.25).shape == (3, 5)
    assert torch.equal(train.trained_steps([1], 20, 0.25)[0], steps[0, :5])


if __name__ == "__main__":  # the torchrun worker of test_broadcast_load_gives_every_rank_the_weights_on_disk_...
    broadcast_load_worker(*sys.argv[1:])
    distributed.exit_process(0)  # no teardown of the gloo group by the interpreter (see distributed.exit_process)


@pytest.mark.parametrize("flags, status, says", [(["--help"], 0, "usage: python train.py"),
                                                (["--tiny", "--eta", "-1"], 2, "train.py: error: --eta must be > 0"),
                                                (["--tiny", "--kl_target", "0.1"], 2, "has no effect without")])
def test_help_and_a_flag_error_answer_before_torch_or_a_model_library_is_imported(flags, status, says):
    """`python train.py --help` and a flag error print before torch, diffusers and transformers are imported (they
    took 5-12 s of imports before their first line); what is imported is read from the process itself."""
    code = ("import runpy, sys\nsys.argv = ['train.py'] + sys.argv[1:]\ntry:\n    runpy.run_path('train.py', "
            "run_name='__main__')\nexcept SystemExit as exit:\n    print('EXIT', exit.code, [m for m in ('torch', "
            "'diffusers', 'transformers') if m in sys.modules])")
    done = subprocess.run([sys.executable, "-c", code, *flags], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert f"EXIT {status} []" in done.stdout, done.stdout[-2000:] + done.stderr[-2000:]
    assert says in done.stdout + done.stderr


@pytest.mark.slow
def test_a_one_process_checkpoint_resumes_on_two_ranks_like_the_uninterrupted_run(tiny_models, tmp_path):
    """One CPU process trains the plain module, two ranks shard it (distributed.fsdp_needed): a checkpoint written
    by the first resumes in the second (torch.distributed.checkpoint reshards the optimizer and anchor) and ends
    where the uninterrupted one-process run ends, up to the float noise of the 2-rank test above."""
    options = {"group_size": 4, "max_iterations": 4, "checkpoint_every": 2, "optimizer": "adamw",
               "anchor_period": 3, "beta_schedule": "two_stage"}
    straight, moved = tmp_path / "straight", tmp_path / "moved"
    run(tiny_models, straight, videos_per_rank=4, **options)
    run(tiny_models, moved, videos_per_rank=4, **{**options, "max_iterations": 2})
    torchrun(2, tiny_models, moved, "--resume", "--allow_config_change", videos_per_rank=2, **options)
    a, b = (distributed.latest_checkpoint(str(d)) for d in (straight, moved))
    assert os.path.basename(a) == os.path.basename(b) == "checkpoint-000004"
    base = load_file(os.path.join(tiny_models[0], WEIGHTS))
    params_a, params_b = load_file(os.path.join(a, WEIGHTS)), load_file(os.path.join(b, WEIGHTS))
    flat = lambda params: torch.cat([params[k].flatten() for k in sorted(base)])  # noqa: E731
    assert relative_error(flat(params_a), flat(base)) > 1e-3  # four updates moved the weights
    assert relative_error(flat(params_b), flat(params_a)) < 1e-5
    # Adam's moments carried over (a fresh optimizer after the move would differ at the size of the moments)
    state_a, state_b = optimizer_state(a, tmp_path / "a"), optimizer_state(b, tmp_path / "b")
    moment = lambda state, name: torch.cat([state[k][name].flatten() for k in sorted(state_a)])  # noqa: E731
    assert relative_error(moment(state_b, "exp_avg"), moment(state_a, "exp_avg")) < 1e-4
    assert relative_error(moment(state_b, "exp_avg_sq"), moment(state_a, "exp_avg_sq")) < 1e-4
    assert [r["anchor_refreshed"] for r in metrics(moved)] == [r["anchor_refreshed"] for r in metrics(straight)]
