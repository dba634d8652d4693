"""Token streams on disk and packed fixed-length sequences.

A split's documents are tokenized once into one flat stream `doc_0 EOS doc_1 EOS ...` stored as a
raw little-endian file (uint16 when the vocabulary fits, else uint32) and memory-mapped.
Sequence i of length L is the window `stream[i*L : i*L + L + 1]`: inputs are its first L
tokens, targets its last L (inputs shifted by one), so every token is a target exactly once.
With document masking, batches also carry `segment_ids`: the document index of each input
position within its sequence, which the model uses to keep attention within documents.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import time
from typing import Callable, Iterable

import numpy as np

_META = "meta.json"


def _unique() -> str:
  """Temp-file suffix unique across hosts sharing a cache directory."""
  return f"{socket.gethostname()}.{os.getpid()}"


class FlatSequences:
  """Packed sequences read from a memory-mapped token stream (picklable by path)."""

  def __init__(self, path: str, dtype: str, length: int, seq_len: int):
    self.path, self.dtype, self.length, self.seq_len = path, dtype, int(length), int(seq_len)
    self._tokens = None

  def __getstate__(self):
    return {k: v for k, v in self.__dict__.items() if k != "_tokens"} | {"_tokens": None}

  @property
  def tokens(self) -> np.ndarray:
    if self._tokens is None:
      self._tokens = np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.length,))
    return self._tokens

  def __len__(self) -> int:
    return max(0, (self.length - 1) // self.seq_len)

  def get(self, indices_N: np.ndarray):
    """Returns (int32[N, L + 1] windows, None) for sequence indices int[N]."""
    offsets_NxW = (np.asarray(indices_N, np.int64)[:, None] * self.seq_len
                   + np.arange(self.seq_len + 1, dtype=np.int64)[None, :])
    return self.tokens[offsets_NxW].astype(np.int32), None


class RowSequences:
  """Packed sequences held in memory as rows (the synthetic source), with domain labels."""

  def __init__(self, tokens_NxW: np.ndarray, domain_N: np.ndarray | None):
    self.tokens_NxW = np.ascontiguousarray(tokens_NxW, dtype=np.int32)
    self.domain_N = None if domain_N is None else np.asarray(domain_N, np.int32)

  def __len__(self) -> int:
    return len(self.tokens_NxW)

  def get(self, indices_N: np.ndarray):
    """Returns (int32[N, L + 1] rows, int32[N] domains or None)."""
    idx = np.asarray(indices_N, np.int64)
    dom = None if self.domain_N is None else self.domain_N[idx]
    return self.tokens_NxW[idx], dom


def segment_ids(inputs_NxL: np.ndarray, eos_id: int) -> np.ndarray:
  """int32[N, L] document index of each input position: 0, then +1 at every EOS.

  An input EOS starts the next document (it acts as that document's BOS): the last token of a
  document still predicts EOS from its own document, and the next document's first token is
  predicted from the EOS alone, so no prediction sees another document's tokens.
  """
  return np.cumsum(np.asarray(inputs_NxL) == eos_id, axis=1, dtype=np.int32)


def make_batch(seqs, indices_N: np.ndarray, eos_id: int | None = None) -> dict[str, np.ndarray]:
  """Batch dict for sequence indices: inputs/targets int32[N, L] (+ domain int32[N]), and
  segment_ids int32[N, L] (`segment_ids`) when `eos_id` is given (document masking)."""
  window_NxW, domain_N = seqs.get(indices_N)
  batch = {"inputs": window_NxW[:, :-1], "targets": window_NxW[:, 1:]}
  if eos_id is not None:
    batch["segment_ids"] = segment_ids(batch["inputs"], eos_id)
  if domain_N is not None:
    batch["domain"] = domain_N
  return batch


def stream_dtype(vocab_size: int) -> str:
  return "uint16" if vocab_size <= 2**16 else "uint32"


def write_streams(out_dir: str, splits: dict[str, Iterable[str]],
                  encode: Callable[[str], object], eos_id: int, vocab_size: int,
                  fingerprint: dict) -> dict:
  """Tokenizes each split's documents into `<out_dir>/<split>.bin` (atomic, then meta.json).

  Args:
    out_dir: str, directory of this (corpus, tokenizer) pair.
    splits: split name -> iterable of document texts (in stream order).
    encode: text -> token ids (list or integer array).
    eos_id: int, appended after every document.
    vocab_size: int, picks the on-disk dtype; every id is checked to be < vocab_size.
    fingerprint: JSON-able description stored in the metadata.

  Returns:
    The metadata dict: {"dtype", "splits": {name: {"tokens", "docs"}}, ...}.
  """
  def tagged():
    for name, texts in splits.items():
      for text in texts:
        yield name, text
  return write_tagged_streams(out_dir, list(splits), tagged(), encode, eos_id, vocab_size,
                              fingerprint)


def write_tagged_streams(out_dir: str, names: Iterable[str], tagged: Iterable[tuple[str, str]],
                         encode: Callable[[str], object], eos_id: int, vocab_size: int,
                         fingerprint: dict) -> dict:
  """`write_streams` from ONE pass over `(split name, text)` pairs (all splits open at once).

  Args:
    names: the split names (each gets a file, possibly empty); a pair naming another raises.
    tagged: iterable of (split name, document text); each split's stream keeps their order.
    The other arguments and the result are those of `write_streams`.
  """
  names = list(names)
  meta = new_meta(names, vocab_size, eos_id, fingerprint)
  start = time.time()
  tmps = tmp_paths(out_dir, names)
  files = {}
  try:
    for n in names:
      files[n] = open(tmps[n], "wb")  # pylint: disable=consider-using-with
    encode_docs(files, tagged, encode, eos_id, vocab_size, meta["splits"])
  finally:
    for f in files.values():
      f.close()
  return commit_streams(out_dir, tmps, meta, start)


def new_meta(names: list[str], vocab_size: int, eos_id: int, fingerprint: dict) -> dict:
  """The metadata of streams not written yet (every split empty)."""
  return {"dtype": stream_dtype(vocab_size), "vocab_size": vocab_size, "eos_id": eos_id,
          "fingerprint": fingerprint, "splits": {n: {"tokens": 0, "docs": 0} for n in names}}


def tmp_paths(out_dir: str, names: list[str]) -> dict[str, str]:
  """Temporary paths of the split files in `out_dir` (created), unique to this process."""
  os.makedirs(out_dir, exist_ok=True)
  return {n: os.path.join(out_dir, f"{n}.bin.tmp{_unique()}") for n in names}


def encode_docs(files: dict, tagged: Iterable[tuple[str, str]], encode: Callable[[str], object],
                eos_id: int, vocab_size: int, counts: dict) -> None:
  """Appends every `(split, text)` document and an EOS to `files[split]` (binary files).

  `counts[split]` ({"tokens", "docs"}) is updated; empty encodings are skipped.
  Raises:
    ValueError: a split not in `files`, or an id outside [0, vocab_size).
  """
  dtype = np.dtype(stream_dtype(vocab_size))
  eos = np.array([eos_id], dtype=dtype).tobytes()
  for name, text in tagged:
    if name not in files:
      raise ValueError(f"document tagged with unknown split {name!r}; splits: {list(files)}")
    ids = np.asarray(encode(text))
    if not ids.size:
      continue
    if ids.max() >= vocab_size or ids.min() < 0:
      raise ValueError(f"tokenizer produced an id outside [0, {vocab_size})")
    files[name].write(ids.astype(dtype).tobytes())
    files[name].write(eos)
    counts[name]["tokens"] += ids.size + 1
    counts[name]["docs"] += 1


def commit_streams(out_dir: str, tmps: dict[str, str], meta: dict, start: float) -> dict:
  """Renames the finished temporary split files into place, then writes meta.json (last)."""
  for n, tmp in tmps.items():
    os.replace(tmp, os.path.join(out_dir, f"{n}.bin"))
  meta["seconds"] = round(time.time() - start, 3)
  tmp = os.path.join(out_dir, f"{_META}.tmp{_unique()}")
  with open(tmp, "w") as f:
    json.dump(meta, f, indent=1)
  os.replace(tmp, os.path.join(out_dir, _META))
  logging.info("tokenized %s in %.1f s: %s", out_dir, meta["seconds"], meta["splits"])
  return meta


def read_meta(out_dir: str) -> dict | None:
  """The metadata of finished streams in `out_dir`, or None when not (fully) written."""
  path = os.path.join(out_dir, _META)
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)


def open_split(out_dir: str, meta: dict, split: str, seq_len: int) -> FlatSequences:
  """Packed sequences of one written split."""
  return FlatSequences(os.path.join(out_dir, f"{split}.bin"), meta["dtype"],
                       meta["splits"][split]["tokens"], seq_len)
