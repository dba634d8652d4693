"""simbal_jax/data/tfds_builder.py: local text files -> cached array_record train/validation
splits, deterministic and disjoint by document (the split from an independent sha1)."""
import os

import numpy as np
import pytest

from simbal_jax.data import pipeline
from simbal_jax.data import sources
from simbal_jax.data import tfds_builder

from conftest import split_by_hash
from conftest import text_cfg


def test_text_files_split_is_deterministic_and_disjoint(corpus):
  files = sources.glob_files(corpus["glob"])
  assert len(files) == 40
  d1 = tfds_builder.prepare_text_corpus(files, eval_fraction=0.25, cache_dir=corpus["workdir"],
                                        strict=True, tag="text_files")
  d2 = tfds_builder.prepare_text_corpus(files, eval_fraction=0.25, cache_dir=corpus["workdir"],
                                        strict=True, tag="text_files")
  assert d1 == d2  # cached, same directory
  train = {i for i, _ in tfds_builder.read_split(d1, "train")}
  val = {i for i, _ in tfds_builder.read_split(d1, "validation")}
  names = {os.path.basename(f) for f in files}  # ids are paths relative to the glob's root
  assert not train & val and train | val == names
  assert val == split_by_hash(names, 0.25) and 0 < len(val) < len(files)


def test_cached_corpus_is_not_read_again(corpus, tmp_path, monkeypatch):
  files = sources.glob_files(corpus["glob"])
  kw = dict(eval_fraction=0.25, cache_dir=str(tmp_path), strict=True, tag="text_files")
  tfds_builder.prepare_text_corpus(files, **kw)
  reads = []
  real = sources.read_text
  monkeypatch.setattr(sources, "read_text", lambda *a, **k: reads.append(a) or real(*a, **k))
  tfds_builder.prepare_text_corpus(files, **kw)
  assert not reads  # the cache key already covers every file's size and mtime


def test_tfds_source_reads_prepared_array_record(corpus):
  files = sources.glob_files(corpus["glob"])
  data_dir = os.path.dirname(os.path.dirname(tfds_builder.prepare_text_corpus(
      files, eval_fraction=0.25, cache_dir=corpus["workdir"], strict=True, tag="text_files")))
  by_name = pipeline.make_datasets(
      {"source": "tfds", "tfds_name": "simbal_text_corpus", "tfds_data_dir": data_dir},
      seq_len=32, batch_size=4, workdir=corpus["workdir"], seed=0)
  local = pipeline.make_datasets(text_cfg(corpus), seq_len=32, batch_size=4,
                                 workdir=corpus["workdir"], seed=0)
  assert by_name.info["splits"] == local.info["splits"]
  np.testing.assert_array_equal(by_name.eval_batches(1)[0]["inputs"],
                                local.eval_batches(1)[0]["inputs"])
  with pytest.raises(ValueError, match="tfds build no_such_dataset_xyz --file_format=array_record"):
    pipeline.make_datasets({"source": "tfds", "tfds_name": "no_such_dataset_xyz",
                            "tfds_data_dir": data_dir}, seq_len=32, batch_size=4,
                           workdir=corpus["workdir"], seed=0)
