"""experiments/prune.py and experiments/pes.py on a tiny trained run restored from disk."""
import jax
import numpy as np
import pytest

from simbal_jax.experiments import pes as pes_tool
from simbal_jax.experiments import prune
from simbal_jax import env as env_lib
from simbal_jax import model as model_lib
from simbal_jax import train
from simbal_jax.configs import moe_m

pytestmark = pytest.mark.usefixtures("fast_compiles")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, fast_compiles):
  del fast_compiles
  from conftest import tiny_config  # pylint: disable=g-import-not-at-top
  docs = tmp_path_factory.mktemp("docs")
  for i in range(40):  # a byte-level text corpus, so lm-eval's text tasks can be tokenized
    (docs / f"doc{i}.txt").write_text(f"q{i}: a b x y zz a b a " * (5 + i % 7))
  cfg = tiny_config("simbal", steps=6)  # 4 experts, top-2
  cfg.data.update(source="text_files", globs=str(docs / "*.txt"), tokenizer="bytes",
                  eval_fraction=0.2)
  workdir = str(tmp_path_factory.mktemp("run"))
  summary, _ = train.train_and_evaluate(cfg, workdir, devices=jax.devices()[:1])
  env, state = env_lib.restore_run(workdir, devices=jax.devices()[:1])
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


_TASK_YAML = """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{label}}}}"
doc_to_choice: "{{{{choices}}}}"
metric_list:
  - metric: acc
"""


@pytest.mark.slow
def test_lm_eval_scores_a_local_multiple_choice_task(trained, tmp_path, monkeypatch):
  """lm-eval runs a task defined here on a local file through
  simbal_jax.experiments.downstream.SimbalLM; its accuracy equals an independent float64 scoring
  of every choice."""
  pytest.importorskip("lm_eval")
  import json  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import lm_eval  # pylint: disable=g-import-not-at-top
  from lm_eval.tasks import TaskManager  # pylint: disable=g-import-not-at-top
  from simbal_jax.experiments import downstream  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
  monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
  _, env, state = trained
  docs = [{"question": f"q{i}: a b", "choices": ["x y", "zz", "a b a"], "label": i % 3}
          for i in range(6)]
  data = tmp_path / "tiny_mc.jsonl"
  data.write_text("".join(json.dumps(d) + "\n" for d in docs))
  (tmp_path / "tasks").mkdir()
  (tmp_path / "tasks" / "tiny_mc.yaml").write_text(_TASK_YAML.format(data=data))
  lm = downstream.SimbalLM(env, state, batch_size=4)
  res = lm_eval.simple_evaluate(model=lm, tasks=["tiny_mc"], log_samples=False,
                                task_manager=TaskManager(include_path=str(tmp_path / "tasks")),
                                bootstrap_iters=0)
  got = res["results"]["tiny_mc"]["acc,none"]

  tok = env.datasets.tokenizer
  correct = []
  for d in docs:
    scores = []
    for choice in d["choices"]:
      ctx, cont = tok.encode(d["question"]), tok.encode(" " + choice)
      ids = np.asarray(ctx + cont, np.int32)
      logits, _ = env.model.apply({"params": state.params}, jnp.asarray(ids[None, :-1]),
                                  expert_bias=state.expert_bias)
      lg = np.asarray(logits[0], np.float64)
      lp = lg - np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1, keepdims=True)) - lg.max(
          -1, keepdims=True)
      scores.append(sum(lp[len(ctx) - 1 + j, t] for j, t in enumerate(cont)))
    correct.append(int(np.argmax(scores)) == d["label"])
  assert got == pytest.approx(np.mean(correct))
  ll = lm.score([(docs[0]["question"], " x y")])[0][0]
  assert ll < 0
