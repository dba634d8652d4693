"""Eval-time analysis: aggregate routing metrics over eval batches, and PES.

`eval_metrics` turns the additive per-batch sums of `step.eval_step` into the flat eval dict:
eval/loss (mean over tokens), eval/loss_se (its standard error over the evaluation sequences),
eval/ppl, and per-MoE-layer routing metrics (`eval/layer_<i>/maxvio`, i = block index) plus their
means over layers (`eval/maxvio`). Load metrics use the expert counts of all eval batches
together; so does domain specialisation (`eval/domain_mi_norm`, I(expert; domain) / H(domain),
when the eval batches carry domain labels: the synthetic source). The metric names are defined
once here (`ROUTING_METRICS`, `SUMMARY_COLUMNS`) for the writer, the summaries and the
experiments.

`layer_pes` computes the paper's PES on a sample of tokens: the inputs of every MoE block are
captured with `flax.linen.intercept_methods` (on a copy of the model without `remat`: the
parameter tree is the same, and a value captured inside `nn.remat` would be a leaked tracer),
then every expert's SwiGLU is run from the stacked parameters on the sampled tokens and
`specialization.pes` averages the pairwise cosines.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from simbal_jax import metrics as metrics_lib
from simbal_jax import model as model_lib
from simbal_jax import moe
from simbal_jax import specialization
from simbal_jax import telemetry


# Per-layer routing metrics of an evaluation: eval/<name> (mean over MoE layers) and
# eval/layer_<i>/<name>.
ROUTING_METRICS = ("maxvio", "load_cv", "dead", "seu", "entropy", "ortho_l1", "ortho_mse",
                   "domain_mi", "domain_mi_norm")
# (header, key) of the final-metrics tables (trainer summary, demo, convergence).
SUMMARY_COLUMNS = (("val loss", "eval/loss"), ("± se", "eval/loss_se"), ("val ppl", "eval/ppl"),
                   ("MaxVio", "eval/maxvio"), ("load CV", "eval/load_cv"), ("SEU", "eval/seu"),
                   ("entropy", "eval/entropy"), ("dead", "eval/dead"),
                   ("ortho L1", "eval/ortho_l1"), ("ortho MSE", "eval/ortho_mse"),
                   ("domain MI", "eval/domain_mi_norm"), ("PES min", "eval/pes_min"))


# A run's per-expert load over training (expert_load.jsonl), beside the other run readers.
read_expert_load = telemetry.read_expert_load


def eval_load(sums):
  """Expert load fractions float64[Lm, E] from the summed eval counts (None for dense)."""
  if "counts" not in sums[0]:
    return None
  counts = np.sum([np.asarray(s["counts"], np.float64) for s in sums], axis=0)
  return counts / np.maximum(counts.sum(-1, keepdims=True), 1.0)


def eval_domain_counts(sums):
  """Summed (domain, expert) counts float64[Lm, D, E] of the eval batches (None without)."""
  if "domain_counts" not in sums[0]:
    return None
  return np.sum([np.asarray(s["domain_counts"], np.float64) for s in sums], axis=0)


def eval_metrics(sums, router_kernels=None, layer_ids=None):
  """Flat eval metrics from per-batch sums.

  Args:
    sums: list of dicts from step.eval_step (host numpy): ce_sum, tokens, seqs, and for MoE
      counts float32[Lm, E], entropy_sum float32[Lm], seu_sum float32[Lm], and with domain
      labels domain_counts float32[Lm, D, E] (gives domain_mi and domain_mi_norm).
    router_kernels: float32[Lm, D, E] or None (orthogonality gap).
    layer_ids: block index of each MoE layer (default 0..Lm-1), used in the metric names.
  Returns:
    dict of python floats.
  """
  tot = lambda k: float(np.sum([np.asarray(s[k], np.float64) for s in sums]))
  tokens = tot("tokens")
  loss = tot("ce_sum") / max(tokens, 1.0)
  out = {"eval/loss": loss, "eval/ppl": float(np.exp(min(loss, 80.0))), "eval/tokens": tokens}
  if "ce_seq" in sums[0]:
    # Every sequence has the same length, so the token mean is the mean of sequence means and
    # its standard error is that of the sequence means (tokens within one are correlated).
    seq = np.concatenate([np.asarray(s["ce_seq"], np.float64).reshape(-1) for s in sums])
    out["eval/sequences"] = float(seq.size)
    out["eval/loss_se"] = float(seq.std(ddof=1) / np.sqrt(seq.size)) if seq.size > 1 else 0.0
  load = eval_load(sums)
  if load is None:
    return out
  n_moe = load.shape[0]
  layer_ids = list(range(n_moe)) if layer_ids is None else list(layer_ids)
  load_j = jnp.asarray(load, jnp.float32)
  per = {
      "load_cv": np.asarray(metrics_lib.load_cv(load_j)),
      "maxvio": np.asarray(metrics_lib.max_vio(load_j)),
      "dead": np.asarray(jax.vmap(metrics_lib.dead_experts)(load_j), np.float64),
      "entropy": np.sum([np.asarray(s["entropy_sum"], np.float64) for s in sums], 0) / tokens,
      "seu": np.sum([np.asarray(s["seu_sum"], np.float64) for s in sums], 0) / max(
          tot("seqs"), 1.0),
  }
  if router_kernels is not None:
    gap = metrics_lib.orthogonality_gap(jnp.asarray(router_kernels, jnp.float32))
    per["ortho_l1"], per["ortho_mse"] = np.asarray(gap.l1), np.asarray(gap.mse)
  domain_counts = eval_domain_counts(sums)
  if domain_counts is not None:
    spec = specialization.specialization_from_counts(domain_counts)
    per["domain_mi"], per["domain_mi_norm"] = np.asarray(spec.mutual_info), np.asarray(
        spec.normalized)
  for name, values in per.items():
    values = np.asarray(values, np.float64).reshape(n_moe)
    for i, v in zip(layer_ids, values):
      out[f"eval/layer_{i}/{name}"] = float(v)
    out[f"eval/{name}"] = float(values.mean())
  return out


def capture_moe_inputs(model, params, tokens_BxL, expert_bias=None):
  """Runs the model and returns the inputs of every MoE block, in layer order.

  Args:
    model: model.Transformer (with or without remat). params: its parameters.
    tokens_BxL: int32[B, L].
    expert_bias: float32[Lm, E] or None.
  Returns:
    list of (module path tuple, float[B, L, D]) per MoE block.
  """
  # nn.remat traces the block in its own scope: an input captured there is a tracer that
  # escapes. Remat does not change parameters or values, so run the model without it.
  model = model_lib.Transformer(dataclasses.replace(model.config, remat=False))
  captured = []

  def interceptor(next_fun, args, kwargs, context):
    if isinstance(context.module, moe.MoEBlock) and context.method_name == "__call__":
      captured.append((tuple(context.module.path), args[0]))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    model.apply({"params": params}, tokens_BxL,
                expert_bias=expert_bias if model.config.moe is not None else None)
  return captured


def all_expert_outputs(block_params, x_TxD):
  """Every expert's SwiGLU output for every token.

  Args:
    block_params: the MoE block's params (wi_gate, wi_up float[E, D, F], wo float[E, F, D]).
    x_TxD: float[T, D] block inputs.
  Returns:
    float32[T, E, D].
  """
  p = nn.unbox(block_params)
  x = x_TxD.astype(jnp.float32)
  hp = jax.lax.Precision.HIGHEST
  g = jnp.einsum("td,edf->tef", x, p["wi_gate"].astype(jnp.float32), precision=hp)
  u = jnp.einsum("td,edf->tef", x, p["wi_up"].astype(jnp.float32), precision=hp)
  return jnp.einsum("tef,efd->ted", jax.nn.silu(g) * u, p["wo"].astype(jnp.float32),
                    precision=hp)


def layer_pes(key, model, params, tokens_BxL, *, num_tokens=256, expert_bias=None):
  """Exact PES (all expert pairs) per MoE layer on `num_tokens` sampled tokens.

  Args:
    key: PRNG key for the token sample.
    model: model.Transformer (MoE). params: its parameters.
    tokens_BxL: int32[B, L] input tokens (e.g. an eval batch).
    num_tokens: int, tokens sampled per layer (same positions for every layer).
    expert_bias: float32[Lm, E] or None.
  Returns:
    dict: pes float64[Lm] per layer, min, mean, num_tokens.
  """
  captured = capture_moe_inputs(model, params, tokens_BxL, expert_bias)
  if not captured:
    raise ValueError("layer_pes: the model has no MoE layer")
  total = int(np.prod(tokens_BxL.shape))
  n = min(int(num_tokens), total)
  idx = jax.random.choice(key, total, (n,), replace=False)
  values = []
  p = nn.unbox(params)
  for path, x_BxLxD in captured:
    block = p
    for name in path:
      block = block[name]
    x_TxD = x_BxLxD.reshape(total, -1)[idx]
    values.append(float(specialization.pes(all_expert_outputs(block, x_TxD))))
  values = np.asarray(values, np.float64)
  return {"pes": values, "min": float(values.min()), "mean": float(values.mean()),
          "num_tokens": n}
