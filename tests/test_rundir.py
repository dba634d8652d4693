"""simbal_jax/runio/rundir.py: one run per workdir (the lock, its holder and its heartbeat)."""
import os
import socket
import subprocess
import sys
import time

import pytest

from simbal_jax.runio import rundir
from simbal_jax import train

from conftest import tiny_config as tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


_HOLD = """
import sys
from simbal_jax.runio import rundir
lock = rundir.WorkdirLock(sys.argv[1])
print("held", flush=True)
sys.stdin.read()
"""


def test_second_run_on_a_workdir_is_refused(tmp_path):
  workdir = str(tmp_path / "run")
  holder = subprocess.Popen([sys.executable, "-c", _HOLD, workdir], cwd=ROOT,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(rundir.WorkdirLockedError,
                       match=f"host {socket.gethostname()}, PID {holder.pid}"):
      train.train_and_evaluate(tiny(), workdir)
    assert sorted(os.listdir(workdir)) == ["run.lock"]  # refused before anything was written
  finally:
    holder.kill()  # dies holding it: the kernel drops the flock, the record stays
    holder.wait()
  assert rundir.read_lock(workdir)["pid"] == holder.pid
  with rundir.WorkdirLock(workdir):  # stale (dead PID): taken over
    with pytest.raises(rundir.WorkdirLockedError, match=f"PID {os.getpid()}"):
      rundir.WorkdirLock(workdir)  # a second run in this process is refused too
    assert rundir.read_lock(workdir)["pid"] == os.getpid()
  assert not os.path.exists(os.path.join(workdir, "run.lock"))


def test_lock_of_another_host_counts_until_its_heartbeat_is_stale(tmp_path):
  path = tmp_path / "run.lock"
  path.write_text('{"host": "elsewhere", "pid": 1, "since": 0}')
  with pytest.raises(rundir.WorkdirLockedError, match="host elsewhere, PID 1.*heartbeat"):
    rundir.WorkdirLock.check(tmp_path)
  old = time.time() - rundir.WorkdirLock.STALE_AFTER - 60
  os.utime(path, (old, old))
  rundir.WorkdirLock.check(tmp_path)
  rundir.WorkdirLock(tmp_path).release()
