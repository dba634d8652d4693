"""Routing telemetry: per-layer metrics, expert_load.jsonl, tokens/s and MFU, and TensorBoard
images, histograms and hparams read back with TensorBoard's own event reader."""
import glob
import json
import os

import jax
import ml_collections
import numpy as np
import pytest

from simbal_jax import model as model_lib
from simbal_jax import telemetry
from simbal_jax import train
from simbal_jax.runio import writers
from conftest import one_device, tiny_config

def _events(logdir):
  """{tag: [(step, event value)]} of scalars, images, histograms from TensorBoard's reader."""
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  acc = event_accumulator.EventAccumulator(
      logdir, size_guidance={event_accumulator.IMAGES: 0, event_accumulator.HISTOGRAMS: 0,
                             event_accumulator.SCALARS: 0})
  acc.Reload()
  return acc


def _model_config(workdir):
  """The run's ModelConfig from the config.json it wrote (vocabulary resolved)."""
  with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
    return model_lib.ModelConfig.from_config(ml_collections.ConfigDict(json.load(f)))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("telemetry"))
  cfg = tiny_config("simbal", steps=6, analysis=True)
  cfg.model.num_layers = 3
  cfg.model.moe_every = 1
  cfg.log.every = 2
  cfg.log.tensorboard = True
  cfg.log.peak_tflops = 0.5  # a made-up peak: MFU is reported on CPU too
  cfg.log.hist_tokens = 40
  cfg.train.num_evals = 2
  summary, state = train.train_and_evaluate(cfg, workdir, devices=one_device())
  return workdir, cfg, summary, state


def test_per_layer_train_metrics_match_the_logged_load(run):
  workdir, cfg, _, _ = run
  recs = [r for r in writers.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
          if "train/loss" in r]
  assert [r["step"] for r in recs] == [2, 4, 6]
  steps, tokens, layers, load = telemetry.read_expert_load(workdir, "train")
  assert list(steps) == [2, 4, 6] and layers == [0, 1, 2]
  assert load.shape == (3, 3, 4)
  np.testing.assert_allclose(load.sum(-1), 1.0, atol=1e-6)
  tokens_per_step = cfg.train.global_batch_size * cfg.train.seq_len
  assert list(tokens) == [s * tokens_per_step for s in steps]
  for rec, l in zip(recs, load):
    assert rec["train/tokens"] == rec["step"] * tokens_per_step
    for j, i in enumerate(layers):
      e = l[j]
      # Independent float64 formulas on the logged load.
      assert rec[f"train/layer_{i}/maxvio"] == pytest.approx(e.max() / e.mean() - 1, abs=1e-5)
      assert rec[f"train/layer_{i}/load_cv"] == pytest.approx(e.std() / e.mean(), abs=1e-5)
      assert 0.0 <= rec[f"train/layer_{i}/entropy"] <= np.log(4) + 1e-5
    assert rec["train/maxvio"] == pytest.approx(
        np.mean([rec[f"train/layer_{i}/maxvio"] for i in layers]), abs=1e-5)


def test_expert_norms_logged_per_expert_and_summarised(run):
  """log.expert_norms: the per-expert weight and gradient norms of every log step in
  expert_load.jsonl (the last weights' equal the final state's, NumPy float64), their
  min/max ratios per layer in metrics.jsonl, in the summary and as TensorBoard images."""
  workdir, _, summary, state = run
  steps, _, layers, wnorm = telemetry.read_expert_load(workdir, "train", "wnorm")
  _, _, _, gnorm = telemetry.read_expert_load(workdir, "train", "gnorm")
  assert list(steps) == [2, 4, 6] and wnorm.shape == gnorm.shape == (3, 3, 4)
  ffn = [jax.device_get(state.params[f"layers_{i}"]["ffn"]) for i in layers]
  want = np.stack([np.sqrt(sum((np.asarray(f[n], np.float64) ** 2).reshape(4, -1).sum(-1)
                               for n in ("wi_gate", "wi_up", "wo"))) for f in ffn])
  np.testing.assert_allclose(wnorm[-1], want, rtol=1e-5)
  recs = {r["step"]: r for r in writers.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
          if "train/loss" in r}
  for s, w, g in zip(steps, wnorm, gnorm):
    for name, v in (("wnorm", w), ("gnorm", g)):
      ratio = v.min(-1) / v.max(-1)
      for j, i in enumerate(layers):
        assert recs[s][f"train/layer_{i}/expert_{name}_ratio"] == pytest.approx(ratio[j])
      assert recs[s][f"train/expert_{name}_ratio"] == pytest.approx(ratio.mean())
      assert recs[s][f"train/expert_{name}_ratio_min"] == pytest.approx(ratio.min())
  assert summary["train/expert_gnorm_ratio_min"] == recs[6]["train/expert_gnorm_ratio_min"]
  assert "train/expert_gnorm_ratio_min" in telemetry.summary_table(summary)
  tags = _events(os.path.join(workdir, "tb")).Tags()["images"]
  assert {"routing/expert_wnorm", "routing/expert_gnorm"} <= set(tags)


def test_expert_norm_metrics_hand_case():
  norms = {"train/layer_expert_wnorm": np.array([[1.0, 2.0, 4.0], [3.0, 3.0, 3.0]]),
           "train/layer_expert_gnorm": np.array([[0.0, 1.0, 2.0], [0.0, 0.0, 0.0]])}
  out = telemetry.expert_norm_metrics(norms, [1, 3])
  assert out == {"train/layer_1/expert_wnorm_ratio": 0.25, "train/layer_3/expert_wnorm_ratio": 1.0,
                 "train/expert_wnorm_ratio": 0.625, "train/expert_wnorm_ratio_min": 0.25,
                 "train/layer_1/expert_gnorm_ratio": 0.0, "train/layer_3/expert_gnorm_ratio": 0.0,
                 "train/expert_gnorm_ratio": 0.0, "train/expert_gnorm_ratio_min": 0.0}
  assert telemetry.expert_norm_metrics({}, [0]) == {}
  img = telemetry.norm_image(norms["train/layer_expert_wnorm"])
  assert img.dtype == np.uint8 and img.shape[:2] == (2 * 86, 3 * 86)  # 86 px a block


def test_tokens_per_second_and_mfu(run):
  workdir, cfg, _, _ = run
  recs = [r for r in writers.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
          if "train/loss" in r]
  timed = [r for r in recs if "train/tokens_per_second" in r]
  assert len(timed) >= 2  # every record after the compiling step
  fpt = model_lib.flops_per_token(_model_config(workdir), cfg.train.seq_len)
  for r in timed:
    assert r["train/tokens_per_second"] > 0
    peak = 0.5e12 * len(one_device())  # the peak of the run's mesh: per device x devices
    assert r["train/mfu"] == pytest.approx(r["train/tokens_per_second"] * fpt / peak, rel=1e-6)


def test_the_mfu_peak_counts_every_device_of_the_mesh(tmp_path):
  """MFU's peak is the per-device peak times the devices of the run's mesh (the run above has
  one device; here 1 and the session's 8)."""
  from simbal_jax import env as env_lib  # pylint: disable=g-import-not-at-top
  cfg = tiny_config("lbl")
  cfg.model.vocab_size, cfg.log.peak_tflops = 64, 0.5
  for devices in (jax.devices()[:1], jax.devices()):
    env = env_lib.build(cfg, str(tmp_path), devices=devices, data=False)
    logger = telemetry.StepLogger(env, writer=None, progress=None, timer=None)
    assert logger.throughput.peak_flops == pytest.approx(0.5e12 * len(devices))
  assert len(jax.devices()) == 8


def test_throughput_measures_the_interval_without_pauses():
  clock = iter([100.0, 103.0, 110.0])
  tp = telemetry.Throughput(tokens_per_step=1000, flops_per_token=10.0, peak_flops=1e6,
                            clock=lambda: next(clock))
  tp.start(1, paused=0.0)  # t = 100
  out = tp.mark(4, paused=1.0)  # 3 steps in 3 s, 1 s of it paused
  assert out["train/tokens_per_second"] == pytest.approx(3000 / 2)
  assert out["train/mfu"] == pytest.approx(1500 * 10 / 1e6)
  out = tp.mark(6, paused=1.0)  # 2 steps in 7 s
  assert out["train/tokens_per_second"] == pytest.approx(2000 / 7)
  no_peak = telemetry.Throughput(1, 1.0, None, clock=iter([0.0, 1.0]).__next__)
  no_peak.start(0)
  assert no_peak.mark(1, 0.0) == {"train/tokens_per_second": 1.0}  # no MFU without a peak


def test_eval_load_lines_equal_the_summary(run):
  workdir, _, summary, _ = run
  steps, _, _, load = telemetry.read_expert_load(workdir, "eval")
  assert steps[-1] == 6 and len(steps) >= 2
  np.testing.assert_allclose(load[-1], summary["expert_load"], rtol=1e-12)


def test_tensorboard_images_histograms_and_hparams(run):
  workdir, cfg, _, state = run
  acc = _events(os.path.join(workdir, "tb"))
  tags = acc.Tags()
  assert "routing/expert_load" in tags["images"]
  img = acc.Images("routing/expert_load")[-1]
  assert img.step == 6 and img.height >= 3 and img.width >= 4
  for i in range(3):
    assert f"routing/gram/layer_{i}" in tags["images"]
    h = acc.Histograms(f"routing/logits/layer_{i}")[-1]
    assert h.step == 6 and h.histogram_value.num == 40 * 4  # 40 tokens x 4 experts
  assert "train/layer_2/entropy" in tags["scalars"] and "train/mfu" in tags["scalars"]
  hp = glob.glob(os.path.join(workdir, "tb", "hparams", "events.*"))
  assert hp  # HParams plugin data: a session start with the config's fields
  from tensorboard.plugins.hparams import plugin_data_pb2  # pylint: disable=g-import-not-at-top
  acc_hp = _events(os.path.join(workdir, "tb", "hparams"))
  content = acc_hp.PluginTagToContent("hparams")
  start = [plugin_data_pb2.HParamsPluginData.FromString(v) for v in content.values()]
  fields = {k for p in start if p.HasField("session_start_info")
            for k in p.session_start_info.hparams}
  assert {"balance.terms", "moe.num_experts", "opt.peak_lr"} <= fields

  # The Gram image's pixels are the colours of RᵀR: the diagonal of an image block equals the
  # colour of a float64 Gram computed here.
  kernels = np.asarray(model_lib.router_kernels(state.params, _model_config(workdir)),
                       np.float64)
  expected = telemetry.gram_image(kernels[0])
  import io  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  got = np.asarray(Image.open(io.BytesIO(acc.Images("routing/gram/layer_0")[-1]
                                         .encoded_image_string)).convert("RGB"))
  np.testing.assert_array_equal(got, expected)


def test_heatmap_image_is_a_blockwise_colour_map():
  import matplotlib  # pylint: disable=g-import-not-at-top
  v = np.array([[0.0, 0.5], [1.0, 2.0]])
  img = telemetry.heatmap_image(v, 0.0, 1.0, min_px=4)
  assert img.shape == (4, 4, 3) and img.dtype == np.uint8
  cmap = matplotlib.colormaps["viridis"]
  for (r, c), x in np.ndenumerate(v):
    want = np.round(np.array(cmap(min(x, 1.0))[:3]) * 255)
    np.testing.assert_array_equal(img[2 * r:2 * r + 2, 2 * c:2 * c + 2], np.broadcast_to(
        want, (2, 2, 3)))


def test_resume_trims_the_load_file(tmp_path):
  w = writers.MetricWriter(str(tmp_path), tensorboard=False, record_files=(telemetry.LOAD_FILE,))
  for s in (1, 2, 3):
    w.write_record(telemetry.LOAD_FILE, telemetry.load_record(s, 10 * s, "train", [0],
                                                               [[0.5, 0.5]]))
  w.close()
  w = writers.MetricWriter(str(tmp_path), tensorboard=False, record_files=(telemetry.LOAD_FILE,))
  w.drop_after(2)
  w.write_record(telemetry.LOAD_FILE, telemetry.load_record(3, 30, "train", [0], [[1.0, 0.0]]))
  w.close()
  steps, _, _, load = telemetry.read_expert_load(str(tmp_path))
  assert list(steps) == [1, 2, 3] and load[-1].tolist() == [[1.0, 0.0]]
  with pytest.raises(ValueError, match="record_files"):
    writers.MetricWriter(str(tmp_path), tensorboard=False).write_record("x.jsonl", {"step": 0})
