"""experts.py: `apply` over hand-made and expert-choice assignments against float64 loops and
plain autodiff; the dropless grouped-matmul path local to each shard (shard_map over the mesh)
against the same block on one device and a float64 per-token loop, values and gradients."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simbal_jax import dispatch
from simbal_jax import experts
from simbal_jax import moe
from simbal_jax import routing
from simbal_jax import sharding

D, E, K, F = 16, 8, 2, 8
B, L = 8, 4
P = jax.sharding.PartitionSpec

def _loop(params, x_BxLxD, bias_E, experts_run=range(E)):
  """float64 per token: softmax probs, top-k of probs + bias (bias only selects), SwiGLU; only
  the chosen experts in `experts_run` contribute."""
  p = {k: np.asarray(v, np.float64) for k, v in params["params"].items()}
  x = np.asarray(x_BxLxD, np.float64).reshape(-1, D)
  logits = x @ p["router"]
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  select = probs + (0.0 if bias_E is None else np.asarray(bias_E, np.float64))
  out = np.zeros_like(x)
  for t in range(x.shape[0]):
    for e in np.argsort(-select[t], kind="stable")[:K]:
      if e not in experts_run:
        continue
      h = x[t] @ p["wi_gate"][e]
      h = h / (1.0 + np.exp(-h)) * (x[t] @ p["wi_up"][e])
      out[t] += probs[t, e] * (h @ p["wo"][e])
  return out.reshape(x_BxLxD.shape)


def _grads(block, params, x, bias, proj):
  def loss(p, x):
    y, aux = block.apply(p, x, bias)
    return jnp.sum(y * proj), (y, aux.counts)
  return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x)


# (100, 50, 0, ...) sends every token to experts 0 and 1 (the others get empty groups, and on
# an expert axis of 2 one device holds no routed expert at all); (1, .5, 0, ...) uneven loads.
BIASES = {"none": None, "empty": (100.0, 50.0) + (0.0,) * (E - 2),
          "uneven": (1.0, 0.5) + (0.0,) * (E - 2)}


@pytest.mark.parametrize("mesh_kw,impl,bias", [
    (dict(data=2, fsdp=2, expert=2, model=1), "auto", "uneven"),
    (dict(data=2, fsdp=2, expert=2, model=1), "lax", "empty"),
    (dict(data=1, fsdp=1, expert=8, model=1), "auto", "none"),
    (dict(data=2, fsdp=1, expert=2, model=2), "auto", "uneven")])
def test_sharded_ragged_equals_one_device_and_loop(mesh_kw, impl, bias):
  _check_sharded(mesh_kw, impl, bias)


def _check_sharded(mesh_kw, impl, bias, shape=(B, L), **moe_kw):
  """The shard_map path on `mesh_kw` against one device and the float64 loop; returns the
  float64 top-K choices [tokens, K] (for tests that check which tokens went where)."""
  cfg = moe.MoEConfig(num_experts=E, top_k=K, d_ff=F, capacity_factor=0.0,
                      router_init="normal", dispatch="ragged", ragged_impl=impl, **moe_kw)
  block = moe.MoEBlock(cfg, dtype=jnp.float32)
  x = jax.random.normal(jax.random.PRNGKey(0), (*shape, D), jnp.float32)
  proj = jax.random.normal(jax.random.PRNGKey(2), (*shape, D), jnp.float32)
  bias = None if BIASES[bias] is None else jnp.asarray(BIASES[bias], jnp.float32)
  boxed = jax.jit(block.init)(jax.random.PRNGKey(1), x)
  params = nn.unbox(boxed)
  (v0, (y0, counts0)), (gp0, gx0) = jax.jit(lambda p, x: _grads(block, p, x, bias, proj))(
      params, x)

  mesh = sharding.make_mesh(dict(mesh_kw, multihost=False))
  rules = sharding.LOGICAL_RULES
  with sharding.mesh_rules(mesh, rules):
    assert experts._sharded_mesh() is not None  # the shard_map path runs
    shardings = sharding.state_shardings(boxed, mesh, rules)
    params_sh = nn.unbox(jax.device_put(boxed, shardings))
    wg = params_sh["params"]["wi_gate"]
    assert wg.addressable_shards[0].data.shape == (
        E // mesh_kw["expert"], D // mesh_kw["fsdp"], F // mesh_kw["model"])
    tok = jax.sharding.NamedSharding(mesh, P(sharding.BATCH_AXES))
    (v1, (y1, counts1)), (gp1, gx1) = jax.jit(lambda p, x: _grads(block, p, x, bias, proj))(
        params_sh, jax.device_put(x, tok))

  np.testing.assert_allclose(np.asarray(y1), _loop(params, x, bias), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(y1), np.asarray(y0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(float(v1), float(v0), rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(counts1), np.asarray(counts0))
  np.testing.assert_allclose(np.asarray(gx1), np.asarray(gx0), rtol=1e-4, atol=1e-5)
  for name in ("router", "wi_gate", "wi_up", "wo"):
    np.testing.assert_allclose(np.asarray(gp1["params"][name]), np.asarray(gp0["params"][name]),
                               rtol=1e-4, atol=1e-5, err_msg=name)
  counts = np.asarray(counts0)
  if bias == "empty":
    assert (counts[2:] == 0).all()
    np.testing.assert_array_equal(np.asarray(gp1["params"]["wo"][2:]), 0.0)
  elif bias == "uneven":
    assert counts.max() >= 2 * counts[counts > 0].min()
  return np.asarray(jax.jit(lambda p, x: block.apply(p, x, bias)[1].router.expert_index)(
      params, x))


def test_sorted_plan_with_expert_offset_vs_numpy():
  """Experts [o, o + n) held: their assignments first, in the plain plan's sorted order."""
  rng = np.random.default_rng(0)
  idx = rng.integers(0, E, size=(12, K)).astype(np.int32)
  offset, held = 2, 3
  plan, sizes = jax.jit(dispatch.sorted_plan, static_argnums=1)(jnp.asarray(idx), held, offset)
  flat = idx.reshape(-1)
  order = [a for e in range(offset, offset + held) for a in np.flatnonzero(flat == e)]
  n, total = len(order), flat.size
  np.testing.assert_array_equal(np.asarray(sizes), [np.sum(flat == e) for e in
                                                    range(offset, offset + held)])
  slot_assignment = np.asarray(order + [total] * (total - n))
  np.testing.assert_array_equal(np.asarray(plan.slot_assignment), slot_assignment)
  np.testing.assert_array_equal(np.asarray(plan.slot_token), slot_assignment // K)
  slot = np.full(total, total)
  slot[order] = np.arange(n)
  np.testing.assert_array_equal(np.asarray(plan.slot).reshape(-1), slot)
  np.testing.assert_array_equal(np.asarray(plan.kept).reshape(-1),
                                (flat >= offset) & (flat < offset + held))



def test_unchecked_shard_map_gradients(monkeypatch):
  """The TPU kernel's shard_map runs without varying-axis checks: on CPU kernels, the same
  unchecked shard_map still gives the one-device values and gradients (model axis included)."""
  monkeypatch.setattr(experts, "_FORCE_NO_VMA_CHECK", True)
  test_sharded_ragged_equals_one_device_and_loop(
      dict(data=2, fsdp=1, expert=2, model=2), "lax", "uneven")


def test_bounded_expert_buffer_drops_the_excess():
  """expert_buffer_factor 0.5 on data 2 x fsdp 2 x expert 2: 4 local tokens x K 2 = 8 mean rows
  -> a buffer of 4 rows, rounded up to 8. Bias (100, 50, 0...) sends every token to experts 0
  and 1, both on the first device of each expert group: its 16 assignments sorted by expert fill
  the 8 rows with expert 0's; expert 1's are dropped (half of all assignments)."""
  cfg = moe.MoEConfig(num_experts=E, top_k=K, d_ff=F, router_init="normal", dispatch="ragged",
                      expert_buffer_factor=0.5, expert_overflow="drop")
  block = moe.MoEBlock(cfg, dtype=jnp.float32)
  x = jax.random.normal(jax.random.PRNGKey(0), (B, L, D), jnp.float32)
  bias = jnp.asarray(BIASES["empty"], jnp.float32)
  boxed = jax.jit(block.init)(jax.random.PRNGKey(1), x)
  mesh = sharding.make_mesh(dict(data=2, fsdp=2, expert=2, model=1, multihost=False))
  with sharding.mesh_rules(mesh, sharding.LOGICAL_RULES):
    params_sh = nn.unbox(jax.device_put(boxed, sharding.state_shardings(
        boxed, mesh, sharding.LOGICAL_RULES)))
    y, aux = jax.jit(lambda p, x: block.apply(p, x, bias))(
        params_sh, jax.device_put(x, jax.sharding.NamedSharding(mesh, P(sharding.BATCH_AXES))))
  np.testing.assert_allclose(np.asarray(y), _loop(nn.unbox(boxed), x, bias, experts_run={0}),
                             rtol=1e-5, atol=1e-5)
  assert float(aux.dropped) == 0.5


@pytest.mark.parametrize("bias,shape,factor,overflows", [
    ("empty", (B, L), 0.5, True), ("none", (4 * B, 2 * L), 1.25, False)])
def test_bounded_expert_buffer_fallback_is_dropless(bias, shape, factor, overflows):
  """expert_overflow="fallback" on fsdp 2 x expert 4 (2 experts per device): the call whose
  group overflows its bounded buffer (every token on experts 0 and 1, both on the group's first
  device: 32 rows against 8 slots) computes the dropped rows through the gathered expert
  kernels and equals the dropless one-device block and the loop, values and gradients; so does
  a balanced call within its buffers (32 local tokens x K 2 = 64 mean rows, 80 slots). Which
  case each is comes from the routing choices (a group = 4 consecutive shards)."""
  mesh_kw = dict(data=1, fsdp=2, expert=4, model=1)
  index = _check_sharded(mesh_kw, "lax", bias, shape, expert_buffer_factor=factor)
  per_device = index.shape[0] // 8
  slots = -(-int(np.ceil(per_device * K * factor)) // 8) * 8
  assert slots + per_device * K < 4 * per_device * K  # the bounded buffer runs, not the worst case
  device_of = index.reshape(2, -1) // (E // 4)  # [group, its rows] -> device holding the expert
  loads = np.stack([(device_of == d).sum(1) for d in range(4)], 1)
  assert (loads.max() > slots) == overflows, (loads, slots)


# ----------------------------------------------------------------------------------------------
# experts.apply over hand-made assignments: token-major rows and any other layout.

T_A, E_A, D_A, F_A = 6, 4, 8, 4
# Token-major [T, K = 2]: expert loads 6, 3, 3 and an empty expert 3.
_TOKEN_MAJOR = np.array([[0, 1], [0, 2], [0, 1], [1, 0], [0, 2], [2, 0]], np.int32)
# Any layout, rows [5, 2] of (token, expert): token 0 has three experts, token 2 none, expert 3
# none; expert loads 4, 3, 1, 0.
_PAIRS = np.array([[[0, 0], [0, 1]], [[0, 2], [1, 0]], [[3, 0], [3, 1]], [[4, 0], [5, 1]],
                   [[1, 1], [5, 2]]], np.int32)


def _assignments(layout):
  """(routing.Assignments, token int[N, M]) of a hand-made plan, gates in (0.1, 1)."""
  if layout == "token_major":
    token, expert = np.repeat(np.arange(T_A), 2).reshape(T_A, 2).astype(np.int32), _TOKEN_MAJOR
  else:
    token, expert = _PAIRS[..., 0], _PAIRS[..., 1]
  gate = np.random.default_rng(1).uniform(0.1, 1.0, size=expert.shape).astype(np.float32)
  assign = routing.Assignments(token=None if layout == "token_major" else jnp.asarray(token),
                               expert=jnp.asarray(expert), gate=jnp.asarray(gate))
  return assign, token


def _weights(seed=0):
  ks = jax.random.split(jax.random.PRNGKey(seed), 4)
  x = jax.random.normal(ks[0], (T_A, D_A), jnp.float32)
  wg, wu = (jax.random.normal(k, (E_A, D_A, F_A), jnp.float32) / 3 for k in ks[1:3])
  wo = jax.random.normal(ks[3], (E_A, F_A, D_A), jnp.float32) / 2
  return x, wg, wu, wo


def _loop_apply(x, token, expert, gate, kept, wg, wu, wo):
  """float64, one assignment at a time in row-major order."""
  x, wg, wu, wo = (np.asarray(a, np.float64) for a in (x, wg, wu, wo))
  out = np.zeros_like(x)
  for t, e, g, k in zip(np.ravel(token), np.ravel(expert), np.ravel(gate), np.ravel(kept)):
    if k:
      h = x[t] @ wg[e]
      out[t] += float(g) * ((h / (1.0 + np.exp(-h)) * (x[t] @ wu[e])) @ wo[e])
  return out


def _autodiff_apply(x, token, assign, wg, wu, wo):
  """Plain-autodiff float32 reference: gather each assignment's token, scatter-add back."""
  t, e = token.reshape(-1), assign.expert.reshape(-1)
  xa = x[t]
  h = (jax.nn.silu(jnp.einsum("ad,adf->af", xa, wg[e])) * jnp.einsum("ad,adf->af", xa, wu[e]))
  ya = jnp.einsum("af,afd->ad", h, wo[e]) * assign.gate.reshape(-1, 1)
  return jnp.zeros_like(x).at[t].add(ya)


_CAPACITY, _BUCKETS = dict(dispatch="capacity", capacity_factor=0.0), dict(dispatch="buckets")
_RAGGED = dict(dispatch="ragged", ragged_impl="lax")


@pytest.mark.parametrize("layout,dispatch_kw", [
    ("token_major", _CAPACITY), ("token_major", dict(_CAPACITY, num_groups=2)),
    ("token_major", _BUCKETS), ("token_major", dict(_BUCKETS, num_groups=2)),
    ("token_major", _RAGGED), ("any", _CAPACITY), ("any", _BUCKETS), ("any", _RAGGED)])
def test_apply_equals_float64_loop_values_and_grads(layout, dispatch_kw):
  """Every dispatch, dropless, equals the per-assignment loop; gradients (x, gates, kernels)
  equal plain autodiff. Uneven loads, an empty expert, and (any layout) tokens with 0 to 3
  experts."""
  cfg = moe.MoEConfig(num_experts=E_A, top_k=2, d_ff=F_A, **dispatch_kw)
  assign, token = _assignments(layout)
  x, wg, wu, wo = _weights()
  proj = jax.random.normal(jax.random.PRNGKey(5), (T_A, D_A))

  def loss(x, gate, wg, wu, wo, fn):
    y = fn(x, assign._replace(gate=gate), wg, wu, wo)
    return jnp.sum(y * proj), y

  ours = lambda x, a, wg, wu, wo: experts.apply(x, a, wg, wu, wo, cfg)[0]
  ref = lambda x, a, wg, wu, wo: _autodiff_apply(x, jnp.asarray(token), a, wg, wu, wo)
  grads = {}
  for name, fn in (("ours", ours), ("ref", ref)):
    grads[name] = jax.jit(jax.grad(functools.partial(loss, fn=fn), argnums=range(5),
                                   has_aux=True))(x, assign.gate, wg, wu, wo)
  y, kept = jax.jit(lambda *a: experts.apply(*a, cfg))(x, assign, wg, wu, wo)
  assert np.asarray(kept).all() and kept.shape == assign.expert.shape
  np.testing.assert_allclose(np.asarray(y), _loop_apply(x, token, assign.expert, assign.gate,
                                                        kept, wg, wu, wo), rtol=1e-5, atol=1e-5)
  if layout == "any":
    np.testing.assert_array_equal(np.asarray(y)[2], 0.0)  # token 2 has no expert
  (g_ours, _), (g_ref, _) = grads["ours"], grads["ref"]
  for name, a, b in zip(("x", "gate", "wg", "wu", "wo"), g_ours, g_ref):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5, err_msg=name)
  np.testing.assert_array_equal(np.asarray(g_ours[4])[3], 0.0)  # the empty expert


def test_apply_capacity_drops_in_assignment_order():
  """Any layout at C = 2: expert 0's first two assignments in row-major order are kept."""
  cfg = moe.MoEConfig(num_experts=E_A, top_k=2, d_ff=F_A, capacity_factor=0.5)
  assign, token = _assignments("any")
  x, wg, wu, wo = _weights()
  cap = experts.capacities(cfg, T_A, E_A, 2)  # 10 assignments of 6 tokens: K = 2
  assert cap == (2,)
  fill, kept_ref = [0] * E_A, []
  for e in np.ravel(assign.expert):
    kept_ref.append(fill[e] < cap[0])
    fill[e] += 1
  y, kept = jax.jit(lambda *a: experts.apply(*a, cfg))(x, assign, wg, wu, wo)
  np.testing.assert_array_equal(np.ravel(kept), kept_ref)
  assert not all(kept_ref)
  np.testing.assert_allclose(np.asarray(y), _loop_apply(x, token, assign.expert, assign.gate,
                                                        kept, wg, wu, wo), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dispatch_name", ["capacity", "buckets", "ragged"])
def test_apply_serves_expert_choice(dispatch_name):
  """routing.expert_choice's assignments through each dispatch == the float64 loop."""
  cfg = moe.MoEConfig(num_experts=E_A, top_k=2, d_ff=F_A, dispatch=dispatch_name,
                      capacity_factor=1.0, ragged_impl="lax")
  x, wg, wu, wo = _weights(seed=3)
  logits = x @ jax.random.normal(jax.random.PRNGKey(4), (D_A, E_A))
  assign = routing.expert_choice(logits, 3)  # E * C = 12 = T * 2 assignments
  y, kept = jax.jit(lambda *a: experts.apply(*a, cfg))(x, assign, wg, wu, wo)
  assert np.asarray(kept).all()
  np.testing.assert_allclose(np.asarray(y), _loop_apply(x, assign.token, assign.expert,
                                                        assign.gate, kept, wg, wu, wo),
                             rtol=1e-5, atol=1e-5)


def test_capacities_and_padding():
  """The one helper for the static buffer sizes (used by the block, memory and benchmarks)."""
  kw = dict(num_experts=10, top_k=2, d_ff=4)
  cap_cfg = moe.MoEConfig(**kw, capacity_factor=1.25)
  assert experts.capacities(cap_cfg, 100, 10, 2) == (dispatch.capacity(100, 10, 2, 1.25),) == (
      25,)
  assert experts.capacities(moe.MoEConfig(**kw, capacity_factor=0.0), 100, 10, 2) == (100,)
  bkt_cfg = moe.MoEConfig(**kw, dispatch="buckets")
  assert experts.capacities(bkt_cfg, 100, 10, 2) == (25, 30, 40, 60, 100)
  rag_cfg = moe.MoEConfig(**kw, dispatch="ragged", expert_buffer_factor=1.5)
  assert experts.capacities(rag_cfg, 100, 10, 2) == ()
  assert experts.padding(cap_cfg, 10, 2) == 1.25
  assert experts.padding(moe.MoEConfig(**kw, capacity_factor=0.0), 10, 2) == 5.0  # E / K
  assert experts.padding(bkt_cfg, 10, 2) == 1.25
  assert experts.padding(rag_cfg, 10, 2) == 1.0
  assert experts.padding(rag_cfg, 10, 2, expert_axis=4) == 2.5  # + the fallback's own buffer
  drop_cfg = moe.MoEConfig(**kw, dispatch="ragged", expert_buffer_factor=1.5,
                           expert_overflow="drop")
  assert experts.padding(drop_cfg, 10, 2, expert_axis=4) == 1.5
  assert experts.padding(drop_cfg, 10, 2, expert_axis=1) == 1.0
  with pytest.raises(ValueError, match="expert_overflow"):
    moe.MoEConfig(**kw, expert_overflow="spill")
  with pytest.raises(ValueError, match="divisible by num_groups=4"):
    experts.apply(jnp.zeros((T_A, D_A)), _assignments("token_major")[0],
                  *_weights()[1:], moe.MoEConfig(**kw, num_groups=4))
