"""MoE-L from the SimBal paper (arXiv 2506.14038): 3.14B total / 761M active parameters.

Variants as in moe_m.py (`configs/moe_l.py:simbal`, `:dense` for Dense-L, ...). Sequences of
2048 tokens, 1024 per step (2,097,152 tokens), so the 78.6B-token budget is 37,480 steps.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import base  # noqa: E402


def get_config(arg=None):
  """MoE-L; `arg` is a variant string (default: lbl)."""
  cfg = base.get_config()
  cfg.model.vocab_size = 100277  # cl100k_base
  cfg.model.d_model = 1536
  cfg.model.num_layers = 12
  cfg.model.num_heads = 12
  cfg.model.d_ff = 4 * 1536  # Dense-L FFN
  cfg.model.rope_theta = 1e5
  cfg.model.dtype = "bfloat16"
  cfg.model.remat = True
  cfg.moe.num_experts = 32
  cfg.moe.top_k = 4
  cfg.moe.d_ff = 1536
  # Dropless as in the paper. At this batch that is a huge buffer: on GPU pass
  # --config.moe.capacity_factor=1.25, on TPU --config.moe.dispatch=ragged (README, Training).
  cfg.moe.capacity_factor = 0.0
  cfg.moe.num_groups = 0  # auto: one routing group per batch shard (mesh data x expert)
  cfg.opt.peak_lr = 3e-4
  cfg.opt.warmup_steps = 2000
  cfg.data.source = "tfds"
  cfg.data.tokenizer = "cl100k"
  cfg.train.seq_len = 2048
  cfg.train.global_batch_size = 1024
  cfg.train.token_budget = int(78.6e9)
  cfg.train.num_steps = 0  # derived from token_budget at start, after any overrides
  cfg.train.eval_every = 2000
  cfg.train.eval_batches = 64
  cfg.ckpt.every = 1000
  cfg.log.every = 50
  cfg.mesh.expert = 1  # raise on multi-chip slices, e.g. --config.mesh.expert=8
  base.apply_variant(cfg, arg or "lbl")
  return cfg
