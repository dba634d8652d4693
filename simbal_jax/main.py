"""Command line: `python -m simbal_jax.main --config=configs/moe_m.py:simbal --workdir=runs/x`.

Any config field can be overridden: `--config.moe.num_experts=16`. Installed as `simbal-train`.
"""

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config file (configs/<x>.py[:variant]).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and data.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Too many command-line arguments: {argv[1:]}")
  from simbal_jax import sharding  # pylint: disable=g-import-not-at-top
  from simbal_jax import train  # pylint: disable=g-import-not-at-top
  sharding.initialize_distributed(bool(_CONFIG.value.mesh.multihost))
  logging.info("process %d of %d; %d local / %d global devices (%s)", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(),
               jax.devices()[0].platform)
  train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


def run():
  """Console-script entry point (`simbal-train`)."""
  app.run(main)


if __name__ == "__main__":
  run()
