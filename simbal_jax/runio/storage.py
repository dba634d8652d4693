"""Room for checkpoints: their size, the free space beside them, and what a failed save says.

A checkpoint holds every array of the TrainState once (`tree_bytes` of the state: parameters,
optimizer moments, Loss-Free bias, step) plus a few small JSON items. Orbax writes a new step
into `<step>.orbax-checkpoint-tmp*` and deletes the oldest kept step only once the new one is
final, so a run needs room for `max_to_keep + 1` checkpoints at its peak. `check_space` compares
that with the free space of the checkpoint directory before training (a warning: compression and
other writers make it an estimate); `save_failure` words a failed save as one line naming the
path, the root cause and the space needed. Cloud directories report no free space (None).
"""

import os
import shutil
import time

from absl import logging
import jax
import numpy as np

from simbal_jax.runio import integrity
from simbal_jax.runio import paths


def tree_bytes(tree):
  """Bytes of every array of `tree` (arrays or jax.ShapeDtypeStruct), global shapes; PRNG keys
  (a few bytes) are left out."""
  return int(sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
                 for x in jax.tree.leaves(tree) if hasattr(x, "shape") and hasattr(x, "dtype")
                 and not str(x.dtype).startswith("key<")))


def free_bytes(directory):
  """Free bytes on the filesystem of `directory` (its nearest existing parent), None when
  unknown (a cloud path, or no parent can be read)."""
  if not paths.is_local(directory):
    return None
  d = paths.absolute(directory)
  while not os.path.isdir(d):
    parent = os.path.dirname(d)
    if parent == d:
      return None
    d = parent
  try:
    return int(shutil.disk_usage(d).free)
  except OSError:
    return None


def used_bytes(directory):
  """Bytes of the files under a local `directory` (0 when absent or a cloud path)."""
  if not paths.is_local(directory) or not os.path.isdir(directory):
    return 0
  total = 0
  for root, _, files in os.walk(directory):
    for f in files:
      try:
        total += os.path.getsize(os.path.join(root, f))
      except OSError:
        pass
  return total


def mib(n):
  return f"{n / 2**20:.1f} MiB" if n < 2**30 else f"{n / 2**30:.2f} GiB"


def check_space(directory, abstract_state, max_to_keep):
  """Warns when the checkpoints of a run may not fit beside `directory`'s free space.

  Args:
    directory: the checkpoint directory (local; a cloud path is not checked).
    abstract_state: pytree of arrays or jax.ShapeDtypeStruct like the TrainState.
    max_to_keep: int, ckpt.max_to_keep.
  Returns:
    (bytes needed, bytes available) or None when the free space is unknown. Needed: one
    checkpoint x (max_to_keep + 1); available: the free space plus what the directory's present
    checkpoints hold (they are replaced).
  """
  free = free_bytes(directory)
  if free is None:
    return None
  size = tree_bytes(abstract_state)
  need, have = size * (int(max_to_keep) + 1), free + used_bytes(directory)
  if have < need:
    logging.warning(
        "the checkpoints may not fit: one is about %s, and ckpt.max_to_keep=%d needs %s at the "
        "peak of a save (%d + 1 while the oldest is replaced), but %s has %s free%s. A save that "
        "runs out of space stops the run, keeping the earlier checkpoints",
        mib(size), max_to_keep, mib(need), max_to_keep, directory, mib(free),
        f" (+ {mib(have - free)} in its present checkpoints)" if have > free else "")
  return need, have


def save_failure(step, directory, exc, nbytes, kept):
  """One line for a failed save of `step`: the path, the root cause, the space needed.

  Args:
    step: int, the step being saved.
    directory: the checkpoint directory.
    exc: the exception Orbax raised.
    nbytes: int, the state's size (`tree_bytes`).
    kept: list of int, the steps whose checkpoints are intact.
  """
  cause = integrity.root_cause(exc) or integrity.brief(exc)
  free = free_bytes(directory)
  room = f"; a checkpoint needs about {mib(nbytes)}" + (
      f", {mib(free)} is free there" if free is not None else "")
  intact = (f"the checkpoint of step {kept[0]} is intact" if len(kept) == 1 else
            f"the checkpoints of steps {', '.join(map(str, kept))} are intact")
  then = (f"{intact}: free space (or lower ckpt.max_to_keep) and run again to resume from step "
          f"{max(kept)}") if kept else "no earlier checkpoint exists"
  return f"saving checkpoint step {step} in {directory} failed: {cause}{room}. Nothing of step " \
         f"{step} was kept; {then}"


def remove_partial(directory, step=None, *, keep=None, settle=2.0):
  """Removes what failed saves left (`<step>.orbax-checkpoint-tmp*`; all steps when `step` is
  None, except `keep`), freeing its space; Orbax ignores such directories but does not delete
  them. Writes of a failed save may still land for a moment: the removal is repeated until the
  directory stays gone for `settle` seconds (at most 5 tries)."""
  d = paths.resolve(directory)

  def leftovers():
    try:
      names = [p for p in d.iterdir() if ".orbax-checkpoint-tmp" in p.name]
    except OSError:
      return []
    return [p for p in names if (step is None and p.name.split(".")[0] != str(keep))
            or p.name.startswith(f"{step}.orbax-checkpoint-tmp")]

  for attempt in range(5):
    found = leftovers()
    if not found and attempt:
      return
    for p in found:
      try:
        p.rmtree()
        logging.info("removed the partial checkpoint %s", p)
      except OSError as e:
        logging.warning("could not remove the partial checkpoint %s: %s", p, e)
    if settle <= 0:
      return
    time.sleep(settle / 4)
