"""The balancing-term registry: parsing, built-in terms against NumPy float64, aliases."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simbal_jax import balance
from simbal_jax import losses
from simbal_jax import routing

def test_parse_terms_order_defaults_and_round_trip():
  assert balance.parse_terms("simbal:0.1+lbl:0.01") == (("simbal", 0.1), ("lbl", 0.01))
  assert balance.parse_terms("lbl, simbal") == (("lbl", 0.01), ("simbal", 0.1))  # defaults
  assert balance.parse_terms("") == () and balance.parse_terms(" + ") == ()
  terms = balance.parse_terms("colnorm:0.5+router_z")
  assert balance.parse_terms(balance.format_terms(terms)) == terms


@pytest.mark.parametrize("spec,match", [
    ("bogus", "unknown term 'bogus'.*simbal_unit"), ("lbl:x", "not a number"),
    ("lbl:-0.1", "finite number >= 0"), ("lbl:nan", "finite number >= 0"),
    ("lbl:inf", "finite number >= 0"), ("lbl+lbl:0.1", "given twice")])
def test_parse_terms_errors_name_the_field(spec, match):
  with pytest.raises(ValueError, match=match) as err:
    balance.parse_terms(spec)
  assert str(err.value).startswith("balance.terms=")


# Names the trainer logs as train/<name> (tests/test_step.py checks they are all RESERVED).
@pytest.mark.parametrize("name", ["loss", "dropped", "bias_absmax", "tokens_per_second", "mfu",
                                  "layer_load", "layer_entropy", "layer_maxvio"])
def test_register_rejects_names_of_real_metrics(name):
  with pytest.raises(ValueError, match="must be an identifier, not one of"):
    balance.register(name, lambda layer, options: 0.0, 0.1)
  assert name not in balance.TERMS


def test_register_rejects_non_identifiers():
  with pytest.raises(ValueError, match="identifier"):
    balance.register("my-term", lambda layer, options: 0.0, 0.1)


def test_every_alias_resolves():
  for name in balance.METHODS:
    s = balance.method_settings(name)
    balance.parse_terms(s["terms"])
  assert balance.method_settings("simbal_lbl") == {"terms": "simbal:0.1+lbl:0.01",
                                                   "loss_free": False}
  with pytest.raises(ValueError, match="lf_simbal"):
    balance.method_settings("bogus")


def test_colnorm_and_simbal_split_hand_case():
  # R [D=3, E=2]: column squared norms 4 and 1, off-diagonal Gram entry 2*0.5 = 1.
  r = np.array([[2.0, 0.5], [0.0, np.sqrt(0.75)], [0.0, 0.0]])
  assert float(losses.column_norm_loss(jnp.asarray(r, jnp.float32))) == pytest.approx(3.0)
  gram = r.T @ r
  assert float(losses.simbal(jnp.asarray(r, jnp.float32))) == pytest.approx(
      np.abs(gram - np.eye(2)).sum(), rel=1e-6)  # = 3 (diagonal) + 2 * 1 (off-diagonal)
  assert np.abs(gram - np.eye(2)).sum() == pytest.approx(5.0)


def test_simbal_unit_is_scale_free_and_colnorm_is_direction_free():
  key = jax.random.key(0)
  r = jax.random.normal(key, (16, 4))
  opts = balance.Options()
  lay = lambda k: balance.LayerInputs(None, k, None, None)
  np.testing.assert_allclose(balance.simbal_unit(lay(3.0 * r), opts),
                             balance.simbal_unit(lay(r), opts), rtol=1e-5)
  q = jnp.linalg.qr(jax.random.normal(jax.random.key(1), (16, 16)))[0]  # rotate the inputs
  np.testing.assert_allclose(balance.colnorm(lay(q @ r), opts), balance.colnorm(lay(r), opts),
                             rtol=1e-4)
  unit_cols = r / jnp.linalg.norm(r, axis=0)
  assert float(balance.colnorm(lay(unit_cols), opts)) == pytest.approx(0.0, abs=1e-5)
  assert float(balance.simbal(lay(unit_cols), opts)) > 0.1  # directions still overlap


def test_layer_values_match_numpy_per_layer():
  """Two layers, T=12 tokens, E=4, K=2: lbl and simbal per layer vs NumPy float64."""
  t, e, k, d = 12, 4, 2, 8
  ks = jax.random.split(jax.random.key(3), 2)
  logits = jax.random.normal(ks[0], (2, t, e))
  kernels = jax.random.normal(ks[1], (2, d, e)) * 0.3
  router = jax.vmap(lambda x: routing.route(x, k))(logits)
  opts = balance.Options(batch_shape=(3, 4))
  vals = balance.layer_values((("lbl", 0.01), ("simbal", 0.1)), router, kernels, None, opts)
  for layer in range(2):
    lg = np.asarray(logits[layer], np.float64)
    p = np.exp(lg - lg.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    top = np.argsort(-p, -1)[:, :k]
    f = np.bincount(top.reshape(-1), minlength=e) / (k * t)
    np.testing.assert_allclose(float(vals["lbl"][layer]), e * np.sum(f * p.mean(0)), rtol=1e-5)
    r = np.asarray(kernels[layer], np.float64)
    np.testing.assert_allclose(float(vals["simbal"][layer]),
                               np.abs(r.T @ r - np.eye(e)).sum(), rtol=1e-5)


def test_uniform_router_lbl_term_is_one():
  t, e, k = 16, 4, 2
  index = np.stack([np.arange(t) % e, (np.arange(t) + 1) % e], -1).astype(np.int32)
  router = routing.RouterOutput(logits=jnp.zeros((1, t, e)), probs=jnp.full((1, t, e), 1 / e),
                                gates=jnp.full((1, t, k), 1 / e), expert_index=index[None])
  vals = balance.layer_values((("lbl", 1.0),), router, jnp.zeros((1, 8, e)), None,
                              balance.Options(batch_shape=(2, 8)))
  assert float(vals["lbl"][0]) == pytest.approx(1.0)
