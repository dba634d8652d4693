"""Tests for simbal_jax.dispatch (capacities and slot plans) against plain Python loops and
NumPy's stable sort."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simbal_jax import dispatch

def test_capacity_hand_cases():
  assert dispatch.capacity(16, 4, 2, 1.0) == 8
  assert dispatch.capacity(20, 4, 2, 1.1) == 11  # 11.000000000000002 in floats
  assert dispatch.capacity(10, 4, 1, 1.25) == 4  # ceil(3.125)
  assert dispatch.capacity(3, 64, 1, 1.0) == 1  # at least 1
  assert dispatch.capacity(8, 2, 2, 4.0) == 8  # at most T
  assert dispatch.capacity(7, 4, 2, None) == dispatch.capacity(7, 4, 2, 0.0) == 7


def _loop_plan(idx, num_experts, cap, mask=None):
  """Walks assignments in token order, as the spec describes."""
  t_count, k_count = idx.shape
  fill = [0] * num_experts
  slot = np.full((t_count, k_count), num_experts * cap)
  for t in range(t_count):
    for k in range(k_count):
      if mask is not None and not mask[t]:
        continue
      e = idx[t, k]
      if fill[e] < cap:
        slot[t, k] = e * cap + fill[e]
      fill[e] += 1
  return slot


@pytest.mark.parametrize("case", ["drops", "masked", "nodrop"])
def test_dispatch_plan_vs_loop(case):
  rng = np.random.default_rng({"drops": 4, "masked": 5, "nodrop": 6}[case])
  t_count, num_experts, k = 24, 6, 3
  # Distinct experts per token, skewed towards low ids so some experts overflow.
  idx = np.stack([rng.choice(num_experts, k, replace=False, p=[.3, .25, .2, .1, .1, .05])
                  for _ in range(t_count)]).astype(np.int32)
  mask = (rng.uniform(size=t_count) < 0.7) if case == "masked" else None
  cap = dispatch.capacity(t_count, num_experts, k, None if case == "nodrop" else 1.0)
  plan_fn = jax.jit(dispatch.dispatch_plan, static_argnums=(1, 2))
  plan = plan_fn(jnp.asarray(idx), num_experts, cap,
                 mask_T=None if mask is None else jnp.asarray(mask))
  num_slots = num_experts * cap
  expected = _loop_plan(idx, num_experts, cap, mask)
  slot = np.asarray(plan.slot)
  np.testing.assert_array_equal(slot, expected)
  np.testing.assert_array_equal(plan.kept, expected < num_slots)
  if case == "drops":
    assert (~np.asarray(plan.kept)).sum() > 0
  if case == "nodrop":
    assert cap == t_count and np.asarray(plan.kept).all()
  # slot <-> slot_assignment <-> slot_token consistency.
  sa, st = np.asarray(plan.slot_assignment), np.asarray(plan.slot_token)
  assert sa.shape == st.shape == (num_slots,)
  flat = slot.ravel()
  for a in range(t_count * k):
    if flat[a] < num_slots:
      assert sa[flat[a]] == a and st[flat[a]] == a // k
  empty = sa == t_count * k
  np.testing.assert_array_equal(empty, st == t_count)
  assert (~empty).sum() == (flat < num_slots).sum()
  np.testing.assert_array_equal(st[~empty], sa[~empty] // k)
  for s in np.nonzero(~empty)[0]:
    assert flat[sa[s]] == s
  # Every expert within capacity, its slots filled contiguously; each token at most K experts.
  per_expert = (~empty).reshape(num_experts, cap)
  assert np.all(per_expert.sum(1) <= cap)
  assert np.all(np.diff(per_expert.astype(int), axis=1) <= 0)
  assert np.all(np.bincount(st[~empty], minlength=t_count) <= k)


def test_sorted_plan_vs_numpy_stable_sort():
  rng = np.random.default_rng(7)
  t_count, num_experts, k = 10, 5, 2
  idx = np.stack([rng.choice(num_experts, k, replace=False, p=[.4, .3, .2, .1, 0.])
                  for _ in range(t_count)]).astype(np.int32)  # expert 4 unused: size 0
  plan, sizes = jax.jit(dispatch.sorted_plan, static_argnums=1)(jnp.asarray(idx), num_experts)
  # Independent construction: stable sort of the flat expert ids, slot = rank in that sort.
  order = sorted(range(t_count * k), key=lambda a: idx.ravel()[a])  # Python sort is stable
  slot = np.empty(t_count * k, np.int64)
  slot[order] = np.arange(t_count * k)
  np.testing.assert_array_equal(plan.slot, slot.reshape(t_count, k))
  np.testing.assert_array_equal(plan.slot_assignment, order)
  np.testing.assert_array_equal(plan.slot_token, np.asarray(order) // k)
  assert np.asarray(plan.kept).all() and plan.kept.shape == (t_count, k)
  assert sorted(np.asarray(plan.slot).ravel().tolist()) == list(range(t_count * k))
  assert sizes.dtype == jnp.int32
  np.testing.assert_array_equal(sizes, np.bincount(idx.ravel(), minlength=num_experts))
  assert int(sizes[4]) == 0
  # Contiguous expert segments in slot order, tokens ascending within each.
  experts_in_slot_order = idx.ravel()[np.asarray(plan.slot_assignment)]
  np.testing.assert_array_equal(experts_in_slot_order, np.repeat(np.arange(num_experts), sizes))
  for e in range(num_experts):
    toks = np.asarray(plan.slot_token)[experts_in_slot_order == e]
    assert np.all(np.diff(toks) > 0)


@pytest.mark.parametrize("call,match", [
    (lambda: dispatch.capacity(0, 4, 1, 1.0), "num_tokens must be >= 1"),
    (lambda: dispatch.capacity(8, 4, 5, 1.0), "top_k must be <= 4"),
    (lambda: dispatch.dispatch_plan(jnp.zeros((4,), jnp.int32), 3, 2), "rank 2"),
    (lambda: dispatch.dispatch_plan(jnp.zeros((4, 1), jnp.int32), 3, 0), "capacity must be >= 1"),
    (lambda: dispatch.sorted_plan(jnp.zeros((4,), jnp.int32), 3), "rank 2"),
    (lambda: dispatch.sorted_plan(jnp.zeros((4, 1), jnp.int32), 0), "num_experts must be >= 1"),
])
def test_bad_input_raises(call, match):
  with pytest.raises(ValueError, match=match):
    call()
