"""Routing metrics for Mixture-of-Experts layers (pure JAX): load, balance, entropy, orthogonality.

Every function is a plain function of arrays: it computes in float32 whatever the input dtype,
works under `jax.jit` (sizes such as `num_experts`, `num_tokens`, `num_pairs` are static Python
ints: bind them with `functools.partial` or `static_argnames`) and validates ranks, shapes and
static ints eagerly with a `ValueError` before anything is traced. Optional token masks are
boolean (or 0/1) arrays; masked-out tokens are excluded from every count and mean.

Load metrics take a per-expert load vector (fractions or counts: CV, MaxVio and dead experts are
scale invariant) and reduce over its last axis, so a stacked `[Lm, E]` gives one value per layer.

Change over training (`routing_churn`, `expert_movement`, `stagnant_experts`) compares the same
tokens' routing, or the same experts' weights, at two points of training. Routing health:
`expert_norms`, `undecided_share`, and `load_tv` (the load shift between two token sets).

The expert-diversity metrics (PES exact and sampled, routing consistency, domain
specialisation) live in `simbal_jax.specialization`.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from simbal_jax import _checks
from simbal_jax import losses


class OrthoGap(NamedTuple):
  """Distance of a router kernel's Gram matrix from the identity.

  l1: float32[...], sum_{i,j} |(R^T R - I)_ij| (the SimBal loss value, paper Eq. 1).
  mse: float32[...], mean_{i,j} (R^T R - I)_ij^2 (the paper's per-layer "(R^T R - I)^2").
  """
  l1: jax.Array
  mse: jax.Array


# ------------------------------------------------------------------------------------ load


def expert_load(expert_index_TxK, num_experts, mask_T=None):
  """Fraction of routed assignments that each expert receives.

  Args:
    expert_index_TxK: int[T, K], the chosen experts of each token (values in [0, E)).
    num_experts: static int E.
    mask_T: optional bool[T]; False tokens are not counted.

  Returns:
    float32[E], load_e = #assignments to e / #assignments (sums to 1; all zeros when no token
    is valid). A perfectly balanced router gives 1/E everywhere.
  """
  num_experts = _checks.static_int("num_experts", num_experts, 1)
  index = _checks.check_index("expert_index", expert_index_TxK, 2, "[T, K]")
  return _expert_load(index, _checks.bool_mask("mask_T", mask_T, index.shape[:1]), num_experts)


@functools.partial(jax.jit, static_argnums=2)
def _expert_load(index_TxK, mask_T, num_experts):
  # Masked assignments go to a sentinel bin E that is dropped; int32 counts stay exact.
  index = jnp.where(mask_T[:, None], index_TxK, num_experts).reshape(-1)
  counts = jnp.bincount(index, length=num_experts + 1)[:num_experts].astype(jnp.float32)
  return load_fractions(counts)


def load_fractions(counts_E):
  """Per-expert counts float[..., E] -> fractions of the routed assignments (rows sum to 1;
  an all-zero row stays 0)."""
  return counts_E / jnp.maximum(jnp.sum(counts_E, axis=-1, keepdims=True), 1.0)


def load_cv(load_E):
  """Coefficient of variation of the expert load: std / mean over the last axis.

  Args:
    load_E: float32[..., E], per-expert load (fractions or counts).

  Returns:
    float32[...], population std (ddof=0) divided by the mean; 0 for a uniform load, sqrt(E-1)
    when a single expert takes everything. 0 when the load is all zero.
  """
  load = _checks.check_load(load_E)
  mean = jnp.mean(load, axis=-1)
  return jnp.where(mean > 0, jnp.std(load, axis=-1) / jnp.where(mean > 0, mean, 1.0), 0.0)


def max_vio(load_E):
  """MaxVio (Loss-Free balancing, Wang et al. 2024): max load / mean load - 1.

  Args:
    load_E: float32[..., E], per-expert load (fractions or counts).

  Returns:
    float32[...]; 0 for a perfectly uniform load, E - 1 when one expert takes every token.
    0 when the load is all zero.
  """
  load = _checks.check_load(load_E)
  mean = jnp.mean(load, axis=-1)
  return jnp.where(mean > 0, jnp.max(load, axis=-1) / jnp.where(mean > 0, mean, 1.0) - 1.0, 0.0)


def dead_experts(load_E, threshold=0.0):
  """Number of experts whose load is <= `threshold` (default: experts that got nothing).

  Args:
    load_E: float32[..., E], per-expert load (same units as `threshold`).
    threshold: float, the load at or below which an expert counts as dead.

  Returns:
    int32[...], count over the last axis.
  """
  load = _checks.check_load(load_E)
  return jnp.sum(load <= threshold, axis=-1).astype(jnp.int32)


def load_tv(load_p_E, load_q_E):
  """Total-variation distance of two expert-load distributions: 0.5 * sum_e |p_e - q_e|.

  The load shift between two token sets (e.g. two evaluation sets); each load (fractions or
  counts) is normalised to sum to 1 first (an all-zero row stays 0).

  Args:
    load_p_E: float[..., E], the first set's load (e.g. [Lm, E]: one row per layer).
    load_q_E: float[..., E], the second set's, same shape.

  Returns:
    float32[...] in [0, 1]: 0 for the same distribution, 1 for disjoint supports.
  """
  p, q = _checks.check_load(load_p_E), jnp.asarray(load_q_E, jnp.float32)
  if q.shape != p.shape:
    raise ValueError(f"load_q_E must have the shape of load_p_E {p.shape}, got {q.shape}.")
  norm = lambda x: _checks.safe_div(x, jnp.sum(x, axis=-1, keepdims=True))
  return 0.5 * jnp.sum(jnp.abs(norm(p) - norm(q)), axis=-1)


def seu(expert_index_BxLxK, num_experts, mask_BxL=None):
  """Sequence Expert Utilisation: mean fraction of the experts a sequence uses.

  Args:
    expert_index_BxLxK: int[B, L, K], the chosen experts per token of each sequence; entries
      equal to E mean "no expert" (`routing.padded_index` of a router whose tokens have any
      number of experts: [B, L, E]).
    num_experts: static int E.
    mask_BxL: optional bool[B, L]; masked tokens do not count as using an expert.

  Returns:
    float32[], mean over sequences of (#distinct experts chosen by any valid token of the
    sequence) / E, in [K/E, 1] (1/E .. 1 with padding). Sequences with no valid token are left
    out of the mean (0 if there is none). Low SEU = sequences specialise on few experts.
  """
  num_experts = _checks.static_int("num_experts", num_experts, 1)
  index = _checks.check_index("expert_index", expert_index_BxLxK, 3, "[B, L, K]")
  return _seu(index, _checks.bool_mask("mask_BxL", mask_BxL, index.shape[:2]), num_experts)


@functools.partial(jax.jit, static_argnums=2)
def _seu(index_BxLxK, mask, num_experts):
  batch = index_BxLxK.shape[0]
  index = jnp.where(mask[..., None], index_BxLxK, num_experts).reshape(batch, -1)
  rows = jnp.broadcast_to(jnp.arange(batch)[:, None], index.shape)
  used_BxE = jnp.zeros((batch, num_experts + 1), bool).at[rows, index].set(True)
  frac_B = jnp.sum(used_BxE[:, :num_experts], axis=-1) / num_experts
  return _checks.masked_mean(frac_B.astype(jnp.float32), jnp.any(mask, axis=-1))


def routing_entropy(probs_TxE, mask_T=None):
  """Mean per-token entropy of the router distribution, in nats.

  Args:
    probs_TxE: float32[T, E], router probabilities (rows sum to 1; used as given).
    mask_T: optional bool[T]; masked tokens are left out of the mean.

  Returns:
    float32[], mean_t -sum_e p_te log p_te (0 log 0 = 0). log(E) for a uniform router, 0 for a
    one-hot router.
  """
  probs = _checks.check_rank("probs_TxE", probs_TxE, 2, "[T, E]").astype(jnp.float32)
  mask = _checks.bool_mask("mask_T", mask_T, probs.shape[:1])
  entropy_T = jnp.sum(jax.scipy.special.entr(probs), axis=-1)
  return _checks.masked_mean(entropy_T, mask)


def undecided_share(probs_TxE, delta=0.05, mask_T=None):
  """Share of tokens routed barely above uniform: top-1 probability below 1/E + delta.

  Args:
    probs_TxE: float32[T, E], router probabilities (softmax gating: rows sum to 1).
    delta: float >= 0, the margin above 1/E.
    mask_T: optional bool[T]; masked tokens are left out.

  Returns:
    float32[] in [0, 1], the share of (valid) tokens with max_e p_te < 1/E + delta.
  """
  probs = _checks.check_rank("probs_TxE", probs_TxE, 2, "[T, E]").astype(jnp.float32)
  if not float(delta) >= 0.0:
    raise ValueError(f"delta must be >= 0, got {delta}.")
  undecided = jnp.max(probs, axis=-1) < 1.0 / probs.shape[-1] + delta
  return _checks.masked_mean(undecided.astype(jnp.float32),
                             _checks.bool_mask("mask_T", mask_T, probs.shape[:1]))


def orthogonality_gap(kernel_DxE):
  """Distance of the router kernel's Gram matrix G = R^T R from the identity.

  Args:
    kernel_DxE: float[..., D, E], router kernel(s) R (scores = x @ R); leading dims (e.g. a
      stacked [Lm, D, E]) give one value each.

  Returns:
    OrthoGap(l1=float32[...] sum |G - I|, mse=float32[...] mean (G - I)^2 over the E*E
    entries). Both are 0 iff R has orthonormal columns. These are `losses.simbal` with
    norm="l1" and with norm="fro2", reduction="mean": G in float32 at HIGHEST matmul precision
    (TPU/GPU default precision would round to bfloat16/tf32).
  """
  kernel = jnp.asarray(kernel_DxE).astype(jnp.float32)
  return OrthoGap(l1=losses.simbal(kernel, norm="l1"),
                  mse=losses.simbal(kernel, norm="fro2", reduction="mean"))


# ------------------------------------------------------------------- change over training


def routing_churn(expert_index_a, expert_index_b, mask=None):
  """How much the top-k expert sets of the same tokens changed between two points of training.

  `churn = 1 - mean over tokens t of |S_a(t) & S_b(t)| / K`, with S(t) the set of experts in row
  t of an index array. 0 when every token keeps its experts (in any order), 1 when no token
  keeps any. Rows are top-k choices, so each holds K distinct experts; for a row with repeats,
  |S_a & S_b| counts the entries of a that occur in b.

  Args:
    expert_index_a: int[..., K] chosen experts of T tokens (any leading shape, e.g. [T] or
      [B, L]) at the first point, e.g. `RouterOutput.expert_index`.
    expert_index_b: int[..., K] the same tokens' chosen experts at the second point (same
      shape).
    mask: optional bool[...] (the leading shape); False tokens are left out of the mean.

  Returns:
    float32[] in [0, 1]; 0 when no token is valid. Vmap over a leading layer axis for one value
    per layer.
  """
  a = _checks.check_min_rank("expert_index_a", expert_index_a, 2, "[..., K]")
  b = jnp.asarray(expert_index_b)
  if b.shape != a.shape:
    raise ValueError(f"expert_index_b must have the shape of expert_index_a {a.shape}, got "
                     f"{b.shape}.")
  for name, x in (("expert_index_a", a), ("expert_index_b", b)):
    if not jnp.issubdtype(x.dtype, jnp.integer):
      raise ValueError(f"{name} must have an integer dtype, got {x.dtype}.")
  valid = _checks.bool_mask("mask", mask, a.shape[:-1])
  shared = jnp.sum(jnp.any(a[..., :, None] == b[..., None, :], axis=-1), axis=-1)
  overlap = shared.astype(jnp.float32) / a.shape[-1]
  return jnp.where(jnp.any(valid), 1.0 - _checks.masked_mean(overlap, valid), 0.0)


def assignment_churn(assigned_a, assigned_b, mask=None):
  """`routing_churn` for routers whose tokens have any number of experts (expert choice).

  `churn = 1 - sum_t |S_a(t) & S_b(t)| / sum_t |S_a(t)|`, S(t) the experts token t is assigned
  to: the share of the first point's (token, expert) assignments that are gone at the second.
  When every token has K experts at both points it equals `routing_churn`.

  Args:
    assigned_a: bool[..., E] dense assignment masks (`routing.assignment_mask`) of T tokens
      (any leading shape) at the first point.
    assigned_b: bool[..., E] the same tokens' masks at the second point (same shape).
    mask: optional bool[...] (the leading shape); False tokens are left out.

  Returns:
    float32[] in [0, 1]; 0 when the first point has no assignment of a valid token.
  """
  a = _checks.check_min_rank("assigned_a", assigned_a, 2, "[..., E]").astype(bool)
  b = jnp.asarray(assigned_b).astype(bool)
  if b.shape != a.shape:
    raise ValueError(f"assigned_b must have the shape of assigned_a {a.shape}, got {b.shape}.")
  valid = _checks.bool_mask("mask", mask, a.shape[:-1])[..., None]
  total = jnp.sum(a & valid, dtype=jnp.float32)
  kept = jnp.sum(a & b & valid, dtype=jnp.float32)
  return jnp.where(total > 0, 1.0 - _checks.safe_div(kept, total), 0.0)


def expert_movement(old, new):
  """How far each expert's weights moved, relative to their size before.

  `move_e = sqrt(sum over arrays of ||new[e] - old[e]||^2) / sqrt(sum over arrays of
  ||old[e]||^2)` (Frobenius norms over all of expert e's entries; float32). An expert that no
  token reaches gets no gradient and moves only by weight decay: a value far below its layer's
  others marks it stagnant (`stagnant_experts`).

  Args:
    old: a sequence of arrays float[E, ...] (e.g. one layer's wi_gate, wi_up [E, D, F] and
      wo [E, F, D]), the expert axis first, at the earlier point.
    new: the same arrays, same shapes, at the later point.

  Returns:
    float32[E]; 0 for an expert whose old weights are all zero. Vmap over a leading layer axis
    for [Lm, E].
  """
  old, new = list(old), list(new)
  if not old or len(old) != len(new):
    raise ValueError(f"old and new must be non-empty sequences of the same length, got "
                     f"{len(old)} and {len(new)}.")
  num_experts = None
  diff2 = norm2 = 0.0
  for j, (x, y) in enumerate(zip(old, new)):
    x = _checks.check_min_rank(f"old[{j}]", x, 1, "[E, ...]").astype(jnp.float32)
    y = jnp.asarray(y).astype(jnp.float32)
    if y.shape != x.shape:
      raise ValueError(f"new[{j}] must have the shape of old[{j}] {x.shape}, got {y.shape}.")
    if num_experts is not None and x.shape[0] != num_experts:
      raise ValueError(f"old[{j}] has {x.shape[0]} experts on axis 0, old[0] {num_experts}.")
    num_experts = x.shape[0]
    axes = tuple(range(1, x.ndim))
    diff2 = diff2 + jnp.sum((y - x) ** 2, axis=axes)
    norm2 = norm2 + jnp.sum(x * x, axis=axes)
  return _checks.safe_div(jnp.sqrt(diff2), jnp.sqrt(norm2))


def expert_norms(weights):
  """Each expert's Frobenius norm over all of its arrays: sqrt(sum over arrays ||w[e]||^2).

  Of the gradients, an expert that no token reaches has norm 0 and stands out in its layer.

  Args:
    weights: a non-empty sequence of arrays float[E, ...] with the same E (e.g. one layer's
      wi_gate, wi_up [E, D, F] and wo [E, F, D], or their gradients).

  Returns:
    float32[E].
  """
  ws = [_checks.check_min_rank(f"weights[{j}]", w, 1, "[E, ...]").astype(jnp.float32)
        for j, w in enumerate(weights)]
  if not ws or any(w.shape[0] != ws[0].shape[0] for w in ws):
    raise ValueError(f"weights must be a non-empty sequence of arrays [E, ...] with the same E, "
                     f"got shapes {[w.shape for w in ws]}.")
  return jnp.sqrt(sum(jnp.sum(w * w, axis=tuple(range(1, w.ndim))) for w in ws))


def stagnant_experts(movement_E, rel=0.1):
  """Number of experts whose movement is below `rel` times their layer's median movement.

  Args:
    movement_E: float[..., E] from `expert_movement` (one row per layer).
    rel: float in (0, 1], the fraction of the median below which an expert counts as stagnant.

  Returns:
    int32[...], count over the last axis (0 when the median is 0).
  """
  move = _checks.check_min_rank("movement_E", jnp.asarray(movement_E, jnp.float32), 1, "[..., E]")
  if not 0.0 < float(rel) <= 1.0:
    raise ValueError(f"rel must be in (0, 1], got {rel}.")
  median = jnp.median(move, axis=-1, keepdims=True)
  return jnp.sum(move < rel * median, axis=-1).astype(jnp.int32)


# ---------------------------------------------------------------------------------- summary


def summarize(router_output, num_experts, mask=None, *, seq_len=None):
  """The cheap per-step routing metrics of one MoE layer (or a stack of layers).

  Args:
    router_output: any object with `.probs` float32[T, E] and `.expert_index` int[T, K]
      (e.g. `routing.RouterOutput`), or with a leading layer axis ([Lm, T, E], [Lm, T, K]).
    num_experts: static int E.
    mask: optional bool[T]; padding tokens to leave out.
    seq_len: optional static int L; when given (T = B * L, tokens in sequence-major order)
      "seu" is added.

  Returns:
    dict of float32 scalars ("load_cv", "max_vio", "entropy", and "seu" if seq_len) and an
    int32 "dead_experts" (experts that received no valid token); with a layer axis every value
    has shape [Lm] instead (one per layer).
  """
  probs, index = jnp.asarray(router_output.probs), jnp.asarray(router_output.expert_index)
  if probs.ndim == 3 and index.ndim == 3:
    return jax.vmap(lambda p, i: summarize(_Routed(p, i), num_experts, mask, seq_len=seq_len)
                    )(probs, index)
  if probs.ndim != 2 or index.ndim != 2 or probs.shape[0] != index.shape[0]:
    raise ValueError(f"router_output needs probs [T, E] and expert_index [T, K] (optionally "
                     f"with a leading layer axis), got {probs.shape} and {index.shape}")
  if probs.shape[1] != num_experts:
    raise ValueError(f"probs has {probs.shape[1]} experts but num_experts={num_experts}")
  load_E = expert_load(index, num_experts, mask)
  out = {"load_cv": load_cv(load_E), "max_vio": max_vio(load_E),
         "dead_experts": dead_experts(load_E), "entropy": routing_entropy(probs, mask)}
  if seq_len is not None:
    seq_len = _checks.static_int("seq_len", seq_len, 1)
    if index.shape[0] % seq_len:
      raise ValueError(f"T={index.shape[0]} is not a multiple of seq_len={seq_len}")
    seq_mask = None if mask is None else jnp.asarray(mask).reshape(-1, seq_len)
    out["seu"] = seu(index.reshape(-1, seq_len, index.shape[1]), num_experts, seq_mask)
  return out


class _Routed(NamedTuple):
  probs: jax.Array
  expert_index: jax.Array
