"""MoE block: float64 reference loops, capacity drops, custom-VJP gradients, buckets, ragged."""
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simbal_jax import dispatch
from simbal_jax import experts
from simbal_jax import moe
from simbal_jax import routing

D, E, K, F = 16, 4, 2, 8


def _value_and_grads(block, *, params, x, bias, proj):
  """(sum(y * proj), (y, aux)) and its gradients w.r.t. params and x, jitted."""
  def loss(p, x):
    y, aux = block.apply(p, x, bias)
    return jnp.sum(y * proj), (y, aux)
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x)


def _setup(cfg, batch=2, length=8, seed=0, dtype=jnp.float32):
  block = moe.MoEBlock(cfg, dtype=dtype)
  x = jax.random.normal(jax.random.PRNGKey(seed), (batch, length, D), jnp.float32)
  params = nn.unbox(jax.jit(block.init)(jax.random.PRNGKey(seed + 1), x))
  return block, params, x


def _np_params(params):
  return {k: np.asarray(v, np.float64) for k, v in params["params"].items() if k != "shared"}


def _silu(z):
  return z / (1.0 + np.exp(-z))


def _ref_moe(params, x_BxLxD, top_k, capacity, num_groups=1, shared=None):
  """Per-token float64 loop: softmax -> top-k; token-order priority per group; SwiGLU experts."""
  p = _np_params(params)
  x = np.asarray(x_BxLxD, np.float64).reshape(-1, D)
  tokens = x.shape[0]
  logits = x @ p["router"]
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  out = np.zeros_like(x)
  fill = {}
  dropped = 0
  group_size = tokens // num_groups
  for t in range(tokens):
    chosen = np.argsort(-probs[t], kind="stable")[:top_k]
    for e in chosen:
      key = (t // group_size, e)
      fill[key] = fill.get(key, 0) + 1
      if fill[key] > capacity:
        dropped += 1
        continue
      h = _silu(x[t] @ p["wi_gate"][e]) * (x[t] @ p["wi_up"][e])
      out[t] += probs[t, e] * (h @ p["wo"][e])
    if shared is not None:
      h = _silu(x[t] @ shared["wi_gate"]) * (x[t] @ shared["wi_up"])
      out[t] += h @ shared["wo"]
  return out.reshape(x_BxLxD.shape), dropped / (tokens * top_k)


def test_no_drop_matches_per_token_loop():
  cfg = moe.MoEConfig(num_experts=E, top_k=K, d_ff=F, capacity_factor=0.0, router_init="normal")
  block, params, x = _setup(cfg)
  y, aux = jax.jit(block.apply)(params, x)
  ref, dropped = _ref_moe(params, x, K, capacity=10**9)
  assert dropped == 0.0
  np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-5)
  assert float(aux.dropped) == 0.0
  idx = np.asarray(aux.router.expert_index)
  np.testing.assert_array_equal(np.asarray(aux.counts), np.bincount(idx.ravel(), minlength=E))
  assert aux.router.logits.shape == (16, E) and aux.router.gates.shape == (16, K)
  assert aux.router.logits.dtype == jnp.float32


def test_shared_expert_is_added():
  cfg = moe.MoEConfig(num_experts=E, top_k=K, d_ff=F, capacity_factor=0.0, router_init="normal",
                      shared_expert_d_ff=6)
  block, params, x = _setup(cfg, seed=3)
  shared = {k: np.asarray(v, np.float64) for k, v in params["params"]["shared"].items()}
  assert shared["wi_gate"].shape == (D, 6)
  y, _ = jax.jit(block.apply)(params, x)
  ref, _ = _ref_moe(params, x, K, capacity=10**9, shared=shared)
  np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num_groups", [1, 2])
def test_capacity_drops_follow_token_order(num_groups):
  cf = 0.5
  cfg = moe.MoEConfig(num_experts=E, top_k=K, d_ff=F, capacity_factor=cf, router_init="normal",
                      num_groups=num_groups)
  block, params, x = _setup(cfg, batch=2, length=16, seed=5)
  group_tokens = 32 // num_groups
  cap = math.ceil(group_tokens * K / E * cf)  # 4 (groups of 16) or 8 (one group of 32)
  y, aux = jax.jit(block.apply)(params, x)
  ref, dropped = _ref_moe(params, x, K, capacity=cap, num_groups=num_groups)
  assert dropped > 0.1  # the case really drops assignments
  np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(float(aux.dropped), dropped, rtol=1e-6)


def _dispatch_autodiff(x_TxD, plan, num_slots):
  """Reference: scatter into the buffer, gather back (plain autodiff: scatter-add backward)."""
  tokens, top_k = plan.slot.shape
  token_A = jnp.repeat(jnp.arange(tokens), top_k)
  buf = jnp.zeros((num_slots + 1, x_TxD.shape[1]), x_TxD.dtype)
  return buf.at[plan.slot.reshape(-1)].set(x_TxD[token_A])[:num_slots]


def _combine_autodiff(y_SxD, gates_TxK, plan):
  y_pad = jnp.concatenate([y_SxD, jnp.zeros((1, y_SxD.shape[1]), y_SxD.dtype)], 0)
  return jnp.sum(y_pad[plan.slot] * gates_TxK[..., None], axis=1)


def _ref_block(params, x_BxLxD, cfg):
  """Plain-autodiff MoE (scatter dispatch, gather combine) with the same routing."""
  p = params["params"]
  x = x_BxLxD.reshape(-1, D)
  out = routing.route(x @ p["router"], cfg.top_k)
  cap = dispatch.capacity(x.shape[0], E, cfg.top_k, cfg.capacity_factor)
  plan = dispatch.dispatch_plan(out.expert_index, E, cap)
  buf = _dispatch_autodiff(x, plan, E * cap).reshape(E, cap, D)
  h = (jax.nn.silu(jnp.einsum("ecd,edf->ecf", buf, p["wi_gate"]))
       * jnp.einsum("ecd,edf->ecf", buf, p["wi_up"]))
  y = jnp.einsum("ecf,efd->ecd", h, p["wo"]).reshape(E * cap, D)
  return _combine_autodiff(y, out.gates, plan).reshape(x_BxLxD.shape)


@pytest.mark.parametrize("cf", [0.0, 0.75])
def test_custom_vjp_gradients_match_autodiff_reference(cf):
  cfg = moe.MoEConfig(num_experts=E, top_k=K, d_ff=F, capacity_factor=cf, router_init="normal")
  block, params, x = _setup(cfg, seed=7)
  proj = jax.random.normal(jax.random.PRNGKey(9), x.shape)

  def loss(fn):
    return lambda p, x: jnp.sum(fn(p, x) * proj)

  ours = jax.jit(jax.grad(loss(lambda p, x: block.apply(p, x)[0]), argnums=(0, 1)))(params, x)
  ref = jax.jit(jax.grad(loss(lambda p, x: _ref_block(p, x, cfg)), argnums=(0, 1)))(params, x)
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
  assert float(jnp.abs(ours[0]["params"]["router"]).max()) > 0  # gates carry gradient


def test_dispatch_combine_vjp_against_autodiff():
  tokens, top_k, n_exp, cap = 12, 2, 3, 5  # 24 assignments, 15 slots: some dropped
  idx = jax.random.randint(jax.random.PRNGKey(0), (tokens, top_k), 0, n_exp)
  idx = idx.at[:, 1].set((idx[:, 0] + 1) % n_exp)  # distinct experts per token
  plan = dispatch.dispatch_plan(idx, n_exp, cap)
  x = jax.random.normal(jax.random.PRNGKey(1), (tokens, 4))
  gates = jax.random.uniform(jax.random.PRNGKey(2), (tokens, top_k))
  w = jax.random.normal(jax.random.PRNGKey(3), (n_exp * cap, 4))

  def ours(x, gates):
    buf = dispatch.dispatch(x, plan.slot_token, plan.slot)
    return dispatch.combine(jnp.tanh(buf) * w, gates, plan.slot, plan.slot_assignment)

  def ref(x, gates):
    buf = _dispatch_autodiff(x, plan, n_exp * cap)
    return _combine_autodiff(jnp.tanh(buf) * w, gates, plan)

  def value_and_vjp(fn):
    return jax.jit(lambda x, gates, ct: (fn(x, gates), jax.vjp(fn, x, gates)[1](ct)))

  assert not bool(plan.kept.all())
  out_ct = jax.random.normal(jax.random.PRNGKey(4), (tokens, 4))
  y_ours, g_ours = value_and_vjp(ours)(x, gates, out_ct)
  y_ref, g_ref = value_and_vjp(ref)(x, gates, out_ct)
  np.testing.assert_allclose(y_ours, y_ref, rtol=1e-6, atol=1e-6)
  for a, b in zip(g_ours, g_ref):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_bf16_compute_keeps_router_float32():
  cfg = moe.MoEConfig(num_experts=E, top_k=K, d_ff=F, router_init="orthogonal")
  block, params, x = _setup(cfg, dtype=jnp.bfloat16)
  y, aux = jax.jit(block.apply)(params, x.astype(jnp.bfloat16))
  assert y.dtype == jnp.bfloat16
  assert aux.router.probs.dtype == jnp.float32 and aux.router.gates.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(y.astype(jnp.float32))))
  r = np.asarray(params["params"]["router"], np.float64)
  np.testing.assert_allclose(r.T @ r, np.eye(E), atol=1e-5)  # orthonormal columns (D >= E)


def test_expert_bias_changes_choice_not_gates():
  cfg = moe.MoEConfig(num_experts=E, top_k=1, d_ff=F, capacity_factor=0.0, router_init="normal")
  block, params, x = _setup(cfg)
  bias = jnp.array([100.0, 0.0, 0.0, 0.0])
  _, aux = jax.jit(block.apply)(params, x, bias)
  assert bool(jnp.all(aux.router.expert_index == 0))
  np.testing.assert_allclose(aux.router.gates[:, 0], aux.router.probs[:, 0], rtol=1e-6)


@pytest.mark.parametrize("shared", [0, 6])
def test_ragged_matches_per_token_loop(shared):
  cfg = moe.MoEConfig(num_experts=E, top_k=K, d_ff=F, capacity_factor=0.5, router_init="normal",
                      shared_expert_d_ff=shared, dispatch="ragged")  # capacity_factor ignored
  block, params, x = _setup(cfg, seed=11)
  shared_np = ({k: np.asarray(v, np.float64) for k, v in params["params"]["shared"].items()}
               if shared else None)
  y, aux = jax.jit(block.apply)(params, x)
  ref, _ = _ref_moe(params, x, K, capacity=10**9, shared=shared_np)
  np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-5)
  assert float(aux.dropped) == 0.0
  idx = np.asarray(aux.router.expert_index)
  np.testing.assert_array_equal(np.asarray(aux.counts), np.bincount(idx.ravel(), minlength=E))


@pytest.mark.parametrize("shared,bias,impl", [
    (0, None, "auto"), (6, None, "auto"), (0, (100.0, 50.0, 0.0, 0.0), "auto"),
    (0, (1.0, 0.5, 0.0, 0.0), "auto"), (0, (100.0, 50.0, 0.0, 0.0), "tokamax"),
    (0, (1.0, 0.5, 0.0, 0.0), "lax")])
def test_ragged_equals_dropless_capacity_values_and_grads(shared, bias, impl):
  """dispatch="ragged" == "capacity" at capacity_factor 0 (same params): output, aux, grads.

  "auto" and "tokamax" run tokamax.ragged_dot (its XLA implementation on CPU), "lax"
  jax.lax.ragged_dot. Bias (100, 50, 0, 0) routes every token to experts 0 and 1, so experts 2
  and 3 get empty groups; (1, 0.5, 0, 0) gives uneven loads.
  """
  kw = dict(num_experts=E, top_k=K, d_ff=F, capacity_factor=0.0, router_init="normal",
            shared_expert_d_ff=shared)
  cap_block, params, x = _setup(moe.MoEConfig(**kw), seed=13)
  rag_block = moe.MoEBlock(moe.MoEConfig(**kw, dispatch="ragged", ragged_impl=impl),
                           dtype=jnp.float32)
  bias = None if bias is None else jnp.asarray(bias, jnp.float32)
  proj = jax.random.normal(jax.random.PRNGKey(14), x.shape)

  value_and_grads = functools.partial(_value_and_grads, params=params, x=x, bias=bias,
                                      proj=proj)

  (_, (y_cap, aux_cap)), g_cap = value_and_grads(cap_block)
  (_, (y_rag, aux_rag)), g_rag = value_and_grads(rag_block)
  np.testing.assert_allclose(np.asarray(y_rag), np.asarray(y_cap), rtol=1e-5, atol=1e-6)
  for a, b in zip(jax.tree.leaves(aux_rag), jax.tree.leaves(aux_cap)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert jax.tree.structure(g_rag) == jax.tree.structure(g_cap)
  for a, b in zip(jax.tree.leaves(g_rag), jax.tree.leaves(g_cap)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
  assert float(jnp.abs(g_rag[0]["params"]["router"]).max()) > 0  # gates carry gradient
  if bias is not None and bias[0] == 100.0:
    assert set(np.unique(np.asarray(aux_rag.router.expert_index)).tolist()) == {0, 1}
    np.testing.assert_array_equal(np.asarray(g_rag[0]["params"]["wo"][2:]), 0.0)
  elif bias is not None:
    counts = np.asarray(aux_rag.counts)
    assert counts.max() >= 2 * counts.min() and counts.min() > 0  # uneven, none empty


@pytest.mark.parametrize("num_groups,bias,bucket", [
    (1, None, 0), (1, (0.1, 0.0, 0.0, 0.0), 1), (1, (100.0, 50.0, 0.0, 0.0), 2),
    (2, None, 0), (2, (0.05, 0.0, 0.0, 0.0), 1), (2, (0.2, 0.0, 0.0, 0.0), 2)])
def test_buckets_equal_dropless_capacity_values_and_grads(num_groups, bias, bucket):
  """dispatch="buckets" == "capacity" at C = T (and the float64 loop): output, aux, grads.

  128 tokens, E 4, K 2: buckets (80, 96, 128) for one group of 128 and (40, 48, 64) for two
  groups of 64. The biases push the largest expert load into each bucket in turn; (100, 50, 0,
  0) sends every token to experts 0 and 1 (loads T, T, 0, 0: experts 2 and 3 empty).
  """
  kw = dict(num_experts=E, top_k=K, d_ff=F, capacity_factor=0.0, router_init="normal",
            num_groups=num_groups)
  cap_block, params, x = _setup(moe.MoEConfig(**kw), batch=2, length=64, seed=20)
  bkt_cfg = moe.MoEConfig(**kw, dispatch="buckets")
  bkt_block = moe.MoEBlock(bkt_cfg, dtype=jnp.float32)
  bias = None if bias is None else jnp.asarray(bias, jnp.float32)
  proj = jax.random.normal(jax.random.PRNGKey(22), x.shape)

  value_and_grads = functools.partial(_value_and_grads, params=params, x=x, bias=bias,
                                      proj=proj)

  (_, (y_cap, aux_cap)), g_cap = value_and_grads(cap_block)
  (_, (y_bkt, aux_bkt)), g_bkt = value_and_grads(bkt_block)
  caps = dispatch.capacity_buckets(128 // num_groups, E, K, bkt_cfg.capacity_buckets)
  assert caps == ((80, 96, 128) if num_groups == 1 else (40, 48, 64))
  index = aux_bkt.router.expert_index.reshape(num_groups, -1, K)
  assert int(dispatch.bucket_index(dispatch.max_group_load(index, E), caps)) == bucket
  np.testing.assert_allclose(np.asarray(y_bkt), np.asarray(y_cap), rtol=1e-6, atol=1e-6)
  for a, b in zip(jax.tree.leaves(aux_bkt), jax.tree.leaves(aux_cap)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert float(aux_bkt.dropped) == 0.0
  for a, b in zip(jax.tree.leaves(g_bkt), jax.tree.leaves(g_cap)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
  if bias is None:  # the float64 per-token loop (it has no bias)
    ref, _ = _ref_moe(params, x, K, capacity=10**9)
    np.testing.assert_allclose(np.asarray(y_bkt), ref, rtol=1e-5, atol=1e-5)
  if bucket == 2 and num_groups == 1:
    np.testing.assert_array_equal(np.asarray(aux_bkt.counts), [128, 128, 0, 0])
    np.testing.assert_array_equal(np.asarray(g_bkt[0]["params"]["wo"][2:]), 0.0)


def test_bucket_helpers():
  assert dispatch.capacity_buckets(100, 10, 2, (1.25, 1.5, 2.0, 3.0)) == (25, 30, 40, 60, 100)
  assert dispatch.capacity_buckets(8, 4, 2, (1.25, 3.0, 100.0)) == (5, 8)  # capped and deduped
  caps = (25, 30, 40, 100)
  got = [int(dispatch.bucket_index(load, caps)) for load in (0, 25, 26, 30, 31, 40, 41, 100)]
  assert got == [0, 0, 1, 1, 2, 2, 3, 3]
  idx = jnp.array([[[0, 1], [0, 2], [0, 1]], [[2, 3], [3, 1], [3, 0]]])
  assert int(jax.jit(dispatch.max_group_load, static_argnums=1)(idx, 4)) == 3
  with pytest.raises(ValueError, match="capacity_buckets"):
    moe.MoEConfig(num_experts=2, top_k=1, d_ff=4, capacity_buckets=(1.5, 0.0))
  assert moe.MoEConfig(num_experts=2, top_k=1, d_ff=4, capacity_buckets=[2, 1.5]
                       ).capacity_buckets == (2.0, 1.5)


def test_ragged_impl_resolution_and_tokamax_use(monkeypatch):
  assert experts.resolve_ragged_impl("auto", "cpu") == "xla"
  assert experts.resolve_ragged_impl("auto", "gpu") == "tokamax"
  assert experts.resolve_ragged_impl("auto", "tpu") == "megablox"
  assert experts.resolve_ragged_impl("lax", "gpu") == "lax"
  with pytest.raises(ValueError, match="ragged_impl"):
    moe.MoEConfig(num_experts=2, top_k=1, d_ff=4, ragged_impl="cuda")
  tokamax = pytest.importorskip("tokamax")
  seen = []
  real = tokamax.ragged_dot
  monkeypatch.setattr(tokamax, "ragged_dot", lambda *a, **kw: seen.append(kw) or real(*a, **kw))
  lhs = jax.random.normal(jax.random.PRNGKey(0), (6, 3))
  rhs = jax.random.normal(jax.random.PRNGKey(1), (2, 3, 5))
  sizes = jnp.array([4, 2], jnp.int32)
  out = experts.ragged_dot(lhs, rhs, sizes, "auto")
  assert seen == [{"implementation": "xla"}]  # CPU: tokamax's XLA implementation
  np.testing.assert_allclose(out, jnp.concatenate([lhs[:4] @ rhs[0], lhs[4:] @ rhs[1]]),
                             rtol=1e-5, atol=1e-5)
  with pytest.raises(NotImplementedError):  # the Pallas kernels do not run on CPU
    experts.ragged_dot(lhs, rhs, sizes, "triton")


def test_validation_errors():
  with pytest.raises(ValueError, match="top_k"):
    moe.MoEConfig(num_experts=2, top_k=3, d_ff=4)
  with pytest.raises(ValueError, match="gating"):
    moe.MoEConfig(num_experts=2, top_k=1, d_ff=4, gating="argmax")
  with pytest.raises(ValueError, match="router_init"):
    moe.MoEConfig(num_experts=2, top_k=1, d_ff=4, router_init="zeros")
  with pytest.raises(ValueError,
                     match=r"dispatch='sorted'; valid: \('capacity', 'buckets', 'ragged'\)"):
    moe.MoEConfig(num_experts=2, top_k=1, d_ff=4, dispatch="sorted")
  with pytest.raises(ValueError, match="ragged' needs num_groups=1"):
    moe.MoEConfig(num_experts=2, top_k=1, d_ff=4, dispatch="ragged", num_groups=2)
  cfg = moe.MoEConfig(num_experts=E, top_k=K, d_ff=F, num_groups=3, router_init="normal")
  with pytest.raises(ValueError, match="num_groups"):
    moe.MoEBlock(cfg).init(jax.random.PRNGKey(0), jnp.zeros((2, 8, D)))
  cfg = moe.MoEConfig(num_experts=E, top_k=K, d_ff=F, router_init="normal")
  with pytest.raises(ValueError, match="expert_bias_E"):
    moe.MoEBlock(cfg).init(jax.random.PRNGKey(0), jnp.zeros((2, 8, D)), jnp.zeros((E + 1,)))


@pytest.mark.parametrize("noise", ["jitter", "gaussian", "gaussian_learned"])
def test_router_noise_in_training_only(noise):
  """With a "router" RNG stream (the train step) the routing is noisy and reproducible from the
  key; without one (evaluation) the block equals the noise-free block."""
  x = jax.random.normal(jax.random.key(0), (2, 16, 16))
  plain = moe.MoEBlock(moe.MoEConfig(num_experts=4, top_k=2, d_ff=8), dtype=jnp.float32)
  noisy = moe.MoEBlock(moe.MoEConfig(num_experts=4, top_k=2, d_ff=8, router_noise=noise,
                                     router_noise_eps=0.1), dtype=jnp.float32)
  params = noisy.init(jax.random.key(1), x)
  shared = {"params": {k: v for k, v in params["params"].items() if k != "router_noise"}}
  y_eval, aux_eval = noisy.apply(params, x)
  y_plain, aux_plain = plain.apply(shared, x)
  np.testing.assert_array_equal(y_eval, y_plain)
  np.testing.assert_array_equal(aux_eval.router.logits, aux_plain.router.logits)
  rngs = {"router": jax.random.key(7)}
  y_a, aux_a = noisy.apply(params, x, rngs=rngs)
  y_b, _ = noisy.apply(params, x, rngs=rngs)
  np.testing.assert_array_equal(y_a, y_b)  # the same key, the same noise
  assert not np.array_equal(aux_a.router.logits, aux_plain.router.logits)


def test_router_noise_needs_its_eps():
  with pytest.raises(ValueError, match="router_noise_eps"):
    moe.MoEConfig(num_experts=4, top_k=2, d_ff=8, router_noise="jitter")
  with pytest.raises(ValueError, match="router_noise="):
    moe.MoEConfig(num_experts=4, top_k=2, d_ff=8, router_noise="dropout")
