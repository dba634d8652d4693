"""simbal_jax/runio/integrity.py: array digests independent of sharding, and error reasons that
lead with their root cause (checkpoint fallbacks built on them: test_checkpoint.py)."""
import jax
import jax.numpy as jnp

from simbal_jax.runio import integrity

def test_digests_do_not_depend_on_sharding():
  state = {"params": {"w": jax.random.normal(jax.random.key(3), (128, 128)),
                      "b": jnp.arange(4.0) * 3}, "step": jnp.int32(3)}
  mesh = jax.make_mesh((8,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
  sharded = jax.device_put(state, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  sharded["params"]["w"] = jax.device_put(
      state["params"]["w"], jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d")))
  assert integrity.state_digests(state) == integrity.state_digests(sharded)
  other = dict(state, params=dict(state["params"], w=state["params"]["w"].at[5, 7].add(1e-6)))
  assert integrity.verify_digests(other, {"format": integrity.DIGEST_FORMAT,
                                           "leaves": integrity.state_digests(state)}) == [
                                               "['params']['w']"]


def test_reasons_lead_with_the_root_cause():
  spec = "{" + '\\"driver\\":\\"zarr\\",' * 40 + "}"
  e = ValueError('PERMISSION_DENIED: Error reading "params.w/0.0" in OCDBT database at local '
                 'file "/ck/2/state/": Error opening file "/ck/2/state/d/ab12": Permission '
                 "denied [os_error_code='13'] [source locations='x.cc:1'] "
                 f"[tensorstore_spec='{spec}']")
  assert integrity.brief(e).startswith(
      "Permission denied: /ck/2/state/d/ab12 (PERMISSION_DENIED) [ValueError: PERMISSION_DENIED")
  assert "zarr" not in integrity.brief(e) and integrity.classify(e) == "access"
  inner = PermissionError(13, "Permission denied", "/ck/2/state")
  try:
    try:
      raise inner
    except OSError as x:
      raise RuntimeError("x" * 400) from x
  except RuntimeError as outer:
    assert integrity.brief(outer).startswith(
        "PermissionError: [Errno 13] Permission denied: '/ck/2/state' [RuntimeError: xxx")
