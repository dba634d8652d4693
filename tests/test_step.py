"""The jitted train and eval steps compile once and return flat, namespaced scalar metrics;
the loss is the documented sum of terms."""
import dataclasses
import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simbal_jax.configs import demo
from simbal_jax import env as env_lib
from simbal_jax import analysis
from simbal_jax import balance
from simbal_jax import model as model_lib
from simbal_jax import sharding
from simbal_jax import step as step_lib
from simbal_jax import train

from conftest import tiny_config

@pytest.mark.parametrize("method", ["lf_simbal", "lbl"])
def test_steps_compile_once(tmp_path, method):
  cfg = tiny_config(method, steps=4, analysis=True)
  env = env_lib.build(cfg, str(tmp_path), devices=jax.devices()[:1])
  with sharding.mesh_rules(env.mesh, env.rules):
    state, _, source = env_lib.initial_state(env, None)
    assert source == "scratch"
    chex.clear_trace_counter()

    @chex.assert_max_traces(n=1)
    def step_fn(state, batch):
      return step_lib.train_step(state, batch, model=env.model, tx=env.tx, sc=env.sc,
                                 schedule=env.schedule)

    @chex.assert_max_traces(n=1)
    def eval_fn(params, bias, batch):
      return step_lib.eval_step(params, bias, batch, model=env.model)

    train_step = jax.jit(step_fn, in_shardings=(env.shardings, env.batch_sharding),
                         out_shardings=(env.shardings, None), donate_argnums=(0,))
    eval_step = jax.jit(eval_fn)
    it = env.datasets.train_iter()
    bias0 = np.asarray(state.expert_bias)
    for _ in range(3):  # a second trace would raise inside chex
      state, metrics = train_step(state, sharding.to_global(next(it), env.batch_sharding))
    for batch in env.datasets.eval_batches(2):
      eval_step(state.params, state.expert_bias,
                sharding.to_global(batch, env.batch_sharding, env_lib.TRAIN_KEYS))
  assert int(state.step) == 3
  # Scalars, except the per-layer arrays (train/layer_*) that the host splits per layer.
  shapes = {k: np.shape(v) for k, v in metrics.items()}
  n_moe, e = env.mcfg.num_moe_layers, env.mcfg.moe.num_experts
  assert shapes.pop("train/layer_load") == (n_moe, e)
  assert shapes.pop("train/layer_expert_wnorm") == shapes.pop("train/layer_expert_gnorm") == (
      n_moe, e)  # log.expert_norms (on in the base config)
  assert shapes.pop("train/layer_maxvio") == shapes.pop("train/layer_entropy") == (n_moe,)
  assert all(s == () for s in shapes.values())
  assert all(k.startswith("train/") for k in metrics)
  # A balancing term may not take the name of a metric the step emits itself.
  own = {k[len("train/"):] for k in metrics} - {name for name, _ in env.sc.terms}
  assert {n for n in own if n.startswith(balance.RESERVED_PREFIX)} == {
      "layer_load", "layer_maxvio", "layer_entropy", "layer_expert_wnorm", "layer_expert_gnorm"}
  assert {n for n in own if not n.startswith(balance.RESERVED_PREFIX)} <= set(balance.RESERVED)
  expected = {"lbl": "train/lbl", "lf_simbal": "train/simbal"}[method]
  assert expected in metrics and np.isfinite(float(metrics[expected]))
  # The Loss-Free bias moves only when the method uses it.
  moved = not np.array_equal(np.asarray(state.expert_bias), bias0)
  assert moved == (method == "lf_simbal")


@pytest.mark.parametrize("delta", [0.0, 0.05, 0.1])
def test_eval_step_undecided_sum_vs_numpy(tmp_path, delta):
  """undecided_sum / tokens = the share of tokens whose top-1 router probability is below
  1/E + delta, per MoE layer (float64 NumPy on the model's own probabilities)."""
  cfg = tiny_config("lbl", steps=2, moe=dict(router_init_scale=0.3))  # flat-ish routers
  env = env_lib.build(cfg, str(tmp_path), devices=jax.devices()[:1])
  with sharding.mesh_rules(env.mesh, env.rules):
    state, _, _ = env_lib.initial_state(env, None)
    batch = sharding.to_global(env.datasets.eval_batches(1)[0], env.batch_sharding,
                               env_lib.TRAIN_KEYS)
    sums = jax.jit(functools.partial(step_lib.eval_step, model=env.model,
                                     undecided_delta=delta))(
        state.params, state.expert_bias, batch)
    _, aux = jax.jit(env.model.apply)({"params": state.params}, batch["inputs"],
                                      expert_bias=state.expert_bias)
  probs = np.asarray(aux.router.probs, np.float64)  # [Lm, T, E]
  want = (probs.max(-1) < 1.0 / probs.shape[-1] + delta).mean(-1)
  np.testing.assert_allclose(np.asarray(sums["undecided_sum"]) / float(sums["tokens"]), want,
                             atol=1e-6)
  if delta > 0:
    assert 0 < want.min() and want.max() < 1  # neither all nor none undecided


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_expert_norms_are_outputs_only_and_match_the_gradient(tmp_path, grad_accum):
  """log.expert_norms adds each expert's weight and gradient norm to the step's outputs and
  changes nothing else: the same losses and bit-identical states with and without them."""
  cfg = tiny_config("lf_lbl", steps=3, analysis=True, train=dict(grad_accum=grad_accum))
  env = env_lib.build(cfg, str(tmp_path), devices=jax.devices()[:1])
  assert env.sc.expert_norms
  ids = env.mcfg.moe_layer_ids
  runs = {}
  with sharding.mesh_rules(env.mesh, env.rules):
    for on in (True, False):
      sc = dataclasses.replace(env.sc, expert_norms=on)
      step = jax.jit(functools.partial(step_lib.train_step, model=env.model, tx=env.tx, sc=sc,
                                       schedule=env.schedule))
      state, _, _ = env_lib.initial_state(env, None)
      it, outs = env.datasets.train_iter(), []
      for _ in range(3):
        batch = sharding.to_global(next(it), env.batch_sharding, env_lib.TRAIN_KEYS)
        before = state
        state, m = step(state, batch)
        outs.append(jax.device_get(m))
      runs[on] = (state, outs, before, batch)
  (s_on, m_on, before, batch), (s_off, m_off, _, _) = runs[True], runs[False]
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(s_on), jax.device_get(s_off))
  for a, b in zip(m_on, m_off):
    assert set(a) - set(b) == {"train/layer_expert_wnorm", "train/layer_expert_gnorm"}
    for k in b:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  np.testing.assert_allclose(m_on[-1]["train/layer_expert_wnorm"],
                             analysis.layer_expert_norms(s_on.params, ids), rtol=1e-6)
  if grad_accum == 1:  # the last step's gradient, recomputed with the step's own keys
    _, rngs = step_lib.step_keys(before.rng)
    grads = jax.jit(jax.grad(lambda p: step_lib.loss_fn(
        p, batch, before.expert_bias, model=env.model, sc=env.sc, rngs=rngs)[0]))(before.params)
    np.testing.assert_allclose(m_on[-1]["train/layer_expert_gnorm"],
                               analysis.layer_expert_norms(grads, ids), rtol=1e-5)
  assert np.all(np.asarray(m_on[-1]["train/layer_expert_gnorm"]) > 0)


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
  sc = step_lib.StepConfig(terms=balance.parse_terms("lbl:0.3+simbal:0.2+router_z:0.05"),
                           options=balance.Options(lbl_scope="sequence"), z_loss=0.01)
  ks = jax.random.split(jax.random.key(0), 3)
  batch = {"inputs": jax.random.randint(ks[0], (b, l), 0, v),
           "targets": jax.random.randint(ks[1], (b, l), 0, v)}
  params = nn.unbox(jax.jit(model.init)(ks[2], batch["inputs"])["params"])
  bias = jnp.zeros((mcfg.num_moe_layers, e))
  keep = np.ones((b, l), bool)
  if masked:  # padding tokens must leave every statistic; each sequence keeps some tokens
    keep[0, 5:], keep[2, 1:3] = False, False
    batch["mask"] = jnp.asarray(keep)
  keep_t = keep.reshape(-1)
  loss, (out, counts) = jax.jit(functools.partial(step_lib.loss_fn, model=model, sc=sc))(
      params, batch, bias)
  logits, aux = jax.jit(model.apply)({"params": params}, batch["inputs"], expert_bias=bias)

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


def _tiny_moe(e=4, k=2, v=32):
  mcfg = model_lib.ModelConfig(
      vocab_size=v, d_model=16, num_layers=2, num_heads=2, d_ff=32, dtype="float32",
      moe=model_lib.MoEConfig(num_experts=e, top_k=k, d_ff=16, router_init="normal",
                              capacity_factor=0.0))
  return model_lib.Transformer(mcfg)


def _tiny_moe_setup(seed, b=8, l=6, v=32):
  """(`_tiny_moe()`, a random batch of b sequences of l tokens, its parameters, zero bias)."""
  model = _tiny_moe()
  ks = jax.random.split(jax.random.key(seed), 3)
  batch = {"inputs": jax.random.randint(ks[0], (b, l), 0, v),
           "targets": jax.random.randint(ks[1], (b, l), 0, v)}
  params = nn.unbox(jax.jit(model.init)(ks[2], batch["inputs"])["params"])
  return model, batch, params, jnp.zeros((2, 4))


def test_global_lbl_scope_with_grad_accum_is_exact():
  """lbl_scope='global' with 4 micro-batches: the LBL value and every gradient equal those of
  one pass over the whole batch; per-micro-batch 'batch' scope differs (its f is local)."""
  model, batch, params, bias = _tiny_moe_setup(1)
  b, l = batch["inputs"].shape
  terms = (("lbl", 1.0),)

  def grads_and_lbl(scope, accum):
    sc = step_lib.StepConfig(terms=terms, options=balance.Options(lbl_scope=scope),
                             grad_accum=accum, z_loss=0.0)
    f = None
    if sc.global_lbl_accum:
      micro = jax.tree.map(lambda x: x.reshape(accum, b // accum, l), batch)
      f = jax.jit(functools.partial(step_lib.global_expert_fraction, model=model))(
          params, micro, bias)
    # Jitted (one compile per micro-batch shape), not op by op.
    lbl_and_grad = jax.jit(jax.value_and_grad(
        lambda p, mb, f: step_lib.loss_fn(p, mb, bias, model=model, sc=sc, expert_fraction=f)[1][
            0]["lbl"]))
    outs = []
    for m in range(accum):
      mb = jax.tree.map(lambda x: x[m * b // accum:(m + 1) * b // accum], batch)
      outs.append(lbl_and_grad(params, mb, f))
    lbl = np.mean([float(o[0]) for o in outs])
    grad = jax.tree.map(lambda *g: sum(g) / accum, *[o[1] for o in outs])
    return lbl, grad

  want_lbl, want_grad = grads_and_lbl("batch", 1)
  got_lbl, got_grad = grads_and_lbl("global", 4)
  local_lbl, _ = grads_and_lbl("batch", 4)
  np.testing.assert_allclose(got_lbl, want_lbl, rtol=1e-5)
  chex.assert_trees_all_close(got_grad, want_grad, rtol=1e-4, atol=1e-7)
  assert abs(local_lbl - want_lbl) > 1e-4  # the per-micro-batch statistic is not the global one
  # The trainer's step runs the same path (value logged as train/lbl).
  sc = step_lib.StepConfig(terms=terms, options=balance.Options(lbl_scope="global"),
                           grad_accum=4, z_loss=0.0)
  import optax  # pylint: disable=g-import-not-at-top
  tx = optax.sgd(0.0)
  state = step_lib.TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params),
                              expert_bias=bias, rng=jax.random.key_data(jax.random.key(0)))
  _, metrics = jax.jit(functools.partial(step_lib.train_step, model=model, tx=tx, sc=sc))(
      state, batch)
  np.testing.assert_allclose(float(metrics["train/lbl"]), want_lbl, rtol=1e-5)


def test_micro_lbl_scope_is_the_same_with_grad_accum_and_in_the_train_step():
  """lbl_scope='micro' (groups of 2 sequences) through the term registry equals the float64
  NumPy mean over groups of each group's LBL, with and without 2 accumulation micro-batches;
  the train step logs it as train/lbl."""
  model, batch, params, bias = _tiny_moe_setup(3)
  b, l = batch["inputs"].shape
  _, aux = jax.jit(model.apply)({"params": params}, batch["inputs"], expert_bias=bias)
  probs = np.asarray(aux.router.probs, np.float64).reshape(2, b, l, 4)  # [Lm, B, L, E]
  index = np.asarray(aux.router.expert_index).reshape(2, b, l, 2)
  want = []
  for layer in range(2):
    groups = []
    for g in range(b // 2):
      p = probs[layer, 2 * g:2 * g + 2].reshape(-1, 4)
      f = np.bincount(index[layer, 2 * g:2 * g + 2].ravel(), minlength=4) / (2 * p.shape[0])
      groups.append(4 * np.sum(f * p.mean(0)))
    want.append(np.mean(groups))
  want = float(np.mean(want))  # mean over the MoE layers
  options = balance.Options(lbl_scope="micro", lbl_micro_sequences=2)
  import optax  # pylint: disable=g-import-not-at-top
  tx = optax.sgd(0.0)
  state = step_lib.TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params),
                              expert_bias=bias, rng=jax.random.key_data(jax.random.key(0)))
  for accum in (1, 2):
    sc = step_lib.StepConfig(terms=(("lbl", 1.0),), options=options, grad_accum=accum,
                             z_loss=0.0)
    _, metrics = jax.jit(functools.partial(step_lib.train_step, model=model, tx=tx, sc=sc))(
        state, batch)
    np.testing.assert_allclose(float(metrics["train/lbl"]), want, rtol=1e-5)


def test_micro_lbl_scope_config_is_checked():
  cfg = demo.get_config("lbl_micro3")
  assert (cfg.balance.terms, cfg.balance.lbl_scope, cfg.balance.lbl_micro_sequences) == (
      "lbl:0.01", "micro", 3)
  cfg.train.global_batch_size = 16
  with pytest.raises(ValueError, match="balance.lbl_micro_sequences=3 must be >= 1 and divide "
                     "the 16 sequences"):
    step_lib.StepConfig.from_config(cfg)
  cfg.train.global_batch_size, cfg.train.grad_accum = 12, 2  # 6 sequences per forward pass
  assert step_lib.StepConfig.from_config(cfg).options.lbl_micro_sequences == 3
  with pytest.raises(ValueError, match="expected lbl_micro<m>"):
    demo.get_config("lbl_micro0")
  with pytest.raises(ValueError, match="lbl_micro_sequences must be an int >= 1"):
    balance.Options(lbl_scope="micro", lbl_micro_sequences=0)
  # The default scope of every existing method stays the global batch.
  assert demo.get_config("lbl").balance.lbl_scope == "batch"


def test_new_term_with_one_function_and_one_registry_line(tmp_path):
  """A term added in the test (one pure function + one registry line) trains and is logged."""
  def top_prob(layer, options):  # mean top-1 router probability of the layer
    del options
    return jnp.mean(jnp.max(layer.router.probs, axis=-1))

  balance.register("top_prob", top_prob, default_coef=0.5)
  try:
    cfg = tiny_config("lbl", steps=2, ckpt=dict(enabled=False))
    cfg.balance.terms = "top_prob+lbl:0.01"
    summary, _ = train.train_and_evaluate(cfg, str(tmp_path), devices=jax.devices()[:1])
  finally:
    del balance.TERMS["top_prob"]
  assert summary["status"] == "done"
  recs = [r for r in writers_read(tmp_path / "metrics.jsonl") if "train/top_prob" in r]
  assert [r["step"] for r in recs] == [1, 2]
  assert all(0.25 <= r["train/top_prob"] <= 1.0 for r in recs)  # E = 4: top-1 prob >= 1/4
  for r in recs:  # the loss holds the term with its default coefficient
    np.testing.assert_allclose(
        r["train/loss"], r["train/ce"] + 1e-5 * r["train/z_loss"] + 0.5 * r["train/top_prob"]
        + 0.01 * r["train/lbl"], rtol=1e-5)


def writers_read(path):
  from simbal_jax.runio import writers  # pylint: disable=g-import-not-at-top
  return writers.read_jsonl(path)


def test_init_does_not_depend_on_seq_len_or_groups(tmp_path):
  """Groups that do not divide seq_len are fine (init runs on num_groups tokens)."""
  # 8 * 12 tokens split in 8 groups; 12 % 8 != 0
  cfg = tiny_config("lbl", steps=2, train=dict(seq_len=12), moe=dict(num_groups=8),
                    ckpt=dict(enabled=False))
  summary, _ = train.train_and_evaluate(cfg, str(tmp_path), devices=jax.devices()[:1])
  assert summary["status"] == "done" and np.isfinite(summary["eval/loss"])


@pytest.mark.parametrize("dispatch,groups", [("capacity", 8), ("ragged", 1)])
def test_auto_groups_one_per_batch_shard(dispatch, groups):
  cfg = tiny_config("lbl", model=dict(vocab_size=64), moe=dict(dispatch=dispatch, num_groups=0),
                    mesh=dict(data=2, expert=4))  # 8 batch shards on the 8 fake devices
  env = env_lib.build(cfg, devices=jax.devices()[:8], data=False)
  assert env.mcfg.moe.num_groups == groups


def test_step_keys_split_per_step_and_per_use():
  rng = jax.random.key_data(jax.random.key(3))
  nxt, keys = step_lib.step_keys(rng)
  carry, this = jax.random.split(jax.random.key(3))  # by hand: next state's key, this step's
  np.testing.assert_array_equal(nxt, jax.random.key_data(carry))
  assert tuple(keys) == step_lib.STEP_KEY_USES == ("router", "dropout")
  for want, use in zip(jax.random.split(this, 2), ("router", "dropout")):
    np.testing.assert_array_equal(jax.random.key_data(keys[use]), jax.random.key_data(want))
  data = {np.asarray(jax.random.key_data(k)).tobytes() for k in keys.values()}
  data.add(np.asarray(nxt).tobytes())
  assert len(data) == 3  # every use (and the next step) its own key
