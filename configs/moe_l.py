"""MoE-L from the SimBal paper (arXiv 2506.14038): 3.14B total / 761M active parameters.

Variants as in moe_m.py (`configs/moe_l.py:simbal`, `:dense` for Dense-L, ...). Sequences of
2048 tokens, 512 per step (1,048,576 tokens, as MoE-M), so the 78.6B-token budget is 74,959
steps. The step is accumulated over 64 micro-batches of 8 sequences, one per chip on a v5e-8
with `--config.mesh.fsdp=8`, blocks rematerialised (`experiments/aot.py` compiles it to fit
16 GB per chip; docs/PERFORMANCE.md). On N chips: `train.grad_accum = 512 / N`.
"""

from simbal_jax.configs import base


def get_config(arg=None):
  """MoE-L; `arg` is a variant string (default: lbl)."""
  cfg = base.paper_config(d_model=1536, num_layers=12, num_heads=12, rope_theta=1e5,
                          peak_lr=3e-4, global_batch_size=512, token_budget=int(78.6e9))
  cfg.model.remat = True
  cfg.train.grad_accum = 64  # micro-batches of 8 sequences
  # bf16 parameters (and AdamW moments), as the paper trains them: with float32 ones the
  # v5e-8 compile needs 17.4 GiB of temporaries per 16 GiB chip (docs/PERFORMANCE.md).
  cfg.model.param_dtype = "bfloat16"
  cfg.mesh.expert = 1  # raise on multi-chip slices, e.g. --config.mesh.expert=8
  base.apply_variant(cfg, arg or "lbl")
  return cfg
