"""Quiet by default: library INFO logs are dropped unless --verbosity is given (simbal_jax/main.py).

Preparing a local corpus printing nothing is tested in test_data.py.
"""
import logging
import os

from simbal_jax import main


def _record(level, pathname):
  return logging.LogRecord("absl", level, pathname, 1, "msg", None, None)


def test_library_info_is_dropped_and_the_package_info_kept():
  lib = os.path.join(os.sep, "venv", "lib", "python3.11", "site-packages", "orbax", "x.py")
  pkg = os.path.join(os.path.dirname(main.__file__), "runio", "checkpoint.py")
  script = os.path.join(os.sep, "home", "me", "experiments", "run.py")
  f = main.LibraryInfoFilter()
  assert not f.filter(_record(logging.INFO, lib))
  assert not f.filter(_record(logging.DEBUG, lib))
  assert f.filter(_record(logging.WARNING, lib))  # library warnings stay
  assert f.filter(_record(logging.INFO, pkg)) and f.filter(_record(logging.INFO, script))


def test_quiet_library_logs_installs_one_filter():
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  handler = absl_logging.get_absl_handler()
  before = list(handler.filters)
  try:
    handler.filters = [f for f in before if not isinstance(f, main.LibraryInfoFilter)]
    main.quiet_library_logs()
    main.quiet_library_logs()
    assert sum(isinstance(f, main.LibraryInfoFilter) for f in handler.filters) == 1
  finally:
    handler.filters = before
