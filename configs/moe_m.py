"""MoE-M from the SimBal paper (arXiv 2506.14038): 627M total / 230M active parameters.

Variants via the config string: `configs/moe_m.py:simbal`, `moe_m.py:lf_simbal_sigmoid`,
`moe_m.py:simbal_coef1`, `moe_m.py:dense` (Dense-M); see configs/base.py:apply_variant.
Batch and sequence length are not given in the paper: we use 2048-token sequences and 512
sequences per step (1,048,576 tokens), so the 19.9B-token budget is 18,979 steps.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import base  # noqa: E402


def get_config(arg=None):
  """MoE-M; `arg` is a variant string (default: lbl)."""
  cfg = base.get_config()
  cfg.model.vocab_size = 100277  # cl100k_base
  cfg.model.d_model = 768
  cfg.model.num_layers = 8
  cfg.model.num_heads = 8
  cfg.model.d_ff = 4 * 768  # Dense-M FFN
  cfg.model.rope_theta = 1e4
  cfg.model.dtype = "bfloat16"  # bf16 compute, float32 master weights
  cfg.moe.num_experts = 32
  cfg.moe.top_k = 4
  cfg.moe.d_ff = 768
  # Dropless as in the paper. At this batch that is a huge buffer: on GPU pass
  # --config.moe.capacity_factor=1.25, on TPU --config.moe.dispatch=ragged (README, Training).
  cfg.moe.capacity_factor = 0.0
  cfg.moe.num_groups = 0  # auto: one routing group per batch shard (mesh data x expert)
  cfg.opt.peak_lr = 5e-4
  cfg.opt.warmup_steps = 2000
  cfg.data.source = "tfds"  # DCLM prepared as TFDS array_record (one shard held out)
  cfg.data.tokenizer = "cl100k"
  cfg.train.seq_len = 2048
  cfg.train.global_batch_size = 512
  cfg.train.token_budget = int(19.9e9)
  cfg.train.num_steps = 0  # derived from token_budget at start, after any overrides
  cfg.train.eval_every = 1000
  cfg.train.eval_batches = 64
  cfg.ckpt.every = 1000
  cfg.log.every = 50
  base.apply_variant(cfg, arg or "lbl")
  return cfg
