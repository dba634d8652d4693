"""Tests for simbal_jax.losses against NumPy float64 references, hand cases and sharded runs."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from jax.test_util import check_grads

from simbal_jax import init as init_lib
from simbal_jax import losses

E, K = 8, 2


def _softmax(x):
  x = np.asarray(x, np.float64)
  y = np.exp(x - x.max(-1, keepdims=True))
  return y / y.sum(-1, keepdims=True)


def _lse(x):
  x = np.asarray(x, np.float64)
  m = x.max(-1)
  return m + np.log(np.exp(x - m[..., None]).sum(-1))


def _random_routing(rng, t, e=E, k=K):
  logits = rng.normal(size=(t, e)).astype(np.float32)
  idx = np.stack([rng.choice(e, k, replace=False) for _ in range(t)]).astype(np.int32)
  return logits, _softmax(logits).astype(np.float32), idx


def _np_lbl(probs, idx, mask=None):
  """E * sum_i f_i P_i with explicit loops, float64."""
  t_count, e = probs.shape
  k = idx.shape[1]
  w = np.ones(t_count) if mask is None else np.asarray(mask, np.float64)
  assigned, psum = np.zeros(e), np.zeros(e)
  for t in range(t_count):
    for j in range(k):
      assigned[idx[t, j]] += w[t]
    psum += w[t] * probs[t].astype(np.float64)
  n = w.sum()
  return e * np.sum(assigned / (k * n) * psum / n)


def test_lbl_uniform_router_is_one_and_collapse_is_e():
  t_count = 16
  uniform = jnp.full((t_count, E), 1.0 / E)
  balanced = jnp.asarray([[(t * K + j) % E for j in range(K)] for t in range(t_count)])
  assert float(losses.load_balancing(uniform, balanced)) == pytest.approx(1.0, abs=1e-6)
  # Uniform probs with any assignment, or balanced assignment with any probs, also give 1.
  rng = np.random.default_rng(0)
  _, probs, idx = _random_routing(rng, t_count)
  assert float(losses.load_balancing(uniform, jnp.asarray(idx))) == pytest.approx(1.0, abs=1e-6)
  assert float(losses.load_balancing(jnp.asarray(probs), balanced)) == pytest.approx(1.0, abs=1e-6)
  # Collapsed top-1 router: everything to expert 0 with probability 1 -> E.
  collapsed = jnp.zeros((t_count, E)).at[:, 0].set(1.0)
  assert float(losses.load_balancing(collapsed, jnp.zeros((t_count, 1), jnp.int32))) == (
      pytest.approx(E))


def test_lbl_batch_and_sequence_scopes_vs_numpy():
  rng = np.random.default_rng(1)
  b, l = 3, 10
  _, probs, idx = _random_routing(rng, b * l)
  mask = rng.uniform(size=b * l) < 0.7
  mask[2 * l:] = False  # the last sequence is all padding
  got = losses.load_balancing(jnp.asarray(probs), jnp.asarray(idx))
  np.testing.assert_allclose(got, _np_lbl(probs, idx), rtol=1e-5)
  probs_bl, idx_bl = jnp.asarray(probs).reshape(b, l, E), jnp.asarray(idx).reshape(b, l, K)
  mask_bl = jnp.asarray(mask).reshape(b, l)
  got = losses.load_balancing(probs_bl, idx_bl, mask=mask_bl)
  np.testing.assert_allclose(got, _np_lbl(probs, idx, mask), rtol=1e-5)
  got = losses.load_balancing(probs_bl, idx_bl, scope="sequence", mask=mask_bl)
  per_seq = [_np_lbl(probs[s * l:(s + 1) * l], idx[s * l:(s + 1) * l], mask[s * l:(s + 1) * l])
             for s in range(2)]
  np.testing.assert_allclose(got, np.mean(per_seq), rtol=1e-5)
  assert abs(float(got) - _np_lbl(probs, idx, mask)) > 1e-3  # scopes really differ


def _np_lbl_micro(probs_bl, idx_bl, mask_bl, m):
  """Mean over groups of m consecutive sequences (with a token) of each group's LBL, float64."""
  b, l = mask_bl.shape
  values = []
  for g in range(b // m):
    rows = slice(g * m, (g + 1) * m)
    w = mask_bl[rows].reshape(-1)
    if w.sum() > 0:
      values.append(_np_lbl(probs_bl[rows].reshape(m * l, -1), idx_bl[rows].reshape(m * l, -1),
                            w))
  return np.mean(values)


def test_lbl_micro_scope_vs_numpy_groups_and_limits():
  rng = np.random.default_rng(11)
  b, l = 8, 6
  _, probs, idx = _random_routing(rng, b * l)
  mask = rng.uniform(size=b * l) < 0.75
  mask[2 * l:4 * l] = False  # sequences 2 and 3: the whole second group of m = 2 is padding
  probs_bl, idx_bl = probs.reshape(b, l, E), idx.reshape(b, l, K)
  mask_bl = mask.reshape(b, l)
  lbl = lambda m, msk=mask_bl, **kw: float(losses.load_balancing(
      jnp.asarray(probs_bl), jnp.asarray(idx_bl), scope="micro", micro_sequences=m,
      mask=None if msk is None else jnp.asarray(msk), **kw))
  for m in (1, 2, 4, 8):
    np.testing.assert_allclose(lbl(m), _np_lbl_micro(probs_bl, idx_bl, mask_bl, m), rtol=1e-5)
    np.testing.assert_allclose(lbl(m, None), _np_lbl_micro(
        probs_bl, idx_bl, np.ones((b, l), bool), m), rtol=1e-5)
  values = [lbl(m) for m in (1, 2, 4, 8)]
  assert len({round(v, 5) for v in values}) == 4  # the scopes really differ
  # m = 1 is "sequence", m = B is "batch".
  args = (jnp.asarray(probs_bl), jnp.asarray(idx_bl))
  assert lbl(1) == pytest.approx(float(losses.load_balancing(
      *args, scope="sequence", mask=jnp.asarray(mask_bl))), rel=1e-6)
  assert lbl(b) == pytest.approx(float(losses.load_balancing(
      *args, scope="batch", mask=jnp.asarray(mask_bl))), rel=1e-6)
  # Per-group stats, jit with a static m, and the gradient d/dprobs = E f_g / T_g / groups.
  loss, stats = losses.load_balancing(*args, scope="micro", micro_sequences=4, return_stats=True)
  assert stats.tokens.shape == (2,) and np.allclose(stats.tokens, [4 * l, 4 * l])
  jitted = jax.jit(functools.partial(losses.load_balancing, scope="micro", micro_sequences=4))
  np.testing.assert_allclose(jitted(*args), loss, rtol=1e-6)
  grad = np.asarray(jax.grad(lambda p: losses.load_balancing(
      p, args[1], scope="micro", micro_sequences=4))(args[0]))
  for g in range(2):
    f = np.bincount(idx_bl[4 * g:4 * g + 4].ravel(), minlength=E) / (K * 4 * l)
    np.testing.assert_allclose(grad[4 * g:4 * g + 4], np.broadcast_to(E * f / (4 * l) / 2,
                                                                       (4, l, E)), rtol=1e-5)


def test_lbl_micro_scope_refuses_uneven_groups_and_misuse():
  probs, idx = jnp.full((6, 3, E), 1.0 / E), jnp.zeros((6, 3, K), jnp.int32)
  with pytest.raises(ValueError, match="micro_sequences=4 does not divide the batch's 6 "):
    losses.load_balancing(probs, idx, scope="micro", micro_sequences=4)
  with pytest.raises(ValueError, match="micro_sequences must be given"):
    losses.load_balancing(probs, idx, scope="micro")
  with pytest.raises(ValueError, match="micro_sequences must be >= 1"):
    losses.load_balancing(probs, idx, scope="micro", micro_sequences=0)
  with pytest.raises(ValueError, match="only used with scope='micro'"):
    losses.load_balancing(probs, idx, scope="sequence", micro_sequences=2)
  with pytest.raises(ValueError, match="rank 3"):
    losses.load_balancing(probs[0], idx[0], scope="micro", micro_sequences=1)


def test_lbl_gradient_formula_and_finite_differences():
  rng = np.random.default_rng(2)
  t_count = 12
  logits, probs, idx = _random_routing(rng, t_count)
  grad = jax.grad(losses.load_balancing)(jnp.asarray(probs), jnp.asarray(idx))
  f = np.bincount(idx.ravel(), minlength=E) / (K * t_count)
  np.testing.assert_allclose(grad, np.tile(E * f / t_count, (t_count, 1)), rtol=1e-5)
  with jax.enable_x64(True):
    idx64 = jnp.asarray(idx)
    mask = jnp.asarray(rng.uniform(size=t_count) < 0.8)
    check_grads(jax.jit(lambda x: losses.load_balancing(jax.nn.softmax(x), idx64, mask=mask)),
                (jnp.asarray(logits, jnp.float64),), order=1, modes=("rev",))


def test_lbl_jit_and_vmap_over_layers():
  rng = np.random.default_rng(3)
  layers = [_random_routing(rng, 16) for _ in range(3)]
  probs = jnp.stack([jnp.asarray(p) for _, p, _ in layers])
  idx = jnp.stack([jnp.asarray(i) for _, _, i in layers])
  expected = [_np_lbl(p, i) for _, p, i in layers]
  np.testing.assert_allclose(jax.vmap(losses.load_balancing)(probs, idx), expected, rtol=1e-5)
  jitted = jax.jit(losses.load_balancing, static_argnames="scope")
  np.testing.assert_allclose(jitted(probs[1], idx[1], scope="global"), expected[1], rtol=1e-5)
  # Stacked stats broadcast through lbl_from_stats.
  stats = jax.vmap(losses.lbl_stats)(probs, idx)
  np.testing.assert_allclose(losses.lbl_from_stats(stats, K), expected, rtol=1e-5)


def test_gradient_accumulation_stats_and_external_fraction():
  rng = np.random.default_rng(4)
  m, t_m = 4, 8
  _, probs, idx = _random_routing(rng, m * t_m)
  probs, idx = jnp.asarray(probs), jnp.asarray(idx)
  micro = [(probs[i * t_m:(i + 1) * t_m], idx[i * t_m:(i + 1) * t_m]) for i in range(m)]
  parts = [losses.load_balancing(p, i, return_stats=True)[1] for p, i in micro]
  total = losses.combine_stats(*parts)
  np.testing.assert_allclose(losses.lbl_from_stats(total, K), _np_lbl(np.asarray(probs),
                                                                      np.asarray(idx)), rtol=1e-5)
  # A per-micro-batch call differentiates with its own f: E * f^m / T_m.
  g0 = jax.grad(losses.load_balancing)(*micro[0])
  f0 = np.bincount(np.asarray(micro[0][1]).ravel(), minlength=E) / (K * t_m)
  np.testing.assert_allclose(g0[0], E * f0 / t_m, rtol=1e-5)
  # Exact recipe: global f (stop-gradient) and global token count; terms sum to value and grad.
  f_global = losses.expert_fraction_from_stats(total, K)
  full_value, full_grad = jax.value_and_grad(losses.load_balancing)(probs, idx)
  term = lambda p, i: losses.lbl_from_stats(  # noqa: E731
      losses.lbl_stats(p, i), K, expert_fraction=f_global, total_tokens=total.tokens)
  values, grads = zip(*[jax.value_and_grad(term)(p, i) for p, i in micro])
  np.testing.assert_allclose(sum(values), full_value, rtol=1e-5)
  np.testing.assert_allclose(jnp.concatenate(grads), full_grad, rtol=1e-5)
  assert not np.allclose(g0, full_grad[:t_m] * m)  # the local-f gradient really is different
  # The keyword form on load_balancing uses the given f as well.
  np.testing.assert_allclose(
      losses.load_balancing(*micro[1], expert_fraction=f_global),
      losses.lbl_from_stats(parts[1], K, expert_fraction=f_global), rtol=1e-6)


def test_global_scope_under_shard_map_and_pmap():
  devices = jax.devices()
  n = len(devices)
  assert n == 8
  rng = np.random.default_rng(5)
  t_count = 4 * n
  logits, probs, idx = _random_routing(rng, t_count)
  mask = jnp.asarray(rng.uniform(size=t_count) < 0.8)
  targets = jnp.asarray(rng.integers(0, E, size=t_count))
  probs, idx, logits = jnp.asarray(probs), jnp.asarray(idx), jnp.asarray(logits)
  mesh = jax.make_mesh((n,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))

  def local(p, i, x, y, w):
    lbl = losses.load_balancing(p, i, scope="global", axis_name="data", mask=w)
    lbl_grad = jax.grad(lambda q: losses.load_balancing(q, i, scope="global", axis_name="data",
                                                         mask=w))(p)
    ce, z = losses.cross_entropy(x, y, w, axis_name="data")
    rz = losses.router_z_loss(x, w, axis_name="data")
    return lbl, lbl_grad, ce, z, rz

  sharded = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=P("data"),
                                  out_specs=(P(), P("data"), P(), P(), P())))
  lbl, lbl_grad, ce, z, rz = sharded(probs, idx, logits, targets, mask)
  np.testing.assert_allclose(lbl, _np_lbl(np.asarray(probs), np.asarray(idx), np.asarray(mask)),
                             rtol=1e-5)
  ref_grad = jax.grad(losses.load_balancing)(probs, idx, mask=mask)
  np.testing.assert_allclose(lbl_grad, ref_grad, rtol=1e-5)
  ref_ce, ref_z = losses.cross_entropy(logits, targets, mask)
  np.testing.assert_allclose([ce, z, rz], [ref_ce, ref_z, ref_z], rtol=1e-5)
  local_only = losses.load_balancing(probs[:4], idx[:4], scope="batch")
  assert abs(float(local_only) - float(lbl)) > 1e-4  # shards alone would give another value
  pmapped = jax.pmap(lambda p, i: losses.load_balancing(p, i, scope="global", axis_name="d"),
                     axis_name="d")(probs.reshape(n, 4, E), idx.reshape(n, 4, K))
  np.testing.assert_allclose(pmapped, np.full(n, _np_lbl(np.asarray(probs), np.asarray(idx))),
                             rtol=1e-5)


def test_z_losses_and_cross_entropy_vs_numpy_and_grads():
  rng = np.random.default_rng(6)
  logits = (3 * rng.normal(size=(2, 5, 11))).astype(np.float32)
  logits = np.asarray(jnp.asarray(logits, jnp.bfloat16), np.float32)  # exact in bf16 too
  targets = rng.integers(0, 11, size=(2, 5))
  mask = rng.uniform(size=(2, 5)) < 0.7
  lse = _lse(logits)
  ce_ref = (lse - np.take_along_axis(logits, targets[..., None], -1)[..., 0])
  np.testing.assert_allclose(losses.router_z_loss(logits.reshape(10, 11)), np.mean(lse**2),
                             rtol=1e-5)
  np.testing.assert_allclose(losses.logit_z_loss(logits, jnp.asarray(mask)),
                             (lse**2)[mask].mean(), rtol=1e-5)
  ce, z = losses.cross_entropy(jnp.asarray(logits, jnp.bfloat16), jnp.asarray(targets),
                               jnp.asarray(mask))
  np.testing.assert_allclose([ce, z], [ce_ref[mask].mean(), (lse**2)[mask].mean()], rtol=1e-5)
  assert ce.dtype == z.dtype == jnp.float32
  assert float(losses.router_z_loss(logits, jnp.zeros((2, 5)))) == 0.0  # empty mask -> 0
  with jax.enable_x64(True):
    x = jnp.asarray(logits, jnp.float64)
    y, w = jnp.asarray(targets), jnp.asarray(mask)
    check_grads(jax.jit(lambda a: losses.router_z_loss(a, w)), (x,), order=1, modes=("rev",))
    check_grads(jax.jit(lambda a: sum(losses.cross_entropy(a, y, w))), (x,), order=1,
                modes=("rev",))


def _np_simbal(kernel, norm="l1", normalize=False, reduction="sum"):
  w = np.asarray(kernel, np.float64).T  # PyTorch layout [E, D]
  if normalize:
    w = w / np.linalg.norm(w, axis=1, keepdims=True)
  diff = w @ w.T - np.eye(w.shape[0])
  total = np.abs(diff).sum() if norm == "l1" else (diff**2).sum()
  return total / w.shape[0]**2 if reduction == "mean" else total


def test_simbal_zero_for_orthogonal_kernels():
  rng = np.random.default_rng(7)
  q, _ = np.linalg.qr(rng.normal(size=(32, 8)))
  assert float(losses.simbal(jnp.asarray(q, jnp.float32))) < 1e-5
  stacked = init_lib.orthogonal_init()(jax.random.key(0), (3, 32, 8))
  assert stacked.shape == (3, 32, 8) and stacked.dtype == jnp.float32
  np.testing.assert_array_less(np.asarray(losses.simbal(stacked)), 1e-5)
  assert not np.allclose(stacked[0], stacked[1])
  scaled = init_lib.orthogonal_init(scale=2.0)(jax.random.key(1), (16, 4), jnp.bfloat16)
  assert scaled.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(scaled, np.float64).T @ np.asarray(scaled, np.float64),
                             4 * np.eye(4), atol=0.1)
  wide = np.asarray(init_lib.orthogonal_init()(jax.random.key(2), (4, 16)), np.float64)
  np.testing.assert_allclose(wide @ wide.T, np.eye(4), atol=1e-5)  # D < E: orthonormal rows
  assert float(losses.simbal(wide)) > 1.0


@pytest.mark.parametrize("norm,normalize,reduction", [("l1", False, "sum"), ("fro2", False, "sum"),
                                                      ("l1", True, "mean"), ("fro2", True, "sum")])
def test_simbal_variants_vs_numpy_and_grads(norm, normalize, reduction):
  rng = np.random.default_rng(8)
  kernels = rng.normal(scale=0.3, size=(2, 12, 6)).astype(np.float32)
  kw = dict(norm=norm, normalize=normalize, reduction=reduction)
  np.testing.assert_allclose(losses.simbal(kernels, **kw),
                             [_np_simbal(k, **kw) for k in kernels], rtol=1e-5)
  np.testing.assert_allclose(losses.simbal(jnp.asarray(kernels[0], jnp.bfloat16), **kw),
                             _np_simbal(np.asarray(jnp.asarray(kernels[0], jnp.bfloat16),
                                                   np.float64), **kw), rtol=1e-5)
  np.testing.assert_allclose(jax.jit(jax.vmap(lambda k: losses.simbal(k, **kw)))(kernels),
                             [_np_simbal(k, **kw) for k in kernels], rtol=1e-5)
  if (norm, normalize, reduction) == ("l1", False, "sum"):  # the paper's formula, literally
    w = kernels[0].astype(np.float64).T
    np.testing.assert_allclose(losses.simbal(kernels[0]), np.abs(w @ w.T - np.eye(6)).sum(),
                               rtol=1e-5)
  with jax.enable_x64(True):
    check_grads(jax.jit(lambda k: losses.simbal(k, **kw)), (jnp.asarray(kernels[0], jnp.float64),),
                order=1, modes=("rev",), eps=1e-6)


@pytest.mark.parametrize("call,match", [
    (lambda: losses.load_balancing(jnp.ones((4, E)), jnp.zeros((4, 2), jnp.int32), scope="local"),
     "valid: 'sequence', 'batch', 'global'"),
    (lambda: losses.load_balancing(jnp.ones((4, E)), jnp.zeros((4, 2), jnp.int32),
                                   scope="sequence"), "rank 3"),
    (lambda: losses.load_balancing(jnp.ones((4, E)), jnp.zeros((5, 2), jnp.int32)),
     "expert_index must have shape"),
    (lambda: losses.load_balancing(jnp.ones((4, E)), jnp.zeros((4, 9), jnp.int32)), "top_k"),
    (lambda: losses.load_balancing(jnp.ones((4, E)), jnp.zeros((4, 2), jnp.int32),
                                   axis_name="data"), "only used with scope='global'"),
    (lambda: losses.load_balancing(jnp.ones((4, E)), jnp.zeros((4, 2), jnp.int32),
                                   mask=jnp.ones(5)), "mask must have shape"),
    (lambda: losses.lbl_from_stats(losses.lbl_stats(jnp.ones((4, E)), jnp.zeros((4, 1),
                                                                              jnp.int32)), 0),
     "top_k must be >= 1"),
    (lambda: losses.router_z_loss(jnp.ones(5)), "rank >= 2"),
    (lambda: losses.cross_entropy(jnp.ones((2, 3, 5)), jnp.zeros((2, 4), jnp.int32)),
     "targets_BxL must have shape"),
    (lambda: losses.cross_entropy(jnp.ones((2, 3, 5)), jnp.zeros((2, 3))), "must be integer"),
    (lambda: losses.simbal(jnp.ones((4, 2)), norm="l2"), "valid: 'l1', 'fro2'"),
    (lambda: losses.simbal(jnp.ones((4, 2)), reduction="max"), "valid: 'sum', 'mean'"),
    (lambda: losses.simbal(jnp.ones(4)), "rank >= 2"),
    (lambda: init_lib.orthogonal_init()(jax.random.key(0), (4,)), "rank >= 2"),
])
def test_bad_input_raises(call, match):
  with pytest.raises(ValueError, match=match):
    call()
