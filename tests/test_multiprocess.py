"""Two processes on localhost (jax.distributed, CPU collectives through gloo, 4 fake devices
each) train like one process with 8 devices; SIGTERM to one of them stops both at the same step
with one save, and the resumed run continues exactly."""
import json
import os
import signal
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from simbal_jax import train
from simbal_jax.runio import writers
from tests.conftest import tiny_config, xla_flags  # importable by the worker processes too

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 8

# argv: process id, coordinator port, workdir, "signal" (announce step 3, then go slowly so
# the SIGTERM arrives mid-run) or "plain".
_WORKER = r"""
import json, os, sys, time
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
i, port, workdir, mode = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2,
                           process_id=i)
from tests.test_multiprocess import config
from simbal_jax import train

def hook(step, state):
  if mode == "signal":
    if step == 3:
      print("ready", flush=True)
    time.sleep(0.5)

summary, _ = train.train_and_evaluate(config(), workdir, hooks=[hook])
print("result " + json.dumps({k: summary[k] for k in ("status", "step", "start_step")}),
      flush=True)
jax.distributed.shutdown()
"""


def config():
  cfg = tiny_config("lbl", steps=STEPS)
  cfg.ckpt.every = 100  # only the preemption save and the final one
  cfg.ckpt.async_save = False
  cfg.train.pes_tokens = 0
  return cfg


def _port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _launch(workdir, mode):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=_ROOT, XLA_FLAGS=xla_flags(4))
  port = _port()
  return [subprocess.Popen([sys.executable, "-c", _WORKER, str(i), str(port), workdir, mode],
                           cwd=_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True) for i in range(2)]


def _results(procs, timeout=300):
  try:
    outs = [p.communicate(timeout=timeout) for p in procs]
  finally:
    for p in procs:
      p.kill()
  results = []
  for (out, err), p in zip(outs, procs):
    lines = [l for l in out.splitlines() if l.startswith("result ")]
    assert p.returncode == 0 and lines, err[-3000:]
    results.append(json.loads(lines[-1][len("result "):]))
  return results, [err for _, err in outs]


def _losses(workdir):
  return {r["step"]: r["train/loss"] for r in writers.read_jsonl(
      os.path.join(workdir, "metrics.jsonl")) if "train/loss" in r}


@pytest.mark.slow
def test_two_processes_train_stop_together_and_resume_exactly(tmp_path):
  workdir = str(tmp_path / "two")
  procs = _launch(workdir, "signal")
  for p in procs:
    line = ""
    while line != "ready":  # gloo prints its connections to stdout too
      line = p.stdout.readline()
      assert line, p.stderr.read()[-3000:]  # the worker ended before step 3
      line = line.strip()
  procs[1].send_signal(signal.SIGTERM)  # one host is preempted
  results, errs = _results(procs)
  stop = results[0]["step"]
  assert [r["status"] for r in results] == ["preempted", "preempted"]
  assert results[0] == results[1] and 3 <= stop < STEPS
  assert all(f"all 2 processes agreed to stop at step {stop}" in e for e in errs)
  saved = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
  assert [d for d in saved if d.isdigit()] == [str(stop)]  # saved once, at the agreed step

  results, _ = _results(_launch(workdir, "plain"))
  assert [(r["status"], r["start_step"], r["step"]) for r in results] == [
      ("done", stop, STEPS)] * 2

  # One process with all 8 devices: the same losses at every step, before and after the stop.
  single = str(tmp_path / "one")
  train.train_and_evaluate(config(), single, devices=jax.devices()[:8])
  two, one = _losses(workdir), _losses(single)
  assert sorted(two) == sorted(one) == list(range(1, STEPS + 1))
  np.testing.assert_allclose([two[s] for s in sorted(two)], [one[s] for s in sorted(one)],
                             rtol=2e-6)
