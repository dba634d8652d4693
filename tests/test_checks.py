"""simbal_jax/_checks.py: the argument checks shared by the pure math modules (their use in each
module's functions: test_metrics.py's test_bad_arguments_raise and the modules' own tests)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simbal_jax import _checks


def test_static_int_accepts_python_and_numpy_ints_only():
  assert _checks.static_int("k", np.int64(3), 1, 4) == 3
  for value, match in [(True, "k must be an int, got bool True"), (2.5, "static Python int"),
                       (0, "k must be >= 1, got 0"), (5, "k must be <= 4, got 5")]:
    with pytest.raises(ValueError, match=match):
      _checks.static_int("k", value, 1, 4)
  with pytest.raises(ValueError, match="static Python int"):
    jax.jit(lambda k: _checks.static_int("k", k))(3)


def test_rank_dtype_mask_and_name_checks_name_the_argument():
  x = _checks.check_rank("x_TxE", np.ones((2, 3)), 2, "[T, E]")
  assert isinstance(x, jax.Array) and x.shape == (2, 3)
  with pytest.raises(ValueError, match=r"x_TxE must have rank 2 \[T, E\], got shape \(3,\)"):
    _checks.check_rank("x_TxE", np.ones(3), 2, "[T, E]")
  with pytest.raises(ValueError, match="must have rank >= 2"):
    _checks.check_min_rank("k", np.ones(3), 2)
  with pytest.raises(ValueError, match="index must have an integer dtype, got float32"):
    _checks.check_index("index", np.ones((2, 2), np.float32), 2)
  with pytest.raises(ValueError, match=r"mask must have shape \(2,\), got \(3,\)"):
    _checks.check_mask("mask", np.ones(3), (2,))
  assert _checks.bool_mask("mask", None, (2,)).tolist() == [True, True]
  with pytest.raises(ValueError, match="Unknown norm 'l3'; valid: 'l1', 'fro2'"):
    _checks.check_name("norm", "l3", ("l1", "fro2"))


def test_masked_mean_and_safe_div_are_zero_without_weight():
  values = jnp.asarray([1.0, 2.0, 6.0])
  assert float(_checks.masked_mean(values, None)) == 3.0
  assert float(_checks.masked_mean(values, jnp.asarray([True, False, True]))) == 3.5
  assert float(_checks.masked_mean(values, jnp.zeros(3))) == 0.0
  assert float(_checks.safe_div(jnp.float32(1.0), jnp.float32(0.0))) == 0.0
