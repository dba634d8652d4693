"""experiments/prune.py on a tiny trained run restored from disk (conftest fixture `trained`)."""
import pytest

from simbal_jax.experiments import prune

def test_prune_threshold_zero_is_the_normal_evaluation(trained):
  summary, env, state = trained
  rows = prune.prune_table(env, state, [0.0, 0.3, 0.6], passes=1)
  assert rows[0]["loss"] == pytest.approx(summary["eval/loss"], rel=1e-6)
  assert rows[0]["eval_tokens"] == summary["eval/tokens"]
  assert rows[0]["experts_per_token"] == pytest.approx(2.0)  # top-2, nothing pruned
  # Softmax over 4 experts: the larger of the two chosen gates is >= 1/4 > 0.3 is not
  # guaranteed, but fewer experts survive a higher threshold and the loss moves.
  assert rows[0]["experts_per_token"] >= rows[1]["experts_per_token"] >= rows[2][
      "experts_per_token"]
  assert rows[2]["experts_per_token"] < 2.0
  assert rows[2]["loss"] != rows[0]["loss"]
  assert all(r["tokens_per_second"] > 0 for r in rows)
