"""Checkpointer on a small pytree state + dict iterator state (no model needed)."""
import glob
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simbal_jax import checkpoint


def _state(v, step):
  return {"params": {"w": jnp.full((3, 4), float(v)), "b": jnp.arange(4.0) * v},
          "bias": jnp.zeros((2, 4)) + v, "step": jnp.int32(step)}


def test_save_restore_keep_and_resave(tmp_path):
  ck = checkpoint.Checkpointer(tmp_path / "ck", every=2, max_to_keep=2)
  assert not ck.save(1, _state(1, 1), {"pos": 1})  # not due
  for s in (2, 4, 6):
    assert ck.save(s, _state(s, s), {"pos": s, "epoch": 0}, config={"a": 1})
  assert not ck.save(6, _state(99, 6), {"pos": 99}, force=True)  # existing step: no-op
  assert ck.save(7, _state(7, 7), {"pos": 7}, force=True)  # forced off-interval save
  ck.close()
  ck = checkpoint.Checkpointer(tmp_path / "ck", every=2, max_to_keep=2)
  assert ck.all_steps() == [6, 7]
  abstract = jax.eval_shape(lambda: _state(0, 0))
  step, st, data = ck.restore(abstract)
  assert step == 7 and data == {"pos": 7}
  np.testing.assert_array_equal(np.asarray(st["params"]["b"]), np.arange(4.0) * 7)
  step, st, data = ck.restore(abstract, step=6)
  assert int(st["step"]) == 6 and data["pos"] == 6  # the re-save did not overwrite
  ck.close()


@pytest.mark.parametrize("mode", ["truncate", "delete"])
def test_corrupt_latest_is_skipped(tmp_path, mode):
  ck = checkpoint.Checkpointer(tmp_path / "ck", every=1, max_to_keep=3, async_save=False)
  for s in (1, 2):
    ck.save(s, _state(s, s), {"pos": s})
  ck.close()
  files = [f for f in glob.glob(str(tmp_path / "ck" / "2" / "state" / "**"), recursive=True)
           if os.path.isfile(f) and "commit_success" not in f]
  assert files
  for f in files:
    if mode == "truncate":
      with open(f, "r+b") as fh:
        fh.truncate(max(os.path.getsize(f) // 3, 0))
    else:
      os.remove(f)
  ck = checkpoint.Checkpointer(tmp_path / "ck", every=1)
  step, st, data = ck.restore(jax.eval_shape(lambda: _state(0, 0)))
  assert step == 1 and data == {"pos": 1}
  np.testing.assert_array_equal(np.asarray(st["params"]["w"]), np.ones((3, 4)))
  assert ck.all_steps() == [1]  # the unreadable step was moved aside ...
  assert ck.save(2, _state(5, 2), {"pos": 5})  # ... so it can be written again
  ck.close()


def test_empty_dir_restores_none_and_init_from(tmp_path):
  ck = checkpoint.Checkpointer(tmp_path / "ck", every=1)
  assert ck.restore(jax.eval_shape(lambda: _state(0, 0))) is None
  ck.save(3, _state(3, 3), {})
  ck.close()
  params = checkpoint.restore_params_only(
      str(tmp_path / "ck"), jax.eval_shape(lambda: _state(0, 0)["params"]))
  np.testing.assert_array_equal(np.asarray(params["b"]), np.arange(4.0) * 3)


def test_preemption_handler_flags_signal():
  before = signal.getsignal(signal.SIGTERM)
  with checkpoint.PreemptionHandler() as h:
    assert not h.requested
    os.kill(os.getpid(), signal.SIGTERM)
    assert h.requested and h.signum == signal.SIGTERM
  assert signal.getsignal(signal.SIGTERM) is before
