"""simbal_jax/data/corpora.py: a TFDS corpus without a held-out split is split by document id,
each record read once."""
import numpy as np

from simbal_jax.data import corpora
from simbal_jax.data import pipeline

from conftest import CORPUS_WORDS
from conftest import split_by_hash


class _CountingSource:
  """A random-access TFDS-like data source that counts record reads."""

  def __init__(self, records):
    self.records, self.reads = records, [0] * len(records)

  def __len__(self):
    return len(self.records)

  def __getitem__(self, i):
    self.reads[i] += 1
    return self.records[i]


def test_tfds_held_out_split_reads_each_record_once(monkeypatch, tmp_path):
  rng = np.random.default_rng(1)
  texts = [" ".join(rng.choice(CORPUS_WORDS, size=40)) for _ in range(60)]
  src = _CountingSource([{"id": f"doc{i}".encode(), "text": t.encode()}
                         for i, t in enumerate(texts)])
  monkeypatch.setattr(corpora, "tfds_data_source", lambda cfg, split: src)
  ds = pipeline.make_datasets({"source": "tfds", "tfds_name": "fake", "tfds_eval_split": "",
                               "eval_fraction": 0.25}, seq_len=16, batch_size=4,
                              workdir=str(tmp_path), seed=0)
  assert src.reads == [1] * len(texts)  # train and validation streams written in one pass
  val = split_by_hash({f"tfds:doc{i}" for i in range(len(texts))}, 0.25)
  val_texts = [t for i, t in enumerate(texts) if f"tfds:doc{i}" in val]
  assert ds.info["splits"]["validation"]["docs"] == len(val_texts)
  assert ds.info["splits"]["train"]["docs"] == len(texts) - len(val_texts)
  stream = b"".join(t.encode() + b"\x00" for t in val_texts)  # EOS (256) shown as 0 below
  row = ds.eval_batches(1)[0]["inputs"][0]  # the first eval sequence is the split's first
  assert bytes(np.where(row == 256, 0, row).astype(np.uint8)) == stream[:16]
