"""experiments/convergence.py: aggregation on hand-made logs with hand-worked answers, and a
half-finished matrix resumes without retraining finished runs."""
import json
import os
import signal

import numpy as np
import pytest

from simbal_jax.runio import writers
from simbal_jax.experiments import convergence


def _write_run(root, method, seed, evals, *, num_steps=10, lr=None, config=True, seq=None):
  """A run directory: tokens per step 100 (batch 1 x 100), evals {step: loss}."""
  d = convergence.run_dir(str(root), method, seed, lr)
  os.makedirs(d, exist_ok=True)
  if config:
    with open(os.path.join(d, "config.json"), "w") as f:
      json.dump({"train": {"num_steps": num_steps, "global_batch_size": 1, "seq_len": 100},
                 "opt": {"peak_lr": lr or 1e-3}}, f)
  with open(os.path.join(d, "metrics.jsonl"), "w") as f:
    for step, loss in sorted(evals.items()):
      f.write(json.dumps({"step": step, "train/loss": loss + 0.1}) + "\n")
      f.write(json.dumps({"step": step, "eval/loss": loss, "eval/loss_se": 0.01,
                          "eval/maxvio": 0.5 + seed, "eval/layer_0/pes": 0.1 * (seed + 1),
                          "eval/churn": 0.2 + 0.1 * seed - step / 100,
                          "train/tokens": step * 100}) + "\n")
  if seq is not None:
    with open(os.path.join(d, "eval_seq_loss.json"), "w") as f:
      json.dump({"step": num_steps, "ce_seq": seq}, f)
  return d


def test_aggregate_hand_worked(tmp_path):
  # Reference lbl: finals 2.0 and 2.2 -> target 2.1 after 1000 tokens.
  _write_run(tmp_path, "lbl", 0, {5: 3.0, 10: 2.0}, seq=[2.0, 2.0, 2.0, 2.0])
  _write_run(tmp_path, "lbl", 1, {5: 3.2, 10: 2.2})
  # simbal seed 0 crosses 2.1 between 500 (2.5) and 1000 (1.9): 500 + 0.4/0.6 * 500 tokens;
  # seed 1 is below at its first evaluation (500 tokens).
  _write_run(tmp_path, "simbal", 0, {5: 2.5, 10: 1.9}, seq=[1.8, 1.9, 2.0, 1.9])
  _write_run(tmp_path, "simbal", 1, {5: 2.0, 10: 1.95})
  _write_run(tmp_path, "none", 0, {5: 3.5, 10: 2.5})
  _write_run(tmp_path, "none", 1, {5: 3.6, 10: 2.6})
  _write_run(tmp_path, "none", 2, {5: 3.6}, num_steps=10)  # unfinished
  _write_run(tmp_path, "none", 3, {5: 3.6, 10: 2.0}, config=False)  # incomplete copy
  runs, incomplete = convergence.load_runs(str(tmp_path))
  assert len(runs) == 6
  assert any("none/seed2: unfinished (last evaluation at step 5" in x for x in incomplete)
  assert any("none/seed3: missing config.json" in x for x in incomplete)
  t = convergence.aggregate(runs, incomplete, "lbl")
  assert t["target_loss"] == pytest.approx(2.1) and t["reference_tokens"] == 1000
  assert list(t["methods"]) == ["lbl", "none", "simbal"]
  sim = t["methods"]["simbal"]
  assert sim["final_loss"]["mean"] == pytest.approx(1.925)
  assert sim["final_loss"]["std"] == pytest.approx(np.sqrt(2 * 0.025 ** 2))
  ttt = sim["tokens_to_target"]
  assert ttt["per_seed"] == pytest.approx([500 + 0.4 / 0.6 * 500, 500])
  assert ttt["reached"] == 2
  pct = sim["fewer_tokens_pct"]
  assert pct["per_seed"] == pytest.approx([100 / 6, 50.0])
  half = 12.706205 * np.std([100 / 6, 50.0], ddof=1) / np.sqrt(2)
  assert pct["mean"] == pytest.approx(100 / 3)
  assert pct["ci95"] == pytest.approx([100 / 3 - half, 100 / 3 + half])
  diff = sim["diff_vs_reference"]
  assert diff["per_seed"] == pytest.approx([-0.1, -0.25])
  half = 12.706205 * np.std([-0.1, -0.25], ddof=1) / np.sqrt(2)
  assert diff["mean"] == pytest.approx(-0.175) and diff["ci95"] == pytest.approx(
      [-0.175 - half, -0.175 + half])
  d = np.array([-0.2, -0.1, 0.0, -0.1])  # paired per-sequence differences, seed 0 only
  assert diff["eval_se"] == pytest.approx(d.std(ddof=1) / 2)
  none = t["methods"]["none"]
  assert none["tokens_to_target"] == {"per_seed": [None, None], "reached": 0, "mean": None}
  assert none["fewer_tokens_pct"]["mean"] is None
  assert sim["metrics"]["maxvio"] == {"mean": 1.0, "std": pytest.approx(np.sqrt(0.5))}
  assert sim["per_layer"]["pes"]["layer_0"]["mean"] == pytest.approx(0.15)
  # Churn at 500 tokens: seeds 0.15 and 0.25; at 1000: 0.10 and 0.20 (no expert movement).
  churn = sim["change_vs_tokens"]["churn"]
  assert churn["tokens"] == [500, 1000]
  assert churn["mean"] == pytest.approx([0.2, 0.15])
  assert churn["std"] == pytest.approx([np.sqrt(0.005)] * 2)
  assert "expert_move" not in sim["change_vs_tokens"]
  md = convergence.format_table(t)
  assert "not reached" in md and "none/seed2" in md and "+33.3" in md
  assert "| simbal | 0.2000 | 0.1500 |" in md


def test_best_learning_rate_per_method(tmp_path):
  _write_run(tmp_path, "lbl", 0, {10: 2.3}, lr=1e-3)
  _write_run(tmp_path, "lbl", 0, {10: 2.1}, lr=3e-3)  # lbl's best
  _write_run(tmp_path, "simbal", 0, {10: 2.0}, lr=1e-3)  # simbal's best
  _write_run(tmp_path, "simbal", 0, {10: 2.4}, lr=3e-3)
  runs, incomplete = convergence.load_runs(str(tmp_path))
  assert not incomplete and sorted(r["lr"] for r in runs) == [1e-3, 1e-3, 3e-3, 3e-3]
  t = convergence.aggregate(runs, incomplete, "lbl")
  assert t["methods"]["lbl"]["lr"] == 3e-3 and t["methods"]["simbal"]["lr"] == 1e-3
  assert t["target_loss"] == pytest.approx(2.1)
  assert t["methods"]["simbal"]["diff_vs_reference"]["per_seed"] == pytest.approx([-0.1])
  assert t["methods"]["simbal"]["other_lrs"]["0.003"]["final_loss"]["mean"] == 2.4
  assert "simbal lr 0.003" in convergence.format_table(t)


def test_missing_reference_is_a_clear_error(tmp_path):
  _write_run(tmp_path, "simbal", 0, {10: 2.0})
  runs, _ = convergence.load_runs(str(tmp_path))
  with pytest.raises(ValueError, match="reference method 'lbl' has no finished run.*simbal"):
    convergence.aggregate(runs, [], "lbl")


@pytest.mark.slow
def test_half_finished_matrix_resumes_without_retraining(tmp_path, monkeypatch):
  import jax  # pylint: disable=g-import-not-at-top
  from simbal_jax import train  # pylint: disable=g-import-not-at-top
  from conftest import tiny_config  # pylint: disable=g-import-not-at-top
  cfg = tiny_config("lbl", steps=4, analysis=True)
  cfg.train.num_evals, cfg.train.pes_tokens, cfg.ckpt.every = 2, 16, 2
  real = train.train_and_evaluate
  calls = []

  def interrupted_second_run(config, workdir, **kw):
    calls.append((config.balance.terms, config.seed))
    if len(calls) == 2:  # SIGTERM during the second run's step 3: it saves and stops
      kw["hooks"] = [lambda step, _: step == 3 and os.kill(os.getpid(), signal.SIGTERM)]
    return real(config, workdir, devices=jax.devices()[:1], **kw)

  monkeypatch.setattr(train, "train_and_evaluate", interrupted_second_run)
  work = str(tmp_path / "conv")
  convergence.run_matrix(cfg, work, ["lbl", "simbal"], [0], say=lambda m: None)
  assert calls == [("lbl:0.01", 0), ("simbal:0.1", 0)]
  assert os.path.exists(os.path.join(work, "lbl", "seed0", "summary.json"))
  assert not os.path.exists(os.path.join(work, "simbal", "seed0", "summary.json"))
  calls.clear()
  convergence.run_matrix(cfg, work, ["lbl", "simbal"], [0], say=lambda m: None)
  assert calls == [("simbal:0.1", 0)]  # lbl was not retrained
  with open(os.path.join(work, "simbal", "seed0", "summary.json")) as f:
    assert json.load(f)["start_step"] == 3  # resumed from the preemption checkpoint
  table, md = convergence.write_outputs(work, "lbl")
  assert set(table["methods"]) == {"lbl", "simbal"} and not table["incomplete"]
  assert os.path.getsize(os.path.join(work, "loss_vs_tokens.png")) > 0
  # One corpus, one evaluation set for every run of the comparison.
  seqs = [json.load(open(os.path.join(work, m, "seed0", "eval_seq_loss.json")))["ce_seq"]
          for m in ("lbl", "simbal")]
  assert len(seqs[0]) == len(seqs[1]) == 8
  assert table["methods"]["simbal"]["diff_vs_reference"]["eval_se"] > 0
  assert "PES min" in md and -1 <= table["methods"]["lbl"]["metrics"]["pes_min"]["mean"] <= 1
  # Churn and expert movement at every evaluation (steps 2 and 4), per layer and averaged; the
  # resumed run's final one is since its restart at step 3.
  for m in ("lbl", "simbal"):
    evals = [r for r in writers.read_jsonl(os.path.join(work, m, "seed0", "metrics.jsonl"))
             if "eval/loss" in r]
    assert [r["step"] for r in evals] == [2, 4]
    for r in evals:
      for name in ("churn", "expert_move", "expert_move_min", "stagnant"):
        assert 0 <= r[f"eval/{name}"] == pytest.approx(
            (r[f"eval/layer_0/{name}"] + r[f"eval/layer_1/{name}"]) / 2)
      assert 0 < r["eval/expert_move"] and 0 <= r["eval/churn"] <= 1
    assert [r["eval/churn_since_step"] for r in evals] == ([0, 2] if m == "lbl" else [0, 3])
    loads = [r for r in writers.read_jsonl(os.path.join(work, m, "seed0", "expert_load.jsonl"))
             if r["split"] == "eval"]
    assert [np.shape(r["movement"]) for r in loads] == [(2, 4), (2, 4)]
  for name in ("churn", "expert_move", "stagnant"):
    assert table["methods"]["simbal"]["change_vs_tokens"][name]["tokens"] == [256, 512]
  assert "Routing churn since the previous evaluation" in md
  assert os.path.getsize(os.path.join(work, "churn_vs_tokens.png")) > 0
