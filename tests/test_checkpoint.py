"""Checkpointer on a small pytree state + dict iterator state (no model needed)."""
import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simbal_jax.runio import checkpoint
from simbal_jax.runio import rundir

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


def _big_state(v, step):
  """A state whose largest array is incompressible (random), so a flipped byte is data."""
  return {"params": {"w": jax.random.normal(jax.random.key(v), (128, 128)),
                     "b": jnp.arange(4.0) * v}, "step": jnp.int32(step)}


def _largest_file(step_dir):
  files = [f for f in glob.glob(os.path.join(step_dir, "state", "**"), recursive=True)
           if os.path.isfile(f)]
  return max(files, key=os.path.getsize)


def _listing(d):
  return sorted(os.path.relpath(os.path.join(r, f), d) for r, _, fs in os.walk(d) for f in fs)


def _save_two(tmp_path, make=_big_state, config=None):
  ck = checkpoint.Checkpointer(tmp_path / "ck", every=1, max_to_keep=3, async_save=False)
  for s in (1, 2):
    ck.save(s, make(s, s), {"pos": s}, config=config)
  ck.close()
  return jax.eval_shape(lambda: make(0, 0))


def test_bit_flip_restores_silently_in_orbax_but_digest_falls_back(tmp_path):
  abstract = _save_two(tmp_path)
  path = _largest_file(str(tmp_path / "ck" / "2"))
  data = bytearray(open(path, "rb").read())
  mid = len(data) // 2
  data[mid:mid + 64] = bytes(b ^ 0xFF for b in data[mid:mid + 64])
  open(path, "wb").write(bytes(data))
  ck = checkpoint.Checkpointer(tmp_path / "ck", every=1)
  raw = ck.manager.restore(2, args=checkpoint.ocp.args.Composite(
      state=checkpoint.ocp.args.StandardRestore(abstract)))  # Orbax alone: no error, garbage
  assert not np.array_equal(np.asarray(raw["state"]["params"]["w"]),
                            np.asarray(_big_state(2, 2)["params"]["w"]))
  got = ck.restore(abstract)
  assert got.step == 1 and got.data == {"pos": 1}
  np.testing.assert_array_equal(np.asarray(got.state["params"]["w"]),
                                np.asarray(_big_state(1, 1)["params"]["w"]))
  assert ck.all_steps() == [1] and glob.glob(str(tmp_path / "ck" / "2.damaged.*"))
  ck.close()


def test_all_damaged_raises_and_moves_nothing(tmp_path):
  abstract = _save_two(tmp_path)
  for s in ("1", "2"):
    os.remove(_largest_file(str(tmp_path / "ck" / s)))
  before = _listing(tmp_path / "ck")
  ck = checkpoint.Checkpointer(tmp_path / "ck", every=1)
  with pytest.raises(checkpoint.DamagedCheckpoints, match=r"(?s)step 2: .*step 1: ") as err:
    ck.restore(abstract)
  assert [s for s, _ in err.value.reasons] == [2, 1]
  assert _listing(tmp_path / "ck") == before
  assert ck.restore(abstract, start_over=True) is None  # explicit: moved aside, not deleted
  assert ck.all_steps() == []
  assert len(glob.glob(str(tmp_path / "ck" / "replaced.*" / "*"))) == 2
  assert ck.save(1, _big_state(5, 1), {"pos": 5})
  ck.close()


@pytest.mark.parametrize("exc", [
    PermissionError(13, "Permission denied", "/ck/2/state/_METADATA"),
    ValueError('PERMISSION_DENIED: Error opening file "/ck/2/state/d/x"'),
    OSError(5, "Input/output error"),
])
def test_access_errors_stop_and_move_nothing(tmp_path, monkeypatch, exc):
  abstract = _save_two(tmp_path)
  before = _listing(tmp_path / "ck")
  ck = checkpoint.Checkpointer(tmp_path / "ck", every=1)

  def fail(*args, **kwargs):
    raise exc

  monkeypatch.setattr(ck.manager, "restore", fail)
  with pytest.raises(checkpoint.CheckpointAccessError, match="step 2.*Nothing was changed"):
    ck.restore(abstract)
  assert _listing(tmp_path / "ck") == before and ck.all_steps() == [1, 2]
  ck.close()


def test_unknown_error_is_not_called_damage(tmp_path, monkeypatch):
  abstract = _save_two(tmp_path)
  ck = checkpoint.Checkpointer(tmp_path / "ck", every=1)
  monkeypatch.setattr(ck.manager, "restore", lambda *a, **k: 1 / 0)
  with pytest.raises(checkpoint.CheckpointError, match="does not show damage"):
    ck.restore(abstract)
  assert ck.all_steps() == [1, 2]
  ck.close()


def test_config_and_shape_mismatch_name_the_fields(tmp_path):
  saved = {"model": {"d_model": 32}, "opt": {"peak_lr": 1e-3}, "log": {"every": 1}}
  abstract = _save_two(tmp_path, config=saved)
  ck = checkpoint.Checkpointer(tmp_path / "ck", every=1)
  new = {"model": {"d_model": 64}, "opt": {"peak_lr": 2e-3}, "log": {"every": 5}}
  with pytest.raises(rundir.ConfigChange, match=r"(?s)model.d_model: 32 -> 64 \(changes state"
                     r".*opt.peak_lr: 0.001 -> 0.002\n.*allow_config_change=opt.peak_lr"):
    ck.restore(abstract, config=new)
  with pytest.raises(rundir.ConfigChange, match=r"d_model.*\n.*peak_lr: 0.001 -> 0.002 \(allowed"):
    ck.restore(abstract, config=new, allow="all")  # a shape field cannot be allowed
  new["model"]["d_model"] = 32
  with pytest.raises(rundir.ConfigChange, match="opt.peak_lr"):
    ck.restore(abstract, config=new)
  assert ck.restore(abstract, config=new, allow="opt.peak_lr").step == 2
  assert ck.restore(abstract, config=new, allow="opt").step == 2
  wrong = jax.eval_shape(lambda: {"params": {"w": jnp.zeros((64, 128)), "b": jnp.zeros(4)},
                                  "step": jnp.int32(0)})
  with pytest.raises(checkpoint.CheckpointMismatch, match=r"params/w: saved float32\[128, 128\], "
                     r"model float32\[64, 128\]"):
    ck.restore(wrong)
  assert ck.all_steps() == [1, 2]
  ck.close()


@pytest.mark.parametrize("remove,reason", [
    ("*", "the step directory is empty"), ("state", "no state item"),
    ("data", "no data item"), ("integrity", "no integrity item")])
def test_incomplete_step_is_damage(tmp_path, caplog, remove, reason):
  import shutil  # pylint: disable=g-import-not-at-top
  abstract = _save_two(tmp_path)
  for p in glob.glob(str(tmp_path / "ck" / "2" / remove)):
    shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
  ck = checkpoint.Checkpointer(tmp_path / "ck", every=1)
  got = ck.restore(abstract, defer_moves=True)
  assert got.step == 1 and got.data == {"pos": 1}
  assert f"checkpoint step 2 in {tmp_path / 'ck'} is damaged ({reason}" in caplog.text
  assert ck.all_steps() == [1, 2]  # deferred: nothing renamed yet
  ck.apply_moves()
  assert ck.all_steps() == [1] and glob.glob(str(tmp_path / "ck" / "2.damaged.*"))
  ck.close()


def test_missing_digests_trusted_only_from_elsewhere(tmp_path, caplog):
  import shutil  # pylint: disable=g-import-not-at-top
  abstract = _save_two(tmp_path)
  shutil.rmtree(tmp_path / "ck" / "2" / "integrity")
  other = checkpoint.Checkpointer(tmp_path / "ck", every=0, require_digests=False)
  assert other.restore(abstract).step == 2  # ckpt.resume_from: used, with a warning
  assert "has no digests (a checkpoint from elsewhere): restored unverified" in caplog.text
  other.close()
  own = checkpoint.Checkpointer(tmp_path / "ck", every=1)
  assert own.restore(abstract).step == 1  # the workdir's own: not trusted
  own.close()


def test_non_finite_state_is_not_saved(tmp_path):
  ck = checkpoint.Checkpointer(tmp_path / "ck", every=1, async_save=False)
  assert ck.save(1, _state(1, 1), {"pos": 1})
  bad = _state(2, 2)
  bad["params"]["b"] = bad["params"]["b"].at[1].set(jnp.inf)
  bad["bias"] = bad["bias"] * jnp.nan
  with pytest.raises(checkpoint.NonFiniteStateError,
                     match=r"after step 2 holds NaN or Inf in 2 of 4 arrays .*latest is step 1"):
    ck.save(2, bad, {"pos": 2})
  assert ck.all_steps() == [1] and sorted(os.listdir(tmp_path / "ck")) == ["1"]
  ck.close()


def test_init_from_skips_a_step_that_differs_from_its_digests(tmp_path):
  _save_two(tmp_path)
  path = _largest_file(str(tmp_path / "ck" / "2"))
  data = bytearray(open(path, "rb").read())
  mid = len(data) // 2
  data[mid:mid + 64] = bytes(b ^ 0xFF for b in data[mid:mid + 64])
  open(path, "wb").write(bytes(data))
  params = checkpoint.restore_params_only(
      str(tmp_path / "ck"), jax.eval_shape(lambda: _big_state(0, 0)["params"]))
  np.testing.assert_array_equal(np.asarray(params["w"]),
                                np.asarray(_big_state(1, 1)["params"]["w"]))
