"""simbal_jax/runio/preemption.py: SIGTERM is noted and every process stops at the same step."""
import os
import signal
import socket
import subprocess
import sys

from simbal_jax.runio import preemption


def test_preemption_handler_flags_signal():
  before = signal.getsignal(signal.SIGTERM)
  with preemption.PreemptionHandler() as h:
    assert not h.requested
    os.kill(os.getpid(), signal.SIGTERM)
    assert h.requested and h.signum == signal.SIGTERM
  assert signal.getsignal(signal.SIGTERM) is before


def test_preemption_handler_without_signal_handlers_when_multihost():
  before = signal.getsignal(signal.SIGTERM)
  with preemption.PreemptionHandler(multihost=False) as h:
    assert not h.stop_now(1)
    os.kill(os.getpid(), signal.SIGTERM)
    assert h.stop_now(2) and h.requested
  with preemption.PreemptionHandler(multihost=True):  # JAX's notifier keeps SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before


_WORKER = """
import os, sys, time
import jax
jax.distributed.initialize(f"localhost:{sys.argv[2]}", num_processes=2,
                           process_id=int(sys.argv[1]))
from simbal_jax.runio import preemption
with preemption.PreemptionHandler() as h:
  print("ready", flush=True)
  for step in range(1, 6000):
    if h.stop_now(step):
      print("stop", step, flush=True)
      break
    time.sleep(0.005)
jax.distributed.shutdown()
"""


def test_two_processes_agree_on_the_preemption_step():
  """Localhost jax.distributed on CPU: SIGTERM to one process, both stop at the same step."""
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  procs = [subprocess.Popen([sys.executable, "-c", _WORKER, str(i), str(port)], cwd=root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  try:
    for p in procs:
      assert p.stdout.readline().strip() == "ready"
    procs[1].send_signal(signal.SIGTERM)
    outs = [p.communicate(timeout=120) for p in procs]
  finally:
    for p in procs:
      p.kill()
  stops = [out.split() for out, _ in outs]
  assert stops[0][0] == "stop" and stops[0] == stops[1], outs
  assert all("all 2 processes agreed to stop at step" in err for _, err in outs)
