"""experiments/prune.py and experiments/pes.py on a tiny trained run restored from disk."""
import jax
import numpy as np
import pytest

from experiments import pes as pes_tool
from experiments import prune
from simbal_jax import model as model_lib
from simbal_jax import train
from simbal_jax.configs import moe_m

pytestmark = pytest.mark.usefixtures("fast_compiles")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, fast_compiles):
  del fast_compiles
  from test_train import tiny_config  # pylint: disable=g-import-not-at-top
  cfg = tiny_config("simbal", steps=6)
  cfg.moe.num_experts, cfg.moe.top_k = 4, 2
  workdir = str(tmp_path_factory.mktemp("run"))
  summary, _ = train.train_and_evaluate(cfg, workdir, devices=jax.devices()[:1])
  env, state = train.restore_run(workdir, devices=jax.devices()[:1])
  return summary, env, state


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


def test_count_params_takes_the_experiment_config():
  """count_params / flops_per_token accept the experiment config (auto routing groups, the
  paper's cl100k vocabulary); MoE-M is the paper's 230M active / 627M total within 0.2 %."""
  counts = model_lib.count_params(moe_m.get_config())
  assert abs(counts["total"] / 627e6 - 1) < 2e-3 and abs(counts["active"] / 230e6 - 1) < 2e-3
  mcfg = model_lib.ModelConfig.from_config(moe_m.get_config())
  assert mcfg.moe.num_groups == 1  # auto (0) counts as one group outside the trainer
  assert model_lib.flops_per_token(moe_m.get_config(), 2048) == model_lib.flops_per_token(
      mcfg, 2048)
  cfg = moe_m.get_config()
  cfg.model.vocab_size = 0
  with pytest.raises(ValueError, match="model.vocab_size"):
    model_lib.count_params(cfg)
