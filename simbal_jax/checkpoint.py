"""Orbax checkpointing: periodic async saves, verified and classified restore, preemption.

A checkpoint holds four items (ocp.args.Composite): `state` (the TrainState pytree: params,
optimizer state, Loss-Free bias, step), `data` (the data iterator's JSON state), `config` (the
run's config) and `integrity` (a 64-bit digest of every array, taken at save time). Resume order:
the workdir's own checkpoints > `resume_from` (full state) > `init_from` (parameters only) >
scratch.

Restore tries the newest checkpoint first and sorts any failure into one of:
- damaged (a file missing or undecodable, or an array that differs from its digest): the
  previous checkpoint is tried; once one restores, the damaged ones are renamed
  `<step>.damaged.<time>` so those steps can be saved again;
- a different config or different array shapes (`rundir.ConfigChange`, `CheckpointMismatch`),
  a permission or I/O error (`CheckpointAccessError`), or an error that shows no damage
  (`CheckpointError`): the run stops with that error and nothing is renamed.
When every checkpoint is damaged `DamagedCheckpoints` names each. A run never starts from scratch
over existing checkpoints unless asked to (`start_over`: the unusable checkpoints and a copy of
metrics.jsonl move to `<checkpoints>/replaced.<time>/`).

Directories may be local or cloud paths (`gs://`): Orbax takes epath paths, and the few moves
done here go through epath (on an object store a rename copies and deletes every object).
"""

import signal
import threading
import time
from typing import Any, NamedTuple

from absl import logging
import jax
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp

from simbal_jax import integrity
from simbal_jax import paths
from simbal_jax import rundir


class CheckpointError(RuntimeError):
  """A checkpoint could not be restored and is not known to be damaged (nothing set aside)."""


class CheckpointAccessError(CheckpointError):
  """Permission or I/O error while reading a checkpoint: nothing was set aside."""


class CheckpointMismatch(CheckpointError, ValueError):
  """The checkpoint's arrays do not fit the model's state (shapes, dtypes or structure)."""


class DamagedCheckpoints(CheckpointError):
  """Every checkpoint is damaged; `.reasons` is a list of (step, reason). Nothing was moved."""

  def __init__(self, directory, reasons):
    lines = "\n".join(f"  step {s}: {r}" for s, r in reasons)
    super().__init__(
        f"every checkpoint in {directory} is damaged (nothing was moved or deleted):\n{lines}\n"
        "Restore them from a copy, or start over (--config.ckpt.start_over=True or a new "
        "workdir)")
    self.reasons = reasons


class _Damaged(Exception):
  """Internal: this checkpoint is proven damaged."""


class Restored(NamedTuple):
  step: int
  state: Any
  data: dict


# ------------------------------------------------------------------------------------------------


class Checkpointer:
  """Thin wrapper around ocp.CheckpointManager for TrainState + iterator state + config."""

  ITEMS = ("state", "data", "config", "integrity")

  def __init__(self, directory, *, every=1000, max_to_keep=3, async_save=True):
    self.directory = paths.resolve(directory)  # epath.Path, local (absolute) or cloud
    self.every = int(every)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True, save_interval_steps=max(self.every, 1),
        enable_async_checkpointing=async_save)
    handlers = {k: ocp.JsonCheckpointHandler() for k in self.ITEMS}
    handlers["state"] = ocp.StandardCheckpointHandler()
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

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
    not due unless `force`. The array digests are computed (on device) before the save starts.
    """
    step = int(step)
    if not force and not self.should_save(step):
      return False
    if step in self.manager.all_steps():
      logging.info("checkpoint for step %d already exists; not re-saving", step)
      return False
    items = dict(state=ocp.args.StandardSave(state),
                 data=ocp.args.JsonSave(dict(data_state or {})),
                 integrity=ocp.args.JsonSave({"format": integrity.DIGEST_FORMAT,
                                              "leaves": integrity.state_digests(state)}))
    if config is not None:
      items["config"] = ocp.args.JsonSave(config)
    saved = self.manager.save(step, args=ocp.args.Composite(**items), force=True)
    if saved:
      logging.info("saving checkpoint for step %d to %s", step, self.directory)
    return bool(saved)

  def restore(self, abstract_state, step=None, *, config=None, allow="", start_over=False):
    """Restores the newest usable checkpoint (or `step`), verified against its digests.

    Args:
      abstract_state: pytree of jax.ShapeDtypeStruct (with shardings) like the TrainState.
      step: int or None (None: newest, falling back past damaged ones).
      config: dict or None, the new run's config, compared with each checkpoint's
        (`rundir.check_config_compat`).
      allow: str, config changes to accept (`ckpt.allow_config_change`).
      start_over: bool; when no checkpoint is usable (all damaged, other config, other shapes)
        move them aside and return None instead of raising.
    Returns:
      Restored(step, state, data_state), or None when there is no checkpoint (or started over).
    Raises:
      rundir.ConfigChange, CheckpointMismatch, CheckpointAccessError, CheckpointError,
      DamagedCheckpoints: see the module docstring; nothing is renamed when they are raised.
    """
    steps = [step] if step is not None else list(reversed(self.all_steps()))
    damaged = []
    for s in steps:
      try:
        with integrity.quiet():
          got = self._restore_step(s, abstract_state, config, allow)
      except _Damaged as e:
        logging.warning("checkpoint step %d in %s is damaged (%s)%s", s, self.directory, e,
                        "" if step is not None else "; trying an earlier one")
        damaged.append((s, str(e)))
        continue
      except (rundir.ConfigChange, CheckpointMismatch) as e:
        if start_over:
          return self._start_over(e)
        raise
      for d, why in damaged:
        self._set_aside(d, why)
      return got
    if not damaged:
      return None
    if start_over:
      return self._start_over(DamagedCheckpoints(self.directory, damaged))
    raise DamagedCheckpoints(self.directory, damaged)

  def _step_dir(self, step):
    return self.directory / str(step)

  def _attempt(self, step, what, fn):
    """Runs `fn`, turning its failure into _Damaged or a stopping error (classified)."""
    try:
      return fn()
    except Exception as e:  # pylint: disable=broad-except
      kind = integrity.classify(e)
      where = f"checkpoint step {step} in {self.directory}"
      if kind == "damaged":
        raise _Damaged(f"{what}: {integrity.brief(e)}") from e
      if kind == "mismatch":
        raise CheckpointMismatch(
            f"{where} does not fit the model: {integrity.brief(e, 600)}") from e
      if kind in ("access", "io"):
        raise CheckpointAccessError(
            f"cannot read {where} ({what}): {integrity.brief(e)}. Nothing was changed; fix the "
            "permissions or storage and run again") from e
      raise CheckpointError(
          f"restoring {where} failed ({what}) with an error that does not show damage: "
          f"{integrity.brief(e)}. Nothing was set aside") from e

  def _restore_step(self, s, abstract_state, config, allow):
    where = f"checkpoint step {s} in {self.directory}"
    has = {k: (self._step_dir(s) / k).is_dir() for k in self.ITEMS}
    accepted = []
    if config is not None and has["config"]:
      saved = self._attempt(s, "reading its config", lambda: self.manager.restore(
          s, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"])
      accepted = rundir.check_config_compat(saved or {}, config, allow, where=where)
    meta = self._attempt(s, "reading its metadata", lambda: self.manager.item_metadata(s))
    tree = getattr(meta["state"], "tree", meta["state"]) if meta is not None else None
    if tree is None:
      raise _Damaged("no state metadata")
    diff = integrity.shape_diff(tree, abstract_state)
    if diff:
      raise CheckpointMismatch(f"{where} does not fit the model (different config?):\n" +
                               "\n".join(diff))
    args = dict(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore())
    if has["integrity"]:
      args["integrity"] = ocp.args.JsonRestore()
    out = self._attempt(s, "reading its arrays", lambda: self.manager.restore(
        s, args=ocp.args.Composite(**args)))
    if has["integrity"]:
      bad = integrity.verify_digests(out["state"], out["integrity"] or {})
      if bad:
        raise _Damaged(f"{len(bad)} array(s) differ from their save-time digests: "
                       f"{', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''}")
    else:
      logging.warning("%s has no digests (older format): restored unverified", where)
    for name, old, new in accepted:
      logging.warning("resuming with a changed config (ckpt.allow_config_change): %s: %r -> %r",
                      name, old, new)
    return Restored(s, out["state"], dict(out["data"] or {}))

  def _on_primary(self, fn, tag):
    """Runs the file moves `fn` on process 0 only, then syncs hosts and reloads the step list."""
    if jax.process_index() == 0:
      fn()
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"simbal_checkpoint_{tag}")
    self.manager.reload()

  def _set_aside(self, step, why):
    """Renames a damaged step dir to <step>.damaged.<time> so the step can be saved again."""
    src = self._step_dir(step)
    dst = src.parent / f"{src.name}.damaged.{int(time.time())}"

    def move():
      try:
        src.rename(dst)
        logging.warning("moved damaged checkpoint %s to %s (%s)", src, dst, why)
      except OSError as e:
        logging.warning("could not move damaged checkpoint %s aside: %s", src, e)

    self._on_primary(move, f"set_aside_{step}")

  def _start_over(self, err):
    """Moves every step dir and a copy of ../metrics.jsonl into replaced.<time>/; returns None."""
    dst = self.directory / f"replaced.{int(time.time())}"

    def move():
      dst.mkdir(parents=True, exist_ok=True)
      for s in self.all_steps():
        self._step_dir(s).rename(dst / str(s))
      metrics = self.directory.parent / "metrics.jsonl"
      if metrics.exists():
        paths.copy_file(metrics, dst / "metrics.jsonl")
      logging.warning("ckpt.start_over: starting from scratch; the checkpoints that could not "
                      "be resumed (%s) and a copy of metrics.jsonl are in %s",
                      str(err).splitlines()[0], dst)

    self._on_primary(move, "start_over")
    return None

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
    directory: str or epath.Path (local or cloud), a checkpoints directory written by
      Checkpointer.
    abstract_params: pytree of jax.ShapeDtypeStruct for the parameters.
  Returns:
    The parameter pytree.
  """
  manager = ocp.CheckpointManager(paths.resolve(directory),
                                  options=ocp.CheckpointManagerOptions(read_only=True))
  try:
    for s in reversed(sorted(manager.all_steps())):
      try:
        with integrity.quiet():
          out = manager.restore(s, args=ocp.args.Composite(
              state=ocp.args.PyTreeRestore(item=None, partial_restore=True)))
        params = out["state"]["params"]
        return jax.tree.map(
            lambda a, x: jax.device_put(x, a.sharding) if hasattr(a, "sharding") and
            a.sharding is not None else x, abstract_params, params)
      except Exception as e:  # pylint: disable=broad-except
        logging.warning("init_from: step %d in %s unreadable (%s)", s, directory,
                        integrity.brief(e))
    raise FileNotFoundError(f"init_from: no readable checkpoint in {directory}")
  finally:
    manager.close()


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
