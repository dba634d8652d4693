"""Mesh, rules, validation, and sharded == unsharded on 8 fake CPU devices (2 data x 4 expert)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simbal_jax import model
from simbal_jax import sharding
from simbal_jax.moe import MoEConfig

P = jax.sharding.PartitionSpec


pytestmark = pytest.mark.usefixtures("fast_compiles")


def _mesh_cfg(data=-1, expert=1, model_axis=1):
  return dict(data=data, expert=expert, model=model_axis, multihost=False)


def _cfg(num_groups=1, capacity_factor=0.0, dispatch="capacity"):
  return model.ModelConfig(
      vocab_size=64, d_model=32, num_layers=2, num_heads=4, d_ff=48, dtype="float32",
      moe=MoEConfig(num_experts=8, top_k=2, d_ff=16, capacity_factor=capacity_factor,
                    router_init="orthogonal", num_groups=num_groups, dispatch=dispatch))


def test_make_mesh_shapes_and_axis_types():
  assert jax.device_count() == 8
  mesh = sharding.make_mesh(_mesh_cfg(expert=4))
  assert mesh.axis_names == sharding.MESH_AXES
  assert dict(mesh.shape) == {"data": 2, "expert": 4, "model": 1}
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
  assert sharding.mesh_shape(_mesh_cfg(data=2, expert=-1, model_axis=2), 8) == (2, 2, 2)
  one = sharding.make_mesh(_mesh_cfg(), devices=jax.devices()[:1])
  assert dict(one.shape) == {"data": 1, "expert": 1, "model": 1}


def test_validation_errors():
  cfg = _cfg()
  ok = sharding.validate(_mesh_cfg(expert=4), cfg, 8, 8)
  assert ok == (2, 4, 1)
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
  assert shard["layers_0"]["ffn"]["wi_gate"].spec == P("expert", None, "model")
  assert shard["layers_0"]["ffn"]["wo"].spec == P("expert", "model", None)
  assert shard["layers_0"]["attn"]["wq"].spec == P(None, "model", None)
  assert shard["embedding"].spec == P("model", None)
  assert shard["lm_head"].spec == P(None, "model")
  assert shard["layers_0"]["ffn"]["router"].spec == P(None, None)


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
    assert wi.sharding.spec == P("expert", None, "model")
    assert wi.addressable_shards[0].data.shape == (2, 32, 16)  # 8 experts over 4 devices
    batch_sh = jax.sharding.NamedSharding(mesh, P(("data", "expert")))
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
