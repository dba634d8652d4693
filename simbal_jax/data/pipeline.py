"""`make_datasets`: config -> tokenizer + checkpointable grain train iterator + fixed eval batches.

Train: `MapDataset.range(num_sequences).shuffle(seed).repeat().batch(global_batch)` over
sequence indices, then each host gathers its contiguous slice `[p*b, (p+1)*b)` of every global
batch (b = global_batch // process_count), so the hosts' batches are disjoint and their union,
in host order, is the global batch. The pipeline is random-access, so the iterator state is
one integer, the number of global batches already returned (`get_state()` -> JSON-able dict,
the same on every host), and a restored iterator continues exactly.
Eval: the first `num_batches * global_batch` validation sequences, in a fixed order.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any

import numpy as np

from simbal_jax.data import packing
from simbal_jax.data import sources
from simbal_jax.data import tokenizers

# cfg.data fields and their defaults (a ConfigDict, dict or any attribute object works; missing
# fields take these values). The nested `synthetic` group may be a ConfigDict or a dict.
DEFAULTS = {
    "source": "stdlib",          # one of sources.SOURCES
    "tokenizer": "bytes",        # one of tokenizers.TOKENIZERS (ignored by 'synthetic')
    "sp_vocab_size": 4096,       # SentencePiece vocabulary (incl. <unk>, EOS, 256 byte pieces)
    "sp_train_chars": 2_000_000,  # SentencePiece training sample (characters of train split)
    "globs": "",                 # text_files: comma-separated globs, `**` allowed
    "tfds_name": "",             # tfds: dataset name ("c4/en:3.1.0") or a prepared builder dir
    "tfds_data_dir": "",         # tfds: data_dir ("" = TFDS default)
    "tfds_text_key": "text",     # tfds: feature holding the text
    "tfds_train_split": "train",
    "tfds_eval_split": "validation",  # "" = hold out eval_fraction of train documents
    "eval_fraction": 0.05,       # share of documents held out (by document-id hash)
    "max_docs": 0,               # 0 = all documents; else a fixed subset (local: by doc-id hash)
    "max_bytes": 0,              # stdlib/text_files: 0 = no limit; else a byte budget on disk
    "cache_dir": "",             # "" = <workdir>/data
    "worker_count": 0,           # grain worker processes for the train iterator (0 = threads)
    "synthetic": {
        "num_domains": 4,        # latent domains (one random Markov chain each)
        "vocab_size": 256,       # chain states; EOS = vocab_size
        "doc_len": 0,            # 0 = seq_len + 1: one document per sequence
        "num_docs": 4096,
        "seed": 0,               # corpus seed (independent of the training seed)
    },
}
_STATE_VERSION = 1


def _field(cfg, name, default):
  if cfg is None:
    return default
  if isinstance(cfg, dict):
    return cfg.get(name, default)
  try:
    value = getattr(cfg, name)
  except (AttributeError, KeyError):
    return default
  return default if value is None else value


def resolve_config(data_cfg) -> dict:
  """Reads `data_cfg` into a plain dict with every field of DEFAULTS (validated names)."""
  out = {k: _field(data_cfg, k, v) for k, v in DEFAULTS.items() if k != "synthetic"}
  syn = _field(data_cfg, "synthetic", None)
  out["synthetic"] = {k: _field(syn, k, v) for k, v in DEFAULTS["synthetic"].items()}
  if out["source"] not in sources.SOURCES:
    raise ValueError(f"unknown data.source {out['source']!r}; valid: {', '.join(sources.SOURCES)}")
  if out["source"] != "synthetic":
    tokenizers.check_tokenizer_name(out["tokenizer"])
  if not 0.0 <= float(out["eval_fraction"]) < 1.0:
    raise ValueError(f"data.eval_fraction must be in [0, 1), got {out['eval_fraction']}")
  for k in ("max_docs", "max_bytes", "worker_count"):
    if int(out[k]) < 0:
      raise ValueError(f"data.{k} must be >= 0, got {out[k]}")
  return out


_ITER_CLS = None


def _iterator_class():
  """A grain `DatasetIterator` subclass, so `grain.checkpoint.CheckpointSave` accepts it."""
  global _ITER_CLS
  if _ITER_CLS is not None:
    return _ITER_CLS
  import grain  # pylint: disable=g-import-not-at-top

  class _TrainIterator(grain.DatasetIterator):
    """Infinite train batches; the state is the number of batches already returned.

    The pipeline is random-access, so `set_state` rebuilds it from that batch on: the state
    is portable across worker counts and grain versions.
    """

    def __init__(self, make_inner, fingerprint: dict):
      super().__init__()
      self._make_inner, self._fingerprint = make_inner, fingerprint
      self._next_batch = 0
      self._inner = None

    def __next__(self) -> dict[str, np.ndarray]:
      if self._inner is None:
        self._inner = self._make_inner(self._next_batch)
      batch = next(self._inner)
      self._next_batch += 1
      return batch

    def get_state(self) -> dict[str, Any]:
      return {"version": _STATE_VERSION, "next_batch": self._next_batch,
              "data": dict(self._fingerprint)}

    def set_state(self, state: dict[str, Any]) -> None:
      saved = state.get("data", {})
      diff = {k: (saved.get(k), v) for k, v in self._fingerprint.items() if saved.get(k) != v}
      if diff or "next_batch" not in state:
        raise ValueError("data iterator state was saved for a different data pipeline "
                         f"(field: (saved, current)): {diff or state}")
      self.close()
      self._closed = False
      self._next_batch = int(state["next_batch"])

    def close(self) -> None:
      if self._inner is not None and hasattr(self._inner, "close"):
        self._inner.close()
      self._inner = None

  _ITER_CLS = _TrainIterator
  return _ITER_CLS


@dataclasses.dataclass
class Datasets:
  """What `make_datasets` returns (see module docstring)."""
  tokenizer: Any
  vocab_size: int
  seq_len: int
  batch_size: int              # global batch size
  local_batch_size: int        # batch_size // process_count: rows each host gets
  process_index: int
  process_count: int
  seed: int
  train: Any                   # packing.FlatSequences | packing.RowSequences
  eval: Any
  worker_count: int = 0
  info: dict = dataclasses.field(default_factory=dict)

  @property
  def has_domain(self) -> bool:
    return isinstance(self.train, packing.RowSequences) and self.train.domain_N is not None

  def _host_rows(self, global_indices: np.ndarray) -> dict[str, np.ndarray]:
    b, p = self.local_batch_size, self.process_index
    return packing.make_batch(self.train, np.asarray(global_indices)[p * b:(p + 1) * b])

  def train_iter(self):
    """Infinite iterator of host-local train batches (checkpointable, see module docstring).

    Yields dict(inputs=int32[b, L], targets=int32[b, L], [domain=int32[b]]).
    """
    import grain  # pylint: disable=g-import-not-at-top
    ds = (grain.MapDataset.range(len(self.train))
          .shuffle(seed=self.seed % 2**32)
          .repeat()
          .batch(self.batch_size, drop_remainder=True))
    workers = self.worker_count
    if workers > 0:
      from absl import flags  # pylint: disable=g-import-not-at-top
      if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()

    def make_inner(start: int):
      it_ds = ds.slice(slice(start, None)).map(self._host_rows)
      if workers > 0:
        it_ds = it_ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
      else:
        it_ds = it_ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4))
      return iter(it_ds)

    # No process_index / process_count: Orbax writes this state from the primary host only and
    # every host restores that one file; next_batch counts GLOBAL batches, the same on all hosts.
    fingerprint = {"corpus": self.info.get("corpus_key", ""), "seq_len": self.seq_len,
                   "batch_size": self.batch_size, "seed": self.seed}
    return _iterator_class()(make_inner, fingerprint)

  def eval_batches(self, num_batches: int) -> list[dict[str, np.ndarray]]:
    """Deterministic host-local validation batches (the same list on every call).

    Args:
      num_batches: int >= 1; fewer are returned (with a log line) when the validation split
        holds fewer than num_batches * batch_size sequences.
    """
    if num_batches < 1:
      raise ValueError(f"num_batches must be >= 1, got {num_batches}")
    available = len(self.eval) // self.batch_size
    if available < num_batches:
      logging.warning("validation split has %d sequences: %d eval batches instead of %d",
                      len(self.eval), available, num_batches)
    b, p, g = self.local_batch_size, self.process_index, self.batch_size
    return [packing.make_batch(self.eval, np.arange(i * g + p * b, i * g + (p + 1) * b))
            for i in range(min(num_batches, available))]


def _check_sizes(train, eval_, batch_size, seq_len, what):
  for name, seqs in (("train", train), ("validation", eval_)):
    if len(seqs) < batch_size:
      raise ValueError(
          f"{what}: the {name} split has {len(seqs)} sequences of length {seq_len}, fewer than "
          f"one global batch ({batch_size}); use more data (data.max_docs / data.max_bytes / "
          f"data.eval_fraction) or a smaller batch_size / seq_len")


def make_datasets(data_cfg, *, seq_len: int, batch_size: int, workdir: str, seed: int,
                  process_index: int = 0, process_count: int = 1) -> Datasets:
  """Prepares (or reuses) the data and returns train/eval access for this host.

  Args:
    data_cfg: cfg.data (ConfigDict, dict or attribute object; fields and defaults in DEFAULTS).
    seq_len: int, model sequence length L.
    batch_size: int, GLOBAL batch size (divisible by process_count).
    workdir: str, run directory; the cache defaults to <workdir>/data.
    seed: int, training seed (shuffle order; the split and the corpus never depend on it).
    process_index: int, this host's index.
    process_count: int, number of hosts.

  Raises:
    ValueError: unknown source/tokenizer, empty glob, unreadable/binary text file, split or
      corpus too small for one global batch — all before any training starts.
  """
  from simbal_jax.data import prepare  # pylint: disable=g-import-not-at-top
  cfg = resolve_config(data_cfg)
  seq_len, batch_size = int(seq_len), int(batch_size)
  process_index, process_count = int(process_index), int(process_count)
  if seq_len < 1 or batch_size < 1:
    raise ValueError(f"seq_len and batch_size must be >= 1, got {seq_len}, {batch_size}")
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"bad process_index/process_count: {process_index}/{process_count}")
  if batch_size % process_count:
    raise ValueError(f"global batch_size {batch_size} is not divisible by process_count "
                     f"{process_count}")
  cache_dir = cfg["cache_dir"] or os.path.join(workdir, "data")
  if "://" in cache_dir:  # memory-mapped token files need a local disk
    cache_dir = os.path.join(os.path.expanduser("~"), ".cache", "simbal_jax", "data")
  start = time.time()
  tok, train, eval_, info = prepare.prepare(cfg, seq_len=seq_len, cache_dir=cache_dir)
  _check_sizes(train, eval_, batch_size, seq_len, f"data.source={cfg['source']!r}")
  info.update(train_sequences=len(train), eval_sequences=len(eval_),
              prepare_seconds=round(time.time() - start, 3), cache_dir=cache_dir)
  logging.info("data ready: %s", info)
  return Datasets(tokenizer=tok, vocab_size=int(tok.vocab_size), seq_len=seq_len,
                  batch_size=batch_size, local_batch_size=batch_size // process_count,
                  process_index=process_index, process_count=process_count, seed=int(seed),
                  train=train, eval=eval_, worker_count=int(cfg["worker_count"]), info=info)
