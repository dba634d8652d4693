"""Checkpoint integrity: per-array digests, restore-failure classification, quiet failed reads.

`state_digests` gives two 32-bit sums of a mixed hash of (value bits, flat position) for every
array of a state, computed on device; integer sums do not depend on the order of summation, so
the digest is the same for any sharding or device count, and restoring into another mesh still
verifies. `finite_and_digests` also names the float arrays holding NaN or Inf (no checkpoint is
written from such a state), in the same pass. `classify` sorts an exception raised by an Orbax restore into access / io /
mismatch / damaged / unknown (TensorStore reports status codes in its messages); `brief` and
`root_cause` put the innermost OS error first. `quiet` keeps a failed attempt from burying the
one warning that matters under Orbax's and asyncio's leftovers; `install_noise_filters` does the
same, for the whole process, for failed saves (reported once, by the checkpointer).
"""

import contextlib
import errno
import json
import logging as py_logging
import os
import re
import sys

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

DIGEST_FORMAT = "u32x2-mix-sum-v1"


def _fmix(h):
  """MurmurHash3's 32-bit finalizer on uint32 arrays."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def _leaf_digest(x):
  """uint32[2] digest of one array (any dtype and shape, sharded or not)."""
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    u = x.astype(jnp.uint32)
  else:
    width = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
    u = jax.lax.bitcast_convert_type(x, width).astype(jnp.uint32)
  idx, stride = jnp.zeros(u.shape, jnp.uint32), 1
  for d in reversed(range(u.ndim)):  # flat position without reshaping (keeps the sharding)
    idx = idx + jax.lax.broadcasted_iota(jnp.uint32, u.shape, d) * jnp.uint32(stride % 2**32)
    stride *= u.shape[d]
  h1 = jnp.sum(_fmix(u + _fmix(idx)), dtype=jnp.uint32)
  h2 = jnp.sum(_fmix(u ^ _fmix(idx + jnp.uint32(0x9E3779B9))), dtype=jnp.uint32)
  return jnp.stack([h1, h2])


# One small program per distinct (shape, dtype, sharding) of a leaf, not one program for the
# whole tree: a model's state repeats a few shapes (layers, Adam's two moments), so this
# compiles a fraction of the ops, and a second run or config in the same process with the same
# leaves compiles nothing (a whole-tree program compiled afresh for every new tree structure).
_leaf_digest_jit = jax.jit(_leaf_digest)
_leaf_finite_and_digest_jit = jax.jit(lambda x: (_leaf_finite(x), _leaf_digest(x)))


def _each_leaf(fn, tree):
  """`fn` on each leaf, one leaf at a time: each program finishes before the next starts (on
  CPU, fake devices' collectives from programs in flight together can wait on each other)."""
  return jax.tree.map(lambda x: jax.block_until_ready(fn(x)), tree)


def _digest_tree(tree):
  return _each_leaf(_leaf_digest_jit, tree)


def _digest_record(state, got):
  leaves = jax.tree_util.tree_flatten_with_path(state)[0]
  digs = jax.tree_util.tree_flatten_with_path(got)[0]
  return {jax.tree_util.keystr(p): [int(d[0]), int(d[1]), str(x.dtype), list(x.shape)]
          for (p, x), (_, d) in zip(leaves, digs)}


def state_digests(state):
  """{path: [h1, h2, dtype, shape]} for every array of `state` (computed on device)."""
  return _digest_record(state, jax.device_get(_digest_tree(state)))


def _leaf_finite(x):
  if not (jnp.issubdtype(x.dtype, jnp.floating) or jnp.issubdtype(x.dtype, jnp.complexfloating)):
    return jnp.bool_(True)
  return jnp.all(jnp.isfinite(x))


def _nonfinite_record(got):
  flat = jax.tree_util.tree_flatten_with_path(got)[0]
  return [jax.tree_util.keystr(p) for p, ok in flat if not bool(ok)], len(flat)


def _finite_and_digest_tree(tree):
  """A save's two checks in one pass over each leaf (one program per kind of leaf)."""
  both = _each_leaf(_leaf_finite_and_digest_jit, tree)
  outer, inner = jax.tree.structure(tree), jax.tree.structure((0, 0))
  return jax.tree.transpose(outer, inner, both)


def finite_and_digests(state):
  """((paths of the float arrays of `state` holding a NaN or Inf, number of arrays),
  `state_digests(state)`), computed together on device (one bool and one digest per array come
  back)."""
  finite, digests = jax.device_get(_finite_and_digest_tree(state))
  return _nonfinite_record(finite), _digest_record(state, digests)


def verify_digests(state, record, digests=None):
  """Paths of `state`'s arrays that differ from `record` (an `integrity` item); [] when equal.
  `digests`: `state_digests(state)` when already computed."""
  if record.get("format") != DIGEST_FORMAT:
    logging.warning("unknown digest format %r: checkpoint not verified", record.get("format"))
    return []
  saved, now = record.get("leaves", {}), digests or state_digests(state)
  return sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))


_ACCESS_CODES = ("PERMISSION_DENIED", "UNAUTHENTICATED", "Permission denied")
_IO_CODES = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "ABORTED", "CANCELLED")
_DAMAGE_CODES = ("DATA_LOSS", "NOT_FOUND", "OUT_OF_RANGE", "FAILED_PRECONDITION",
                 "INVALID_ARGUMENT", "Truncated", "corrupt")
_MISMATCH_TEXT = ("not compatible with the stored shape", "Structure mismatch",
                  "Expected identical structures")
_ACCESS_ERRNOS = (errno.EACCES, errno.EPERM, errno.EROFS)


def _chain(e):
  seen = []
  while e is not None and len(seen) < 16 and e not in seen:
    seen.append(e)
    e = e.__cause__ or e.__context__
  return seen


def classify(exc):
  """'access' | 'io' | 'mismatch' | 'damaged' | 'unknown' for an exception from a restore."""
  chain = _chain(exc)
  text = " ".join(f"{type(e).__name__}: {e}" for e in chain)
  if any(isinstance(e, PermissionError) or (isinstance(e, OSError) and e.errno in _ACCESS_ERRNOS)
         for e in chain) or any(c in text for c in _ACCESS_CODES):
    return "access"
  if any(isinstance(e, OSError) and not isinstance(e, FileNotFoundError) and e.errno
         for e in chain) or any(c in text for c in _IO_CODES):
    return "io"
  if any(c in text for c in _MISMATCH_TEXT):
    return "mismatch"
  if any(isinstance(e, (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError, EOFError))
         for e in chain) or any(c in text for c in _DAMAGE_CODES):
    return "damaged"
  return "unknown"


# The OS's own words for the errors a checkpoint read or write meets, as TensorStore quotes them.
_OS_TEXTS = tuple(os.strerror(c) for c in (
    errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOENT,
    errno.ENOTDIR, errno.EISDIR, errno.EIO, errno.ENAMETOOLONG, errno.EMFILE))
_STATUS = re.compile(r"\b(PERMISSION_DENIED|UNAUTHENTICATED|RESOURCE_EXHAUSTED|NOT_FOUND|DATA_LOSS|"
                     r"UNAVAILABLE|DEADLINE_EXCEEDED|OUT_OF_RANGE|FAILED_PRECONDITION|"
                     r"INVALID_ARGUMENT|ABORTED|CANCELLED)\b")
_NOISE = re.compile(r"\s*\[(source locations|tensorstore_spec|os_error_code)='[^']*'\]")


def root_cause(e):
  """The innermost OS error behind `e` as one short line, or None when none shows.

  An OSError in the exception chain: its type, errno text and file. Otherwise the OS text that
  TensorStore quotes in its message, with the last path quoted before it and the status code:
  'No space left on device: /ck/20.orbax-checkpoint-tmp/state/... (RESOURCE_EXHAUSTED)'.
  """
  chain = _chain(e)
  oserrs = [x for x in chain if isinstance(x, OSError) and (x.errno or x.strerror)]
  if oserrs:
    inner = oserrs[-1]
    return f"{type(inner).__name__}: {inner}"
  for x in reversed(chain):
    text = _NOISE.sub("", " ".join(str(x).split()))
    for os_text in _OS_TEXTS:
      at = text.find(os_text)
      if at < 0:
        continue
      quoted = re.findall(r'"([^"]+)"', text[:at])
      status = _STATUS.search(text)
      return (os_text + (f": {quoted[-1]}" if quoted else "") +
              (f" ({status.group(1)})" if status else ""))
  return None


def brief(e, n=300):
  """One line for `e`: its root cause first (`root_cause`), then the first `n` characters of the
  library's message without TensorStore's spec and source locations."""
  text = _NOISE.sub("", " ".join(str(e).split()))
  head = f"{type(e).__name__}: {text[:n]}"
  cause = root_cause(e)
  if cause is None or head.startswith(cause):
    return head
  return f"{cause} [{type(e).__name__}: {text[:n // 2]}{' ...' if len(text) > n // 2 else ''}]"


class _QuietOrbax(py_logging.Filter):
  """Drops Orbax's own log records while a restore attempt may fail (they repeat ours)."""

  def filter(self, record):
    return "orbax" not in (record.pathname or "")


class _QuietAsyncio(py_logging.Filter):
  """Drops asyncio's "exception was never retrieved" records of failed Orbax/TensorStore reads."""

  def filter(self, record):
    text = record.getMessage()
    return not ("never retrieved" in text and any(
        s in text for s in ("TensorStore", "OCDBT", "orbax", "reading array")))


def _is_read_noise(unraisable):
  """An exception left behind by the reads of a failed restore (Orbax's closed event loop)."""
  exc, obj = unraisable.exc_value, unraisable.object
  if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
    return True
  code = getattr(obj, "cr_code", None)
  return code is not None and "orbax" in code.co_filename


class _QuietOrbaxStorage(py_logging.Filter):
  """Drops Orbax's error records (with tracebacks, from its save threads) of a storage error:
  the checkpointer raises that error itself, once, as one line (checkpoint.CheckpointSaveError)."""

  def filter(self, record):
    if record.levelno < py_logging.ERROR or "orbax" not in (record.pathname or ""):
      return True
    exc = record.exc_info[1] if record.exc_info else None
    if exc is not None and classify(exc) in ("access", "io"):
      return False
    text = record.getMessage()
    return not (any(c in text for c in _ACCESS_CODES + _IO_CODES) or "[Errno" in text)


_noise_filters_installed = False


def install_noise_filters():
  """Once per process: silences the leftovers of failed restores and saves, which arrive from
  Orbax and TensorStore threads after the call has returned (hundreds of tracebacks otherwise)."""
  global _noise_filters_installed
  if _noise_filters_installed:
    return
  _noise_filters_installed = True
  py_logging.getLogger("asyncio").addFilter(_QuietAsyncio())
  py_logging.getLogger("absl").addFilter(_QuietOrbaxStorage())
  previous = sys.unraisablehook

  def hook(unraisable):
    if not _is_read_noise(unraisable):
      previous(unraisable)

  sys.unraisablehook = hook


@contextlib.contextmanager
def quiet():
  install_noise_filters()
  flt = _QuietOrbax()
  absl_logger = py_logging.getLogger("absl")
  absl_logger.addFilter(flt)
  try:
    yield
  finally:
    absl_logger.removeFilter(flt)


def _path_str(path):
  out = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        out.append(str(getattr(k, attr)))
        break
    else:
      out.append(str(k))
  return "/".join(out)


def shape_diff(metadata_tree, abstract_state, limit=12):
  """Lines naming arrays whose saved shape/dtype differs from `abstract_state`'s ([] if none or
  if the two trees are not comparable by path)."""
  saved = {_path_str(p): m for p, m in jax.tree_util.tree_flatten_with_path(metadata_tree)[0]
           if hasattr(m, "shape")}
  want = {_path_str(p): a for p, a in jax.tree_util.tree_flatten_with_path(abstract_state)[0]}
  if not set(saved) & set(want):
    return []
  lines = []
  for k in sorted(set(saved) | set(want)):
    s, w = saved.get(k), want.get(k)
    if s is None or w is None:
      lines.append(f"  {k}: {'only in the model' if s is None else 'only in the checkpoint'}")
    elif tuple(s.shape) != tuple(w.shape) or np.dtype(s.dtype) != np.dtype(w.dtype):
      lines.append(f"  {k}: saved {np.dtype(s.dtype).name}{list(s.shape)}, model "
                   f"{np.dtype(w.dtype).name}{list(w.shape)}")
  return lines[:limit] + ([f"  ... and {len(lines) - limit} more"] if len(lines) > limit else [])
