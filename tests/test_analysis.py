"""analysis: every expert's output and the per-layer PES against NumPy float64, with remat."""
import dataclasses

import flax.linen as nn
import jax
import numpy as np
import pytest

from simbal_jax import analysis
from simbal_jax import model as model_lib

def _swiglu_np(x_TxD, wi_gate, wi_up, wo):
  """float64 SwiGLU of one expert: (silu(x Wg) * (x Wu)) Wo."""
  g, u = x_TxD @ wi_gate, x_TxD @ wi_up
  return (g / (1.0 + np.exp(-g)) * u) @ wo


def _pes_np(out_TxExD):
  """float64 PES: mean over tokens of the mean cosine over expert pairs i < j."""
  num_experts = out_TxExD.shape[1]
  unit = out_TxExD / np.linalg.norm(out_TxExD, axis=-1, keepdims=True)
  cos = np.einsum("ted,tfd->tef", unit, unit)
  i, j = np.triu_indices(num_experts, k=1)
  return cos[:, i, j].mean()


def test_all_expert_outputs_matches_numpy_swiglu():
  t, d, f, e = 5, 8, 12, 3
  ks = jax.random.split(jax.random.key(0), 4)
  params = {"wi_gate": jax.random.normal(ks[0], (e, d, f)),
            "wi_up": jax.random.normal(ks[1], (e, d, f)),
            "wo": jax.random.normal(ks[2], (e, f, d)) / np.sqrt(f)}
  x = jax.random.normal(ks[3], (t, d))
  got = np.asarray(analysis.all_expert_outputs(params, x))
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  x64 = np.asarray(x, np.float64)
  want = np.stack([_swiglu_np(x64, p["wi_gate"][i], p["wi_up"][i], p["wo"][i])
                   for i in range(e)], axis=1)
  assert got.shape == (t, e, d) and got.dtype == np.float32
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_layer_pes_matches_numpy_and_works_with_remat():
  mcfg = model_lib.ModelConfig(
      vocab_size=32, d_model=16, num_layers=3, num_heads=2, d_ff=32, dtype="float32",
      moe_every=1, moe=model_lib.MoEConfig(num_experts=4, top_k=2, d_ff=16), remat=True)
  tokens = jax.random.randint(jax.random.key(1), (2, 8), 0, mcfg.vocab_size)
  plain = model_lib.Transformer(dataclasses.replace(mcfg, remat=False))
  remat = model_lib.Transformer(mcfg)
  params = remat.init(jax.random.key(0), tokens)["params"]
  # remat does not change the parameter tree (so the remat-free copy can use the params).
  plain_params = plain.init(jax.random.key(0), tokens)["params"]
  assert jax.tree.structure(nn.unbox(params)) == jax.tree.structure(nn.unbox(plain_params))

  got = analysis.layer_pes(jax.random.key(2), remat, params, tokens, num_tokens=16)
  got_plain = analysis.layer_pes(jax.random.key(2), plain, params, tokens, num_tokens=16)
  np.testing.assert_array_equal(got["pes"], got_plain["pes"])
  assert got["pes"].shape == (3,) and got["num_tokens"] == 16
  assert np.all((got["pes"] >= -1) & (got["pes"] <= 1))

  # NumPy: every expert's float64 SwiGLU on the captured block inputs (all 16 tokens, so the
  # token sample is a permutation and does not change the mean).
  captured = analysis.capture_moe_inputs(remat, params, tokens)
  assert [path for path, _ in captured] == [(f"layers_{i}", "ffn") for i in range(3)]
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), nn.unbox(params))
  want = []
  for path, x_BxLxD in captured:
    block = p[path[0]][path[1]]
    x = np.asarray(x_BxLxD, np.float64).reshape(16, -1)
    out = np.stack([_swiglu_np(x, block["wi_gate"][i], block["wi_up"][i], block["wo"][i])
                    for i in range(4)], axis=1)
    want.append(_pes_np(out))
  np.testing.assert_allclose(got["pes"], want, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(got["mean"], np.mean(want), rtol=1e-4, atol=1e-5)

  # The captured input of the first MoE block is its ffn_norm(h) input: check it is
  # RMS-normalised (scale initialised to 1), i.e. the interceptor caught the right tensor.
  x0 = np.asarray(captured[0][1], np.float64)
  np.testing.assert_allclose(np.sqrt(np.mean(x0 ** 2, axis=-1)), 1.0, rtol=1e-4)


def test_layer_expert_norms_of_a_hand_made_params_and_grads_tree_match_numpy():
  """Blocks 1 and 3 are MoE (block 0 dense, block 2 absent from layer_ids); float64 NumPy
  norms over wi_gate, wi_up and wo of each expert, for a parameter tree and a gradient tree
  (a zero gradient for an expert that no token reached)."""
  rng = np.random.default_rng(0)
  e, d, f = 3, 4, 5

  def block():
    return {"wi_gate": rng.normal(size=(e, d, f)).astype(np.float32),
            "wi_up": rng.normal(size=(e, d, f)).astype(np.float32),
            "wo": rng.normal(size=(e, f, d)).astype(np.float32),
            "router": {"kernel": rng.normal(size=(d, e)).astype(np.float32)}}

  params = {"layers_0": {"ffn": {"wi": rng.normal(size=(d, f)).astype(np.float32)}},
            "layers_1": {"ffn": block()}, "layers_2": {"ffn": block()},
            "layers_3": {"ffn": block()}}
  grads = jax.tree.map(lambda x: x * 0.01, params)
  for name in ("wi_gate", "wi_up", "wo"):
    grads["layers_3"]["ffn"][name][1] = 0.0  # expert 1 of block 3: no gradient
  for tree in (params, grads):
    want = np.stack([np.sqrt(sum(
        (tree[f"layers_{i}"]["ffn"][n].astype(np.float64) ** 2).reshape(e, -1).sum(-1)
        for n in ("wi_gate", "wi_up", "wo"))) for i in (1, 3)])
    got = np.asarray(analysis.layer_expert_norms(tree, [1, 3]))
    assert got.shape == (2, e) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-6)
  assert float(analysis.layer_expert_norms(grads, [3])[0, 1]) == 0.0


def test_layer_pes_of_a_dense_model_is_refused():
  mcfg = model_lib.ModelConfig(vocab_size=32, d_model=16, num_layers=1, num_heads=2, d_ff=32,
                               dtype="float32")
  dense = model_lib.Transformer(mcfg)
  tokens = np.zeros((1, 4), np.int32)
  params = dense.init(jax.random.key(0), tokens)["params"]
  with pytest.raises(ValueError, match="no MoE layer"):
    analysis.layer_pes(jax.random.key(0), dense, params, tokens)
