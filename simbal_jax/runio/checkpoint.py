"""Orbax checkpointing: periodic async saves, verified and classified restore.

A checkpoint holds four items (ocp.args.Composite): `state` (the TrainState pytree: params,
optimizer state, Loss-Free bias, step), `data` (the data iterator's JSON state), `config` (the
run's config) and `integrity` (a 64-bit digest of every array, taken at save time). Resume order:
the workdir's own checkpoints > `resume_from` (full state) > `init_from` (parameters only,
`warmstart`) > scratch.

Restore tries the newest checkpoint first and sorts any failure into one of:
- damaged (an empty step directory, a missing item, a file missing or undecodable, an array that
  differs from its digest, NaN / Inf in the state, no digests in a checkpoint this project
  wrote): the previous checkpoint is tried; once one restores, the damaged ones are renamed
  `<step>.damaged.<time>` so those steps can be saved again. A checkpoint from elsewhere
  (`require_digests=False`: ckpt.resume_from) without digests is restored with a warning;
- a different config or different array shapes (`rundir.ConfigChange`, `CheckpointMismatch`),
  a permission or I/O error, also on listing a directory (`CheckpointAccessError`), or an error
  that shows no damage (`CheckpointError`): the run stops with that error and nothing is
  renamed. Reasons lead with the innermost OS error (`integrity.brief`).
When every checkpoint is damaged `DamagedCheckpoints` names each. A run never starts from scratch
over existing checkpoints unless asked to (`start_over`: the unusable checkpoints and a copy of
metrics.jsonl move to `<checkpoints>/replaced.<time>/`). With `defer_moves=True` the renames wait
for `apply_moves()`, so a start refused after the restore leaves the directory as it was.

A save refuses a state with NaN or Inf (`NonFiniteStateError`, nothing written); a failed save
(disk full, permission, I/O; raised by `save`, `wait` or `close` when asynchronous) is one
`CheckpointSaveError` line naming the path, the root cause and the space needed, its partial
directory removed and the earlier steps intact. Directories may be local or cloud (`gs://`):
Orbax takes epath paths, and the moves done here go through epath.
"""

import time
from typing import Any, NamedTuple

from absl import logging
import jax
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp

from simbal_jax.runio import integrity
from simbal_jax.runio import paths
from simbal_jax.runio.preemption import PreemptionHandler  # noqa: F401  (checkpoint.PreemptionHandler)
from simbal_jax.runio import rundir
from simbal_jax.runio import storage
from simbal_jax.runio.warmstart import restore_params_only  # noqa: F401  (checkpoint.restore_params_only)


class CheckpointError(RuntimeError):
  """A checkpoint could not be restored (nothing set aside) or saved (the earlier ones kept)."""


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


class CheckpointSaveError(CheckpointError):
  """A save failed (disk full, permission, I/O): that step is not kept, the earlier ones are."""


class NonFiniteStateError(FloatingPointError):
  """The state to save holds NaN or Inf: nothing was written. `.step`, `.paths` (the arrays)."""

  def __init__(self, step, bad, total, latest):
    super().__init__(
        f"the state after step {step} holds NaN or Inf in {len(bad)} of {total} arrays "
        f"({', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}): the run diverged; no "
        f"checkpoint is written for it" + (f", the latest is step {latest}" if latest is not None
                                           else ""))
    self.step, self.paths = step, bad


class _Damaged(Exception):
  """Internal: this checkpoint is proven damaged."""


Restored = NamedTuple("Restored", [("step", int), ("state", Any), ("data", dict)])


class Checkpointer:
  """Thin wrapper around ocp.CheckpointManager for TrainState + iterator state + config.

  Creating one writes nothing: the directory is made by the first save.
  """

  ITEMS = ("state", "data", "config", "integrity")

  def __init__(self, directory, *, every=1000, max_to_keep=3, async_save=True,
               require_digests=True):
    """Args:
      directory: str or epath.Path, local or cloud.
      every: int, periodic save interval (0: only forced saves).
      max_to_keep: int >= 1, steps kept.
      async_save: bool, write in a background thread.
      require_digests: bool; True (the workdir's own checkpoints, which this project always
        writes with digests): a step without its `integrity` item is damaged. False (a
        checkpoint from elsewhere): restored unverified, with a warning.
    """
    self.directory = paths.resolve(directory)  # epath.Path, local (absolute) or cloud
    self.every = int(every)
    self.require_digests = bool(require_digests)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=False, save_interval_steps=max(self.every, 1),
        enable_async_checkpointing=async_save)
    handlers = {k: ocp.JsonCheckpointHandler() for k in self.ITEMS}
    handlers["state"] = ocp.StandardCheckpointHandler()
    integrity.install_noise_filters()  # a failed save is reported once, by us
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
    self._moves = []  # deferred renames of a restore (defer_moves): callables
    self._saving = None  # (step, bytes) of the save in flight
    self._failed = self._saved = False

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
    not due unless `force`. The state is checked for NaN / Inf and its array digests are
    computed (on device) before the save starts.
    Raises:
      NonFiniteStateError: NaN or Inf in the state (nothing written).
      CheckpointSaveError: this save, or the previous asynchronous one, failed.
    """
    step = int(step)
    if not force and not self.should_save(step):
      return False
    self.wait()  # the previous save's error names its own step (Orbax would wait here anyway)
    if step in self.manager.all_steps():
      logging.info("checkpoint for step %d already exists; not re-saving", step)
      return False
    (bad, total), digests = integrity.finite_and_digests(state)
    if bad:
      raise NonFiniteStateError(step, bad, total, self.latest_step())
    items = dict(state=ocp.args.StandardSave(state),
                 data=ocp.args.JsonSave(dict(data_state or {})),
                 integrity=ocp.args.JsonSave({"format": integrity.DIGEST_FORMAT,
                                              "leaves": digests}))
    if config is not None:
      items["config"] = ocp.args.JsonSave(config)
    if not self._saved and jax.process_index() == 0:  # leftovers of an earlier failed save
      storage.remove_partial(self.directory, keep=step, settle=0)
    self._saving, self._saved = (step, storage.tree_bytes(state)), True
    try:
      self.directory.mkdir(parents=True, exist_ok=True)
      saved = self.manager.save(step, args=ocp.args.Composite(**items), force=True)
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_failed(e) from None
    if saved:
      logging.info("saving checkpoint for step %d to %s", step, self.directory)
    else:
      self._saving = None
    return bool(saved)

  def _save_failed(self, e):
    """The CheckpointSaveError of the save in flight; removes its partial directory."""
    step, nbytes = self._saving or (None, 0)
    self._saving, self._failed = None, True
    logging.vlog(1, "checkpoint save failed", exc_info=e)
    if step is not None and jax.process_index() == 0:
      storage.remove_partial(self.directory, step)
    try:
      self.manager.reload()
      kept = self.all_steps()
    except Exception:  # pylint: disable=broad-except
      kept = []
    return CheckpointSaveError(storage.save_failure(step, self.directory, e, nbytes, kept))

  def restore(self, abstract_state, step=None, *, config=None, allow="", start_over=False,
              defer_moves=False):
    """Restores the newest usable checkpoint (or `step`), verified against its digests.

    Args:
      abstract_state: pytree of jax.ShapeDtypeStruct (with shardings) like the TrainState.
      step: int or None (None: newest, falling back past damaged ones).
      config: dict or None, the new run's config, compared with each checkpoint's
        (`rundir.check_config_compat`).
      allow: str, config changes to accept (`ckpt.allow_config_change`).
      start_over: bool; when no checkpoint is usable (all damaged, other config, other shapes)
        move them aside and return None instead of raising.
      defer_moves: bool; the renames (damaged steps set aside, start_over) wait for
        `apply_moves()` (a start can still be refused after the restore).
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
          return self._move(lambda err=e: self._start_over(err), defer_moves)
        raise
      for d, why in damaged:
        self._move(lambda d=d, why=why: self._set_aside(d, why), defer_moves)
      return got
    if not damaged:
      return None
    if start_over:
      err = DamagedCheckpoints(self.directory, damaged)
      return self._move(lambda: self._start_over(err), defer_moves)
    raise DamagedCheckpoints(self.directory, damaged)

  def _move(self, fn, defer):
    if defer:
      self._moves.append(fn)
    else:
      fn()

  def apply_moves(self):
    """Performs the renames a `restore(defer_moves=True)` left pending (every process)."""
    moves, self._moves = self._moves, []
    for fn in moves:
      fn()

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

  def _items(self, s):
    """The items of step `s` that hold files (listing every item directory: an unreadable one
    raises CheckpointAccessError here, before anything is read or renamed)."""
    step_dir = self._step_dir(s)

    def listing():
      names = {p.name for p in step_dir.iterdir()}
      return {k for k in self.ITEMS
              if k in names and (step_dir / k).is_dir() and any(True for _ in
                                                                 (step_dir / k).iterdir())}

    return self._attempt(s, "listing its files", listing)

  def _restore_step(self, s, abstract_state, config, allow):
    where = f"checkpoint step {s} in {self.directory}"
    present = self._items(s)
    if not present:
      raise _Damaged("the step directory is empty")
    required = ("state", "data") + (("integrity",) if self.require_digests else ())
    missing = [k for k in required if k not in present]
    if missing:
      raise _Damaged(f"no {' or '.join(missing)} item" + (
          " (the save-time digests every checkpoint of this project has)"
          if "integrity" in missing else ""))
    has = {k: k in present for k in self.ITEMS}
    accepted = []
    if config is not None and has["config"]:
      saved = self._attempt(s, "reading its config", lambda: self.manager.restore(
          s, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"])
      accepted = rundir.check_config_compat(saved or {}, config, allow, where=where)

    def state_tree():
      meta = self.manager.item_metadata(s)
      item = meta["state"] if meta is not None and "state" in meta else None
      return getattr(item, "tree", item)

    tree = self._attempt(s, "reading its metadata", state_tree)
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
    (nonfinite, total), digests = integrity.finite_and_digests(out["state"])
    if has["integrity"]:
      bad = integrity.verify_digests(out["state"], out["integrity"] or {}, digests)
      if bad:
        raise _Damaged(f"{len(bad)} array(s) differ from their save-time digests: "
                       f"{', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''}")
    else:
      logging.warning("%s has no digests (a checkpoint from elsewhere): restored unverified",
                      where)
    if nonfinite:  # a diverged state (saved before saves were checked): it cannot go on
      raise _Damaged(f"NaN or Inf in {len(nonfinite)} of {total} arrays "
                     f"({', '.join(nonfinite[:3])}{' ...' if len(nonfinite) > 3 else ''})")
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
    """Blocks until pending async saves are written; raises CheckpointSaveError if one failed."""
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      if self._failed and self._saving is None:
        return  # already raised once
      raise self._save_failed(e) from None
    self._saving = None

  def close(self):
    """Waits for pending saves and releases the manager (raises CheckpointSaveError as `wait`;
    after a failure already raised, closes quietly)."""
    try:
      self.wait()
    finally:
      try:
        self.manager.close()
      except Exception as e:  # pylint: disable=broad-except
        if not self._failed:
          raise
        logging.vlog(1, "closing the checkpoint manager after a failed save: %s", e)
