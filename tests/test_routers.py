"""The routers of `moe.router`: expert choice and Sinkhorn against float64 NumPy loops, the MoE
block under each, their configs and variants, and tiny training runs."""

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.test_util import check_grads
import numpy as np
import pytest

from simbal_jax import eval_metrics
from simbal_jax import metrics
from simbal_jax import moe
from simbal_jax import routing
from simbal_jax import train
from simbal_jax.configs import base, demo
from simbal_jax.experiments import convergence
from simbal_jax.runio import writers

from conftest import losses_of, tiny_config

D, E, K, F = 16, 4, 2, 8


def _np_softmax(logits):
  p = np.exp(logits - logits.max(-1, keepdims=True))
  return p / p.sum(-1, keepdims=True)


def _np_expert_choice(logits, cap, groups):
  """float64 loop: {(global token, expert): gate} and the per-group rows (token, gate)."""
  p = _np_softmax(np.asarray(logits, np.float64))
  tokens = p.shape[0] // groups
  chosen, rows = {}, []
  for g in range(groups):
    pg = p[g * tokens:(g + 1) * tokens]
    for e in range(p.shape[1]):
      top = np.argsort(-pg[:, e], kind="stable")[:cap]  # ties: the lower token
      rows.append((top, pg[top, e]))
      for t in top:
        chosen[(g * tokens + int(t), e)] = pg[t, e]
  return chosen, rows


def _np_sinkhorn(logits, k, iters):
  """float64 Sinkhorn: rows to mass K, then columns to mass T K / E, `iters` times."""
  a = np.exp(np.asarray(logits, np.float64))
  t, e = a.shape
  u, v = np.ones(t), np.ones(e)
  for _ in range(iters):
    u = k / (a @ v)
    v = (t * k / e) / (a.T @ u)
  return u[:, None] * a * v[None, :]


def _silu(z):
  return z / (1.0 + np.exp(-z))


def _np_experts(params, x):
  """float64 SwiGLU of every expert for every token: [T, E, D]."""
  p = {k: np.asarray(v, np.float64) for k, v in params["params"].items()}
  return np.stack([(_silu(x @ p["wi_gate"][e]) * (x @ p["wi_up"][e])) @ p["wo"][e]
                   for e in range(p["router"].shape[1])], axis=1)


def _block(cfg, seed=0, batch=2, length=8):
  block = moe.MoEBlock(cfg, dtype=jnp.float32)
  x = jax.random.normal(jax.random.key(seed), (batch, length, D), jnp.float32)
  params = nn.unbox(jax.jit(block.init)(jax.random.key(seed + 1), x))
  return block, params, x


# ----------------------------------------------------------------------------------------------
# Expert choice.


@pytest.mark.parametrize("groups,cap", [(1, 5), (2, 3), (3, 2)])
def test_expert_choice_per_group_vs_float64_loop(groups, cap):
  """Each expert takes exactly C tokens of every group: the float64 loop's sets and gates."""
  rng = np.random.default_rng(groups)
  t_count = 12
  logits = rng.normal(size=(t_count, E))
  assign = jax.jit(routing.expert_choice, static_argnums=(1, 2))(
      jnp.asarray(logits, jnp.float32), cap, groups)
  chosen, rows = _np_expert_choice(logits, cap, groups)
  assert assign.token.shape == assign.expert.shape == assign.gate.shape == (groups * E, cap)
  for n, (top, gate) in enumerate(rows):
    np.testing.assert_array_equal(assign.token[n], top)
    np.testing.assert_array_equal(assign.expert[n], n % E)
    np.testing.assert_allclose(assign.gate[n], gate, rtol=1e-6)
  # Every expert exactly C tokens per group, so the counts are perfectly even.
  counts = np.asarray(routing.expert_counts(assign.expert, E))
  np.testing.assert_array_equal(counts, groups * cap)
  mask = np.asarray(routing.assignment_mask(assign, t_count, E, groups))
  want = np.zeros((t_count, E), bool)
  for (t, e) in chosen:
    want[t, e] = True
  np.testing.assert_array_equal(mask, want)
  assert mask.sum(1).min() < mask.sum(1).max()  # a token gets 0..E experts, not always K
  padded = np.asarray(routing.padded_index(mask))
  np.testing.assert_array_equal(padded, np.where(want, np.arange(E), E))
  np.testing.assert_array_equal(np.asarray(routing.expert_counts(padded, E)), counts)


def test_expert_choice_gate_gradients_match_finite_differences():
  """float64: the gates' gradient w.r.t. the logits (the choice is held fixed) is the
  softmax's, checked by finite differences."""
  rng = np.random.default_rng(4)
  logits = rng.normal(size=(10, E))
  weights = rng.normal(size=(2 * E, 3))
  with jax.enable_x64(True):
    w = jnp.asarray(weights)
    fn = jax.jit(lambda lg: jnp.sum(w * routing.expert_choice(lg, 3, 2).gate))
    check_grads(fn, (jnp.asarray(logits, jnp.float64),), order=1, modes=("rev",))
    grad = np.asarray(jax.grad(fn)(jnp.asarray(logits, jnp.float64)))
  # The same gradient by hand: d(sum_a w_a p[t_a, e_a]) / d logits through the softmax.
  _, rows = _np_expert_choice(logits, 3, 2)
  p = _np_softmax(logits)
  dp = np.zeros_like(p)
  for n, (top, _) in enumerate(rows):
    dp[(n // E) * 5 + top, n % E] += weights[n]
  want = p * (dp - np.sum(dp * p, axis=1, keepdims=True))
  np.testing.assert_allclose(grad, want, rtol=1e-9, atol=1e-12)


def test_expert_choice_block_vs_float64_loop():
  """MoE block, router expert_choice, 2 groups: the float64 per-token loop over the experts
  that picked each token; exactly even counts, nothing dropped; capacity_factor scales C."""
  for factor, cap in ((0.0, 4), (1.5, 6)):  # groups of 8 tokens: C = ceil(8 * 2 / 4 * f)
    cfg = moe.MoEConfig(num_experts=E, top_k=K, d_ff=F, router="expert_choice", num_groups=2,
                        capacity_factor=factor, router_init="normal")
    assert cfg.expert_capacity(8) == cap
    block, params, x = _block(cfg, seed=2)
    y, aux = jax.jit(block.apply)(params, x)
    x64 = np.asarray(x, np.float64).reshape(-1, D)
    logits = x64 @ np.asarray(params["params"]["router"], np.float64)
    chosen, _ = _np_expert_choice(logits, cap, 2)
    outs = _np_experts(params, x64)
    ref = np.zeros_like(x64)
    for (t, e), gate in chosen.items():
      ref[t] += gate * outs[t, e]
    np.testing.assert_allclose(np.asarray(y).reshape(-1, D), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(aux.counts), 2 * cap)
    assert abs(float(aux.dropped)) < 1e-6
    assert aux.assigned.shape == (16, E) and int(aux.assigned.sum()) == len(chosen)
    # aux.router: token choice's top-K view of the same probabilities (the causal routing).
    np.testing.assert_allclose(np.asarray(aux.router.probs), _np_softmax(logits), rtol=1e-5)
    np.testing.assert_array_equal(np.sort(np.asarray(aux.router.expert_index), -1),
                                  np.sort(np.argsort(-logits, -1)[:, :K], -1))


def test_expert_choice_buckets_equals_capacity():
  """dispatch="buckets" runs the same exact C-slot buffers (the load is known: C)."""
  kw = dict(num_experts=E, top_k=K, d_ff=F, router="expert_choice", router_init="normal")
  block, params, x = _block(moe.MoEConfig(**kw), seed=6)
  y, aux = jax.jit(block.apply)(params, x)
  y_b, aux_b = jax.jit(moe.MoEBlock(moe.MoEConfig(**kw, dispatch="buckets"),
                                    dtype=jnp.float32).apply)(params, x)
  np.testing.assert_array_equal(y, y_b)
  np.testing.assert_array_equal(aux.counts, aux_b.counts)


def test_token_choice_is_the_default_and_unchanged():
  """router="token_choice" is the default and the block is the same as before: the float64
  per-token top-k loop, no assignment mask, the causal config is itself (dropless)."""
  cfg = moe.MoEConfig(num_experts=E, top_k=K, d_ff=F, capacity_factor=0.0, router_init="normal")
  assert cfg.router == "token_choice" and cfg.causal() == cfg
  block, params, x = _block(cfg, seed=3)
  y, aux = jax.jit(block.apply)(params, x)
  y_tc, _ = jax.jit(moe.MoEBlock(moe.MoEConfig(
      num_experts=E, top_k=K, d_ff=F, capacity_factor=0.0, router_init="normal",
      router="token_choice"), dtype=jnp.float32).apply)(params, x)
  np.testing.assert_array_equal(y, y_tc)
  assert aux.assigned is None
  x64 = np.asarray(x, np.float64).reshape(-1, D)
  p = _np_softmax(x64 @ np.asarray(params["params"]["router"], np.float64))
  outs = _np_experts(params, x64)
  ref = np.zeros_like(x64)
  for t in range(x64.shape[0]):
    for e in np.argsort(-p[t], kind="stable")[:K]:
      ref[t] += p[t, e] * outs[t, e]
  np.testing.assert_allclose(np.asarray(y).reshape(-1, D), ref, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Sinkhorn.


def test_sinkhorn_plan_vs_float64_iteration_and_convergence():
  """The plan equals the float64 iteration; columns are exact after every iteration, rows
  converge to K."""
  rng = np.random.default_rng(7)
  t_count = 16
  logits = 2.0 * rng.normal(size=(t_count, E))
  errors = []
  for iters in (1, 3, 8, 50):
    plan = np.exp(np.asarray(jax.jit(routing.sinkhorn_log_plan, static_argnums=(1, 2))(
        jnp.asarray(logits, jnp.float32), K, iters), np.float64))
    ref = _np_sinkhorn(logits, K, iters)
    np.testing.assert_allclose(plan, ref, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(plan.sum(0), t_count * K / E, rtol=1e-5)
    errors.append(np.abs(ref.sum(1) - K).max())
  assert errors[0] > 0.05 and errors == sorted(errors, reverse=True) and errors[-1] < 1e-6
  with jax.enable_x64(True):  # float64 stays float64; large logits are safe (log domain)
    big = jnp.asarray(logits * 100.0)
    log_plan = routing.sinkhorn_log_plan(big, K, 8)
    assert log_plan.dtype == jnp.float64 and bool(jnp.all(jnp.isfinite(log_plan)))


def test_sinkhorn_block_training_vs_float64_loop_and_eval_is_token_choice():
  """Training (a "router" RNG stream): each token's top-K of the per-group float64 Sinkhorn
  plan, gates the softmax probabilities at those experts (gradients through them); evaluation:
  exactly the token-choice block."""
  kw = dict(num_experts=E, top_k=K, d_ff=F, capacity_factor=0.0, router_init="normal",
            num_groups=2)
  cfg = moe.MoEConfig(**kw, router="sinkhorn", sinkhorn_iters=5)
  block, params, x = _block(cfg, seed=4)
  y_eval, aux_eval = jax.jit(block.apply)(params, x)
  y_tc, aux_tc = jax.jit(moe.MoEBlock(moe.MoEConfig(**kw), dtype=jnp.float32).apply)(params, x)
  np.testing.assert_array_equal(y_eval, y_tc)
  np.testing.assert_array_equal(aux_eval.router.expert_index, aux_tc.router.expert_index)

  train_apply = jax.jit(lambda p, x: block.apply(p, x, rngs={"router": jax.random.key(0)}))
  y, aux = train_apply(params, x)
  x64 = np.asarray(x, np.float64).reshape(-1, D)
  logits = x64 @ np.asarray(params["params"]["router"], np.float64)
  p = _np_softmax(logits)
  outs = _np_experts(params, x64)
  ref, chosen = np.zeros_like(x64), []
  for g in range(2):
    plan = _np_sinkhorn(logits[g * 8:(g + 1) * 8], K, 5)
    for t in range(8):
      top = np.argsort(-plan[t], kind="stable")[:K]
      chosen.append(top)
      for e in top:
        ref[g * 8 + t] += p[g * 8 + t, e] * outs[g * 8 + t, e]
  np.testing.assert_array_equal(np.asarray(aux.router.expert_index), np.stack(chosen))
  assert not np.array_equal(aux.router.expert_index, aux_tc.router.expert_index)  # it balances
  np.testing.assert_allclose(np.asarray(y).reshape(-1, D), ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(aux.counts),
                                np.bincount(np.stack(chosen).ravel(), minlength=E))
  # The plan only chooses: the router's gradient is that of the gates at the chosen experts.
  proj = jax.random.normal(jax.random.key(9), x.shape)
  grad = jax.grad(lambda p: jnp.sum(block.apply(p, x, rngs={"router": jax.random.key(0)})[0]
                                    * proj))(params)["params"]["router"]
  assert float(jnp.abs(grad).max()) > 0


# ----------------------------------------------------------------------------------------------
# Metrics of any assignment layout.


def test_assignment_churn_vs_numpy_and_routing_churn():
  rng = np.random.default_rng(3)
  a, b = rng.uniform(size=(2, 20, E)) < 0.4
  want = 1.0 - (a & b).sum() / a.sum()
  assert float(metrics.assignment_churn(a, b)) == pytest.approx(want, rel=1e-6)
  assert float(metrics.assignment_churn(a, a)) == 0.0
  assert float(metrics.assignment_churn(np.zeros((3, E), bool), a[:3])) == 0.0
  idx_a = np.argsort(rng.normal(size=(20, E)), -1)[:, :K]
  idx_b = np.argsort(rng.normal(size=(20, E)), -1)[:, :K]
  to_mask = lambda i: np.eye(E, dtype=bool)[i].any(1)
  assert float(metrics.assignment_churn(to_mask(idx_a), to_mask(idx_b))) == pytest.approx(
      float(metrics.routing_churn(idx_a, idx_b)), rel=1e-6)


def test_seu_counts_padded_assignments():
  """SEU of the padded per-token lists (sentinel E = no expert) is the experts a sequence
  used: float64 by hand."""
  rng = np.random.default_rng(5)
  mask = rng.uniform(size=(3, 6, E)) < 0.2
  got = float(metrics.seu(routing.padded_index(mask), E))
  assert got == pytest.approx(np.mean(mask.any(1).sum(-1) / E), rel=1e-6)


def test_eval_metrics_no_expert_share_and_causal_loss():
  sums = [{"ce_sum": np.float32(20.0), "tokens": np.float32(10.0), "seqs": np.float32(2.0),
           "ce_seq": np.array([2.0, 2.0], np.float32),
           "counts": np.array([[5, 5], [5, 5]], np.float32),
           "entropy_sum": np.zeros(2, np.float32), "seu_sum": np.zeros(2, np.float32),
           "no_expert_sum": np.array([2.0, 0.0], np.float32),
           "causal_ce_sum": np.float32(25.0)}]
  out = eval_metrics.compute(sums)
  assert out["eval/layer_0/no_expert_share"] == pytest.approx(0.2)
  assert out["eval/no_expert_share"] == pytest.approx(0.1)
  assert out["eval/causal_loss"] == pytest.approx(2.5) and out["eval/maxvio"] == 0.0
  out = eval_metrics.compute([{k: v for k, v in sums[0].items() if k != "causal_ce_sum"}])
  assert "eval/causal_loss" not in out and "eval/no_expert_share" in out


# ----------------------------------------------------------------------------------------------
# Configs, variants and the convergence tool's methods.


@pytest.mark.parametrize("variant,terms,router,noise", [
    ("simbal+ec", "simbal:0.1", "expert_choice", "none"),
    ("ec", "", "expert_choice", "none"),
    ("lbl+sinkhorn", "lbl:0.01", "sinkhorn", "none"),
    ("sinkhorn", "", "sinkhorn", "none"),
    ("simbal+expert_choice+jitter", "simbal:0.1", "expert_choice", "jitter"),
    ("lbl", "lbl:0.01", "token_choice", "none"),
])
def test_router_variants(variant, terms, router, noise):
  cfg = demo.get_config(variant)
  assert (cfg.balance.terms, cfg.moe.router, cfg.moe.router_noise) == (terms, router, noise)


def test_router_config_errors_are_one_line():
  kw = dict(num_experts=E, top_k=K, d_ff=F)
  for bad, match in ((dict(router="random"), "MoEConfig.router='random'"),
                     (dict(sinkhorn_iters=0), "sinkhorn_iters must be an int >= 1"),
                     (dict(router="expert_choice", gating="sigmoid"), "gating='softmax_topk'"),
                     (dict(router="expert_choice", dispatch="ragged"), "'capacity' or 'buckets'")):
    with pytest.raises(ValueError, match=match) as err:
      moe.MoEConfig(**kw, **bad)
    assert "\n" not in str(err.value)
  with pytest.raises(ValueError, match="after '\\+' a router noise"):
    demo.get_config("simbal+bogus")
  from simbal_jax import env as env_lib  # pylint: disable=g-import-not-at-top
  for variant, field, value, match in (
      ("lf_simbal+ec", None, None, "loss_free=True needs moe.router='token_choice'"),
      ("sinkhorn", "sinkhorn_iters", 0, "moe.sinkhorn_iters must be >= 1"),
      ("lbl", "router", "bogus", "moe.router='bogus'")):
    cfg = demo.get_config(variant)
    if field:
      cfg.moe[field] = value
    with pytest.raises(ValueError, match=match):
      env_lib.prepare_config(cfg)


def test_convergence_methods_accept_routers():
  cfg = demo.get_config()
  convergence.check_methods(cfg, ["simbal+ec", "lbl+sinkhorn", "ec", "lbl"])
  assert convergence.run_config(cfg, "simbal+ec", 1).moe.router == "expert_choice"
  with pytest.raises(ValueError, match="method 'lbl_sigmoid\\+ec': .*gating='softmax_topk'"):
    convergence.check_methods(cfg, ["lbl", "lbl_sigmoid+ec"])
  assert "<variant>+<router>" in base.variants()


# ----------------------------------------------------------------------------------------------
# Tiny training runs.


def test_expert_choice_training_run(tmp_path):
  """simbal+ec: trains, its evaluation reports MaxVio 0, the share of tokens with no expert,
  the causal loss (token-choice routing of the same model) and the routing churn. Capacity
  factor 0.5: one assignment per token on average, so some tokens get none."""
  cfg = tiny_config("simbal+ec", steps=4, analysis=True, moe=dict(capacity_factor=0.5))
  cfg.ckpt.enabled = False
  summary, _ = train.train_and_evaluate(cfg, str(tmp_path), devices=jax.devices()[:1])
  assert summary["status"] == "done"
  assert summary["eval/maxvio"] == 0.0 and summary["eval/layer_0/maxvio"] == 0.0
  assert 0.0 < summary["eval/no_expert_share"] < 1.0
  records = writers.read_jsonl(tmp_path / "metrics.jsonl")
  assert any("eval/layer_1/no_expert_share" in r for r in records)
  assert all(r["train/maxvio"] == 0.0 for r in records if "train/maxvio" in r)
  assert np.isfinite(summary["eval/causal_loss"]) and summary["eval/causal_loss"] > 0
  assert summary["eval/causal_loss"] != summary["eval/loss"]
  assert 0.0 <= summary["eval/churn"] <= 1.0
  assert np.isfinite(summary["eval/seu"]) and summary["eval/dead"] == 0.0


def test_sinkhorn_training_run(tmp_path):
  cfg = tiny_config("lbl+sinkhorn", steps=4)
  cfg.ckpt.enabled = False
  summary, _ = train.train_and_evaluate(cfg, str(tmp_path), devices=jax.devices()[:1])
  assert summary["status"] == "done" and np.isfinite(summary["eval/loss"])
  assert summary["eval/no_expert_share"] == 0.0 and "eval/causal_loss" not in summary


@pytest.mark.slow
def test_expert_choice_sharded_matches_single_device(tmp_path):
  """Expert choice on a data x expert mesh of 8 devices trains and evaluates as on one."""
  cfg = tiny_config("simbal+ec", steps=2)
  cfg.ckpt.enabled = False
  single, _ = train.train_and_evaluate(cfg, str(tmp_path / "one"), devices=jax.devices()[:1])
  cfg.mesh.data, cfg.mesh.expert = 2, 4
  sharded, _ = train.train_and_evaluate(cfg, str(tmp_path / "many"))
  l1, l8 = losses_of(tmp_path / "one"), losses_of(tmp_path / "many")
  np.testing.assert_allclose([l8[1], l8[2]], [l1[1], l1[2]], rtol=2e-5)
  for key in ("eval/loss", "eval/causal_loss"):
    np.testing.assert_allclose(sharded[key], single[key], rtol=2e-5)
  assert sharded["eval/maxvio"] == 0.0


def test_expert_choice_buffer_padding():
  """The memory estimate's rows per assignment: E * C / (T * K) of the exact C-slot buffers."""
  from simbal_jax import experts  # pylint: disable=g-import-not-at-top
  kw = dict(num_experts=8, top_k=2, d_ff=4, router="expert_choice")
  assert experts.padding(moe.MoEConfig(**kw, capacity_factor=0.0), 8, 2) == 1.0
  assert experts.padding(moe.MoEConfig(**kw, capacity_factor=1.5), 8, 2) == 1.5
  assert experts.padding(moe.MoEConfig(**kw, capacity_factor=0.0, dispatch="buckets"), 8, 2) == 1.0
