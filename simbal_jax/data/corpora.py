"""Corpora planned for one host: its documents as an ordered list of chunks, nothing written.

A corpus (`Corpus`) knows its files or records, this host's share of them (shards.py), the
keys of its content, the text it will tokenize (for the disk estimate) and how to list its
chunks: `iter_chunk(spec)` yields a chunk's `(split, text)` documents, and the chunks in order
are the host's documents in stream order, however many there are, so a pool of processes
tokenizing them gives the in-process token streams. Sources: `local_corpus` (stdlib /
text_files, through the project's TFDS builder: an array_record copy, written by
`materialize`), `record_corpus` (jsonl / parquet, streamed) and `tfds_corpus` (a prepared
TFDS dataset).
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import os
from typing import Callable, Iterable

from etils import epath

from simbal_jax.runio import paths
from simbal_jax.data import records
from simbal_jax.data import shards
from simbal_jax.data import sources
from simbal_jax.data import tfds_builder

SPLITS = ("train", "validation")
_SAMPLE_BYTES = 1 << 20  # text tokenized to measure tokens per byte for the disk estimate
_TFDS_KEYS = ("tfds_name", "tfds_data_dir", "tfds_text_key", "max_docs", "eval_fraction")


@dataclasses.dataclass(frozen=True)
class Host:
  index: int = 0
  count: int = 1
  shard: bool = False  # this host tokenizes only its training share (several hosts)


@dataclasses.dataclass
class Corpus:
  """One host's documents of both splits, planned (nothing is written until `materialize`).

  `chunks(workers)` lists picklable chunk specs; `iter_chunk` over them, in order, yields the
  host's `(split, text)` documents, whatever the number of chunks. `sp_texts()` yields the
  WHOLE corpus's training documents in order (the SentencePiece sample: the same on every host).
  """
  key: str                       # this host's content (cache key of its token streams)
  union_key: str                 # the whole corpus, the same on every host
  desc: str
  chunks: Callable[[int], list]
  sp_texts: Callable[[], Iterable[str]]
  text_bytes: Callable[[], float]  # UTF-8 text this host tokenizes (estimate; 0: unknown)
  sample: Callable[[], list]       # a few of the host's texts (tokens per byte)
  what: str = "the whole corpus"
  sharded: bool = False
  copy_bytes: float = 0.0
  materialize: Callable[[], None] = lambda: None

  def tagged(self) -> Iterable[tuple[str, str]]:
    return itertools.chain.from_iterable(iter_chunk(c) for c in self.chunks(1))

  def texts(self, split: str) -> Iterable[str]:
    return (text for name, text in self.tagged() if name == split)


def _ranges(n: int, pieces: int, start: int = 0):
  """[lo, hi) ranges cutting [start, start + n) into at most `pieces` runs."""
  step = max(1, math.ceil(n / max(1, pieces)))
  return [(lo, min(lo + step, start + n)) for lo in range(start, start + n, step)]


def _first_texts(texts: Iterable[str | None], max_bytes: int = _SAMPLE_BYTES) -> list[str]:
  out, size = [], 0
  for t in texts:
    if t and size < max_bytes:
      out.append(t)
      size += len(t.encode("utf-8"))
    if size >= max_bytes:
      break
  return out


def iter_chunk(spec) -> Iterable[tuple[str, str]]:
  """The `(split, text)` documents of one chunk spec (module level: workers import it)."""
  kind = spec[0]
  if kind == "builder":  # records [lo, hi) of one split of the local array_record copy
    _, builder_dir, split, lo, hi = spec
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    src = tfds.builder_from_directory(builder_dir).as_data_source(split=split)
    for _, text in tfds_builder.iter_records(src, "text", 0, builder_dir, lo, hi):
      yield split, text
  elif kind == "records":  # one record file; eval_only: a file of another host's share
    _, fmt, path, root, field, frac, eval_only = spec
    keep = (lambda i: sources.is_eval_doc(i, frac)) if eval_only else None
    for doc_id, text in records.iter_file_documents(fmt, path, root, field, keep):
      yield ("validation" if sources.is_eval_doc(doc_id, frac) else "train"), text
  elif kind == "records_head":  # the first max_docs documents of the files
    _, fmt, files, root, field, frac, max_docs = spec
    for doc_id, text in records.iter_documents(fmt, list(files), root, field, max_docs):
      yield ("validation" if sources.is_eval_doc(doc_id, frac) else "train"), text
  elif kind == "tfds":  # records [lo, hi) of a named split, all in `role`
    _, cfg, role, split, lo, hi = spec
    src = tfds_data_source(cfg, split)
    for _, text in tfds_builder.iter_records(src, cfg["tfds_text_key"], int(cfg["max_docs"]),
                                             f"tfds {cfg['tfds_name']}", lo, hi):
      yield role, text
  elif kind == "tfds_heldout":  # records [lo, hi) of the train split, held out by hash
    _, cfg, split, lo, hi, eval_only = spec
    src, frac = tfds_data_source(cfg, split), float(cfg["eval_fraction"])
    for doc_id, text in tfds_builder.iter_records(src, cfg["tfds_text_key"], int(cfg["max_docs"]),
                                                  f"tfds {cfg['tfds_name']}", lo, hi):
      # Salted: a train split that was itself cut by the unsalted rule still gives eval docs.
      held_out = sources.is_eval_doc("tfds:" + doc_id, frac)
      if held_out or not eval_only:
        yield ("validation" if held_out else "train"), text
  else:
    raise ValueError(f"unknown chunk kind {kind!r}")


def local_corpus(cfg, cache_dir, host: Host) -> Corpus:
  """stdlib / text_files through the project's TFDS builder (array_record)."""
  if cfg["source"] == "stdlib":
    files, strict, root = sources.stdlib_files(), False, sources.stdlib_dir()
  else:
    files, strict, root = sources.glob_files(cfg["globs"]), True, sources.glob_root(cfg["globs"])
  files = sources.select_files(files, int(cfg["max_docs"]), int(cfg["max_bytes"]), root=root)
  frac = float(cfg["eval_fraction"])
  ids = [sources.doc_id(f, root) for f in files]
  held_out = [sources.is_eval_doc(i, frac) for i in ids]
  sizes = [sources.file_size(f) for f in files]
  union_key = tfds_builder.cache_key({"v": 1, "source": cfg["source"], "strict": strict,
                                      "docs": list(zip(ids, sizes)), "eval_fraction": frac})
  host_files, what = files, f"all {len(files)} files"
  if host.shard:
    train = [i for i, e in enumerate(held_out) if not e]
    a, b = shards.host_share(len(train), [sizes[i] for i in train], host.index, host.count,
                             f"{cfg['source']} training files")
    mine = set(train[a:b]) | {i for i, e in enumerate(held_out) if e}
    host_files = [f for i, f in enumerate(files) if i in mine]
    what = (f"training files {a + 1}-{b} of {len(train)} (host {host.index} of {host.count}) "
            f"and all {len(files) - len(train)} validation files")
  kw = dict(eval_fraction=frac, cache_dir=cache_dir, strict=strict, tag=cfg["source"], root=root)
  builder_dir = tfds_builder.text_corpus_dir(host_files, **kw)
  # The builder dir's name below the cache holds the key of the files and split settings.
  key = tfds_builder.cache_key({"builder": os.path.relpath(builder_dir, cache_dir)})

  def chunks(workers):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    builder = tfds.builder_from_directory(builder_dir)
    out = []
    for split in SPLITS:
      n = len(builder.as_data_source(split=split))
      out += [("builder", builder_dir, split, lo, hi)
              for lo, hi in _ranges(n, 1 if workers <= 1 else 4 * workers)]
    return out

  def sp_texts():
    for f, e in zip(files, held_out):
      text = None if e else sources.read_text(f, strict=strict)
      if text and text.strip():
        yield text

  chosen = set(host_files)
  host_bytes = float(sum(s for f, s in zip(files, sizes) if f in chosen))
  return Corpus(
      key, union_key, f"{cfg['source']} ({len(host_files)} files) at {builder_dir}", chunks,
      sp_texts, lambda: host_bytes,
      lambda: _first_texts(sources.read_text(f, strict=False) for f in host_files), what,
      host.shard, copy_bytes=host_bytes,
      materialize=lambda: tfds_builder.prepare_text_corpus(host_files, **kw))


def record_corpus(cfg, host: Host = Host()) -> Corpus:
  """jsonl / parquet files streamed record by record (no intermediate copy of the corpus)."""
  fmt, field = cfg["source"], cfg["text_field"]
  if not field:
    raise ValueError(f"source {fmt!r} needs data.text_field (the field holding the text)")
  files, root = sources.glob_files(cfg["globs"]), sources.glob_root(cfg["globs"])
  files = sources.select_files(files, 0, int(cfg["max_bytes"]), root=root)
  max_docs, frac = int(cfg["max_docs"]), float(cfg["eval_fraction"])
  sizes = [sources.file_size(f) for f in files]
  # Like text_files: every file's size and mtime, so a cached corpus needs no second read.
  payload = {"v": 1, "source": fmt, "files": sources.file_fingerprint(files),
             "root": paths.absolute(root), "text_field": field, "max_docs": max_docs,
             "eval_fraction": frac}
  union_key = tfds_builder.cache_key(
      {"v": 1, "source": fmt, "docs": [(sources.doc_id(f, root), s) for f, s in zip(files, sizes)],
       "text_field": field, "max_docs": max_docs, "eval_fraction": frac})
  a, b, what, shard = 0, len(files), f"all {len(files)} files", host.shard
  if shard and max_docs:
    logging.info("data.max_docs=%d: every host prepares the same first documents (the files "
                 "are not shared out among hosts)", max_docs)
    shard = False
  if shard:
    a, b = shards.host_share(len(files), sizes, host.index, host.count, f"{fmt} files")
    payload["hosts"] = [host.index, host.count]
    what = (f"files {a + 1}-{b} of {len(files)} (host {host.index} of {host.count}; the "
            "validation records of all)")

  def chunks(workers):
    del workers  # one chunk per file
    if max_docs:
      return [("records_head", fmt, tuple(files), root, field, frac, max_docs)]
    return [("records", fmt, f, root, field, frac, not a <= i < b) for i, f in enumerate(files)]

  def sp_texts():  # the whole corpus's training documents, whichever host this is
    whole = ([("records_head", fmt, tuple(files), root, field, frac, max_docs)] if max_docs else
             [("records", fmt, f, root, field, frac, False) for f in files])
    for split, text in itertools.chain.from_iterable(iter_chunk(c) for c in whole):
      if split == "train":
        yield text

  # Text bytes per file byte, measured at the start of the first file of each compression
  # (plain, .gz, .zst) this host reads, and the texts read there.
  measured = {}

  def measure():
    if not measured:
      for i, f in enumerate(files):
        kind = records.compression(f)
        if kind not in measured and a <= i < b:
          measured[kind] = records.sample_text(fmt, f, field)
    return measured

  def text_bytes():
    ratios = {k: r for k, (r, _) in measure().items()}
    return sum(s * ratios.get(records.compression(f), max(ratios.values())) *
               (1.0 if a <= i < b else frac) for i, (f, s) in enumerate(zip(files, sizes)))

  def sample():
    return _first_texts(t for _, texts in measure().values() for t in texts)

  return Corpus(tfds_builder.cache_key(payload), union_key,
                f"{fmt} ({len(files)} files) under {root}", chunks, sp_texts, text_bytes,
                sample, what, shard)


def tfds_data_source(cfg, split):
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


def _split_bytes(src, split: str) -> float:
  """Stored bytes of a TFDS split from its dataset_info (0: unknown)."""
  try:
    return float(src.dataset_info.splits[split].num_bytes)
  except Exception:  # pylint: disable=broad-except  (no info: a custom data source)
    return 0.0


def tfds_corpus(cfg, host: Host = Host()) -> Corpus:
  if not cfg["tfds_name"]:
    raise ValueError("source 'tfds' needs data.tfds_name")
  small = {k: cfg[k] for k in _TFDS_KEYS}
  max_docs, text_key = int(cfg["max_docs"]), cfg["tfds_text_key"]
  train_split, eval_split = cfg["tfds_train_split"], cfg["tfds_eval_split"]
  frac = float(cfg["eval_fraction"])
  train_src = tfds_data_source(cfg, train_split)
  eval_src = tfds_data_source(cfg, eval_split) if eval_split else None
  n_train = tfds_builder.num_records(train_src, max_docs)
  n_eval = tfds_builder.num_records(eval_src, max_docs) if eval_src is not None else 0
  where = f"tfds {cfg['tfds_name']}"
  payload = {
      "v": 2, "tfds": cfg["tfds_name"], "data_dir": cfg["tfds_data_dir"],
      "train": train_split, "eval": eval_split, "text_key": text_key,
      "max_docs": max_docs, "eval_fraction": None if eval_src is not None else frac,
      "sizes": [len(train_src), len(eval_src) if eval_src is not None else 0]}
  union_key = tfds_builder.cache_key(payload)
  a, b, what = 0, n_train, f"all {n_train} training records"
  if host.shard:
    a, b = shards.host_share(n_train, None, host.index, host.count, f"training records of {where}")
    payload["hosts"] = [host.index, host.count]
    what = f"training records {a + 1}-{b} of {n_train} (host {host.index} of {host.count})"

  def chunks(workers):
    pieces = 1 if workers <= 1 else 4 * workers
    if eval_src is not None:
      return ([("tfds", small, "train", train_split, lo, hi) for lo, hi in _ranges(b - a, pieces, a)]
              + [("tfds", small, "validation", eval_split, lo, hi)
                 for lo, hi in _ranges(n_eval, pieces)])
    out = [("tfds_heldout", small, train_split, lo, hi, True) for lo, hi in _ranges(a, pieces)]
    out += [("tfds_heldout", small, train_split, lo, hi, False)
            for lo, hi in _ranges(b - a, pieces, a)]
    return out + [("tfds_heldout", small, train_split, lo, hi, True)
                  for lo, hi in _ranges(n_train - b, pieces, b)]

  def sp_texts():
    kind = "tfds" if eval_src is not None else "tfds_heldout"
    spec = (kind, small, "train", train_split, 0, n_train) if eval_src is not None else (
        kind, small, train_split, 0, n_train, False)
    return (text for split, text in iter_chunk(spec) if split == "train")

  # From dataset_info: the stored bytes of this host's records (a custom source has none).
  train_bytes = _split_bytes(train_src, train_split) * n_train / max(1, len(train_src))
  if eval_src is not None:
    host_bytes = train_bytes * (b - a) / max(1, n_train) + _split_bytes(
        eval_src, eval_split) * n_eval / max(1, len(eval_src))
  else:
    host_bytes = train_bytes * ((b - a) + frac * (n_train - (b - a))) / max(1, n_train)
  sample = lambda: _first_texts(t for _, t in tfds_builder.iter_records(
      train_src, text_key, max_docs, where, a, min(b, a + 1000)))
  return Corpus(tfds_builder.cache_key(payload), union_key, where, chunks, sp_texts,
                lambda: host_bytes, sample, what, host.shard)
