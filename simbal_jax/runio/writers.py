"""Metric writers: JSONL (source of truth) + TensorBoard (tensorboardX) + optionally Weights &
Biases, the profiler trace, progress bar, summary.

Only process 0 writes. Metrics are flat dicts of scalars with '/' namespaces
(`train/loss`, `eval/layer_3/maxvio`) in metrics.jsonl; records that are not scalars (the
per-expert load, `telemetry.LOAD_FILE`) go to their own JSONL files through `write_record`, and
images, histograms and hparams to TensorBoard (and W&B) only. On resume from step s the trainer
calls `MetricWriter.drop_after(s)`, so records of steps redone after a crash appear once and
every JSONL file stays increasing in step. The workdir may be local or a cloud path (`gs://`,
see MetricWriter).

Weights & Biases (`log.wandb_project`, the `wandb` extra) gets what TensorBoard gets: the same
scalars against the same step (W&B's x-axis `step`), images, histograms, and the hparams as the
run's config (from the start) and the final metrics as its summary. Its files are in
<workdir>/wandb/ (offline: `offline-run-*/run-<id>.wandb`, uploaded later by `wandb sync`); the
run id is kept in <workdir>/wandb/run_id so that a resumed run continues the same W&B run.
The W&B run and the profiler (`log.profile_steps`) are in `runio/tracking.py`.
"""

import json
import math
import os
import shutil
import tempfile
import time

from absl import logging
from etils import epath
import numpy as np

from simbal_jax.runio import paths
from simbal_jax.runio import tracking

def _scalar(v):
  """Python float/int from a numpy/jax scalar."""
  v = np.asarray(v)
  if v.dtype.kind in "iub":
    return int(v)
  return float(v)


class MetricWriter:
  """Appends {'step': s, **metrics} lines to <workdir>/metrics.jsonl and TensorBoard scalars.

  A local workdir is written in place: each line is appended and flushed, events go to
  <workdir>/tb. A cloud workdir (`gs://`) cannot be appended to, and tensorboardX would need
  google-cloud-storage and keep each event file in memory: the JSONL files and the events are
  staged in a local temporary directory instead (the JSONL files start as copies of the
  workdir's, so a resumed run continues them), and `flush()` uploads every staged file that
  changed, whole, replacing its object: from `write` at most every `sync_every` seconds, and
  always at `drop_after` and `close`. The trainer flushes at every checkpoint, so the cloud copy
  holds every record up to the newest checkpoint; a process killed without `close` loses only
  later records, which its resumed run writes again.
  """

  SYNC_EVERY = 60.0  # seconds between uploads from `write` (GCS: ~1 write/s per object)

  def __init__(self, workdir, *, tensorboard=True, enabled=True, record_files=(),
               sync_every=SYNC_EVERY, wandb=None):
    """Args:
      workdir: the run directory, local or cloud.
      tensorboard: also write TensorBoard events to <workdir>/tb.
      enabled: False on processes other than 0 (nothing is written).
      record_files: names of the `write_record` files that `drop_after` trims on resume.
      sync_every: a cloud workdir: seconds between uploads from `write`.
      wandb: None, or the keyword arguments of a Weights & Biases run (`wandb_settings`):
        scalars, images, histograms and hparams go there too, files in <workdir>/wandb.
    """
    self.enabled = enabled
    self.workdir = paths.resolve(workdir)
    self.record_files = tuple(record_files)
    self.path = self.workdir / "metrics.jsonl"
    self._tb = None
    self._wandb = None  # the wandb Run
    self._files = {}  # JSONL file name (metrics.jsonl, record_files) -> its open file
    self._closed = False
    self._stage = None  # local staging directory when the workdir is on a cloud filesystem
    self._local = self.workdir  # where the files are written: the workdir or the stage
    self._uploaded = {}  # staged path relative to the stage -> (size, mtime_ns) last uploaded
    self.sync_every, self._synced = float(sync_every), time.time()
    if not enabled:
      return
    self.workdir.mkdir(parents=True, exist_ok=True)
    if not paths.is_local(self.workdir):
      self._stage = self._local = epath.Path(tempfile.mkdtemp(prefix="simbal_writer_"))
      for name in ("metrics.jsonl",) + self.record_files:
        if (self.workdir / name).exists():
          paths.copy_file(self.workdir / name, self._stage / name)
          self._uploaded[name] = _signature(self._stage / name)
      logging.info("workdir %s is on a cloud filesystem: metrics, records and TensorBoard "
                   "events are staged in %s and uploaded every %g s, at checkpoints and at the "
                   "end", self.workdir, self._stage, self.sync_every)
    self._open("metrics.jsonl")
    if tensorboard:
      try:
        from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
        self._tb = SummaryWriter(os.fspath(self._local / "tb"))
      except Exception as e:  # pylint: disable=broad-except
        logging.warning("TensorBoard writer unavailable (%s); JSONL only", e)
    if wandb:
      self._wandb = tracking.start_wandb(self.workdir, self._local, **wandb)

  @property
  def local_dir(self):
    """Where files are written now: the workdir, or for a cloud workdir its local stage (each
    file written there is uploaded by `flush`)."""
    return self._local

  def write(self, step, metrics):
    """Writes one record of scalar metrics for `step`."""
    if not self.enabled:
      return
    rec = {"step": int(step)}
    rec.update({k: _scalar(v) for k, v in metrics.items()})
    self._append("metrics.jsonl", rec)
    scalars = {k: v for k, v in rec.items()
               if k != "step" and isinstance(v, (int, float)) and math.isfinite(v)}
    if self._tb is not None:
      for k, v in scalars.items():
        self._tb.add_scalar(k, v, global_step=int(step))
    if self._wandb is not None and scalars:
      self._wandb.log({"step": int(step), **scalars})
    if self._stage is not None and time.time() - self._synced >= self.sync_every:
      self.flush()

  def write_record(self, name, record):
    """Appends the JSON object `record` (with a "step") as a line of <workdir>/<name>, one of
    `record_files`."""
    if not self.enabled:
      return
    if name not in self.record_files:
      raise ValueError(f"write_record: {name!r} is not one of record_files {self.record_files}")
    self._append(name, record)

  def _open(self, name):
    if name not in self._files:
      self._files[name] = open(self._local / name, "a", encoding="utf-8")
    return self._files[name]

  def _append(self, name, record):
    f = self._open(name)
    f.write(json.dumps(record, allow_nan=True) + "\n")
    f.flush()

  def _close_files(self):
    for name in list(self._files):
      self._files.pop(name).close()

  def image(self, tag, image_HxWx3, step):
    """A TensorBoard (and W&B) image (uint8[H, W, 3]); nothing without either."""
    if self._tb is not None:
      self._tb.add_image(tag, image_HxWx3, global_step=int(step), dataformats="HWC")
    if self._wandb is not None:
      import wandb  # pylint: disable=g-import-not-at-top
      self._wandb.log({"step": int(step), tag: wandb.Image(np.asarray(image_HxWx3))})

  def histogram(self, tag, values, step):
    """A TensorBoard (and W&B) histogram of `values` (any shape; non-finite values left out)."""
    v = np.asarray(values, np.float64).reshape(-1)
    v = v[np.isfinite(v)]
    if self._tb is not None:
      self._tb.add_histogram(tag, v, global_step=int(step))
    if self._wandb is not None and v.size:
      import wandb  # pylint: disable=g-import-not-at-top
      self._wandb.log({"step": int(step), tag: wandb.Histogram(v, num_bins=64)})

  def hparams(self, hparams, metrics):
    """TensorBoard's HParams entry of this run (`hparams`: name -> bool/int/float/str;
    `metrics`: name -> float), written in <workdir>/tb/hparams; W&B: the run's config and
    summary."""
    if self._tb is not None:
      self._tb.add_hparams(hparams, {k: float(v) for k, v in metrics.items()}, name="hparams")
    if self._wandb is not None:
      self._wandb.config.update(hparams, allow_val_change=True)
      self._wandb.summary.update({k: float(v) for k, v in metrics.items()})

  def flush(self):
    """Makes everything written so far durable in the workdir (a cloud workdir: uploads the
    staged files that changed)."""
    if not self.enabled or self._closed:
      return
    for f in self._files.values():
      f.flush()
    if self._tb is not None:
      self._tb.flush()
    if self._stage is None:
      return
    for dirpath, _, files in os.walk(self._stage):
      for f in files:
        local = epath.Path(dirpath) / f
        rel = paths.relpath(local, self._stage)
        sig = _signature(local)
        if sig != self._uploaded.get(rel):  # files only grow or are rewritten: replace
          paths.copy_file(local, self.workdir / rel)
          self._uploaded[rel] = sig
    self._synced = time.time()

  def drop_after(self, step):
    """Removes the records with step > `step` (and unreadable lines, e.g. a line cut by a crash)
    from metrics.jsonl and the `write_record` files.

    Each file (a cloud workdir: its staged copy, then uploaded) is rewritten atomically
    (temporary file + os.replace); later writes append. TensorBoard keeps its events: readers
    take the last value of a step.
    """
    if not self.enabled:
      return
    self._close_files()  # reopened by the next write
    for name in ("metrics.jsonl",) + self.record_files:
      if os.path.exists(self._local / name):
        _drop_after(self._local / name, step)
    self.flush()

  def close(self):
    """Closes the files; a cloud workdir gets its last upload and the staging dir is removed."""
    if self._tb is not None:
      self._tb.close()  # writes its pending events
      self._tb = None
    if self._wandb is not None:
      try:
        self._wandb.finish()  # writes its pending records (offline: the .wandb file)
      except Exception as e:  # pylint: disable=broad-except
        logging.error("W&B run did not finish cleanly: %s", e)
      self._wandb = None
    stage, uploaded = self._stage, False
    try:
      self.flush()
      uploaded = True
    finally:
      self._close_files()
      self._closed = True
      self._stage = None
      if stage is not None and uploaded:
        shutil.rmtree(stage, ignore_errors=True)
      elif stage is not None:
        logging.error("upload to %s failed: the staged metrics and events are kept in %s",
                      self.workdir, stage)


def _signature(path):
  st = os.stat(path)
  return st.st_size, st.st_mtime_ns


def _drop_after(path, step):
  """Rewrites the local JSONL file `path` without its records of step > `step`."""
  kept, dropped = [], 0
  with open(path, encoding="utf-8") as f:
    for line in f:
      try:
        keep = json.loads(line)["step"] <= step
      except (ValueError, KeyError, TypeError):
        keep = False
      if keep:
        kept.append(line if line.endswith("\n") else line + "\n")
      elif line.strip():
        dropped += 1
  if dropped:
    logging.info("%s: dropped %d records after step %d (resumed run)",
                 os.path.basename(path), dropped, step)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      f.writelines(kept)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)


def read_jsonl(path):
  """Reads a JSONL file (metrics.jsonl, expert_load.jsonl; local or cloud) into a list of
  dicts, leaving out lines that do not decode (a line cut by a crash)."""
  out = []
  with paths.resolve(path).open("r") as f:
    for line in f:
      try:
        out.append(json.loads(line))
      except ValueError:
        pass
  return out


def final_eval(workdir, step):
  """The last evaluation record (one with `eval/loss`) of `step` in <workdir>/metrics.jsonl, or
  None (no such record, or no file): how a restarted run knows it is complete."""
  path = paths.resolve(workdir) / "metrics.jsonl"
  if not path.exists():
    return None
  found = [r for r in read_jsonl(path) if r.get("step") == int(step) and "eval/loss" in r]
  return found[-1] if found else None


class Progress:
  """tqdm progress bar with step, loss, tokens/s and ETA (no-op when disabled); tqdm.auto picks
  the notebook widget in Jupyter and Colab, the text bar elsewhere.

  Tokens/s counts from the first update on (the first step, which compiles, is left out).
  """

  def __init__(self, start, total, tokens_per_step, enabled=True, desc="train"):
    self.tokens_per_step = tokens_per_step
    self._first = None  # (step, time) of the first update
    self._bar = None
    if enabled:
      try:
        from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
        self._bar = tqdm(total=total, initial=start, desc=desc, dynamic_ncols=True,
                         mininterval=1.0)
      except Exception:  # pylint: disable=broad-except
        self._bar = None

  def update(self, step, loss):
    """Moves the bar to `step` and shows the loss and throughput (None until the 2nd update)."""
    now = time.time()
    if self._first is None:
      self._first = (step, now)
    tps = None
    if step > self._first[0]:
      tps = (step - self._first[0]) * self.tokens_per_step / max(now - self._first[1], 1e-9)
    if self._bar is not None:
      self._bar.set_postfix(loss=f"{loss:.4f}", tok_s="-" if tps is None else f"{tps:,.0f}",
                            refresh=False)
      self._bar.update(step - self._bar.n)
    return tps

  def close(self):
    if self._bar is not None:
      self._bar.close()


def format_table(rows, columns, floatfmt="{:.4f}"):
  """Plain-text table.

  Args:
    rows: list of (name, dict) pairs.
    columns: list of (header, key) pairs.
  Returns:
    str.
  """
  head = ["run"] + [h for h, _ in columns]
  body = []
  for name, d in rows:
    cells = [str(name)]
    for _, k in columns:
      v = d.get(k)
      cells.append("-" if v is None else (floatfmt.format(v) if isinstance(v, float) else str(v)))
    body.append(cells)
  widths = [max(len(r[i]) for r in [head] + body) for i in range(len(head))]
  line = lambda r: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in
                             enumerate(zip(r, widths)))
  sep = "  ".join("-" * w for w in widths)
  return "\n".join([line(head), sep] + [line(r) for r in body])
