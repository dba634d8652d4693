"""Source-specific preparation: corpus -> tokenizer -> cached token streams (or synthetic rows).

Cache layout under `cache_dir` (one per host: every host prepares its own):
  tfds/<source>_<key>/simbal_text_corpus/1.0.0/   array_record splits of local text
                                                   (jsonl / parquet are streamed, not copied)
  spm/<key>.model                                  SentencePiece models
  tokens/<key>/{train,validation}.bin, meta.json   packed token streams
Every key hashes the parameters that determine the content, never where the cache lies, so a
second run reuses the files, a changed parameter prepares afresh, and a moved or copied workdir
(with its cache) still hits. The key the data iterator's checkpointed state is checked against
(`info["corpus_key"]`) is a digest of the token streams themselves (`content.json` beside them,
computed once): a resumed run is accepted exactly when it reads the same tokens. With several
hosts each holding its own training share (shards.py), it is the digest of the validation stream
(the same on every host) with the whole corpus's key and the number of hosts.

A corpus is planned first (corpora.py: files, this host's share, keys; nothing written), then
the disk it will take is logged, then it is written: the local array_record copy, the
tokenizer, and the token streams from the corpus's ordered chunks, tokenized in-process or by a
pool of processes (shards.py) with the same result.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import time

import numpy as np

from simbal_jax.data import corpora
from simbal_jax.data import packing
from simbal_jax.data import records
from simbal_jax.data import shards
from simbal_jax.data import sources
from simbal_jax.data import tfds_builder
from simbal_jax.data import tokenizers

SPLITS = corpora.SPLITS


def _sp_path(cfg, corpus: corpora.Corpus, cache_dir: str) -> str:
  vocab, chars = int(cfg["sp_vocab_size"]), int(cfg["sp_train_chars"])
  # v2: trained on the whole corpus's training documents in corpus order (same on every host).
  key = tfds_builder.cache_key({"corpus": corpus.union_key, "vocab": vocab, "chars": chars,
                                "v": 2})
  return os.path.join(cache_dir, "spm", f"{key}.model")


def _tokenizer(cfg, corpus: corpora.Corpus, cache_dir: str, train: bool):
  """The tokenizer; a SentencePiece model not trained yet is trained (train=True) or None."""
  name = cfg["tokenizer"]
  if name in ("bytes", "cl100k"):
    return shards.make_tokenizer((name,))
  path = _sp_path(cfg, corpus, cache_dir)
  if not os.path.isfile(path):
    if not train:
      return None
    start = time.time()
    tokenizers.train_sentencepiece(corpus.sp_texts(), path, vocab_size=int(cfg["sp_vocab_size"]),
                                   max_chars=int(cfg["sp_train_chars"]))
    logging.info("SentencePiece trained in %.1f s", time.time() - start)
  return tokenizers.SentencePieceTokenizer(path)


def _tok_spec(tok) -> tuple:
  return (tok.name, tok.model_path) if tok.name == "sentencepiece" else (tok.name,)


def _token_dir(corpus: corpora.Corpus, tok, cache_dir: str) -> str:
  key = tfds_builder.cache_key({"corpus": corpus.key, "tokenizer": tok.fingerprint, "v": 1})
  return os.path.join(cache_dir, "tokens", key)


def _disk_plan(cfg, corpus: corpora.Corpus, tok, cache_dir: str) -> dict:
  """Logs the disk this host's cache will take (see shards.log_disk_plan); {} when unknown."""
  text = corpus.text_bytes()
  if text <= 0:
    logging.info("data cache on this host: size unknown for %s (%s)", corpus.what, corpus.desc)
    return {}
  if cfg["tokenizer"] == "bytes":
    rate, measured = 1.0, True
  elif tok is not None:
    rate, measured = shards.measure_tokens_per_byte(tok, corpus.sample()), True
  else:  # SentencePiece not trained yet: every piece holds at least one byte
    rate, measured = 1.0, False
  vocab = tok.vocab_size if tok is not None else int(cfg["sp_vocab_size"])
  plan = shards.DiskPlan(text_bytes=text, copy_bytes=corpus.copy_bytes, tokens_per_byte=rate,
                         measured=measured, what=corpus.what,
                         token_bytes=np.dtype(packing.stream_dtype(vocab)).itemsize)
  return shards.log_disk_plan(plan, cache_dir)


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
  info = {"source": "synthetic", "corpus_key": key, "num_domains": int(syn["num_domains"]),
          "sharded": False}
  return tok, train, eval_, info


def content_digest(out_dir: str, splits=SPLITS) -> str:
  """BLAKE2b digest of the token streams in `out_dir` (cached in content.json once computed)."""
  path = os.path.join(out_dir, "content.json")
  try:
    with open(path) as f:
      cached = json.load(f)
    if cached.get("splits", list(SPLITS)) == list(splits):
      return cached["blake2b"]
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


def prepare(cfg: dict, *, seq_len: int, cache_dir: str, process_index: int = 0,
            process_count: int = 1, tokenizer=None):
  """Returns (tokenizer, train sequences, eval sequences, info dict) for a resolved config.

  With process_count > 1 and data.shard_hosts, the train sequences are this host's share only
  (`info["sharded"]`); the eval sequences are always the whole validation split.
  `tokenizer`: one to use instead of building or training `data.tokenizer`'s (an extra
  evaluation set read with the run's tokenizer); ignored by the synthetic source.
  """
  if cfg["source"] == "synthetic":
    return _synthetic(cfg, seq_len)
  host = corpora.Host(int(process_index), int(process_count),
              shard=int(process_count) > 1 and bool(cfg["shard_hosts"]))
  start = time.time()
  if cfg["source"] == "tfds":
    corpus = corpora.tfds_corpus(cfg, host)
  elif cfg["source"] in records.FORMATS:
    corpus = corpora.record_corpus(cfg, host)
  else:
    corpus = corpora.local_corpus(cfg, cache_dir, host)
  tok = tokenizer if tokenizer is not None else _tokenizer(cfg, corpus, cache_dir, train=False)
  meta = packing.read_meta(_token_dir(corpus, tok, cache_dir)) if tok is not None else None
  disk, workers = {}, 0
  if meta is None:
    disk = _disk_plan(cfg, corpus, tok, cache_dir)
    corpus.materialize()
  corpus_seconds = time.time() - start
  if tok is None:
    tok = _tokenizer(cfg, corpus, cache_dir, train=True)
  out_dir = _token_dir(corpus, tok, cache_dir)
  meta = packing.read_meta(out_dir)
  if meta is None:
    fingerprint = {"corpus": corpus.desc, "tokenizer": tok.fingerprint, "share": corpus.what}
    workers = shards.num_workers(cfg["prepare_workers"], corpus.text_bytes())
    chunks = corpus.chunks(workers)
    workers = min(workers, len(chunks))
    if workers > 1:
      meta = shards.write_parallel(out_dir, SPLITS, chunks, corpora.iter_chunk, _tok_spec(tok),
                                   tok.eos_id, tok.vocab_size, fingerprint, workers)
    else:
      encode = getattr(tok, "encode_array", tok.encode)
      meta = packing.write_tagged_streams(
          out_dir, SPLITS, itertools.chain.from_iterable(corpora.iter_chunk(c) for c in chunks), encode,
          tok.eos_id, tok.vocab_size, fingerprint)
  train = packing.open_split(out_dir, meta, "train", seq_len)
  eval_ = packing.open_split(out_dir, meta, "validation", seq_len)
  if corpus.sharded:  # hosts hold different training shares: what they share identifies them
    content = tfds_builder.cache_key({
        "corpus": corpus.union_key, "hosts": host.count, "tokenizer": tok.fingerprint,
        "validation": content_digest(out_dir, ("validation",)), "v": 3})
  else:
    content = tfds_builder.cache_key({"tokens": content_digest(out_dir),
                                      "tokenizer": tok.fingerprint, "v": 2})
  info = {"source": cfg["source"], "tokenizer": tok.fingerprint, "corpus": corpus.desc,
          "corpus_key": content, "corpus_seconds": round(corpus_seconds, 3),
          "tokenize_seconds": meta.get("seconds"), "splits": meta["splits"],
          "token_dir": out_dir, "sharded": corpus.sharded, "host_share": corpus.what,
          "prepare_workers": meta.get("workers", 1), **disk}
  return tok, train, eval_, info
