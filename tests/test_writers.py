"""simbal_jax/runio/writers.py: metrics.jsonl written, cut back and resumed (W&B and the
profiler: tests/test_tracking.py)."""
import os


from simbal_jax.runio import writers

def test_metric_writer_drop_after(tmp_path):
  w = writers.MetricWriter(str(tmp_path), tensorboard=False)
  for s in range(1, 9):
    w.write(s, {"train/loss": float(s)})
  w.close()
  with open(tmp_path / "metrics.jsonl", "a", encoding="utf-8") as f:
    f.write('{"step": 9, "train/lo')  # a line cut by a crash
  w = writers.MetricWriter(str(tmp_path), tensorboard=False)
  w.drop_after(4)
  for s in range(5, 7):
    w.write(s, {"train/loss": 10.0 * s})
  w.close()
  recs = writers.read_jsonl(tmp_path / "metrics.jsonl")
  assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 6]
  assert [r["train/loss"] for r in recs] == [1.0, 2.0, 3.0, 4.0, 50.0, 60.0]
  assert not os.path.exists(tmp_path / "metrics.jsonl.tmp")
  off = writers.MetricWriter(str(tmp_path / "off"), enabled=False)  # not process 0: no file
  off.drop_after(0)
  assert not os.path.exists(tmp_path / "off" / "metrics.jsonl")


# Weights & Biases (offline) and the profiler trace, on one tiny run: 10 steps, TensorBoard on,
# two evaluations (images and histograms), log.profile_steps=3:5.
