"""User-given paths as `etils.epath` paths: a local path or a cloud URI (`gs://`, `s3://`).

Every path a user may give (workdir, checkpoints, data globs and cache, TFDS data_dir, run
directories of the experiments) goes through `resolve`, so `gs://bucket/run` stays a cloud path
end to end instead of becoming the local folder `./gs:/bucket/run` (`os.path.abspath`,
`os.makedirs` and `open` know nothing of URIs). Local paths are made absolute, as before.
Object stores have no append, no atomic rename and no file locks; the modules that need those
say what they do instead (`writers.MetricWriter`, `rundir.WorkdirLock`,
`data.pipeline.local_cache_dir`). Reaching GCS needs `gcsfs` (epath's fsspec backend) or
TensorFlow, and Orbax also needs `google-cloud-storage`; neither is a dependency here.
"""

import json
import os
import posixpath
import re
import shutil

from etils import epath

_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_local(path) -> bool:
  """True unless `path` is a URI (`gs://...`)."""
  return _URI.match(os.fspath(path)) is None


def resolve(path) -> epath.Path:
  """`path` as an epath.Path: local made absolute (`~` expanded), a URI kept as it is."""
  if is_local(path):
    return epath.Path(os.path.abspath(os.path.expanduser(os.fspath(path))))
  return epath.Path(path)


def absolute(path) -> str:
  """`resolve(path)` as a string (for cache keys, ids and messages)."""
  return os.fspath(resolve(path))


def _split(path):
  """('gs://', 'bucket/a/b') for a URI, ('', path) for a local path."""
  path = os.fspath(path)
  m = _URI.match(path)
  return (m.group(0), path[m.end():]) if m else ("", path)


def relpath(path, root) -> str:
  """`path` relative to `root`, '/'-separated; local paths are made absolute first."""
  if is_local(path) and is_local(root):
    return os.path.relpath(absolute(path), absolute(root)).replace(os.sep, "/")
  (s1, p), (s2, r) = _split(path), _split(root)
  if s1 != s2:
    raise ValueError(f"{path} and {root} are not on the same filesystem")
  return posixpath.relpath("/" + p, "/" + r)


def dirname(path) -> str:
  """The parent directory of `path` (a URI keeps its scheme: `gs://b/x/y` -> `gs://b/x`)."""
  scheme, rest = _split(path)
  return scheme + posixpath.dirname(rest) if scheme else os.path.dirname(path)


def commonpath(paths) -> str:
  """The deepest directory holding all `paths` (all local, or all URIs of one scheme)."""
  split = [_split(p) for p in paths]
  schemes = {s for s, _ in split}
  if len(schemes) > 1:
    raise ValueError(f"paths on different filesystems: {sorted(schemes)}")
  scheme = schemes.pop()
  if not scheme:
    return os.path.commonpath([absolute(p) for p in paths])
  return scheme + posixpath.commonpath(["/" + r for _, r in split])[1:]


def write_text(path, text: str) -> None:
  """Writes `text` to `path` so that a reader sees the old or the new content, never a part.

  Local: a temporary file beside it, then `os.replace`. Cloud: one object write (an object
  appears whole when its upload completes).
  """
  path = resolve(path)
  if not is_local(path):
    path.write_text(text)
    return
  tmp = epath.Path(f"{path}.tmp{os.getpid()}")
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def write_json(path, obj) -> None:
  """Writes `obj` as JSON (indented, sorted keys) to `path` atomically (`write_text`)."""
  write_text(path, json.dumps(obj, indent=1, sort_keys=True, default=str))


def copy_file(src, dst) -> None:
  """Copies one file between any two filesystems (local <-> cloud), replacing `dst`."""
  with resolve(src).open("rb") as r, resolve(dst).open("wb") as w:
    shutil.copyfileobj(r, w, 1 << 20)


def check_dir_path(path, what="directory") -> None:
  """Raises ValueError (one line naming `what`) unless `path` can be a directory: it is not
  empty and neither it nor a parent is a file. Creates nothing; a cloud path is not checked
  beyond emptiness."""
  if not os.fspath(path).strip():
    raise ValueError(f"{what} is empty: give a directory, e.g. --{what}=runs/x")
  if not is_local(path):
    return
  full = absolute(path)
  d = full
  while not os.path.exists(d):  # false under a file too (ENOTDIR): go up to what exists
    parent = os.path.dirname(d)
    if parent == d:
      return
    d = parent
  if not os.path.isdir(d):
    raise ValueError(f"{what} {path}: " + ("it is a file, not a directory" if d == full else
                                           f"{d} is a file, not a directory"))
