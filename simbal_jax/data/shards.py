"""Preparing data at scale: each host's share, a pool of tokenizer processes, the disk it takes.

Host share (`host_share`): with several processes (and `data.shard_hosts`), the training
files of a file-based source (stdlib, text_files, jsonl, parquet) are cut into process_count
contiguous runs of the sorted file list, balanced by bytes, and process p tokenizes only run
p's training documents; the records of a TFDS dataset are cut the same way by index. Every
host also tokenizes the WHOLE validation split, so the evaluation set is the same on every host
(`Datasets.eval_batches` takes each host's rows of the same global batches). Deterministic:
a pure function of the file list, their sizes and (process_index, process_count).

Workers (`write_parallel`): a corpus is an ordered list of chunks (a file, or a range of
records), each tokenized by one of `data.prepare_workers` processes into part files that are
appended in chunk order, so the token streams are byte-identical to the in-process ones.
Processes are spawned, never forked: the trainer has jax's threads running by then.

Disk (`DiskPlan`): before anything is written, one log line gives the cache this host will
fill (the text it tokenizes times the tokenizer's tokens per byte, measured on a sample, or the
upper bound of one token per byte, times 2 or 4 bytes a token, plus the array_record copy of
local text files) and the free space where the cache lies, as a warning when it does not fit.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import multiprocessing
import os
import shutil
import tempfile
import time
from typing import Callable, Sequence

import numpy as np

from simbal_jax.data import packing
from simbal_jax.data import tokenizers

MAX_AUTO_WORKERS = 32
# Below this much text per process a pool costs more (spawn, imports, tokenizer load) than it
# saves; the number of workers is capped by text / BYTES_PER_WORKER.
BYTES_PER_WORKER = 32 << 20


def host_share(n: int, sizes: Sequence[float] | None, process_index: int, process_count: int,
               what: str) -> tuple[int, int]:
  """[start, stop) of host `process_index`'s contiguous run of n items, balanced by `sizes`.

  Run p starts at the first item whose preceding items hold at least p / process_count of the
  bytes (None: equal sizes, run p starts at item p * n // process_count); every run gets at
  least one item.

  Raises:
    ValueError: fewer items than processes (`what` names them: "jsonl files").
  """
  n, count = int(n), int(process_count)
  if n < count:
    raise ValueError(f"data.shard_hosts: {n} {what} for {count} hosts; each host tokenizes its "
                     "own share, so give at least one per host (more, smaller files) or set "
                     "--config.data.shard_hosts=False")
  if sizes is None:
    bounds = [p * n // count for p in range(count)] + [n]
  else:
    before = np.concatenate([[0.0], np.cumsum(np.asarray(sizes, np.float64))])  # bytes before i
    bounds = [0]
    for p in range(1, count):
      cut = int(np.searchsorted(before, before[-1] * p / count, side="left"))
      bounds.append(min(max(cut, bounds[-1] + 1), n - (count - p)))
    bounds.append(n)
  return bounds[process_index], bounds[process_index + 1]


def cpu_count() -> int:
  """CPU cores this process may use."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


def num_workers(requested: int, text_bytes: float, max_chunks: int | None = None) -> int:
  """Tokenizer processes to use: `requested` (-1: one per core, at most MAX_AUTO_WORKERS;
  0 or 1: in-process), at most one per BYTES_PER_WORKER of text and one per chunk."""
  n = min(cpu_count(), MAX_AUTO_WORKERS) if int(requested) < 0 else max(1, int(requested))
  n = min(n, max(1, int(text_bytes // max(1, BYTES_PER_WORKER))))
  return max(1, min(n, max_chunks) if max_chunks else n)


def make_tokenizer(spec: tuple):
  """A tokenizer from its spec: ("bytes",), ("cl100k",) or ("sentencepiece", model_path)."""
  if spec[0] == "bytes":
    return tokenizers.BytesTokenizer()
  if spec[0] == "cl100k":
    return tokenizers.Cl100kTokenizer()
  if spec[0] == "sentencepiece":
    return tokenizers.SentencePieceTokenizer(spec[1])
  raise ValueError(f"unknown tokenizer spec {spec!r}")


_WORKER_TOKENIZERS = {}  # spec -> tokenizer, one load per worker process


def _tokenize_chunk(iter_chunk, spec, tok_spec, prefix, names, eos_id, vocab_size):
  """Worker: tokenizes one chunk into `<prefix>.<split>.bin`; returns (prefix, counts)."""
  if tok_spec not in _WORKER_TOKENIZERS:
    _WORKER_TOKENIZERS[tok_spec] = make_tokenizer(tok_spec)
  tok = _WORKER_TOKENIZERS[tok_spec]
  counts = {n: {"tokens": 0, "docs": 0} for n in names}
  files = {}
  try:
    for n in names:
      files[n] = open(f"{prefix}.{n}.bin", "wb")  # pylint: disable=consider-using-with
    packing.encode_docs(files, iter_chunk(spec), getattr(tok, "encode_array", tok.encode),
                        eos_id, vocab_size, counts)
  finally:
    for f in files.values():
      f.close()
  return prefix, counts


def write_parallel(out_dir: str, names: Sequence[str], chunks: Sequence, iter_chunk: Callable,
                   tok_spec: tuple, eos_id: int, vocab_size: int, fingerprint: dict,
                   workers: int) -> dict:
  """`packing.write_tagged_streams` of the concatenated chunks, with `workers` processes.

  Args:
    chunks: picklable chunk specs; `iter_chunk(spec)` yields its (split, text) pairs.
    iter_chunk: a module-level function (workers import it by name).
    tok_spec: `make_tokenizer`'s argument (each worker loads the tokenizer once).
    The other arguments and the result are `packing.write_tagged_streams`'s.
  """
  names = list(names)
  meta = packing.new_meta(names, vocab_size, eos_id, fingerprint)
  start = time.time()
  tmps = packing.tmp_paths(out_dir, names)
  parts = tempfile.mkdtemp(prefix="parts.", dir=out_dir)
  files, done = {}, False
  pool = concurrent.futures.ProcessPoolExecutor(
      max_workers=workers, mp_context=multiprocessing.get_context("spawn"))
  try:
    for n in names:
      files[n] = open(tmps[n], "wb")  # pylint: disable=consider-using-with
    futures = [pool.submit(_tokenize_chunk, iter_chunk, spec, tok_spec,
                           os.path.join(parts, f"{i:07d}"), names, eos_id, vocab_size)
               for i, spec in enumerate(chunks)]
    for future in futures:  # in chunk order: the streams are the in-process ones
      prefix, counts = future.result()
      for n in names:
        part = f"{prefix}.{n}.bin"
        with open(part, "rb") as f:
          shutil.copyfileobj(f, files[n], 1 << 24)
        os.remove(part)  # the cache holds at most one chunk twice
        for k in ("tokens", "docs"):
          meta["splits"][n][k] += counts[n][k]
    done = True
  finally:
    pool.shutdown(wait=True, cancel_futures=True)
    for f in files.values():
      f.close()
    shutil.rmtree(parts, ignore_errors=True)
    if not done:
      for tmp in tmps.values():
        if os.path.exists(tmp):
          os.remove(tmp)
  meta["workers"] = workers
  return packing.commit_streams(out_dir, tmps, meta, start)


# ----------------------------------------------------------------------------------------------
# The disk a host's cache takes.


@dataclasses.dataclass
class DiskPlan:
  """What one host will write into the data cache (estimates in bytes)."""
  text_bytes: float          # UTF-8 text this host tokenizes (its training share + validation)
  copy_bytes: float = 0.0    # array_record copy of local text files (0 for streamed sources)
  tokens_per_byte: float = 1.0
  measured: bool = False     # tokens_per_byte measured on a sample (else the bound 1.0)
  token_bytes: int = 2       # bytes per stored token (uint16 or uint32)
  what: str = ""             # the host's share, for the log line

  @property
  def total(self) -> float:
    return self.copy_bytes + self.text_bytes * self.tokens_per_byte * self.token_bytes


def measure_tokens_per_byte(tok, texts: Sequence[str], max_bytes: int = 1 << 20) -> float:
  """Tokens per UTF-8 byte of `tok` on (the first max_bytes of) `texts` (1.0 without text)."""
  n_bytes = n_tokens = 0
  for text in texts:
    if n_bytes >= max_bytes:
      break
    n_bytes += len(text.encode("utf-8"))
    n_tokens += len(tok.encode(text))
  return n_tokens / n_bytes if n_bytes else 1.0


def free_bytes(path: str) -> int:
  """Free bytes on the file system that holds `path` (or would: its nearest existing parent)."""
  path = os.path.abspath(path)
  while not os.path.exists(path) and os.path.dirname(path) != path:
    path = os.path.dirname(path)
  return shutil.disk_usage(path).free


def _gb(x: float) -> str:
  return f"{x / 1e9:,.2f} GB" if x >= 1e8 else f"{x / 1e6:,.2f} MB"


def log_disk_plan(plan: DiskPlan, cache_dir: str) -> dict:
  """Logs the one line of the cache this host will fill and the free space; a warning when it
  does not fit. Returns the numbers (for `info`)."""
  free = free_bytes(cache_dir)
  rate = (f"{plan.tokens_per_byte:.3f} tokens/byte measured on a sample" if plan.measured
          else "at most 1 token/byte")
  copy = f" + {_gb(plan.copy_bytes)} array_record copy" if plan.copy_bytes else ""
  line = (f"data cache on this host: ~{_gb(plan.total)} for {plan.what}: {_gb(plan.text_bytes)} "
          f"of text, {rate}, {plan.token_bytes} bytes/token{copy}; {_gb(free)} free in "
          f"{cache_dir}")
  if plan.total > free:
    logging.warning("%s: it does NOT fit (set data.cache_dir to a larger local disk, or use "
                    "data.max_bytes)", line)
  else:
    logging.info("%s", line)
  return {"disk_estimate_bytes": int(plan.total), "disk_free_bytes": int(free)}
