"""Eager argument checks shared by the pure math modules (routing, losses, metrics, specialization).

Every check takes the argument's NAME FIRST, then the value, then the constraint
(`static_int("top_k", top_k, 1, num_experts)`), raises `ValueError` with a message that starts
with that name, and runs before anything is traced (shapes and dtypes are static under `jit`).
"""

import operator

import jax
import jax.numpy as jnp


def static_int(name, value, minimum=None, maximum=None):
  """Returns `value` as a Python int, or raises ValueError (bools and tracers are not static ints).

  Args:
    name: str, the argument's name for the message.
    value: anything with `__index__` (int, numpy integer).
    minimum: optional int, inclusive lower bound.
    maximum: optional int, inclusive upper bound.
  """
  if isinstance(value, bool):
    raise ValueError(f"{name} must be an int, got bool {value!r}.")
  try:
    value = operator.index(value)
  except TypeError:
    raise ValueError(f"{name} must be a static Python int, got {type(value).__name__}: "
                     f"{value!r}.") from None
  if minimum is not None and value < minimum:
    raise ValueError(f"{name} must be >= {minimum}, got {value}.")
  if maximum is not None and value > maximum:
    raise ValueError(f"{name} must be <= {maximum}, got {value}.")
  return value


def check_name(kind, value, valid):
  """Raises ValueError unless `value` is one of `valid` (a tuple of option names)."""
  if value not in valid:
    raise ValueError(f"Unknown {kind} {value!r}; valid: {', '.join(map(repr, valid))}.")


def _shape_doc(shape_doc):
  return f" {shape_doc}" if shape_doc else ""


def check_rank(name, x, rank, shape_doc=""):
  """Returns `jnp.asarray(x)`, or raises ValueError unless its rank is exactly `rank`.

  Args:
    name: str, the argument's name.
    x: array-like (or tracer).
    rank: int.
    shape_doc: optional str naming the axes for the message, e.g. "[T, K]".
  """
  x = jnp.asarray(x)
  if x.ndim != rank:
    raise ValueError(f"{name} must have rank {rank}{_shape_doc(shape_doc)}, got shape "
                     f"{x.shape}.")
  return x


def check_min_rank(name, x, rank, shape_doc=""):
  """Returns `jnp.asarray(x)`, or raises ValueError unless its rank is >= `rank`."""
  x = jnp.asarray(x)
  if x.ndim < rank:
    raise ValueError(f"{name} must have rank >= {rank}{_shape_doc(shape_doc)}, got shape "
                     f"{x.shape}.")
  return x


def check_index(name, x, rank, shape_doc=""):
  """`check_rank`, and an integer dtype (expert indices, domain labels)."""
  x = check_rank(name, x, rank, shape_doc)
  if not jnp.issubdtype(x.dtype, jnp.integer):
    raise ValueError(f"{name} must have an integer dtype, got {x.dtype}.")
  return x


def check_mask(name, mask, shape):
  """Returns `mask` unchanged (None allowed), or raises ValueError unless its shape is `shape`."""
  if mask is not None and tuple(jnp.shape(mask)) != tuple(shape):
    raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(jnp.shape(mask))}.")
  return mask


def bool_mask(name, mask, shape):
  """`check_mask`, then the mask as bool[shape] (all True when `mask` is None)."""
  if check_mask(name, mask, shape) is None:
    return jnp.ones(tuple(shape), bool)
  return jnp.asarray(mask).astype(bool)


def check_load(load_E):
  """`load_E` as float32[..., E] (rank >= 1)."""
  return check_min_rank("load_E", jnp.asarray(load_E, jnp.float32), 1, "[..., E]")


def safe_div(num, den):
  """num / den where den > 0, else 0 (e.g. an all-padding batch)."""
  ok = den > 0
  return jnp.where(ok, num / jnp.where(ok, den, 1.0), 0.0)


def masked_mean(values, mask, axis_name=None):
  """The one weighted mean of the pure modules: sum(values * w) / sum(w), 0 when sum(w) is 0.

  Args:
    values: float[...] values.
    mask: bool/float[...] weights of the same shape, or None (all 1).
    axis_name: named axis (str or tuple) to psum numerator and denominator over (an exact
      cross-shard mean inside shard_map / pmap), or None.
  """
  weights = (jnp.ones(jnp.shape(values), jnp.float32) if mask is None
             else jnp.asarray(mask).astype(jnp.float32))
  num, den = jnp.sum(values * weights), jnp.sum(weights)
  if axis_name is not None:
    num, den = jax.lax.psum(num, axis_name), jax.lax.psum(den, axis_name)
  return safe_div(num, den)
