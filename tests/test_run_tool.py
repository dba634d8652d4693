"""experiments/run_tool.py: the `--run` flag of the tools that read a finished run, and their
report (JSON in the run directory, a table on stdout)."""

import json

from absl import app
from absl import flags
from absl.testing import flagsaver
import pytest

from simbal_jax.experiments import run_tool

if "run" not in flags.FLAGS:
  run_tool.define_run_flag()


def test_missing_run_is_a_usage_error():
  with flagsaver.flagsaver(run=None):
    flags.FLAGS.mark_as_parsed()
    with pytest.raises(app.UsageError, match="--run is required"):
      run_tool.restore()


def test_report_writes_json_into_the_run_and_prints_the_table(tmp_path, capsys):
  flags.FLAGS.mark_as_parsed()
  with flagsaver.flagsaver(run=str(tmp_path)):
    run_tool.report("x.json", {"a": 1.5}, [("layer 0", {"v": 0.25}), ("layer 1", {"v": 0.5})],
                    [("value", "v")])
  assert json.loads((tmp_path / "x.json").read_text()) == {"a": 1.5}
  out = capsys.readouterr().out
  assert "layer 0" in out and "0.2500" in out and "value" in out
