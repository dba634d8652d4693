"""Eager argument checks shared by the metric modules (no jax tracing happens here)."""

import operator

import jax.numpy as jnp


def static_int(value, name, minimum=None):
  """Returns `value` as a Python int or raises ValueError (tracers are not static)."""
  try:
    value = operator.index(value)
  except TypeError:
    raise ValueError(f"{name} must be a static Python int, got {type(value).__name__}: "
                     f"{value!r}") from None
  if minimum is not None and value < minimum:
    raise ValueError(f"{name} must be >= {minimum}, got {value}")
  return value


def check_rank(x, rank, name, shape_doc):
  x = jnp.asarray(x)
  if x.ndim != rank:
    raise ValueError(f"{name} must have rank {rank} {shape_doc}, got shape {x.shape}")
  return x


def check_index(expert_index, rank, shape_doc):
  expert_index = check_rank(expert_index, rank, "expert_index", shape_doc)
  if not jnp.issubdtype(expert_index.dtype, jnp.integer):
    raise ValueError(f"expert_index must have an integer dtype, got {expert_index.dtype}")
  return expert_index


def check_mask(mask, shape, name="mask"):
  """Returns the mask as bool of `shape`, or all True when mask is None."""
  if mask is None:
    return jnp.ones(shape, bool)
  mask = jnp.asarray(mask)
  if mask.shape != tuple(shape):
    raise ValueError(f"{name} must have shape {tuple(shape)}, got {mask.shape}")
  return mask.astype(bool)


def check_load(load_E):
  load = jnp.asarray(load_E, jnp.float32)
  if load.ndim < 1:
    raise ValueError(f"load_E must have rank >= 1 [..., E], got shape {load.shape}")
  return load


def masked_mean(values, mask):
  """Mean of `values` over True entries of `mask` (0 when there are none)."""
  weights = mask.astype(jnp.float32)
  return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1.0)
