"""runio/storage.py: checkpoint sizes, free space, the save-failure message, partial saves."""

import logging

import jax
import jax.numpy as jnp
import numpy as np

from simbal_jax.runio import storage


def test_tree_bytes_counts_global_shapes_not_keys():
  tree = {"w": np.zeros((3, 5), np.float32), "b": jax.ShapeDtypeStruct((7,), jnp.bfloat16),
          "step": np.int32(4), "key": jax.random.key(0), "note": "text"}
  assert storage.tree_bytes(tree) == 3 * 5 * 4 + 7 * 2 + 4


def test_used_and_free_bytes(tmp_path):
  (tmp_path / "a").mkdir()
  (tmp_path / "a" / "x").write_bytes(b"1" * 100)
  (tmp_path / "y").write_bytes(b"2" * 23)
  assert storage.used_bytes(tmp_path) == 123
  assert storage.used_bytes(tmp_path / "absent") == 0
  assert storage.used_bytes("gs://b/x") == 0
  assert storage.free_bytes("gs://b/x") is None
  # a directory not yet made: the free space of its nearest existing parent
  assert storage.free_bytes(tmp_path / "not" / "yet") == storage.free_bytes(tmp_path) > 0


def test_check_space_counts_keep_plus_one_and_present_checkpoints(tmp_path, monkeypatch,
                                                                   caplog):
  state = {"w": jax.ShapeDtypeStruct((1024,), jnp.float32)}  # 4 KiB a checkpoint
  (tmp_path / "old").write_bytes(b"0" * 1000)
  monkeypatch.setattr(storage, "free_bytes", lambda d: 10_000)
  with caplog.at_level(logging.WARNING):
    assert storage.check_space(tmp_path, state, 2) == (4096 * 3, 11_000)
  assert "may not fit" in caplog.text and "max_to_keep=2" in caplog.text
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    assert storage.check_space(tmp_path, state, 1) == (4096 * 2, 11_000)
  assert "may not fit" not in caplog.text
  monkeypatch.setattr(storage, "free_bytes", lambda d: None)
  assert storage.check_space(tmp_path, state, 1) is None


def test_save_failure_is_one_line_naming_path_cause_and_intact_steps(tmp_path, monkeypatch):
  monkeypatch.setattr(storage, "free_bytes", lambda d: 3 * 2**20)
  err = OSError(28, "No space left on device")
  msg = storage.save_failure(12, tmp_path, err, 5 * 2**20, [4, 8])
  assert "\n" not in msg and f"step 12 in {tmp_path} failed" in msg
  assert "No space left on device" in msg and "5.0 MiB" in msg and "3.0 MiB is free" in msg
  assert "steps 4, 8 are intact" in msg and "resume from step 8" in msg
  assert "no earlier checkpoint exists" in storage.save_failure(4, tmp_path, err, 1, [])
  assert storage.mib(3 * 2**30) == "3.00 GiB"


def test_remove_partial_keeps_finished_and_kept_steps(tmp_path):
  for name in ("4", "8.orbax-checkpoint-tmp-123", "12.orbax-checkpoint-tmp-9",
               "16.orbax-checkpoint-tmp-1"):
    (tmp_path / name).mkdir()
    (tmp_path / name / "data").write_text("x")
  storage.remove_partial(tmp_path, 8, settle=0)
  assert sorted(p.name for p in tmp_path.iterdir()) == [
      "12.orbax-checkpoint-tmp-9", "16.orbax-checkpoint-tmp-1", "4"]
  storage.remove_partial(tmp_path, keep=16, settle=0)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["16.orbax-checkpoint-tmp-1", "4"]
