"""experiments/demo.py (`make demo`) at the tests' tiny size: both methods train, the table,
the loss plot and the load heatmap are written, and a second run reuses the finished runs."""

import os

from absl import flags
from absl.testing import flagsaver
import pytest

from simbal_jax.configs import demo as demo_config
from simbal_jax.experiments import demo

from conftest import tiny_config

pytestmark = pytest.mark.usefixtures("fast_compiles")


@pytest.mark.slow
def test_demo_trains_both_methods_writes_its_outputs_and_reuses_runs(tmp_path, monkeypatch,
                                                                     capsys):
  tiny = tiny_config("lbl")  # built before the patch (it starts from demo_config itself)
  monkeypatch.setattr(demo_config, "get_config", lambda arg=None: tiny)
  flags.FLAGS.mark_as_parsed()
  with flagsaver.flagsaver(workdir=str(tmp_path), steps=4, methods=["lbl", "simbal"],
                           seeds=["0"]):
    demo.main([])
    first = capsys.readouterr().out
    demo.main([])
    second = capsys.readouterr().out
  for name in ("table.md", "loss_vs_tokens.png", "load_heatmap.png"):
    assert os.path.getsize(tmp_path / name) > 0, name
  for method in ("lbl", "simbal"):
    assert (tmp_path / method / "seed0" / "metrics.jsonl").exists()
    assert f"| {method} |" in first
  assert "4 steps per run" in first and "finished, skipped" not in first
  assert second.count("finished, skipped") == 2  # nothing trained again
