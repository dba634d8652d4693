"""Source-specific preparation: corpus -> tokenizer -> cached token streams (or synthetic rows).

Cache layout under `cache_dir`:
  tfds/<source>_<key>/simbal_text_corpus/1.0.0/   array_record splits of local text
                                                   (jsonl / parquet are streamed, not copied)
  spm/<key>.model                                  SentencePiece models
  tokens/<key>/{train,validation}.bin, meta.json   packed token streams
Every key hashes the parameters that determine the content, never where the cache lies, so a
second run reuses the files, a changed parameter prepares afresh, and a moved or copied workdir
(with its cache) still hits. The key the data iterator's checkpointed state is checked against
(`info["corpus_key"]`) is a digest of the token streams themselves (`content.json` beside them,
computed once): a resumed run is accepted exactly when it reads the same tokens.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from typing import Callable, Iterable

from etils import epath
import numpy as np

from simbal_jax import paths
from simbal_jax.data import packing
from simbal_jax.data import records
from simbal_jax.data import sources
from simbal_jax.data import tfds_builder
from simbal_jax.data import tokenizers

SPLITS = ("train", "validation")


class _Corpus:
  """Documents of both splits: `key` identifies the content, `texts(split)` iterates it.

  `tagged()` yields `(split, text)` for both splits; a source whose splits come from one pass
  over the same records gives its own, so tokenization reads them once.
  """

  def __init__(self, key: str, texts: Callable[[str], Iterable[str]], desc: str,
               tagged: Callable[[], Iterable[tuple[str, str]]] | None = None):
    self.key, self.texts, self.desc = key, texts, desc
    self._tagged = tagged

  def tagged(self) -> Iterable[tuple[str, str]]:
    if self._tagged is not None:
      yield from self._tagged()
      return
    for split in SPLITS:
      for text in self.texts(split):
        yield split, text


def _local_corpus(cfg, cache_dir) -> _Corpus:
  """stdlib / text_files through the project's TFDS builder (array_record)."""
  if cfg["source"] == "stdlib":
    files, strict, root = sources.stdlib_files(), False, sources.stdlib_dir()
  else:
    files, strict, root = sources.glob_files(cfg["globs"]), True, sources.glob_root(cfg["globs"])
  files = sources.select_files(files, int(cfg["max_docs"]), int(cfg["max_bytes"]), root=root)
  builder_dir = tfds_builder.prepare_text_corpus(
      files, eval_fraction=float(cfg["eval_fraction"]), cache_dir=cache_dir, strict=strict,
      tag=cfg["source"], root=root)
  # The builder dir's name below the cache holds the key of the files and split settings.
  key = tfds_builder.cache_key({"builder": os.path.relpath(builder_dir, cache_dir)})
  return _Corpus(key, lambda split: (t for _, t in tfds_builder.read_split(builder_dir, split)),
                 f"{cfg['source']} ({len(files)} files) at {builder_dir}")


def _record_corpus(cfg) -> _Corpus:
  """jsonl / parquet files streamed record by record (no intermediate copy of the corpus)."""
  fmt, field = cfg["source"], cfg["text_field"]
  if not field:
    raise ValueError(f"source {fmt!r} needs data.text_field (the field holding the text)")
  files, root = sources.glob_files(cfg["globs"]), sources.glob_root(cfg["globs"])
  files = sources.select_files(files, 0, int(cfg["max_bytes"]), root=root)
  max_docs, frac = int(cfg["max_docs"]), float(cfg["eval_fraction"])

  def tagged():
    for doc_id, text in records.iter_documents(fmt, files, root, field, max_docs):
      yield ("validation" if sources.is_eval_doc(doc_id, frac) else "train"), text

  def texts(split):
    return (text for name, text in tagged() if name == split)

  # Like text_files: every file's size and mtime, so a cached corpus needs no second read.
  key = tfds_builder.cache_key({
      "v": 1, "source": fmt, "files": sources.file_fingerprint(files),
      "root": paths.absolute(root), "text_field": field, "max_docs": max_docs,
      "eval_fraction": frac})
  return _Corpus(key, texts, f"{fmt} ({len(files)} files) under {root}", tagged=tagged)


def _tfds_data_source(cfg, split):
  """A random-access TFDS source for `split`; clear error when it is missing or not array_record."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  # data_dir and a builder directory may be cloud paths: TFDS reads them through etils.epath.
  name, data_dir = cfg["tfds_name"], cfg["tfds_data_dir"] or None
  builder_dir = epath.Path(name)
  has_info = (builder_dir / "dataset_info.json").exists()
  if "/" in name and not has_info and builder_dir.is_dir():
    raise ValueError(f"data.tfds_name {name!r} is a directory without dataset_info.json; give "
                     "a prepared builder directory (…/name/version) or a dataset name")
  try:
    if has_info:
      return tfds.builder_from_directory(builder_dir).as_data_source(split=split)
    return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  except Exception as e:  # tfds raises many types here; re-raise with the fix
    raise ValueError(
        f"cannot open TFDS dataset {name!r} split {split!r} (data_dir={data_dir}) as an "
        f"array_record data source: {type(e).__name__}: {str(e).splitlines()[0][:300]}. Prepare it once with "
        f"`tfds build {name.split(':')[0]} --file_format=array_record"
        f"{' --data_dir=' + data_dir if data_dir else ''}`") from e


def _tfds_corpus(cfg) -> _Corpus:
  if not cfg["tfds_name"]:
    raise ValueError("source 'tfds' needs data.tfds_name")
  max_docs, text_key = int(cfg["max_docs"]), cfg["tfds_text_key"]
  eval_split, frac = cfg["tfds_eval_split"], float(cfg["eval_fraction"])
  train_src = _tfds_data_source(cfg, cfg["tfds_train_split"])
  eval_src = _tfds_data_source(cfg, eval_split) if eval_split else None
  where = f"tfds {cfg['tfds_name']}"

  def texts(split):
    if eval_src is not None:
      src = train_src if split == "train" else eval_src
      for _, text in tfds_builder.iter_records(src, text_key, max_docs, where):
        yield text
      return
    for name, text in tagged():
      if name == split:
        yield text

  def tagged():
    for doc_id, text in tfds_builder.iter_records(train_src, text_key, max_docs, where):
      # Salted: a train split that was itself cut by the unsalted rule still gives eval docs.
      yield ("validation" if sources.is_eval_doc("tfds:" + doc_id, frac) else "train"), text

  key = tfds_builder.cache_key({
      "v": 2, "tfds": cfg["tfds_name"], "data_dir": cfg["tfds_data_dir"],
      "train": cfg["tfds_train_split"], "eval": eval_split, "text_key": text_key,
      "max_docs": max_docs, "eval_fraction": None if eval_src is not None else frac,
      "sizes": [len(train_src), len(eval_src) if eval_src is not None else 0]})
  return _Corpus(key, texts, where, tagged=None if eval_src is not None else tagged)


def _make_tokenizer(cfg, corpus: _Corpus, cache_dir: str):
  name = cfg["tokenizer"]
  if name == "bytes":
    return tokenizers.BytesTokenizer()
  if name == "cl100k":
    return tokenizers.Cl100kTokenizer()
  vocab, chars = int(cfg["sp_vocab_size"]), int(cfg["sp_train_chars"])
  key = tfds_builder.cache_key({"corpus": corpus.key, "vocab": vocab, "chars": chars, "v": 1})
  path = os.path.join(cache_dir, "spm", f"{key}.model")
  if not os.path.isfile(path):
    start = time.time()
    tokenizers.train_sentencepiece(corpus.texts("train"), path, vocab_size=vocab,
                                   max_chars=chars)
    logging.info("SentencePiece trained in %.1f s", time.time() - start)
  return tokenizers.SentencePieceTokenizer(path)


def _synthetic(cfg, seq_len):
  syn = cfg["synthetic"]
  corpus = sources.synthetic_corpus(
      num_domains=int(syn["num_domains"]), vocab_size=int(syn["vocab_size"]),
      doc_len=int(syn["doc_len"]), num_docs=int(syn["num_docs"]), seq_len=seq_len,
      seed=int(syn["seed"]))
  frac = float(cfg["eval_fraction"])
  is_eval = [sources.is_eval_doc(f"synthetic:{i}", frac) for i in corpus.seq_id]
  is_eval = np.asarray(is_eval, bool)
  tok = tokenizers.SyntheticTokenizer(int(syn["vocab_size"]))
  train = packing.RowSequences(corpus.tokens[~is_eval], corpus.domain[~is_eval])
  eval_ = packing.RowSequences(corpus.tokens[is_eval], corpus.domain[is_eval])
  key = tfds_builder.cache_key({"synthetic": dict(syn), "seq_len": seq_len, "frac": frac})
  info = {"source": "synthetic", "corpus_key": key, "num_domains": int(syn["num_domains"])}
  return tok, train, eval_, info


def content_digest(out_dir: str, splits=SPLITS) -> str:
  """BLAKE2b digest of the token streams in `out_dir` (cached in content.json once computed)."""
  path = os.path.join(out_dir, "content.json")
  try:
    with open(path) as f:
      return json.load(f)["blake2b"]
  except (OSError, ValueError, KeyError):
    pass
  h = hashlib.blake2b(digest_size=16)
  for split in splits:
    h.update(split.encode() + b"\0")
    with open(os.path.join(out_dir, f"{split}.bin"), "rb") as f:
      for block in iter(lambda: f.read(1 << 24), b""):
        h.update(block)
  digest = h.hexdigest()
  try:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
      json.dump({"blake2b": digest, "splits": list(splits)}, f)
    os.replace(tmp, path)
  except OSError as e:  # a read-only shared cache: recomputed next time
    logging.info("could not cache the token digest in %s: %s", path, e)
  return digest


def prepare(cfg: dict, *, seq_len: int, cache_dir: str):
  """Returns (tokenizer, train sequences, eval sequences, info dict) for a resolved config."""
  if cfg["source"] == "synthetic":
    return _synthetic(cfg, seq_len)
  start = time.time()
  if cfg["source"] == "tfds":
    corpus = _tfds_corpus(cfg)
  elif cfg["source"] in records.FORMATS:
    corpus = _record_corpus(cfg)
  else:
    corpus = _local_corpus(cfg, cache_dir)
  corpus_seconds = time.time() - start
  tok = _make_tokenizer(cfg, corpus, cache_dir)
  key = tfds_builder.cache_key({"corpus": corpus.key, "tokenizer": tok.fingerprint, "v": 1})
  out_dir = os.path.join(cache_dir, "tokens", key)
  meta = packing.read_meta(out_dir)
  if meta is None:
    encode = getattr(tok, "encode_array", tok.encode)
    meta = packing.write_tagged_streams(out_dir, SPLITS, corpus.tagged(), encode, tok.eos_id,
                                        tok.vocab_size,
                                        {"corpus": corpus.desc, "tokenizer": tok.fingerprint})
  train = packing.open_split(out_dir, meta, "train", seq_len)
  eval_ = packing.open_split(out_dir, meta, "validation", seq_len)
  content = tfds_builder.cache_key({"tokens": content_digest(out_dir),
                                    "tokenizer": tok.fingerprint, "v": 2})
  info = {"source": cfg["source"], "tokenizer": tok.fingerprint, "corpus": corpus.desc,
          "corpus_key": content, "corpus_seconds": round(corpus_seconds, 3),
          "tokenize_seconds": meta.get("seconds"), "splits": meta["splits"],
          "token_dir": out_dir}
  return tok, train, eval_, info
