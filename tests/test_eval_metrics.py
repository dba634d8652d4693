"""The eval-metric registry: values against float64 NumPy, and one added metric end to end."""

import json

import numpy as np
import pytest

from simbal_jax import eval_metrics
from simbal_jax import train
from simbal_jax.experiments import convergence

from conftest import one_device, tiny_config


def _sums():
  """Two eval batches of a 2-layer, 4-expert model, by hand (layer 1 has a dead expert)."""
  one = {"ce_sum": np.float32(30.0), "tokens": np.float32(12.0), "seqs": np.float32(3.0),
         "ce_seq": np.array([2.0, 3.0, 2.5], np.float32),
         "counts": np.array([[6, 6, 6, 6], [12, 8, 4, 0]], np.float32),
         "entropy_sum": np.array([12.0, 6.0], np.float32),
         "seu_sum": np.array([1.5, 0.9], np.float32)}
  two = {"ce_sum": np.float32(18.0), "tokens": np.float32(8.0), "seqs": np.float32(2.0),
         "ce_seq": np.array([2.0, 2.5], np.float32),
         "counts": np.array([[2, 4, 6, 4], [8, 4, 4, 0]], np.float32),
         "entropy_sum": np.array([8.0, 2.0], np.float32),
         "seu_sum": np.array([1.0, 0.6], np.float32)}
  return [one, two]


def test_values_match_float64_numpy():
  out = eval_metrics.compute(_sums(), layer_ids=[1, 3])
  counts = np.array([[8, 10, 12, 10], [20, 12, 8, 0]], np.float64)
  load = counts / counts.sum(-1, keepdims=True)
  seq = np.array([2.0, 3.0, 2.5, 2.0, 2.5])
  assert out["eval/loss"] == pytest.approx(48.0 / 20.0)
  assert out["eval/ppl"] == pytest.approx(np.exp(2.4))
  assert out["eval/loss_se"] == pytest.approx(seq.std(ddof=1) / np.sqrt(5))
  assert out["eval/sequences"] == 5.0 and out["eval/tokens"] == 20.0
  maxvio = load.max(-1) / load.mean(-1) - 1.0
  cv = load.std(-1) / load.mean(-1)
  for j, i in enumerate((1, 3)):
    assert out[f"eval/layer_{i}/maxvio"] == pytest.approx(maxvio[j], rel=1e-6)
    assert out[f"eval/layer_{i}/load_cv"] == pytest.approx(cv[j], rel=1e-6)
  assert out["eval/layer_1/dead"] == 0.0 and out["eval/layer_3/dead"] == 1.0
  assert out["eval/dead"] == 0.5  # the mean over MoE layers
  assert out["eval/layer_1/entropy"] == pytest.approx(20.0 / 20.0)
  assert out["eval/layer_3/seu"] == pytest.approx(1.5 / 5.0)
  assert out["eval/maxvio"] == pytest.approx(maxvio.mean(), rel=1e-6)
  assert not any("ortho" in k or "domain" in k for k in out)  # no kernels, no domain labels


def test_router_kernels_give_the_orthogonality_gap():
  kernels = np.stack([np.eye(4)[:, :4], np.ones((4, 4)) / 2.0])  # [Lm=2, D=4, E=4]
  out = eval_metrics.compute(_sums(), kernels)
  gram = np.einsum("ld,le->de", kernels[1], kernels[1]) - np.eye(4)  # RᵀR − I of layer 1
  assert out["eval/layer_0/ortho_l1"] == 0.0
  assert out["eval/layer_1/ortho_l1"] == pytest.approx(np.abs(gram).sum(), rel=1e-6)


def test_a_dense_model_gets_the_loss_metrics_only():
  dense = [{k: v for k, v in s.items() if k in ("ce_sum", "tokens", "seqs", "ce_seq")}
           for s in _sums()]
  assert set(eval_metrics.compute(dense)) == {"eval/loss", "eval/loss_se", "eval/ppl",
                                              "eval/tokens", "eval/sequences"}


def test_undecided_share_is_the_summed_undecided_tokens_over_tokens():
  sums = _sums()
  assert "eval/undecided" not in eval_metrics.compute(sums)  # sums without it: skipped
  sums[0]["undecided_sum"] = np.array([3.0, 0.0], np.float32)
  sums[1]["undecided_sum"] = np.array([5.0, 1.0], np.float32)
  out = eval_metrics.compute(sums, layer_ids=[1, 3])
  assert out["eval/layer_1/undecided"] == 8.0 / 20.0
  assert out["eval/layer_3/undecided"] == 1.0 / 20.0
  assert out["eval/undecided"] == pytest.approx(4.5 / 20.0)
  assert ("undecided", "eval/undecided") in eval_metrics.summary_columns()


def test_an_added_metric_reaches_metrics_jsonl_the_summary_and_the_table(tmp_path, monkeypatch):
  """Adding a metric is one function and one registry line: it then appears everywhere."""
  top_load = eval_metrics.EvalMetric("top_load", lambda x: x.load.max(-1), header="top load",
                                     table="top load")
  monkeypatch.setitem(eval_metrics.METRICS, "top_load", top_load)
  run = tmp_path / "conv" / "lbl" / "seed0"
  summary, _ = train.train_and_evaluate(tiny_config("lbl", steps=2), str(run), devices=one_device())
  want = summary["expert_load"].max(-1)  # the final evaluation's load, float64[Lm, E]
  assert summary["eval/top_load"] == pytest.approx(want.mean())
  assert ("top load", "eval/top_load") in eval_metrics.summary_columns()
  records = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
  final = [r for r in records if "eval/loss" in r][-1]
  layer_ids = summary["model_config"].moe_layer_ids
  for j, i in enumerate(layer_ids):
    assert final[f"eval/layer_{i}/top_load"] == pytest.approx(want[j])
  runs, incomplete = convergence.load_runs(str(tmp_path / "conv"))
  table = convergence.aggregate(runs, incomplete, "lbl")
  assert table["methods"]["lbl"]["metrics"]["top_load"]["mean"] == pytest.approx(want.mean())
  header = [l for l in convergence.format_table(table).splitlines() if "MaxVio" in l][0]
  assert "| top load |" in header


def test_the_pure_modules_import_no_flax_optax_or_io():
  """balance, eval_metrics, losses, metrics, routing and specialization need only jax and
  numpy (jax itself brings etils)."""
  import os, subprocess, sys  # pylint: disable=g-import-not-at-top,multiple-imports
  code = ("import sys\n"
          "from simbal_jax import balance, eval_metrics, losses, metrics, routing, specialization\n"
          "heavy = ('flax', 'optax', 'orbax', 'grain', 'tensorboardX', 'ml_collections')\n"
          "bad = sorted(m for m in heavy if m in sys.modules)\n"
          "assert not bad, bad\n")
  subprocess.run([sys.executable, "-c", code], check=True,
                 env={**os.environ, "JAX_PLATFORMS": "cpu"})
