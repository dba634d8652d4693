"""evaluate.py: the eval schedule, the eval set (same for every seed and method), eval batches
made on access, the extra evaluation sets (train.eval_sets)."""

import jax
import numpy as np
import pytest

from simbal_jax import env as env_lib
from simbal_jax import evaluate

from conftest import tiny_config

def test_eval_steps_linear_log_and_every():
  t = tiny_config(steps=100).train
  t.num_evals = 8
  # linspace(12.5, 100, 8) rounded half to even
  assert evaluate.eval_steps(t) == [12, 25, 38, 50, 62, 75, 88, 100]
  t.num_evals, t.eval_spacing = 5, "log"
  assert evaluate.eval_steps(t) == [1, 3, 10, 32, 100]
  t.num_evals = 0
  assert evaluate.eval_steps(t) == [100]
  t.eval_every = 30
  assert evaluate.eval_steps(t) == [30, 60, 90, 100]


def test_eval_set_is_the_same_across_seeds_and_methods(tmp_path):
  """The evaluation set is spread over the held-out split and identical across seeds and
  methods."""
  env_a = env_lib.build(tiny_config("simbal", steps=6), str(tmp_path / "a"))
  cfg_b = tiny_config("lbl", steps=6)
  cfg_b.seed = 3
  env_b = env_lib.build(cfg_b, str(tmp_path / "b"))
  ea, eb = evaluate.eval_set(env_a), evaluate.eval_set(env_b)
  np.testing.assert_array_equal(np.concatenate([b["inputs"] for b in ea]),
                                np.concatenate([b["inputs"] for b in eb]))
  idx = env_a.datasets.eval_indices(8)
  assert idx[0] == 0 and idx[-1] == len(env_a.datasets.eval) - 1  # spans the whole split


def test_eval_batches_are_micro_batches_made_on_access():
  """The eval set stays on the host: each access gives one global micro-batch (host batches
  split in order into train.grad_accum parts), sharded over the batch axes."""
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  sharding_ = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  host = [{"inputs": np.arange(16 * 3).reshape(16, 3) + 100 * i,
           "targets": np.zeros((16, 3), np.int32), "other": np.ones(16)} for i in range(2)]
  batches = evaluate.EvalBatches(host, sharding_, micro=2)
  assert len(batches) == 4
  got = np.concatenate([np.asarray(b["inputs"]) for b in batches])
  np.testing.assert_array_equal(got, np.concatenate([h["inputs"] for h in host]))
  first = batches[0]
  assert set(first) == {"inputs", "targets"} and first["inputs"].shape == (8, 3)
  assert first["inputs"].sharding == sharding_
  # 3 parts do not divide 16 rows, 4 parts of 4 rows do not split over 8 devices: 2 parts
  assert len(evaluate.EvalBatches(host, sharding_, micro=3)) == 4
  assert len(evaluate.EvalBatches(host, sharding_, micro=4)) == 4


def _text_docs(root):
  root.mkdir()
  for i in range(40):
    (root / f"doc{i}.txt").write_text(f"q{i}: a b x y zz a b a " * (5 + i % 7))
  return str(root / "*.txt")


def test_extra_eval_sets_each_log_their_metrics_and_load_shift(tmp_path):
  """Two extra sets in a tiny run: a copy of the main set (the same metrics, load shift 0) and
  the synthetic corpus (its own metrics, domain MI, a load shift equal to float64 NumPy on the
  logged loads), at every evaluation, with PES at the last one, in the summary and its table."""
  from simbal_jax import telemetry, train  # pylint: disable=g-import-not-at-top
  from simbal_jax.runio import writers  # pylint: disable=g-import-not-at-top
  cfg = tiny_config("lbl", steps=4, analysis=True, train=dict(num_evals=2, pes_tokens=32,
                                               eval_sets="same=text_files,syn=synthetic"))
  cfg.data.update(source="text_files", globs=_text_docs(tmp_path / "docs"), tokenizer="bytes",
                  eval_fraction=0.2)
  run = tmp_path / "run"
  summary, _ = train.train_and_evaluate(cfg, str(run), devices=jax.devices()[:1])
  evals = [r for r in writers.read_jsonl(run / "metrics.jsonl") if "eval/loss" in r]
  assert [r["step"] for r in evals] == [2, 4]
  layers = summary["model_config"].moe_layer_ids
  _, _, _, main_load = telemetry.read_expert_load(run, "eval")
  _, _, _, syn_load = telemetry.read_expert_load(run, "eval_syn")
  for j, rec in enumerate(evals):
    for k in [k for k in rec if k.startswith("eval/") and k != "eval/churn_since_step"]:
      if "pes" not in k and "move" not in k and "stagnant" not in k:  # main set only
        assert rec["eval_same/" + k[5:]] == rec[k], k
    assert rec["eval_same/load_tv"] == 0.0
    assert rec["eval_syn/loss"] != rec["eval/loss"] and "eval_syn/churn" in rec
    assert "eval_syn/domain_mi_norm" in rec and "eval/domain_mi_norm" not in rec
    tv = 0.5 * np.abs(main_load[j] - syn_load[j]).sum(-1)
    for l, i in enumerate(layers):
      assert rec[f"eval_syn/layer_{i}/load_tv"] == pytest.approx(tv[l], abs=1e-6)
    assert rec["eval_syn/load_tv"] == pytest.approx(tv.mean(), abs=1e-6)
  assert "eval_syn/pes_min" in evals[-1] and "eval_syn/pes_min" not in evals[0]
  assert summary["eval_syn/loss"] == evals[-1]["eval_syn/loss"]
  table = telemetry.summary_table(summary)
  assert "eval_same/loss" in table and "eval_syn/load_tv" in table


def test_an_extra_set_needing_a_larger_vocabulary_is_refused(tmp_path):
  cfg = tiny_config("lbl", steps=2, train=dict(eval_sets="txt=text_files:" + _text_docs(
      tmp_path / "docs")))  # bytes (257 ids) for a synthetic run's 65
  with pytest.raises(ValueError, match="set 'txt': its tokens need a vocabulary of 257, more "
                                       "than the model's 65"):
    env_lib.build(cfg, str(tmp_path / "run"))
