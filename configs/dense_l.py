"""Dense-L: MoE-L with one SwiGLU FFN of 4 * d_model per block and no balancing."""

from simbal_jax.configs import moe_l


def get_config(arg=None):
  """Dense-L; `arg`: extra comma-separated key=value overrides."""
  return moe_l.get_config("dense" + ("," + arg if arg else ""))
