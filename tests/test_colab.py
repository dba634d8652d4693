"""The Colab notebook's code runs: the losses cell as it is, the training cells on a tiny run."""
import json
import os

import pytest

_NOTEBOOK = os.path.join(os.path.dirname(__file__), os.pardir, "colab", "simbal_demo.ipynb")


def _code_cells():
  with open(_NOTEBOOK) as f:
    nb = json.load(f)
  return ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]


def test_notebook_is_valid_and_has_the_cells():
  cells = _code_cells()
  assert len(cells) == 4
  for src in cells:
    compile(src, "<cell>", "exec")  # every cell is valid Python


def test_losses_cell_runs(capsys):
  ns = {}
  exec(_code_cells()[1], ns)  # pylint: disable=exec-used
  out = capsys.readouterr().out
  # An orthogonal init has SimBal 0 up to float32 rounding; the printed value shows it.
  line = [l for l in out.splitlines() if l.startswith("SimBal of an orthogonal init")][0]
  assert abs(float(line.split(":")[1])) < 1e-4
  assert "MaxVio, dead experts" in out


@pytest.mark.parametrize("steps", [3])
def test_training_cells_run(tmp_path, monkeypatch, steps):
  monkeypatch.chdir(os.path.join(os.path.dirname(__file__), os.pardir))
  train_cell, report_cell = _code_cells()[2:]
  small_data = (f"cfg.train.num_steps = {steps}; cfg.data.max_docs = 300; "
                "cfg.train.eval_tokens = 4096")  # the cells as they are, on less data
  train_cell = (train_cell.replace("cfg.train.num_steps = 200", small_data)
                .replace('f"/content/runs/{method}"', f'f"{tmp_path}/{{method}}"'))
  assert f"num_steps = {steps}" in train_cell and str(tmp_path) in train_cell
  ns = {}
  exec(train_cell, ns)  # pylint: disable=exec-used
  exec(report_cell, ns)  # pylint: disable=exec-used
  for method in ("lbl", "simbal"):
    summary = ns["summaries"][method]
    assert summary["status"] == "done" and summary["step"] == steps
    assert all(k in summary for k in ("eval/loss", "eval/maxvio", "eval/seu", "eval/ortho_l1"))
