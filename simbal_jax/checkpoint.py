"""Orbax checkpointing: periodic async saves, resume policy, preemption handling.

A checkpoint holds three items (ocp.args.Composite): `state` (the TrainState pytree: params,
optimizer state, Loss-Free bias, step), `data` (the data iterator's JSON state) and `config`
(the run's config as JSON, for the record). Resume order: the workdir's own checkpoints >
`resume_from` (full state) > `init_from` (parameters only) > scratch. A latest checkpoint that
cannot be read (partially written, corrupt) is skipped with a warning and the one before it used.
"""

import os
import signal
import threading
import time

from absl import logging
from etils import epath
import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """Thin wrapper around ocp.CheckpointManager for TrainState + iterator state + config."""

  def __init__(self, directory, *, every=1000, max_to_keep=3, async_save=True):
    self.directory = os.path.abspath(os.fspath(directory))
    self.every = int(every)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True, save_interval_steps=max(self.every, 1),
        enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def all_steps(self):
    """Sorted list of finalised checkpoint steps."""
    return sorted(self.manager.all_steps())

  def latest_step(self):
    """Latest finalised step or None."""
    return self.manager.latest_step()

  def should_save(self, step):
    """True if `step` is a periodic save step."""
    return self.every > 0 and step > 0 and step % self.every == 0

  def save(self, step, state, data_state=None, config=None, force=False):
    """Saves (asynchronously) and returns True if a save was started.

    Re-saving an existing step is a no-op (Orbax silently returns False); so is a step that is
    not due unless `force`.
    """
    step = int(step)
    if not force and not self.should_save(step):
      return False
    if step in self.manager.all_steps():
      logging.info("checkpoint for step %d already exists; not re-saving", step)
      return False
    items = dict(state=ocp.args.StandardSave(state),
                 data=ocp.args.JsonSave(dict(data_state or {})))
    if config is not None:
      items["config"] = ocp.args.JsonSave(config)
    saved = self.manager.save(step, args=ocp.args.Composite(**items), force=True)
    if saved:
      logging.info("saving checkpoint for step %d to %s", step, self.directory)
    return bool(saved)

  def restore(self, abstract_state, step=None):
    """Restores the latest readable checkpoint (or `step`).

    Args:
      abstract_state: pytree of jax.ShapeDtypeStruct (with shardings) like the TrainState.
      step: int or None (None: latest readable, falling back to earlier ones).
    Returns:
      (step, state, data_state) or None if there is no readable checkpoint.
    """
    steps = [step] if step is not None else list(reversed(self.all_steps()))
    for s in steps:
      try:
        out = self.manager.restore(s, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        return s, out["state"], dict(out["data"] or {})
      except Exception as e:  # pylint: disable=broad-except
        if step is not None:
          raise
        logging.warning("checkpoint at step %d in %s is unreadable (%s: %s); trying an earlier"
                        " one", s, self.directory, type(e).__name__, str(e)[:300])
        self._set_aside(s)
    return None

  def _set_aside(self, step):
    """Renames an unreadable step dir to <step>.unreadable so the step can be saved again."""
    try:
      src = epath.Path(self.directory) / str(step)
      dst = epath.Path(self.directory) / f"{step}.unreadable.{int(time.time())}"
      src.rename(dst)
      self.manager.reload()
      logging.warning("moved unreadable checkpoint %s to %s", src, dst)
    except Exception as e:  # pylint: disable=broad-except
      logging.warning("could not move unreadable checkpoint %d aside: %s", step, e)

  def wait(self):
    """Blocks until pending async saves are written."""
    self.manager.wait_until_finished()

  def close(self):
    """Waits for pending saves and releases the manager."""
    self.manager.wait_until_finished()
    self.manager.close()


def restore_params_only(directory, abstract_params):
  """Reads only `state.params` from the latest checkpoint in `directory` (for init_from).

  Args:
    directory: str, a checkpoints directory written by Checkpointer.
    abstract_params: pytree of jax.ShapeDtypeStruct for the parameters.
  Returns:
    The parameter pytree.
  """
  ckpt = Checkpointer(directory, every=0, async_save=False)
  try:
    for s in reversed(ckpt.all_steps()):
      try:
        out = ckpt.manager.restore(s, args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(item=None, partial_restore=True)))
        params = out["state"]["params"]
        return jax.tree.map(
            lambda a, x: jax.device_put(x, a.sharding) if hasattr(a, "sharding") and
            a.sharding is not None else x, abstract_params, params)
      except Exception as e:  # pylint: disable=broad-except
        logging.warning("init_from: step %d in %s unreadable (%s)", s, directory, e)
    raise FileNotFoundError(f"init_from: no readable checkpoint in {directory}")
  finally:
    ckpt.close()


class PreemptionHandler:
  """Turns SIGTERM / SIGINT into a flag the train loop checks at each step boundary.

  Use as a context manager; the previous handlers are restored on exit. Only installs handlers
  from the main thread (signal.signal requires it); elsewhere it is a no-op flag.
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.requested = False
    self.signum = None
    self._old = {}

  def _handler(self, signum, frame):
    del frame
    if self.requested and signum == signal.SIGINT:
      raise KeyboardInterrupt  # second Ctrl-C: stop now
    logging.warning("received signal %d: will checkpoint at the next step boundary and exit",
                    signum)
    self.requested = True
    self.signum = signum

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for s in self.SIGNALS:
        self._old[s] = signal.signal(s, self._handler)
    return self

  def __exit__(self, *exc):
    for s, h in self._old.items():
      signal.signal(s, h)
    self._old = {}
    return False
