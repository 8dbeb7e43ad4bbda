"""The toy: the whole SAGE-GRPO method on a 2-D manifold, on a CPU, in seconds.

Run `python toy/demo.py` (add `--ablation` for the full grid, `--fast` for the test setting).
One concept per file: manifold.py (the curve and its distance), target_reward.py (a hackable
reward), velocity.py (the tiny velocity MLP), pretrain.py (flow matching on the curve),
rollout.py (sampling with any kernel of sde.py), trainer.py (GRPO), gaussian_check.py (exact
excess variance on Gaussian data), demo.py (the experiments and pictures);
video_world.py and pretrain.py: a synthetic latent video world (exact manifold distance,
hackable VideoAlign-shaped reward, a tiny real HunyuanVideo-1.5 pretrained on it) for train.py on a CPU.
"""
