"""Tests for simbal_jax.init: the router and kernel initializers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simbal_jax import init as init_lib

@pytest.mark.parametrize("shape", [(64, 8), (8, 64), (16, 16)])
def test_orthogonal_2d_equals_jax_initializer(shape):
  # The reason to keep our own (init.orthogonal_init's docstring): equal for float32 [D, E] ...
  key = jax.random.key(3)
  ours = init_lib.orthogonal_init(0.5)(key, shape)
  lib = jax.nn.initializers.orthogonal(0.5, column_axis=-1)(key, shape, jnp.float32)
  np.testing.assert_array_equal(np.asarray(ours), np.asarray(lib))


def test_orthogonal_per_leading_index():
  # ... but orthogonal per leading index, where the library's flattens the leading dims.
  stacked = np.asarray(init_lib.orthogonal_init()(jax.random.key(0), (3, 32, 8)), np.float64)
  for q in stacked:
    np.testing.assert_allclose(q.T @ q, np.eye(8), atol=1e-5)
  assert not np.allclose(stacked[0], stacked[1])


def test_normal_router_init_column_norm():
  w = np.asarray(init_lib.router_init("normal", 2.0)(jax.random.key(1), (4096, 4)), np.float64)
  np.testing.assert_allclose(np.linalg.norm(w, axis=0), 2.0, rtol=0.05)
  with pytest.raises(ValueError, match="router_init"):
    init_lib.router_init("uniform")
