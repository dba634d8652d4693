"""simbal_jax/data/sources.py: the split does not depend on where the corpus or the Python
install lives; the stdlib corpus; the synthetic domains' transitions and packed documents."""
import os
import re

import numpy as np

from simbal_jax.data import pipeline
from simbal_jax.data import sources
from simbal_jax.data import tfds_builder

from conftest import split_by_hash
from conftest import text_cfg


def _copy_tree(files, src_root, dst_root):
  for f in files:
    dst = os.path.join(dst_root, os.path.relpath(f, src_root))
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    with open(f, "rb") as a, open(dst, "wb") as b:
      b.write(a.read())


def test_split_does_not_depend_on_the_corpus_location(corpus, tmp_path):
  files = sources.glob_files(corpus["glob"])
  roots = [str(tmp_path / "a" / "txt"), str(tmp_path / "b" / "deeper" / "copy")]
  splits, evals = [], []
  for root in roots:
    _copy_tree(files, corpus["root"], os.path.join(root, "sub"))
    pattern = os.path.join(root, "**", "*.txt")
    assert sources.glob_root(pattern) == root
    ds = pipeline.make_datasets(text_cfg(corpus, globs=pattern), seq_len=16, batch_size=4,
                                workdir=str(tmp_path / "work"), seed=0)
    builder_dir = ds.info["corpus"].split(" at ")[-1]
    splits.append({i for i, _ in tfds_builder.read_split(builder_dir, "validation")})
    evals.append(ds.eval_batches(2))
  expected = split_by_hash({"sub/" + os.path.basename(f) for f in files}, 0.25)
  assert splits[0] == splits[1] == expected
  for a, b in zip(*evals):
    np.testing.assert_array_equal(a["inputs"], b["inputs"])


def test_stdlib_split_and_subset_do_not_depend_on_the_install_path(monkeypatch, tmp_path):
  stdlib = sources.stdlib_dir()
  files = [f for f in sources.stdlib_files() if 2000 < os.path.getsize(f) < 6000][:40]
  infos = []
  for name in ("py_a", "opt/py_b"):
    root = str(tmp_path / name / "lib")
    _copy_tree(files, stdlib, root)
    monkeypatch.setattr(sources, "stdlib_dir", lambda root=root: root)
    chosen = sources.select_files(sources.stdlib_files(), 25, 0, root=root)
    ds = pipeline.make_datasets({"source": "stdlib", "max_docs": 25, "eval_fraction": 0.3},
                                seq_len=8, batch_size=2, workdir=str(tmp_path / "w"), seed=0)
    infos.append(([os.path.relpath(f, root) for f in chosen], ds.info["splits"]))
  assert infos[0] == infos[1]
  assert len(infos[0][0]) == 25 and min(s["docs"] for s in infos[0][1].values()) > 0
  assert sources.doc_id(os.path.join(stdlib, "json", "decoder.py"), stdlib) == "json/decoder.py"


def test_stdlib_small_corpus(tmp_path):
  files = sources.stdlib_files()
  assert files == sorted(files) and any(f.endswith(os.sep + "os.py") for f in files)
  assert not any("site-packages" in f for f in files)
  ds = pipeline.make_datasets({"source": "stdlib", "max_docs": 30, "eval_fraction": 0.2},
                              seq_len=64, batch_size=8, workdir=str(tmp_path), seed=3)
  assert ds.info["splits"]["train"]["docs"] + ds.info["splits"]["validation"]["docs"] <= 30
  batch = next(ds.train_iter())
  assert batch["inputs"].shape == (8, 64)
  text = ds.tokenizer.decode(batch["inputs"].ravel())
  assert re.search(r"\b(def|import|return|class|if)\b", text)


def _tv_distance(counts_a, counts_b):
  """Mean total-variation distance between row-normalised transition counts (shared rows)."""
  rows = (counts_a.sum(1) > 20) & (counts_b.sum(1) > 20)
  pa = counts_a[rows] / counts_a[rows].sum(1, keepdims=True)
  pb = counts_b[rows] / counts_b[rows].sum(1, keepdims=True)
  return 0.5 * np.abs(pa - pb).sum(1).mean()


def test_synthetic_domains_have_distinct_transitions(tmp_path):
  v = 32
  cfg = {"source": "synthetic", "eval_fraction": 0.1,
         "synthetic": {"num_domains": 3, "vocab_size": v, "num_docs": 600}}
  ds = pipeline.make_datasets(cfg, seq_len=64, batch_size=16, workdir=str(tmp_path), seed=0)
  assert ds.vocab_size == v + 1
  it = ds.train_iter()
  batches = [next(it) for _ in range(30)]
  counts = np.zeros((3, 2, v, v))  # [domain, half, from, to]
  for n, b in enumerate(batches):
    assert b["domain"].shape == (16,) and b["domain"].dtype == np.int32
    assert set(b["domain"].tolist()) <= {0, 1, 2}
    for row, d in zip(np.concatenate([b["inputs"], b["targets"][:, -1:]], 1), b["domain"]):
      np.add.at(counts[d, n % 2], (row[:-1], row[1:]), 1)
  within = max(_tv_distance(counts[d, 0], counts[d, 1]) for d in range(3))
  between = min(_tv_distance(counts[a].sum(0), counts[b].sum(0))
                for a in range(3) for b in range(a + 1, 3))
  assert between > 0.8 and within < 0.3, (between, within)
  assert "domain" in ds.eval_batches(1)[0]


def test_synthetic_packed_documents_keep_one_domain(tmp_path):
  cfg = {"source": "synthetic", "synthetic": {"num_domains": 2, "vocab_size": 16,
                                              "doc_len": 10, "num_docs": 400}}
  ds = pipeline.make_datasets(cfg, seq_len=32, batch_size=4, workdir=str(tmp_path), seed=0)
  b = next(ds.train_iter())
  eos_cols = np.nonzero((b["inputs"] == 16).all(0))[0]
  np.testing.assert_array_equal(eos_cols, [10, 21])  # doc_len tokens, then EOS, repeated
