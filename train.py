"""SAGE-GRPO post-training of a text-to-video model (HunyuanVideo-1.5, or Wan2.1) against the VideoAlign reward.

One iteration, straight through (the banners in `train` follow it):

    ROLLOUT    G videos per prompt with a stochastic transition kernel (`--kernel sage`); a group may span ranks;
               every sample has its own seed, a function of (seed, iteration, global sample index)
    REWARD     decode, score with VideoAlign: r = w_vq·VQ + w_mq·MQ + w_ta·TA (NaN = failed video); or several
               rewards summed with weights (`--reward videoalign=1 pickscore=0.5`, reward.RewardMix)
    ADVANTAGE  all-gather the rewards, group statistics over the whole group (grpo.group_advantages; with
               several rewards each is normalised first by default, grpo.decoupled_advantages)
    UPDATE     equalized clipped policy loss + β·dual KL over the trained denoising steps (all N in a
               per-sample random order by default), gradients accumulated over those steps;
               `--updates_per_rollout` optimizer updates per rollout; a non-finite loss or gradient
               skips the update
    ANCHOR     hard copy policy -> anchor every `--anchor_period` optimizer updates
    LOG        tqdm on rank 0, output_dir/metrics.jsonl, sample videos, curves.png; the same rows and samples in
               TensorBoard or W&B with `--report_to tensorboard|wandb` (tracking.py)
    CHECKPOINT atomic (temp dir + rename): diffusers-format transformer, optimizer, anchor, RNG,
               sampler position; `--resume` continues exactly

Launch (the HunyuanVideo-1.5 480p T2V checkpoint in diffusers format and the VideoAlign checkpoint, each a
local directory or a hub id already in the hub cache; nothing is ever downloaded, see hub.py):

    # once, on a machine with internet access: into the hub cache (HF_HUB_CACHE / HF_HOME)
    hf download hunyuanvideo-community/HunyuanVideo-1.5-480p_t2v; hf download KwaiVGI/VideoReward
    hf download Qwen/Qwen2-VL-2B-Instruct   # VideoReward's base model, looked up by the id its model_config.json names
    # 1 GPU: a full fine-tune does not fit an 80 GB H100 (plan.py); LoRA, both offloads, groups of 2: 73.5 GiB, 4.7 min/it
    python train.py --model_path hunyuanvideo-community/HunyuanVideo-1.5-480p_t2v --reward_path KwaiVGI/VideoReward \\
        --prompts prompts/example.txt --output_dir runs/sage --group_size 2 --lora_rank 64 \\
        --text_encoder_offload --anchor_offload
    # 1 GPU, Wan2.1-T2V-1.3B (the family is read from the checkpoint) at 33x240x416: 46.7 GiB, 0.5 min/iteration
    python train.py --model_path Wan-AI/Wan2.1-T2V-1.3B-Diffusers --reward_path KwaiVGI/VideoReward \\
        --prompts prompts/example.txt --output_dir runs/sage_wan --num_frames 33 --height 240 --width 416
    # the same with local directories
    python train.py --model_path ckpts/HunyuanVideo-1.5-480p_t2v --reward_path ckpts/VideoReward ...
    # 8 GPUs on one node (the paper's per-node setting)
    torchrun --standalone --nproc_per_node 8 train.py --model_path ... --reward_path ... --prompts ...
    # 8 nodes x 8 GPUs = 64 (the recommended setting): run on every node, NODE_RANK = 0..7,
    # MASTER_ADDR = node 0's address; output_dir must be on a filesystem every node sees
    torchrun --nnodes 8 --nproc_per_node 8 --node_rank $NODE_RANK --rdzv_id sage \\
        --rdzv_backend c10d --rdzv_endpoint $MASTER_ADDR:29500 train.py --model_path ... (same flags)
    # no weights, CPU: the same code on random tiny models built on the fly (gloo backend); --tiny_family wan: Wan2.1's
    torchrun --standalone --nproc_per_node 2 train.py --tiny --num_steps 4 --max_iterations 4 --output_dir runs/tiny
    # no weights, CPU, and it learns: the synthetic video world (world/video_world.py), ~5 minutes
    torchrun --standalone --nproc_per_node 2 train.py --world --num_steps 8 --optimizer adamw --lr 2e-4 \\
        --group_size 8 --videos_per_rank 8 --max_iterations 150 --output_dir runs/world
    # resume from the newest complete checkpoint in output_dir (same flags, plus --resume)
    torchrun --standalone --nproc_per_node 8 train.py ... --resume
    # will it fit? per-GPU memory by component and time per iteration (plan.py; no weights, no GPU)
    python train.py --plan --world_size 64 --sp_size 2 --optimizer muon

Settings have one source each. Sampling shift and CFG scale: the checkpoint's scheduler and guider
configs unless --shift / --cfg_scale are given (the run prints which). Reward weights: the reward
model's defaults (VideoAlign: paper setting B) unless --reward_weights names others. Video size: the checkpoint
family's (HunyuanVideo-1.5 81×352×624, Wan2.1 81×480×832; with --tiny 5×16×16 and 9×32×32) unless --num_frames /
--height / --width are given.

This file is the loop: `main` (process group, stop signals, errors), `train` (setup, then the loop), and the
loop's pieces below it. What is not the loop has files of its own: config.py (every flag and its checks),
run_directory.py (output_dir: lock, metrics, samples, curves; stop signals), meters.py (timers, forward counts,
the update's diagnostics), distributed.py (FSDP2 per transformer block, rank-0 broadcast load, atomic sharded
checkpoints, exact resume). Loss normalisation (trust_region.total_loss): the loss is the mean over the valid
(sample, trained step) pairs of the *global* batch: each rank divides its sum by the global count and FSDP
averages gradients over ranks, so 2 ranks x 2 videos give the same update as 1 rank x 4 videos (tested).

Defaults follow the official recipe (Tencent-Hunyuan/SAGE-GRPO post_train.py: Muon, the β controller,
sequence parallelism via --sp_size and parallel.py); the departures (failed rewards excluded instead
of set to 0, β identical on every rank, a seed per sample and iteration, ...) are listed and explained
in docs/official_recipe.md.
"""
import contextlib
import dataclasses
import math
import os
import random
import sys
import time

import config

if __name__ == "__main__":  # the flags first: --help and a flag error answer before torch and diffusers are imported
    if "--plan" in sys.argv[1:]:  # the memory/time planner (plan.py): meta-device models, no weights, no GPU
        import plan
        sys.exit(plan.main([arg for arg in sys.argv[1:] if arg != "--plan"]))
    CFG = config.parse_flags_or_exit(sys.argv[1:], description=__doc__)

import torch
import torch.distributed as dist
from tqdm import tqdm

import distributed
import equalizer
import grpo
import hub
import meters
import model
import optimizer
import parallel
import reward
import run_directory
import sde
import tiny
import tracking
import trust_region
from config import ConfigError
from run_directory import RunError


def main(cfg):
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    cfg, prompts = config.check_config(cfg, world_size)  # every input error raises here, before any model is loaded
    if not cfg.verbose:
        hub.quiet_libraries()
    rank, world_size, device, mesh = distributed.setup(use_cuda=not (cfg.tiny or cfg.world),
                                                       timeout_minutes=cfg.collective_timeout_minutes)
    try:
        # on_exit: what train opens that must be closed on every exit, normal, a stop signal or an error (the
        # directory's lock, the tracker)
        with run_directory.StopRequest() as stop_request, contextlib.ExitStack() as on_exit:
            return train(cfg, prompts, rank, world_size, device, mesh, stop_request, on_exit)
    except distributed.CheckpointError as error:
        raise RunError(str(error)) from error
    except (dist.DistError, RuntimeError) as error:  # a collective timed out, or a peer died mid-collective
        if isinstance(error, RunError) or not (isinstance(error, dist.DistError) or
                                               run_directory.collective_failure(error)):
            raise
        raise RunError(f"a collective failed on rank {rank} ({type(error).__name__}: {str(error)[:300]}): another rank "
                       f"is hung or dead (waited up to --collective_timeout_minutes {cfg.collective_timeout_minutes:g}); "
                       f"the newest intact checkpoint is {distributed.latest_checkpoint(cfg.output_dir)}, "
                       f"resume from it with --resume") from error
    finally:
        dist.destroy_process_group()


def train(cfg, prompts, rank, world_size, device, mesh, stop_request, on_exit):
    """Setup, then the loop (ROLLOUT → REWARD → ADVANTAGE → UPDATE → ANCHOR → LOG → CHECKPOINT). Returns the newest
    checkpoint (the self-check: its exit status)."""
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    reward_specs = reward.parse_reward_specs(cfg.reward)  # {name: weight}
    model_path = cfg.model_path
    reward_paths = {name: getattr(cfg, reward.TRAINING_REWARDS[name].path_flag) for name in reward_specs
                    if reward.TRAINING_REWARDS[name].path_flag}
    if cfg.tiny:  # random tiny models in the real on-disk layouts (--tiny_family), loaded by the same code as real ones
        if rank == 0:
            tiny.tiny_model_paths(cfg.output_dir, **{cfg.tiny_family: model_path}, **reward_paths)
        dist.barrier()
        paths = tiny.tiny_model_paths(cfg.output_dir, **{cfg.tiny_family: model_path}, **reward_paths)
        model_path, reward_paths = paths.pop(cfg.tiny_family), paths
    if cfg.world and not model_path:  # the world's pretrained policy: built (or read from its cache) by rank 0
        from world import pretrain as world_pretrain
        if rank == 0:
            world_pretrain.prepare_world()
        dist.barrier()
        model_path = world_pretrain.prepare_world()
    render_latents = None  # samples of a reward of latents (the world's): a picture of the latents
    if cfg.world:
        from world import video_world
        render_latents = video_world.render_latents
    cfg, sources = config.resolve_sampling(cfg, model_path)  # shift and CFG scale: the checkpoint's unless given
    compute_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config.check_step_stds(cfg)  # sage's first step, the smallest step std at --eta: flag errors, before any model
    # one writer per output_dir (a lock held by rank 0 until the run ends), then the verified checkpoint to resume
    # from, or None (the self-check never deletes a run: no --overwrite for it)
    checkpoint = run_directory.prepare_output_dir(dataclasses.replace(cfg, overwrite=False) if cfg.self_check else cfg,
                                                  rank, on_exit)

    # Frozen parts (text encoders, VAE) in the compute dtype; the policy in fp32 (master weights),
    # from the checkpoint when resuming. The pipeline is loaded without its transformer: the policy's
    # weights are read once, by rank 0 (distributed.load_policy).
    print_rank0 = print if rank == 0 else (lambda *args, **kwargs: None)
    print_rank0(f"setup: text encoders and VAE from {model_path}", flush=True)
    pipe = model.load_policy_family(model_path, device="cpu", dtype=compute_dtype, load_transformer=False)
    policy_path = checkpoint if checkpoint and cfg.lora_rank == 0 else model_path  # where the policy's weights are
    if cfg.gradient_checkpointing is None:  # on with CUDA, off on CPU
        cfg = dataclasses.replace(cfg, gradient_checkpointing=device.type == "cuda")
    w_anchor, _ = trust_region.kl_weights(cfg.kl_mode, cfg.kl_anchor_weight, cfg.kl_step_weight)
    sharding = (f"FSDP2 over {world_size} rank(s)" if distributed.fsdp_needed(mesh, device)
                else "one CPU process: not sharded")
    print_rank0(f"setup: the policy from {policy_path} ({sharding}"
                f"{', with its anchor' if w_anchor else ''})", flush=True)
    policy, anchor_module = distributed.load_policy(
        policy_path, mesh, device, rank, compute_dtype,
        lora_rank=cfg.lora_rank, gradient_checkpointing=cfg.gradient_checkpointing, with_anchor=w_anchor > 0,
        anchor_offload=cfg.anchor_offload, train_glyph_projector=cfg.train_glyph_projector)
    # --sp_size: the ranks of a sequence-parallel group split each video's tokens (policy and anchor alike)
    layout = parallel.SequenceParallel(cfg.sp_size, device.type)
    for module in (policy, anchor_module):
        if module is not None:
            parallel.enable(module, layout, device)
    for module in (pipe.vae,) + (() if cfg.text_encoder_offload else pipe.text_encoders):
        module.to(device)
    cfg = dataclasses.replace(cfg, vae_tiling=pipe.set_vae_tiling(cfg.vae_tiling))  # None: on with CUDA
    prompt_cache = model.PromptCache(pipe, device, compute_dtype, capacity=cfg.prompt_cache,
                                     offload=cfg.text_encoder_offload)
    trainable = [p for p in policy.parameters() if p.requires_grad]
    optim = optimizer.build_optimizer(policy, cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay)
    ema = optimizer.WeightEMA(policy, cfg.ema_decay) if cfg.ema_decay else None  # sharded like the policy
    beta_schedule = trust_region.beta_schedule(cfg.beta_schedule, beta_start=cfg.beta_start, beta_end=cfg.beta_end,
                                               switch_step=cfg.beta_switch_step, beta_init=cfg.beta_init,
                                               kl_target=cfg.kl_target, beta_min=cfg.beta_min, beta_max=cfg.beta_max,
                                               window=cfg.beta_window)  # β: asked per pair, told per update
    anchor = None
    if anchor_module is not None:
        anchor = trust_region.MovingAnchor(policy, trust_region.anchor_period_for(cfg.kl_mode, cfg.anchor_period),
                                           anchor=anchor_module)
    # the rewards and their weights; the total is computed by the mix (reward.RewardMix), train.py reads "reward"
    print_rank0(f"setup: reward {', '.join(f'{n} ({reward_paths[n]})' if n in reward_paths else n for n in reward_specs)}",
                flush=True)
    reward_model = reward.load_training_rewards(reward_specs, reward_paths, device=device, dtype=compute_dtype,
                                                weight_items=cfg.reward_weights,
                                                processor_paths={"pickscore": cfg.pickscore_processor_path or None})
    for cut in reward.prompt_cuts(reward_model, prompts, cfg.num_frames, cfg.height, cfg.width) if rank == 0 else ():
        print_rank0(f"prompts: {cut}", flush=True)  # a reward reads a prompt only up to its own token limit

    group_size, videos_per_rank = cfg.group_size, cfg.videos_per_rank
    videos_per_iteration = layout.dp_size * videos_per_rank  # the sp ranks of a group hold the same videos
    first_sample = layout.dp_rank * videos_per_rank  # global index of this rank's first sample; a group's are contiguous
    sampler = PromptSampler(len(prompts), videos_per_iteration // group_size, cfg.seed)
    sigmas = sde.shifted_sigmas(cfg.num_steps, cfg.shift)  # (N+1,) σ_0 = 1 … σ_N = 0
    latent_shape = pipe.latent_shape(cfg.num_frames, cfg.height, cfg.width)  # (C, F, H, W)
    state = {"iteration": 0, "update_step": 0, "skipped_updates": 0}
    if checkpoint:
        state = distributed.load_checkpoint(checkpoint, policy, optim, anchor, rank, ema)
        if state.pop("ema_started_at_resume") and rank == 0:
            print(f"--ema_decay: {checkpoint} holds no EMA; the average starts from its weights", flush=True)
        for line in run_directory.resume_notes(state, run_directory.run_fingerprint(prompts, world_size),
                                               sampler) if rank == 0 else ():
            print(line, flush=True)
        sampler.load_state_dict(state["sampler"])
        beta_schedule.load_state_dict(state["beta_controller"])
        if anchor is not None:
            anchor.last_refresh = state["anchor_last_refresh"]
    if cfg.self_check:  # the pre-flight check on exactly this setup, instead of training
        return run_self_check(cfg, rank, world_size, device, compute_dtype, pipe=pipe, policy=policy, anchor=anchor,
                              optim=optim, reward_model=reward_model, prompts=prompts, sigmas=sigmas,
                              step_weights=policy_step_weights(cfg, sigmas, sde_window(cfg, 0), device), layout=layout,
                              latent_shape=latent_shape, model_path=policy_path)
    last_save, failed_iterations = time.monotonic(), 0
    # --report_to: the rows and samples also go to TensorBoard / W&B (tracking.py), from rank 0 only
    tracker = on_exit.enter_context(tracking.open_tracker(cfg.report_to if rank == 0 else "none", cfg.output_dir,
                                                          dataclasses.asdict(cfg), resume=checkpoint is not None,
                                                          start_iteration=state["iteration"]))
    if rank == 0:
        print(f"SAGE-GRPO: {world_size} rank(s) (sp {layout.sp_size}), {videos_per_iteration} videos/iteration in groups "
              f"of {group_size}, latent {tuple(latent_shape)}, {sum(p.numel() for p in trainable) / 1e6:.3g}M trainable, "
              f"{'resuming ' + checkpoint if checkpoint else 'from ' + model_path}\n"
              f"  shift {cfg.shift:g} ({sources['shift']}), CFG scale {cfg.cfg_scale:g} ({sources['cfg_scale']}), "
              f"VAE tiling {'on' if cfg.vae_tiling else 'off'}, VAE decode {cfg.vae_precision}, {describe_sde_window(cfg)}, "
              f"reward = {reward_model.formula()}" + (f" ({cfg.reward_normalization} normalisation)"
                                                      if len(reward_specs) > 1 else ""), flush=True)

    forwards = meters.ForwardCount(policy, anchor.anchor if anchor is not None else None, videos_per_rank,
                                   cfg.gradient_checkpointing)
    eval_prompts = config.load_prompts(cfg.eval_prompts) if cfg.eval_every else []

    def evaluate():  # --eval_every: the held-out prompts' scores of the policy as it is now (its forwards apart)
        forwards.evaluating = True
        scores = held_out_eval(cfg, pipe, policy, reward_model, prompt_cache, eval_prompts, latent_shape, sigmas,
                               layout, device)
        forwards.evaluating = False
        return scores
    if cfg.eval_every and state["iteration"] == 0:  # the pretrained policy: a row of its own, iteration 0
        evaluation = {**evaluate(), "forwards_eval": forwards.take()["forwards_eval"]}
        if rank == 0:
            run_directory.append_row(cfg, {"iteration": 0, "unix_time": time.time(), **evaluation}, tracker)
    bar = tqdm(range(state["iteration"], cfg.max_iterations), disable=rank != 0, initial=state["iteration"],
               total=cfg.max_iterations, desc="iterations")
    for iteration in bar:
        timer = meters.PhaseTimer(device)
        # ======================================================================== ROLLOUT
        timer("rollout")
        group_prompts = [prompts[i] for i in sampler.next_indices()]  # one prompt per group, all ranks agree
        sample_prompts = [group_prompts[(first_sample + b) // group_size] for b in range(videos_per_rank)]
        seeds = [sample_seed(cfg.seed, iteration, first_sample + b, videos_per_iteration) for b in range(videos_per_rank)]
        embeds = prompt_cache(sample_prompts)  # each distinct prompt encoded once per run, then reused
        # same_noise_per_group: every member starts from the noise of its group's first member
        initial_seeds = [sample_seed(cfg.seed, iteration, (first_sample + b) // group_size * group_size,
                                     videos_per_iteration)
                         for b in range(videos_per_rank)] if cfg.same_noise_per_group else None
        window = sde_window(cfg, iteration)  # None: every step stochastic (official)
        rollout = sample_rollout(cfg, policy, embeds, seeds, latent_shape, sigmas, initial_seeds, window)

        # ======================================================================== REWARD
        timer("reward")
        # this rank's share of the videos: all B, or with --sp_size a part, so that each video is scored once
        scored_rows = layout.scored_rows(videos_per_rank)
        logged = reward_model.components + reward_model.diagnostics
        # frames: None when only rewards of latents (the world's) are used; scores then shared over the sp group
        frames, scores = (score_videos(cfg, pipe, reward_model, rollout.final_latents[scored_rows],
                                       [sample_prompts[i] for i in scored_rows]) if scored_rows else (None, {}))
        scores = layout.gather_rows(scores, scored_rows, videos_per_rank, (*logged, "reward"), device)
        rewards = scores["reward"]  # (B,) the weighted sum, computed by the reward model

        # ======================================================================== ADVANTAGE
        timer("advantage")
        all_rewards = distributed.all_gather_cat(rewards, layout.dp_group)  # (dp·B,) group g = [gG, (g+1)G)
        if len(reward_specs) > 1 and cfg.reward_normalization == "per_reward":  # each reward normalised, then the sum
            per_reward = torch.stack([distributed.all_gather_cat(scores[n], layout.dp_group) for n in reward_specs])
            all_advantages = grpo.decoupled_advantages(per_reward.cpu(), list(reward_specs.values()), group_size,
                                                       cfg.adv_clip).float().to(device)
        else:
            all_advantages = grpo.group_advantages(all_rewards, group_size, cfg.adv_clip)  # (W·B,) NaN = failed
        advantages = all_advantages[first_sample:first_sample + videos_per_rank]  # (B,) this rank's samples
        steps = trained_steps(seeds, cfg.num_steps, cfg.train_step_fraction, window).to(device)  # (B, K)
        pair_weights = policy_step_weights(cfg, sigmas, window, device)[steps]  # (B, K) S_t of each (sample, trained step)
        valid = torch.isfinite(advantages)[:, None] & (pair_weights > 0)  # (B, K) pairs that enter the loss
        num_pairs = int(distributed.all_reduce(valid.sum(), group=layout.dp_group))  # loss: mean over the global pairs

        # ======================================================================== UPDATE
        timer("update")
        diagnostics = meters.UpdateDiagnostics(cfg.num_steps)  # what the update measures besides the loss (LOG reads it)
        grad_norms, skipped_now, refreshed = [], 0, False
        anchor_means = {}  # μ_anchor per trained step k, reused by every update of this rollout until a refresh
        for _ in range(cfg.updates_per_rollout if num_pairs else 0):
            # each step's loss sum and its L_KL over the valid pairs, 0-d tensors: read once, after the last step
            loss_values, step_kls = [], []
            # Gradient accumulation over the trained steps. Gradients are reduce-scattered after every
            # step (not only the last): FSDP2's no-sync mode would hold full unsharded bf16 gradients
            # (16.6 GB for 8.3B) and sum 20 steps in bf16; this way they accumulate sharded, in fp32.
            for k in range(steps.shape[1]):
                step = rollout.transitions(steps[:, k])  # the recorded transition of each sample at its k-th step
                mean, std, log_prob = recompute_log_prob(cfg, policy, embeds, step)
                policy_loss, stats = grpo.clipped_policy_loss(log_prob, step.log_prob, advantages, pair_weights[:, k],
                                                              cfg.clip_range)
                if anchor is not None and k not in anchor_means:
                    with torch.no_grad():
                        anchor_means[k], _, _ = recompute_log_prob(cfg, anchor.anchor, embeds, step)
                # the step-wise term is always measured (μ_old is recorded), weighted only in its modes
                kl, kl_terms = trust_region.dual_kl(mean, std, anchor_means.get(k), step.mean, cfg.kl_mode,
                                                    cfg.kl_anchor_weight, cfg.kl_step_weight, cfg.kl_step_estimator,
                                                    log_prob, step.log_prob)
                mask = valid[:, k]
                beta = pair_betas(beta_schedule, kl.detach(), world_size)  # (B,) β of each pair
                # mean over the global valid pairs of  loss_it + β_i·L_KL;  × W undoes FSDP's gradient averaging over
                # all W ranks (with --sp_size the group's ranks each hold part of a video's gradient: they sum)
                loss, policy_sum, kl_sum = trust_region.total_loss(policy_loss, kl, beta, mask, num_pairs, world_size)
                step_kls.append(kl.detach()[mask].sum())
                # before the backward (it reads the graph): the trust region's push, the KL terms, ρ
                loss_values.append(diagnostics.record(policy_sum, kl_sum, mean, stats, kl_terms, mask, log_prob,
                                                      step.log_prob, steps[:, k], beta))
                loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
            grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
            loss_finite = torch.isfinite(torch.stack(loss_values)).all().int()  # this rank's every step
            finite = int(distributed.all_reduce(loss_finite)) == world_size
            if finite and math.isfinite(grad_norm):  # a non-finite loss or gradient never reaches the weights
                optim.step()
                state["update_step"] += 1
                # the schedule is told the update's mean L_KL per valid pair over all ranks (adaptive decides on it);
                # update_kl: this rank's sum over the steps, in float64 and in step order
                update_kl = sum(torch.stack(step_kls).double().tolist())
                beta_schedule.observe(distributed.all_reduce(torch.tensor(update_kl, dtype=torch.float64,
                                                                          device=device)) / num_pairs)
                if ema is not None:
                    ema.update()
                # ================================================================ ANCHOR
                if anchor is not None and anchor.update_if_due(state["update_step"]):  # hard copy every period
                    refreshed = True
                    anchor_means.clear()  # a new anchor: its means must be recomputed
            else:
                skipped_now += 1
                state["skipped_updates"] += 1
            optim.zero_grad(set_to_none=True)
            grad_norms.append(grad_norm)

        evaluation = {}  # --eval_every: the held-out scores of the policy after this iteration (the row's x)
        if cfg.eval_every and ((iteration + 1) % cfg.eval_every == 0 or iteration + 1 == cfg.max_iterations):
            timer("eval")
            evaluation = evaluate()

        # ======================================================================== LOG
        timer("log")
        components = {k: distributed.all_gather_cat(scores[k], layout.dp_group) for k in logged}
        metrics = {
            "iteration": iteration + 1, "update_step": state["update_step"], "unix_time": time.time(),
            **grpo.reward_stats(all_rewards.cpu(), group_size),
            **{k: v.nanmean().item() for k, v in components.items()},
            "reward_components": list(reward_model.components),
            "advantage_abs_mean": all_advantages.nan_to_num().abs().mean().item(),
            **diagnostics.metrics(device),  # loss terms, β, the trust region's activity, max |ρ − 1| per step
            "grad_norm": grad_norms[-1] if grad_norms else float("nan"),
            "skipped_update": skipped_now, "skipped_updates_total": state["skipped_updates"],
            "anchor_refreshed": refreshed,
            **{k: round(v, 4) for k, v in timer.times.items()}, "peak_memory_gb": meters.peak_memory_gb(device),
            **forwards.take(),  # transformer forwards per video this iteration, counted (ForwardCount)
            **({"sde_window_start": window[0] if window else 0} if cfg.sde_window else {}),  # its first step
            **evaluation,
        }
        if rank == 0:
            run_directory.log_metrics(cfg, metrics, bar, tracker)
            if cfg.sample_every and iteration % cfg.sample_every == 0:
                run_directory.save_sample(cfg, iteration + 1, frames, rollout.final_latents, sample_prompts, tracker,
                                          render_latents=render_latents)

        failed_iterations = 0 if skipped_now < cfg.updates_per_rollout and num_pairs else failed_iterations + 1
        if failed_iterations >= cfg.max_failed_iterations:  # nothing learnt for K iterations in a row: stop
            cause = ("every reward failed (NaN): check the reward model and the decoded videos" if not num_pairs else
                     "the loss or the gradient was not finite: check the learning rate, β and the inputs")
            raise RunError(f"no optimizer update in the last {failed_iterations} iterations "
                           f"(--max_failed_iterations {cfg.max_failed_iterations}): {cause}; the newest intact "
                           f"checkpoint is {distributed.latest_checkpoint(cfg.output_dir)}")

        # ======================================================================== CHECKPOINT
        timer(None)
        # every rank must take the same decision: the slowest clock and any stop signal count
        due = (time.monotonic() - last_save) / 60 >= cfg.checkpoint_every_minutes > 0
        requested = int(stop_request.signal is not None)
        due, stop = (bool(x) for x in distributed.all_reduce(torch.tensor([int(due), requested], device=device),
                                                             op=dist.ReduceOp.MAX).tolist())
        if due or stop or (iteration + 1) % cfg.checkpoint_every == 0 or iteration + 1 == cfg.max_iterations:
            state.update(iteration=iteration + 1, sampler=sampler.state_dict(),
                         **run_directory.run_fingerprint(prompts, world_size),
                         anchor_last_refresh=anchor.last_refresh if anchor is not None else 0,
                         beta_controller=beta_schedule.state_dict(), config=dataclasses.asdict(cfg))
            saved = distributed.save_checkpoint(cfg.output_dir, iteration + 1, state, policy, optim, anchor, rank,
                                                lora=cfg.lora_rank > 0, keep=cfg.keep_checkpoints, ema=ema)
            last_save = time.monotonic()
            if rank == 0:
                run_directory.plot_metrics(os.path.join(cfg.output_dir, "metrics.jsonl"),
                                           os.path.join(cfg.output_dir, "curves.png"))
            if stop:
                if rank == 0:
                    print(f"\n{stop_request.signal or 'a stop signal on another rank'}: {saved} written after iteration "
                          f"{iteration + 1}; continue with the same flags and --resume", flush=True)
                return saved
    if rank == 0:
        run_directory.print_summary(cfg)
    return distributed.latest_checkpoint(cfg.output_dir)


# ------------------------------------------------------------------------------------------------
# The loop's pieces, in the order the loop calls them.

def sample_seed(seed, iteration, index, videos_per_iteration):
    """Seed of global sample `index` at `iteration`: independent of how samples are split over ranks."""
    return seed * 1_000_003 + iteration * videos_per_iteration + index


def sample_rollout(cfg, policy, embeds, seeds, latent_shape, sigmas, initial_seeds=None, window=None):
    """ROLLOUT's sampler call (the self-check makes its rollout with the same); window: sde_window's."""
    return model.rollout(policy, embeds, seeds, latent_shape, sigmas, cfg.kernel, cfg.eta, cfg.cfg_scale,
                         sde_window=window, initial_seeds=initial_seeds)


def recompute_log_prob(cfg, transformer, embeds, transition):
    """UPDATE's (mean, std, log-prob) of recorded transitions, with gradients (the self-check checks this call
    against the rollout's own log-probs: the ratio at the first update must be 1)."""
    return model.transition_log_prob(transformer, embeds, transition, cfg.kernel, cfg.eta, cfg.cfg_scale)


def score_videos(cfg, pipe, reward_model, latents, prompts):
    """REWARD's scoring of final latents (b, C, F, H, W) (the self-check scores with the same). Decoded to frames
    (b, F, 3, H, W) in [0, 1] when a reward reads frames, with --reward_input mp4 each video round-tripped through
    an 8-bit H.264 mp4 as the official code scores saved videos. A non-finite video (a failed decode) is not
    encoded: it stays non-finite and every reward scores it NaN. Returns (frames or None, scores)."""
    frames = None
    if reward_model.needs_frames:
        with model.vae_autocast(pipe.vae, cfg.vae_precision):
            frames = pipe.decode(latents)
        if cfg.reward_input == "mp4":
            frames = torch.stack([reward.mp4_round_trip(video) if torch.isfinite(video).all() else video
                                  for video in frames.cpu()]).to(frames.device)
    # {component: (b,), reward name: (b,), "reward": (b,), diagnostics...}, NaN = failed video
    return frames, reward_model(frames, latents, prompts)


def trained_steps(seeds, num_steps, fraction, window=None):
    """Per-sample random order of the N steps (of the window's, steps start … stop−1), first ceil(fraction·n) kept
    -> LongTensor (B, n_kept). E.g. seeds [7, 8], N = 4, fraction 0.5 -> [[2, 0], [3, 1]]: each sample trains its
    own steps."""
    start, stop = (0, num_steps) if window is None else window
    keep = max(1, math.ceil(fraction * (stop - start)))
    return torch.stack([start + torch.randperm(stop - start, generator=torch.Generator().manual_seed(s + 1))[:keep]
                        for s in seeds])


def sde_window(cfg, iteration):
    """(start, stop) of the steps that are stochastic and trained at `iteration` (0-based), None for all N steps.
    Every rank computes the same window (random: from --seed and the iteration only)."""
    size, last = cfg.sde_window, cfg.num_steps - cfg.sde_window  # last: the largest start
    if not size or size == cfg.num_steps:
        return None
    if cfg.sde_window_placement == "static":
        start = cfg.sde_window_start
    elif cfg.sde_window_placement == "random":
        start = int(torch.randint(last + 1, (1,), generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + iteration)))
    else:  # moving: high noise first, one step later every sde_window_shift_every iterations, then the last K steps
        start = min(iteration // cfg.sde_window_shift_every, last)
    return start, start + size


def describe_sde_window(cfg):
    """The start-up line's words for --sde_window: which steps are stochastic and trained."""
    if not cfg.sde_window or cfg.sde_window == cfg.num_steps:
        return f"all {cfg.num_steps} steps stochastic"
    where = {"static": f"steps {cfg.sde_window_start}…{cfg.sde_window_start + cfg.sde_window - 1}",
             "random": "a new start every iteration",
             "moving": f"from step 0, one step later every {cfg.sde_window_shift_every} iterations"}
    return f"SDE window of {cfg.sde_window} of {cfg.num_steps} steps ({cfg.sde_window_placement}: " \
           f"{where[cfg.sde_window_placement]})"


EVAL_SEED = 10 ** 9  # --eval_every's seeds: EVAL_SEED + row, never a rollout seed of a run with --seed < 1000


@torch.no_grad()
def held_out_eval(cfg, pipe, policy, reward_model, prompt_cache, prompts, latent_shape, sigmas, layout, device):
    """--eval_every: the policy's deterministic (ODE) samples of the held-out prompts, the same seeds every time,
    scored by every loaded reward. Returns {"eval/<name>": mean over the videos} for the total reward, each reward
    (a weight-0 one too), each component and diagnostic (the world's off-manifold distance and on-manifold
    reward). The videos are split over the data-parallel ranks, --videos_per_rank
    at a time; a rank with fewer videos runs its missing batches on a repeated video and drops it (every rank
    runs the same number of forwards: FSDP's collectives).""" 
    rows = [(p, v) for p in range(len(prompts)) for v in range(cfg.eval_videos_per_prompt)]  # (prompt, video)
    per_rank = math.ceil(len(rows) / layout.dp_size)
    rank_rows = rows[layout.dp_rank * per_rank:(layout.dp_rank + 1) * per_rank]
    names = list(dict.fromkeys(("reward", *reward_model.components, *reward_model.diagnostics)))  # + each reward's total
    values = {name: [] for name in names}
    for start in range(0, per_rank, cfg.videos_per_rank):
        chunk = rank_rows[start:start + cfg.videos_per_rank]
        real = len(chunk)  # a rank past its share still runs the batch's forwards, on one repeated video
        chunk = chunk or [(rank_rows or rows)[-1]]
        batch_prompts = [prompts[p] for p, _ in chunk]
        seeds = [EVAL_SEED + p * cfg.eval_videos_per_prompt + v for p, v in chunk]
        result = model.rollout(policy, prompt_cache(batch_prompts), seeds, latent_shape, sigmas, "ode",
                               guidance_scale=cfg.cfg_scale)
        scored_rows = layout.scored_rows(len(chunk))  # the rows this rank scores (all, or its share with --sp_size)
        _, scores = (score_videos(cfg, pipe, reward_model, result.final_latents[scored_rows],
                                  [batch_prompts[i] for i in scored_rows]) if scored_rows else (None, {}))
        scores = layout.gather_rows(scores, scored_rows, len(chunk), names, device)
        for name in names:
            values[name].append(scores[name][:real])
    means = {}
    for name in names:  # every rank's videos (padded to per_rank with NaN), then the mean over the finite ones
        local = torch.cat(values[name]) if values[name] else torch.zeros(0, device=device)
        padded = torch.full((per_rank,), float("nan"), device=device)
        padded[:len(local)] = local
        means[f"eval/{name}"] = distributed.all_gather_cat(padded, layout.dp_group).nanmean().item()
    return means


class PromptSampler:
    """Prompt indices per iteration, identical on every rank; a fresh permutation every epoch.

    Each iteration takes `per_iteration` prompts (the global number of groups); an epoch is one
    pass over the file; the order of epoch e is randperm(seed + e), so (epoch, position) is the
    whole state and resuming continues the same sequence.
    """

    def __init__(self, num_prompts, per_iteration, seed):
        self.num_prompts, self.per_iteration, self.seed = num_prompts, per_iteration, seed
        self.epoch, self.position = 0, 0

    def _order(self):
        return torch.randperm(self.num_prompts, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()

    def next_indices(self):
        indices, order = [], self._order()
        while len(indices) < self.per_iteration:
            indices.append(order[self.position])
            self.position += 1
            if self.position == self.num_prompts:  # next epoch, next permutation
                self.epoch, self.position = self.epoch + 1, 0
                order = self._order()
        return indices

    def state_dict(self):
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state):
        """A position at or past the end of a prompt file that shrank since the state was saved ends that
        epoch: the next permutation starts (train.resume_notes says so)."""
        self.epoch, self.position = state["epoch"], state["position"]
        if self.position >= self.num_prompts:
            self.epoch, self.position = self.epoch + 1, 0


def pair_betas(beta_schedule, kl, world_size):
    """β of each (sample, step) pair of this rank's batch, (B,). The schedule is fed each pair's L_KL averaged over
    the ranks (position b of every rank together), so that β is the same on every rank (the official code feeds
    each rank its own KL, and its β drifts apart across ranks). A schedule that does not read the KLs
    (reads_pair_kls False: all but the official one) is handed them as they are, on their device: no all-reduce and
    no host copy per step."""
    kl_mean = (distributed.all_reduce(kl.float()) / world_size).cpu() if beta_schedule.reads_pair_kls else kl  # (B,)
    return torch.tensor(beta_schedule.betas(kl_mean), dtype=torch.float32, device=kl.device)


def policy_step_weights(cfg, sigmas, window, device):
    """Tensor[N] of the policy loss's step weights (equalizer.step_weights): S_t or 1 per stochastic step, 0 for a
    deterministic step and for a step outside the SDE window."""
    return equalizer.step_weights(cfg.kernel, sigmas, cfg.eta, cfg.equalizer, cfg.equalizer_median,
                                  window).float().to(device)


def run_self_check(cfg, rank, world_size, device, compute_dtype, latent_shape, reward_model, **setup):
    """--self_check: self_check.py's checks with this file's own ROLLOUT and UPDATE calls; the table is printed
    and written to output_dir/self_check.md on rank 0. Returns 0 if no line FAILs, else 1."""
    import self_check
    lines, per_step, sigma_pairs = self_check.run(
        cfg, **setup, device=device, compute_dtype=compute_dtype, rank=rank, world_size=world_size,
        sample=lambda policy, embeds, seeds: sample_rollout(cfg, policy, embeds, seeds, latent_shape,
                                                            setup["sigmas"], window=sde_window(cfg, 0)),
        recompute=lambda transformer, embeds, step: recompute_log_prob(cfg, transformer, embeds, step),
        score=lambda latents, prompts: score_videos(cfg, setup["pipe"], reward_model, latents, prompts)[1],
        seed_of=lambda b: sample_seed(cfg.seed, 0, b, cfg.videos_per_rank * world_size))
    failed = any(line.status == "FAIL" for line in lines)
    if rank == 0:
        table = self_check.render(lines, per_step, sigma_pairs)
        with open(os.path.join(cfg.output_dir, "self_check.md.tmp"), "w") as f:
            f.write(table)
        os.replace(os.path.join(cfg.output_dir, "self_check.md.tmp"), os.path.join(cfg.output_dir, "self_check.md"))
        print(f"\nSelf-check ({'FAILED' if failed else 'passed'}; also in {os.path.join(cfg.output_dir, 'self_check.md')}):"
              f"\n\n{table}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        result = main(CFG)
        status = result if CFG.self_check else 0  # self-check: 1 if a check FAILed
    except (ConfigError, RunError) as error:  # our own message: once (rank 0), without a traceback
        config.report_error(f"train.py: error: {error}")
        status = 2 if isinstance(error, ConfigError) else 1
    distributed.exit_process(status)  # not sys.exit: the gloo group must not be torn down by the interpreter
