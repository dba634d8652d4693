"""runio/tracking.py: the Weights & Biases run fed by the metric writer (offline), the
jax.profiler trace of log.profile_steps, and the checks of the log fields."""

import glob
import json
import os

import pytest

from simbal_jax.runio import tracking
from simbal_jax.runio import writers

def _wandb_records(path):
  """{kind: [Record]} of a .wandb file (a LevelDB-style log of wandb's protobuf Records: 32 KiB
  blocks, 7-byte record headers, a 7-byte file header)."""
  import struct  # pylint: disable=g-import-not-at-top
  from wandb.proto import wandb_internal_pb2  # pylint: disable=g-import-not-at-top
  with open(path, "rb") as f:
    data = f.read()
  assert data[:4] == b":W&B", data[:7]
  out, pos, buf = {}, 7, b""
  while pos + 7 <= len(data):
    left = 32768 - pos % 32768
    if left < 7:  # a block's tail too short for a header is padding
      pos += left
      continue
    _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
    pos += 7
    if kind == 0 and length == 0:  # zero padding to the end of the block
      pos += left - 7
      continue
    buf += data[pos:pos + length]
    pos += length
    if kind in (1, 4):  # a whole record, or the last piece of one
      record = wandb_internal_pb2.Record.FromString(buf)
      out.setdefault(record.WhichOneof("record_type"), []).append(record)
      buf = b""
  return out


def _items(items):
  return {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in items}


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory):
  """A finished 10-step run with W&B offline and steps 4-5 profiled: (workdir, summary)."""
  pytest.importorskip("wandb", reason="the W&B writer needs wandb (the wandb or test extra)")
  from simbal_jax import train  # pylint: disable=g-import-not-at-top
  from conftest import one_device, tiny_config  # pylint: disable=g-import-not-at-top
  tmp = tmp_path_factory.mktemp("logged")
  workdir = str(tmp / "run")
  cfg = tiny_config("simbal", steps=10)
  cfg.log.update(tensorboard=True, every=2, hist_tokens=40, wandb_project="simbal-test",
                 wandb_mode="offline", profile_steps="3:5")
  cfg.train.num_evals = 2
  cfg.ckpt.enabled = False
  with pytest.MonkeyPatch.context() as mp:  # wandb's own settings and caches: not in $HOME
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
      mp.setenv(var, str(tmp / var.lower()))
    mp.setenv("WANDB_SILENT", "true")
    mp.delenv("WANDB_MODE", raising=False)
    mp.delenv("WANDB_API_KEY", raising=False)
    summary, _ = train.train_and_evaluate(cfg, workdir, devices=one_device())
  return workdir, summary


def test_wandb_offline_run_files(logged_run):
  workdir, summary = logged_run
  assert summary["status"] == "done"
  with open(os.path.join(workdir, "wandb", "run_id"), encoding="utf-8") as f:
    run_id = f.read().strip()
  runs = glob.glob(os.path.join(workdir, "wandb", "offline-run-*"))
  assert len(runs) == 1 and runs[0].endswith("-" + run_id), runs
  assert os.path.getsize(os.path.join(runs[0], f"run-{run_id}.wandb")) > 0


def test_wandb_gets_what_tensorboard_gets(logged_run):
  """The same scalars at the same steps with the same values, the same image and histogram
  tags, and TensorBoard's hparams as the W&B run's config."""
  workdir, _ = logged_run
  (path,) = glob.glob(os.path.join(workdir, "wandb", "offline-run-*", "run-*.wandb"))
  records = _wandb_records(path)
  rows = [_items(r.history.item) for r in records["history"]]
  media = {}  # "image-file" / "histogram" -> tags; their fields are nested keys "<tag>/..."
  for row in rows:
    for key, value in row.items():
      if key.endswith("/_type"):
        media.setdefault(value, set()).add(key[:-len("/_type")])
  nested = tuple(m + "/" for tags in media.values() for m in tags)
  scalars = {(key, row["step"]): value for row in rows for key, value in row.items()
             if key != "step" and not key.startswith("_") and not key.startswith(nested)}
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  acc = event_accumulator.EventAccumulator(
      os.path.join(workdir, "tb"), size_guidance={event_accumulator.SCALARS: 0,
                                                  event_accumulator.IMAGES: 0,
                                                  event_accumulator.HISTOGRAMS: 0})
  acc.Reload()
  tags = acc.Tags()
  tb = {(tag, e.step): e.value for tag in tags["scalars"] for e in acc.Scalars(tag)}
  assert set(scalars) == set(tb)
  for key, value in tb.items():
    assert scalars[key] == pytest.approx(value, rel=1e-6, abs=1e-6), key
  assert {"train/loss", "train/simbal", "eval/loss"} <= {k for k, _ in tb}
  assert media["image-file"] == set(tags["images"]) and "routing/expert_load" in tags["images"]
  assert media["histogram"] == set(tags["histograms"]) and tags["histograms"]
  config = {}
  for record in records.get("config", []):
    config.update(_items(record.config.update))
  for record in records["run"]:
    config.update(_items(record.run.config.update))
  from tensorboard.plugins.hparams import plugin_data_pb2  # pylint: disable=g-import-not-at-top
  acc_hp = event_accumulator.EventAccumulator(os.path.join(workdir, "tb", "hparams"))
  acc_hp.Reload()
  hparams = {k for v in acc_hp.PluginTagToContent("hparams").values()
             for k in plugin_data_pb2.HParamsPluginData.FromString(v).session_start_info.hparams}
  assert {"balance.terms", "moe.num_experts"} <= hparams <= set(config)
  summary = {}
  for record in records["summary"]:
    summary.update(_items(record.summary.update))
  assert summary["eval/loss"] == pytest.approx(tb[("eval/loss", 10)], rel=1e-6)


def test_profile_steps_write_an_xplane_trace(logged_run):
  workdir, _ = logged_run
  traces = glob.glob(os.path.join(workdir, "tb", "plugins", "profile", "*", "*.xplane.pb"))
  assert len(traces) == 1 and os.path.getsize(traces[0]) > 0, traces


def test_profiler_starts_after_start_and_stops_after_stop(tmp_path, monkeypatch):
  import jax  # pylint: disable=g-import-not-at-top
  calls = []
  monkeypatch.setattr(jax.profiler, "start_trace", lambda d: calls.append(("start", d)))
  monkeypatch.setattr(jax.profiler, "stop_trace", lambda: calls.append(("stop",)))
  w = writers.MetricWriter(str(tmp_path), tensorboard=False)
  for start, expected in ((0, [2, 4]), (3, [3, 4]), (5, [])):  # a fresh run, resumed in, after
    calls.clear()
    p = tracking.Profiler("2:4", w, start)
    at = [start] if calls else []
    for step in range(start + 1, 9):
      n = len(calls)
      p(step, None)
      at += [step] * (len(calls) - n)
    p.close()
    assert at == expected and [c[0] for c in calls] == ["start", "stop"][:len(expected)]
  assert calls == [] and tracking.Profiler("", w, 0).logdir is None
  w.close()


@pytest.mark.parametrize("spec", ["3", "5:3", "3:3", "a:b", "-1:2", "3:5:7"])
def test_bad_profile_steps_is_one_line(spec):
  with pytest.raises(ValueError, match=r"^log\.profile_steps=.*START:STOP") as e:
    tracking.profile_steps(spec)
  assert "\n" not in str(e.value)


def test_log_config_checks(monkeypatch):
  import importlib.util  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  log = ml_collections.ConfigDict(dict(profile_steps="", wandb_project="p", wandb_mode="online"))
  find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "wandb" else find_spec(name, *a))
  with pytest.raises(ValueError, match=r"^log\.wandb_project='p' needs wandb.*"
                                       r"pip install 'simbal_jax\[wandb\]'$"):
    tracking.check_log_config(log)
  log.wandb_project, log.wandb_mode = "", "sometimes"
  with pytest.raises(ValueError, match=r"^log\.wandb_mode='sometimes': one of online, offline"):
    tracking.check_log_config(log)
  log.wandb_mode = ""
  tracking.check_log_config(log)
  assert tracking.wandb_settings(log) is None


@pytest.mark.parametrize("field,value", [("profile_steps", "5:3"), ("wandb_mode", "cloudy")])
def test_a_bad_log_field_is_refused_before_anything_is_written(tmp_path, field, value):
  from simbal_jax import train  # pylint: disable=g-import-not-at-top
  from conftest import tiny_config  # pylint: disable=g-import-not-at-top
  cfg = tiny_config("simbal", steps=2)
  cfg.log[field] = value
  with pytest.raises(ValueError, match=rf"^log\.{field}="):
    train.train_and_evaluate(cfg, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run")
