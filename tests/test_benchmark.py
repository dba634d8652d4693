"""Smoke tests of experiments/benchmark.py: every mode runs on tiny shapes and reports positive
timings with the documented fields. No timing thresholds (CPU times are not checked)."""

import json
import os
import subprocess
import sys

import jax
import pytest

from simbal_jax.experiments import benchmark

import conftest

pytestmark = pytest.mark.usefixtures("fast_compiles")

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


def test_train_step_mfu():
  report = benchmark.run("train_step", settings(peak_tflops=1.0), tiny_config("simbal"))
  _check_env(report)
  (row,) = report["results"]
  assert row["method"] == "simbal:0.1" and row["devices"] == 1  # the terms, unnamed
  assert row["tokens_per_step"] == 4 * 16
  _positive(row, "step_ms", "tokens_per_s", "flops_per_token", "mfu", "first_call_s")
  assert abs(row["tokens_per_s"] - 64 / (row["step_ms"] * 1e-3)) < 1e-6 * row["tokens_per_s"]


@pytest.mark.slow
def test_routing_modes():
  report = benchmark.run("routing", settings(), tiny_config())
  _check_env(report)
  res = report["results"]
  assert [r["part"] for r in res["losses"]] == ["router_fwd_bwd", "dispatch_plan", "lbl_fwd_bwd",
                                                "simbal_fwd_bwd"]
  for r in res["losses"]:
    _positive(r, "ms")
  assert [s["method"] for s in res["train_steps"]] == ["none", "lbl", "simbal"]
  for s in res["train_steps"]:
    _positive(s, "step_ms", "tokens_per_s")
    assert s["mfu"] is None  # no peak given on CPU
  assert res["train_steps"][0]["overhead_vs_none"] == 0.0


def test_memory_mode_compares_the_estimate_with_the_compiled_step():
  cfg = tiny_config("lbl")
  report = benchmark.run("memory", settings(), cfg)
  (row,) = report["results"]
  env = benchmark.build_env(cfg, jax.devices()[:1])
  gib = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)) / 2**30
  state_gib = gib(env.abstract)
  # XLA's arguments are the train state and the batch: the state's bytes plus 2 x B x L int32.
  batch_gib = 2 * 4 * 16 * 4 / 2**30
  assert abs(row["xla_args_gib"] - state_gib - batch_gib) < 1e-6
  assert abs(row["est_params_gib"] - gib(env.abstract.params)) < 1e-12
  _positive(row, "xla_temp_gib", "est_activations_gib", "temp_vs_est")
  assert row["peak_gib"] is None  # CPU: no memory stats


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
