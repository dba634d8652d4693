"""MoE-M from the SimBal paper (arXiv 2506.14038): 627M total / 230M active parameters.

Variants via the config string: `configs/moe_m.py:simbal`, `moe_m.py:lf_simbal_sigmoid`,
`moe_m.py:simbal_coef1`, `moe_m.py:dense` (Dense-M); see configs/base.py:apply_variant.
Batch and sequence length are not given in the paper: we use 2048-token sequences and 512
sequences per step (1,048,576 tokens), so the 19.9B-token budget is 18,979 steps.
"""

from simbal_jax.configs import base


def get_config(arg=None):
  """MoE-M; `arg` is a variant string (default: lbl)."""
  cfg = base.paper_config(d_model=768, num_layers=8, num_heads=8, rope_theta=1e4, peak_lr=5e-4,
                          global_batch_size=512, token_budget=int(19.9e9))
  base.apply_variant(cfg, arg or "lbl")
  return cfg
