"""experiments/downstream.py: lm-eval scores a local task through SimbalLM on a tiny trained run
(conftest fixture `trained`), as an independent float64 scoring does."""
import inspect
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

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
  # Only the task defined here: indexing lm-eval's thousands of built-in tasks takes ~9 s.
  only_ours = ({"include_defaults": False} if "include_defaults" in inspect.signature(
      TaskManager).parameters else {})
  res = lm_eval.simple_evaluate(
      model=lm, tasks=["tiny_mc"], log_samples=False, bootstrap_iters=0,
      task_manager=TaskManager(include_path=str(tmp_path / "tasks"), **only_ours))
  got = res["results"]["tiny_mc"]["acc,none"]

  tok = env.datasets.tokenizer
  apply = jax.jit(lambda ids: env.model.apply({"params": state.params}, ids,
                                              expert_bias=state.expert_bias)[0])
  correct = []
  for d in docs:
    scores = []
    for choice in d["choices"]:
      ctx, cont = tok.encode(d["question"]), tok.encode(" " + choice)
      ids = np.asarray(ctx + cont, np.int32)
      logits = apply(jnp.asarray(ids[None, :-1]))  # one sequence, unpadded
      lg = np.asarray(logits[0], np.float64)
      lp = lg - np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1, keepdims=True)) - lg.max(
          -1, keepdims=True)
      scores.append(sum(lp[len(ctx) - 1 + j, t] for j, t in enumerate(cont)))
    correct.append(int(np.argmax(scores)) == d["label"])
  assert got == pytest.approx(np.mean(correct))
  ll = lm.score([(docs[0]["question"], " x y")])[0][0]
  assert ll < 0
