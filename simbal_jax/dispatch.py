"""Buffer slots of the expert computation: capacities, slot plans, gather-only dispatch / combine.

Pure functions of arrays (jax only). The router's decision (`routing.Assignments`: N rows of M
(token, expert, gate) assignments; token choice: N = T rows of M = K) becomes a `DispatchPlan`:
the buffer slot of each assignment and the assignment / token of each slot. Integer arguments
that fix shapes are static Python ints, validated eagerly with `ValueError`.

* Dispatch is index based (sort / gather / scatter, no `[T, E, C]` one-hot): assignment
  `a = n * M + m` gets the slot `e * C + position` of a flat buffer of `S = E * C` slots, where
  `position` counts the earlier assignments to the same expert; `position >= C` is dropped
  (`dispatch_plan`). `sorted_plan` is the dropless variant for grouped matmuls: S = N * M slots
  sorted by expert, plus per-expert group sizes.
* Rows move by gathers: `to_slots` (dispatch) and `to_tokens` (combine). For token-major rows
  (token choice) they are `dispatch` and `combine`, custom VJPs whose backward passes are
  gathers too (every token has M slots, every slot one token: no scatter, no one-hot). Other
  layouts (expert choice: a token in 0 to E rows) sum each token's rows with a scatter-add.
"""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from simbal_jax import _checks


class DispatchPlan(NamedTuple):
  """Index maps for dispatch into a flat buffer of S slots (S = E * C from `dispatch_plan`,
  S = T * K from `sorted_plan`).

  Shapes are written for token choice ([T, K]: row t holds token t's K assignments); plans of
  other assignments have their rows' shape [N, M], flat index `a = n * M + m`.

  Attributes:
    slot: int32[T, K] buffer slot `e * C + position` of each assignment; equals S (an
      out-of-range sentinel meaning "dropped") for dropped assignments.
    kept: bool[T, K] whether the assignment got a slot (`slot < S`).
    slot_assignment: int32[S] flat assignment index `t * K + k` that fills each slot; T * K
      (sentinel) for an empty slot.
    slot_token: int32[S] token index t feeding each slot (`slot_assignment // K`; for rows that
      are not tokens `with_tokens` looks it up); T (sentinel) for an empty slot.
  """
  slot: jax.Array
  kept: jax.Array
  slot_assignment: jax.Array
  slot_token: jax.Array


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


# ----------------------------------------------------------------------------------------------
# Gather-only dispatch / combine (custom VJPs whose backward passes are gathers as well).


def _take_rows(x_NxD, index):
  """x[index] along axis 0; indices == N (sentinels) read a zero row."""
  return jnp.take(x_NxD, index, axis=0, mode="fill", fill_value=0)


@jax.custom_vjp
def dispatch(x_TxD, slot_token_S, slot_TxK):
  """Gathers tokens into buffer slots: `buf[s] = x[slot_token[s]]`, zero for empty slots.

  Args:
    x_TxD: float[T, D] token features.
    slot_token_S: int32[S] token feeding each slot; T marks an empty slot.
    slot_TxK: int32[T, K] slot of each assignment; S marks a dropped one (used by the backward:
      `dx[t] = sum_k dbuf[slot[t, k]]`).

  Returns:
    float[S, D] buffer rows, dtype of x.
  """
  del slot_TxK
  return _take_rows(x_TxD, slot_token_S)


def _dispatch_fwd(x_TxD, slot_token_S, slot_TxK):
  return _take_rows(x_TxD, slot_token_S), (None, slot_TxK)


def _dispatch_bwd(res, dbuf_SxD):
  _, slot_TxK = res
  rows_TxKxD = _take_rows(dbuf_SxD, slot_TxK).astype(jnp.float32)
  return rows_TxKxD.sum(axis=1).astype(dbuf_SxD.dtype), None, None


dispatch.defvjp(_dispatch_fwd, _dispatch_bwd)


def _combine_fwd_value(y_SxD, gates_TxK, slot_TxK):
  rows_TxKxD = _take_rows(y_SxD, slot_TxK)
  out = jnp.einsum("tkd,tk->td", rows_TxKxD, gates_TxK.astype(y_SxD.dtype),
                   preferred_element_type=jnp.float32)
  return out.astype(y_SxD.dtype)


@jax.custom_vjp
def combine(y_SxD, gates_TxK, slot_TxK, slot_assignment_S):
  """Gathers expert outputs back to tokens: `out[t] = sum_k gates[t, k] * y[slot[t, k]]`.

  Dropped assignments (slot == S) contribute zero and get zero gate gradient.

  Args:
    y_SxD: float[S, D] expert outputs per buffer slot.
    gates_TxK: float32[T, K] combine weights.
    slot_TxK: int32[T, K] slot of each assignment (S = dropped).
    slot_assignment_S: int32[S] flat assignment `t * K + k` filling each slot (T * K = empty);
      used by the backward: `dy[s] = gate[a] * dout[a // K]` for `a = slot_assignment[s]`.

  Returns:
    float[T, D] combined outputs, dtype of y.
  """
  del slot_assignment_S
  return _combine_fwd_value(y_SxD, gates_TxK, slot_TxK)


def _combine_fwd(y_SxD, gates_TxK, slot_TxK, slot_assignment_S):
  out = _combine_fwd_value(y_SxD, gates_TxK, slot_TxK)
  return out, (y_SxD, gates_TxK, slot_TxK, slot_assignment_S)


def _combine_bwd(res, dout_TxD):
  y_SxD, gates_TxK, slot_TxK, slot_assignment_S = res
  top_k = slot_TxK.shape[1]
  gate_S = _take_rows(gates_TxK.reshape(-1), slot_assignment_S)  # 0 for empty slots
  token_S = slot_assignment_S // top_k  # sentinel T * K -> T (reads zero)
  dy_SxD = _take_rows(dout_TxD, token_S) * gate_S[:, None].astype(dout_TxD.dtype)
  rows_TxKxD = _take_rows(y_SxD, slot_TxK)
  dgates_TxK = jnp.einsum("tkd,td->tk", rows_TxKxD, dout_TxD.astype(y_SxD.dtype),
                          preferred_element_type=jnp.float32)
  return dy_SxD.astype(y_SxD.dtype), dgates_TxK.astype(gates_TxK.dtype), None, None


combine.defvjp(_combine_fwd, _combine_bwd)


# ----------------------------------------------------------------------------------------------
# Dispatch / combine of router assignments (any layout).


def with_tokens(plan, token_NxM, num_tokens):
  """`plan` (over assignment rows [N, M]) with `slot_token[s] = token[slot_assignment[s]]`.

  Args:
    plan: DispatchPlan. num_tokens: static int T, the token of an empty slot.
    token_NxM: int[N, M] token of each assignment (`routing.Assignments.token`), or None: rows
      are tokens and `plan.slot_token` is right as it is (the plan is returned unchanged).
  """
  if token_NxM is None:
    return plan
  token_S = jnp.take(jnp.asarray(token_NxM, jnp.int32).reshape(-1), plan.slot_assignment,
                     mode="fill", fill_value=num_tokens)
  return plan._replace(slot_token=token_S)


def to_slots(x_TxD, assign, plan):
  """Dispatch: `buf[s] = x[plan.slot_token[s]]`, zero for empty slots.

  Token-major assignments (`assign.token` None) run through `dispatch`, whose backward is a
  gather; others through a gather whose backward scatter-adds each token's slots.

  Args:
    x_TxD: float[T, D] token features.
    assign: routing.Assignments the plan was made for (rows [N, M]).
    plan: DispatchPlan of `assign` over S slots (`with_tokens` applied).

  Returns:
    float[S, D] buffer rows, dtype of x.
  """
  if assign.token is None:
    return dispatch(x_TxD, plan.slot_token, plan.slot)
  return _take_rows(x_TxD, plan.slot_token)


def to_tokens(y_SxD, assign, plan, num_tokens):
  """Combine: `out[t] = sum of gate[a] * y[slot[a]]` over the assignments a of token t.

  Dropped assignments (slot == S) contribute zero and get zero gate gradient. Token-major
  assignments run through `combine` (gathers only, forward and backward); others scatter-add
  their gated rows to their tokens (in float32).

  Args:
    y_SxD: float[S, D] expert outputs per buffer slot.
    assign: routing.Assignments (rows [N, M]; gates float32[N, M]).
    plan: DispatchPlan of `assign` over S slots.
    num_tokens: static int T.

  Returns:
    float[T, D] combined outputs, dtype of y.
  """
  if assign.token is None:
    return combine(y_SxD, assign.gate, plan.slot, plan.slot_assignment)
  rows_AxD = _take_rows(y_SxD, plan.slot.reshape(-1)).astype(jnp.float32)
  gated_AxD = rows_AxD * jnp.asarray(assign.gate, jnp.float32).reshape(-1, 1)
  out_TxD = jnp.zeros((num_tokens, y_SxD.shape[1]), jnp.float32).at[
      jnp.asarray(assign.token).reshape(-1)].add(gated_AxD, mode="drop")
  return out_TxD.astype(y_SxD.dtype)
