"""data/prepare.py: the token-stream digest, and a prepared corpus reused from its cache (the
same key for the same tokens, a new one when a document changes)."""

import hashlib
import json
import os

import numpy as np

from simbal_jax.configs import base
from simbal_jax.data import prepare

from conftest import write_corpus


def _data_cfg(glob_):
  cfg = base.get_config().data.to_dict()
  cfg.update(source="text_files", globs=glob_, tokenizer="bytes", eval_fraction=0.25)
  return cfg


def test_content_digest_is_blake2b_of_the_split_streams_and_cached(tmp_path):
  (tmp_path / "train.bin").write_bytes(bytes(range(200)) * 3)
  (tmp_path / "validation.bin").write_bytes(b"\x07" * 64)
  h = hashlib.blake2b(digest_size=16)
  for split, data in (("train", bytes(range(200)) * 3), ("validation", b"\x07" * 64)):
    h.update(split.encode() + b"\0" + data)
  assert prepare.content_digest(str(tmp_path)) == h.hexdigest()
  cached = json.loads((tmp_path / "content.json").read_text())
  assert cached == {"blake2b": h.hexdigest(), "splits": ["train", "validation"]}
  only = hashlib.blake2b(b"validation\0" + b"\x07" * 64, digest_size=16).hexdigest()
  assert prepare.content_digest(str(tmp_path), ("validation",)) == only  # other splits: anew


def test_prepared_corpus_is_reused_and_keyed_by_its_tokens(tmp_path):
  root = write_corpus(str(tmp_path / "txt"), num_files=12, lines=6)
  cfg, cache = _data_cfg(os.path.join(root, "*.txt")), str(tmp_path / "cache")
  tok, train, eval_, info = prepare.prepare(cfg, seq_len=32, cache_dir=cache)
  assert tok.vocab_size == 257 and info["sharded"] is False and len(train) and len(eval_)
  stream = os.path.join(info["token_dir"], "train.bin")
  mtime = os.stat(stream).st_mtime_ns
  _, train2, _, info2 = prepare.prepare(cfg, seq_len=32, cache_dir=cache)
  assert os.stat(stream).st_mtime_ns == mtime  # read from the cache, not written again
  assert info2["corpus_key"] == info["corpus_key"] and len(train2) == len(train)
  np.testing.assert_array_equal(train2.get([0, 1])[0], train.get([0, 1])[0])
  with open(os.path.join(root, "doc_000.txt"), "a", encoding="utf-8") as f:
    f.write("one more line\n")
  _, _, _, info3 = prepare.prepare(cfg, seq_len=32, cache_dir=cache)
  assert info3["corpus_key"] != info["corpus_key"]
