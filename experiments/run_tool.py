"""What the tools that read a finished run share (pes.py, prune.py): the `--run` flag, the run
it names restored, and a report written into the run directory and printed as a table."""

import json

from absl import app
from absl import flags


def define_run_flag():
  flags.DEFINE_string("run", None, "Run directory (config.json + checkpoints/), local or gs://.")


def restore():
  """(env, state) of the run named by `--run` (required), as `env.restore_run` returns them."""
  from simbal_jax import env as env_lib  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.run:
    raise app.UsageError("--run is required")
  return env_lib.restore_run(flags.FLAGS.run)


def report(filename, payload, rows, columns):
  """Writes `payload` as JSON to <run>/`filename` and prints `rows` (writers.format_table)."""
  from simbal_jax.runio import paths  # pylint: disable=g-import-not-at-top
  from simbal_jax.runio import writers  # pylint: disable=g-import-not-at-top
  paths.write_text(paths.resolve(flags.FLAGS.run) / filename, json.dumps(payload, indent=1))
  print(writers.format_table(rows, columns))
