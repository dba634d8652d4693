"""Tests of the record sources (simbal_jax/data/records.py): jsonl (plain, gz, zst) and parquet.

The same documents are written as text files (one per document, named by the record's id so the
split agrees) and as record files; the prepared token streams must hold the same documents.
Expected splits come from an independent sha1 computation.
"""
import gzip
import hashlib
import json
import os

import numpy as np
import pytest

from simbal_jax.data import pipeline
from simbal_jax.data import records

WORDS = "alpha beta gamma delta ünï €uro 東京 tab\tnew\nline {json} \"quote\" back\\slash".split(" ")


def _documents(n=48, seed=0):
  rng = np.random.default_rng(seed)
  return [f"doc {i}: " + " ".join(rng.choice(WORDS, size=int(rng.integers(3, 40))))
          for i in range(n)]


def _jsonl_bytes(docs, field="text"):
  lines = [json.dumps({"id": i, field: d, "url": f"u{i}"}, ensure_ascii=i % 2 == 0)
           for i, d in enumerate(docs)]
  return ("\n".join(lines) + "\n").encode("utf-8")


def _write_formats(base, docs):
  """Writes `docs` as shard.jsonl / .jsonl.gz / .jsonl.zst / .parquet and as text files."""
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  import zstandard  # pylint: disable=g-import-not-at-top
  globs = {}
  for name in ("jsonl", "gz", "zst", "parquet", "txt"):
    os.makedirs(os.path.join(base, name, "sub"), exist_ok=True)
  raw = _jsonl_bytes(docs)
  with open(os.path.join(base, "jsonl", "sub", "shard.jsonl"), "wb") as f:
    f.write(raw)
  with gzip.open(os.path.join(base, "gz", "sub", "shard.jsonl.gz"), "wb") as f:
    f.write(raw)
  half = raw.index(b"\n", len(raw) // 2) + 1  # two zstd frames, as concatenated shards have
  cctx = zstandard.ZstdCompressor()
  with open(os.path.join(base, "zst", "sub", "shard.jsonl.zst"), "wb") as f:
    f.write(cctx.compress(raw[:half]) + cctx.compress(raw[half:]))
  table = pa.table({"id": list(range(len(docs))), "text": docs})
  pq.write_table(table, os.path.join(base, "parquet", "sub", "shard.parquet"), row_group_size=7)
  for i, d in enumerate(docs):  # the text file's id (path relative to the root) = record id
    with open(os.path.join(base, "txt", "sub", f"shard:{i}"), "w", encoding="utf-8") as f:
      f.write(d)
  for name, pattern in (("jsonl", "*.jsonl"), ("gz", "*.jsonl.gz"), ("zst", "*.jsonl.zst"),
                        ("parquet", "*.parquet"), ("txt", "*")):
    globs[name] = os.path.join(base, name, "**", pattern)
  return globs


def _streams(cfg, workdir):
  ds = pipeline.make_datasets(dict(cfg, tokenizer="bytes", eval_fraction=0.25), seq_len=16,
                              batch_size=2, workdir=workdir, seed=0)
  out = ds.info["token_dir"]
  dtype = json.load(open(os.path.join(out, "meta.json")))["dtype"]
  return {s: np.fromfile(os.path.join(out, f"{s}.bin"), dtype=dtype)
          for s in ("train", "validation")}


def _docs_of(stream, eos=256):
  """Splits a byte-token stream at EOS into sorted document strings."""
  cuts = np.flatnonzero(stream == eos)
  starts = np.concatenate([[0], cuts[:-1] + 1])
  return sorted(bytes(stream[a:b].astype(np.uint8)).decode("utf-8") for a, b in zip(starts, cuts))


def _is_eval(doc_id, frac=0.25):
  return int(hashlib.sha1(doc_id.encode()).hexdigest()[:16], 16) / 2.0**64 < frac


@pytest.fixture(scope="module")
def formats(tmp_path_factory):
  base = str(tmp_path_factory.mktemp("records"))
  docs = _documents()
  return {"docs": docs, "globs": _write_formats(base, docs), "work": os.path.join(base, "work")}


def test_record_formats_give_the_text_files_token_streams(formats):
  globs, docs, work = formats["globs"], formats["docs"], formats["work"]
  text = _streams({"source": "text_files", "globs": globs["txt"]}, work)
  plain = _streams({"source": "jsonl", "globs": globs["jsonl"]}, work)
  for name in ("gz", "zst", "parquet"):
    source = "parquet" if name == "parquet" else "jsonl"
    other = _streams({"source": source, "globs": globs[name]}, work)
    for split in ("train", "validation"):  # same ids, same record order: identical streams
      np.testing.assert_array_equal(other[split], plain[split], err_msg=f"{name} {split}")
  val = sorted(d for i, d in enumerate(docs) if _is_eval(f"sub/shard:{i}"))
  train = sorted(d for i, d in enumerate(docs) if not _is_eval(f"sub/shard:{i}"))
  assert 0 < len(val) < len(docs)
  for split, expected in (("train", train), ("validation", val)):
    assert _docs_of(text[split]) == expected  # text files: same documents (order is TFDS's)
    assert _docs_of(plain[split]) == expected
  in_order = [d for i, d in enumerate(docs) if not _is_eval(f"sub/shard:{i}")]
  assert bytes(plain["train"][plain["train"] != 256].astype(np.uint8)).decode() == "".join(in_order)


def test_record_ids_ignore_location_format_and_compression(tmp_path):
  root = str(tmp_path)
  ids = {records.record_id(os.path.join(root, "a", f"s.{ext}"), root, 3)
         for ext in ("jsonl", "jsonl.gz", "jsonl.zst", "parquet")}
  assert ids == {"a/s:3"}


def test_jsonl_skips_blank_lines_and_null_text_but_counts_them(tmp_path):
  path = str(tmp_path / "x.jsonl")
  with open(path, "w") as f:
    f.write('{"text": "a"}\n\n{"text": null}\n{"text": "  "}\n{"text": "b"}\n')
  got = list(records.iter_documents("jsonl", [path], str(tmp_path), "text"))
  assert got == [("x:0", "a"), ("x:4", "b")]
  assert list(records.iter_documents("jsonl", [path], str(tmp_path), "text", max_docs=1)) == [
      ("x:0", "a")]


def test_jsonl_is_streamed(tmp_path):
  path = str(tmp_path / "x.jsonl.gz")
  with gzip.open(path, "wt") as f:
    f.write('{"text": "first"}\n{"text": "second"}\nnot json\n')
  it = records.iter_documents("jsonl", [path], str(tmp_path), "text")
  assert [next(it), next(it)] == [("x:0", "first"), ("x:1", "second")]  # before the bad line
  with pytest.raises(ValueError, match=r"x\.jsonl\.gz:3: not a line of JSON"):
    next(it)


@pytest.mark.parametrize("fmt", ["jsonl", "jsonl.zst", "parquet"])
def test_missing_text_field_names_the_file(formats, tmp_path, fmt):
  src = {"jsonl": "jsonl", "jsonl.zst": "zst", "parquet": "parquet"}[fmt]
  source = "parquet" if fmt == "parquet" else "jsonl"
  pattern = formats["globs"][src]
  with pytest.raises(ValueError, match=r"shard\.(jsonl|parquet).*(no field|no column) 'body'"):
    pipeline.make_datasets({"source": source, "globs": pattern, "text_field": "body"},
                           seq_len=8, batch_size=2, workdir=str(tmp_path), seed=0)


def test_non_text_field_and_bad_files_are_clear_errors(tmp_path):
  path = str(tmp_path / "n.jsonl")
  with open(path, "w") as f:
    f.write('{"text": ["a", "b"]}\n')
  with pytest.raises(ValueError, match=r"n\.jsonl:1: field 'text' holds list"):
    list(records.iter_documents("jsonl", [path], str(tmp_path), "text"))
  bad = str(tmp_path / "b.parquet")
  with open(bad, "wb") as f:
    f.write(b"not parquet at all")
  with pytest.raises(ValueError, match=r"b\.parquet as Parquet"):
    list(records.iter_documents("parquet", [bad], str(tmp_path), "text"))
  bad_zst = str(tmp_path / "c.jsonl.zst")
  with open(bad_zst, "wb") as f:
    f.write(b"garbage")
  with pytest.raises(ValueError, match=r"c\.jsonl\.zst"):
    list(records.iter_documents("jsonl", [bad_zst], str(tmp_path), "text"))


def test_record_corpus_texts_follow_the_split(formats):
  from simbal_jax.data import corpora  # pylint: disable=g-import-not-at-top
  docs = formats["docs"]
  cfg = pipeline.resolve_config({"source": "parquet", "globs": formats["globs"]["parquet"],
                                 "eval_fraction": 0.25, "max_docs": 30})
  corpus = corpora.record_corpus(cfg)
  val = [d for i, d in enumerate(docs[:30]) if _is_eval(f"sub/shard:{i}")]
  assert list(corpus.texts("validation")) == val  # what SentencePiece would not train on
  assert len(list(corpus.texts("train"))) == 30 - len(val)
