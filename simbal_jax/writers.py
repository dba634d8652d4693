"""Metric writers: JSONL (source of truth) + TensorBoard (tensorboardX), progress bar, summary.

Only process 0 writes. Metrics are flat dicts of scalars with '/' namespaces
(`train/loss`, `eval/layer_3/maxvio`) in metrics.jsonl; records that are not scalars (the
per-expert load, `telemetry.LOAD_FILE`) go to their own JSONL files through `write_record`, and
images, histograms and hparams to TensorBoard only. On resume from step s the trainer calls
`MetricWriter.drop_after(s)`, so records of steps redone after a crash appear once and every
file stays increasing in step.
"""

import json
import math
import os
import time

from absl import logging
import numpy as np


def _scalar(v):
  """Python float/int from a numpy/jax scalar."""
  v = np.asarray(v)
  if v.dtype.kind in "iub":
    return int(v)
  return float(v)


class MetricWriter:
  """Appends {'step': s, **metrics} lines to <workdir>/metrics.jsonl and TensorBoard scalars."""

  def __init__(self, workdir, *, tensorboard=True, enabled=True, record_files=()):
    """Args:
      workdir: the run directory.
      tensorboard: also write TensorBoard events to <workdir>/tb.
      enabled: False on processes other than 0 (nothing is written).
      record_files: names of the `write_record` files that `drop_after` trims on resume.
    """
    self.enabled = enabled
    self.workdir = workdir
    self.record_files = tuple(record_files)
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    self._file = None
    self._records = {}  # file name -> open file of `write_record`
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._file = open(self.path, "a", encoding="utf-8")
    if tensorboard:
      try:
        from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
        self._tb = SummaryWriter(os.path.join(workdir, "tb"))
      except Exception as e:  # pylint: disable=broad-except
        logging.warning("TensorBoard writer unavailable (%s); JSONL only", e)

  def write(self, step, metrics):
    """Writes one record of scalar metrics for `step`."""
    if not self.enabled:
      return
    rec = {"step": int(step)}
    rec.update({k: _scalar(v) for k, v in metrics.items()})
    self._file.write(json.dumps(rec, allow_nan=True) + "\n")
    self._file.flush()
    if self._tb is not None:
      for k, v in rec.items():
        if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
          self._tb.add_scalar(k, v, global_step=int(step))

  def write_record(self, name, record):
    """Appends the JSON object `record` (with a "step") as a line of <workdir>/<name>, one of
    `record_files`."""
    if not self.enabled:
      return
    if name not in self.record_files:
      raise ValueError(f"write_record: {name!r} is not one of record_files {self.record_files}")
    if name not in self._records:
      self._records[name] = open(os.path.join(self.workdir, name), "a", encoding="utf-8")
    self._records[name].write(json.dumps(record, allow_nan=True) + "\n")
    self._records[name].flush()

  def image(self, tag, image_HxWx3, step):
    """A TensorBoard image (uint8[H, W, 3]); nothing without TensorBoard."""
    if self._tb is not None:
      self._tb.add_image(tag, image_HxWx3, global_step=int(step), dataformats="HWC")

  def histogram(self, tag, values, step):
    """A TensorBoard histogram of `values` (any shape; non-finite values left out)."""
    if self._tb is not None:
      v = np.asarray(values, np.float64).reshape(-1)
      self._tb.add_histogram(tag, v[np.isfinite(v)], global_step=int(step))

  def hparams(self, hparams, metrics):
    """TensorBoard's HParams entry of this run (`hparams`: name -> bool/int/float/str;
    `metrics`: name -> float), written in <workdir>/tb/hparams."""
    if self._tb is not None:
      self._tb.add_hparams(hparams, {k: float(v) for k, v in metrics.items()}, name="hparams")

  def drop_after(self, step):
    """Removes the records with step > `step` (and unreadable lines, e.g. a line cut by a crash)
    from metrics.jsonl and the `write_record` files.

    Each file is rewritten atomically (temporary file + os.replace); later writes append.
    TensorBoard keeps its events: readers take the last value of a step.
    """
    if not self.enabled:
      return
    for name in list(self._records):
      self._records.pop(name).close()
    for name in self.record_files:
      if os.path.exists(os.path.join(self.workdir, name)):
        _drop_after(os.path.join(self.workdir, name), step)
    if not os.path.exists(self.path):
      return
    self._file.close()
    _drop_after(self.path, step)
    self._file = open(self.path, "a", encoding="utf-8")

  def close(self):
    for name in list(self._records):
      self._records.pop(name).close()
    if self._file is not None:
      self._file.close()
      self._file = None
    if self._tb is not None:
      self._tb.flush()
      self._tb.close()
      self._tb = None


def _drop_after(path, step):
  """Rewrites the JSONL file `path` without its records of step > `step`."""
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
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      f.writelines(kept)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)


def read_jsonl(path):
  """Reads a metrics.jsonl file into a list of dicts."""
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


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
