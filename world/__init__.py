"""The synthetic video world: an input of the real trainer (`train.py --world`, `eval.py --world`), not the 2-D toy.

A latent video space with an exactly known data manifold and a hackable, VideoAlign-shaped reward, and a tiny
HunyuanVideo-1.5 pretrained on it, so that the real train.py learns on a CPU and "off the manifold" is a number.
One concept per file: video_world.py (the manifold, the prompts, the exact reward), pretrain.py (the world's
pretrained policy, cached), runs.py (the seed grids behind docs/world.md: `python world/runs.py --grid …`),
rollout_quality.py (each kernel's untrained rollouts against η and the matched η the grids read).
"""
