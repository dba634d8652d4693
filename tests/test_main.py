"""simbal_jax/main.py, the command line: quiet by default (library INFO logs are dropped unless
--verbosity is given); a mistake in the command line, a config that names no data or a bad
workdir ends in one line on stderr before anything is created.

Preparing a local corpus printing nothing is tested in test_pipeline.py.
"""
import logging
import os
import subprocess
import sys

import pytest

from simbal_jax import main

from conftest import tree

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


@pytest.mark.parametrize("args,message", [
    (["--config=configs/demo.py", "--config.moe.num_expert=3"],
     "error: --config.moe.num_expert: the config has no such field; did you mean "
     "--config.moe.num_experts?"),
    (["--config=configs/nope.py"], "error: --config=configs/nope.py: no such config file "
     "'configs/nope.py'; config names: base, demo,"),
    (["--config=nope:simbal"], "error: --config=nope:simbal: no such config name 'nope'"),
    (["--config=configs/demo.py:simbl"], "error: --config=configs/demo.py:simbl: unknown config "
     "variant 'simbl'"),
])
def test_command_line_mistakes_end_in_one_line(tmp_path, args, message):
  workdir = str(tmp_path / "run")
  got = subprocess.run([sys.executable, "-m", "simbal_jax.main", *args, f"--workdir={workdir}"],
                       cwd=_ROOT, capture_output=True, text=True, timeout=120, check=False)
  assert got.returncode == 2
  lines = [line for line in got.stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and message in lines[0], got.stderr
  assert not os.path.exists(workdir)


@pytest.mark.parametrize("extra,flag", [
    ([], "--config.data.tfds_name=NAME"),
    (["--config.data.source=parquet"], "--config.data.globs=GLOBS"),
])
def test_paper_config_without_data_stops_in_one_line(tmp_path, extra, flag):
  """`simbal-train --config=configs/moe_m.py:simbal` as the README writes it: the paper config
  reads a TFDS dataset it cannot name, so the run stops before any device, compile or file."""
  workdir = str(tmp_path / "run")
  got = subprocess.run([sys.executable, "-m", "simbal_jax.main", "--config=configs/moe_m.py:simbal",
                        f"--workdir={workdir}", *extra], cwd=_ROOT, capture_output=True,
                       text=True, timeout=120, check=False)
  lines = [line for line in got.stderr.splitlines() if line.strip()]
  assert got.returncode == 1 and len(lines) == 1, got.stderr
  assert lines[0].startswith("main.py: error: data.source=") and flag in lines[0]
  assert not os.path.exists(workdir)


@pytest.mark.parametrize("workdir,message", [
    ("", "error: workdir is empty"),
    ("notes.txt/run", "error: workdir notes.txt/run: {cwd}/notes.txt is a file, not a directory"),
])
def test_bad_workdir_is_one_line_and_creates_nothing(tmp_path, workdir, message):
  (tmp_path / "notes.txt").write_text("a file")
  before = tree(tmp_path)
  got = subprocess.run([sys.executable, "-m", "simbal_jax.main", "--config=demo",
                        f"--workdir={workdir}"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=120, check=False, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  lines = [line for line in got.stderr.splitlines() if line.strip()]
  assert got.returncode == 2 and len(lines) == 1, got.stderr  # a command-line mistake
  assert message.format(cwd=tmp_path) in lines[0]
  assert tree(tmp_path) == before and sorted(os.listdir(tmp_path)) == ["notes.txt"]
