"""The jitted train and eval steps compile once and return flat, namespaced scalar metrics."""
import jax
import numpy as np
import pytest

from configs import demo
from simbal_jax import sharding
from simbal_jax import train

pytestmark = pytest.mark.usefixtures("fast_compiles")


@pytest.mark.parametrize("method", ["lf_simbal", "lbl"])
def test_steps_compile_once(tmp_path, method):
  cfg = demo.get_config(method)
  cfg.model.d_model, cfg.model.num_heads, cfg.moe.num_experts, cfg.moe.d_ff = 32, 2, 4, 32
  cfg.data.source, cfg.data.synthetic.num_docs = "synthetic", 256
  cfg.data.synthetic.vocab_size = 64
  cfg.train.seq_len, cfg.train.global_batch_size, cfg.train.num_steps = 16, 8, 4
  env = train.build(cfg, str(tmp_path), devices=jax.devices()[:1])
  with sharding.mesh_rules(env.mesh, env.rules):
    state, _, source = train.initial_state(env, None)
    assert source == "scratch"
    train_step, eval_step = train.make_steps(env)
    it = env.datasets.train_iter()
    bias0 = np.asarray(state.expert_bias)
    for _ in range(3):
      state, metrics = train_step(state, train.to_global(next(it), env.batch_sharding))
    for batch in env.datasets.eval_batches(2):
      eval_step(state.params, state.expert_bias, train.to_global(batch, env.batch_sharding))
  assert train_step._cache_size() == 1  # pylint: disable=protected-access
  assert eval_step._cache_size() == 1  # pylint: disable=protected-access
  assert int(state.step) == 3
  assert all(np.ndim(v) == 0 for v in metrics.values())
  assert all(k.split("/")[0] in ("train", "moe") for k in metrics)
  expected = {"lbl": "train/lbl", "lf_simbal": "train/simbal"}[method]
  assert expected in metrics and np.isfinite(float(metrics[expected]))
  # The Loss-Free bias moves only when the method uses it.
  moved = not np.array_equal(np.asarray(state.expert_bias), bias0)
  assert moved == (method == "lf_simbal")
