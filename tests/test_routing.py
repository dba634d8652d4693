"""Tests for simbal_jax.routing against NumPy float64 references and plain Python loops."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simbal_jax import routing

def _distinct_logits(rng, t, e):
  """Random logits whose values (and hence probs / sigmoids) are pairwise distinct per row."""
  base = rng.permutation(t * e).reshape(t, e).astype(np.float64)
  return (base / (t * e) * 6.0 - 3.0 + rng.uniform(0, 1e-3, size=(t, e))).astype(np.float32)


def _np_route(logits, k, gating, renormalize, bias=None):
  x = logits.astype(np.float64)
  sm = np.exp(x - x.max(-1, keepdims=True))
  sm /= sm.sum(-1, keepdims=True)
  sig = 1.0 / (1.0 + np.exp(-x))
  score = {"softmax_topk": sm, "topk_softmax": x, "sigmoid": sig}[gating]
  select = score + (0.0 if bias is None else bias.astype(np.float64))
  idx = np.argsort(-select, axis=-1, kind="stable")[:, :k]
  chosen = np.take_along_axis(score, idx, -1)
  if gating == "softmax_topk":
    gates = chosen / chosen.sum(-1, keepdims=True) if renormalize else chosen
    probs = sm
  elif gating == "topk_softmax":
    gates = np.exp(chosen - chosen.max(-1, keepdims=True))
    gates /= gates.sum(-1, keepdims=True)
    probs = sm
  else:
    gates = chosen / chosen.sum(-1, keepdims=True)
    probs = sig / sig.sum(-1, keepdims=True)
  return probs, gates, idx


@pytest.mark.parametrize("gating,renormalize", [("softmax_topk", False), ("softmax_topk", True),
                                                ("topk_softmax", False), ("sigmoid", False)])
def test_route_matches_numpy(gating, renormalize):
  rng = np.random.default_rng(0)
  logits = _distinct_logits(rng, 16, 8)
  out = routing.route(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32), 3, gating=gating,
                      renormalize=renormalize)
  logits32 = np.asarray(out.logits)
  probs, gates, idx = _np_route(logits32, 3, gating, renormalize)
  assert out.logits.dtype == out.probs.dtype == out.gates.dtype == jnp.float32
  assert out.expert_index.dtype == jnp.int32
  assert out.gates.shape == (16, 3) and out.expert_index.shape == (16, 3)
  np.testing.assert_array_equal(out.expert_index, idx)
  np.testing.assert_allclose(out.gates, gates, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out.probs, probs, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(out.probs).sum(-1), 1.0, rtol=1e-5)
  gate_sum = np.asarray(out.gates).sum(-1)
  if gating == "softmax_topk" and not renormalize:
    # Sum of the K largest softmax probabilities: strictly inside (K/E, 1).
    np.testing.assert_allclose(gate_sum, np.sort(probs, -1)[:, -3:].sum(-1), rtol=1e-5)
    assert np.all(gate_sum < 1.0) and np.all(gate_sum > 3 / 8)
  else:
    np.testing.assert_allclose(gate_sum, 1.0, rtol=1e-5)


def test_route_bf16_input_upcast_and_jit():
  rng = np.random.default_rng(1)
  logits = jnp.asarray(_distinct_logits(rng, 8, 6), jnp.bfloat16)
  eager = routing.route(logits, 2, gating="sigmoid")
  jitted = jax.jit(routing.route, static_argnums=1, static_argnames="gating")(
      logits, 2, gating="sigmoid")
  assert eager.logits.dtype == jnp.float32
  np.testing.assert_array_equal(eager.expert_index, jitted.expert_index)
  np.testing.assert_allclose(eager.gates, jitted.gates, rtol=1e-6)


@pytest.mark.parametrize("gating", routing.GATINGS)
def test_bias_changes_choice_not_gate_values(gating):
  rng = np.random.default_rng(2)
  logits = _distinct_logits(rng, 32, 8)
  bias = np.zeros(8, np.float32)
  bias[[5, 6]] = 100.0  # forces experts 5 and 6 into every token's top-2
  plain = routing.route(logits, 2, gating=gating)
  biased = routing.route(logits, 2, gating=gating, bias_E=jnp.asarray(bias))
  np.testing.assert_array_equal(np.sort(biased.expert_index, -1), np.tile([5, 6], (32, 1)))
  assert not np.array_equal(np.sort(plain.expert_index, -1), np.sort(biased.expert_index, -1))
  _, gates_ref, idx_ref = _np_route(logits, 2, gating, False, bias)
  np.testing.assert_array_equal(biased.expert_index, idx_ref)
  np.testing.assert_allclose(biased.gates, gates_ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(biased.probs, plain.probs, rtol=1e-6)
  if gating == "softmax_topk":
    # Gates are the unbiased probabilities at the chosen experts.
    np.testing.assert_allclose(
        biased.gates, np.take_along_axis(np.asarray(plain.probs), idx_ref, -1), rtol=1e-6)
  # No gradient reaches the bias; the logits do get one.
  g_bias, g_logits = jax.grad(
      lambda b, x: jnp.sum(routing.route(x, 2, gating=gating, bias_E=b).gates ** 2),
      argnums=(0, 1))(jnp.asarray(bias), jnp.asarray(logits))
  np.testing.assert_array_equal(g_bias, np.zeros(8))
  assert np.abs(np.asarray(g_logits)).sum() > 0


def test_expert_counts_vs_numpy():
  rng = np.random.default_rng(3)
  idx = rng.integers(0, 5, size=(20, 3))
  mask = rng.uniform(size=20) < 0.6
  np.testing.assert_array_equal(routing.expert_counts(jnp.asarray(idx), 5),
                                np.bincount(idx.ravel(), minlength=5))
  np.testing.assert_array_equal(routing.expert_counts(jnp.asarray(idx), 5, jnp.asarray(mask)),
                                np.bincount(idx[mask].ravel(), minlength=5))


def test_loss_free_update_hand_case():
  bias = jnp.array([[0.5, 0.0, -0.5, 0.0], [0.0, 0.0, 0.0, 0.0]], jnp.float32)
  counts = jnp.array([[1.0, 2.0, 3.0, 2.0], [0.0, 0.0, 8.0, 0.0]])  # means 2 and 2
  new = routing.loss_free_update(bias, counts, 0.25)
  np.testing.assert_allclose(new, [[0.75, 0.0, -0.75, 0.0], [0.25, 0.25, -0.25, 0.25]])
  np.testing.assert_allclose(routing.loss_free_update(bias[0], counts[0], 0.1),
                             [0.6, 0.0, -0.6, 0.0], rtol=1e-6)
  assert new.dtype == jnp.float32


@pytest.mark.parametrize("call,match", [
    (lambda: routing.route(jnp.zeros((4, 3)), 0), "top_k must be >= 1"),
    (lambda: routing.route(jnp.zeros((4, 3)), 4), "top_k must be <= 3"),
    (lambda: routing.route(jnp.zeros((2, 4, 3)), 1), "rank 2"),
    (lambda: routing.route(jnp.zeros((4, 3)), 1, gating="softmax"), "valid: 'softmax_topk'"),
    (lambda: routing.route(jnp.zeros((4, 3)), 1, bias_E=jnp.zeros(4)), r"bias_E must have"),
    (lambda: routing.route(jnp.zeros((4, 3)), 1.5), "static Python int"),
    (lambda: routing.expert_counts(jnp.zeros((4, 2), jnp.int32), 3, jnp.ones(5)), "mask_T"),
    (lambda: routing.loss_free_update(jnp.zeros(3), jnp.zeros(4), 0.1), "same shape"),
    (lambda: routing.expert_choice(jnp.zeros((4, 3)), 5), "capacity must be <= 4"),
    (lambda: routing.expert_choice(jnp.zeros((4, 3)), 0), "capacity must be >= 1"),
    (lambda: routing.expert_choice(jnp.zeros((4,)), 1), "rank 2"),
])
def test_bad_input_raises(call, match):
  with pytest.raises(ValueError, match=match):
    call()


@pytest.mark.parametrize("gating", routing.GATINGS)
def test_token_choice_assignments_are_the_route_fields(gating):
  """RouterOutput.assignments: row t = token t (token None), its K experts and gates as is."""
  logits = jax.random.normal(jax.random.PRNGKey(3), (10, 5))
  out = jax.jit(lambda lg: routing.route(lg, 2, gating=gating, bias_E=jnp.arange(5.) * 0.1))(
      logits)
  assign = out.assignments
  assert isinstance(assign, routing.Assignments) and assign.token is None
  assert assign.expert.shape == assign.gate.shape == (10, 2)
  np.testing.assert_array_equal(assign.expert, out.expert_index)
  np.testing.assert_array_equal(assign.gate, out.gates)
  assert len(out) == 4  # the RouterOutput fields are unchanged: the plan is a property


def test_expert_choice_vs_float64_numpy():
  """Each expert takes its C most probable tokens (softmax over experts); gates are those p."""
  rng = np.random.default_rng(11)
  t_count, num_experts, cap = 12, 4, 5
  logits = rng.normal(size=(t_count, num_experts))
  assign = jax.jit(routing.expert_choice, static_argnums=1)(jnp.asarray(logits, jnp.float32),
                                                              cap)
  p = np.exp(logits - logits.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  token = np.stack([np.argsort(-p[:, e], kind="stable")[:cap] for e in range(num_experts)])
  np.testing.assert_array_equal(assign.token, token)
  np.testing.assert_array_equal(assign.expert, np.repeat(np.arange(num_experts), cap).reshape(
      num_experts, cap))
  np.testing.assert_allclose(assign.gate, np.take_along_axis(p.T, token, 1), rtol=1e-6)
  assert assign.token.dtype == assign.expert.dtype == jnp.int32
  assert assign.gate.dtype == jnp.float32
  per_token = np.bincount(token.ravel(), minlength=t_count)
  assert per_token.sum() == num_experts * cap and per_token.max() > per_token.min()
  # The choice is not differentiated; the gates carry gradient into the logits.
  grad = jax.grad(lambda lg: jnp.sum(routing.expert_choice(lg, cap).gate))(jnp.asarray(logits))
  assert float(jnp.abs(grad).max()) > 0


@pytest.mark.parametrize("eps", [0.01, 0.3])
def test_jitter_is_uniform_multiplicative_noise(eps):
  n = 200_000
  u = np.asarray(routing.jitter(jax.random.key(0), jnp.ones((n // 4, 4)), eps), np.float64)
  assert u.min() >= 1.0 - eps and u.max() <= 1.0 + eps
  var = eps ** 2 / 3.0  # Uniform[1 - eps, 1 + eps]
  assert abs(u.mean() - 1.0) < 5.0 * math.sqrt(var / n)
  assert u.var() == pytest.approx(var, rel=0.02)
  x = np.asarray(jax.random.normal(jax.random.key(1), (8, 4)))
  got = np.asarray(routing.jitter(jax.random.key(0), jnp.asarray(x), eps))
  np.testing.assert_allclose(got, x * u[:8], rtol=1e-6)  # the same draw scales any input


def test_gaussian_noise_has_the_given_scale():
  n = 200_000
  logits = jnp.full((n // 8, 8), 2.0)
  z = np.asarray(routing.gaussian_noise(jax.random.key(0), logits, 0.5), np.float64) - 2.0
  assert abs(z.mean()) < 5.0 * 0.5 / math.sqrt(n)
  assert z.std() == pytest.approx(0.5, rel=0.01)
  std = jnp.broadcast_to(jnp.array([0.0, 1.0]), (n // 8, 2))  # a learned scale, per entry
  z = np.asarray(routing.gaussian_noise(jax.random.key(1), jnp.zeros_like(std), std))
  assert np.all(z[:, 0] == 0.0) and z[:, 1].std() == pytest.approx(1.0, rel=0.02)
