"""experiments/pes.py on a tiny trained run restored from disk (conftest fixture `trained`)."""
import pytest

from simbal_jax.experiments import pes as pes_tool

def test_pes_exact_and_sampled(trained):
  _, env, state = trained
  e = env.mcfg.moe.num_experts
  rows = pes_tool.pes_rows(env, state, num_tokens=64, num_pairs=e * (e - 1) // 2)
  assert [r["layer"] for r in rows] == [0, 1]
  for r in rows:
    assert -1.0 <= r["exact"] <= 1.0
    assert r["exact_ci95"][0] < r["exact"] < r["exact_ci95"][1]
    # every pair of every sampled token: the sampled estimator is the exact value
    assert r["sampled"] == pytest.approx(r["exact"], abs=1e-5)
    assert r["exact_seconds"] > 0 and r["sampled_seconds"] > 0
