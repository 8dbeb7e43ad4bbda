"""Pre-flight self-check: `python train.py --self_check <the run's flags>` checks the real setup in minutes.

Users of every GRPO video trainer debug "the reward does not go up" by hand, with the maintainers'
checklists: print the ratio at the first update, it must be 1; check the bf16 rounding of the
log-probs; check the CFG batching; check that a failed reward is not a number that enters the loss.
This module runs that checklist on the user's own model, reward, hardware and flags, before a long
run: everything is loaded exactly as train.py loads it (same process group, FSDP sharding, dtype),
one rollout is made with the run's sampler, and each check measures a number against a threshold.

    line                         what is measured (every denoising step)                       FAIL / WARN when
    on-policy ratio              the UPDATE's recompute of the ROLLOUT's own transitions, both  FAIL: |ρ − 1| > ε_clip/10
                                 through train.py's functions: max |ρ − 1| with                 or μ error > 1e-3
                                 ρ = exp(log p_recomputed − log p_recorded), which must be 1
                                 at the first update, and the relative error of the step mean
                                 μ (anything else is a recompute that differs from the
                                 sampler: another CFG scale, η, kernel, dtype, mask, ...)
    bf16 vs fp32 log-prob        |log p(bf16 weights) − log p(fp32 weights)|, a plain copy     WARN > ε_clip
                                 of the transformer in both dtypes (rank 0)
    batched CFG vs two forwards  error of the velocity of model.py's one forward of batch 2B    WARN > 1e-2, FAIL > 0.1
                                 against v_u + s·(v_c − v_u) from two forwards, relative to
                                 the guidance term s·(v_c − v_u)
    batch 1 vs batch B           relative error of sample 0's step mean μ recomputed alone      WARN > 1e-2, FAIL > 0.1
                                 against in the batch of B
    reward                       every rollout scored (finite), and a video made non-finite     FAIL otherwise, or the
                                 on purpose scores NaN (excluded, counted) without changing     others moved > 0.1 × std
                                 the others' scores, relative to the rewards' std over every    (WARN > 1e-2)
                                 rank's videos (the scale GRPO's advantages divide by)
    trust region at β            ‖∂(β·L_KL)/∂μ‖ / ‖∂L_policy/∂μ‖ after one real optimizer     WARN < 1e-3
                                 step (at the start the policy equals the anchor and the KL
                                 is 0), at --beta_start and --beta_end (adaptive: --beta_min,
                                 --beta_init, --beta_max)
    equalizer weights            S_t per step: finite, ≥ 0, > 0 on every stochastic step     FAIL otherwise

ε_clip is --clip_range (official 1e-4): a log-prob error of that size moves the ratio to the clip.
Relative errors are ‖a − b‖ / ‖b − x‖ for step means (the size of the step's move, not of μ ≈ x) and
‖a − b‖ / ‖s·(v_c − v_u)‖ for the CFG velocity (the part CFG adds: in a random tiny model v_c ≈ v_u,
and an error relative to ‖v‖ would hide a wrong combination). They are measured on means and velocities, not only on log-probs,
because the log-prob is an element mean in which a wrong velocity largely cancels: on the tiny model,
swapping CFG's two branches moves it by only ~6e-4 while the velocity is wrong by O(1).
WARN lines are numerics that do not break the first update (rollout and update share dtype and
batching) but say something about later ones or about another setup; FAIL lines are bugs. The table
(with one row per denoising step) is printed on rank 0 and written to output_dir/self_check.md; the
exit status is 1 if any line FAILs. Nothing is trained or saved: the one optimizer step of the
trust-region line changes only the in-memory policy, and the process ends after the check.

Memory: the bf16-vs-fp32 line loads one plain fp32 copy of the transformer on rank 0 (4 bytes per
parameter: 33 GB for the 8.3B model); if it does not fit, the line is SKIPped with the error.
"""
import dataclasses
import math
import os

import torch
import torch.distributed as dist

import distributed
import grpo
import model
import trust_region

RATIO_FAIL = 0.1       # × ε_clip: max |ρ − 1| at the first update
MEAN_FAIL = 1e-3       # relative error of the recomputed step mean at the first update
NUMERICS_WARN = 1.0    # × ε_clip: |Δ log p| of bf16 rounding
RELATIVE_WARN = 1e-2   # relative error of numerics (batching); bf16 rounding alone is ~4e-3 per operation
RELATIVE_FAIL = 0.1    # relative error no rounding explains: a different computation
ACTIVITY_WARN = 1e-3   # ‖∂βKL/∂μ‖ / ‖∂policy/∂μ‖ below this: the trust region is inert


@dataclasses.dataclass
class Line:
    check: str
    measured: str
    threshold: str
    status: str  # PASS | WARN | FAIL | SKIP
    remedy: str = ""


def grade(value, warn=None, fail=None):
    """PASS / WARN / FAIL of a non-negative error against its thresholds (NaN fails)."""
    if not math.isfinite(value) or (fail is not None and value > fail):
        return "FAIL"
    return "WARN" if warn is not None and value > warn else "PASS"


def relative_error(a, b, reference):
    """‖a − b‖ / ‖reference‖, in float64."""
    return ((a.double() - b.double()).norm() / reference.double().norm().clamp_min(1e-30)).item()


def two_forward_velocity(transformer, latents, sigma, embeds, guidance_scale):
    """v_u + s·(v_c − v_u) with the conditional and the unconditional branch as two separate forwards
    (cfg_velocity with s = 1 runs the conditional branch only; the negative prompt is swapped in), and
    the guidance term s·(v_c − v_u)."""
    v_cond = embeds.guided_velocity(transformer, latents, sigma, 1.0)
    v_uncond = embeds.unconditional().guided_velocity(transformer, latents, sigma, 1.0)
    return v_uncond + guidance_scale * (v_cond - v_uncond), guidance_scale * (v_cond - v_uncond)


def step_transitions(rollout, k, rows=None):
    """The recorded transitions of every sample (or of `rows` only) at denoising step k."""
    transition = rollout.transitions(k)
    if rows is None:
        return transition
    return model.Transition(**{f.name: getattr(transition, f.name)[rows] for f in dataclasses.fields(transition)})


def plain_log_probs(path, rollout, embeds, cfg, device, steps):
    """{dtype: (N, B) log-probs} of the recorded transitions under a plain copy of the transformer read
    from `path`, first in fp32, then cast to bf16 (rank 0 only; no collectives)."""
    out = {}
    for dtype in (torch.float32, torch.bfloat16):  # one copy at a time, each read in its dtype
        directory = os.path.join(path, "transformer")
        transformer = model.transformer_class_of(directory).from_pretrained(directory, torch_dtype=dtype).to(device).eval()
        with torch.no_grad():
            out[dtype] = torch.stack([model.transition_log_prob(transformer, embeds, step_transitions(rollout, k),
                                                                cfg.kernel, cfg.eta, cfg.cfg_scale)[2].double().cpu()
                                      for k in steps])
        del transformer
    return out


def run(cfg, *, pipe, policy, anchor, optim, prompts, sigmas, step_weights, layout, device,
        compute_dtype, rank, world_size, model_path, sample, recompute, score, seed_of):
    """The checks, on every rank (the collectives of the sharded policy need them all); returns the lines.
    `sample` / `recompute` / `score` are train.py's own ROLLOUT, UPDATE and REWARD calls, `seed_of` its
    per-sample seed."""
    eps = cfg.clip_range
    num_steps = len(sigmas) - 1
    group_size, batch = cfg.group_size, cfg.videos_per_rank
    first = layout.dp_rank * batch
    sample_prompts = [prompts[((first + b) // group_size) % len(prompts)] for b in range(batch)]
    text_encoders = pipe.text_encoders
    for module in text_encoders if cfg.text_encoder_offload else ():  # as the loop: on the GPU only to encode
        module.to(device)
    embeds = pipe.encode_prompts(sample_prompts, device=device, dtype=compute_dtype)
    for module in text_encoders if cfg.text_encoder_offload else ():
        module.to("cpu")
    seeds = [seed_of(first + b) for b in range(batch)]  # global sample indices, as the loop's
    lines, per_step = [], {k: {} for k in range(num_steps)}
    stochastic = [k for k in range(num_steps) if step_weights[k] > 0]

    # ---------------------------------------------------------------- 1. the ROLLOUT, as train.py makes it
    rollout = sample(policy, embeds, seeds)

    # ---------------------------------------------------------------- 2. on-policy ratio, every step
    worst, worst_mean, means = 0.0, 0.0, {}
    for k in stochastic:
        step = step_transitions(rollout, k)
        with torch.no_grad():  # the value of the UPDATE's recompute (its gradients are not needed here)
            mean, _, log_prob = recompute(policy, embeds, step)
        means[k] = mean  # the batch of B, reused by the batch-1 line
        deviation = (log_prob.double() - step.log_prob.double()).exp().sub(1).abs().max()
        mean_error = torch.tensor(relative_error(mean, step.mean, step.mean - step.latents), device=device)
        deviation, mean_error = (float(distributed.all_reduce(x.to(device), op=dist.ReduceOp.MAX))
                                 for x in (deviation, mean_error))
        per_step[k]["abs(ρ−1)"], per_step[k]["μ error update↔rollout"] = deviation, mean_error
        worst = max(worst, deviation) if math.isfinite(deviation) else math.nan
        worst_mean = max(worst_mean, mean_error) if math.isfinite(mean_error) else math.nan
    status = "FAIL" if "FAIL" in (grade(worst, fail=RATIO_FAIL * eps), grade(worst_mean, fail=MEAN_FAIL)) else "PASS"
    lines.append(Line("on-policy ratio at the first update (every step)",
                      f"max abs(ρ−1) = {worst:.2e}, μ error {worst_mean:.1e}",
                      f"FAIL > {RATIO_FAIL * eps:.0e} (ε_clip/10) or μ error > {MEAN_FAIL:g}", status,
                      "the UPDATE recomputes the ROLLOUT's transitions differently: check that both use the same "
                      "CFG scale, η, kernel, σ schedule, prompt embeddings and dtype (train.py: sample_rollout and "
                      "recompute_log_prob); every clipped update is then wrong"))

    # ---------------------------------------------------------------- 3. bf16 vs fp32 (plain copy, rank 0)
    gap = [math.nan]
    if rank == 0:
        try:
            log_probs = plain_log_probs(model_path, rollout, embeds, cfg, device, stochastic)
            differences = (log_probs[torch.bfloat16] - log_probs[torch.float32]).abs().amax(dim=1)  # (steps,)
            for k, d in zip(stochastic, differences.tolist()):
                per_step[k]["Δlog p bf16↔fp32"] = d
            gap[0] = differences.max().item()
        except (torch.cuda.OutOfMemoryError, RuntimeError) as error:  # the fp32 copy may not fit beside the run
            gap[0] = f"{type(error).__name__}: {str(error)[:120]}"
    if rank == 0:
        if isinstance(gap[0], str):
            lines.append(Line("bf16 vs fp32 log-prob (every step)", gap[0], "", "SKIP",
                              "needs one fp32 copy of the transformer on rank 0; run the self-check with fewer frames"))
        else:
            lines.append(Line("bf16 vs fp32 log-prob (every step)", f"max abs(Δlog p) = {gap[0]:.2e}",
                              f"WARN > {NUMERICS_WARN * eps:.0e} (ε_clip)", grade(gap[0], warn=NUMERICS_WARN * eps),
                              "bf16 rounding moves log-probs by more than the clip range: the first update is exact "
                              "(rollout and update share the dtype), but with --updates_per_rollout > 1 the clip "
                              "acts on rounding; keep 1 update per rollout or raise --clip_range"))
    dist.barrier()

    # ---------------------------------------------------------------- 4. batched CFG vs two forwards
    if cfg.cfg_scale != 1.0:
        worst = 0.0
        for k in stochastic:
            step = step_transitions(rollout, k)
            with torch.no_grad():
                separate, guidance = two_forward_velocity(policy, step.latents.float(), step.sigma, embeds,
                                                          cfg.cfg_scale)
                batched = embeds.guided_velocity(policy, step.latents.float(), step.sigma, cfg.cfg_scale)
            error = float(distributed.all_reduce(torch.tensor(relative_error(batched, separate, guidance), device=device),
                                                 op=dist.ReduceOp.MAX))
            per_step[k]["v error CFG batched↔2 forwards"] = error
            worst = max(worst, error) if math.isfinite(error) else math.nan
        lines.append(Line("batched CFG vs two forwards (every step)", f"max velocity error = {worst:.1e}",
                          f"WARN > {RELATIVE_WARN:g}, FAIL > {RELATIVE_FAIL:g}",
                          grade(worst, RELATIVE_WARN, RELATIVE_FAIL),
                          "the one forward of batch 2B is not v_u + s·(v_c − v_u): check the order of the "
                          "conditional and unconditional rows, their masks and the negative prompt"))
    else:
        lines.append(Line("batched CFG vs two forwards", "CFG scale 1: one branch only", "", "SKIP"))

    # ---------------------------------------------------------------- 5. batch 1 vs batch B
    if batch > 1:
        worst = 0.0
        for k in stochastic:
            step = step_transitions(rollout, k)
            with torch.no_grad():
                alone, _, _ = recompute(policy, embeds.select([0]), step_transitions(rollout, k, rows=[0]))
            together = means[k]  # the same recompute in the batch of B (ratio line)
            error = relative_error(alone[0], together[0], together[0] - step.latents[0])
            error = float(distributed.all_reduce(torch.tensor(error, device=device), op=dist.ReduceOp.MAX))
            per_step[k]["μ error batch 1↔B"] = error
            worst = max(worst, error) if math.isfinite(error) else math.nan
        lines.append(Line(f"batch 1 vs batch {batch} (every step)", f"max μ error = {worst:.1e}",
                          f"WARN > {RELATIVE_WARN:g}, FAIL > {RELATIVE_FAIL:g}", grade(worst, RELATIVE_WARN, RELATIVE_FAIL),
                          "a sample's log-prob depends on its batch: padding or attention masks leak between "
                          "samples; rollout and update must then batch identically (train.py does)"))
    else:
        lines.append(Line("batch 1 vs batch B", "--videos_per_rank 1", "", "SKIP"))

    # ---------------------------------------------------------------- 6. the reward, and a failed video
    latents = rollout.final_latents
    scores = score(latents, sample_prompts)["reward"].double().cpu()
    spoiled_latents = latents.clone()
    spoiled_latents[0] = math.nan  # a failed video: non-finite everywhere, decoded (if decoded) to non-finite frames
    spoiled = score(spoiled_latents, sample_prompts)["reward"].double().cpu()
    everyone = distributed.all_gather_cat(scores.to(device), layout.dp_group).double().cpu()  # every rank's videos
    moved = (spoiled[1:] - scores[1:]).abs().max() if batch > 1 else torch.tensor(0.0, dtype=torch.float64)
    worst = [float(distributed.all_reduce(x.to(device), op=dist.ReduceOp.MAX)) for x in
             (moved.nan_to_num(math.inf), torch.tensor(float(not torch.isfinite(scores).all())),
              torch.tensor(float(not torch.isnan(spoiled[0]))))]
    lines.append(reward_line(everyone, spoiled[0].item(), worst[0], bool(worst[1]), bool(worst[2])))

    # ---------------------------------------------------------------- 7. trust region after one real step
    lines.append(trust_region_line(cfg, policy, anchor, optim, embeds, rollout, scores, step_weights, stochastic,
                                   layout, device, world_size, recompute))

    # ---------------------------------------------------------------- 8. equalizer weights
    weights = step_weights.double().cpu()
    for k in range(num_steps):
        per_step[k]["S_t"] = weights[k].item()
    good = bool(torch.isfinite(weights).all() and (weights >= 0).all() and len(stochastic) > 0)
    lines.append(Line(f"equalizer weights S_t ({'on' if cfg.equalizer else 'off'})",
                      f"{weights[stochastic].min():.3g} … {weights[stochastic].max():.3g} over {len(stochastic)} "
                      f"stochastic steps", "FAIL if not finite, < 0 or no stochastic step",
                      "PASS" if good else "FAIL", "check --kernel, --eta and the σ schedule (--shift, --num_steps)"))
    return lines, per_step, [(sigmas[k].item(), sigmas[k + 1].item()) for k in range(num_steps)]


def reward_line(scores, failed_score, moved, any_not_finite, failed_scored):
    """The reward line from what was measured on every rank: `scores` every rank's rewards of its good rollouts,
    `failed_score` rank 0's score of its video made non-finite, `moved` the largest change a failed video made to
    another video's score (max over ranks), `any_not_finite` whether a good video was not scored finitely on some
    rank, `failed_scored` whether a failed video got a number (not NaN) on some rank.

    The others' change is graded relative to the spread of the rewards, their standard deviation over every rank's
    videos (the scale GRPO's advantages divide by): a failed video that moves them by a tenth of it changes the
    advantages by a tenth, a bug (FAIL); rounding moves them far less. The two scorings are batches of different
    sizes (the failed video is not in the second), which may round differently: an absolute tolerance would be
    one machine's (0 on a CPU in fp32; bf16 rounds by 2⁻⁸ ≈ 4e-3 of a value)."""
    spread = scores.std().item() if len(scores) > 1 else 0.0
    relative = moved / spread if spread > 0 else (0.0 if moved == 0 else math.inf)
    status = "FAIL" if any_not_finite or failed_scored else grade(relative, RELATIVE_WARN, RELATIVE_FAIL)
    return Line("reward: scores finite, a failed video NaN, the others unchanged",
                f"rewards {scores.min():.3g} … {scores.max():.3g}, failed video → {failed_score:.3g}, "
                f"others moved {relative:.1e} × std",
                f"FAIL if not finite, a failed video not NaN, or others moved > {RELATIVE_FAIL:g} × std "
                f"(WARN > {RELATIVE_WARN:g})", status,
                "a reward that is not finite on good videos excludes them all; a failed video that gets a number (0, "
                "−1, ...) enters the loss as a real score: return NaN for it; a failed video that moves the others' "
                "scores (a reward normalised over its batch) shifts their advantages: score each video on its own")


def trust_region_line(cfg, policy, anchor, optim, embeds, rollout, scores, step_weights, stochastic, layout, device,
                      world_size, recompute):
    """One optimizer step of the policy loss on this rollout, then ‖∂(β·L_KL)/∂μ‖ / ‖∂L_policy/∂μ‖ on the
    same transitions at the β the schedule can reach: --beta_start and --beta_end, or with --beta_schedule adaptive
    --beta_min, --beta_init and --beta_max (the activity train.py logs every iteration)."""
    if cfg.kl_mode == "none":
        return Line("trust region at β", "--kl_mode none", "", "SKIP")
    all_rewards = distributed.all_gather_cat(scores.float().to(device), layout.dp_group)
    first = layout.dp_rank * cfg.videos_per_rank
    advantages = grpo.group_advantages(all_rewards, cfg.group_size, cfg.adv_clip)[first:first + cfg.videos_per_rank]
    pairs = len(stochastic) * cfg.videos_per_rank * layout.dp_size
    for k in stochastic:  # the policy loss alone, as the first update (β·KL is 0 at the start)
        step = step_transitions(rollout, k)
        _, _, log_prob = recompute(policy, embeds, step)
        loss, stats = grpo.clipped_policy_loss(log_prob, step.log_prob, advantages,
                                               step_weights[k].expand(len(advantages)), cfg.clip_range)
        (loss * stats["num_valid_pairs"] * world_size / pairs).backward()
    torch.nn.utils.clip_grad_norm_([p for p in policy.parameters() if p.requires_grad], cfg.grad_clip)
    optim.step()
    optim.zero_grad(set_to_none=True)
    push_policy = push_kl = 0.0
    for k in stochastic:
        step = step_transitions(rollout, k)
        mean, std, log_prob = recompute(policy, embeds, step)
        anchor_mean = None
        if anchor is not None:
            with torch.no_grad():
                anchor_mean, _, _ = recompute(anchor.anchor, embeds, step)
        kl, _ = trust_region.dual_kl(mean, std, anchor_mean, step.mean, cfg.kl_mode, cfg.kl_anchor_weight,
                                     cfg.kl_step_weight, cfg.kl_step_estimator, log_prob, step.log_prob)
        loss, stats = grpo.clipped_policy_loss(log_prob, step.log_prob, advantages,
                                               step_weights[k].expand(len(advantages)), cfg.clip_range)
        push_policy += torch.autograd.grad(loss * stats["num_valid_pairs"], mean, retain_graph=True)[0].norm().item()
        push_kl += torch.autograd.grad(kl.sum(), mean)[0].norm().item()  # at β = 1; the push is linear in β
    push_policy = float(distributed.all_reduce(torch.tensor(push_policy, device=device)))
    push_kl = float(distributed.all_reduce(torch.tensor(push_kl, device=device)))
    betas = ((cfg.beta_min, cfg.beta_init, cfg.beta_max) if cfg.beta_schedule == "adaptive"
             else (cfg.beta_start, cfg.beta_end))  # the range of β the schedule can reach
    activity = {beta: beta * push_kl / push_policy if push_policy > 0 else math.nan for beta in betas}
    top = max(activity.values())
    return Line("trust region at β (after one optimizer step)",
                ", ".join(f"{a:.1e} at β {b:g}" for b, a in activity.items()), f"WARN < {ACTIVITY_WARN:g}",
                "WARN" if not top >= ACTIVITY_WARN else "PASS",
                "at these β the KL term barely pushes against the policy term: the trust region will not hold the "
                "policy near the anchor; raise β (--beta_schedule constant --beta_start B) or use "
                "--beta_schedule adaptive if you rely on it (docs/world.md: the synthetic world measures ~3e-8 at the "
                "official β; a fixed β of 0.1 acts there)")


def render(lines, per_step, sigma_pairs):
    """The pass/fail table, then one row per denoising step, as markdown."""
    text = ["| check | measured | threshold | status |", "|---|---|---|---|"]
    text += [f"| {l.check} | {l.measured} | {l.threshold} | **{l.status}** |" for l in lines]
    columns = sorted({c for row in per_step.values() for c in row}, key=lambda c: (c != "S_t", c))
    text += ["", "| step | σ → σ' | " + " | ".join(columns) + " |", "|---" * (len(columns) + 2) + "|"]
    for k, row in per_step.items():
        cells = [f"{row[c]:.2e}" if c in row else "—" for c in columns]
        text.append(f"| {k} | {sigma_pairs[k][0]:.3f} → {sigma_pairs[k][1]:.3f} | " + " | ".join(cells) + " |")
    failing = [l for l in lines if l.status in ("FAIL", "WARN") and l.remedy]
    if failing:
        text += ["", "What to do:"] + [f"- **{l.status} {l.check}**: {l.remedy}" for l in failing]
    return "\n".join(text) + "\n"
