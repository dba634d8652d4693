"""MoE-L from the SimBal paper (arXiv 2506.14038): 3.14B total / 761M active parameters.

Variants as in moe_m.py (`configs/moe_l.py:simbal`, `:dense` for Dense-L, ...). Sequences of
2048 tokens, 1024 per step (2,097,152 tokens), so the 78.6B-token budget is 37,480 steps.
"""

from simbal_jax.configs import base


def get_config(arg=None):
  """MoE-L; `arg` is a variant string (default: lbl)."""
  cfg = base.paper_config(d_model=1536, num_layers=12, num_heads=12, rope_theta=1e5,
                          peak_lr=3e-4, global_batch_size=1024, token_budget=int(78.6e9))
  cfg.model.remat = True
  cfg.mesh.expert = 1  # raise on multi-chip slices, e.g. --config.mesh.expert=8
  base.apply_variant(cfg, arg or "lbl")
  return cfg
