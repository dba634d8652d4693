"""Dense-M: MoE-M with one SwiGLU FFN of 4 * d_model per block and no balancing."""

from simbal_jax.configs import moe_m


def get_config(arg=None):
  """Dense-M; `arg`: extra comma-separated key=value overrides."""
  return moe_m.get_config("dense" + ("," + arg if arg else ""))
