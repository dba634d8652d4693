"""Smoke tests of experiments/benchmark.py: every mode runs on tiny shapes and reports positive
timings with the documented fields. No timing thresholds (CPU times are not checked)."""

import json
import os
import subprocess
import sys

import jax

from simbal_jax.experiments import benchmark

import conftest

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_SHAPE = "2:4:32:16"  # K:E:D:F


def tiny_config(method="lbl"):
  """The tests' tiny config with one layer, expert d_ff 16, batch 4 (random tokens, no data)."""
  return conftest.tiny_config(method, model=dict(num_layers=1), moe=dict(d_ff=16),
                              train=dict(global_batch_size=4))


def settings(**kw):
  base = dict(shapes=[TINY_SHAPE], tokens=64, capacity_factor=1.25, dtype="bfloat16",
              param_dtype="float32", moe_layers=2, methods=["none", "lbl", "simbal"], warmup=1,
              iters=2, input_sets=2, num_devices=1, peak_tflops=0.0, peak_gbps=0.0, seed=0)
  base.update(kw)
  return base


def _positive(row, *keys):
  for k in keys:
    assert row[k] > 0, (k, row[k])


def _check_env(report):
  assert report["env"]["jax_version"] == jax.__version__
  assert report["env"]["device_kind"] and report["env"]["platform"] == "cpu"
  json.loads(json.dumps(report, default=str))  # JSON-able
  assert report["text"].strip()


def test_moe_layer():
  report = benchmark.run("moe_layer", settings(peak_tflops=100.0))
  _check_env(report)
  (row,) = report["results"]
  _positive(row, "moe_ms", "dense_ms", "moe_tflops", "dense_tflops", "ratio", "useful_gflop",
            "flop_floor_ms", "capacity")
  assert row["useful_gflop"] * 1e9 == 6 * 64 * 2 * 3 * 32 * 16
  assert row["dense_d_ff"] == 2 * 16 and row["dtype"] == "bfloat16"
  assert 0.0 <= row["dropped"] < 1.0
  assert row["moe_p10_ms"] <= row["moe_ms"] <= row["moe_p90_ms"]


def test_train_step_report():
  """The train_step mode wraps bench_steps' row (tests/test_bench_steps.py) in a report."""
  report = benchmark.run("train_step", settings(peak_tflops=1.0), tiny_config("simbal"))
  _check_env(report)
  (row,) = report["results"]
  assert row["method"] == "simbal:0.1" and report["config"]["moe"]["d_ff"] == 16
  assert "simbal:0.1" in report["text"]


def test_cli_writes_json(tmp_path):
  out = tmp_path / "bench.json"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run(
      [sys.executable, "-m", "simbal_jax.experiments.benchmark", "--what=moe_layer",
       f"--shapes={TINY_SHAPE}", "--tokens=32", "--iters=1", "--warmup=0", f"--out={out}"],
      cwd=_REPO, env=env, capture_output=True, text=True, timeout=120, check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "jax " in proc.stdout and "ratio" in proc.stdout
  report = json.loads(out.read_text())
  assert report["what"] == "moe_layer" and report["results"][0]["moe_ms"] > 0
  assert report["command"].startswith("python -m simbal_jax.experiments.benchmark")
