"""The faults a run survives (issue 23), end to end on conftest.tiny_config: incomplete
checkpoints, missing digests, divergence, a full disk, unreadable directories, refused starts,
finished runs started again and bad inputs. Each fault is made here, by the test."""
import errno
import glob
import json
import os
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from simbal_jax.runio import checkpoint
from simbal_jax.runio import rundir
from simbal_jax import train
from simbal_jax.runio import writers
from test_reliability import _flip
from test_reliability import _state_files
from conftest import losses_of as losses
from conftest import one_device
from conftest import state_of
from conftest import tree
from conftest import tiny_config as tiny  # d 32, 4 experts, synthetic data, ckpt every 4

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_tb(steps=8):
  cfg = tiny(steps=steps)
  cfg.log.tensorboard = True  # the events files are part of what must not change
  cfg.log.hist_tokens = 0
  return cfg


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  """One 8-step run with checkpoints at 4 and 8 and TensorBoard events: (workdir, state,
  losses)."""
  workdir = str(tmp_path_factory.mktemp("straight"))
  _, state = train.train_and_evaluate(tiny_tb(), workdir, devices=one_device())
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4", "8"]
  assert glob.glob(os.path.join(workdir, "tb", "events.*"))
  return workdir, state, losses(workdir)


def copy_of(straight, tmp_path):
  dst = str(tmp_path / "run")
  shutil.copytree(straight[0], dst)
  return dst


def resumes_from_4_identically(straight, workdir):
  """The run falls back to step 4, ends identical to the straight run; step 8 is set aside."""
  out, state = train.train_and_evaluate(tiny_tb(), workdir, devices=one_device())
  assert out["start_step"] == 4 and out["step"] == 8 and out["status"] == "done"
  assert glob.glob(os.path.join(workdir, "checkpoints", "8.damaged.*"))
  assert losses(workdir) == straight[2]
  jax.tree.map(np.testing.assert_array_equal, state_of(state), state_of(straight[1]))


@pytest.mark.parametrize("remove", ["everything", "state"])
def test_incomplete_step_falls_back(straight, tmp_path, caplog, remove):
  workdir = copy_of(straight, tmp_path)
  step_dir = os.path.join(workdir, "checkpoints", "8")
  for name in os.listdir(step_dir) if remove == "everything" else [remove]:
    path = os.path.join(step_dir, name)
    shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
  resumes_from_4_identically(straight, workdir)
  want = "the step directory is empty" if remove == "everything" else "no state item"
  assert f"checkpoint step 8 in {workdir}/checkpoints is damaged ({want})" in caplog.text


def test_missing_digests_are_not_trusted(straight, tmp_path, caplog):
  workdir = copy_of(straight, tmp_path)
  step_dir = os.path.join(workdir, "checkpoints", "8")
  shutil.rmtree(os.path.join(step_dir, "integrity"))
  _flip(max(_state_files(step_dir), key=os.path.getsize))
  resumes_from_4_identically(straight, workdir)
  assert "no integrity item" in caplog.text and "restored unverified" not in caplog.text


def test_divergence_leaves_no_non_finite_checkpoint(tmp_path):
  cfg = tiny(steps=12)
  cfg.opt.peak_lr, cfg.ckpt.every = 1e6, 2
  with pytest.raises((train.NonFiniteLossError, checkpoint.NonFiniteStateError)):
    train.train_and_evaluate(cfg, str(tmp_path), devices=one_device())
  steps = sorted(int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit())
  assert steps  # the finite ones before the divergence are kept ...
  ocp = checkpoint.ocp
  manager = ocp.CheckpointManager(tmp_path / "checkpoints",
                                  options=ocp.CheckpointManagerOptions(read_only=True))
  for s in steps:  # ... and every one holds finite arrays only
    got = manager.restore(s, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(item=None, partial_restore=True)))
    leaves = [np.asarray(x) for x in jax.tree.leaves(got["state"])]
    assert len(leaves) > 10
    assert all(np.isfinite(x).all() for x in leaves if x.dtype.kind == "f"), s
  manager.close()


@pytest.mark.slow
def test_full_disk_is_one_line_and_a_later_run_resumes(straight, tmp_path, monkeypatch, capfd):
  """The writes of step 8's checkpoint fail with ENOSPC in Orbax's save thread (its JSON items
  go through epath): the run ends in one CheckpointSaveError line; step 4 is intact, nothing of
  step 8 is left, and a later run resumes identical to the straight one."""
  workdir = str(tmp_path / "run")
  path_cls = type(checkpoint.paths.resolve(workdir))
  real_write = path_cls.write_text

  def full_disk(self, *args, **kwargs):
    if f"{os.sep}checkpoints{os.sep}8." in os.fspath(self):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(self))
    return real_write(self, *args, **kwargs)

  monkeypatch.setattr(path_cls, "write_text", full_disk)
  with pytest.raises(checkpoint.CheckpointSaveError) as err:
    train.train_and_evaluate(tiny_tb(), workdir, devices=one_device())
  msg = str(err.value)
  assert "\n" not in msg
  assert msg.startswith(f"saving checkpoint step 8 in {workdir}/checkpoints failed: OSError: "
                        "[Errno 28] No space left on device")
  assert "a checkpoint needs about" in msg and "step 4 is intact" in msg
  assert "Traceback" not in capfd.readouterr().err  # Orbax's thread tracebacks: not shown
  assert [d for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit()] == ["4"]
  monkeypatch.setattr(path_cls, "write_text", real_write)
  out, state = train.train_and_evaluate(tiny_tb(), workdir, devices=one_device())
  assert out["start_step"] == 4 and out["step"] == 8
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4", "8"]  # no leftovers
  assert losses(workdir) == straight[2]
  jax.tree.map(np.testing.assert_array_equal, state_of(state), state_of(straight[1]))


_RESTORE = """
import os, sys
import jax, jax.numpy as jnp
from simbal_jax.runio import checkpoint
ck = checkpoint.Checkpointer(sys.argv[1], every=1)
try:
  ck.restore(jax.eval_shape(lambda: {"w": jnp.zeros((64, 64)), "step": jnp.int32(0)}))
  print("restored")
except checkpoint.CheckpointError as e:
  print(type(e).__name__, e)
"""


def test_unreadable_state_directory_stops_and_renames_nothing(tmp_path):
  """A real EACCES: as root, the reading process runs without CAP_DAC_OVERRIDE (setpriv)."""
  prefix = []
  if os.geteuid() == 0:
    setpriv = shutil.which("setpriv")
    if setpriv is None:
      pytest.skip("running as root without setpriv: chmod 000 cannot deny root a read")
    caps = "-dac_override,-dac_read_search"
    prefix = [setpriv, f"--bounding-set={caps}", f"--inh-caps={caps}"]
  ck = checkpoint.Checkpointer(tmp_path / "ck", every=1, async_save=False)
  for s in (1, 2):
    ck.save(s, {"w": jax.random.normal(jax.random.key(s), (64, 64)), "step": jax.numpy.int32(s)})
  ck.close()
  state_dir = tmp_path / "ck" / "2" / "state"
  os.chmod(state_dir, 0)
  try:
    got = subprocess.run(prefix + [sys.executable, "-c", _RESTORE, str(tmp_path / "ck")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"))
  finally:
    os.chmod(state_dir, 0o755)
  out = got.stdout.strip()
  assert out.startswith("CheckpointAccessError cannot read checkpoint step 2"), got
  assert f"PermissionError: [Errno 13] Permission denied: '{state_dir}'" in out
  assert sorted(os.listdir(tmp_path / "ck")) == ["1", "2"]  # nothing renamed


def test_refused_start_leaves_the_workdir_byte_identical(straight, tmp_path):
  workdir = copy_of(straight, tmp_path)
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True, check=True)
  with open(os.path.join(workdir, rundir.LOCK_NAME), "w", encoding="utf-8") as f:
    json.dump({"host": socket.gethostname(), "pid": int(dead.stdout), "start": None,
               "since": 0}, f)  # a lock left by a dead run: taken over only by a real start
  before = tree(workdir)
  assert any(k.startswith("tb" + os.sep) for k in before)
  cfg = tiny_tb()
  cfg.moe.num_experts = 8  # another shape: refused
  with pytest.raises(rundir.ConfigChange, match="moe.num_experts: 4 -> 8"):
    train.train_and_evaluate(cfg, workdir, devices=one_device())
  assert tree(workdir) == before


def test_finished_run_started_again_changes_nothing(straight, tmp_path):
  workdir = copy_of(straight, tmp_path)
  before = tree(workdir)
  final = [r for r in writers.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
           if "eval/loss" in r]
  steps = []
  out, state = train.train_and_evaluate(tiny_tb(), workdir, hooks=[lambda s, _: steps.append(s)],
                                        devices=one_device())
  assert out["complete"] and out["status"] == "done" and out["step"] == 8 and not steps
  assert len(final) == 1 and out["eval/loss"] == final[0]["eval/loss"]
  assert tree(workdir) == before  # no new record, no events, no config.json rewrite
  jax.tree.map(np.testing.assert_array_equal, state_of(state), state_of(straight[1]))


@pytest.mark.parametrize("content,problem", [
    (b"\x00\x01binary\xff" * 50, "contains NUL bytes"),
    ("caf\u00e9 ".encode("latin-1") * 50, "is not valid UTF-8"),
])
def test_a_lone_bad_text_file_is_named(tmp_path, content, problem):
  docs = tmp_path / "docs"
  docs.mkdir()
  (docs / "only.txt").write_bytes(content)
  cfg = tiny()
  cfg.data.update(source="text_files", globs=str(docs / "*.txt"))
  with pytest.raises(ValueError, match=f"text file {docs / 'only.txt'} {problem}"):
    train.train_and_evaluate(cfg, str(tmp_path / "run"))
