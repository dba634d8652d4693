"""experiments/scaling.py: the paired differences by model size on hand-made convergence
workdirs, against SciPy's t-interval and a parameter count from the initialised model."""
import json
import os

import jax
import numpy as np
import pytest
import scipy.stats

from simbal_jax import model as model_lib
from simbal_jax.experiments import convergence
from simbal_jax.experiments import scaling
from tests.conftest import tiny_config


def _config(d_model):
  cfg = tiny_config("lbl", steps=10)
  cfg.model.d_model, cfg.model.vocab_size = d_model, 64
  return json.loads(cfg.to_json_best_effort())


def _write(root, method, seed, final, cfg, last_step=10):
  d = convergence.run_dir(str(root), method, seed)
  os.makedirs(d, exist_ok=True)
  with open(os.path.join(d, "config.json"), "w") as f:
    json.dump(cfg, f)
  with open(os.path.join(d, "metrics.jsonl"), "w") as f:
    f.write(json.dumps({"step": 5, "eval/loss": final + 1.0}) + "\n")
    f.write(json.dumps({"step": last_step, "eval/loss": final}) + "\n")


def _non_embedding_active(cfg):
  """From the initialised parameter shapes: everything but the embeddings, with K of E routed
  experts counted."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  mcfg = model_lib.ModelConfig.from_config(ml_collections.ConfigDict(cfg))
  shapes = jax.eval_shape(model_lib.Transformer(mcfg).init, jax.random.key(0),
                          np.zeros((1, 4), np.int32))["params"]
  total = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
    names = [p.key for p in path if hasattr(p, "key")]  # dict keys (not a box's .value)
    n = int(np.prod(leaf.value.shape if hasattr(leaf, "value") else leaf.shape))
    if names[0] in ("embedding", "lm_head"):
      continue
    if names[-1] in ("wi_gate", "wi_up", "wo") and mcfg.moe is not None and "ffn" in names and (
        len((leaf.value if hasattr(leaf, "value") else leaf).shape) == 3):
      n = n * mcfg.moe.top_k // mcfg.moe.num_experts
    total += n
  return total


def test_paired_differences_by_size(tmp_path):
  small, large = tmp_path / "s", tmp_path / "l"
  cs, cl = _config(32), _config(48)
  finals = {  # size: method: [seed 0, 1, 2]
      "s": {"simbal": [2.00, 2.10, 2.05], "lbl": [1.95, 2.00, 2.06], "lbl_micro1": [1.97, 2.02]},
      "l": {"simbal": [1.50, 1.55], "lbl": [1.52, 1.50, 1.49], "lbl_micro1": [1.51, 1.56, 1.50]},
  }
  for key, root, cfg in (("s", small, cs), ("l", large, cl)):
    for method, values in finals[key].items():
      for seed, v in enumerate(values):
        _write(root, method, seed, v, cfg)
  _write(large, "simbal", 2, 1.0, cl, last_step=5)  # unfinished: not paired
  out = str(tmp_path / "scaling")
  result = scaling.run([str(large), str(small)], "simbal", ["lbl", "lbl_micro1"], out)

  rows = result["sizes"]
  assert [r["workdir"] for r in rows] == [str(small), str(large)]  # by size
  assert [r["non_embedding_active"] for r in rows] == [_non_embedding_active(cs),
                                                       _non_embedding_active(cl)]
  for row, key in zip(rows, ("s", "l")):
    for b in ("lbl", "lbl_micro1"):
      seeds = range(min(len(finals[key]["simbal"]), len(finals[key][b])))
      diff = np.array([finals[key]["simbal"][s] - finals[key][b][s] for s in seeds])
      got = row["diff"][b]
      assert got["seeds"] == list(seeds)
      np.testing.assert_allclose(got["per_seed"], diff, atol=1e-12)
      assert got["mean"] == pytest.approx(diff.mean())
      half = scipy.stats.t.ppf(0.975, len(diff) - 1) * diff.std(ddof=1) / np.sqrt(len(diff))
      np.testing.assert_allclose(got["ci95"], [diff.mean() - half, diff.mean() + half],
                                 rtol=1e-9)
  assert rows[1]["final_loss"]["simbal"]["seeds"] == [0, 1]
  md = open(out + ".md").read()
  assert md.count("\n") == 4 and "simbal − lbl_micro1" in md
  assert f"{_non_embedding_active(cs):,}" in md.splitlines()[2]
  assert json.load(open(out + ".json"))["method"] == "simbal"
  assert os.path.getsize(out + ".png") > 0


def test_a_workdir_without_the_method_or_mixing_sizes_is_refused(tmp_path):
  _write(tmp_path / "a", "lbl", 0, 2.0, _config(32))
  with pytest.raises(ValueError, match="no finished run of 'simbal'"):
    scaling.run([str(tmp_path / "a")], "simbal", ["lbl"], str(tmp_path / "o"))
  _write(tmp_path / "a", "simbal", 0, 2.0, _config(48))
  with pytest.raises(ValueError, match="one workdir per size"):
    scaling.run([str(tmp_path / "a")], "simbal", ["lbl"], str(tmp_path / "o"))
  with pytest.raises(ValueError, match="no finished run"):
    scaling.run([str(tmp_path / "empty")], "simbal", ["lbl"], str(tmp_path / "o"))
  _write(tmp_path / "b", "lbl", 0, 2.0, _config(32))
  _write(tmp_path / "b", "simbal", 0, 2.5, _config(32))
  got = scaling.run([str(tmp_path / "b"), str(tmp_path / "empty")], "simbal", ["lbl"],
                    str(tmp_path / "o"))  # a size still running is left out, with its reason
  assert [r["workdir"] for r in got["sizes"]] == [str(tmp_path / "b")]
  assert got["left_out"] == [f"{tmp_path / 'empty'}: no finished run"]
