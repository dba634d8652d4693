"""Dense-L: MoE-L with one SwiGLU FFN of 4 * d_model per block and no balancing."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import moe_l  # noqa: E402


def get_config(arg=None):
  """Dense-L; `arg`: extra comma-separated key=value overrides."""
  return moe_l.get_config("dense" + ("," + arg if arg else ""))
