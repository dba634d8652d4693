"""Routing math for sparse Mixture-of-Experts layers: gates, top-k choice, Loss-Free bias, dispatch.

Pure functions of arrays (jax only; no Flax, no optax, no IO). Every function works under `jit`,
`vmap` and `grad`; integer arguments that fix shapes (`top_k`, `num_experts`, `capacity`) are
static Python ints and are validated eagerly with `ValueError` before anything is traced.

Conventions (shape letters as in `simbal_jax/__init__.py`):

* Router scores `logits_TxE = x_TxD @ R_DxE` are float32 (inputs of any float dtype are upcast).
* `RouterOutput.probs` is the per-expert probability P used by balancing losses; every row sums
  to 1. `RouterOutput.gates` are the combine weights of the chosen experts.
* A per-expert Loss-Free bias (Wang et al. 2024, "Auxiliary-Loss-Free Load Balancing") only
  changes *which* experts are chosen; gate values never include it.
* Dispatch is index based (sort / gather / scatter, no `[T, E, C]` one-hot): each assignment
  `a = t * K + k` gets a buffer slot `e * C + position` in a flat buffer of `S = E * C` slots,
  where `position` counts the earlier assignments (in token order) to the same expert. Assignments
  with `position >= C` are dropped. `sorted_plan` is the dropless variant for grouped matmuls:
  S = T * K slots sorted by expert, plus per-expert group sizes.
"""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from simbal_jax import _checks

GATINGS = ("softmax_topk", "topk_softmax", "sigmoid")


class RouterOutput(NamedTuple):
  """Result of `route` for T tokens and E experts, K of them chosen per token.

  Attributes:
    logits: float32[T, E] raw router scores.
    probs: float32[T, E] per-expert probability used by balancing losses (rows sum to 1):
      softmax(logits) for "softmax_topk" and "topk_softmax"; sigmoid(logits) / sum_E
      sigmoid(logits) for "sigmoid".
    gates: float32[T, K] combine weights of the chosen experts (bias-free).
    expert_index: int32[T, K] chosen experts, ordered by descending selection score.
  """
  logits: jax.Array
  probs: jax.Array
  gates: jax.Array
  expert_index: jax.Array


class DispatchPlan(NamedTuple):
  """Index maps for dispatch into a flat buffer of S slots (S = E * C from `dispatch_plan`,
  S = T * K from `sorted_plan`).

  Attributes:
    slot: int32[T, K] buffer slot `e * C + position` of each assignment; equals S (an
      out-of-range sentinel meaning "dropped") for dropped assignments.
    kept: bool[T, K] whether the assignment got a slot (`slot < S`).
    slot_assignment: int32[S] flat assignment index `t * K + k` that fills each slot; T * K
      (sentinel) for an empty slot.
    slot_token: int32[S] token index t feeding each slot (`slot_assignment // K`); T (sentinel)
      for an empty slot.
  """
  slot: jax.Array
  kept: jax.Array
  slot_assignment: jax.Array
  slot_token: jax.Array


# ----------------------------------------------------------------------------------------------
# Gating.


def route(logits_TxE, top_k, *, gating="softmax_topk", renormalize=False, bias_E=None):
  """Turns router scores into per-expert probabilities, chosen experts and their gates.

  With `s` the selection score and `b` the (optional) Loss-Free bias, the chosen experts are
  `expert_index[t] = top_k(s[t] + b)` (descending; ties go to the lower expert index), and:

  * "softmax_topk" (paper, OLMoE, Switch): `p = softmax(logits)`, `s = p`,
    `gates[t, k] = p[t, expert_index[t, k]]`; the K gates sum to `sum of the K largest p <= 1`.
    With `renormalize=True` they are divided by their sum (sum 1).
  * "topk_softmax" (Mixtral): `s = logits`, `gates[t] = softmax(logits[t, expert_index[t]])`
    over the K chosen *unbiased* logits (sum 1). `probs = softmax(logits)` over all E.
  * "sigmoid" (DeepSeek-V3): `sig = sigmoid(logits)`, `s = sig`,
    `gates[t] = sig[t, chosen] / sum(sig[t, chosen])` (sum 1);
    `probs = sig / sum_E sig` (rows sum to 1, for balancing losses).

  The bias enters only the choice: gates are the unbiased quantities above evaluated at the
  chosen experts, so gradients never flow into the bias. `renormalize` has no effect for
  "topk_softmax" and "sigmoid", whose gates already sum to 1.

  Args:
    logits_TxE: float[T, E] router scores (bf16 etc. computed in float32; float64 stays). Rank 2:
      callers flatten batch and length first.
    top_k: static int K, 1 <= K <= E.
    gating: one of `GATINGS`.
    renormalize: bool; "softmax_topk" only: divide the K gates by their sum.
    bias_E: float32[E] Loss-Free selection bias, or None.

  Returns:
    RouterOutput with logits/probs float32[T, E], gates float32[T, K], expert_index int32[T, K].

  Raises:
    ValueError: bad rank, top_k out of range, unknown gating, or bias of the wrong shape.
  """
  _checks.check_name("gating", gating, GATINGS)
  _checks.check_rank("logits_TxE", logits_TxE, 2, "[T, E]")
  num_experts = jnp.shape(logits_TxE)[1]
  top_k = _checks.static_int("top_k", top_k, 1, num_experts)
  if bias_E is not None and jnp.shape(bias_E) != (num_experts,):
    raise ValueError(f"bias_E must have shape ({num_experts},), got {jnp.shape(bias_E)}.")

  logits_TxE = jnp.asarray(logits_TxE)
  logits_TxE = logits_TxE.astype(jnp.promote_types(logits_TxE.dtype, jnp.float32))
  if gating == "sigmoid":
    sig_TxE = jax.nn.sigmoid(logits_TxE)
    probs_TxE = sig_TxE / jnp.sum(sig_TxE, axis=-1, keepdims=True)
    score_TxE = sig_TxE
  else:
    probs_TxE = jax.nn.softmax(logits_TxE, axis=-1)
    score_TxE = probs_TxE if gating == "softmax_topk" else logits_TxE

  select_TxE = jax.lax.stop_gradient(score_TxE)
  if bias_E is not None:
    select_TxE = select_TxE + jax.lax.stop_gradient(jnp.asarray(bias_E, jnp.float32))
  _, expert_index_TxK = jax.lax.top_k(select_TxE, top_k)
  expert_index_TxK = expert_index_TxK.astype(jnp.int32)

  chosen_TxK = jnp.take_along_axis(score_TxE, expert_index_TxK, axis=-1)
  if gating == "softmax_topk":
    gates_TxK = chosen_TxK
    if renormalize:
      gates_TxK = gates_TxK / jnp.sum(gates_TxK, axis=-1, keepdims=True)
  elif gating == "topk_softmax":
    gates_TxK = jax.nn.softmax(chosen_TxK, axis=-1)
  else:
    gates_TxK = chosen_TxK / jnp.sum(chosen_TxK, axis=-1, keepdims=True)
  return RouterOutput(logits=logits_TxE, probs=probs_TxE, gates=gates_TxK,
                      expert_index=expert_index_TxK)


def expert_counts(expert_index_TxK, num_experts, mask_T=None):
  """Number of assignments per expert (before capacity drops).

  `counts[e] = sum_t mask[t] * #{k : expert_index[t, k] == e}`; without a mask
  `sum_e counts[e] = T * K`.

  Args:
    expert_index_TxK: int[T, K] chosen experts in [0, E).
    num_experts: static int E >= 1.
    mask_T: bool/float[T] token weights (1 = real token, 0 = padding), or None.

  Returns:
    float32[E] assignment counts.
  """
  _checks.check_rank("expert_index_TxK", expert_index_TxK, 2, "[T, K]")
  num_experts = _checks.static_int("num_experts", num_experts, 1)
  num_tokens, top_k = jnp.shape(expert_index_TxK)
  _checks.check_mask("mask_T", mask_T, (num_tokens,))
  if mask_T is None:
    weight_TxK = jnp.ones((num_tokens, top_k), jnp.float32)
  else:
    weight_TxK = jnp.broadcast_to(jnp.asarray(mask_T, jnp.float32)[:, None], (num_tokens, top_k))
  return jnp.zeros((num_experts,), jnp.float32).at[expert_index_TxK.reshape(-1)].add(
      weight_TxK.reshape(-1), mode="drop")


def loss_free_update(bias, counts, rate):
  """One Loss-Free balancing step: `b <- b + rate * sign(mean(counts) - counts)`.

  Under-loaded experts (count below the mean) get their bias raised by `rate`, over-loaded ones
  lowered; experts exactly at the mean are unchanged. The mean is over the last (expert) axis,
  so stacked per-layer state `[Lm, E]` is updated layer by layer. `counts` must cover the whole
  global batch (sum over data-parallel shards and accumulation steps): that is the caller's job.
  The update is not differentiated; apply it after the optimizer step.

  Args:
    bias: float32[..., E] current bias.
    counts: float[..., E] assignments per expert (same shape as `bias`).
    rate: float scalar update rate gamma (e.g. 1e-3).

  Returns:
    Array with the shape and dtype of `bias`.
  """
  if jnp.shape(bias) != jnp.shape(counts) or jnp.ndim(bias) < 1:
    raise ValueError(f"bias and counts must have the same shape [..., E], got "
                     f"{jnp.shape(bias)} and {jnp.shape(counts)}.")
  if jnp.ndim(rate) != 0:
    raise ValueError(f"rate must be a scalar, got shape {jnp.shape(rate)}.")
  counts = jnp.asarray(counts, jnp.float32)
  step = jnp.sign(jnp.mean(counts, axis=-1, keepdims=True) - counts)
  bias = jnp.asarray(bias)
  return (bias + rate * step).astype(bias.dtype)


# ----------------------------------------------------------------------------------------------
# Capacity and dispatch.


def capacity(num_tokens, num_experts, top_k, capacity_factor):
  """Static per-expert capacity C.

  `C = ceil(T * K / E * capacity_factor)` clipped to `[1, T]` (a relative tolerance of 1e-9
  absorbs float round-off, so `T*K/E = 10, factor 1.1` gives 11). `capacity_factor` None or
  <= 0 means "no drops": `C = T`, enough because a token sends at most one assignment to an
  expert (top-k experts are distinct).

  Args:
    num_tokens: static int T >= 1 (tokens dispatched together, e.g. per data shard).
    num_experts: static int E >= 1.
    top_k: static int K, 1 <= K <= E.
    capacity_factor: float or None.

  Returns:
    Python int C.
  """
  num_tokens = _checks.static_int("num_tokens", num_tokens, 1)
  num_experts = _checks.static_int("num_experts", num_experts, 1)
  top_k = _checks.static_int("top_k", top_k, 1, num_experts)
  if capacity_factor is None or capacity_factor <= 0:
    return num_tokens
  ideal = num_tokens * top_k / num_experts * float(capacity_factor)
  return int(min(num_tokens, max(1, math.ceil(ideal * (1.0 - 1e-9)))))


# pylint: disable-next=redefined-outer-name
def dispatch_plan(expert_index_TxK, num_experts, capacity, *, mask_T=None):
  """Assigns every (token, k) pair a slot in a flat `[E * C]` buffer, dropping overflow.

  Priority is token order over the flattened assignments `a = t * K + k`: the position of `a` in
  expert `e = expert_index[t, k]` is the number of earlier assignments `a' < a` to `e`, and `a` is
  kept iff `position < C`. Implemented with one stable argsort over the T * K expert ids (no
  `[T * K, E]` one-hot cumsum): sorted order groups assignments by expert, token order within;
  `position = rank in sorted order - first rank of its expert`. Slots of expert e are filled
  contiguously from `e * C`, so `slot_assignment` needs only a gather.

  Masked tokens (`mask_T[t] == 0`, e.g. padding) are dropped and use no capacity.

  Args:
    expert_index_TxK: int[T, K] chosen experts in [0, E) (values outside give undefined slots).
    num_experts: static int E >= 1.
    capacity: static int C >= 1 (see `capacity`).
    mask_T: bool[T] real-token mask, or None (all tokens real).

  Returns:
    DispatchPlan; with S = E * C, `slot[t, k] == S` and `kept[t, k] == False` for dropped
    assignments, and `slot_assignment` / `slot_token` hold T * K / T for empty slots.
  """
  _checks.check_rank("expert_index_TxK", expert_index_TxK, 2, "[T, K]")
  num_experts = _checks.static_int("num_experts", num_experts, 1)
  cap = _checks.static_int("capacity", capacity, 1)
  num_tokens, top_k = jnp.shape(expert_index_TxK)
  _checks.check_mask("mask_T", mask_T, (num_tokens,))
  num_assign = num_tokens * top_k
  num_slots = num_experts * cap

  expert_A = jnp.asarray(expert_index_TxK, jnp.int32).reshape(-1)
  if mask_T is not None:
    valid_A = jnp.repeat(jnp.asarray(mask_T).astype(bool), top_k)
    # Masked assignments go to a virtual expert E that sorts after all real ones.
    expert_A = jnp.where(valid_A, expert_A, num_experts)
  order_A = jnp.argsort(expert_A, stable=True).astype(jnp.int32)  # sorted rank -> assignment
  counts_E1 = jnp.zeros((num_experts + 1,), jnp.int32).at[expert_A].add(1, mode="drop")
  starts_E1 = jnp.cumsum(counts_E1) - counts_E1  # first sorted rank of each expert
  sorted_expert_A = expert_A[order_A]
  position_sorted_A = jnp.arange(num_assign, dtype=jnp.int32) - starts_E1[sorted_expert_A]
  position_A = jnp.zeros((num_assign,), jnp.int32).at[order_A].set(
      position_sorted_A, unique_indices=True)

  kept_A = (position_A < cap) & (expert_A < num_experts)
  slot_A = jnp.where(kept_A, expert_A * cap + position_A, num_slots).astype(jnp.int32)

  # Slot s = e * C + p holds the assignment of sorted rank starts[e] + p, if p < counts[e].
  slot_expert_S = jnp.repeat(jnp.arange(num_experts, dtype=jnp.int32), cap)
  slot_pos_S = jnp.tile(jnp.arange(cap, dtype=jnp.int32), num_experts)
  filled_S = slot_pos_S < counts_E1[slot_expert_S]
  rank_S = jnp.minimum(starts_E1[slot_expert_S] + slot_pos_S, num_assign - 1)
  slot_assignment_S = jnp.where(filled_S, order_A[rank_S], num_assign).astype(jnp.int32)
  slot_token_S = jnp.where(filled_S, slot_assignment_S // top_k, num_tokens).astype(jnp.int32)
  return DispatchPlan(slot=slot_A.reshape(num_tokens, top_k),
                      kept=kept_A.reshape(num_tokens, top_k),
                      slot_assignment=slot_assignment_S, slot_token=slot_token_S)


def sorted_plan(expert_index_TxK, num_experts, expert_offset=0, num_slots=None):
  """Dropless dispatch plan: the T * K assignments sorted by expert into S = T * K slots.

  Slot s holds the assignment of rank s in a stable sort of the flattened expert ids
  (`a = t * K + k`), so expert e owns the contiguous slots `[start_e, start_e + group_sizes[e])`
  with `start_e = sum_{e' < e} group_sizes[e']`, tokens in order within it: the layout
  `jax.lax.ragged_dot` expects. Nothing is dropped, so the plan feeds the same gather-only
  dispatch / combine as `dispatch_plan` does (with S = T * K instead of E * C).

  Expert parallelism: with `expert_offset` o, only the experts `[o, o + num_experts)` are held
  here (group e of the result is expert o + e). Their assignments fill the first slots in the
  same sorted order; every other assignment gets the sentinel slot S (computed elsewhere) and
  the slots after the held ones are empty. With o = 0 and every expert held this is the plain
  plan above. `num_slots` S < T * K bounds the buffer: held assignments of sorted rank >= S are
  dropped (`kept` False, group sizes clipped to the first S rows).

  Args:
    expert_index_TxK: int[T, K] chosen experts in [0, E) (values outside the held range are
      "elsewhere").
    num_experts: static int >= 1, experts held here (E without expert parallelism).
    expert_offset: int or int32[] scalar (may be traced, e.g. `axis_index * num_experts`), the
      first held expert.
    num_slots: static int S in [1, T * K], buffer rows; None: T * K (dropless).

  Returns:
    (plan, group_sizes) where plan is a DispatchPlan over S slots: `slot` int32[T, K] the
    sorted rank of each held assignment (S for one held elsewhere or dropped), `kept`
    bool[T, K] whether the assignment is held here and fits, `slot_assignment` int32[S] slot
    -> assignment (T * K for an empty slot), `slot_token` int32[S] = `slot_assignment // K`
    (T for an empty slot); group_sizes is int32[num_experts], the kept assignments per held
    expert (sums to T * K when every expert is held and nothing is dropped).
  """
  _checks.check_rank("expert_index_TxK", expert_index_TxK, 2, "[T, K]")
  num_experts = _checks.static_int("num_experts", num_experts, 1)
  num_tokens, top_k = jnp.shape(expert_index_TxK)
  num_assign = num_tokens * top_k
  slots = num_assign if num_slots is None else _checks.static_int("num_slots", num_slots, 1)
  if slots > num_assign:
    raise ValueError(f"num_slots={slots} exceeds the T * K = {num_assign} assignments")

  expert_A = jnp.asarray(expert_index_TxK, jnp.int32).reshape(-1) - expert_offset
  held_A = (expert_A >= 0) & (expert_A < num_experts)
  key_A = jnp.where(held_A, expert_A, num_experts)  # not held: sorted after every held one
  order_A = jnp.argsort(key_A, stable=True).astype(jnp.int32)  # sorted rank -> assignment
  rank_A = jnp.zeros((num_assign,), jnp.int32).at[order_A].set(
      jnp.arange(num_assign, dtype=jnp.int32), unique_indices=True)
  group_sizes_E = jnp.zeros((num_experts,), jnp.int32).at[key_A].add(1, mode="drop")
  if slots < num_assign:  # the first S sorted rows are kept: clip the groups' ends at S
    ends_E = jnp.minimum(jnp.cumsum(group_sizes_E), slots)
    group_sizes_E = jnp.diff(ends_E, prepend=0).astype(jnp.int32)
  filled_S = jnp.arange(slots) < jnp.sum(group_sizes_E)
  slot_assignment_S = jnp.where(filled_S, order_A[:slots], num_assign)
  kept_A = held_A & (rank_A < slots)
  plan = DispatchPlan(slot=jnp.where(kept_A, rank_A, slots).reshape(num_tokens, top_k),
                      kept=kept_A.reshape(num_tokens, top_k),
                      slot_assignment=slot_assignment_S, slot_token=slot_assignment_S // top_k)
  return plan, group_sizes_E


def capacity_buckets(num_tokens, num_experts, top_k, factors):
  """Static capacities for bucketed dropless dispatch: ascending, distinct, the last one T.

  Bucket i is `capacity(T, E, K, factors[i])` (<= T); T is appended, so every per-expert load
  fits the last bucket (a token sends at most one assignment to an expert).

  Args:
    num_tokens: static int T >= 1 (tokens of one routing group).
    num_experts: static int E >= 1.
    top_k: static int K, 1 <= K <= E.
    factors: iterable of floats > 0 (capacity factors of the buckets below T).

  Returns:
    tuple of Python ints, strictly ascending, ending with T.
  """
  caps = {capacity(num_tokens, num_experts, top_k, f) for f in factors if f > 0}
  return tuple(sorted(caps | {_checks.static_int("num_tokens", num_tokens, 1)}))


def max_group_load(expert_index_GxTxK, num_experts):
  """Largest number of assignments any expert receives in any routing group.

  Args:
    expert_index_GxTxK: int[G, T, K] chosen experts in [0, E) per group.
    num_experts: static int E >= 1.

  Returns:
    int32[] `max_{g, e} #{(t, k): expert_index[g, t, k] == e}` (a global reduction: under
    sharding of G every device gets the same value).
  """
  _checks.check_rank("expert_index_GxTxK", expert_index_GxTxK, 3, "[G, T, K]")
  num_experts = _checks.static_int("num_experts", num_experts, 1)
  expert_GxA = jnp.asarray(expert_index_GxTxK, jnp.int32).reshape(
      expert_index_GxTxK.shape[0], -1)
  counts_GxE = jax.vmap(lambda e: jnp.zeros((num_experts,), jnp.int32).at[e].add(
      1, mode="drop"))(expert_GxA)
  return jnp.max(counts_GxE)


def bucket_index(load, capacities):
  """Index of the smallest capacity that holds `load` (the last one if none does).

  Args:
    load: int[] largest per-expert load (`max_group_load`).
    capacities: static ascending tuple of ints (`capacity_buckets`).

  Returns:
    int32[] in [0, len(capacities)): `#{i < n - 1: capacities[i] < load}`.
  """
  below_N = jnp.asarray(capacities[:-1], jnp.int32)
  return jnp.sum(jnp.asarray(load, jnp.int32) > below_N).astype(jnp.int32)
