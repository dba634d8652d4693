"""evaluate.py: the eval schedule, the eval set (same for every seed and method), eval batches
made on access."""

import jax
import numpy as np
import pytest

from simbal_jax import env as env_lib
from simbal_jax import evaluate

from conftest import tiny_config


def test_eval_steps_linear_log_and_every():
  t = tiny_config(steps=100).train
  t.num_evals = 8
  # linspace(12.5, 100, 8) rounded half to even
  assert evaluate.eval_steps(t) == [12, 25, 38, 50, 62, 75, 88, 100]
  t.num_evals, t.eval_spacing = 5, "log"
  assert evaluate.eval_steps(t) == [1, 3, 10, 32, 100]
  t.num_evals = 0
  assert evaluate.eval_steps(t) == [100]
  t.eval_every = 30
  assert evaluate.eval_steps(t) == [30, 60, 90, 100]


@pytest.mark.usefixtures("fast_compiles")
def test_eval_set_is_the_same_across_seeds_and_methods(tmp_path):
  """The evaluation set is spread over the held-out split and identical across seeds and
  methods."""
  env_a = env_lib.build(tiny_config("simbal", steps=6), str(tmp_path / "a"))
  cfg_b = tiny_config("lbl", steps=6)
  cfg_b.seed = 3
  env_b = env_lib.build(cfg_b, str(tmp_path / "b"))
  ea, eb = evaluate.eval_set(env_a), evaluate.eval_set(env_b)
  np.testing.assert_array_equal(np.concatenate([b["inputs"] for b in ea]),
                                np.concatenate([b["inputs"] for b in eb]))
  idx = env_a.datasets.eval_indices(8)
  assert idx[0] == 0 and idx[-1] == len(env_a.datasets.eval) - 1  # spans the whole split


def test_eval_batches_are_micro_batches_made_on_access():
  """The eval set stays on the host: each access gives one global micro-batch (host batches
  split in order into train.grad_accum parts), sharded over the batch axes."""
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  sharding_ = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  host = [{"inputs": np.arange(16 * 3).reshape(16, 3) + 100 * i,
           "targets": np.zeros((16, 3), np.int32), "other": np.ones(16)} for i in range(2)]
  batches = evaluate.EvalBatches(host, sharding_, micro=2)
  assert len(batches) == 4
  got = np.concatenate([np.asarray(b["inputs"]) for b in batches])
  np.testing.assert_array_equal(got, np.concatenate([h["inputs"] for h in host]))
  first = batches[0]
  assert set(first) == {"inputs", "targets"} and first["inputs"].shape == (8, 3)
  assert first["inputs"].sharding == sharding_
  # 3 parts do not divide 16 rows, 4 parts of 4 rows do not split over 8 devices: 2 parts
  assert len(evaluate.EvalBatches(host, sharding_, micro=3)) == 4
  assert len(evaluate.EvalBatches(host, sharding_, micro=4)) == 4
