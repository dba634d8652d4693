"""`make_datasets`: config -> tokenizer + checkpointable grain train iterator + fixed eval batches.

Train: `MapDataset.range(num_sequences).shuffle(seed).repeat().batch(global_batch)` over
sequence indices, then each host gathers its contiguous slice `[p*b, (p+1)*b)` of every global
batch (b = global_batch // process_count), so the hosts' batches are disjoint and their union,
in host order, is the global batch. With several hosts and `data.shard_hosts` (the default for
file and TFDS sources), each host holds only its own share of the training data (shards.py) and
batches `b` rows of its own shuffle instead; the global batch is again the hosts' batches in
host order, drawn from disjoint shares. The pipeline is random-access, so the iterator state is
one integer, the number of global batches already returned (`get_state()` -> JSON-able dict,
the same on every host), and a restored iterator continues exactly.
Eval: `num_batches * global_batch` validation sequences evenly spaced over the whole held-out
split (`Datasets.eval_indices`), in a fixed order independent of the training seed.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any

import numpy as np

from simbal_jax.runio import paths
from simbal_jax.data import packing
from simbal_jax.data import sources
from simbal_jax.data import tokenizers

_STATE_VERSION = 1


def resolve_config(data_cfg) -> dict:
  """`data_cfg` as a plain dict, every field present and the names validated.

  Args:
    data_cfg: cfg.data of an experiment config, or a dict / ConfigDict holding some of its
      fields: the others take their defaults from `simbal_jax.configs.base` (the one place
      defaults are defined).
  """
  from simbal_jax.configs import base  # pylint: disable=g-import-not-at-top
  out = base.get_config().data.to_dict()
  given = data_cfg.to_dict() if hasattr(data_cfg, "to_dict") else dict(data_cfg or {})
  unknown = sorted(set(given) - set(out))
  if unknown:
    raise ValueError(f"unknown data field(s) {', '.join('data.' + u for u in unknown)}; valid: "
                     f"{', '.join(sorted(out))}")
  out["synthetic"].update(dict(given.pop("synthetic", None) or {}))
  out.update(given)
  if out["source"] not in sources.SOURCES:
    raise ValueError(f"unknown data.source {out['source']!r}; valid: {', '.join(sources.SOURCES)}")
  if out["source"] != "synthetic":
    tokenizers.check_tokenizer_name(out["tokenizer"])
  if not 0.0 <= float(out["eval_fraction"]) < 1.0:
    raise ValueError(f"data.eval_fraction must be in [0, 1), got {out['eval_fraction']}")
  for k in ("max_docs", "max_bytes", "worker_count"):
    if int(out[k]) < 0:
      raise ValueError(f"data.{k} must be >= 0, got {out[k]}")
  if int(out["prepare_workers"]) < -1:
    raise ValueError(f"data.prepare_workers must be -1 (one per core), 0 or more, got "
                     f"{out['prepare_workers']}")
  _check_source_fields(out)
  return out


def _check_source_fields(cfg: dict) -> None:
  """The field a source cannot do without, named as the flag to set (one line, raised early)."""
  source = cfg["source"]
  if source == "tfds" and not str(cfg["tfds_name"]).strip():
    raise ValueError(
        "data.source='tfds' needs a dataset: set --config.data.tfds_name=NAME (prepared once "
        "with `tfds build NAME --file_format=array_record`), or train on files with "
        "--config.data.source=jsonl --config.data.globs='/data/*.jsonl.zst'")
  if source in ("text_files", "jsonl", "parquet") and not str(cfg["globs"]).strip(" ,"):
    raise ValueError(f"data.source={source!r} needs its files: set --config.data.globs=GLOBS "
                     "(comma-separated, ** allowed)")


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
  segment_eos: int | None = None  # EOS id when batches carry segment_ids (data.document_mask)
  sharded: bool = False        # `train` is this host's own share (several hosts, shard_hosts)

  @property
  def has_domain(self) -> bool:
    return isinstance(self.train, packing.RowSequences) and self.train.domain_N is not None

  def _host_rows(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    """This host's batch from one batch of indices: its slice of a global batch, or (sharded)
    the whole batch of its own share's indices."""
    b, p = self.local_batch_size, self.process_index
    rows = np.asarray(indices) if self.sharded else np.asarray(indices)[p * b:(p + 1) * b]
    return packing.make_batch(self.train, rows, self.segment_eos)

  def train_iter(self):
    """Infinite iterator of host-local train batches (checkpointable, see module docstring).

    Yields dict(inputs=int32[b, L], targets=int32[b, L], [domain=int32[b]],
    [segment_ids=int32[b, L]] (data.document_mask)).
    """
    import grain  # pylint: disable=g-import-not-at-top
    ds = (grain.MapDataset.range(len(self.train))
          .shuffle(seed=self.seed % 2**32)
          .repeat()
          .batch(self.local_batch_size if self.sharded else self.batch_size,
                 drop_remainder=True))
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

  def eval_indices(self, num_sequences: int) -> np.ndarray:
    """Validation sequence indices int64[N]: N evenly spaced over the WHOLE held-out split.

    The evaluation set depends only on the data (corpus, tokenizer, split, seq_len) and N,
    never on the training seed or method, so every run of a comparison sees the same tokens;
    spreading it over the split draws from many documents instead of the first one or two.
    N is capped by the split's size (a log line says so).
    """
    if num_sequences < 1:
      raise ValueError(f"num_sequences must be >= 1, got {num_sequences}")
    available = len(self.eval)
    if available < num_sequences:
      logging.warning("validation split has %d sequences; evaluating on all of them instead of "
                      "%d", available, num_sequences)
      num_sequences = available
    return np.unique(np.linspace(0, available - 1, num_sequences).round().astype(np.int64))

  def eval_batches(self, num_batches: int) -> list[dict[str, np.ndarray]]:
    """Deterministic host-local validation batches (the same list on every call).

    Args:
      num_batches: int >= 1 global batches of evenly spaced validation sequences
        (`eval_indices`); fewer when the split holds fewer sequences (whole batches only).
    """
    if num_batches < 1:
      raise ValueError(f"num_batches must be >= 1, got {num_batches}")
    g, b, p = self.batch_size, self.local_batch_size, self.process_index
    idx = self.eval_indices(num_batches * g)
    n = (len(idx) // g) * g
    if n < len(idx):
      logging.warning("validation split: %d eval batches of %d instead of %d", n // g, g,
                      num_batches)
    return [packing.make_batch(self.eval, idx[i * g + p * b:i * g + (p + 1) * b],
                               self.segment_eos)
            for i in range(n // g)]


def _check_sizes(train, eval_, batch_size, seq_len, what, local_batch=None, eval_only=False):
  """Each split holds one batch: a global one, or this host's share one host batch (the
  validation split alone with `eval_only`)."""
  splits = (("train", train, local_batch or batch_size), ("validation", eval_, batch_size))
  for name, seqs, need in splits[eval_only:]:
    if len(seqs) < need:
      whose = "this host's share of the train split" if need != batch_size else f"the {name} split"
      raise ValueError(
          f"{what}: {whose} has {len(seqs)} sequences of length {seq_len}, fewer than one "
          f"{'host' if need != batch_size else 'global'} batch ({need}); use more data "
          f"(data.max_docs / data.max_bytes / data.eval_fraction) or a smaller batch_size / "
          "seq_len")


def local_cache_dir(cache_dir: str, workdir) -> str:
  """The prepared-data cache: `cache_dir`, else <workdir>/data, on a local disk.

  Token streams are memory-mapped, and the array_record, TFDS and SentencePiece files are
  written and read by libraries that want local files, so a cloud path (`gs://`: a cloud
  workdir or data.cache_dir) is replaced, with a log line, by ~/.cache/simbal_jax/data. The
  cache is keyed by content, never by location, so runs sharing it reuse each other's files.
  """
  wanted = cache_dir or os.path.join(os.fspath(workdir), "data")
  if paths.is_local(wanted):
    return wanted
  local = os.path.join(os.path.expanduser("~"), ".cache", "simbal_jax", "data")
  logging.info("data cache %s is not on a local disk (token files are memory-mapped): using %s "
               "instead (set data.cache_dir to a local directory to choose another)", wanted,
               local)
  return local


def make_datasets(data_cfg, *, seq_len: int, batch_size: int, workdir: str, seed: int,
                  process_index: int = 0, process_count: int = 1, tokenizer=None,
                  eval_only: bool = False) -> Datasets:
  """Prepares (or reuses) the data and returns train/eval access for this host.

  Args:
    data_cfg: cfg.data (ConfigDict or dict; missing fields take the defaults of configs/base.py).
    seq_len: int, model sequence length L.
    batch_size: int, GLOBAL batch size (divisible by process_count).
    workdir: str or epath.Path, run directory; the cache defaults to <workdir>/data
      (`local_cache_dir`: a local directory when that is a cloud path).
    seed: int, training seed (shuffle order; the split and the corpus never depend on it).
    process_index: int, this host's index.
    process_count: int, number of hosts.
    tokenizer: a tokenizer to use instead of `data.tokenizer`'s (an extra evaluation set read
      with the run's tokenizer: `evalsets.make_eval_sets`), or None.
    eval_only: only the validation split will be read (an extra evaluation set): the train
      split need not hold a batch.

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
  cache_dir = local_cache_dir(cfg["cache_dir"], workdir)
  start = time.time()
  tok, train, eval_, info = prepare.prepare(cfg, seq_len=seq_len, cache_dir=cache_dir,
                                            process_index=process_index,
                                            process_count=process_count, tokenizer=tokenizer)
  sharded = bool(info.get("sharded"))
  _check_sizes(train, eval_, batch_size, seq_len, f"data.source={cfg['source']!r}",
               batch_size // process_count if sharded else None, eval_only)
  info.update(train_sequences=len(train), eval_sequences=len(eval_),
              prepare_seconds=round(time.time() - start, 3), cache_dir=cache_dir)
  logging.info("data ready: %s", info)
  return Datasets(tokenizer=tok, vocab_size=int(tok.vocab_size), seq_len=seq_len,
                  batch_size=batch_size, local_batch_size=batch_size // process_count,
                  process_index=process_index, process_count=process_count, seed=int(seed),
                  train=train, eval=eval_, worker_count=int(cfg["worker_count"]), info=info,
                  segment_eos=int(tok.eos_id) if cfg["document_mask"] else None,
                  sharded=sharded)
