"""experiments/demo.py (`make demo`) at the tests' tiny size: both methods train, the table,
the loss plot and the load heatmap are written, and a second run reuses the finished runs.

Run in a subprocess: demo.py defines its absl flags at import, and some share names with
benchmark.py's (imported by other tests in the same process)."""

import os
import subprocess
import sys

import pytest

from conftest import xla_flags

_TESTS = os.path.dirname(os.path.abspath(__file__))
_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from conftest import tiny_config
from simbal_jax.configs import demo as demo_config
tiny = tiny_config("lbl", analysis=True)  # as make demo: PES, churn and norms on
demo_config.get_config = lambda arg=None: tiny
from absl import app
from simbal_jax.experiments import demo
app.run(demo.main, argv=["demo", "--workdir={workdir}", "--steps=4", "--methods=lbl,simbal",
                         "--seeds=0"])
"""


def _run(workdir):
  # One CPU device, as `make demo` has on a CPU machine (conftest.py gives this process 8).
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags())
  got = subprocess.run([sys.executable, "-c", _SCRIPT.format(tests=_TESTS, workdir=workdir)],
                       env=env, capture_output=True, text=True, timeout=600, check=False)
  assert got.returncode == 0, got.stderr[-3000:]
  return got.stdout


@pytest.mark.slow
def test_demo_trains_both_methods_writes_its_outputs_and_reuses_runs(tmp_path):
  first = _run(tmp_path)
  second = _run(tmp_path)
  for name in ("table.md", "loss_vs_tokens.png", "load_heatmap.png"):
    assert os.path.getsize(tmp_path / name) > 0, name
  for method in ("lbl", "simbal"):
    assert (tmp_path / method / "seed0" / "metrics.jsonl").exists()
    assert f"| {method} |" in first
  assert "4 steps per run" in first and "finished, skipped" not in first
  assert second.count("finished, skipped") == 2  # nothing trained again
