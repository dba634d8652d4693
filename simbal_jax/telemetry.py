"""What a training run reports on the host: per-step logging, throughput, routing telemetry.

`StepLogger` checks each step's loss (a NaN or Inf stops the run: `NonFiniteLossError`) and
writes the log steps' records; `Timer` measures the compiled step's throughput; `summary_table`
is the final table of a run.

At every log step (`log.every`), metrics.jsonl gets per MoE layer i (block index)
`train/layer_<i>/maxvio`, `train/layer_<i>/load_cv` and `train/layer_<i>/entropy` (of that
step's global batch), `train/tokens` (tokens seen), and from the second logged record of a
(re)start on `train/tokens_per_second` (since the previous record, evaluations and saves left
out) and `train/mfu` (model FLOPs utilisation: `model.flops_per_token` x tokens/s over the
devices' peak, `memory.device_peak_tflops`; absent where the peak is unknown, e.g. on CPU,
unless `log.peak_tflops` is set). With `log.expert_norms` (routing health: a stagnant expert,
one no token reaches, has a gradient far below its layer's others), also
`train/layer_<i>/expert_wnorm_ratio` and `.../expert_gnorm_ratio`: the smallest over the largest
expert norm of the layer, of the weights and of the step's gradient (`expert_norm_metrics`),
their mean over layers `train/expert_{w,g}norm_ratio` and minimum `..._ratio_min`.

`LOAD_FILE` (expert_load.jsonl) gets the whole per-expert load, one JSON object per line:
  {"step": int, "tokens": int, "split": "train" | "eval", "layers": [block indices],
   "load": [[fraction of routed assignments per expert] per MoE layer]}
(each row sums to 1): "train" at every log step (that step's global batch), "eval" at every
evaluation (the whole evaluation set). Train lines with `log.expert_norms` also hold "wnorm"
and "gnorm" ([[norm per expert] per MoE layer] of the weights and of the step's gradient).
`read_expert_load` reads it back.

At every evaluation TensorBoard gets (`log.tensorboard`): the image `routing/expert_load` (rows
= MoE layers, columns = experts; colour from 0 to 2/E, clipped, so a uniform load is the middle
of the scale), the images `routing/gram/layer_<i>` of each router's RᵀR (E x E, diverging scale
fixed at [-1, 1], clipped: SimBal's target is the identity, so the diagonal is +1 and the
off-diagonal 0 when it is reached), and the histograms `routing/logits/layer_<i>` of the router
logits of the first `log.hist_tokens` tokens of the evaluation set. At every log step with
`log.expert_norms`, the images `routing/expert_wnorm` and `routing/expert_gnorm` (rows = MoE
layers, columns = experts, each row over its largest value: scale 0 to 1, so a stagnant expert
is a dark cell). At the end of a finished run, HParams (the config's scalar fields against the
final eval metrics).
"""

import math
import re
import time

import jax
import numpy as np

from simbal_jax import eval_metrics
from simbal_jax import memory
from simbal_jax import metrics as metrics_lib
from simbal_jax import model as model_lib
from simbal_jax import programs
from simbal_jax.runio import paths
from simbal_jax.runio import rundir
from simbal_jax.runio import writers

LOAD_FILE = "expert_load.jsonl"
# The train step's per-expert norms (log.expert_norms) and their names in LOAD_FILE.
EXPERT_NORM_KEYS = {"train/layer_expert_wnorm": "wnorm", "train/layer_expert_gnorm": "gnorm"}


# Compiled once per load shape: called at every logged step, op by op it would dispatch (and
# first compile) each of its jnp operations separately.
_load_cv = jax.jit(metrics_lib.load_cv)


def split_layer_metrics(metrics, layer_ids):
  """Host train metrics (numpy) -> (scalars, load float64[Lm, E] or None).

  The per-layer arrays of `step.train_step` (`train/layer_maxvio` float[Lm],
  `train/layer_entropy` float[Lm], `train/layer_load` float[Lm, E]) become the scalars
  `train/layer_<i>/maxvio`, `.../entropy` and `.../load_cv` (i from `layer_ids`); the load
  itself is returned. Scalars pass through as Python floats.
  """
  out, load = {}, None
  for k, v in metrics.items():
    v = np.asarray(v)
    if k == "train/layer_load":
      load = v.astype(np.float64)
    elif v.ndim == 0:
      out[k] = float(v)
    elif k.startswith("train/layer_"):
      name = k[len("train/layer_"):]
      out.update({f"train/layer_{i}/{name}": float(x) for i, x in zip(layer_ids, v)})
    else:
      raise ValueError(f"train metric {k!r} has shape {v.shape}; only train/layer_* may be "
                       "arrays")
  if load is not None:
    cv = np.asarray(_load_cv(load.astype(np.float32)))
    out.update({f"train/layer_{i}/load_cv": float(x) for i, x in zip(layer_ids, cv)})
  return out, load


def expert_norm_metrics(norms, layer_ids):
  """Scalars of the train step's per-expert norms (`EXPERT_NORM_KEYS`).

  Args:
    norms: {"train/layer_expert_wnorm" | "train/layer_expert_gnorm": float[Lm, E]} (host).
    layer_ids: block indices of the MoE layers.
  Returns:
    {train/layer_<i>/expert_<w|g>norm_ratio: min / max over the layer's experts (0 when the
    largest is 0), train/expert_<w|g>norm_ratio: their mean over layers, ..._ratio_min: their
    minimum}.
  """
  out = {}
  for key, short in EXPERT_NORM_KEYS.items():
    if key not in norms:
      continue
    v = np.asarray(norms[key], np.float64)
    top = v.max(-1)
    ratio = np.where(top > 0, v.min(-1) / np.where(top > 0, top, 1.0), 0.0)
    name = f"expert_{short}_ratio"
    out.update({f"train/layer_{i}/{name}": float(r) for i, r in zip(layer_ids, ratio)})
    out[f"train/{name}"], out[f"train/{name}_min"] = float(ratio.mean()), float(ratio.min())
  return out


def _rows(a):
  return [[float(x) for x in row] for row in np.asarray(a, np.float64)]


def load_record(step, tokens, split, layer_ids, load, movement=None, **per_expert):
  """The LOAD_FILE line of a load float[Lm, E] (and, at evaluations, "movement": each expert's
  relative weight movement float[Lm, E] since the previous evaluation,
  analysis.RoutingTracker; `per_expert`: other float[Lm, E] fields, e.g. wnorm, gnorm)."""
  rec = {"step": int(step), "tokens": int(tokens), "split": split,
         "layers": [int(i) for i in layer_ids], "load": _rows(load)}
  if movement is not None:
    rec["movement"] = _rows(movement)
  rec.update({k: _rows(v) for k, v in per_expert.items() if v is not None})
  return rec


def read_expert_load(workdir, split="train", field="load"):
  """Reads <workdir>/expert_load.jsonl.

  Args:
    workdir: a run directory, local or cloud.
    split: "train" (every log step) or "eval" (every evaluation), or "eval_<name>" (an extra
      evaluation set of train.eval_sets).
    field: "load", or another per-expert field of the lines ("movement" at evaluations,
      "wnorm" / "gnorm" at log steps); lines without it are left out.
  Returns:
    (steps int64[N], tokens int64[N], layers list of block indices, values float64[N, Lm, E]),
    in step order (a step logged twice, e.g. redone after a crash, keeps its last line).
  Raises:
    FileNotFoundError: the run wrote no load (a dense model, or a run older than the file).
  """
  by_step, layers = {}, None
  for rec in writers.read_jsonl(paths.resolve(workdir) / LOAD_FILE):  # cut lines left out
    if rec.get("split") == split and field in rec:
      by_step[rec["step"]] = rec
      layers = rec["layers"]
  steps = sorted(by_step)
  if not steps:
    return (np.zeros(0, np.int64), np.zeros(0, np.int64), [], np.zeros((0, 0, 0)))
  return (np.array(steps, np.int64), np.array([by_step[s]["tokens"] for s in steps], np.int64),
          layers, np.array([by_step[s][field] for s in steps], np.float64))


class Throughput:
  """Tokens/s and MFU between logged records, time spent in evaluations and saves left out."""

  def __init__(self, tokens_per_step, flops_per_token, peak_flops, clock=time.time):
    """Args:
      tokens_per_step: global batch x sequence length.
      flops_per_token: training FLOPs per token (model.flops_per_token).
      peak_flops: FLOP/s of all devices together, or None (no MFU).
      clock: seconds now (tests pass a fake clock).
    """
    self.clock = clock
    self.tokens_per_step = tokens_per_step
    self.flops_per_token = flops_per_token
    self.peak_flops = peak_flops
    self._last = None  # (step, time, paused seconds) of the previous mark

  def start(self, step, paused=0.0):
    """Starts timing after `step` (call when the compiling first step has finished)."""
    self._last = (step, self.clock(), paused)

  def mark(self, step, paused):
    """Metrics of the steps since the previous mark; `paused`: total seconds not training."""
    now, out = self.clock(), {}
    if self._last is not None:
      s0, t0, p0 = self._last
      seconds = now - t0 - (paused - p0)
      if step > s0 and seconds > 0:
        tps = (step - s0) * self.tokens_per_step / seconds
        out["train/tokens_per_second"] = tps
        if self.peak_flops:
          out["train/mfu"] = tps * self.flops_per_token / self.peak_flops
    self._last = (step, now, paused)
    return out


def heatmap_image(values, vmin, vmax, cmap="viridis", min_px=256):
  """uint8[H, W, 3] picture of a matrix (one colour block per entry; values clipped).

  Args:
    values: float[R, C].
    vmin, vmax: the colour scale's ends.
    cmap: a matplotlib colormap name.
    min_px: each block is scaled up so the longer side has at least this many pixels.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  v = np.asarray(values, np.float64)
  unit = np.clip((v - vmin) / max(vmax - vmin, 1e-12), 0.0, 1.0)
  rgb = (matplotlib.colormaps[cmap](unit)[..., :3] * 255).round().astype(np.uint8)
  px = max(1, -(-min_px // max(v.shape)))
  return np.repeat(np.repeat(rgb, px, axis=0), px, axis=1)


def load_image(load):
  """The expert-load heatmap of float[Lm, E] load fractions (scale 0 to 2/E)."""
  load = np.asarray(load, np.float64)
  return heatmap_image(load, 0.0, 2.0 / load.shape[-1])


def norm_image(norms):
  """The per-expert norm heatmap of float[Lm, E]: each row over its largest value (0 to 1)."""
  v = np.asarray(norms, np.float64)
  top = v.max(-1, keepdims=True)
  return heatmap_image(np.where(top > 0, v / np.where(top > 0, top, 1.0), 0.0), 0.0, 1.0)


def gram_image(kernel_DxE):
  """The RᵀR heatmap of one router kernel float[D, E] (diverging scale, [-1, 1])."""
  k = np.asarray(kernel_DxE, np.float64)
  return heatmap_image(k.T @ k, -1.0, 1.0, cmap="RdBu_r")


def router_logit_fn(model, num_tokens, out_sharding=None):
  """A jitted (params, expert_bias, batch) -> float32[Lm, n, E] router logits of the batch's
  first n = min(num_tokens, tokens in the batch) tokens (sequence-major), replicated."""

  def fn(params, expert_bias, batch):
    _, aux = model.apply({"params": params}, batch["inputs"],
                         expert_bias=expert_bias if model.config.moe is not None else None,
                         segment_ids=batch.get("segment_ids"))
    return aux.router.logits[:, :num_tokens]

  return programs.program("router_logits", (model.config, num_tokens, out_sharding),
                          lambda: jax.jit(fn, out_shardings=out_sharding))


def log_eval(writer, step, *, layer_ids, load=None, kernels=None, logits=None):
  """Writes the evaluation's TensorBoard images and histograms (see the module docstring).

  Args:
    writer: writers.MetricWriter.
    layer_ids: block indices of the MoE layers.
    load: float[Lm, E] eval load fractions, or None.
    kernels: float[Lm, D, E] router kernels, or None.
    logits: float[Lm, n, E] router logits, or None.
  """
  if load is not None:
    writer.image("routing/expert_load", load_image(load), step)
  for j, i in enumerate(layer_ids):
    if kernels is not None:
      writer.image(f"routing/gram/layer_{i}", gram_image(kernels[j]), step)
    if logits is not None:
      writer.histogram(f"routing/logits/layer_{i}", logits[j], step)


def hparams(config_dict):
  """Flat {dotted field: bool/int/float/str} of a nested config dict (lists as strings)."""
  return {k: v if isinstance(v, (bool, int, float, str)) else str(v)
          for k, v in rundir.flatten(config_dict).items()
          if v is None or isinstance(v, (bool, int, float, str, list, tuple))}


class NonFiniteLossError(FloatingPointError):
  """Raised when the training loss is NaN or Inf; `.step` is the offending step."""

  def __init__(self, step, value, resumed_from=None, what="training loss"):
    msg = (f"non-finite {what} {value} at step {step}; stopping (no checkpoint is written "
           "for this step; earlier ones are kept)")
    if resumed_from:  # the run loaded a checkpoint: name it, without vouching for it
      msg += (f". This run started from {resumed_from}; if the loss diverged soon after, that "
              "checkpoint's state may be the cause")
    super().__init__(msg)
    self.step, self.value, self.what = step, value, what


class Timer:
  """Training throughput of the compiled step: time after the first (compiling) step less the
  evaluations and checkpoint saves inside the loop."""

  def __init__(self, start_step):
    self.start_step = start_step
    self.t_loop = self.t_first = time.time()
    self.paused = 0.0

  def first_step_done(self):
    self.t_first = time.time()

  def result(self, step, tokens_per_step):
    timed_steps = step - self.start_step - 1  # steps after the compiling one
    train_seconds = time.time() - self.t_first - self.paused
    if timed_steps < 1:  # a one-step run: only the compiling step to measure
      timed_steps, train_seconds = step - self.start_step, self.t_first - self.t_loop
    return dict(first_step_seconds=self.t_first - self.t_loop, train_seconds=train_seconds,
                eval_ckpt_seconds=self.paused,
                tokens_per_second=timed_steps * tokens_per_step / max(train_seconds, 1e-9))


class StepLogger:
  """Checks each step's loss (NaN/Inf stops the run) and writes the log steps' records:
  metrics.jsonl with per-layer routing metrics, tokens, tokens/s and MFU, and the per-expert
  load in expert_load.jsonl."""

  def __init__(self, env, writer, progress, timer):
    t = env.cfg.train
    self.every, self.num_steps = max(int(env.cfg.log.every), 1), int(t.num_steps)
    self.tokens_per_step = int(t.global_batch_size) * int(t.seq_len)
    self.writer, self.progress, self.timer = writer, progress, timer
    self.layer_ids = env.mcfg.moe_layer_ids
    self.health = {}  # the last logged expert-norm summary (expert_norm_metrics)
    self.images = bool(env.cfg.log.tensorboard)
    peak = memory.device_peak_tflops(override=float(env.cfg.log.peak_tflops))
    self.throughput = Throughput(
        self.tokens_per_step, model_lib.flops_per_token(env.mcfg, int(t.seq_len)),
        peak * 1e12 * len(env.mesh.devices.flat) if peak else None)

  def __call__(self, pending):
    step, metrics = pending
    # Every step: the loss and the gradient norm (the finite checks, the progress bar); the
    # rest only at a logged step (host work per step is what a small model's step time is).
    loss, grad_norm = (float(v) for v in jax.device_get(
        (metrics["train/loss"], metrics.get("train/grad_norm", 0.0))))
    if not math.isfinite(loss):
      raise NonFiniteLossError(step, loss)
    if not math.isfinite(grad_norm):  # the update of this step diverged
      raise NonFiniteLossError(step, grad_norm, what="gradient norm")
    self.progress.update(step, loss)
    if step % self.every == 0 or step == self.num_steps:
      metrics = dict(jax.device_get(metrics))
      norms = {k: metrics.pop(k) for k in EXPERT_NORM_KEYS if k in metrics}
      m, load = split_layer_metrics(metrics, self.layer_ids)
      m["train/tokens"] = tokens = step * self.tokens_per_step
      m.update(self.throughput.mark(step, self.timer.paused))
      self.health = expert_norm_metrics(norms, self.layer_ids)
      m.update(self.health)
      self.writer.write(step, m)
      per_expert = {EXPERT_NORM_KEYS[k]: v for k, v in norms.items()}
      if load is not None:
        self.writer.write_record(LOAD_FILE, load_record(
            step, tokens, "train", self.layer_ids, load, **per_expert))
      for name, v in per_expert.items() if self.images else ():
        self.writer.image(f"routing/expert_{name}", norm_image(v), step)


EXTRA_SET_SUMMARY = re.compile(r"^eval_\w+/(loss|load_tv)$")  # train.eval_sets in the tables


def _summary_keys(m):
  """The final-table keys present in `m`: the registry's, then each extra evaluation set's loss
  and load shift (eval_<name>/loss, eval_<name>/load_tv)."""
  keys = [k for _, k in eval_metrics.summary_columns() if k in m]
  return keys + [k for k in m if EXTRA_SET_SUMMARY.match(k)]


def brief(m):
  """One line of the final-table metrics of an evaluation (the log line)."""
  return ", ".join(f"{k}={m[k]:.4g}" for k in _summary_keys(m))


# Rows of the final table after the eval metrics: the last logged routing health, throughput.
SUMMARY_TRAIN_KEYS = ("train/expert_wnorm_ratio_min", "train/expert_gnorm_ratio_min",
                      "tokens_per_second", "wall_seconds")


def summary_table(summary):
  """A small table of the final metrics (eval_metrics.summary_columns and throughput)."""
  rows = [(k, summary[k]) for k in _summary_keys(summary)]
  rows += [(k, summary[k]) for k in SUMMARY_TRAIN_KEYS if k in summary]
  width = max([len(k) for k, _ in rows] + [6])
  lines = [f"{'metric'.ljust(width)}  value", "-" * (width + 14)]
  lines += [f"{k.ljust(width)}  {v:.6g}" for k, v in rows]
  lines.append(f"{'status'.ljust(width)}  {summary.get('status')} at step {summary.get('step')}")
  return "\n".join(lines)
