"""runio/warmstart.py: parameters from another run's checkpoints (`ckpt.init_from`)."""

import glob
import json
import logging
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simbal_jax.runio import checkpoint
from simbal_jax.runio import warmstart

def _state(v):
  return {"params": {"w": jnp.full((3, 4), float(v)), "b": jnp.arange(4.0) * v},
          "opt": jnp.ones(5) * v, "step": jnp.int32(v)}


def _abstract_params():
  return jax.eval_shape(lambda: _state(0)["params"])


@pytest.fixture
def two_steps(tmp_path):
  ck = checkpoint.Checkpointer(tmp_path / "ck", every=1, max_to_keep=3, async_save=False)
  for s in (1, 2):
    ck.save(s, _state(s), {"pos": s})
  ck.close()
  return tmp_path / "ck"


def test_newest_step_params_only(two_steps):
  params = warmstart.restore_params_only(str(two_steps), _abstract_params())
  assert set(params) == {"w", "b"}
  np.testing.assert_array_equal(np.asarray(params["w"]), np.full((3, 4), 2.0))
  np.testing.assert_array_equal(np.asarray(params["b"]), np.arange(4.0) * 2)
  assert checkpoint.restore_params_only is warmstart.restore_params_only


def test_a_step_whose_digest_differs_is_skipped(two_steps, caplog):
  """A recorded digest that does not match the step's parameters: the step before is used."""
  files = [f for f in glob.glob(str(two_steps / "2" / "integrity" / "*"))]
  changed = 0
  for f in files:
    try:
      record = json.load(open(f))
    except ValueError:
      continue  # not JSON (commit_success.txt)
    for key in list(record.get("leaves", {})):
      if "params" in key and "w" in key:
        record["leaves"][key] = "0" * len(str(record["leaves"][key]))
        changed += 1
    json.dump(record, open(f, "w"))
  assert changed == 1, files
  with caplog.at_level(logging.WARNING):
    params = warmstart.restore_params_only(str(two_steps), _abstract_params())
  np.testing.assert_array_equal(np.asarray(params["w"]), np.full((3, 4), 1.0))
  assert "step 2" in caplog.text and "differ from their save-time digests" in caplog.text


def test_a_step_without_digests_is_used_with_a_warning(two_steps, caplog):
  shutil.rmtree(two_steps / "2" / "integrity")  # e.g. a checkpoint written elsewhere
  with caplog.at_level(logging.WARNING):
    params = warmstart.restore_params_only(str(two_steps), _abstract_params())
  np.testing.assert_array_equal(np.asarray(params["w"]), np.full((3, 4), 2.0))
  assert "no digests" in caplog.text and "unverified" in caplog.text


def test_no_readable_step_raises(tmp_path, two_steps):
  for s in ("1", "2"):
    shutil.rmtree(two_steps / s / "state")
  with pytest.raises(FileNotFoundError, match="init_from: no readable checkpoint"):
    warmstart.restore_params_only(str(two_steps), _abstract_params())
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="no readable checkpoint"):
    warmstart.restore_params_only(str(tmp_path / "empty"), _abstract_params())
