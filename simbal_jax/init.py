"""Initializers (pure JAX): the orthogonal router of the SimBal paper, a normal router and
fan-in matmul kernels. Each returns `init(key, shape, dtype=float32)`, the signature of
`jax.nn.initializers` and Flax's `kernel_init`.
"""

import jax
import jax.numpy as jnp

ROUTER_INITS = ("orthogonal", "normal")


def orthogonal_init(scale=1.0):
  """Initializer `init(key, shape, dtype=float32)` for router kernels of shape [..., D, E].

  Draws a Gaussian [..., max(D, E), min(D, E)] matrix per leading index, takes its reduced QR
  factor Q with the sign convention diag(R) > 0 (Haar-distributed), and returns `scale * Q`:
  orthonormal columns (`R^T R = scale^2 I_E`, SimBal 0 for scale 1) when D >= E; when D < E the
  transpose, i.e. orthonormal rows (`R R^T = scale^2 I_D`), the closest to orthogonal possible.
  Same signature as `jax.nn.initializers` / Flax initializers; usable as `kernel_init`.

  Kept instead of `jax.nn.initializers.orthogonal(scale, column_axis=-1)`: for float32 [D, E]
  (D > E, D < E, D = E) that returns bit-identical arrays for the same key, but it flattens
  leading dims into one [prod(...) * D, E] matrix (not orthogonal per leading index; measured
  max |difference| 0.2-0.65 for [3, 64, 8], [2, 16, 16], [2, 4, 8, 64]) and factorises in the
  target dtype, which fails for bfloat16 (configs/moe_l.py's param_dtype); this draws and
  factorises in float32 and casts.

  Args:
    scale: float multiplier.

  Returns:
    Callable (key, shape, dtype=jnp.float32) -> Array of `shape` and `dtype`.
  """

  def init(key, shape, dtype=jnp.float32):
    shape = tuple(shape)
    if len(shape) < 2:
      raise ValueError(f"orthogonal_init needs a shape [..., D, E] of rank >= 2, got {shape}.")
    d, e = shape[-2:]
    a = jax.random.normal(key, shape[:-2] + (max(d, e), min(d, e)), jnp.float32)
    q, r = jnp.linalg.qr(a)
    sign = jnp.where(jnp.diagonal(r, axis1=-2, axis2=-1) < 0, -1.0, 1.0)
    q = q * sign[..., None, :]
    if d < e:
      q = jnp.swapaxes(q, -1, -2)
    return (scale * q).astype(dtype)

  return init


def normal_router_init(scale=1.0):
  """N(0, scale^2 / D) entries for a router kernel [..., D, E]: expected column norm `scale`,
  like the orthogonal init, without orthogonality."""

  def init(key, shape, dtype=jnp.float32):
    std = scale / jnp.sqrt(shape[-2]).astype(jnp.float32)
    return (jax.random.normal(key, shape, jnp.float32) * std).astype(dtype)

  return init


def router_init(kind, scale=1.0):
  """Initializer for a router kernel [D, E]: "orthogonal" or "normal" (ROUTER_INITS)."""
  if kind == "orthogonal":
    return orthogonal_init(scale)
  if kind == "normal":
    return normal_router_init(scale)
  raise ValueError(f"router_init={kind!r}; valid: {ROUTER_INITS}")


def kernel_init(in_axis=-2, out_axis=-1, batch_axis=()):
  """Truncated-normal fan-in initializer (std 1 / sqrt(fan_in)) for matmul kernels."""
  return jax.nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal",
                                              in_axis=in_axis, out_axis=out_axis,
                                              batch_axis=batch_axis)
