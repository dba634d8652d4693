"""memory.memory_estimate against the bytes of real sharded train states on 8 fake devices."""
import jax
import pytest

from simbal_jax import env as env_lib
from simbal_jax import memory
from simbal_jax import sharding
from simbal_jax import step as step_lib

from conftest import tiny_config

def _device0_bytes(tree):
  dev = jax.devices()[0]
  return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards
             if s.device == dev)


@pytest.mark.parametrize("mesh", [(8, 1, 1, 1), (2, 2, 2, 1), (1, 8, 1, 1), (1, 2, 2, 2)])
def test_estimate_matches_sharded_state_bytes(mesh):
  cfg = tiny_config("lbl", model=dict(vocab_size=64, num_heads=4, d_ff=48),
                    moe=dict(num_experts=8, d_ff=16, num_groups=0), train=dict(seq_len=8),
                    mesh=dict(zip(("data", "fsdp", "expert", "model"), mesh)))
  env = env_lib.build(cfg, devices=jax.devices()[:8], data=False)
  with sharding.mesh_rules(env.mesh, env.rules):
    state = jax.jit(lambda k: step_lib.unbox(env.init(k)),
                    out_shardings=env.shardings)(jax.random.key(0))
  est = memory.memory_estimate(env.mcfg, dict(env.mesh.shape), global_batch_size=8, seq_len=8)
  assert est["params"] == _device0_bytes(state.params)
  assert est["params_total"] == sum(x.nbytes for x in jax.tree.leaves(state.params))
  opt = _device0_bytes(state.opt_state)
  assert est["opt_state"] <= opt <= est["opt_state"] + 64  # + AdamW's int32 step counts
  if mesh[1] * mesh[2] * mesh[3] > 1:  # something shards the parameters
    assert est["params"] < 0.6 * est["params_total"]
  assert est["tokens_per_device"] == 64 / (mesh[0] * mesh[1] * mesh[2])
  assert 0 < est["activations_remat"] < est["activations"]
  shards = mesh[0] * mesh[1] * mesh[2]
  assert est["batch"] == 8 * 8 / shards * 4 * 2  # int32 inputs and targets of one global batch
  assert est["batch"] < est["eval"] < est["activations"]  # forward only: one block at a time
  assert est["total"] == est["params"] * 4 + est["batch"] + est["activations"]
  assert "GiB per device: params" in memory.summary(est, 16 * 2**30)


def test_trainer_refuses_a_state_that_cannot_fit(tmp_path, monkeypatch):
  """Parameters + gradients + AdamW moments above the device's memory: a clear error before
  anything compiles; the activation estimate alone only warns."""
  from simbal_jax import memory, train  # pylint: disable=g-import-not-at-top
  cfg = tiny_config("lbl", steps=2)
  env = env_lib.build(cfg, str(tmp_path), devices=jax.devices()[:1])
  est = env_lib.check_memory(env)  # CPU: no device limit, nothing raised
  state = est["params"] + est["grads"] + est["opt_state"]
  monkeypatch.setattr(memory, "device_memory_bytes", lambda device=None: int(state * 0.9))
  compiled = []
  with pytest.raises(ValueError, match="mesh.fsdp"):
    train.train_and_evaluate(cfg, str(tmp_path / "run"), devices=jax.devices()[:1],
                             hooks=[lambda s, _: compiled.append(s)])
  assert not compiled
  monkeypatch.setattr(memory, "device_memory_bytes",
                      lambda device=None: int(state + 0.5 * (est["total"] - state)))
  env_lib.check_memory(env)  # activations over the limit: a warning, not an error
