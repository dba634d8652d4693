"""Optimizer: AdamW with warm-up + cosine schedule (the paper's recipe).

Schedule: linear warm-up from `warmup_init_frac * peak` to `peak` over `warmup_steps`, then
cosine decay to `final_frac * peak` at `num_steps`. Weight decay applies to matrices (rank >= 2
parameters: kernels, embeddings, stacked expert weights), not to norm scales or biases.
"""

import jax
import optax


def make_schedule(opt_cfg, num_steps):
  """Learning-rate schedule step -> lr.

  Args:
    opt_cfg: cfg.opt (peak_lr, warmup_steps, warmup_init_frac, final_frac).
    num_steps: int, total optimizer steps.
  Returns:
    optax.Schedule.
  """
  peak = float(opt_cfg.peak_lr)
  warmup = int(min(opt_cfg.warmup_steps, max(num_steps - 1, 0)))
  if num_steps < 1:
    raise ValueError(f"num_steps must be >= 1, got {num_steps}")
  if peak <= 0:
    raise ValueError(f"opt.peak_lr must be > 0, got {peak}")
  return optax.warmup_cosine_decay_schedule(
      init_value=peak * float(opt_cfg.warmup_init_frac),
      peak_value=peak,
      warmup_steps=warmup,
      decay_steps=max(int(num_steps), warmup + 1),
      end_value=peak * float(opt_cfg.final_frac))


def decay_mask(params):
  """True for leaves that get weight decay (rank >= 2)."""
  return jax.tree.map(lambda p: getattr(p, "ndim", 0) >= 2, params)


def make_optimizer(opt_cfg, num_steps):
  """optax chain: optional global-norm clipping, then AdamW with the schedule.

  Args:
    opt_cfg: cfg.opt.
    num_steps: int, total optimizer steps.
  Returns:
    (optax.GradientTransformation, schedule).
  """
  schedule = make_schedule(opt_cfg, num_steps)
  parts = []
  if opt_cfg.grad_clip and opt_cfg.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(float(opt_cfg.grad_clip)))
  parts.append(optax.adamw(
      learning_rate=schedule, b1=float(opt_cfg.b1), b2=float(opt_cfg.b2),
      eps=float(opt_cfg.eps), weight_decay=float(opt_cfg.weight_decay), mask=decay_mask))
  return optax.chain(*parts), schedule
