"""The jitted train and eval steps compile once and return flat, namespaced scalar metrics;
the loss is the documented sum of terms."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import demo
from simbal_jax import analysis
from simbal_jax import model as model_lib
from simbal_jax import sharding
from simbal_jax import step as step_lib
from simbal_jax import train

pytestmark = pytest.mark.usefixtures("fast_compiles")


@pytest.mark.parametrize("method", ["lf_simbal", "lbl"])
def test_steps_compile_once(tmp_path, method):
  cfg = demo.get_config(method)
  cfg.model.d_model, cfg.model.num_heads, cfg.moe.num_experts, cfg.moe.d_ff = 32, 2, 4, 32
  cfg.data.source, cfg.data.synthetic.num_docs = "synthetic", 256
  cfg.data.synthetic.vocab_size = 64
  cfg.train.seq_len, cfg.train.global_batch_size, cfg.train.num_steps = 16, 8, 4
  env = train.build(cfg, str(tmp_path), devices=jax.devices()[:1])
  with sharding.mesh_rules(env.mesh, env.rules):
    state, _, source = train.initial_state(env, None)
    assert source == "scratch"
    train_step, eval_step = train.make_steps(env)
    it = env.datasets.train_iter()
    bias0 = np.asarray(state.expert_bias)
    for _ in range(3):
      state, metrics = train_step(state, train.to_global(next(it), env.batch_sharding))
    for batch in env.datasets.eval_batches(2):
      eval_step(state.params, state.expert_bias, train.to_global(batch, env.batch_sharding))
  assert train_step._cache_size() == 1  # pylint: disable=protected-access
  assert eval_step._cache_size() == 1  # pylint: disable=protected-access
  assert int(state.step) == 3
  assert all(np.ndim(v) == 0 for v in metrics.values())
  assert all(k.split("/")[0] in ("train", "moe") for k in metrics)
  expected = {"lbl": "train/lbl", "lf_simbal": "train/simbal"}[method]
  assert expected in metrics and np.isfinite(float(metrics[expected]))
  # The Loss-Free bias moves only when the method uses it.
  moved = not np.array_equal(np.asarray(state.expert_bias), bias0)
  assert moved == (method == "lf_simbal")


def _np_logsumexp(x):
  m = x.max(-1, keepdims=True)
  return (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))[..., 0]


@pytest.mark.parametrize("masked", [False, True])
def test_loss_fn_golden_simbal_lbl_sequence_scope(masked):
  """Total loss == CE + z * mean lse^2 + lbl_coef * mean_layers LBL (per sequence)
  + simbal_coef * mean_layers ||R^T R - I||_1 + router_z_coef * mean_layers mean lse_router^2,
  every term recomputed in NumPy float64 from the returned logits / router logits and the
  params' router kernels."""
  b, l, v, e, k = 3, 8, 32, 4, 2
  mcfg = model_lib.ModelConfig(
      vocab_size=v, d_model=16, num_layers=4, num_heads=2, d_ff=32, dtype="float32",
      moe_every=2, moe=model_lib.MoEConfig(num_experts=e, top_k=k, d_ff=16, router_init="normal",
                                           capacity_factor=0.0))
  model = model_lib.Transformer(mcfg)
  sc = step_lib.StepConfig(method="simbal_lbl", lbl_coef=0.3, lbl_scope="sequence",
                           simbal_coef=0.2, router_z_coef=0.05, z_loss=0.01)
  ks = jax.random.split(jax.random.key(0), 3)
  batch = {"inputs": jax.random.randint(ks[0], (b, l), 0, v),
           "targets": jax.random.randint(ks[1], (b, l), 0, v)}
  params = nn.unbox(model.init(ks[2], batch["inputs"])["params"])
  bias = jnp.zeros((mcfg.num_moe_layers, e))
  keep = np.ones((b, l), bool)
  if masked:  # padding tokens must leave every statistic; each sequence keeps some tokens
    keep[0, 5:], keep[2, 1:3] = False, False
    batch["mask"] = jnp.asarray(keep)
  keep_t = keep.reshape(-1)
  loss, (out, counts) = jax.jit(functools.partial(step_lib.loss_fn, model=model, sc=sc))(
      params, batch, bias, jnp.int32(1))
  logits, aux = model.apply({"params": params}, batch["inputs"], expert_bias=bias)

  # Cross-entropy and logit z-loss.
  lg = np.asarray(logits, np.float64).reshape(b * l, v)
  lse = _np_logsumexp(lg)
  tgt = np.asarray(batch["targets"]).reshape(-1)
  ce = np.mean((lse - lg[np.arange(b * l), tgt])[keep_t])
  z = np.mean((lse ** 2)[keep_t])
  # Router logits are block input @ kernel (layers 1 and 3); kernels straight from the params.
  moe_layers = [i for i in range(4) if (i + 1) % 2 == 0]
  kernels = [np.asarray(params[f"layers_{i}"]["ffn"]["router"], np.float64) for i in moe_layers]
  inputs = [np.asarray(x, np.float64).reshape(b * l, -1)
            for _, x in analysis.capture_moe_inputs(model, params, batch["inputs"], bias)]
  router_logits = np.asarray(aux.router.logits, np.float64)
  np.testing.assert_allclose(router_logits, [x @ r for x, r in zip(inputs, kernels)],
                             rtol=1e-4, atol=1e-5)
  # LBL per sequence: E * sum_i f_i P_i, f from the top-k of the softmax, then means.
  lbl_layers = []
  for rl, index in zip(router_logits, np.asarray(aux.router.expert_index)):
    probs = np.exp(rl - _np_logsumexp(rl)[:, None])
    topk = np.argsort(-probs, axis=-1)[:, :k]
    np.testing.assert_array_equal(np.sort(topk, -1), np.sort(index, -1))
    per_seq = []
    for s in range(b):
      rows = np.arange(s * l, (s + 1) * l)[keep[s]]
      f = np.bincount(topk[rows].reshape(-1), minlength=e) / (k * len(rows))
      per_seq.append(e * np.sum(f * probs[rows].mean(0)))
    lbl_layers.append(np.mean(per_seq))
  lbl = np.mean(lbl_layers)
  sim = np.mean([np.abs(r.T @ r - np.eye(e)).sum() for r in kernels])
  rz = np.mean([np.mean((_np_logsumexp(rl) ** 2)[keep_t]) for rl in router_logits])
  total = ce + 0.01 * z + 0.3 * lbl + 0.2 * sim + 0.05 * rz

  assert sim > 0.1 and abs(lbl - 1.0) > 1e-3  # the terms are not trivial
  for name, want in [("ce", ce), ("z_loss", z), ("lbl", lbl), ("simbal", sim),
                     ("router_z", rz), ("loss", total)]:
    np.testing.assert_allclose(float(out[name]), want, rtol=2e-5, err_msg=name)
  np.testing.assert_allclose(float(loss), total, rtol=2e-5)
  np.testing.assert_array_equal(np.asarray(counts), [
      np.bincount(np.argsort(-rl, -1)[:, :k].reshape(-1), minlength=e) for rl in router_logits])


@pytest.mark.parametrize("method,accum,raises", [
    ("lbl", 2, True), ("lf_lbl", 4, True), ("lbl", 1, False), ("simbal", 2, False)])
def test_global_lbl_scope_with_grad_accum_is_rejected(method, accum, raises):
  cfg = demo.get_config(method)
  cfg.balance.lbl_scope, cfg.train.grad_accum = "global", accum
  if raises:
    with pytest.raises(ValueError, match="lbl_scope='global'.*not implemented"):
      train.prepare_config(cfg)
  else:
    assert train.prepare_config(cfg).train.grad_accum == accum


def test_init_does_not_depend_on_seq_len_or_groups(tmp_path):
  """Groups that do not divide seq_len are fine (init runs on num_groups tokens)."""
  cfg = demo.get_config("lbl")
  cfg.model.d_model, cfg.model.num_heads, cfg.moe.num_experts, cfg.moe.d_ff = 32, 2, 4, 32
  cfg.data.source, cfg.data.synthetic.num_docs = "synthetic", 256
  cfg.data.synthetic.vocab_size = 64
  cfg.train.seq_len, cfg.train.global_batch_size, cfg.train.num_steps = 12, 8, 2
  cfg.moe.num_groups = 8  # 8 * 12 tokens split in 8 groups; 12 % 8 != 0
  cfg.ckpt.enabled, cfg.log.progress, cfg.log.tensorboard = False, False, False
  summary = train.train_and_evaluate(cfg, str(tmp_path), devices=jax.devices()[:1])
  assert summary["status"] == "done" and np.isfinite(summary["eval/loss"])


@pytest.mark.parametrize("dispatch,groups", [("capacity", 8), ("ragged", 1)])
def test_auto_groups_one_per_batch_shard(dispatch, groups):
  cfg = demo.get_config("lbl")
  cfg.model.vocab_size, cfg.model.d_model, cfg.model.num_heads = 64, 32, 2
  cfg.moe.num_experts, cfg.moe.d_ff, cfg.moe.dispatch, cfg.moe.num_groups = 4, 32, dispatch, 0
  cfg.mesh.data, cfg.mesh.expert = 2, 4  # 8 batch shards on the 8 fake devices
  env = train.build_model(train.prepare_config(cfg), jax.devices()[:8])
  assert env.mcfg.moe.num_groups == groups
