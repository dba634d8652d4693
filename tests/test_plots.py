"""simbal_jax/plots.py on small hand-made inputs: the axes each figure has, the colour limits
the panels share, the data drawn, and the readers of a run directory."""
import json
import os

import numpy as np
import pytest

from simbal_jax import plots


def _curve(tokens, losses):
  return np.stack([np.asarray(tokens, np.float64), np.asarray(losses, np.float64)], axis=1)


def test_read_eval_curve_uses_tokens_or_the_config(tmp_path):
  with open(tmp_path / "metrics.jsonl", "w") as f:
    f.write(json.dumps({"step": 5, "train/loss": 3.0}) + "\n")
    f.write(json.dumps({"step": 5, "eval/loss": 2.5, "train/tokens": 500}) + "\n")
    f.write(json.dumps({"step": 10, "eval/loss": 2.2}) + "\n")  # an old record: no tokens
    f.write('{"step": 12, "eval/lo')  # cut by a crash
  with open(tmp_path / "config.json", "w") as f:
    json.dump({"train": {"global_batch_size": 2, "seq_len": 50}}, f)
  np.testing.assert_allclose(plots.read_eval_curve(str(tmp_path)), [[500, 2.5], [1000, 2.2]])


def test_layer_pes_reads_the_summary_keys():
  summary = {"eval/layer_3/pes": 0.2, "eval/layer_1/pes": 0.1, "eval/pes_min": 0.1,
             "eval/layer_1/maxvio": 9.0}
  assert plots.layer_pes(summary) == {1: 0.1, 3: 0.2}


def test_loss_vs_tokens_one_axes_mean_over_seeds_and_a_difference_panel():
  curves = {"lbl": {0: _curve([100, 200], [3.0, 2.0]), 1: _curve([100, 200], [3.2, 2.2])},
            "simbal": [_curve([100, 200], [2.9, 2.1]), _curve([100, 200], [3.1, 2.3])]}
  fig = plots.loss_vs_tokens(curves, reference="lbl", target=2.1)
  ax, bx = fig.axes
  lines = {l.get_label(): l for l in ax.get_lines()}
  np.testing.assert_allclose(lines["lbl (mean of 2 seeds)"].get_ydata(), [3.1, 2.1])
  np.testing.assert_allclose(lines["simbal (mean of 2 seeds)"].get_xdata(), [100, 200])
  assert ax.get_xlabel() == bx.get_xlabel() == "training tokens"
  assert ax.get_shared_x_axes().joined(ax, bx)
  diffs = [l for l in bx.get_lines() if l.get_label() == "simbal"]
  np.testing.assert_allclose(diffs[0].get_ydata(), [-0.1, 0.1])
  one = plots.loss_vs_tokens({"lbl": _curve([1, 2], [3, 2]), "simbal": _curve([1, 2], [3, 1])})
  assert len(one.axes) == 1 and len(one.axes[0].get_lines()) == 2


def test_load_heatmaps_share_one_colour_scale_and_x_is_tokens():
  rng = np.random.default_rng(0)
  def load(n, lm, e, sharp):
    x = rng.random((n, lm, e)) ** sharp
    return x / x.sum(-1, keepdims=True)
  loads = {"lbl": (np.array([100, 200, 400]), [1, 3], load(3, 2, 4, 1.0)),
           "simbal": (np.array([100, 200, 400]), [1, 3], load(3, 2, 4, 4.0))}
  fig = plots.load_heatmaps(loads)
  panels = [a for a in fig.axes if a.get_label() != "<colorbar>"]
  assert len(panels) == 4 and len(fig.axes) == 5  # 2 methods x 2 layers, one colour bar
  clims = {a.collections[0].get_clim() for a in panels}
  vmax = max(float(v[2].max()) for v in loads.values())
  assert clims == {(0.0, vmax)}
  assert [a.get_title() for a in panels] == ["lbl, layer 1", "lbl, layer 3", "simbal, layer 1",
                                            "simbal, layer 3"]
  mesh = panels[2].collections[0]
  np.testing.assert_allclose(mesh.get_array().reshape(4, 3), loads["simbal"][2][:, 0, :].T)
  x0, x1 = panels[0].get_xlim()
  assert x0 == pytest.approx(50) and x1 == pytest.approx(500)  # cells centred on the tokens
  with pytest.raises(ValueError, match="different numbers of MoE layers"):
    plots.load_heatmaps({"a": loads["lbl"], "b": (np.array([1]), None, np.ones((1, 1, 4)) / 4)})


def test_read_expert_loads_feeds_the_heatmaps(tmp_path):
  runs = {}
  for method, sharp in (("lbl", 0.0), ("simbal", 1.0)):
    d = tmp_path / method
    d.mkdir()
    with open(d / "expert_load.jsonl", "w") as f:
      for step in (2, 4, 6):
        load = np.array([[1.0 + sharp * step, 1.0, 1.0, 1.0]] * 2)
        load /= load.sum(-1, keepdims=True)
        f.write(json.dumps({"step": step, "tokens": 64 * step, "split": "train",
                            "layers": [0, 1], "load": load.tolist()}) + "\n")
      f.write(json.dumps({"step": 6, "tokens": 384, "split": "eval", "layers": [0, 1],
                          "load": [[0.25] * 4] * 2}) + "\n")
    runs[method] = str(d)
  loads = plots.read_expert_loads(runs)
  tokens, layers, load = loads["simbal"]
  np.testing.assert_array_equal(tokens, [128, 256, 384])
  assert layers == [0, 1] and load.shape == (3, 2, 4)
  np.testing.assert_allclose(load[2, 1], [7 / 10, 1 / 10, 1 / 10, 1 / 10])
  fig = plots.load_heatmaps(loads)
  panels = [a for a in fig.axes if a.get_label() != "<colorbar>"]
  assert [a.collections[0].get_clim() for a in panels] == [(0.0, pytest.approx(0.7))] * 4
  assert plots.read_expert_loads({"lbl": runs["lbl"]}, split="eval")["lbl"][2].shape == (1, 2, 4)
  with pytest.raises(FileNotFoundError):
    plots.read_expert_loads({"none": str(tmp_path)})
  with pytest.raises(ValueError, match="no load logged for lbl"):
    plots.load_heatmaps({"lbl": (np.zeros(0), [], np.zeros((0, 0, 0)))})


def test_gram_matrices_side_by_side_with_one_symmetric_scale():
  rng = np.random.default_rng(1)
  q = np.linalg.qr(rng.normal(size=(2, 8, 4)))[0]  # orthonormal columns: RᵀR = I
  noisy = 0.7 * rng.normal(size=(2, 8, 4))
  fig = plots.gram_matrices({"lbl": noisy, "simbal": q}, layers=[1, 3])
  panels = [a for a in fig.axes if a.get_label() != "<colorbar>"]
  assert len(panels) == 4
  clims = {a.images[0].get_clim() for a in panels}
  assert len(clims) == 1
  lo, hi = clims.pop()
  assert lo == -hi and hi == pytest.approx(np.abs(np.einsum("lde,ldf->lef", noisy, noisy)).max())
  assert [a.get_title().split(":")[0] for a in panels] == [
      "lbl, layer 1", "simbal, layer 1", "lbl, layer 3", "simbal, layer 3"]
  np.testing.assert_allclose(panels[1].images[0].get_array(), np.eye(4), atol=1e-12)
  assert float(panels[1].get_title().split()[-1]) < 1e-9  # ‖RᵀR−I‖₁ of the orthonormal one
  assert len(fig.axes) == 5  # and one colour bar


def test_pes_per_layer_grouped_bars():
  fig = plots.pes_per_layer({"lbl": {1: 0.3, 3: 0.2}, "simbal": [0.0, 0.1, 0.0, 0.05]})
  (ax,) = fig.axes
  assert len(ax.patches) == 8  # both methods at layers 0, 1, 2, 3 (lbl's missing ones NaN)
  assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "1", "2", "3"]
  assert ax.get_legend() is not None


def test_prune_tradeoff_one_line_per_method_sorted_by_experts(tmp_path):
  rows = [{"threshold": 0.0, "loss": 2.0, "experts_per_token": 2.0},
          {"threshold": 0.2, "loss": 2.1, "experts_per_token": 1.5}]
  with open(tmp_path / "prune.json", "w") as f:
    json.dump(rows, f)
  fig = plots.prune_tradeoff({"lbl": plots.read_prune(str(tmp_path)), "simbal": rows[:1]})
  (ax,) = fig.axes
  lines = {l.get_label(): l for l in ax.get_lines()}
  np.testing.assert_allclose(lines["lbl"].get_xdata(), [1.5, 2.0])
  np.testing.assert_allclose(lines["lbl"].get_ydata(), [2.1, 2.0])
  assert [t.get_text() for t in ax.texts] == ["0.2", "0", "0"]


def test_figures_save_without_pyplot(tmp_path):
  fig = plots.pes_per_layer({"lbl": [0.1, 0.2]})
  path = os.path.join(tmp_path, "pes.png")
  fig.savefig(path, dpi=50)
  with open(path, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
