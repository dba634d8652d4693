"""Transformer: shapes, causality, parameter counts (analytic vs eval_shape and the paper), FLOPs."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from simbal_jax import model
from simbal_jax.configs import moe_m
from simbal_jax.moe import MoEConfig

from conftest import tiny_model_config


def _init(cfg, tokens):
  return nn.unbox(jax.jit(model.Transformer(cfg).init)(jax.random.PRNGKey(0), tokens))


def test_forward_shapes_dtypes_and_aux_stacking():
  cfg = tiny_model_config(num_layers=3, moe_every=2, dtype="bfloat16")  # only block 1 is MoE
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 8), 0, cfg.vocab_size)
  params = _init(cfg, tokens)
  bias = jnp.zeros((1, 4), jnp.float32)
  logits, aux = jax.jit(model.Transformer(cfg).apply)(params, tokens, expert_bias=bias)
  assert logits.shape == (2, 8, 61) and logits.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(logits)))
  assert cfg.num_moe_layers == 1
  assert aux.router.logits.shape == (1, 16, 4) and aux.router.expert_index.shape == (1, 16, 2)
  assert aux.counts.shape == (1, 4) and aux.dropped.shape == (1,)
  np.testing.assert_allclose(aux.counts.sum(), 16 * 2)
  assert set(params["params"]["layers_1"]["ffn"]) == {"router", "wi_gate", "wi_up", "wo"}
  assert params["params"]["layers_0"]["ffn"]["wi_gate"].shape == (32, 48)  # dense FFN
  kernels = model.router_kernels(params, cfg)
  assert kernels.shape == (1, 32, 4) and kernels.dtype == jnp.float32
  np.testing.assert_array_equal(kernels[0], params["params"]["layers_1"]["ffn"]["router"])


def test_dense_model_has_no_aux():
  cfg = tiny_model_config(moe=False)
  tokens = jnp.zeros((1, 4), jnp.int32)
  logits, aux = model.Transformer(cfg).apply(_init(cfg, tokens), tokens)
  assert aux is None and logits.shape == (1, 4, 61)


def test_causality():
  cfg = tiny_model_config()
  tokens = jax.random.randint(jax.random.PRNGKey(2), (1, 10), 0, cfg.vocab_size)
  params = _init(cfg, tokens)
  apply = jax.jit(model.Transformer(cfg).apply)
  base, _ = apply(params, tokens)
  changed, _ = apply(params, tokens.at[0, 6:].set((tokens[0, 6:] + 7) % cfg.vocab_size))
  np.testing.assert_allclose(changed[0, :6], base[0, :6], rtol=1e-5, atol=1e-6)
  assert float(jnp.abs(changed[0, 6:] - base[0, 6:]).max()) > 1e-3


def test_remat_same_loss_and_grads():
  cfg = tiny_model_config()
  tokens = jax.random.randint(jax.random.PRNGKey(3), (2, 6), 0, cfg.vocab_size)
  params = _init(cfg, tokens)

  def loss(c):
    def fn(p):
      logits, _ = model.Transformer(c).apply(p, tokens)
      return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[..., None], -1))
    return jax.jit(jax.value_and_grad(fn))(params)

  (l1, g1), (l2, g2) = loss(cfg), loss(tiny_model_config(remat=True))
  np.testing.assert_allclose(l1, l2, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_rope_is_relative():
  q = jax.random.normal(jax.random.PRNGKey(0), (1, 1, 1, 8))
  k = jax.random.normal(jax.random.PRNGKey(1), (1, 1, 1, 8))

  def score(m, n):
    qm = model.apply_rope(q, jnp.array([m]), 1e4)
    kn = model.apply_rope(k, jnp.array([n]), 1e4)
    return float(jnp.sum(qm * kn))

  np.testing.assert_allclose(score(5, 2), score(13, 10), rtol=1e-5)
  np.testing.assert_allclose(score(0, 0), float(jnp.sum(q * k)), rtol=1e-6)
  assert abs(score(5, 2) - score(5, 4)) > 1e-4


@pytest.mark.parametrize("kw", [dict(), dict(moe=False), dict(num_layers=3, moe_every=3),
                                dict(moe=MoEConfig(num_experts=4, top_k=1, d_ff=8,
                                                   shared_expert_d_ff=12))])
def test_count_params_matches_eval_shape(kw):
  cfg = tiny_model_config(**kw)
  shapes = jax.eval_shape(model.Transformer(cfg).init, jax.random.PRNGKey(0),
                          jnp.zeros((1, 4), jnp.int32))
  n_leaves = sum(math.prod(x.shape) for x in jax.tree.leaves(nn.unbox(shapes)))
  counts = model.count_params(cfg)
  assert counts["total"] == n_leaves
  # Active by hand: total minus the (E - K) unused experts of each MoE layer.
  if cfg.moe is not None:
    unused = cfg.num_moe_layers * (cfg.moe.num_experts - cfg.moe.top_k) * 3 * 32 * cfg.moe.d_ff
  else:
    unused = 0
  assert counts["active"] == n_leaves - unused


def _paper_cfg(d_model, layers, theta):
  return model.ModelConfig(vocab_size=100_277, d_model=d_model, num_layers=layers,
                           num_heads=layers, d_ff=4 * d_model, rope_theta=theta,
                           moe=MoEConfig(num_experts=32, top_k=4, d_ff=d_model))


@pytest.mark.parametrize("d_model,layers,theta,active,total",
                         [(768, 8, 1e4, 230e6, 627e6), (1536, 12, 1e5, 761e6, 3.14e9)])
def test_paper_parameter_counts(d_model, layers, theta, active, total):
  counts = model.count_params(_paper_cfg(d_model, layers, theta))
  assert abs(counts["active"] / active - 1) < 0.01, counts
  assert abs(counts["total"] / total - 1) < 0.01, counts


def test_flops_per_token_formula():
  cfg = _paper_cfg(768, 8, 1e4)
  d, v = 768, 100_277
  matmul = 8 * (4 * d * d + d * 32 + 4 * 3 * d * d) + d * v  # attn, router, 4 experts, head
  assert model.flops_per_token(cfg, 1024) == 6 * matmul + 12 * 8 * d * 1024
  with pytest.raises(ValueError):
    model.flops_per_token(cfg, 0)


def test_from_config_and_validation():
  cfg = ml_collections.ConfigDict(dict(
      model=dict(vocab_size=0, d_model=32, num_layers=2, num_heads=4, d_ff=64, rope_theta=1e5,
                 moe_every=1, dtype="float32", param_dtype="bfloat16", attention_impl="auto",
                 norm_eps=1e-6, remat=False),
      moe=dict(num_experts=8, top_k=2, d_ff=16, gating="sigmoid", renormalize=False,
               capacity_factor=1.5, shared_expert_d_ff=0, router_init="normal",
               router_init_scale=1.0, num_groups=1)))
  mc = model.ModelConfig.from_config(cfg, vocab_size=99)
  assert mc.vocab_size == 99 and mc.rope_theta == 1e5 and mc.moe.gating == "sigmoid"
  assert mc.moe.capacity_factor == 1.5 and mc.param_dtype == "bfloat16"
  cfg.moe.num_experts = 0
  assert model.ModelConfig.from_config(cfg, vocab_size=99).moe is None
  with pytest.raises(ValueError, match="vocab_size"):
    model.ModelConfig.from_config(cfg)  # vocab_size 0 and no override
  with pytest.raises(ValueError, match="num_heads"):
    tiny_model_config(num_heads=5)
  with pytest.raises(ValueError, match="attention_impl"):
    tiny_model_config(attention_impl="flash")
  with pytest.raises(ValueError, match="dtype"):
    tiny_model_config(dtype="float8")
  with pytest.raises(ValueError, match="moe_every"):
    tiny_model_config(moe_every=3)
  assert model.resolve_attention_impl("auto", jnp.bfloat16, 64) == "xla"  # CPU
  cfg_t = tiny_model_config()
  with pytest.raises(ValueError, match="expert_bias"):
    model.Transformer(cfg_t).init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32),
                                  expert_bias=jnp.zeros((3, 4)))


def test_count_params_takes_the_experiment_config():
  """count_params / flops_per_token accept the experiment config (auto routing groups, the
  paper's cl100k vocabulary); MoE-M is the paper's 230M active / 627M total within 0.2 %."""
  counts = model.count_params(moe_m.get_config())
  assert abs(counts["total"] / 627e6 - 1) < 2e-3 and abs(counts["active"] / 230e6 - 1) < 2e-3
  mcfg = model.ModelConfig.from_config(moe_m.get_config())
  assert mcfg.moe.num_groups == 1  # auto (0) counts as one group outside the trainer
  assert model.flops_per_token(moe_m.get_config(), 2048) == model.flops_per_token(
      mcfg, 2048)
  cfg = moe_m.get_config()
  cfg.model.vocab_size = 0
  with pytest.raises(ValueError, match="model.vocab_size"):
    model.count_params(cfg)
