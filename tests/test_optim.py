"""Optimizer schedule: warm-up from 10% of peak, cosine to 10%; decay mask."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from simbal_jax.configs import moe_m
from simbal_jax import env as env_lib
from simbal_jax import optim

def _ref_lr(step, peak, warm, total, init=0.1, final=0.1):
  if step < warm:
    return peak * (init + (1 - init) * step / warm)
  frac = min((step - warm) / (total - warm), 1.0)
  return peak * (final + (1 - final) * 0.5 * (1 + math.cos(math.pi * frac)))


def test_paper_schedule():
  cfg = env_lib.prepare_config(moe_m.get_config())  # derives num_steps from the token budget
  sched = optim.make_schedule(cfg.opt, cfg.train.num_steps)
  n = cfg.train.num_steps
  assert n == 18_979
  for s in (0, 1, 1000, 1999, 2000, 5000, n // 2, n - 1, n):
    np.testing.assert_allclose(float(sched(s)), _ref_lr(s, 5e-4, 2000, n), rtol=1e-5)


def test_schedule_validation():
  cfg = moe_m.get_config()
  with pytest.raises(ValueError, match="num_steps"):
    optim.make_schedule(cfg.opt, 0)


def test_weight_decay_only_on_matrices():
  cfg = moe_m.get_config()
  cfg.opt.grad_clip = 0.0
  tx, sched = optim.make_optimizer(cfg.opt, 100)
  params = {"kernel": jnp.ones((2, 3)), "scale": jnp.ones((3,))}
  zeros = {"kernel": jnp.zeros((2, 3)), "scale": jnp.zeros((3,))}
  upd, _ = tx.update(zeros, tx.init(params), params)
  lr0 = float(sched(0))
  np.testing.assert_allclose(np.asarray(upd["kernel"]), -lr0 * 0.01 * np.ones((2, 3)), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(upd["scale"]), 0.0)


def test_clipping_reaches_the_optimizer():
  cfg = moe_m.get_config()
  cfg.opt.grad_clip = 1.0
  cfg.opt.weight_decay = 0.0
  tx, _ = optim.make_optimizer(cfg.opt, 100)
  params = {"a": jnp.zeros((4,))}
  g = {"a": jnp.array([10.0, -20.0, 5.0, 0.0])}
  _, state = tx.update(g, tx.init(params), params)
  adam = [s for s in jax.tree_util.tree_leaves(
      state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
          if isinstance(s, optax.ScaleByAdamState)]
  assert len(adam) == 1
  g_np = np.array([10.0, -20.0, 5.0, 0.0])
  expected_mu = (1 - cfg.opt.b1) * g_np / np.linalg.norm(g_np)  # clipped to norm 1, then EMA
  np.testing.assert_allclose(np.asarray(adam[0].mu["a"]), expected_mu, rtol=1e-6)
