"""The eval-metric registry: one entry per evaluation metric (pure: jax and numpy).

Every metric an evaluation reports is one `EvalMetric` in `METRICS`: its name, the function
that computes it from the evaluation's inputs (`EvalInputs`), whether it is per MoE layer, and
where it is shown: the final-metrics table of a run (`header`), the TensorBoard hyperparameter
panel (`hparam`) and the convergence table (`table`). Adding a metric is one function and one
line:

  def top_load(x):                    # float[Lm]: the busiest expert's share, per MoE layer
    return x.load.max(-1)

  eval_metrics.register(eval_metrics.EvalMetric("top_load", top_load, header="top load",
                                                table="top load"))

It then appears in metrics.jsonl (`eval/top_load`, the mean over MoE layers, and
`eval/layer_<i>/top_load`), in the run's summary and final table, and as a column of the
convergence table.

Names: a per-layer metric `m` is written as `eval/layer_<i>/m` (i = block index) and
`eval/m` (mean over MoE layers); a scalar one as `eval/m`. Metrics whose `fn` is None are
computed elsewhere (the routing change since the previous evaluation by
`analysis.RoutingTracker`, PES by `evaluate.final_pes`); their entries still say where they
are shown.
"""

import dataclasses
import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from simbal_jax import metrics as metrics_lib
from simbal_jax import specialization


class EvalInputs:
  """What an evaluation's metric functions read (host numpy, computed once on first use).

  Attributes:
    sums: list of dicts from `step.eval_step`, one per eval batch: ce_sum, tokens, seqs, ce_seq
      float32[B], and for MoE models counts float32[Lm, E], entropy_sum float32[Lm], seu_sum
      float32[Lm], no_expert_sum float32[Lm], undecided_sum float32[Lm], with domain labels
      domain_counts float32[Lm, D, E], and with router "expert_choice" causal_ce_sum float32[].
    router_kernels: float[Lm, D, E] router kernels, or None.
  """

  def __init__(self, sums, router_kernels=None):
    self.sums = sums
    self.router_kernels = router_kernels

  def total(self, key):
    """float: `key` summed over the eval batches (float64)."""
    return float(np.sum([np.asarray(s[key], np.float64) for s in self.sums]))

  def layer_total(self, key):
    """float64[Lm, ...]: the per-layer array `key` summed over the eval batches."""
    return np.sum([np.asarray(s[key], np.float64) for s in self.sums], axis=0)

  @functools.cached_property
  def tokens(self):
    return self.total("tokens")

  @functools.cached_property
  def loss(self):
    return self.total("ce_sum") / max(self.tokens, 1.0)

  @functools.cached_property
  def seq_loss(self):
    """float64[N] each evaluation sequence's mean cross-entropy, or None."""
    if "ce_seq" not in self.sums[0]:
      return None
    return np.concatenate([np.asarray(s["ce_seq"], np.float64).reshape(-1) for s in self.sums])

  @functools.cached_property
  def load(self):
    """float64[Lm, E] expert load fractions of the whole evaluation set (None: dense model).

    Host float64 on purpose (not metrics.expert_load's float32): the counts of a large
    evaluation set exceed float32's exact integers.
    """
    if "counts" not in self.sums[0]:
      return None
    counts = self.layer_total("counts")
    return counts / np.maximum(counts.sum(-1, keepdims=True), 1.0)

  @functools.cached_property
  def no_expert(self):
    """float64[Lm] share of the tokens assigned to no expert (expert choice; 0 for token
    choice), or None (a dense model, or sums without it)."""
    if "no_expert_sum" not in self.sums[0]:
      return None
    return self.layer_total("no_expert_sum") / max(self.tokens, 1.0)

  @functools.cached_property
  def causal_loss(self):
    """Mean cross-entropy of the causal evaluation (router "expert_choice" only), or None."""
    if "causal_ce_sum" not in self.sums[0]:
      return None
    return self.total("causal_ce_sum") / max(self.tokens, 1.0)

  @functools.cached_property
  def load32(self):
    """The load as float32 jax array (the routing metrics' input)."""
    return jnp.asarray(self.load, jnp.float32)

  @functools.cached_property
  def domain_counts(self):
    """float64[Lm, D, E] summed (domain, expert) counts, or None without domain labels."""
    return self.layer_total("domain_counts") if "domain_counts" in self.sums[0] else None

  @functools.cached_property
  def undecided(self):
    """float64[Lm] summed undecided tokens (step.eval_step's undecided_sum), or None."""
    return self.layer_total("undecided_sum") if "undecided_sum" in self.sums[0] else None

  @functools.cached_property
  def ortho_gap(self):
    return metrics_lib.orthogonality_gap(jnp.asarray(self.router_kernels, jnp.float32))

  @functools.cached_property
  def specialization(self):
    return specialization.specialization_from_counts(self.domain_counts)


@dataclasses.dataclass(frozen=True)
class EvalMetric:
  """One evaluation metric.

  Attributes:
    name: the metric's name (`eval/<name>`, `eval/layer_<i>/<name>`).
    fn: callable(EvalInputs) -> float (scalar metric) or float[Lm] (per-layer metric), or None
      when the value is not available for this run (e.g. a routing metric of a dense model).
      None: computed elsewhere (see the module docstring).
    per_layer: the value is per MoE layer (needs an MoE model; skipped for dense ones).
    needs: EvalInputs attributes that must not be None (e.g. "router_kernels"); else skipped.
    header: column header in a run's final-metrics table and log line (None: not shown).
    hparam: shown in TensorBoard's hyperparameter panel.
    table: column header in the convergence table's routing table (None: not shown).
    fmt: format of the convergence table's values.
  """
  name: str
  fn: Optional[Callable] = None
  per_layer: bool = True
  needs: tuple = ()
  header: Optional[str] = None
  hparam: bool = False
  table: Optional[str] = None
  fmt: str = ".4f"

  @property
  def key(self):
    return f"eval/{self.name}"


def _loss_se(x):
  # Every sequence has the same length, so the token mean is the mean of sequence means and
  # its standard error is that of the sequence means (tokens within one are correlated).
  seq = x.seq_loss
  return float(seq.std(ddof=1) / np.sqrt(seq.size)) if seq.size > 1 else 0.0


_M = EvalMetric
# In the order of the tables. Loss metrics first (every model), then the routing ones.
METRICS = {m.name: m for m in (
    _M("loss", lambda x: x.loss, per_layer=False, header="val loss", hparam=True),
    _M("loss_se", _loss_se, per_layer=False, needs=("seq_loss",), header="± se"),
    _M("ppl", lambda x: float(np.exp(min(x.loss, 80.0))), per_layer=False, header="val ppl"),
    _M("tokens", lambda x: x.tokens, per_layer=False),
    _M("sequences", lambda x: float(x.seq_loss.size), per_layer=False, needs=("seq_loss",)),
    _M("maxvio", lambda x: metrics_lib.max_vio(x.load32), header="MaxVio", hparam=True,
       table="MaxVio"),
    _M("load_cv", lambda x: metrics_lib.load_cv(x.load32), header="load CV", hparam=True,
       table="load CV"),
    _M("seu", lambda x: x.layer_total("seu_sum") / max(x.total("seqs"), 1.0), header="SEU",
       table="SEU"),
    _M("entropy", lambda x: x.layer_total("entropy_sum") / x.tokens, header="entropy",
       table="entropy"),
    _M("dead", lambda x: jax.vmap(metrics_lib.dead_experts)(x.load32), header="dead",
       table="dead"),
    _M("ortho_l1", lambda x: x.ortho_gap.l1, needs=("router_kernels",), header="ortho L1",
       hparam=True, table="‖RᵀR−I‖₁"),
    _M("ortho_mse", lambda x: x.ortho_gap.mse, needs=("router_kernels",), header="ortho MSE",
       table="mean (RᵀR−I)²", fmt=".2e"),
    _M("domain_mi", lambda x: x.specialization.mutual_info, needs=("domain_counts",)),
    _M("domain_mi_norm", lambda x: x.specialization.normalized, needs=("domain_counts",),
       header="domain MI"),
    # Routers other than token choice (moe.router): the causal evaluation of expert choice
    # (every token routed by token-choice top-K, no look at later tokens), and the share of
    # tokens that got no expert (expert choice; 0 for token choice and Sinkhorn).
    _M("causal_loss", lambda x: x.causal_loss, per_layer=False, needs=("causal_loss",),
       header="causal loss", table="causal loss"),
    _M("no_expert_share", lambda x: x.no_expert, needs=("no_expert",), header="no expert",
       table="no expert"),
    # Computed by analysis.RoutingTracker (change since the previous evaluation).
    _M("churn"), _M("expert_move"), _M("expert_move_min"), _M("stagnant"),
    # Computed by evaluate.final_pes at the end of a run (eval/pes_min, eval/pes_mean, per layer).
    _M("pes_min", per_layer=False, header="PES min", hparam=True, table="PES min"),
    _M("pes_mean", per_layer=False),
)}


def register(metric):
  """Adds (or replaces) `metric` in METRICS; returns it."""
  METRICS[metric.name] = metric
  return metric


def compute(sums, router_kernels=None, layer_ids=None):
  """The registry's metrics of one evaluation as a flat dict of Python floats.

  Args:
    sums: list of dicts from `step.eval_step` (see EvalInputs).
    router_kernels: float[Lm, D, E] router kernels or None (no orthogonality metrics).
    layer_ids: block index of each MoE layer (default 0..Lm-1), used in the metric names.
  Returns:
    {"eval/<name>": float} for every computable metric, and for per-layer metrics
    `eval/layer_<i>/<name>` per MoE layer with `eval/<name>` their mean over layers.
  """
  x = EvalInputs(sums, router_kernels)
  n_moe = None if x.load is None else x.load.shape[0]
  if n_moe is not None:
    layer_ids = list(range(n_moe)) if layer_ids is None else list(layer_ids)
  out = {}
  for m in METRICS.values():
    if m.fn is None or (m.per_layer and n_moe is None):
      continue
    if any(getattr(x, need) is None for need in m.needs):
      continue
    value = m.fn(x)
    if not m.per_layer:
      out[m.key] = float(value)
      continue
    values = np.asarray(value, np.float64).reshape(n_moe)
    out.update({f"eval/layer_{i}/{m.name}": float(v) for i, v in zip(layer_ids, values)})
    out[m.key] = float(values.mean())
  return out


def summary_columns():
  """(header, key) of the metrics shown in a run's final-metrics table, in registry order."""
  return tuple((m.header, m.key) for m in METRICS.values() if m.header)


def hparam_metrics():
  """The keys shown in TensorBoard's hyperparameter panel."""
  return tuple(m.key for m in METRICS.values() if m.hparam)


def table_metrics():
  """The metrics shown in the convergence table's routing table, in registry order."""
  return tuple(m for m in METRICS.values() if m.table)


# ----------------------------------------------------------------------------------------------
# Routing health (issue 19): appended in one block.

register(EvalMetric(
    "undecided", lambda x: x.undecided / max(x.tokens, 1.0), needs=("undecided",),
    header="undecided", table="undecided"))  # share of tokens: top-1 prob < 1/E + delta
