"""Tests for simbal_jax.metrics: hand cases, float64 NumPy references, jit parity, errors."""

import functools
import itertools

import jax
import numpy as np
import pytest
import scipy.stats

from simbal_jax import metrics
from simbal_jax import specialization

E, K = 8, 2


def _rng(seed=0):
  return np.random.default_rng(seed)


def _random_topk(rng, shape, num_experts=E, top_k=K):
  """int32[*shape, K]: distinct experts per row, uniformly random."""
  scores = rng.random(tuple(shape) + (num_experts,))
  return np.argsort(-scores, axis=-1)[..., :top_k].astype(np.int32)


# ------------------------------------------------------------------------------------ load


def test_all_tokens_to_one_expert():
  index = np.full((16, 1), 3, np.int32)
  load = metrics.expert_load(index, E)
  np.testing.assert_allclose(load, np.eye(E)[3])
  assert float(metrics.max_vio(load)) == pytest.approx(E - 1)
  assert int(metrics.dead_experts(load)) == E - 1
  assert float(metrics.load_cv(load)) == pytest.approx(np.sqrt(E - 1), rel=1e-6)


def test_uniform_load():
  index = np.arange(2 * E, dtype=np.int32).reshape(E, 2) % E  # every expert exactly twice
  load = metrics.expert_load(index, E)
  np.testing.assert_allclose(load, np.full(E, 1 / E), rtol=1e-6)
  assert float(metrics.load_cv(load)) == pytest.approx(0.0, abs=1e-6)
  assert float(metrics.max_vio(load)) == pytest.approx(0.0, abs=1e-6)
  assert int(metrics.dead_experts(load)) == 0


def test_expert_load_random_masked_vs_numpy():
  rng = _rng(1)
  index = _random_topk(rng, (50,))
  mask = rng.random(50) < 0.6
  expected = np.zeros(E)
  for t in range(50):
    for k in range(K):
      expected[index[t, k]] += mask[t]
  expected /= expected.sum()
  np.testing.assert_allclose(metrics.expert_load(index, E, mask), expected, rtol=1e-6)
  # Load functions reduce over the last axis: one value per stacked layer.
  stacked = np.stack([expected, np.eye(E)[0]])
  cv = np.std(expected) / np.mean(expected)
  np.testing.assert_allclose(metrics.load_cv(stacked), [cv, np.sqrt(E - 1)], rtol=1e-5)
  np.testing.assert_allclose(metrics.max_vio(stacked),
                             [expected.max() / expected.mean() - 1, E - 1], rtol=1e-5)
  np.testing.assert_array_equal(metrics.dead_experts(stacked),
                                [np.sum(expected == 0), E - 1])


def test_expert_load_all_masked_is_zero():
  load = metrics.expert_load(np.zeros((4, K), np.int32), E, np.zeros(4, bool))
  np.testing.assert_array_equal(load, np.zeros(E))
  assert float(metrics.max_vio(load)) == 0.0 and float(metrics.load_cv(load)) == 0.0


# ------------------------------------------------------------------------- SEU and entropy


def test_seu_vs_numpy_with_mask():
  rng = _rng(2)
  index = _random_topk(rng, (5, 6))
  mask = rng.random((5, 6)) < 0.5
  mask[3] = False  # a fully padded sequence is left out of the mean
  fracs = []
  for b in range(5):
    used = {int(e) for l in range(6) if mask[b, l] for e in index[b, l]}
    if mask[b].any():
      fracs.append(len(used) / E)
  assert float(metrics.seu(index, E, mask)) == pytest.approx(np.mean(fracs), rel=1e-6)
  unmasked = np.mean([len(set(index[b].ravel().tolist())) / E for b in range(5)])
  assert float(metrics.seu(index, E)) == pytest.approx(unmasked, rel=1e-6)


def test_seu_hand_cases():
  one_expert = np.zeros((3, 4, 1), np.int32)
  assert float(metrics.seu(one_expert, E)) == pytest.approx(1 / E)
  every = np.arange(E, dtype=np.int32).reshape(1, E // K, K)
  assert float(metrics.seu(every, E)) == pytest.approx(1.0)


def test_routing_entropy_vs_numpy_with_mask():
  rng = _rng(3)
  logits = rng.normal(size=(40, E)) * 2
  probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  probs[0] = np.eye(E)[2]  # exact zeros: 0 log 0 = 0
  mask = rng.random(40) < 0.7
  mask[0] = True
  ent = np.array([-sum(p * np.log(p) for p in row if p > 0) for row in probs])
  got = metrics.routing_entropy(probs.astype(np.float32), mask)
  assert float(got) == pytest.approx(ent[mask].mean(), rel=1e-5)
  uniform = np.full((3, E), 1 / E, np.float32)
  assert float(metrics.routing_entropy(uniform)) == pytest.approx(np.log(E), rel=1e-6)


def test_load_tv_vs_numpy_and_same_set_is_zero():
  rng = _rng(5)
  p = rng.random((3, E))
  q = rng.random((3, E))
  p[1, :3] = 0.0  # an expert no token of one set reaches
  ref = 0.5 * np.abs(p / p.sum(-1, keepdims=True) - q / q.sum(-1, keepdims=True)).sum(-1)
  np.testing.assert_allclose(metrics.load_tv(p, q), ref, rtol=1e-5)
  np.testing.assert_array_equal(metrics.load_tv(p, p), np.zeros(3))  # two copies of one set
  # Hand case: fractions [0.5, 0.5, 0, 0] and counts [0, 2, 1, 1] -> 0.5 * (0.5+0.0+0.25+0.25).
  assert float(metrics.load_tv(np.array([0.5, 0.5, 0, 0]), np.array([0, 2, 1, 1.0]))) == 0.5
  assert float(metrics.load_tv(np.eye(E)[0], np.eye(E)[1])) == 1.0  # disjoint
  with pytest.raises(ValueError, match="load_q_E must have the shape"):
    metrics.load_tv(p, q[:2])


def test_undecided_share_vs_numpy_with_mask():
  rng = _rng(6)
  logits = rng.normal(size=(50, E)) * rng.choice([0.05, 3.0], size=(50, 1))  # flat and peaked
  probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  mask = rng.random(50) < 0.8
  for delta in (0.0, 0.05, 0.2):
    undecided = probs.max(-1) < 1.0 / E + delta
    got = metrics.undecided_share(probs.astype(np.float32), delta, mask)
    assert float(got) == pytest.approx(undecided[mask].mean(), rel=1e-6)
  assert 0 < float(metrics.undecided_share(probs.astype(np.float32))) < 1
  assert float(metrics.undecided_share(np.full((4, E), 1.0 / E, np.float32), 0.01)) == 1.0
  assert float(metrics.undecided_share(np.eye(E, dtype=np.float32))) == 0.0
  with pytest.raises(ValueError, match="delta must be >= 0"):
    metrics.undecided_share(probs, -0.1)


def test_expert_norms_vs_numpy():
  rng = _rng(7)
  ws = [rng.normal(size=(E, 5, 3)), rng.normal(size=(E, 5, 3)), rng.normal(size=(E, 3, 5))]
  ws[0][2] = ws[1][2] = ws[2][2] = 0.0  # a stagnant expert (no gradient)
  ref = np.sqrt(sum((w.astype(np.float32).astype(np.float64) ** 2).reshape(E, -1).sum(-1)
                    for w in ws))
  got = metrics.expert_norms([w.astype(np.float32) for w in ws])
  np.testing.assert_allclose(got, ref, rtol=1e-6)
  assert float(got[2]) == 0.0
  with pytest.raises(ValueError, match="with the same E, got shapes"):
    metrics.expert_norms([ws[0], ws[1][:4]])
  with pytest.raises(ValueError, match="non-empty"):
    metrics.expert_norms([])


# ----------------------------------------------------------------------------- orthogonality


def test_orthogonality_gap_vs_numpy():
  rng = _rng(4)
  kernels = rng.normal(size=(3, 16, E)) / 4
  got = metrics.orthogonality_gap(kernels.astype(np.float32))
  for layer in range(3):
    r = kernels.astype(np.float32).astype(np.float64)[layer]
    diff = r.T @ r - np.eye(E)
    assert float(got.l1[layer]) == pytest.approx(np.abs(diff).sum(), rel=1e-5)
    assert float(got.mse[layer]) == pytest.approx((diff ** 2).mean(), rel=1e-5)
  q, _ = np.linalg.qr(rng.normal(size=(16, E)))
  orth = metrics.orthogonality_gap(q.astype(np.float32))
  assert float(orth.l1) < 1e-4 and float(orth.mse) < 1e-10


# ------------------------------------------------------------------------------------- PES


def _pes_numpy(outputs, mask=None):
  """float64 double loop over expert pairs; a zero output has cosine 0 with everything."""
  outputs = np.asarray(outputs, np.float64)
  per_token = []
  for t in range(outputs.shape[0]):
    cosines = []
    for i, j in itertools.combinations(range(outputs.shape[1]), 2):
      a, b = outputs[t, i], outputs[t, j]
      denom = np.linalg.norm(a) * np.linalg.norm(b)
      cosines.append(a @ b / denom if denom > 0 else 0.0)
    per_token.append(np.mean(cosines))
  per_token = np.array(per_token)
  return per_token.mean() if mask is None else per_token[mask].mean()


def _correlated_outputs(seed, tokens=24, experts=E, dim=16):
  rng = _rng(seed)
  common = rng.normal(size=(tokens, 1, dim))
  return (common + rng.normal(size=(tokens, experts, dim))).astype(np.float32)


def test_pes_identical_experts_is_one():
  rng = _rng(5)
  outputs = np.repeat(rng.normal(size=(10, 1, 16)), E, axis=1) * rng.uniform(0.5, 2, (10, E, 1))
  assert float(specialization.pes(outputs.astype(np.float32))) == pytest.approx(1.0, abs=1e-5)


def test_pes_orthogonal_experts_is_zero():
  rng = _rng(6)
  outputs = []
  for _ in range(10):  # per token: expert i outputs a scaled i-th column of a random rotation
    q, _ = np.linalg.qr(rng.normal(size=(16, 16)))
    outputs.append(q[:, :E].T * rng.uniform(0.1, 10, (E, 1)))
  assert float(specialization.pes(np.array(outputs, np.float32))) == pytest.approx(0.0, abs=1e-5)


def test_pes_random_vs_numpy_loop_with_mask_and_zero_output():
  outputs = _correlated_outputs(7)
  outputs[2, 5] = 0.0  # a zero-norm expert output must not give NaN
  mask = _rng(8).random(24) < 0.6
  mask[2] = True
  expected = _pes_numpy(outputs)
  assert 0.2 < expected < 0.8  # the case is not trivially 0 or 1
  assert float(specialization.pes(outputs)) == pytest.approx(expected, abs=2e-6)
  assert float(specialization.pes(outputs, mask)) == pytest.approx(_pes_numpy(outputs, mask), abs=2e-6)


def test_pes_sampled_within_three_stderr():
  outputs = _correlated_outputs(9, tokens=200, dim=8) * _rng(10).uniform(0.2, 3, (200, 1, 1))
  exact = float(specialization.pes(outputs))
  est = specialization.pes_sampled(jax.random.key(0), outputs, num_tokens=64, num_pairs=5)
  assert (est.num_tokens, est.num_pairs) == (64, 5) and isinstance(est.num_tokens, int)
  assert float(est.stderr) > 0
  assert abs(float(est.mean) - exact) < 3 * float(est.stderr)


def test_pes_sampled_all_tokens_all_pairs_is_exact():
  outputs = _correlated_outputs(11, tokens=12)
  est = specialization.pes_sampled(jax.random.key(1), outputs, 12, E * (E - 1) // 2)
  assert float(est.mean) == pytest.approx(_pes_numpy(outputs), abs=2e-6)


def test_pes_sample_indices_are_distinct_pairs():
  tokens, first, second = specialization.pes_sample_indices(jax.random.key(2), 30, E, 20, 10)
  tokens, first, second = map(np.asarray, (tokens, first, second))
  assert len(set(tokens.tolist())) == 20 and tokens.max() < 30
  assert np.all(first < second) and second.max() < E
  for row_i, row_j in zip(first, second):
    assert len(set(zip(row_i.tolist(), row_j.tolist()))) == 10
  more = specialization.pes_sample_indices(jax.random.key(2), 5, E, 9, 1)[0]  # N > T: replacement
  assert np.asarray(more).shape == (9,) and np.asarray(more).max() < 5


# ---------------------------------------------------------------------- routing consistency


def test_spearman_with_ties_vs_scipy():
  rng = _rng(12)
  a = rng.normal(size=300)
  b = np.round(a + rng.normal(size=300), 0) / 3  # many ties
  b[:40] = 0.0
  expected = scipy.stats.spearmanr(a, b).statistic
  got = specialization.spearman(a.astype(np.float32), b.astype(np.float32))
  assert float(got) == pytest.approx(expected, abs=1e-5)
  assert float(specialization.spearman(a, np.ones(300))) == 0.0


def test_routing_consistency_direction_determines_experts():
  # Tokens near a circle in a 2-D plane, experts evenly spaced on it: top-k of x @ W picks the
  # k experts nearest in angle, so overlap falls as the angle between tokens grows.
  rng = _rng(13)
  num_experts, top_k, tokens = 16, 8, 256
  theta = rng.uniform(0, 2 * np.pi, tokens)
  x = np.zeros((tokens, 32))
  x[:, 0], x[:, 1] = np.cos(theta), np.sin(theta)
  x += 0.01 * rng.normal(size=x.shape)
  w = np.zeros((32, num_experts))
  phi = 2 * np.pi * np.arange(num_experts) / num_experts
  w[0], w[1] = np.cos(phi), np.sin(phi)
  index = np.argsort(-(x @ w), axis=-1)[:, :top_k].astype(np.int32)
  rho = specialization.routing_consistency(jax.random.key(3), x.astype(np.float32), index, 2000)
  assert float(rho) > 0.9


def test_routing_consistency_random_choices_near_zero():
  rng = _rng(14)
  x = rng.normal(size=(256, 32)).astype(np.float32)
  index = _random_topk(rng, (256,), num_experts=16, top_k=4)
  rho = specialization.routing_consistency(jax.random.key(4), x, index, 4000)
  assert abs(float(rho)) < 0.1


# --------------------------------------------------------------------------- summary and jit


def test_summarize_single_and_stacked():
  rng = _rng(15)
  probs = rng.dirichlet(np.ones(E), size=(3, 12)).astype(np.float32)
  index = _random_topk(rng, (3, 12))
  mask = rng.random(12) < 0.8
  routed = type("Routed", (), {"probs": probs, "expert_index": index})()
  stacked = metrics.summarize(routed, E, mask, seq_len=4)
  assert set(stacked) == {"load_cv", "max_vio", "dead_experts", "entropy", "seu"}
  for layer in range(3):
    load = metrics.expert_load(index[layer], E, mask)
    assert float(stacked["max_vio"][layer]) == pytest.approx(float(metrics.max_vio(load)))
    assert float(stacked["seu"][layer]) == pytest.approx(
        float(metrics.seu(index[layer].reshape(3, 4, K), E, mask.reshape(3, 4))))
    assert float(stacked["entropy"][layer]) == pytest.approx(
        float(metrics.routing_entropy(probs[layer], mask)))
  one = type("Routed", (), {"probs": probs[0], "expert_index": index[0]})()
  assert set(metrics.summarize(one, E)) == {"load_cv", "max_vio", "dead_experts", "entropy"}


def test_jit_matches_eager():
  rng = _rng(16)
  index = _random_topk(rng, (4, 6))
  mask = rng.random((4, 6)) < 0.7
  probs = rng.dirichlet(np.ones(E), size=24).astype(np.float32)
  outputs = _correlated_outputs(17, tokens=16)
  x = rng.normal(size=(24, 8)).astype(np.float32)
  key = jax.random.key(5)
  cases = [
      (lambda i, m: metrics.expert_load(i, E, m), (index.reshape(24, K), mask.reshape(24))),
      (lambda i, m: metrics.seu(i, E, m), (index, mask)),
      (metrics.routing_entropy, (probs, mask.reshape(24))),
      (metrics.orthogonality_gap, (rng.normal(size=(2, 8, E)).astype(np.float32),)),
      (specialization.pes, (outputs,)),
      (functools.partial(specialization.pes_sampled, num_tokens=8, num_pairs=3), (key, outputs)),
      (functools.partial(specialization.routing_consistency, num_pairs=50),
       (key, x, index.reshape(24, K))),
  ]
  for fn, args in cases:
    eager = jax.tree.leaves(fn(*args))
    jitted = jax.tree.leaves(jax.jit(fn)(*args))
    for e, j in zip(eager, jitted):
      np.testing.assert_allclose(np.asarray(e), np.asarray(j), rtol=1e-5, atol=1e-6)
  load = metrics.expert_load(index.reshape(24, K), E)
  for fn in (metrics.load_cv, metrics.max_vio, metrics.dead_experts):
    np.testing.assert_allclose(fn(load), jax.jit(fn)(load), rtol=1e-6)


# ------------------------------------------------------------------- change over training


def _np_churn(a, b, mask=None):
  """1 - mean over valid tokens of |set(a_t) & set(b_t)| / K, with Python sets."""
  a, b = np.asarray(a).reshape(-1, a.shape[-1]), np.asarray(b).reshape(-1, b.shape[-1])
  w = np.ones(len(a), bool) if mask is None else np.asarray(mask).reshape(-1)
  overlaps = [len(set(x) & set(y)) / a.shape[1] for x, y, ok in zip(a, b, w) if ok]
  return 1.0 - np.mean(overlaps) if overlaps else 0.0


def test_routing_churn_hand_case_identity_and_disjoint():
  a = np.array([[0, 1], [2, 3], [4, 5]], np.int32)
  b = np.array([[1, 0], [2, 7], [6, 5]], np.int32)  # overlaps 2/2 (order ignored), 1/2, 1/2
  assert float(metrics.routing_churn(a, b)) == pytest.approx(1 - (1 + 0.5 + 0.5) / 3)
  assert float(metrics.routing_churn(a, b, np.array([False, True, True]))) == pytest.approx(0.5)
  assert float(metrics.routing_churn(a, a[:, ::-1])) == 0.0  # identical sets
  assert float(metrics.routing_churn(a, (a + 6) % 12)) == 1.0  # disjoint sets
  assert float(metrics.routing_churn(a, b, np.zeros(3, bool))) == 0.0  # no valid token


def test_routing_churn_random_vs_numpy_with_mask_jit_and_layers():
  rng = _rng(7)
  a = _random_topk(rng, (3, 5, 40), num_experts=16, top_k=4)  # [Lm, B, L, K]
  b = np.where(rng.random(a.shape[:-1] + (1,)) < 0.6, a,
               _random_topk(rng, (3, 5, 40), num_experts=16, top_k=4))
  mask = rng.random((5, 40)) < 0.8
  for layer in range(3):
    np.testing.assert_allclose(metrics.routing_churn(a[layer], b[layer], mask),
                               _np_churn(a[layer], b[layer], mask), rtol=1e-6)
  per_layer = jax.jit(jax.vmap(lambda x, y: metrics.routing_churn(x, y, mask)))(a, b)
  np.testing.assert_allclose(per_layer, [_np_churn(a[i], b[i], mask) for i in range(3)],
                             rtol=1e-6)
  assert 0.2 < float(per_layer.mean()) < 0.6  # 40 % of tokens re-drawn


def test_expert_movement_and_stagnant_vs_numpy():
  rng = _rng(8)
  old = [rng.normal(size=(6, 4, 3)), rng.normal(size=(6, 3, 4))]
  step = np.array([1.0, 0.5, 0.2, 1e-3, 0.0, 0.3])[:, None, None]
  new = [(x + step * rng.normal(size=x.shape)).astype(np.float32) for x in old]
  old = [x.astype(np.float32) for x in old]
  want = [np.sqrt(sum(np.sum((y[e].astype(np.float64) - x[e]) ** 2) for x, y in zip(old, new)))
          / np.sqrt(sum(np.sum(x[e].astype(np.float64) ** 2) for x in old)) for e in range(6)]
  got = metrics.expert_movement(old, new)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert float(got[4]) == 0.0
  # Median of the six movements lies between experts 2 and 5 (~0.1..0.2): experts 3 (1e-3
  # relative step) and 4 (unmoved) are below a tenth of it.
  assert int(metrics.stagnant_experts(got)) == 2
  assert list(np.asarray(metrics.stagnant_experts(np.stack([got, np.ones(6)])))) == [2, 0]
  zeros = [np.zeros((2, 3), np.float32)]
  assert list(np.asarray(metrics.expert_movement(zeros, zeros))) == [0.0, 0.0]


# ----------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("call, match", [
    (lambda: specialization.pes(np.ones((4, E), np.float32)), "rank 3"),
    (lambda: specialization.pes(np.ones((4, 1, 3), np.float32)), "at least 2 experts"),
    (lambda: specialization.pes(np.ones((4, E, 3)), np.ones(5, bool)), "mask_T"),
    (lambda: specialization.pes_sampled(jax.random.key(0), np.ones((4, 4, 3)), 2, 7), "num_pairs"),
    (lambda: specialization.pes_sampled(jax.random.key(0), np.ones((4, 4, 3)), 1, 2), "num_tokens"),
    (lambda: metrics.expert_load(np.zeros((4, 2), np.float32), E), "integer dtype"),
    (lambda: metrics.expert_load(np.zeros((4,), np.int32), E), "rank 2"),
    (lambda: metrics.expert_load(np.zeros((4, 2), np.int32), 2.5), "static Python int"),
    (lambda: metrics.expert_load(np.zeros((4, 2), np.int32), True), "num_experts must be an int, "
     "got bool"),  # the shared _checks.static_int (as routing always did)
    (lambda: metrics.seu(np.zeros((4, 2), np.int32), E), "rank 3"),
    (lambda: metrics.routing_entropy(np.ones((2, 3, E))), "rank 2"),
    (lambda: metrics.orthogonality_gap(np.ones(E)), "rank >= 2"),
    (lambda: specialization.routing_consistency(jax.random.key(0), np.ones((5, 3)),
                                         np.zeros((4, 2), np.int32), 10), "disagree on T"),
    (lambda: specialization.routing_consistency(jax.random.key(0), np.ones((5, 3)),
                                         np.zeros((5, 2), np.int32), 1), "num_pairs"),
    (lambda: specialization.spearman(np.ones(3), np.ones(4)), "equal size"),
    (lambda: metrics.routing_churn(np.zeros((4, 2), np.int32), np.zeros((4, 3), np.int32)),
     "expert_index_b must have the shape"),
    (lambda: metrics.routing_churn(np.zeros((4, 2)), np.zeros((4, 2))), "integer dtype"),
    (lambda: metrics.routing_churn(np.zeros(4, np.int32), np.zeros(4, np.int32)), "rank >= 2"),
    (lambda: metrics.routing_churn(np.zeros((4, 2), np.int32), np.zeros((4, 2), np.int32),
                                   np.ones(3, bool)), "mask must have shape"),
    (lambda: metrics.expert_movement([np.ones((2, 3))], [np.ones((2, 4))]), "new\\[0\\]"),
    (lambda: metrics.expert_movement([], []), "non-empty"),
    (lambda: metrics.stagnant_experts(np.ones(4), rel=0.0), "rel must be in"),
])
def test_bad_arguments_raise(call, match):
  with pytest.raises(ValueError, match=match):
    call()


def test_traced_static_int_raises():
  with pytest.raises(ValueError, match="static Python int"):
    jax.jit(metrics.expert_load)(np.zeros((4, 2), np.int32), E)
