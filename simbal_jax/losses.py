"""Auxiliary and language-model losses for sparse MoE training, as plain functions of arrays.

Imports only jax (and `simbal_jax.routing`). Every loss computes in float32 whatever the input
dtype (bf16 is upcast; float64 inputs under x64 stay float64, for gradient checks), returns a
float32 scalar (or one value per leading index where stated), and works under `jit`, `vmap`,
`grad`, and inside `shard_map` / `pmap` (the functions with `axis_name` `psum` their partial
sums over that named axis). Coefficients (alpha) are applied by the caller.

Load-balancing loss (LBL), Switch / OLMoE form, in OUR normalisation::

    LBL = E * sum_i f_i * P_i,   f_i = (#assignments to expert i) / (K * #tokens),
                                 P_i = mean over tokens of probs[t, i].

`sum_i f_i = sum_i P_i = 1`, so a perfectly uniform router (P_i = 1/E, or f_i = 1/E) gives
exactly 1.0 and any router gives >= 1 when f = P (OLMo-core / Megatron convention).
flaxformer, MaxText and Hugging Face transformers count f without the 1/K (their f sums to K) and
report K times our value (K for a uniform router): multiply by `top_k` to compare. f comes from
the top-k membership (integers), so the gradient flows only through P:
`d LBL / d probs[t, i] = E * f_i / T`.

SimBal (Omi, Sen, Farhadi 2025): `||R^T R - I_E||_1`, the entry-wise absolute sum over the E x E
Gram matrix of the router kernel R (x @ R = scores), see `simbal`.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from simbal_jax import _checks
from simbal_jax import routing

SCOPES = ("sequence", "batch", "global", "micro")
SIMBAL_NORMS = ("l1", "fro2")
SIMBAL_REDUCTIONS = ("sum", "mean")


def _upcast(x):
  """x as float32, or float64 if it already is (for float64 gradient checks under x64)."""
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _psum(x, axis_name):
  return x if axis_name is None else jax.lax.psum(x, axis_name)


# ----------------------------------------------------------------------------------------------
# Load balancing.


class LBLStats(NamedTuple):
  """Additive partial sums behind the LBL; combine shards / micro-batches with `combine_stats`.

  (Do not use `+` on two LBLStats: NamedTuple `+` concatenates.)

  Attributes:
    assigned: float32[..., E] sum over (masked) tokens of the top-k membership mask
      (`routing.expert_counts`); sums to K * tokens.
    prob_sum: float32[..., E] sum over (masked) tokens of `probs`.
    tokens: float32[...] number of (masked) tokens.
  """
  assigned: jax.Array
  prob_sum: jax.Array
  tokens: jax.Array


def lbl_stats(probs_TxE, expert_index_TxK, mask_T=None):
  """Partial LBL statistics of one micro-batch / shard.

  Args:
    probs_TxE: float[T, E] per-expert router probabilities (`RouterOutput.probs`).
    expert_index_TxK: int[T, K] chosen experts (before capacity drops).
    mask_T: bool/float[T] token weights (0 = padding), or None.

  Returns:
    LBLStats with assigned/prob_sum float32[E] and tokens float32[].
  """
  if jnp.ndim(probs_TxE) != 2 or jnp.ndim(expert_index_TxK) != 2:
    raise ValueError(f"probs_TxE and expert_index_TxK must have rank 2, got shapes "
                     f"{jnp.shape(probs_TxE)} and {jnp.shape(expert_index_TxK)}.")
  num_tokens, num_experts = jnp.shape(probs_TxE)
  if jnp.shape(expert_index_TxK)[0] != num_tokens:
    raise ValueError(f"expert_index_TxK has {jnp.shape(expert_index_TxK)[0]} tokens, probs_TxE "
                     f"{num_tokens}.")
  top_k = jnp.shape(expert_index_TxK)[1]
  if not 1 <= top_k <= num_experts:
    raise ValueError(f"top_k (expert_index_TxK.shape[1]) must be in [1, {num_experts}], got "
                     f"{top_k}.")
  _checks.check_mask("mask_T", mask_T, (num_tokens,))
  probs_TxE = _upcast(probs_TxE)
  weight_T = (jnp.ones((num_tokens,), jnp.float32) if mask_T is None
              else jnp.asarray(mask_T, jnp.float32))
  assigned_E = jax.lax.stop_gradient(routing.expert_counts(expert_index_TxK, num_experts, mask_T))
  return LBLStats(assigned=assigned_E, prob_sum=weight_T @ probs_TxE, tokens=jnp.sum(weight_T))


def combine_stats(*stats):
  """Sums LBLStats leaf by leaf (shards, micro-batches). Returns LBLStats."""
  if not stats:
    raise ValueError("combine_stats needs at least one LBLStats.")
  return jax.tree.map(lambda *xs: sum(xs[1:], xs[0]), *stats)


def expert_fraction_from_stats(stats, top_k):
  """f_i = assigned_i / (K * tokens): share of routed slots per expert, float32[..., E].

  Stop-gradient; sums to 1 (0 for an empty batch). Pass the global-batch value to
  `lbl_from_stats(..., expert_fraction=f)` to get exact accumulated gradients.
  """
  den = top_k * jnp.asarray(stats.tokens, jnp.float32)[..., None]
  return jax.lax.stop_gradient(_checks.safe_div(jnp.asarray(stats.assigned, jnp.float32), den))


def lbl_from_stats(stats, top_k, *, expert_fraction=None, total_tokens=None):
  """LBL = E * sum_i f_i * P_i from (possibly combined) statistics.

  With the defaults, `f = assigned / (K * tokens)` and `P = prob_sum / tokens`; the value and
  gradient are those of the batch the stats cover (`d / d prob_sum_i = E * f_i / tokens`).

  Exact gradients under gradient accumulation over micro-batches m (all of T_G tokens):
  a per-micro-batch call gives the value `E sum_i f^m_i P^m_i` and the gradient
  `d / d probs[t, i] = E * f^m_i / T_m` - the micro-batch's own f, not the global f^G, so the
  sum (or token-weighted mean) of micro-batch losses has neither the global value nor the global
  gradient `E * f^G_i / T_G`. The global VALUE is exact from `combine_stats` of all micro-batch
  stats. The global GRADIENT needs f^G, known only after every micro-batch is routed: obtain it
  from a forward-only pass (`expert_fraction_from_stats(combine_stats(...), K)`), or use the
  previous step's as an approximation, then per micro-batch use
  `lbl_from_stats(stats_m, K, expert_fraction=f_G, total_tokens=T_G)`; these terms are linear in
  `prob_sum` and SUM over micro-batches to exactly the global LBL value and gradient.

  Args:
    stats: LBLStats with leaves [..., E], [..., E], [...] (leading dims, e.g. layers, broadcast).
    top_k: static int K >= 1.
    expert_fraction: float[..., E] externally computed f (stop-gradient applied), or None.
    total_tokens: float scalar/[...] normaliser of P instead of `stats.tokens`, or None.

  Returns:
    float32[...] (a scalar for [E] stats); 0 where there are no tokens.
  """
  top_k = _checks.static_int("top_k", top_k, 1)
  num_experts = jnp.shape(stats.assigned)[-1]
  if expert_fraction is None:
    f_E = expert_fraction_from_stats(stats, top_k)
  else:
    if jnp.shape(expert_fraction)[-1:] != (num_experts,):
      raise ValueError(f"expert_fraction must have shape [..., {num_experts}], got "
                       f"{jnp.shape(expert_fraction)}.")
    f_E = jax.lax.stop_gradient(_upcast(expert_fraction))
  tokens = jnp.asarray(stats.tokens if total_tokens is None else total_tokens, jnp.float32)
  p_E = _checks.safe_div(_upcast(stats.prob_sum), tokens[..., None])
  return num_experts * jnp.sum(f_E * p_E, axis=-1)


def load_balancing(probs, expert_index, *, scope="batch", axis_name=None, mask=None,
                   expert_fraction=None, return_stats=False, micro_sequences=None):
  """Switch / OLMoE load-balancing loss `E * sum_i f_i * P_i` (1.0 for a uniform router).

  Scopes (where f and P are averaged):

  * "sequence": `probs` float[B, L, E], `expert_index` int[B, L, K], `mask` [B, L]: the loss of
    each sequence from its own f and P, then the mean over sequences that have a token.
  * "micro": the same shapes; the B sequences are cut into B / m groups of m = `micro_sequences`
    consecutive sequences (sequences 0..m-1, m..2m-1, ...), the loss of each group from its own
    f and P over its m * L tokens, then the mean over groups that have a token. m = 1 is
    "sequence", m = B is "batch". This is the LBL of data-parallel training that computes it on
    each device's micro-batch of m sequences (OLMoE), but defined by the sequences alone, so
    the value does not change with the mesh or the number of devices. B must be a multiple of
    m (else ValueError).
  * "batch": all tokens given, any leading shape `probs` [..., E], `expert_index` [..., K]. Under
    `jit` on globally sharded arrays this already is the global batch; inside `shard_map` /
    `pmap` it is the local shard (a micro-batch).
  * "global": like "batch", but the statistics are `psum`-ed over `axis_name` (str or tuple of
    mesh axis names) when given, so every shard sees the global-batch f and P; the value equals
    the unsharded "batch" value. Gradients: inside `shard_map` (check_vma=True) `jax.grad` of
    this value w.r.t. a shard's probs is exactly the slice of the unsharded gradient
    (`E * f^G_i / T_G`), so shards' parameter gradients add (psum). Under `pmap` the transpose
    of `psum` makes each device's gradient `axis_size` times larger, which the usual `pmean` of
    gradients cancels. Across gradient-accumulation steps, return the stats
    (`return_stats=True`), add them with `combine_stats` and call `lbl_from_stats` for the exact
    value; see `lbl_from_stats` for the gradient and the exact-gradient recipe.

  The gradient flows only through P: `d / d probs[t, i] = E * f_i / T` (f from the top-k
  membership, or `expert_fraction`, is constant).

  Args:
    probs: float[..., E] router probabilities (rows sum to 1), e.g. `RouterOutput.probs`.
    expert_index: int[..., K] chosen experts, same leading shape as `probs`.
    scope: one of `SCOPES`.
    axis_name: named axis (str or tuple) to psum over; only with scope "global".
    mask: bool/float[...] token weights with the leading shape of `probs`, or None.
    expert_fraction: float32[E] externally computed f (stop-gradient), e.g. the global-batch f
      under gradient accumulation; "batch" and "global" scopes only.
    return_stats: also return the LBLStats used (per sequence, leading [B], for "sequence";
      per group, leading [B / m], for "micro").
    micro_sequences: static int m >= 1 dividing B, sequences per group; only with scope "micro".

  Returns:
    float32[] loss, or (loss, LBLStats) with `return_stats=True`.
  """
  _checks.check_name("scope", scope, SCOPES)
  if axis_name is not None and scope != "global":
    raise ValueError(f"axis_name is only used with scope='global', got scope={scope!r}.")
  per_seq = scope in ("sequence", "micro")
  shape, index_shape = jnp.shape(probs), jnp.shape(expert_index)
  if len(shape) < 2 or (per_seq and len(shape) != 3):
    want = "rank 3 [B, L, E]" if per_seq else "rank >= 2 [..., E]"
    raise ValueError(f"probs must have {want} for scope={scope!r}, got shape {shape}.")
  if len(index_shape) != len(shape) or index_shape[:-1] != shape[:-1]:
    raise ValueError(f"expert_index must have shape {shape[:-1]} + (K,), got {index_shape}.")
  top_k = index_shape[-1]
  _checks.check_mask("mask", mask, shape[:-1])
  if expert_fraction is not None and per_seq:
    raise ValueError("expert_fraction is only supported for scopes 'batch' and 'global'.")
  if scope != "micro" and micro_sequences is not None:
    raise ValueError(f"micro_sequences is only used with scope='micro', got scope={scope!r}.")
  if scope == "micro":
    if micro_sequences is None:
      raise ValueError("micro_sequences must be given for scope='micro' (sequences per group).")
    m = _checks.static_int("micro_sequences", micro_sequences, 1)
    b, l = shape[:2]
    if b % m:
      raise ValueError(f"micro_sequences={m} does not divide the batch's {b} sequences: the "
                       "groups of m consecutive sequences would be uneven.")
    # Each group of m sequences becomes one "sequence" of m * L tokens (sequence-major order).
    probs = jnp.reshape(probs, (b // m, m * l, shape[-1]))
    expert_index = jnp.reshape(expert_index, (b // m, m * l, top_k))
    mask = None if mask is None else jnp.reshape(mask, (b // m, m * l))

  if per_seq:
    stats = jax.vmap(lbl_stats)(probs, expert_index, mask)
    per_seq_B = lbl_from_stats(stats, top_k)
    has_tokens_B = (stats.tokens > 0).astype(jnp.float32)
    loss = _checks.safe_div(jnp.sum(per_seq_B * has_tokens_B), jnp.sum(has_tokens_B))
  else:
    stats = lbl_stats(jnp.reshape(probs, (-1, shape[-1])), jnp.reshape(expert_index, (-1, top_k)),
                      None if mask is None else jnp.reshape(mask, (-1,)))
    if scope == "global" and axis_name is not None:
      stats = jax.tree.map(lambda x: jax.lax.psum(x, axis_name), stats)
    loss = lbl_from_stats(stats, top_k, expert_fraction=expert_fraction)
  return (loss, stats) if return_stats else loss


# ----------------------------------------------------------------------------------------------
# z-losses and cross-entropy.


def _z_loss(logits, mask, axis_name, name):
  _checks.check_min_rank(name, logits, 2, "[..., classes]")
  _checks.check_mask("mask", mask, jnp.shape(logits)[:-1])
  lse = jax.nn.logsumexp(_upcast(logits), axis=-1)
  return _checks.masked_mean(lse**2, mask, axis_name)


def router_z_loss(logits_TxE, mask=None, *, axis_name=None):
  """ST-MoE router z-loss: mean over tokens of `logsumexp_e(logits[t, e])^2`.

  Args:
    logits_TxE: float[..., E] raw router scores (any leading token dims; float32 inside).
    mask: bool/float[...] token weights (leading shape of the logits), or None.
    axis_name: named axis to psum numerator and token count over (exact cross-shard mean).

  Returns:
    float32[] weighted mean (0 if the mask is all zero).
  """
  return _z_loss(logits_TxE, mask, axis_name, "logits_TxE")


def logit_z_loss(logits, mask=None, *, axis_name=None):
  """Output-logit z-loss (PaLM / OLMo 2): mean over tokens of `logsumexp_v(logits[..., v])^2`.

  Args:
    logits: float[..., V] LM-head logits (float32 inside).
    mask: bool/float[...] token weights, or None.
    axis_name: named axis to psum numerator and token count over.

  Returns:
    float32[] weighted mean.
  """
  return _z_loss(logits, mask, axis_name, "logits")


def cross_entropy(logits_BxLxV, targets_BxL, mask_BxL=None, *, axis_name=None):
  """Mean next-token cross-entropy and the logit z-loss term, sharing one logsumexp.

  `ce[t] = logsumexp(logits[t]) - logits[t, target[t]]`, `z[t] = logsumexp(logits[t])^2`;
  both are weighted means over tokens (natural log, float32).

  Args:
    logits_BxLxV: float[..., V] logits (any leading dims, bf16 allowed; float32 inside).
    targets_BxL: int[...] target ids in [0, V), shape `logits.shape[:-1]`.
    mask_BxL: bool/float[...] token weights, or None.
    axis_name: named axis to psum numerators and token count over.

  Returns:
    (mean_ce float32[], mean_z float32[]).
  """
  _checks.check_min_rank("logits_BxLxV", logits_BxLxV, 2, "[..., V]")
  if jnp.shape(targets_BxL) != jnp.shape(logits_BxLxV)[:-1]:
    raise ValueError(f"targets_BxL must have shape {jnp.shape(logits_BxLxV)[:-1]}, got "
                     f"{jnp.shape(targets_BxL)}.")
  if not jnp.issubdtype(jnp.result_type(targets_BxL), jnp.integer):
    raise ValueError(f"targets_BxL must be integer, got {jnp.result_type(targets_BxL)}.")
  _checks.check_mask("mask_BxL", mask_BxL, jnp.shape(targets_BxL))
  logits = _upcast(logits_BxLxV)
  lse = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, jnp.asarray(targets_BxL)[..., None], axis=-1)[..., 0]
  return (_checks.masked_mean(lse - target_logit, mask_BxL, axis_name),
          _checks.masked_mean(lse**2, mask_BxL, axis_name))


# ----------------------------------------------------------------------------------------------
# SimBal.


def simbal(kernel, *, norm="l1", normalize=False, reduction="sum"):
  """SimBal orthogonality loss of a router kernel: `||R^T R - I_E||` (paper default: entry-wise L1).

  With R = `kernel` float[..., D, E] (scores = x @ R) and `G = R^T R` (float32[..., E, E],
  computed at HIGHEST matmul precision):

  * norm "l1" (paper): `sum_ij |G_ij - delta_ij|`; equals `torch.norm(W @ W.T - eye, p=1)` for the
    PyTorch weight `W = R^T` of shape [E, D]. Off-diagonals penalise overlapping expert
    directions, the diagonal pulls every column to unit norm.
  * norm "fro2": `sum_ij (G_ij - delta_ij)^2` (squared Frobenius norm, smooth at 0).
  * normalize=True: the cosine Gram matrix of unit columns `R[:, e] / ||R[:, e]||`, so the
    diagonal term vanishes and only directions are penalised.
  * reduction "mean": divide by E * E instead of summing.

  The minimum 0 is reached iff the columns are orthonormal, which needs D >= E. The L1 norm's
  subgradient at an exact zero entry is taken as +1 (`jax.grad(jnp.abs)(0.) == 1`).

  Args:
    kernel: float[..., D, E] router kernel(s) (float32 or bf16; float32 inside); leading dims
      (e.g. stacked layers [Lm, D, E]) give one value each.
    norm: one of `SIMBAL_NORMS`.
    normalize: bool, use unit-norm columns (cosine Gram).
    reduction: one of `SIMBAL_REDUCTIONS`.

  Returns:
    float32[...] (scalar for a single [D, E] kernel).
  """
  _checks.check_name("norm", norm, SIMBAL_NORMS)
  _checks.check_name("reduction", reduction, SIMBAL_REDUCTIONS)
  _checks.check_min_rank("kernel", kernel, 2, "[..., D, E]")
  r = _upcast(kernel)
  num_experts = jnp.shape(r)[-1]
  if normalize:
    r = r * jax.lax.rsqrt(jnp.maximum(jnp.sum(r * r, axis=-2, keepdims=True), 1e-24))
  gram = jnp.einsum("...de,...df->...ef", r, r, precision=jax.lax.Precision.HIGHEST)
  diff = gram - jnp.eye(num_experts, dtype=r.dtype)
  total = jnp.sum(jnp.abs(diff) if norm == "l1" else diff * diff, axis=(-2, -1))
  return total / (num_experts * num_experts) if reduction == "mean" else total


def column_norm_loss(kernel):
  """`sum_e |(R^T R)_ee - 1|`: the diagonal part of SimBal's L1 (column squared norms held at 1).

  The "scale without direction" control of SimBal: it constrains each router column's norm
  (hence the logit scale) exactly as SimBal's diagonal does, with no angular (off-diagonal)
  term. `simbal(R) = column_norm_loss(R) + sum_{i != j} |G_ij|` for the L1 norm.

  Args:
    kernel: float[..., D, E] router kernel(s) (float32 inside); leading dims give one value each.

  Returns:
    float32[...] (scalar for a single [D, E] kernel).
  """
  _checks.check_min_rank("kernel", kernel, 2, "[..., D, E]")
  r = _upcast(kernel)
  return jnp.sum(jnp.abs(jnp.sum(r * r, axis=-2) - 1.0), axis=-1)
