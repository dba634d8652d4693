"""CPU demo: a small MoE on the Python standard library's sources (bytes tokenizer).

Sized so that `make demo` trains it twice (LBL and SimBal) on 2 CPU cores in a few minutes.
Variants as in base.py: `configs/demo.py:simbal`.
"""

from simbal_jax.configs import base


def get_config(arg=None):
  """Demo config; `arg` is a variant string (default: lbl)."""
  cfg = base.get_config()
  cfg.model.d_model = 64
  cfg.model.num_layers = 2
  cfg.model.num_heads = 4
  cfg.model.d_ff = 256
  cfg.moe.num_experts = 8
  cfg.moe.top_k = 2
  cfg.moe.d_ff = 64
  cfg.opt.peak_lr = 3e-3
  cfg.opt.warmup_steps = 30
  cfg.data.source = "stdlib"
  cfg.data.tokenizer = "bytes"
  cfg.data.max_docs = 0  # the whole standard library: many held-out documents
  cfg.train.seq_len = 64
  cfg.train.global_batch_size = 16
  cfg.train.num_steps = 1000
  cfg.train.eval_tokens = 65536  # 1024 sequences spread over the held-out files
  cfg.train.num_evals = 12
  cfg.train.pes_tokens = 512
  cfg.ckpt.every = 150
  cfg.log.every = 10
  base.apply_variant(cfg, arg or "lbl")
  return cfg
