"""Data at scale (simbal_jax/data/shards.py, corpora.py): hosts tokenize disjoint shares of the
files that together are exactly one host's corpus, a pool of tokenizer processes writes the
in-process token streams, every host holds the same validation split, and the disk the cache
takes is logged before anything is written.

The corpora are tiny files in tmp dirs whose documents name their file, so every document's
origin is known; the references are the single-process preparation and hand counts.
"""
import gzip
import json
import logging
import os

import numpy as np
import pytest

from simbal_jax.data import pipeline
from simbal_jax.data import shards

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
EOS = 256  # the bytes tokenizer's


def _text_corpus(root, n=24, seed=0):
  """n text files of varied size (documents begin with their file's name)."""
  rng = np.random.default_rng(seed)
  os.makedirs(root)
  for i in range(n):
    body = " ".join(rng.choice(WORDS, size=int(rng.integers(20, 400))))
    with open(os.path.join(root, f"doc_{i:02d}.txt"), "w", encoding="utf-8") as f:
      f.write(f"file doc_{i:02d}: {body}\n")
  return {"source": "text_files", "globs": os.path.join(root, "*.txt"), "eval_fraction": 0.25}


def _jsonl_corpus(root, n=6, per=20, seed=0):
  """n JSON Lines files (every other one gzipped) of `per` records naming their file."""
  rng = np.random.default_rng(seed)
  os.makedirs(root)
  for k in range(n):
    lines = [json.dumps({"text": f"file shard_{k}: record {j} "
                                 + " ".join(rng.choice(WORDS, size=int(rng.integers(5, 60))))})
             for j in range(per)]
    data = ("\n".join(lines) + "\n").encode()
    name = os.path.join(root, f"shard_{k}.jsonl" + (".gz" if k % 2 else ""))
    with (gzip.open(name, "wb") if k % 2 else open(name, "wb")) as f:
      f.write(data)
  return {"source": "jsonl", "globs": os.path.join(root, "*.jsonl*"), "eval_fraction": 0.25}


def _corpus(tmp_path, source):
  return (_text_corpus if source == "text_files" else _jsonl_corpus)(str(tmp_path / "corpus"))


def _make(cfg, workdir, **kw):
  return pipeline.make_datasets(cfg, seq_len=16, batch_size=kw.pop("batch_size", 4),
                                workdir=str(workdir), seed=kw.pop("seed", 0), **kw)


def _streams(ds):
  out = ds.info["token_dir"]
  with open(os.path.join(out, "meta.json")) as f:
    dtype = json.load(f)["dtype"]
  return {s: np.fromfile(os.path.join(out, f"{s}.bin"), dtype=dtype)
          for s in ("train", "validation")}


def _docs(stream):
  """The documents of a bytes-token stream (split at EOS), in order."""
  cuts = np.flatnonzero(stream == EOS)
  starts = np.concatenate([[0], cuts[:-1] + 1])
  return [bytes(stream[a:b].astype(np.uint8)).decode() for a, b in zip(starts, cuts)]


def _file_of(doc):
  return doc.split(":", 1)[0][len("file "):]


def test_host_share_hand_cases():
  share = lambda n, sizes, count: [shards.host_share(n, sizes, p, count, "files")
                                   for p in range(count)]
  assert share(4, [10, 10, 10, 10], 2) == [(0, 2), (2, 4)]
  assert share(4, [100, 1, 1, 1], 2) == [(0, 1), (1, 4)]  # byte-balanced, not file-balanced
  # One huge last file: the cuts fall on it, but every host keeps at least one file.
  assert share(7, [1, 1, 1, 1, 1, 1, 100], 3) == [(0, 5), (5, 6), (6, 7)]
  assert share(10, None, 3) == [(0, 3), (3, 6), (6, 10)]  # equal sizes (TFDS records)
  assert share(3, [5, 5, 5], 1) == [(0, 3)]
  with pytest.raises(ValueError, match="data.shard_hosts: 2 jsonl files for 3 hosts"):
    shards.host_share(2, [1, 1], 0, 3, "jsonl files")


@pytest.mark.parametrize("source", ["text_files", "jsonl"])
def test_two_hosts_cover_the_corpus_disjointly_with_one_validation_split(tmp_path, source):
  cfg = _corpus(tmp_path, source)
  single = _make(cfg, tmp_path / "single")
  hosts = [_make(cfg, tmp_path / f"host{p}", process_index=p, process_count=2) for p in (0, 1)]
  one, parts = _streams(single), [_streams(h) for h in hosts]
  train = [_docs(p["train"]) for p in parts]
  assert all(train) and not set(train[0]) & set(train[1])
  assert sorted(train[0] + train[1]) == sorted(_docs(one["train"]))  # exactly the union
  files = [{_file_of(d) for d in docs} for docs in train]
  assert not files[0] & files[1]  # each host read its own files for training
  assert files[0] | files[1] == {_file_of(d) for d in _docs(one["train"])}
  if source == "jsonl":  # contiguous runs of the sorted files: the streams concatenate
    np.testing.assert_array_equal(np.concatenate([p["train"] for p in parts]), one["train"])
  for p in parts:  # the same held-out documents on every host, in the same order
    np.testing.assert_array_equal(p["validation"], one["validation"])
  assert [h.info["sharded"] for h in hosts] == [True, True] and not single.info["sharded"]
  assert hosts[0].info["corpus_key"] == hosts[1].info["corpus_key"] != single.info["corpus_key"]


@pytest.mark.parametrize("source", ["text_files", "jsonl"])
def test_a_pool_of_workers_writes_the_in_process_streams(tmp_path, monkeypatch, source):
  """text_files: ranges of array_record records per worker; jsonl: a file per worker."""
  monkeypatch.setattr(shards, "BYTES_PER_WORKER", 1)  # a pool even for a tiny corpus
  cfg = _corpus(tmp_path, source)
  inline = _make(dict(cfg, prepare_workers=1), tmp_path / "inline")
  pooled = _make(dict(cfg, prepare_workers=2), tmp_path / "pooled")
  assert (inline.info["prepare_workers"], pooled.info["prepare_workers"]) == (1, 2)
  for split in ("train", "validation"):
    np.testing.assert_array_equal(_streams(pooled)[split], _streams(inline)[split])
  assert pooled.info["corpus_key"] == inline.info["corpus_key"]
  assert sorted(os.listdir(pooled.info["token_dir"])) == [
      "content.json", "meta.json", "train.bin", "validation.bin"]  # no parts or temporaries


def test_sharded_hosts_batch_their_own_share_and_resume_from_the_primary_state(tmp_path):
  cfg = _corpus(tmp_path, "text_files")
  kw = dict(batch_size=8, seed=3, process_count=2)
  hosts = [_make(cfg, tmp_path / f"h{p}", process_index=p, **kw) for p in (0, 1)]
  own = [{bytes(r) for r in h.train.get(np.arange(len(h.train)))[0][:, :-1]} for h in hosts]
  its = [h.train_iter() for h in hosts]
  for _ in range(3):
    for p, it in enumerate(its):
      batch = next(it)
      assert batch["inputs"].shape == (4, 16)
      assert {bytes(r) for r in batch["inputs"]} <= own[p]  # only this host's share
  state = json.loads(json.dumps(its[0].get_state()))  # Orbax keeps the primary's state
  resumed = hosts[1].train_iter()
  resumed.set_state(state)
  np.testing.assert_array_equal(next(resumed)["inputs"], next(its[1])["inputs"])
  single = _make(cfg, tmp_path / "one", batch_size=8, seed=3)
  with pytest.raises(ValueError, match="different data pipeline"):
    hosts[1].train_iter().set_state(single.train_iter().get_state())
  evals = np.concatenate([h.eval_batches(1)[0]["inputs"] for h in hosts])
  np.testing.assert_array_equal(evals, single.eval_batches(1)[0]["inputs"])


def _messages(caplog, text):
  return [(i, r) for i, r in enumerate(caplog.records) if text in r.getMessage()]


def test_disk_estimate_is_logged_before_preparing(tmp_path, caplog, monkeypatch):
  cfg = _corpus(tmp_path, "text_files")
  files = sorted(os.listdir(tmp_path / "corpus"))
  total = sum(os.path.getsize(tmp_path / "corpus" / f) for f in files)
  with caplog.at_level(logging.INFO):
    ds = _make(cfg, tmp_path / "w")
  (i, record), = _messages(caplog, "data cache on this host")
  (j, _), = _messages(caplog, "prepared text_files")  # the array_record copy, written after
  assert i < j and record.levelno == logging.INFO and "free in" in record.getMessage()
  # Bytes: one token per byte at 2 bytes each, plus the array_record copy of the text.
  assert ds.info["disk_estimate_bytes"] == 3 * total
  written = sum(os.path.getsize(os.path.join(ds.info["token_dir"], f"{s}.bin"))
                for s in ("train", "validation"))
  assert written == 2 * (total + len(files))  # every byte and one EOS per file, 2 bytes each
  caplog.clear()
  with caplog.at_level(logging.INFO):
    _make(cfg, tmp_path / "w")
  assert not _messages(caplog, "data cache on this host")  # cached: nothing to estimate
  monkeypatch.setattr(shards, "free_bytes", lambda path: 1000)
  with caplog.at_level(logging.INFO):
    _make(cfg, tmp_path / "small_disk")
  (_, warning), = _messages(caplog, "does NOT fit")
  assert warning.levelno == logging.WARNING


def test_disk_estimate_of_compressed_records_with_cl100k(tmp_path, caplog):
  """The measured text-per-file-byte ratio (gzip included) and tokens per byte give an
  estimate near what is written (cl100k: 4 bytes a token)."""
  cfg = dict(_corpus(tmp_path, "jsonl"), tokenizer="cl100k")
  with caplog.at_level(logging.INFO):
    ds = _make(cfg, tmp_path / "w")
  (_, record), = _messages(caplog, "data cache on this host")
  assert "tokens/byte measured on a sample, 4 bytes/token" in record.getMessage()
  written = sum(os.path.getsize(os.path.join(ds.info["token_dir"], f"{s}.bin"))
                for s in ("train", "validation"))
  assert 0.7 < ds.info["disk_estimate_bytes"] / written < 1.3


@pytest.mark.parametrize("eval_split", ["validation", ""])
def test_tfds_hosts_share_the_training_records(tmp_path, eval_split):
  """A prepared TFDS dataset: each host tokenizes a contiguous run of the training records;
  the validation split (a named one, or the records held out by hash) is every host's."""
  from simbal_jax.data import sources  # pylint: disable=g-import-not-at-top
  from simbal_jax.data import tfds_builder  # pylint: disable=g-import-not-at-top
  text = _corpus(tmp_path, "text_files")
  builder_dir = tfds_builder.prepare_text_corpus(
      sources.glob_files(text["globs"]), eval_fraction=0.25, cache_dir=str(tmp_path / "tfds"),
      strict=True, tag="t")
  cfg = {"source": "tfds", "tfds_name": builder_dir, "tfds_eval_split": eval_split,
         "eval_fraction": 0.25}
  single = _streams(_make(cfg, tmp_path / "single"))
  hosts = [_make(cfg, tmp_path / f"h{p}", process_index=p, process_count=2) for p in (0, 1)]
  parts = [_streams(h) for h in hosts]
  np.testing.assert_array_equal(np.concatenate([p["train"] for p in parts]), single["train"])
  assert all(len(_docs(p["train"])) for p in parts)
  for p in parts:
    np.testing.assert_array_equal(p["validation"], single["validation"])
  assert "training records 1-" in hosts[0].info["host_share"]


def test_a_worker_error_names_the_file_and_leaves_nothing_behind(tmp_path, monkeypatch):
  monkeypatch.setattr(shards, "BYTES_PER_WORKER", 1)
  cfg = _corpus(tmp_path, "jsonl")
  bad = tmp_path / "corpus" / "shard_3.jsonl.gz"
  with gzip.open(bad, "ab") as f:  # a line that is not JSON, at the end of one file
    f.write(b"not json\n")
  with pytest.raises(ValueError, match=r"shard_3\.jsonl\.gz:21: not a line of JSON"):
    _make(dict(cfg, prepare_workers=2), tmp_path / "w")
  tokens = tmp_path / "w" / "data" / "tokens"
  assert [os.listdir(tokens / d) for d in os.listdir(tokens)] == [[]]  # no parts, no streams
