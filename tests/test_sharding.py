"""Mesh, rules, validation, sharded == unsharded on 8 fake CPU devices (data x fsdp x expert)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simbal_jax import env as env_lib
from simbal_jax import model
from simbal_jax import sharding
from simbal_jax import step as step_lib
from simbal_jax.moe import MoEConfig

from conftest import tiny_config, tiny_model_config

P = jax.sharding.PartitionSpec


def _mesh_cfg(data=-1, expert=1, model_axis=1, fsdp=1):
  return dict(data=data, fsdp=fsdp, expert=expert, model=model_axis, multihost=False)


def _cfg(num_groups=1, capacity_factor=0.0, dispatch="capacity"):
  return tiny_model_config(vocab_size=64, moe=dict(num_experts=8, capacity_factor=capacity_factor,
                                                   num_groups=num_groups, dispatch=dispatch))


def test_make_mesh_shapes_and_axis_types():
  assert jax.device_count() == 8
  mesh = sharding.make_mesh(_mesh_cfg(expert=4))
  assert mesh.axis_names == sharding.MESH_AXES
  assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "expert": 4, "model": 1}
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
  assert sharding.mesh_shape(_mesh_cfg(data=2, expert=-1, model_axis=2), 8) == (2, 1, 2, 2)
  assert sharding.mesh_shape(_mesh_cfg(data=2, fsdp=-1, expert=2), 8) == (2, 2, 2, 1)
  assert sharding.batch_shards(_mesh_cfg(data=2, fsdp=2, expert=2), 8) == 8
  one = sharding.make_mesh(_mesh_cfg(), devices=jax.devices()[:1])
  assert dict(one.shape) == {"data": 1, "fsdp": 1, "expert": 1, "model": 1}


def test_validation_errors():
  cfg = _cfg()
  ok = sharding.validate(_mesh_cfg(expert=4), cfg, 8, 8)
  assert ok == (2, 1, 4, 1)
  cases = [
      (_mesh_cfg(data=3), cfg, 8, "does not divide 8 devices"),
      (_mesh_cfg(data=2, expert=2), cfg, 8, "uses 4 devices"),
      (_mesh_cfg(data=-1, expert=-1), cfg, 8, "at most one"),
      (_mesh_cfg(data=0), cfg, 8, "mesh.data"),
      (_mesh_cfg(data=1, expert=8), model.ModelConfig(
          vocab_size=64, d_model=32, num_layers=2, num_heads=4, d_ff=48,
          moe=MoEConfig(num_experts=4, top_k=2, d_ff=16)), 8, "num_experts"),
      (_mesh_cfg(data=1, model_axis=8), cfg, 8, "num_heads"),
      (_mesh_cfg(expert=4), cfg, 12, "global batch 12"),
      (_mesh_cfg(data=4, expert=2), _cfg(num_groups=2), 8, "num_groups"),
      (_mesh_cfg(data=2, fsdp=2, expert=2), _cfg(num_groups=2), 8, "num_groups"),
      (_mesh_cfg(data=1, fsdp=8), cfg, 4, "data \\* fsdp \\* expert"),
      (_mesh_cfg(data=1, fsdp=8), model.ModelConfig(
          vocab_size=64, d_model=12, num_layers=2, num_heads=2, d_ff=48), 8, "mesh.fsdp=8"),
      (_mesh_cfg(expert=2), model.ModelConfig(vocab_size=64, d_model=32, num_layers=2,
                                              num_heads=4, d_ff=48), 8, "needs an MoE"),
  ]
  for mesh_cfg, model_cfg, batch, match in cases:
    with pytest.raises(ValueError, match=match):
      sharding.validate(mesh_cfg, model_cfg, batch, 8)
  with pytest.raises(ValueError, match="num_heads"):
    model.ModelConfig(vocab_size=64, d_model=30, num_layers=1, num_heads=4, d_ff=8)


def test_state_shardings_follow_logical_names():
  cfg = _cfg()
  mesh = sharding.make_mesh(_mesh_cfg(data=2, expert=2, model_axis=2))
  rules = sharding.LOGICAL_RULES
  tokens = jnp.zeros((4, 8), jnp.int32)
  abstract = jax.eval_shape(model.Transformer(cfg).init, jax.random.PRNGKey(0), tokens)
  shard = sharding.state_shardings(abstract, mesh, rules)["params"]
  assert shard["layers_0"]["ffn"]["wi_gate"].spec == P("expert", "fsdp", "model")
  assert shard["layers_0"]["ffn"]["wo"].spec == P("expert", "model", "fsdp")
  assert shard["layers_0"]["attn"]["wq"].spec == P("fsdp", "model", None)
  assert shard["embedding"].spec == P("model", "fsdp")
  assert shard["lm_head"].spec == P("fsdp", "model")
  assert shard["layers_0"]["ffn"]["router"].spec == P("fsdp", None)


def _loss_and_grads(cfg, params, tokens, bias):
  def loss_fn(p):
    logits, aux = model.Transformer(cfg).apply(p, tokens, expert_bias=bias)
    nll = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[..., None], -1))
    return nll + 0.01 * jnp.mean(aux.router.probs ** 2), (logits, aux.counts)
  return jax.value_and_grad(loss_fn, has_aux=True)(params)


@pytest.mark.parametrize("num_groups,capacity_factor,dispatch",
                         [(1, 0.0, "capacity"), (4, 1.0, "capacity"), (8, 0.0, "buckets")])
def test_sharded_matches_unsharded(num_groups, capacity_factor, dispatch):
  cfg = _cfg(num_groups=num_groups, capacity_factor=capacity_factor, dispatch=dispatch)
  batch, length = 8, 8
  tokens = jax.random.randint(jax.random.PRNGKey(1), (batch, length), 0, cfg.vocab_size)
  bias = jax.random.normal(jax.random.PRNGKey(2), (cfg.num_moe_layers, 8)) * 0.01
  init = model.Transformer(cfg).init
  params = jax.jit(init)(jax.random.PRNGKey(0), tokens)
  (loss0, (logits0, counts0)), grads0 = jax.jit(
      lambda p: _loss_and_grads(cfg, p, tokens, bias))(nn.unbox(params))

  mesh_cfg = _mesh_cfg(data=2, expert=4)
  sharding.validate(mesh_cfg, cfg, batch, jax.device_count(), seq_len=length)
  mesh, rules = sharding.make_mesh(mesh_cfg), sharding.LOGICAL_RULES
  with sharding.mesh_rules(mesh, rules):
    abstract = jax.eval_shape(init, jax.random.PRNGKey(0), tokens)
    state_sh = sharding.state_shardings(abstract, mesh, rules)
    params_sh = jax.jit(init, out_shardings=state_sh)(jax.random.PRNGKey(0), tokens)
    wi = params_sh["params"]["layers_0"]["ffn"]["wi_gate"].value
    assert wi.sharding.spec == P("expert", "fsdp", "model")
    assert wi.addressable_shards[0].data.shape == (2, 32, 16)  # 8 experts over 4 devices
    batch_sh = jax.sharding.NamedSharding(mesh, P(sharding.BATCH_AXES))
    tokens_sh = jax.device_put(tokens, batch_sh)
    (loss1, (logits1, counts1)), grads1 = jax.jit(
        lambda p, t: _loss_and_grads(cfg, p, t, bias))(nn.unbox(params_sh), tokens_sh)
  np.testing.assert_allclose(loss1, loss0, rtol=1e-5)
  np.testing.assert_allclose(logits1, logits0, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(counts1, counts0)
  for a, b in zip(jax.tree.leaves(grads1), jax.tree.leaves(grads0)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_initialize_distributed_disabled_is_noop():
  assert sharding.initialize_distributed(False) is False


def _fsdp_train_config():
  return tiny_config("lbl", steps=10, model=dict(vocab_size=64, num_heads=4, d_ff=48),
                     moe=dict(num_experts=8, d_ff=16, num_groups=0, capacity_factor=0.0,
                              dispatch="buckets"),
                     train=dict(seq_len=8), opt=dict(warmup_steps=1))


def _one_step(cfg, devices, batch):
  env = env_lib.build(cfg, devices=devices, data=False)
  with sharding.mesh_rules(env.mesh, env.rules):
    state = jax.jit(lambda k: step_lib.unbox(env.init(k)),
                    out_shardings=env.shardings)(jax.random.key(0))
    new_state, metrics = env_lib.make_train_step(env)(state, sharding.to_global(batch,
                                                                           env.batch_sharding))
  return env, state, new_state, metrics


@pytest.mark.slow
def test_fsdp_train_step_matches_single_device():
  """2 data x 2 fsdp x 2 expert == 1 device: loss, gradients (AdamW's first moment after one
  step is (1 - b1) * grad), updated parameters; parameters and optimizer state really shard."""
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 64, (8, 9))
  batch = dict(inputs=tokens[:, :-1], targets=tokens[:, 1:], mask=np.ones((8, 8), np.int32))
  _, _, ref, ref_m = _one_step(_fsdp_train_config(), jax.devices()[:1], batch)
  cfg = _fsdp_train_config()
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.expert = 2, 2, 2
  env, _, new, new_m = _one_step(cfg, jax.devices()[:8], batch)
  assert env.mcfg.moe.num_groups == 8  # one routing group per batch shard
  assert env.batch_sharding.spec == P(("data", "fsdp", "expert"))
  for k in ("train/loss", "train/grad_norm", "train/lbl"):
    np.testing.assert_allclose(new_m[k], ref_m[k], rtol=1e-5, err_msg=k)
  for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(ref)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)

  wi = new.params["layers_0"]["ffn"]["wi_gate"]  # [E 8, D 32, F 16]
  assert wi.sharding.spec == P("expert", "fsdp", "model")
  assert {s.data.shape for s in wi.addressable_shards} == {(4, 16, 16)}
  emb = new.params["embedding"]  # [V 64, D 32]
  assert {s.data.shape for s in emb.addressable_shards} == {(64, 16)}
  mu = [x for x in jax.tree.leaves(new.opt_state) if x.shape == wi.shape]
  assert mu and all(x.sharding.spec == wi.sharding.spec for x in mu)
  # Per-device bytes: all but the tiny replicated leaves are split 2 (fsdp) or 4 (x expert).
  total = sum(x.nbytes for x in jax.tree.leaves(new))
  per_dev = sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(new))
  assert per_dev < 0.6 * total
