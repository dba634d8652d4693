"""simbal_jax/data/pipeline.py (`make_datasets`): iterator state, per-host batches, epochs, the
errors raised before training, and a quiet preparation. The data package's other modules have
their own test files (test_tokenizers, test_sources, test_records, test_corpora, test_packing,
test_tfds_builder, test_shards).

Everything runs on tiny corpora written to tmp dirs (conftest.write_corpus).
"""
import glob
import json
import os
import re

import numpy as np
import pytest

from simbal_jax.data import pipeline

from conftest import text_cfg
from conftest import write_corpus


# ---------------------------------------------------------------------------------------------
# Iterator state and per-host sharding


def test_iterator_state_round_trip(corpus):
  ds = pipeline.make_datasets(text_cfg(corpus), seq_len=16, batch_size=4,
                              workdir=corpus["workdir"], seed=5)
  it = ds.train_iter()
  first = [next(it) for _ in range(3)]
  state = json.loads(json.dumps(it.get_state()))
  expected = [next(it) for _ in range(4)]
  assert not np.array_equal(first[0]["inputs"], expected[0]["inputs"])
  resumed = pipeline.make_datasets(text_cfg(corpus), seq_len=16, batch_size=4,
                                   workdir=corpus["workdir"], seed=5).train_iter()
  resumed.set_state(state)
  for a, b in zip(expected, [next(resumed) for _ in range(4)]):
    np.testing.assert_array_equal(a["inputs"], b["inputs"])
    np.testing.assert_array_equal(a["targets"], b["targets"])
  fresh = ds.train_iter()
  np.testing.assert_array_equal(next(fresh)["inputs"], first[0]["inputs"])
  other = pipeline.make_datasets(text_cfg(corpus), seq_len=16, batch_size=4,
                                 workdir=corpus["workdir"], seed=6).train_iter()
  with pytest.raises(ValueError, match="different data pipeline"):
    other.set_state(state)


def test_primary_host_state_resumes_every_host(corpus):
  """Orbax saves the data state from process 0 only; every host restores that same state
  (here with every host holding the whole corpus: data.shard_hosts=False)."""
  cfg = text_cfg(corpus, shard_hosts=False)
  kw = dict(seq_len=16, batch_size=8, workdir=corpus["workdir"], seed=4, process_count=2)
  host0 = pipeline.make_datasets(cfg, process_index=0, **kw).train_iter()
  for _ in range(3):
    next(host0)
  state = json.loads(json.dumps(host0.get_state()))
  host1 = pipeline.make_datasets(cfg, process_index=1, **kw).train_iter()
  host1.set_state(state)  # raised "different data pipeline" when the state named the host
  # Independent reference: the single-host iterator's 4th global batch, rows [4, 8).
  glob_it = pipeline.make_datasets(cfg, **{**kw, "process_count": 1}).train_iter()
  full = [next(glob_it) for _ in range(4)][3]
  got = next(host1)
  for key in full:
    np.testing.assert_array_equal(got[key], full[key][4:])
  assert host1.get_state()["next_batch"] == 4


def test_train_epochs_cover_every_sequence(tmp_path):
  cfg = {"source": "synthetic", "synthetic": {"num_domains": 2, "vocab_size": 64,
                                              "num_docs": 64}, "eval_fraction": 0.25}
  ds = pipeline.make_datasets(cfg, seq_len=8, batch_size=2, workdir=str(tmp_path), seed=0)
  n = len(ds.train)
  it = ds.train_iter()
  rows = np.concatenate([next(it)["inputs"] for _ in range(n // 2)])
  train_rows = {bytes(r) for r in ds.train.tokens_NxW[:, :-1]}
  assert len(train_rows) == n  # random rows are distinct
  seen = [bytes(r) for r in rows]
  assert len(set(seen)) == len(seen) == (n // 2) * 2  # no repeat within the first epoch
  assert set(seen) <= train_rows


@pytest.mark.parametrize("source", ["text", "synthetic"])
def test_per_host_batches_are_disjoint_slices_of_the_global_batch(corpus, tmp_path, source):
  if source == "text":  # every host holds the whole corpus (sharded hosts: test_shards.py)
    cfg, workdir = text_cfg(corpus, shard_hosts=False), corpus["workdir"]
  else:
    cfg, workdir = {"source": "synthetic", "synthetic": {"num_docs": 256}}, str(tmp_path)
  kw = dict(seq_len=16, batch_size=8, workdir=workdir, seed=2)
  glob_it = pipeline.make_datasets(cfg, **kw).train_iter()
  hosts = [pipeline.make_datasets(cfg, process_index=p, process_count=4, **kw) for p in range(4)]
  host_its = [h.train_iter() for h in hosts]
  for _ in range(3):
    full = next(glob_it)
    parts = [next(h) for h in host_its]
    assert all(p["inputs"].shape == (2, 16) for p in parts)
    for key in full:
      np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), full[key])
    if source == "synthetic":  # random rows: any repeat would mean overlapping hosts
      assert len({bytes(r) for p in parts for r in p["inputs"]}) == 8
  evals = [h.eval_batches(1)[0]["inputs"] for h in hosts]
  np.testing.assert_array_equal(np.concatenate(evals),
                                pipeline.make_datasets(cfg, **kw).eval_batches(1)[0]["inputs"])


# ---------------------------------------------------------------------------------------------
# Errors before training


def test_error_empty_glob(tmp_path):
  pattern = str(tmp_path / "nothing" / "*.txt")
  with pytest.raises(ValueError, match=re.escape(pattern)):
    pipeline.make_datasets({"source": "text_files", "globs": pattern}, seq_len=8, batch_size=2,
                           workdir=str(tmp_path), seed=0)


@pytest.mark.parametrize("payload", [b"abc\x00def\n", b"caf\xe9 latin-1\n"])
def test_error_binary_or_undecodable_file(tmp_path, payload):
  root = write_corpus(str(tmp_path / "txt"), num_files=10)
  bad = os.path.join(root, "zz_bad.txt")
  with open(bad, "wb") as f:
    f.write(payload)
  with pytest.raises(ValueError, match=re.escape(bad)):
    pipeline.make_datasets({"source": "text_files", "globs": os.path.join(root, "*.txt")},
                           seq_len=8, batch_size=2, workdir=str(tmp_path), seed=0)
  assert not glob.glob(str(tmp_path / "data" / "tokens" / "*"))  # nothing prepared


def test_error_unknown_names(tmp_path):
  with pytest.raises(ValueError, match="stdlib, text_files, tfds, synthetic"):
    pipeline.make_datasets({"source": "c4"}, seq_len=8, batch_size=2, workdir=str(tmp_path),
                           seed=0)
  with pytest.raises(ValueError, match="bytes, sentencepiece, cl100k"):
    pipeline.make_datasets({"tokenizer": "gpt2"}, seq_len=8, batch_size=2,
                           workdir=str(tmp_path), seed=0)


def test_error_corpus_too_small_and_bad_batch(corpus, tmp_path):
  with pytest.raises(ValueError, match="fewer than one global batch"):
    pipeline.make_datasets(text_cfg(corpus), seq_len=4096, batch_size=64,
                           workdir=corpus["workdir"], seed=0)
  with pytest.raises(ValueError, match="not divisible by process_count"):
    pipeline.make_datasets(text_cfg(corpus), seq_len=8, batch_size=6,
                           workdir=corpus["workdir"], seed=0, process_count=4)
  one = write_corpus(str(tmp_path / "one"), num_files=1)
  with pytest.raises(ValueError, match="empty (validation|train) split"):
    pipeline.make_datasets({"source": "text_files", "globs": one + "/*.txt"}, seq_len=8,
                           batch_size=2, workdir=str(tmp_path), seed=0)


def test_data_modules_do_not_import_jax():
  pkg = os.path.dirname(pipeline.__file__)
  for path in glob.glob(os.path.join(pkg, "*.py")):
    with open(path, encoding="utf-8") as f:
      assert not re.search(r"^\s*(import|from)\s+(jax|flax)\b", f.read(), re.M), path


@pytest.mark.parametrize("source", ["text_files", "jsonl"])
def test_preparing_a_local_corpus_prints_nothing(corpus, tmp_path, capsys, source):
  cfg = text_cfg(corpus)
  if source == "jsonl":
    path = str(tmp_path / "c.jsonl")
    with open(path, "w", encoding="utf-8") as f:
      for name in sorted(os.listdir(corpus["root"])):
        with open(os.path.join(corpus["root"], name), encoding="utf-8") as doc:
          f.write(json.dumps({"text": doc.read()}) + "\n")
    cfg = text_cfg(corpus, source="jsonl", globs=path)
  capsys.readouterr()
  ds = pipeline.make_datasets(cfg, seq_len=16, batch_size=2, workdir=str(tmp_path / "w"), seed=0)
  ds.eval_batches(1)
  next(ds.train_iter())
  assert capsys.readouterr().out == ""  # e.g. no TFDS "Downloading and preparing dataset"
