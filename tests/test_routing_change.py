"""analysis.RoutingTracker: the churn and expert movement it logs equal an independent
computation (Python sets over the model's own routing, NumPy float64 norms of the weights)."""
import jax
import numpy as np

from simbal_jax import evaluate
from simbal_jax import env as env_lib
from simbal_jax import analysis
from simbal_jax import sharding
from conftest import tiny_config

def test_tracker_churn_and_movement_vs_independent_computation(tmp_path):
  cfg = tiny_config("lbl", analysis=True)
  cfg.train.eval_tokens = 256  # two eval batches of 8 x 16 tokens
  cfg.data.synthetic.num_docs = 1024  # enough held-out documents for them
  env = env_lib.build(cfg, str(tmp_path), devices=jax.devices()[:1])
  with sharding.mesh_rules(env.mesh, env.rules):
    state, _, _ = env_lib.initial_state(env, None)
    batches = [sharding.to_global(b, env.batch_sharding, evaluate.EVAL_KEYS)
               for b in evaluate.eval_set(env)]
    assert len(batches) == 2
    # A second state: the experts of layer 1 expert 2 unchanged, everything else perturbed.
    keys = iter(jax.random.split(jax.random.key(5), 100))
    params2 = jax.tree.map(lambda x: x + 0.3 * jax.random.normal(next(keys), x.shape, x.dtype),
                           state.params)
    for name in analysis.EXPERT_WEIGHTS:
      w = params2["layers_1"]["ffn"][name]
      params2["layers_1"]["ffn"][name] = w.at[2].set(state.params["layers_1"]["ffn"][name][2])
    state2 = state.replace(params=params2)
    tracker = analysis.RoutingTracker(env.model, batches, probe_tokens=200,
                                      out_sharding=sharding.replicated(env.mesh))
    tracker.start(state, 0)
    got, move = tracker(state2, 7, layer_ids=[0, 1])

  apply = jax.jit(env.model.apply)

  def routing(params):  # [Lm, 256, K]: both eval batches, sequence-major
    idx = [np.asarray(apply({"params": params}, b["inputs"],
                            expert_bias=state.expert_bias)[1].router.expert_index)
           for b in batches]
    return np.concatenate(idx, axis=1)

  a, b = routing(state.params)[:, :200], routing(params2)[:, :200]
  k = a.shape[-1]
  want_churn = [1 - np.mean([len(set(x) & set(y)) / k for x, y in zip(a[i], b[i])])
                for i in range(2)]
  assert got["eval/churn_since_step"] == 0.0
  np.testing.assert_allclose([got["eval/layer_0/churn"], got["eval/layer_1/churn"]], want_churn,
                             rtol=1e-6)
  assert 0 < got["eval/churn"] < 1
  want_move = np.zeros((2, 4))
  for j, layer in enumerate(("layers_0", "layers_1")):
    for e in range(4):
      old = [np.asarray(state.params[layer]["ffn"][n][e], np.float64)
             for n in analysis.EXPERT_WEIGHTS]
      new = [np.asarray(params2[layer]["ffn"][n][e], np.float64)
             for n in analysis.EXPERT_WEIGHTS]
      want_move[j, e] = (np.sqrt(sum(np.sum((y - x) ** 2) for x, y in zip(old, new)))
                         / np.sqrt(sum(np.sum(x ** 2) for x in old)))
  np.testing.assert_allclose(move, want_move, rtol=1e-5)
  assert move[1, 2] == 0.0
  assert got["eval/layer_1/stagnant"] == 1.0 and got["eval/layer_0/stagnant"] == 0.0
  assert got["eval/layer_1/expert_move_min"] == 0.0
  np.testing.assert_allclose(got["eval/expert_move"], want_move.mean(), rtol=1e-5)
  # The state compared is the next reference: no change since it.
  with sharding.mesh_rules(env.mesh, env.rules):
    again, move2 = tracker(state2, 9, layer_ids=[0, 1])
  assert again["eval/churn_since_step"] == 7 and again["eval/churn"] == 0.0
  assert not move2.any()


def test_dense_model_or_switched_off_logs_nothing(tmp_path):
  cfg = tiny_config("dense")
  cfg.moe.num_experts = 0
  env = env_lib.build(cfg, str(tmp_path), devices=jax.devices()[:1])
  batches = [sharding.to_global(b, env.batch_sharding, evaluate.EVAL_KEYS)
             for b in evaluate.eval_set(env)]
  tracker = analysis.RoutingTracker(env.model, batches, probe_tokens=64)
  assert not tracker.enabled
  tracker.start(None, 0)
  assert tracker(None, 1) == ({}, None)
  moe_env = env_lib.build(tiny_config("lbl"), str(tmp_path / "moe"), devices=jax.devices()[:1])
  off = analysis.RoutingTracker(moe_env.model, batches, probe_tokens=0, movement=False)
  assert not off.enabled and off(None, 1) == ({}, None)
