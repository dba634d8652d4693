"""A `gs://` workdir stays a cloud path end to end: no local `gs:` folder, ever.

The fake bucket (fixture `fake_gcs`): `etils.epath.testing.mock_epath` routes every epath call
on `gs://<bucket>/<key>` to `<tmp>/store/<bucket>/<key>` and refuses appends there, as an
object store does. Orbax writes arrays through TensorStore's own gcs driver and asks
google-cloud-storage about the bucket, not through epath: those two hooks (Orbax internals,
`gcs_utils.get_kvstore_for_gcs` and `is_hierarchical_namespace_enabled`) point at the same
directory. The tests run in an empty working directory; code that took the URI for a local
path would create `gs:` there (`os.makedirs("gs://b/x")` makes `./gs:/b/x`).
"""
import json
import os
import signal
import tempfile
import time

from etils import epath
from etils.epath import testing as epath_testing
import jax
import numpy as np
from orbax.checkpoint._src.path import gcs_utils
import pytest

from simbal_jax import env as env_lib
from simbal_jax.runio import paths
from simbal_jax import plots
from simbal_jax.runio import rundir
from simbal_jax import telemetry
from simbal_jax import train
from simbal_jax.runio import writers
from simbal_jax.data import pipeline
from conftest import tiny_config

WORKDIR = "gs://bucket/run"


@pytest.fixture
def fake_gcs(tmp_path, monkeypatch):
  """An in-process stand-in for GCS; yields the local directory holding the buckets."""
  store = tmp_path / "store"
  store.mkdir()
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  monkeypatch.setenv("EPATH_USE_TF", "false")  # gs:// -> the backend table mocked below
  root = os.fspath(store) + "/"

  def local(p):
    p = os.fspath(p)
    return root + p[len("gs://"):] if p.startswith("gs://") else p

  def uri(p):
    p = os.fspath(p)
    return "gs://" + p[len(root):] if p.startswith(root) else p

  def object_parent(p):  # objects need no directories: a write makes its "folders"
    if os.fspath(p).startswith("gs://"):
      os.makedirs(os.path.dirname(local(p)), exist_ok=True)

  def open_(fn, path, mode):
    if os.fspath(path).startswith("gs://") and "a" in mode:
      raise NotImplementedError(f"an object store cannot append: {path}")
    if "w" in mode:
      object_parent(path)
    return fn(local(path), mode)

  def one(fn, path, **kw):
    return fn(local(path), **kw)

  def two(fn, path, dst, **kw):
    object_parent(dst)
    return fn(local(path), local(dst), **kw)

  def glob(fn, pattern):
    return [uri(p) for p in fn(local(pattern))]

  def walk(fn, top, **kw):
    for top_, dirs, files in fn(local(top), **kw):
      yield uri(top_), dirs, files  # the same `dirs` list: pruning in place still works

  monkeypatch.setattr(gcs_utils, "get_kvstore_for_gcs",
                      lambda p: {"driver": "file", "path": local(p)})
  monkeypatch.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda p: False)
  with epath_testing.mock_epath(
      open=open_, exists=one, isdir=one, listdir=one, makedirs=one, mkdir=one, remove=one,
      rmtree=one, stat=one, glob=glob, walk=walk, copy=two, rename=two, replace=two):
    yield store
  assert_no_local_gs(tmp_path)


def assert_no_local_gs(*roots):
  """No folder named `gs:` in the roots, the working directory or the temp directory."""
  for root in (*roots, os.getcwd(), tempfile.gettempdir()):
    assert not os.path.exists(os.path.join(root, "gs:")), root
  for root in roots:
    for dirpath, dirnames, _ in os.walk(root):
      assert "gs:" not in dirnames, dirpath


def test_paths_keep_uris_and_make_local_paths_absolute(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert os.fspath(paths.resolve(WORKDIR)) == WORKDIR
  assert os.fspath(paths.resolve(WORKDIR) / "checkpoints") == WORKDIR + "/checkpoints"
  assert paths.absolute("runs/x") == os.path.join(tmp_path, "runs", "x")
  assert not paths.is_local(WORKDIR) and paths.is_local("runs/gs_x")
  assert paths.relpath("gs://b/c/d/e.txt", "gs://b/c") == "d/e.txt"
  assert paths.commonpath(["gs://b/c/d", "gs://b/c/e"]) == "gs://b/c"
  assert paths.dirname("gs://b/c/d") == "gs://b/c"
  assert_no_local_gs(tmp_path)


def test_fake_bucket_refuses_appends(fake_gcs):
  (epath.Path(WORKDIR) / "x").write_text("a")
  assert (fake_gcs / "bucket" / "run" / "x").read_text() == "a"
  with pytest.raises(NotImplementedError, match="append"):
    epath.Path(WORKDIR, "x").open("a")


def test_metric_writer_rewrites_the_objects_and_drops_after(fake_gcs):
  load = "expert_load.jsonl"
  w = writers.MetricWriter(WORKDIR, tensorboard=True, sync_every=3600, record_files=(load,))
  for s in range(1, 6):
    w.write(s, {"train/loss": 1.0 / s})
    w.write_record(load, {"step": s, "load": [0.5, 0.5]})
  w.hparams({"lr": 0.1}, {"eval/loss": 1.0})  # events in tb/ and in tb/hparams/
  stage = w._stage  # pylint: disable=protected-access
  assert stage is not None and paths.is_local(stage)
  run = fake_gcs / "bucket" / "run"
  assert not (run / "metrics.jsonl").exists()  # not due yet
  w.flush()  # what the trainer does at a checkpoint
  assert [r["step"] for r in writers.read_jsonl(f"{WORKDIR}/metrics.jsonl")] == [1, 2, 3, 4, 5]
  assert len(writers.read_jsonl(f"{WORKDIR}/{load}")) == 5
  w.close()
  assert not os.path.exists(stage)  # staging removed once uploaded
  events = [os.path.join(d, f) for d, _, fs in os.walk(run / "tb") for f in fs]
  assert any("hparams" in e for e in events) and len(events) >= 2
  assert all(os.path.basename(e).startswith("events.out.tfevents") for e in events)
  assert all(os.path.getsize(e) > 0 for e in events)

  # A resumed run: the objects are read back, records after the checkpoint dropped, appended.
  w = writers.MetricWriter(WORKDIR, tensorboard=False, sync_every=3600, record_files=(load,))
  w.drop_after(3)
  assert [r["step"] for r in writers.read_jsonl(f"{WORKDIR}/metrics.jsonl")] == [1, 2, 3]
  assert [r["step"] for r in writers.read_jsonl(f"{WORKDIR}/{load}")] == [1, 2, 3]
  w.write(4, {"train/loss": 0.2})
  w.close()
  recs = writers.read_jsonl(f"{WORKDIR}/metrics.jsonl")
  assert [r["step"] for r in recs] == [1, 2, 3, 4] and recs[-1]["train/loss"] == 0.2

  # `write` uploads by itself once sync_every has passed.
  w = writers.MetricWriter(WORKDIR, tensorboard=False, sync_every=0)
  w.write(5, {"train/loss": 0.1})
  assert len(writers.read_jsonl(f"{WORKDIR}/metrics.jsonl")) == 5
  w.close()


def test_lock_on_a_cloud_workdir_is_a_record(fake_gcs, monkeypatch):
  with rundir.WorkdirLock(WORKDIR) as lock:
    assert (fake_gcs / "bucket" / "run" / rundir.LOCK_NAME).exists()
    assert rundir.read_lock(WORKDIR)["pid"] == os.getpid() and "beat" in lock.record
    with pytest.raises(rundir.WorkdirLockedError, match="this process"):
      rundir.WorkdirLock.check(WORKDIR)
    with pytest.raises(rundir.WorkdirLockedError, match="this process"):
      rundir.WorkdirLock(WORKDIR)
  assert not rundir.read_lock(WORKDIR)  # released: the record is gone
  lock_path = epath.Path(WORKDIR) / rundir.LOCK_NAME
  other = {"host": "elsewhere", "pid": 1, "start": None, "since": 0.0}
  lock_path.write_text(json.dumps(dict(other, beat=time.time())))
  with pytest.raises(rundir.WorkdirLockedError, match="host elsewhere.*heartbeat"):
    rundir.WorkdirLock.check(WORKDIR)
  lock_path.write_text(json.dumps(dict(other, beat=0.0)))  # stale: taken over
  rundir.WorkdirLock(WORKDIR).release()


def test_data_cache_of_a_cloud_workdir_is_local_and_logged(fake_gcs, tmp_path, monkeypatch,
                                                           caplog):
  monkeypatch.setenv("HOME", os.fspath(tmp_path / "home"))
  corpus = epath.Path("gs://bucket/corpus")
  corpus.mkdir(parents=True)
  docs = [{"text": f"document {i} " + "abc " * (40 + i)} for i in range(64)]
  (corpus / "part.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
  cfg = {"source": "jsonl", "globs": "gs://bucket/corpus/*.jsonl", "text_field": "text",
         "tokenizer": "bytes", "eval_fraction": 0.25}
  with caplog.at_level("INFO"):
    ds = pipeline.make_datasets(cfg, seq_len=32, batch_size=4, workdir=WORKDIR, seed=0)
  cache = os.path.join(tmp_path, "home", ".cache", "simbal_jax", "data")
  assert ds.info["cache_dir"] == cache and os.path.isdir(os.path.join(cache, "tokens"))
  assert "not on a local disk" in caplog.text
  assert "gs://bucket/corpus" in ds.info["corpus"]
  assert next(ds.train_iter())["inputs"].shape == (4, 32)


@pytest.mark.slow
def test_training_on_a_gs_workdir_writes_the_bucket_and_resumes(fake_gcs):
  cfg = tiny_config("lbl", steps=4)
  cfg.ckpt.every, cfg.log.tensorboard, cfg.train.pes_tokens = 2, True, 0
  cfg.log.hist_tokens = 0  # no logit-histogram compile: events are still written
  stop_at = 2

  def stop(step, state):
    del state
    if step == stop_at:  # preempted: checkpoint at this step, then a resumed run
      os.kill(os.getpid(), signal.SIGTERM)

  one = jax.devices()[:1]  # faster compiles; sharding is not what is tested here
  first, _ = train.train_and_evaluate(cfg, WORKDIR, hooks=[stop], devices=one)
  assert first["status"] == "preempted" and first["step"] == stop_at
  run = fake_gcs / "bucket" / "run"
  assert (run / "checkpoints" / str(stop_at)).is_dir()
  assert (run / "config.json").exists() and not (run / rundir.LOCK_NAME).exists()

  out, state = train.train_and_evaluate(cfg, WORKDIR, devices=one)
  assert out["start_step"] == stop_at and out["step"] == 4 and out["status"] == "done"
  assert WORKDIR in out["resumed_from"]
  assert sorted(os.listdir(run / "checkpoints")) == ["2", "4"]
  recs = writers.read_jsonl(f"{WORKDIR}/metrics.jsonl")
  assert [r["step"] for r in recs if "train/loss" in r] == [1, 2, 3, 4]
  assert recs[-1]["step"] == 4 and "eval/loss" in recs[-1]
  assert json.loads((run / "config.json").read_text())["train"]["num_steps"] == 4
  assert json.loads((run / "eval_seq_loss.json").read_text())["step"] == 4
  assert any((run / "tb").iterdir())
  steps, _, _, _ = telemetry.read_expert_load(WORKDIR)
  assert list(steps) == [1, 2, 3, 4]  # expert_load.jsonl in the bucket, trimmed and continued
  assert plots.read_eval_curve(WORKDIR).shape == (1, 2)  # the final evaluation

  env, restored = env_lib.restore_run(WORKDIR, devices=one)
  assert env.cfg.train.num_steps == 4
  np.testing.assert_array_equal(np.asarray(restored.step), np.asarray(state.step))


def test_convergence_aggregates_runs_in_the_bucket(fake_gcs):
  from simbal_jax.experiments import convergence  # pylint: disable=g-import-not-at-top
  work = "gs://bucket/conv"
  for method, final in (("lbl", 2.0), ("simbal", 1.9)):
    d = epath.Path(convergence.run_dir(work, method, 0))
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(
        {"train": {"num_steps": 10, "global_batch_size": 1, "seq_len": 100},
         "opt": {"peak_lr": 1e-3}}))
    (d / "metrics.jsonl").write_text("".join(json.dumps(
        {"step": s, "eval/loss": loss, "eval/loss_se": 0.01, "eval/maxvio": 0.5,
         "eval/layer_0/pes": 0.1}) + "\n" for s, loss in ((5, final + 1), (10, final))))
  table, md = convergence.write_outputs(work, "lbl")
  assert sorted(r["dir"] for r in table["runs"]) == [f"{work}/lbl/seed0", f"{work}/simbal/seed0"]
  conv = fake_gcs / "bucket" / "conv"
  assert (conv / "table.md").read_text().strip() == md.strip()
  assert json.loads((conv / "table.json").read_text())["reference"] == "lbl"
  assert (conv / "loss_vs_tokens.png").stat().st_size > 0
