"""Document masking: segment ids from packing keep the attention within documents (model.py).

With `segment_ids`, no attention weight crosses a document boundary: the logits after a
boundary do not change when the tokens before it do, and a packed document gets the logits it
would get alone (RoPE is relative, so its start position does not matter).
"""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simbal_jax import model
from simbal_jax.data import packing

from conftest import tiny_model_config

EOS = 60


def _cfg(moe):
  return tiny_model_config(moe, attention_impl="xla")


def _packed(key, length=14, boundaries=(5, 9)):
  """int32[2, L] tokens without EOS except at `boundaries` in row 0 and one boundary in row 1."""
  tokens = np.array(jax.random.randint(key, (2, length), 0, EOS))
  tokens[0, list(boundaries)] = EOS
  tokens[1, 7] = EOS
  return tokens


@pytest.mark.parametrize("moe", [False, True])
def test_no_attention_across_document_boundaries(moe):
  cfg = _cfg(moe)
  tokens = _packed(jax.random.PRNGKey(0))
  seg = packing.segment_ids(tokens, EOS)
  assert seg[0].tolist() == [0] * 5 + [1] * 4 + [2] * 5
  tf = model.Transformer(cfg)
  params = nn.unbox(jax.jit(tf.init)(jax.random.PRNGKey(1), jnp.asarray(tokens)))
  apply = jax.jit(lambda p, t, s: tf.apply(p, t, segment_ids=s)[0])
  base = apply(params, tokens, seg)
  changed_tokens = tokens.copy()
  changed_tokens[0, :5] = (tokens[0, :5] + 11) % EOS  # the first document of row 0
  changed_tokens[1, :7] = (tokens[1, :7] + 3) % EOS  # the first document of row 1
  changed = apply(params, changed_tokens, packing.segment_ids(changed_tokens, EOS))
  np.testing.assert_allclose(changed[0, 5:], base[0, 5:], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(changed[1, 7:], base[1, 7:], rtol=1e-5, atol=1e-5)
  assert float(jnp.abs(changed[0, :5] - base[0, :5]).max()) > 1e-3
  # Without segment ids the same change reaches past the boundary (plain causal attention).
  plain = jax.jit(lambda p, t: tf.apply(p, t)[0])
  assert float(jnp.abs(plain(params, changed_tokens)[0, 5:] - plain(params, tokens)[0, 5:]).max()
               ) > 1e-3


def test_a_packed_document_gets_the_logits_it_gets_alone():
  cfg = _cfg(moe=False)
  tokens = _packed(jax.random.PRNGKey(2))
  tf = model.Transformer(cfg)
  params = nn.unbox(tf.init(jax.random.PRNGKey(3), jnp.asarray(tokens)))
  packed, _ = tf.apply(params, tokens, segment_ids=packing.segment_ids(tokens, EOS))
  alone, _ = tf.apply(params, tokens[:1, 5:9])  # the second document (EOS first) by itself
  np.testing.assert_allclose(packed[0, 5:9], alone[0], rtol=1e-4, atol=1e-4)
  remat = model.Transformer(dataclasses.replace(cfg, remat=True))
  jitted = jax.jit(lambda p, t, s: remat.apply(p, t, segment_ids=s)[0])
  np.testing.assert_allclose(jitted(params, tokens, packing.segment_ids(tokens, EOS)), packed,
                             rtol=1e-5, atol=1e-5)  # jit and remat parity


def test_segment_mask_and_bad_segment_ids():
  seg = jnp.array([[0, 0, 1, 1, 1]])
  mask = model.segment_mask(seg)
  assert mask.shape == (1, 1, 5, 5) and mask.dtype == jnp.bool_
  assert not bool(mask[0, 0, 2, 1]) and bool(mask[0, 0, 4, 2]) and bool(mask[0, 0, 1, 0])
  cfg = _cfg(moe=False)
  tokens = jnp.zeros((1, 5), jnp.int32)
  tf = model.Transformer(cfg)
  params = nn.unbox(tf.init(jax.random.PRNGKey(0), tokens))
  with pytest.raises(ValueError, match="segment_ids must be int"):
    tf.apply(params, tokens, segment_ids=jnp.zeros((1, 4), jnp.int32))
