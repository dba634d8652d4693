"""Figures of runs: validation loss against tokens, expert load over training, router Gram
matrices, PES per layer and the pruning trade-off.

Every function returns a `matplotlib.figure.Figure` made without pyplot (no global backend or
figure registry, so it works under Agg, in scripts, tests and threads): `fig.savefig(path)`
writes it, and a notebook shows it as a cell's value (after `%matplotlib inline`). Where
methods are compared they share their axes (loss and tokens) or one colour scale (load, Gram
matrices), so that panels can be read against each other. matplotlib is imported inside the
functions: importing this module costs nothing.

The readers take a run directory (`train.train_and_evaluate`'s workdir, local or `gs://`):
`metrics.jsonl`, `config.json`, `prune.json` (experiments/prune.py) and `expert_load.jsonl`.
"""

import json
import re

import numpy as np

from simbal_jax.runio import paths
from simbal_jax.runio import writers

_LAYER_PES = re.compile(r"^eval/layer_(\d+)/pes$")


# ----------------------------------------------------------------------------------------------
# Readers.


def read_eval_curve(run_dir):
  """The validation loss of every evaluation of a run.

  Args:
    run_dir: str, a run directory with `metrics.jsonl` (and `config.json` for logs whose eval
      records carry no `train/tokens`).

  Returns:
    float64[N, 2]: (training tokens, eval/loss) in step order, one row per evaluated step (the
    last record of a step wins).
  """
  run_dir = paths.resolve(run_dir)
  records = writers.read_jsonl(run_dir / "metrics.jsonl")
  tokens_per_step = None
  if any("eval/loss" in r and "train/tokens" not in r for r in records):
    t = json.loads((run_dir / "config.json").read_text())["train"]
    tokens_per_step = int(t["global_batch_size"]) * int(t["seq_len"])
  return eval_curve(records, tokens_per_step)


def eval_curve(records, tokens_per_step=None):
  """float64[N, 2] (training tokens, eval/loss) of the records carrying `eval/loss`, in step
  order, the last record of a step winning; tokens from `train/tokens`, else step x
  `tokens_per_step`."""
  by_step = {r["step"]: r for r in records if "eval/loss" in r}
  rows = [(r["train/tokens"] if "train/tokens" in r else s * tokens_per_step, r["eval/loss"])
          for s, r in sorted(by_step.items())]
  return np.asarray(rows, np.float64).reshape(-1, 2)


def read_prune(run_dir):
  """The rows of `<run_dir>/prune.json` (experiments/prune.py): list of dicts."""
  return json.loads((paths.resolve(run_dir) / "prune.json").read_text())


def layer_pes(metrics):
  """{MoE layer index: PES} from a summary or eval record (`eval/layer_<i>/pes` keys)."""
  out = {int(m.group(1)): float(v) for k, v in metrics.items()
         for m in [_LAYER_PES.match(k)] if m}
  return dict(sorted(out.items()))


def read_expert_loads(run_dirs, split="train"):
  """{method: (tokens int[N], layers list, load float[N, Lm, E])} of each run's
  `expert_load.jsonl` (`telemetry.read_expert_load`, which raises FileNotFoundError for a run
  without one); the input of `load_heatmaps`."""
  from simbal_jax import telemetry  # pylint: disable=g-import-not-at-top
  out = {}
  for method, d in run_dirs.items():
    _, tokens, layers, load = telemetry.read_expert_load(d, split=split)
    out[method] = (tokens, layers, load)
  return out


# ----------------------------------------------------------------------------------------------
# Figures.


def _figure(nrows, ncols, width, height, **kw):
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  fig = Figure(figsize=(width, height), layout="constrained")
  return fig, fig.subplots(nrows, ncols, squeeze=False, **kw)


def _token_axis(ax):
  from matplotlib import ticker  # pylint: disable=g-import-not-at-top
  ax.xaxis.set_major_formatter(ticker.EngFormatter(sep=""))
  ax.set_xlabel("training tokens")


def _by_seed(curves):
  """{seed: float64[N, 2]} from one array, a list (seeds 0..n-1) or a {seed: array} dict."""
  if isinstance(curves, dict):
    return {k: np.asarray(v, np.float64) for k, v in curves.items()}
  if isinstance(curves, np.ndarray) and curves.ndim == 2:
    return {0: np.asarray(curves, np.float64)}
  return {i: np.asarray(c, np.float64) for i, c in enumerate(curves)}


def loss_vs_tokens(curves, *, reference=None, target=None, title=None):
  """Validation loss against training tokens, every method on the same axes.

  Args:
    curves: {method: curves of its seeds}: one float[N, 2] array of (tokens, loss)
      (`read_eval_curve`), a list of them, or a {seed: array} dict. Several seeds are drawn as
      their mean (over the evaluations every seed has) with a min-max band.
    reference: optional method of `curves`: adds a second panel (same x axis) with each seed's
      loss minus the reference's at the same seed and evaluation.
    target: optional loss drawn as a dashed horizontal line (e.g. the reference's final loss);
      the y axis then zooms on the end of training.
    title: optional title of the loss panel.

  Returns:
    Figure with one Axes (two with a reference).
  """
  seeds = {m: _by_seed(c) for m, c in curves.items()}
  panels = 2 if reference is not None and len(seeds) > 1 else 1
  fig, axes = _figure(1, panels, 6 * panels, 4.5, sharex=True)
  ax = axes[0, 0]
  for i, (name, by_seed) in enumerate(seeds.items()):
    runs = [c for c in by_seed.values() if len(c)]
    if not runs:
      continue
    n = min(len(c) for c in runs)
    loss = np.stack([c[:n, 1] for c in runs])
    label = name if len(runs) == 1 else f"{name} (mean of {len(runs)} seeds)"
    ax.plot(runs[0][:n, 0], loss.mean(0), color=f"C{i}", marker="." if n < 30 else None,
            label=label)
    if len(runs) > 1:
      ax.fill_between(runs[0][:n, 0], loss.min(0), loss.max(0), color=f"C{i}", alpha=0.2)
  lows = [float(c[:, 1].min()) for s in seeds.values() for c in s.values() if len(c)]
  if target is not None:
    ax.axhline(target, color="k", ls="--", lw=1, label="target" if reference is None
               else f"target ({reference} final)")
    if lows:
      lo = min(lows)
      ax.set_ylim(lo - 0.05, target + 4 * max(target - lo, 0.0) + 0.3)
  _token_axis(ax)
  ax.set_ylabel("validation loss (nats/token)")
  ax.set_title(title or "Validation loss")
  ax.legend()
  if panels == 2:
    bx = axes[0, 1]
    ref = seeds[reference]
    for i, (name, by_seed) in enumerate(seeds.items()):
      if name == reference:
        continue
      first = True
      for s, c in by_seed.items():
        if s in ref:
          m = min(len(c), len(ref[s]))
          bx.plot(c[:m, 0], c[:m, 1] - ref[s][:m, 1], color=f"C{i}", alpha=0.7, lw=1,
                  label=name if first else None)
          first = False
    bx.axhline(0.0, color="k", lw=1)
    _token_axis(bx)
    bx.set_ylabel(f"loss minus {reference}'s (same seed)")
    bx.set_title(f"Difference against {reference}")
    bx.legend()
  return fig


def change_vs_tokens(churn, movement=None, *, title=None):
  """Routing churn (and expert movement) since the previous evaluation against tokens.

  Args:
    churn: {method: curves of its seeds} as in `loss_vs_tokens`: (tokens, eval/churn) pairs.
    movement: optional, the same for eval/expert_move (drawn on a log scale in a second panel).
    title: optional figure title.

  Returns:
    Figure with one Axes per given quantity; several seeds are drawn as their mean with a
    min-max band.
  """
  panels = [(churn, "routing churn since previous eval", False)]
  if movement is not None:
    panels.append((movement, "expert movement ‖ΔW‖/‖W‖", True))
  fig, axes = _figure(1, len(panels), 6 * len(panels), 4.5, sharex=True)
  for ax, (curves, ylabel, log_y) in zip(axes[0], panels):
    for i, (name, by_seed) in enumerate({m: _by_seed(c) for m, c in curves.items()}.items()):
      runs = [c for c in by_seed.values() if len(c)]
      if not runs:
        continue
      n = min(len(c) for c in runs)
      y = np.stack([c[:n, 1] for c in runs])
      ax.plot(runs[0][:n, 0], y.mean(0), color=f"C{i}", marker=".", label=name)
      if len(runs) > 1:
        ax.fill_between(runs[0][:n, 0], y.min(0), y.max(0), color=f"C{i}", alpha=0.2)
    if log_y:
      ax.set_yscale("log")
    _token_axis(ax)
    ax.set_ylabel(ylabel)
    ax.legend()
  if title:
    fig.suptitle(title)
  return fig


def _edges(centres):
  """Cell edges float64[N + 1] around increasing centres (midpoints; half a step beyond)."""
  c = np.asarray(centres, np.float64)
  if c.size == 1:
    half = max(abs(c[0]), 1.0) / 2
    return np.array([c[0] - half, c[0] + half])
  mid = (c[1:] + c[:-1]) / 2
  return np.concatenate([[c[0] - (mid[0] - c[0])], mid, [c[-1] + (c[-1] - mid[-1])]])


def load_heatmaps(loads, *, title=None):
  """Per-layer expert load over training: rows methods, columns MoE layers, one colour scale.

  Args:
    loads: {method: (tokens int[N], layers list[Lm], load float[N, Lm, E])}, the share of
      routed assignments per expert at each logged step (each [E] row sums to 1), e.g.
      `read_expert_loads`; `layers` (the model's block indices) only names the columns and may
      be None. Methods must have the same Lm.
    title: optional figure title.

  Returns:
    Figure with [methods, Lm] Axes: x training tokens, y expert, colour the share (1/E is a
    uniform router), the same limits (0 to the largest share of any method) in every panel and
    one colour bar.
  """
  methods = list(loads)
  empty = [m for m, v in loads.items() if np.asarray(v[2]).size == 0]
  if empty:
    raise ValueError(f"load_heatmaps: no load logged for {', '.join(empty)}")
  num_layers = {np.asarray(v[2]).shape[1] for v in loads.values()}
  if len(num_layers) != 1:
    raise ValueError(f"load_heatmaps: methods have different numbers of MoE layers {num_layers}")
  num_layers = num_layers.pop()
  vmax = max(float(np.max(v[2])) for v in loads.values())
  fig, axes = _figure(len(methods), num_layers, 3.6 * num_layers + 1.2, 2.6 * len(methods),
                      sharex=True, sharey=True)
  mesh = None
  for r, name in enumerate(methods):
    tokens, layers, load = loads[name]
    load = np.asarray(load, np.float64)
    layers = list(range(num_layers)) if layers is None else list(layers)
    num_experts = load.shape[2]
    for c in range(num_layers):
      ax = axes[r, c]
      mesh = ax.pcolormesh(_edges(tokens), np.arange(num_experts + 1) - 0.5, load[:, c, :].T,
                           vmin=0.0, vmax=vmax, cmap="viridis", shading="flat")
      ax.set_title(f"{name}, layer {layers[c]}")
      if c == 0:
        ax.set_ylabel("expert")
      if r == len(methods) - 1:
        _token_axis(ax)
  num_experts = np.asarray(loads[methods[0]][2]).shape[2]
  fig.colorbar(mesh, ax=axes.ravel().tolist(),
               label=f"share of routed assignments (uniform {1 / num_experts:.3g})")
  if title:
    fig.suptitle(title)
  return fig


def gram_matrices(kernels, *, layers=None, title=None):
  """Each MoE layer's router Gram matrix RᵀR, methods side by side, one colour scale.

  Args:
    kernels: {method: float[Lm, D, E]} router kernels (`model.router_kernels`). RᵀR is
      float[E, E] per layer: the identity for orthonormal columns (SimBal's target), column
      norms² on the diagonal, the overlap of two experts' router directions off it.
    layers: optional block index of each MoE layer, for the titles (default 0..Lm-1).
    title: optional figure title.

  Returns:
    Figure with [Lm, methods] Axes; a diverging scale symmetric about 0 with the same limits in
    every panel and one colour bar; each panel's title gives ‖RᵀR − I‖₁.
  """
  methods = list(kernels)
  grams = {m: np.einsum("lde,ldf->lef", np.asarray(k, np.float64), np.asarray(k, np.float64))
           for m, k in kernels.items()}
  num_layers = {g.shape[0] for g in grams.values()}
  if len(num_layers) != 1:
    raise ValueError(f"gram_matrices: methods have different numbers of MoE layers {num_layers}")
  num_layers = num_layers.pop()
  layers = list(range(num_layers)) if layers is None else list(layers)
  vmax = max(float(np.max(np.abs(g))) for g in grams.values()) or 1.0
  fig, axes = _figure(num_layers, len(methods), 3.2 * len(methods) + 1.2, 3.0 * num_layers)
  im = None
  for r in range(num_layers):
    for c, name in enumerate(methods):
      g = grams[name][r]
      ax = axes[r, c]
      im = ax.imshow(g, vmin=-vmax, vmax=vmax, cmap="RdBu_r", interpolation="nearest")
      gap = float(np.abs(g - np.eye(g.shape[0])).sum())
      ax.set_title(f"{name}, layer {layers[r]}: ‖RᵀR−I‖₁ {gap:.3g}", fontsize=9)
      ax.set_xlabel("expert")
      if c == 0:
        ax.set_ylabel("expert")
  fig.colorbar(im, ax=axes.ravel().tolist(), label="RᵀR")
  if title:
    fig.suptitle(title)
  return fig


def pes_per_layer(pes, *, title=None):
  """PES per MoE layer, grouped bars (one per method) on the same axes.

  Args:
    pes: {method: {layer index: PES}} (`layer_pes(summary)`) or {method: float[Lm]}.
    title: optional title.

  Returns:
    Figure with one Axes: x the layer, y PES (mean pairwise cosine of the experts' outputs:
    0 for mutually orthogonal experts, 1 for identical ones).
  """
  pes = {m: (dict(v) if isinstance(v, dict) else dict(enumerate(np.asarray(v).tolist())))
         for m, v in pes.items()}
  layers = sorted({l for v in pes.values() for l in v})
  width = 0.8 / max(len(pes), 1)
  fig, axes = _figure(1, 1, max(4.0, 1.2 * len(layers) + 2), 3.8)
  ax = axes[0, 0]
  x = np.arange(len(layers))
  for i, (name, v) in enumerate(pes.items()):
    ax.bar(x + (i - (len(pes) - 1) / 2) * width, [v.get(l, np.nan) for l in layers], width,
           color=f"C{i}", label=name)
  ax.set_xticks(x, [str(l) for l in layers])
  ax.set_xlabel("MoE layer")
  ax.set_ylabel("PES (lower: more diverse experts)")
  ax.axhline(0.0, color="k", lw=0.8)
  ax.set_title(title or "Pairwise expert similarity per layer")
  ax.legend()
  return fig


def prune_tradeoff(rows, *, title=None):
  """Dynamic-K pruning at inference: validation loss against experts per token, per method.

  Args:
    rows: {method: [{"threshold", "loss", "experts_per_token", ...}]}, the rows of
      experiments/prune.py (`prune_table`, or `read_prune(run_dir)`).
    title: optional title.

  Returns:
    Figure with one Axes shared by the methods; each point is labelled with its gate threshold.
  """
  fig, axes = _figure(1, 1, 6, 4.2)
  ax = axes[0, 0]
  for i, (name, rs) in enumerate(rows.items()):
    rs = sorted(rs, key=lambda r: r["experts_per_token"])
    ax.plot([r["experts_per_token"] for r in rs], [r["loss"] for r in rs], marker="o",
            color=f"C{i}", label=name)
    for r in rs:
      ax.annotate(f"{r['threshold']:g}", (r["experts_per_token"], r["loss"]),
                  textcoords="offset points", xytext=(4, 4), fontsize=8, color=f"C{i}")
  ax.set_xlabel("experts per token (after pruning)")
  ax.set_ylabel("validation loss (nats/token)")
  ax.set_title(title or "Pruning gates below a threshold (labels: threshold)")
  ax.legend()
  return fig


def diff_vs_size(series, *, title=None):
  """A method's final-loss difference against each baseline, against model size.

  Args:
    series: {baseline: [(non-embedding active params, mean difference, [lo, hi] 95 % CI or
      None), ...]} (experiments/scaling.py).
    title: optional title.

  Returns:
    Figure with one Axes: x the parameters (log scale), y the difference (below 0: the method
    ends lower), one line per baseline with its intervals as error bars.
  """
  fig, axes = _figure(1, 1, 6, 4.2)
  ax = axes[0, 0]
  for i, (name, pts) in enumerate(series.items()):
    pts = sorted(pts, key=lambda p: p[0])
    x = np.asarray([p[0] for p in pts], np.float64) * (1 + 0.03 * i)  # side by side
    y = np.asarray([p[1] for p in pts], np.float64)
    err = np.asarray([[m - c[0], c[1] - m] if c else [0.0, 0.0] for _, m, c in pts]).T
    ax.errorbar(x, y, yerr=err if len(pts) else None, marker="o", capsize=4, color=f"C{i}",
                label=f"vs {name}")
  ax.set_xscale("log")
  ax.axhline(0.0, color="k", lw=0.8)
  ax.set_xlabel("non-embedding active parameters")
  ax.set_ylabel("final validation loss difference")
  ax.set_title(title or "Difference against the baselines by model size")
  ax.legend()
  return fig
