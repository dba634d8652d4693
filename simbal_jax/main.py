"""Trains one run: `simbal-train --config=moe_m:simbal --workdir=runs/x`.

Also `python -m simbal_jax.main`. --config is an installed config's name (demo, small, moe_m, ...:
`simbal_jax.configs`) or a config file's path, each with an optional `:variant` (`demo:simbal`,
`configs/moe_m.py:lf_simbal_sigmoid`); any field can be overridden: `--config.moe.num_experts=16`.
A command-line mistake (unknown config name or field, missing config file, bad value or variant,
an empty workdir or one under a file), a config, data or checkpoint error found before training,
and a divergence or a failed save (disk full, permission, I/O) end in one message on stderr, no
traceback (`--verbosity=1` logs it). Logs: this package's INFO lines and every library's
warnings; the libraries' INFO lines (Orbax, absl, TFDS, grain) only when `--verbosity` is given.
The workdir may be a cloud path (`--workdir=gs://bucket/run` on a TPU VM): it stays one (see
simbal_jax/runio/paths.py).
"""

import difflib
import logging as std_logging
import os
import re
import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from simbal_jax import configs
from simbal_jax.configs import base


def config_help():
  """--config's help: the installed config names and the variants (from the configs package)."""
  return (f"Training config: NAME[:VARIANT], NAME one of the installed configs "
          f"({', '.join(configs.names())}), or a config file PATH[:VARIANT]. VARIANT: "
          f"comma-separated tokens among {', '.join(base.variants())} (e.g. demo:simbal, "
          "moe_m:lf_simbal_sigmoid). Any field: --config.<field>=<value>.")


def define_flags():
  """--config and --workdir, defined when the program runs (not at import, so importing this
  module beside another absl program, e.g. in tests, defines nothing)."""
  if "workdir" in flags.FLAGS:
    return
  config_flags.DEFINE_config_file("config", None, config_help(), lock_config=True)
  flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics.jsonl, TensorBoard "
                      "events, data cache; a run already there is resumed. Local, or a cloud "
                      "path (gs://bucket/run) read and written through etils.epath.")
  flags.mark_flags_as_required(["config", "workdir"])
  # --help lists the flags of the module named by sys.argv[0]: under the console script
  # (`simbal-train`) that is not this module, so list them there too.
  listed = flags.FLAGS.flags_by_module_dict().get(sys.argv[0], [])
  for name in ("config", "workdir"):
    if flags.FLAGS[name] not in listed:
      flags.FLAGS.register_flag_by_module(sys.argv[0], flags.FLAGS[name])


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
_LIBRARY_DIRS = (f"{os.sep}site-packages{os.sep}", f"{os.sep}dist-packages{os.sep}")


class LibraryInfoFilter(std_logging.Filter):
  """Drops records below WARNING logged from installed libraries; keeps this package's."""

  def filter(self, record):
    if record.levelno >= std_logging.WARNING:
      return True
    path = os.path.abspath(record.pathname or "")
    return path.startswith(_PACKAGE_DIR) or not any(d in path for d in _LIBRARY_DIRS)


def quiet_library_logs():
  """Installs `LibraryInfoFilter` on absl's handler (the one all Python loggers reach)."""
  handler = logging.get_absl_handler()
  if not any(isinstance(f, LibraryInfoFilter) for f in handler.filters):
    handler.addFilter(LibraryInfoFilter())


def _last_line(text):
  lines = [line.strip() for line in str(text).splitlines() if line.strip()]
  return lines[-1] if lines else ""


def resolve_config_arg(argv):
  """`argv` with the --config value's config name, if any, replaced by its installed file.

  Raises:
    ValueError: the value is neither a file nor an installed config's name.
  """
  out = list(argv)
  for i, arg in enumerate(out[1:], 1):
    if arg == "--":
      break
    if re.match(r"^--?config=", arg):
      key, value = arg.split("=", 1)
      out[i] = f"{key}={configs.resolve(value)}"
    elif re.match(r"^--?config$", arg) and i + 1 < len(out):
      out[i + 1] = configs.resolve(out[i + 1])
  return out


def _fields(argv):
  """Dotted field names of the config named by --config= in `argv` ([] if it does not load)."""
  arg = next((a for a in argv[1:] if a.startswith("--config=")), None)
  if arg is None:
    return []
  try:
    arg = resolve_config_arg([argv[0], arg])[1]
  except ValueError:
    return []
  fv = flags.FlagValues()
  holder = config_flags.DEFINE_config_file("config", None, "", flag_values=fv)
  saved, sys.argv = sys.argv, [argv[0], arg]  # config_flags reads overrides from sys.argv
  try:
    fv([argv[0], arg])
    from simbal_jax.runio import rundir  # pylint: disable=g-import-not-at-top
    return list(rundir.flatten(holder.value.to_dict()))
  except Exception:  # pylint: disable=broad-except
    return []
  finally:
    sys.argv = saved


def explain_flag_error(e, argv):
  """One line for an exception raised while parsing flags or loading the config file."""
  text = str(e)
  if isinstance(e, (AttributeError, KeyError)):  # an unknown --config.<field>
    fields = _fields(argv)
    for arg in argv[1:]:
      path = arg[len("--config."):].split("=", 1)[0] if arg.startswith("--config.") else ""
      if path and fields and path not in fields:
        close = difflib.get_close_matches(path, fields, n=1, cutoff=0.6)
        return (f"--config.{path}: the config has no such field" +
                (f"; did you mean --config.{close[0]}?" if close else ""))
    return f"unknown config field: {_last_line(text)}"
  if "Error whilst parsing config file" in text or "Failed loading config file" in text:
    arg = next((a for a in argv[1:] if a.startswith("--config=")), "--config")
    return f"{arg}: {re.sub(r'^[A-Za-z]*Error: ', '', _last_line(text))}"
  return text.splitlines()[0] if text else type(e).__name__


def _fail(argv0, msg, status):
  sys.stderr.write(f"{os.path.basename(argv0)}: error: {msg}\n")
  sys.exit(status)


def _parse_flags(argv):
  """absl flag parsing that turns mistakes into one line on stderr (exit status 2)."""
  try:
    resolved = resolve_config_arg(argv)
  except ValueError as e:
    arg = next((a for a in argv[1:] if re.match(r"^--?config(=|$)", a)), "--config")
    _fail(argv[0], f"{arg}: {e}", 2)
  try:
    rest = flags.FLAGS(resolved)
    _ = flags.FLAGS.config.mesh  # a config file that failed to load raises here, not above
  except Exception as e:  # pylint: disable=broad-except
    _fail(argv[0], explain_flag_error(e, argv), 2)
  from simbal_jax.runio import paths  # pylint: disable=g-import-not-at-top
  try:
    paths.check_dir_path(flags.FLAGS.workdir, "workdir")  # empty, or a file in the way
  except ValueError as e:
    _fail(argv[0], e, 2)
  return rest


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Too many command-line arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    quiet_library_logs()
  from simbal_jax.runio import checkpoint  # pylint: disable=g-import-not-at-top
  from simbal_jax import data  # pylint: disable=g-import-not-at-top
  from simbal_jax.runio import rundir  # pylint: disable=g-import-not-at-top
  from simbal_jax import sharding  # pylint: disable=g-import-not-at-top
  from simbal_jax import env as env_lib  # pylint: disable=g-import-not-at-top
  from simbal_jax import train  # pylint: disable=g-import-not-at-top
  try:
    cfg = env_lib.prepare_config(flags.FLAGS.config)  # config mistakes before any device is touched
    data.resolve_config(cfg.data)  # e.g. a data source without its dataset or files
    sharding.initialize_distributed(bool(flags.FLAGS.config.mesh.multihost))
    logging.info("process %d of %d; %d local / %d global devices (%s)", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count(),
                 jax.devices()[0].platform)
    train.train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)
  except (ValueError, OSError, rundir.WorkdirLockedError, checkpoint.CheckpointError,
          train.NonFiniteLossError, checkpoint.NonFiniteStateError) as e:
    logging.vlog(1, "traceback", exc_info=True)
    _fail(sys.argv[0], e, 1)


def run():
  """Console-script entry point (`simbal-train`)."""
  main_module = sys.modules.get("__main__")
  if main_module is not None and not main_module.__doc__:  # the console script: --help's text
    main_module.__doc__ = __doc__
  define_flags()
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
