"""The run directory: one run at a time, and what a resumed run may change.

`WorkdirLock` holds `<workdir>/run.lock` for a run's lifetime (an flock plus a host/PID record
with a heartbeat; on a cloud workdir the record alone, best effort), so a second run on the same
workdir fails at once, naming the holder; a lock left by a dead process is taken over with a
warning. `check_config_compat` compares the config saved in a checkpoint with the new one:
fields that change state shapes or the data order can never change; other fields that change
the training (method, learning rate, schedule length) only when `ckpt.allow_config_change` names
them; execution and logging fields are free.
`check_finite` rejects NaN / Inf numbers in a config before anything is built.
"""

import errno
import fcntl
import json
import math
import os
import socket
import threading
import time

from absl import logging
from etils import epath

from simbal_jax.runio import paths

LOCK_NAME = "run.lock"

# Fields that change the state's shapes or the data and its order: a checkpoint written with
# other values cannot be continued (a new workdir or ckpt.start_over instead). Prefixes end in ".".
STRUCTURAL = ("seed", "model.vocab_size", "model.d_model", "model.num_layers", "model.num_heads",
              "model.d_ff", "model.moe_every", "model.param_dtype", "moe.num_experts",
              "moe.d_ff", "moe.shared_expert_d_ff", "data.", "train.seq_len",
              "train.global_batch_size")
# Fields that do not change what is trained: how the run executes, logs and checkpoints, and
# settings only read at initialisation. Everything else is "drift": allowed only when listed.
FREE = ("ckpt.", "log.", "mesh.", "data.cache_dir", "data.worker_count",
        "data.prepare_workers", "train.eval_every",
        "train.eval_tokens", "train.num_evals", "train.eval_spacing", "train.pes_tokens",
        "train.eval_sets",
        "train.token_budget", "model.remat",
        "model.attention_impl", "moe.router_init", "moe.router_init_scale")

_HELD = set()  # cloud lock paths held by a WorkdirLock of this process


class WorkdirLockedError(RuntimeError):
  """Another live run holds the workdir; `.holder` is its lock record (host, pid, since)."""

  def __init__(self, path, holder, why=""):
    h = holder or {}
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(h["since"])) if "since" in h else "?"
    super().__init__(
        f"workdir {paths.dirname(path)} is in use by another run: host {h.get('host', '?')}, "
        f"PID {h.get('pid', '?')}, since {since}{why} (lock file {path}). Wait for it to end or "
        "use another workdir; a lock left by a dead process is taken over automatically")
    self.holder = h


def _proc_start(pid):
  """Start time of `pid` in clock ticks since boot (Linux /proc), None when unknown/absent."""
  try:
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
      return int(f.read().rsplit(")", 1)[1].split()[19])
  except (OSError, ValueError, IndexError):
    return None


def _pid_alive(pid):
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def _lock_path(workdir):
  return os.fspath(paths.resolve(workdir) / LOCK_NAME)


class WorkdirLock:
  """Exclusive lock on a workdir for one run (only the primary process takes it).

  Local workdir: an `flock` on `<workdir>/run.lock`, which the kernel drops when the holder
  dies, plus a JSON record {host, pid, start, since} whose mtime a daemon thread refreshes every
  `HEARTBEAT` seconds, for filesystems where flock is not shared between hosts. A record of
  another process counts as held while that process lives (same host, same PID and start time)
  or, for another host, while its heartbeat is younger than `STALE_AFTER`.

  Cloud workdir (`gs://`): an object store offers no flock, and epath no exclusive create, so
  the lock is the record alone, best effort. It is written when no live run holds it (the rules
  above; the heartbeat is the record's `beat` time, rewritten every `HEARTBEAT` seconds) and
  read back; two runs starting at the same moment may both pass. The heartbeat logs an error
  when another run has replaced the record. A second lock in the same process is always refused.
  """

  HEARTBEAT = 60.0
  STALE_AFTER = 600.0

  def __init__(self, workdir, *, enabled=True):
    self.path = _lock_path(workdir)
    self._local = paths.is_local(self.path)
    self._fd = None
    self._held = False
    self._stop = threading.Event()
    self._thread = None
    self.record = {"host": socket.gethostname(), "pid": os.getpid(),
                   "start": _proc_start(os.getpid()), "since": time.time()}
    if enabled:
      if self._local:
        self._acquire()
      else:
        self._acquire_cloud()
      self._held = True
      self._thread = threading.Thread(target=self._beat, daemon=True, name="workdir-lock")
      self._thread.start()

  @classmethod
  def check(cls, workdir, *, enabled=True):
    """Raises WorkdirLockedError when a live run holds `workdir` (reads only, creates nothing)."""
    path = _lock_path(workdir)
    if not enabled:
      return
    if not paths.is_local(path):
      rec = _read_record(path)
      why = " (a run in this process)" if path in _HELD else _held_by_other(rec, path)
      if why is not None:
        raise WorkdirLockedError(path, rec, why)
      return
    if not os.path.exists(path):
      return
    try:
      fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
      return
    try:
      if not _try_flock(fd):
        raise WorkdirLockedError(path, _read_record(path))
      fcntl.flock(fd, fcntl.LOCK_UN)
      why = _held_by_other(_read_record(path), path)
      if why is not None:
        raise WorkdirLockedError(path, _read_record(path), why)
    finally:
      os.close(fd)

  def _acquire(self):
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    for _ in range(5):
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      if not _try_flock(fd):
        os.close(fd)
        raise WorkdirLockedError(self.path, _read_record(self.path))
      try:
        same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
      except FileNotFoundError:
        same = False
      if same:
        break
      os.close(fd)  # the holder removed the file between our open and flock: open it again
    else:
      raise WorkdirLockedError(self.path, _read_record(self.path), " (lock file keeps changing)")
    old = _read_record(self.path)
    why = _held_by_other(old, self.path)
    if why is not None:
      os.close(fd)
      raise WorkdirLockedError(self.path, old, why)
    _warn_takeover(self.path, old)
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(self.record).encode(), 0)
    os.fsync(fd)
    self._fd = fd

  def _acquire_cloud(self):
    old = _read_record(self.path)
    why = " (a run in this process)" if self.path in _HELD else _held_by_other(old, self.path)
    if why is not None:
      raise WorkdirLockedError(self.path, old, why)
    _warn_takeover(self.path, old)
    self.record["beat"] = time.time()
    paths.write_text(self.path, json.dumps(self.record))
    now = _read_record(self.path)
    if not _same_run(now, self.record):
      raise WorkdirLockedError(self.path, now, " (took the lock at the same moment)")
    _HELD.add(self.path)

  def _beat(self):
    lost = False
    while not self._stop.wait(self.HEARTBEAT):
      try:
        if self._local:
          os.utime(self.path)
          continue
        rec = _read_record(self.path)
        if rec and not _same_run(rec, self.record):
          if not lost:
            logging.error("another run (host %s, PID %s) replaced the lock %s: two runs may be "
                          "writing this workdir", rec.get("host"), rec.get("pid"), self.path)
          lost = True
          continue
        self.record["beat"] = time.time()
        paths.write_text(self.path, json.dumps(self.record))
      except Exception as e:  # pylint: disable=broad-except
        logging.warning("lock heartbeat on %s failed: %s", self.path, e)

  def release(self):
    """Stops the heartbeat, removes the record (when still ours) and drops the flock."""
    if not self._held:
      return
    self._held = False
    self._stop.set()
    if self._thread is not None:
      self._thread.join()  # no heartbeat may rewrite the record after it is removed
    if _same_run(_read_record(self.path), self.record):
      try:
        epath.Path(self.path).unlink()
      except OSError as e:
        logging.warning("could not remove %s: %s", self.path, e)
    _HELD.discard(self.path)
    if self._fd is not None:
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.release()
    return False


def _try_flock(fd):
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return True
  except OSError as e:
    if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
      return False
    raise


def read_lock(workdir):
  """The lock record of `workdir` ({} when there is none): host, pid, start, since."""
  return _read_record(_lock_path(workdir))


def _read_record(path):
  try:
    with epath.Path(path).open("r") as f:
      rec = json.load(f)
    return rec if isinstance(rec, dict) else {}
  except (OSError, ValueError):
    return {}


def _same_run(rec, ours):
  return all(rec.get(k) == ours[k] for k in ("host", "pid", "start", "since"))


def _warn_takeover(path, old):
  if old and old.get("pid") is not None:
    logging.warning("taking over the stale lock %s of host %s PID %s (that run is gone)",
                    path, old.get("host"), old.get("pid"))


def _held_by_other(rec, path):
  """None when the record `rec` (flock free) is stale or empty, else why it still counts."""
  if not rec or rec.get("pid") is None:
    return None
  if rec.get("host") == socket.gethostname():
    pid = int(rec["pid"])
    if pid == os.getpid() or not _pid_alive(pid):  # ours (flock free): an earlier run's
      return None
    start = _proc_start(pid)
    if start is not None and rec.get("start") is not None and start != rec["start"]:
      return None  # the PID was reused by another process
    return " (alive, but not holding the flock)" if paths.is_local(path) else " (alive)"
  try:
    if paths.is_local(path):
      age = time.time() - os.stat(path).st_mtime
    else:
      age = time.time() - float(rec.get("beat", rec.get("since", 0.0)))
  except (OSError, TypeError, ValueError):
    return None
  if age > WorkdirLock.STALE_AFTER:
    return None
  return f" (last heartbeat {age:.0f} s ago)"


def check_finite(cfg):
  """Raises ValueError naming every float field of `cfg` (a ConfigDict) that is NaN or Inf."""
  bad = [f"{k}={v}" for k, v in flatten(cfg.to_dict()).items()
         if isinstance(v, float) and not math.isfinite(v)]
  if bad:
    raise ValueError(f"config fields must be finite numbers: {', '.join(bad)}")


def flatten(d, prefix=""):
  """{'a': {'b': 1}} -> {'a.b': 1} (dicts only; lists are values)."""
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def _matches(name, patterns):
  return any(name == p or (p.endswith(".") and name.startswith(p)) for p in patterns)


def field_kind(name):
  """'structural' | 'free' | 'drift' for a dotted config field name."""
  if _matches(name, FREE):
    return "free"
  if _matches(name, STRUCTURAL):
    return "structural"
  return "drift"


def parse_allowed(allow):
  """`ckpt.allow_config_change` -> set of patterns ('all', 'opt.peak_lr', group 'opt.')."""
  out = set()
  for tok in str(allow or "").replace(" ", "").split(","):
    if tok:
      out.add(tok[:-1] if tok.endswith(".*") else tok)
  return {t if t == "all" or "." in t else t + "." for t in out}


class ConfigChange(ValueError):
  """The config differs from a checkpoint's in fields that may not change; `.fields` lists
  (name, saved, new, kind) of every differing field that is not free (kind: structural, drift,
  allowed)."""

  def __init__(self, where, fields):
    lines = []
    for name, old, new, kind in fields:
      why = {"structural": " (changes state shapes or the data order: cannot be allowed)",
             "allowed": " (allowed)"}.get(kind, "")
      lines.append(f"  {name}: {old!r} -> {new!r}{why}")
    drift = [f[0] for f in fields if f[3] == "drift"]
    allow = (f", allow the changes with --config.ckpt.allow_config_change={','.join(drift)} "
             "(or =all)") if drift else ""
    super().__init__(
        f"{where} was written with a different config:\n" + "\n".join(lines) +
        f"\nResume with the saved values{allow}, or start over (--config.ckpt.start_over=True or "
        "a new workdir)")
    self.fields = fields


def check_config_compat(saved, new, allow="", where="the checkpoint"):
  """Compares a checkpoint's config with the new one.

  Args:
    saved: dict, the config saved with the checkpoint (ConfigDict.to_dict()).
    new: dict, the run's prepared config.
    allow: str, `ckpt.allow_config_change`: "", "all", or comma-separated field names and
      groups ("opt.peak_lr,train.num_steps", "balance" or "balance.*").
    where: str, names the checkpoint in messages.
  Returns:
    list of (name, saved, new) of the allowed drift, to be logged.
  Raises:
    ConfigChange: a structural field differs, or a drift field that `allow` does not name.
  """
  a = flatten(json.loads(json.dumps(saved, default=str)))
  b = flatten(json.loads(json.dumps(new, default=str)))
  allowed = parse_allowed(allow)
  refused, accepted = [], []
  for name in sorted(set(a) | set(b)):
    if name not in a or name not in b:
      logging.info("config field %s only in the %s config: ignored", name,
                   "saved" if name in a else "new")
      continue
    if a[name] == b[name] or field_kind(name) == "free":
      continue
    kind = field_kind(name)
    if kind == "drift" and ("all" in allowed or _matches(name, allowed)):
      accepted.append((name, a[name], b[name]))
    else:
      refused.append((name, a[name], b[name], kind))
  if refused:
    raise ConfigChange(where, sorted(refused + [(n, x, y, "allowed") for n, x, y in accepted]))
  return accepted
