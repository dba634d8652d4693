"""Never lose a run (issue 9): restore failures, damaged checkpoints, moved workdirs and config
drift, end to end on conftest.tiny_config (concurrent runs: test_rundir.py; bad config values:
test_validate.py; command-line mistakes: test_main.py)."""
import glob
import os
import shutil

import jax
import numpy as np
import pytest

from simbal_jax.runio import checkpoint
from simbal_jax.runio import rundir
from simbal_jax import train
from conftest import losses_of as losses
from conftest import nan_loss_at_step
from conftest import one_device
from conftest import state_of
from conftest import tiny_config as tiny  # d 32, 4 experts, synthetic data, ckpt every 4

def listing(d):
  """Every file under `d` with its size (what a refused resume must leave alone)."""
  return sorted((os.path.relpath(os.path.join(r, f), d), os.path.getsize(os.path.join(r, f)))
                for r, _, fs in os.walk(d) for f in fs)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  """One 8-step run with checkpoints at 4 and 8: (workdir, summary, losses)."""
  workdir = str(tmp_path_factory.mktemp("straight"))
  _, state = train.train_and_evaluate(tiny(), workdir, devices=one_device())
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4", "8"]
  return workdir, state, losses(workdir)


def copy_of(straight, tmp_path):
  dst = str(tmp_path / "run")
  shutil.copytree(straight[0], dst)
  return dst


def _refused(cfg, workdir, exc, match):
  """train_and_evaluate raises `exc` before any step and leaves the workdir as it was."""
  before = listing(workdir)
  metrics = open(os.path.join(workdir, "metrics.jsonl"), "rb").read()
  steps = []
  with pytest.raises(exc, match=match) as err:
    train.train_and_evaluate(cfg, workdir, hooks=[lambda step, _: steps.append(step)],
                             devices=one_device())
  assert not steps
  assert listing(workdir) == before  # nothing renamed, nothing deleted
  assert open(os.path.join(workdir, "metrics.jsonl"), "rb").read() == metrics  # nothing dropped
  return err.value


@pytest.mark.parametrize("field,value,match", [
    ("moe.num_experts", 8, r"moe.num_experts: 4 -> 8 \(changes state shapes"),
    ("model.d_model", 64, r"model.d_model: 32 -> 64 \(changes state shapes"),
])
def test_incompatible_config_stops_and_keeps_everything(straight, tmp_path, field, value, match):
  workdir = copy_of(straight, tmp_path)
  cfg = tiny()
  group, name = field.split(".")
  cfg[group][name] = value
  cfg.ckpt.allow_config_change = "all"  # shape fields cannot be allowed
  _refused(cfg, workdir, rundir.ConfigChange, match)


def test_permission_error_stops_and_keeps_everything(straight, tmp_path, monkeypatch):
  # Running as root makes chmod ineffective, so Orbax's read raises as it would without access.
  workdir = copy_of(straight, tmp_path)

  def denied(self, step, *args, **kwargs):
    raise PermissionError(13, "Permission denied", os.path.join(workdir, "checkpoints", str(step)))

  monkeypatch.setattr(checkpoint.ocp.CheckpointManager, "restore", denied)
  _refused(tiny(), workdir, checkpoint.CheckpointAccessError, "step 8.*Permission denied")


def _flip(path, n=64):
  """Inverts n bytes at 10, 30, 50, 70 and 90 % of the file (some ranges hold no array data)."""
  data = bytearray(open(path, "rb").read())
  for frac in (0.1, 0.3, 0.5, 0.7, 0.9):
    at = int(len(data) * frac)
    data[at:at + n] = bytes(b ^ 0xFF for b in data[at:at + n])
  open(path, "wb").write(bytes(data))


def _state_files(step_dir):
  return [f for f in glob.glob(os.path.join(step_dir, "state", "**"), recursive=True)
          if os.path.isfile(f)]


def test_bit_flip_falls_back_and_matches_the_straight_run(straight, tmp_path):
  workdir = copy_of(straight, tmp_path)
  _flip(max(_state_files(os.path.join(workdir, "checkpoints", "8")), key=os.path.getsize))
  out, state = train.train_and_evaluate(tiny(), workdir, devices=one_device())
  assert out["start_step"] == 4 and out["step"] == 8 and out["status"] == "done"
  assert glob.glob(os.path.join(workdir, "checkpoints", "8.damaged.*"))
  assert losses(workdir) == straight[2]  # steps 5..8 redone bit-exactly
  jax.tree.map(np.testing.assert_array_equal, state_of(state), state_of(straight[1]))


def test_all_damaged_stops_then_start_over_on_request(straight, tmp_path):
  workdir = copy_of(straight, tmp_path)
  for s in ("4", "8"):
    for f in _state_files(os.path.join(workdir, "checkpoints", s)):
      with open(f, "r+b") as fh:
        fh.truncate(os.path.getsize(f) // 2)
  err = _refused(tiny(), workdir, checkpoint.DamagedCheckpoints, r"(?s)step 8: .*step 4: ")
  assert [s for s, _ in err.reasons] == [8, 4]
  cfg = tiny(steps=2)
  cfg.ckpt.start_over = True  # the explicit choice: moved aside, not deleted
  out, _ = train.train_and_evaluate(cfg, workdir, devices=one_device())
  assert out["start_step"] == 0 and out["status"] == "done"
  kept = glob.glob(os.path.join(workdir, "checkpoints", "replaced.*"))
  assert len(kept) == 1 and sorted(os.listdir(kept[0])) == ["4", "8", "metrics.jsonl"]
  assert sorted(losses(kept[0])) == list(range(1, 9)) and sorted(losses(workdir)) == [1, 2]


@pytest.mark.slow
def test_moved_workdir_resumes_exactly(tmp_path):
  docs = tmp_path / "docs"
  docs.mkdir()
  for i in range(40):
    (docs / f"doc{i}.txt").write_text(f"document {i}: " + "lorem ipsum dolor " * (10 + i))
  cfg = tiny()
  cfg.data.update(source="text_files", globs=str(docs / "*.txt"), tokenizer="bytes",
                  eval_fraction=0.2)
  first = str(tmp_path / "first")
  _, straight = train.train_and_evaluate(cfg, first)
  moved = str(tmp_path / "elsewhere" / "moved")
  shutil.copytree(first, str(tmp_path / "copy"))
  shutil.rmtree(str(tmp_path / "copy" / "checkpoints" / "8"))  # as if stopped after step 4
  os.makedirs(os.path.dirname(moved))
  shutil.move(str(tmp_path / "copy"), moved)
  out, state = train.train_and_evaluate(cfg, moved)
  assert out["start_step"] == 4 and out["status"] == "done"
  assert losses(moved) == losses(first)
  jax.tree.map(np.testing.assert_array_equal, state_of(state), state_of(straight))
  assert len(os.listdir(os.path.join(moved, "data", "tokens"))) == 1  # the cache was reused


def test_config_drift_is_refused_until_allowed(straight, tmp_path, caplog):
  workdir = copy_of(straight, tmp_path)
  for change, match in [
      (lambda c: c.balance.update(terms="simbal:0.1"),
       "balance.terms: 'lbl:0.01' -> 'simbal:0.1'"),
      (lambda c: c.opt.update(peak_lr=1e-3), "opt.peak_lr: 0.003 -> 0.001"),
      (lambda c: c.moe.update(top_k=1), "moe.top_k: 2 -> 1"),
      (lambda c: c.train.update(num_steps=10), "train.num_steps: 8 -> 10"),
  ]:
    cfg = tiny()
    change(cfg)
    _refused(cfg, workdir, rundir.ConfigChange, match + ".*\n.*allow_config_change=")
  cfg = tiny(steps=10)
  cfg.opt.peak_lr = 1e-3
  cfg.ckpt.allow_config_change = "opt.peak_lr, train.num_steps"
  out, _ = train.train_and_evaluate(cfg, workdir, devices=one_device())
  assert out["start_step"] == 8 and out["step"] == 10 and out["status"] == "done"
  assert "opt.peak_lr: 0.003 -> 0.001" in caplog.text
  assert sorted(losses(workdir)) == list(range(1, 11))


def test_non_finite_loss_after_resume_names_the_checkpoint(straight, tmp_path, monkeypatch):
  workdir = copy_of(straight, tmp_path)
  cfg = tiny(steps=10)
  nan_loss_at_step(monkeypatch, 9)
  cfg.ckpt.allow_config_change = "train.num_steps"
  with pytest.raises(train.NonFiniteLossError, match="at step 9") as err:
    train.train_and_evaluate(cfg, workdir, devices=one_device())
  msg = str(err.value)
  assert "started from checkpoint step 8 in " in msg and "good" not in msg
