"""README's examples of the losses from one's own JAX code, run as written.

Each ```python block after a `<!-- example: NAME ... -->` line of README.md runs in a fresh
namespace: plain JAX (SimBal and the LBL of a random router, and SimBal's gradient), a Flax NNX
router and an Equinox router (one SGD step with SimBal in the loss each).
"""
import os
import re

import jax
import numpy as np
import pytest

from simbal_jax import init
from simbal_jax import losses

_README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
_EXAMPLE = re.compile(r"<!-- example: (\w+)[^\n]*-->\n```python\n(.*?)```", re.S)


def _examples():
  with open(_README, encoding="utf-8") as f:
    return dict(_EXAMPLE.findall(f.read()))


def _run(name):
  code = _examples()[name]
  namespace = {"__name__": f"readme_{name}"}
  exec(compile(code, f"README.md:{name}", "exec"), namespace)  # pylint: disable=exec-used
  return namespace


def test_the_readme_has_the_three_examples():
  assert set(_examples()) == {"plain_jax", "nnx", "equinox"}
  for name, code in _examples().items():
    assert "losses.simbal(" in code, name


def test_plain_jax_example():
  ns = _run("plain_jax")
  kernel = np.asarray(ns["kernel"], np.float64)
  gram = kernel.T @ kernel
  np.testing.assert_allclose(ns["simbal"], np.abs(gram - np.eye(8)).sum(), rtol=1e-5)
  assert 1.0 <= float(ns["lbl"]) < 1.5  # near 1 (uniform) for a small random router
  assert ns["grad"].shape == kernel.shape and np.all(np.isfinite(ns["grad"]))


def _check_one_step(before, after, grads):
  """`after` is one SGD step (rate 0.01) from the orthogonal `before` along the only gradient."""
  (g,) = jax.tree.leaves(grads)
  assert g.shape == (64, 8) and np.all(np.isfinite(g))
  np.testing.assert_allclose(after, before - 0.01 * g, rtol=1e-5, atol=1e-6)
  assert float(losses.simbal(before)) < 1e-4 < float(losses.simbal(after))  # orthogonal, then not


def test_nnx_example():
  nnx = pytest.importorskip("flax.nnx")
  ns = _run("nnx")
  assert np.isfinite(float(ns["loss"]))
  before = init.orthogonal_init()(nnx.Rngs(0).params(), (64, 8))
  _check_one_step(before, ns["router"].kernel[...], ns["grads"])


def test_equinox_example():
  pytest.importorskip("equinox", reason="the Equinox example needs equinox (the test extra)")
  ns = _run("equinox")
  assert np.isfinite(float(ns["loss"]))
  before = init.orthogonal_init()(jax.random.key(0), (64, 8))
  _check_one_step(before, ns["router"].kernel, ns["grads"])
