"""Preemption: a stop request (SIGTERM, SIGINT, or JAX's notifier on several hosts) becomes a
step boundary at which every process checkpoints and stops (`PreemptionHandler`, used by
train.run_loop; also importable as checkpoint.PreemptionHandler)."""

import signal
import threading

from absl import logging
import jax
from jax.experimental import multihost_utils


class PreemptionHandler:
  """Turns a stop request into a step boundary at which every process stops and checkpoints.

  One process: SIGTERM / SIGINT set `requested`, which the train loop checks at each step
  boundary. Several processes (jax.distributed, whose preemption service is on by default): JAX's
  own notifier catches SIGTERM on any host, and `stop_now(step)`, called once per step by every
  process from the same start step, turns True on all of them at the same agreed step
  (`multihost_utils.reached_preemption_sync_point`); no Python handlers are installed then, as they
  would replace JAX's. Use as a context manager; the previous handlers are restored on exit.
  Handlers are only installed from the main thread (signal.signal requires it).
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self, *, multihost=None):
    self.requested = False
    self.signum = None
    self.multihost = jax.process_count() > 1 if multihost is None else bool(multihost)
    self._old = {}

  def _handler(self, signum, frame):
    del frame
    if self.requested and signum == signal.SIGINT:
      raise KeyboardInterrupt  # second Ctrl-C: stop now
    logging.warning("received signal %d: will checkpoint at the next step boundary and exit",
                    signum)
    self.requested = True
    self.signum = signum

  def stop_now(self, step):
    """Call once per step on every process; True (and `requested`) from the stop step on."""
    if self.multihost and not self.requested:
      if multihost_utils.reached_preemption_sync_point(int(step)):
        self.requested = True
        logging.warning("preemption: all %d processes agreed to stop at step %d",
                        jax.process_count(), step)
    return self.requested

  def __enter__(self):
    if not self.multihost and threading.current_thread() is threading.main_thread():
      for s in self.SIGNALS:
        self._old[s] = signal.signal(s, self._handler)
    return self

  def __exit__(self, *exc):
    for s, h in self._old.items():
      signal.signal(s, h)
    self._old = {}
    return False
