"""CPU-scale convergence config, closer to the paper's regime than the demo.

16 experts top-4 with expert d_ff = d_model (the paper: 32 top-4, d_ff = d_model), every FFN an
MoE, dropless (capacity buckets: nothing dropped, no E/K padding on CPU), orthogonal router
init, SimBal 0.1 / LBL 0.01, output z-loss 1e-5, AdamW with warm-up and cosine decay; the
standard library's sources with the byte tokenizer. Sized for runs of a few minutes on a 2-core
CPU (experiments/convergence.py; docs/RESULTS.md has the timings). Variants as in base.py:
`configs/small.py:simbal`. The synthetic corpus: `--config.data.source=synthetic`.
"""

from simbal_jax.configs import base


def get_config(arg=None):
  """Small config; `arg` is a variant string (default: lbl)."""
  cfg = base.get_config()
  cfg.model.d_model = 64
  cfg.model.num_layers = 4
  cfg.model.num_heads = 4
  cfg.model.d_ff = 256  # the dense variant's FFN (4 * d_model)
  cfg.moe.num_experts = 16
  cfg.moe.top_k = 4
  cfg.moe.d_ff = 64
  cfg.moe.capacity_factor = 0.0  # dropless
  cfg.moe.dispatch = "buckets"
  cfg.opt.peak_lr = 3e-3
  cfg.opt.warmup_steps = 50
  cfg.data.source = "stdlib"
  cfg.data.tokenizer = "bytes"
  cfg.data.max_docs = 0
  cfg.data.synthetic.num_docs = 16384  # used with data.source=synthetic
  cfg.train.seq_len = 128
  cfg.train.global_batch_size = 16
  cfg.train.num_steps = 400  # 819k training tokens
  cfg.train.eval_tokens = 32768  # 256 sequences spread over the held-out split
  cfg.train.num_evals = 10
  cfg.train.pes_tokens = 1024
  cfg.ckpt.every = 200
  cfg.log.every = 20
  base.apply_variant(cfg, arg or "lbl")
  return cfg
