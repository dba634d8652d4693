"""MoE-M from the SimBal paper (arXiv 2506.14038): 627M total / 230M active parameters.

Variants via the config string: `configs/moe_m.py:simbal`, `moe_m.py:lf_simbal_sigmoid`,
`moe_m.py:simbal_coef1`, `moe_m.py:dense` (Dense-M); see configs/base.py:apply_variant.
Batch and sequence length are not given in the paper: we use 2048-token sequences and 512
sequences per step (1,048,576 tokens), so the 19.9B-token budget is 18,979 steps. The step is
accumulated over 32 micro-batches of 16 sequences, 2 per chip on a v5e-8 with
`--config.mesh.fsdp=8` (`experiments/aot.py` compiles it to fit 16 GB per chip; measured rows in
docs/PERFORMANCE.md). On N chips keep about 2 sequences per chip per micro-batch:
`train.grad_accum = 512 / (2 N)` (the micro-batch must be divisible by data x fsdp x expert).
"""

from simbal_jax.configs import base


def get_config(arg=None):
  """MoE-M; `arg` is a variant string (default: lbl)."""
  cfg = base.paper_config(d_model=768, num_layers=8, num_heads=8, rope_theta=1e4, peak_lr=5e-4,
                          global_batch_size=512, token_budget=int(19.9e9))
  cfg.train.grad_accum = 32  # micro-batches of 16 sequences
  base.apply_variant(cfg, arg or "lbl")
  return cfg
