"""Document sources: the Python standard library, user text files, and a synthetic corpus.

Documents are `(doc_id, text)` pairs. The train/validation split is a pure function of the
document id (`is_eval_doc`), so it is deterministic and disjoint by document on every machine.
A file's id is its path relative to the corpus root (`doc_id`: the stdlib directory, or the
non-wildcard prefix of the globs), so neither the install path nor the corpus location matters.
Globs may name a cloud location (`gs://bucket/corpus/*.jsonl.zst`): files are then listed, read
and fingerprinted through etils.epath. Record files (jsonl, parquet: one document per record)
are read by `records.py`.
"""
from __future__ import annotations

import glob
import hashlib
import logging
import os
import re
import sysconfig
from typing import NamedTuple

from etils import epath
import numpy as np

from simbal_jax.runio import paths

SOURCES = ("stdlib", "text_files", "tfds", "synthetic", "jsonl", "parquet")
_SKIP_DIRS = ("site-packages", "dist-packages", "__pycache__")
_GLOB_MAGIC = re.compile(r"[*?[]")


def doc_hash(doc_id: str) -> float:
  """Deterministic uniform number in [0, 1) from a document id (sha1, platform independent)."""
  digest = hashlib.sha1(doc_id.encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "big") / 2.0**64


def is_eval_doc(doc_id: str, eval_fraction: float) -> bool:
  """True iff the document with this id belongs to the validation split."""
  return doc_hash(doc_id) < eval_fraction


def doc_id(path: str, root: str) -> str:
  """Id of the document in file `path`: its path relative to the corpus `root`, '/'-separated."""
  return paths.relpath(path, root)


def corpus_root(files: list[str]) -> str:
  """Fallback corpus root of a non-empty file list: the deepest directory holding all of them."""
  return paths.commonpath([paths.dirname(paths.absolute(f)) for f in files])


def stdlib_dir() -> str:
  """Directory of the running interpreter's standard library sources (e.g. /usr/lib/python3.11)."""
  path = sysconfig.get_paths().get("stdlib") or os.path.dirname(os.__file__)
  if not os.path.isfile(os.path.join(path, "os.py")):
    path = os.path.dirname(os.__file__)
  return path


def stdlib_files() -> list[str]:
  """All *.py files of the standard library (no site-packages), sorted."""
  root = stdlib_dir()
  files = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
    files.extend(os.path.join(dirpath, f) for f in filenames if f.endswith(".py"))
  if not files:
    raise ValueError(f"no *.py files found under the standard library directory {root}")
  return sorted(files)


def glob_files(globs: str) -> list[str]:
  """Expands comma-separated globs (`**` allowed) into a sorted list of files.

  Raises:
    ValueError: no globs given, a glob that matches no file, or a match that is a broken
      symlink (the message names the glob or the link). Directories are skipped.
  """
  files = set()
  for pattern in _patterns(globs):
    if not paths.is_local(pattern):
      matched = _cloud_glob(pattern)
      if not matched:
        raise ValueError(f"data.globs: the glob {pattern!r} matches no file")
      files.update(matched)
      continue
    matched = glob.glob(os.path.expanduser(pattern), recursive=True)
    for f in matched:
      if os.path.islink(f) and not os.path.exists(f):
        raise ValueError(f"data.globs: {f} (matched by {pattern!r}) is a broken symlink to "
                         f"{os.readlink(f)!r}; fix or remove it")
    matched = [f for f in matched if os.path.isfile(f)]
    if not matched:
      raise ValueError(f"data.globs: the glob {pattern!r} matches no file")
    files.update(os.path.abspath(f) for f in matched)
  return sorted(files)


def glob_root(globs: str) -> str:
  """Corpus root of comma-separated globs: the common directory of their non-wildcard prefixes.

  `/data/corpus/**/*.txt` -> `/data/corpus`; `/a/x/*.txt,/a/y/*.txt` -> `/a`; a plain file
  path -> its directory. Document ids are relative to it (`doc_id`).
  """
  return paths.commonpath([_glob_head(p) for p in _patterns(globs)])


def _glob_head(pattern: str) -> str:
  """The directory above the first wildcard of `pattern` (absolute, or a URI)."""
  head = paths.dirname(paths.absolute(pattern))
  while _GLOB_MAGIC.search(head):
    head = paths.dirname(head)
  return head


def _cloud_glob(pattern: str) -> list[str]:
  """Files matched by a cloud glob (`gs://b/dir/**/*.jsonl`), through epath."""
  head = _glob_head(pattern)
  rest = paths.relpath(pattern, head)
  return [os.fspath(p) for p in epath.Path(head).glob(rest) if p.is_file()]


def _patterns(globs: str) -> list[str]:
  patterns = [g.strip() for g in (globs or "").split(",") if g.strip()]
  if not patterns:
    raise ValueError("sources text_files, jsonl and parquet need data.globs (comma-separated "
                     "file globs)")
  return patterns


def read_text(path: str, *, strict: bool) -> str | None:
  """Reads a UTF-8 text file.

  Args:
    path: file path.
    strict: bool; True raises ValueError naming the file when it is unreadable or binary
      (contains NUL bytes or is not valid UTF-8); False returns None instead.
  """
  try:
    with paths.resolve(path).open("rb") as f:
      raw = f.read()
  except OSError as e:
    if strict:
      raise ValueError(f"cannot read text file {path}: {e}") from e
    return None
  problem = None
  if b"\x00" in raw:
    problem = "contains NUL bytes (binary file?)"
  else:
    try:
      return raw.decode("utf-8")
    except UnicodeDecodeError as e:
      problem = f"is not valid UTF-8 ({e.reason} at byte {e.start})"
  if strict:
    raise ValueError(f"text file {path} {problem}; remove it from data.globs")
  return None


def select_files(files: list[str], max_docs: int, max_bytes: int,
                 root: str | None = None) -> list[str]:
  """Chooses a deterministic, representative subset of `files`.

  Files are ordered by a salted hash of their document id (`doc_id` relative to `root`; None:
  `corpus_root(files)`), a fixed pseudo-random order independent of the split hash (so the
  split keeps its eval_fraction) and of the corpus location, and taken until `max_docs` files
  (0: no limit) or `max_bytes` bytes on disk (0: no limit) are reached; the result is sorted by
  path.
  """
  if not files or (not max_docs and not max_bytes):
    return list(files)
  root = corpus_root(files) if root is None else root
  chosen, total = [], 0
  for f in sorted(files, key=lambda f: doc_hash("select:" + doc_id(f, root))):
    if max_docs and len(chosen) >= max_docs:
      break
    size = file_size(f)
    if max_bytes and chosen and total + size > max_bytes:
      continue
    chosen.append(f)
    total += size
  return sorted(chosen)


def file_fingerprint(files: list[str]) -> list[tuple[str, int, int]]:
  """(path, size, mtime_ns) for each file: part of the cache key of prepared data."""
  out = []
  for f in files:
    if paths.is_local(f):
      st = os.stat(f)
      out.append((f, st.st_size, st.st_mtime_ns))
    else:
      st = epath.Path(f).stat()
      out.append((f, int(st.length), int(st.mtime)))
  return out


def file_size(path: str) -> int:
  """Size in bytes of a local or cloud file."""
  return os.path.getsize(path) if paths.is_local(path) else int(epath.Path(path).stat().length)


# ----------------------------------------------------------------------------------------------
# Synthetic corpus: several latent domains, each a random sparse Markov chain.


class SyntheticCorpus(NamedTuple):
  tokens: np.ndarray      # int32[N, L + 1] packed sequences
  domain: np.ndarray      # int32[N] domain of each sequence
  seq_id: np.ndarray      # int64[N] sequence ids (the split is hashed from them)
  successors: np.ndarray  # int32[num_domains, V, fanout] allowed next states per domain
  probs: np.ndarray       # float64[num_domains, V, fanout] their probabilities


def synthetic_chains(num_domains: int, vocab_size: int, seed: int, fanout: int = 8):
  """Random sparse transition tables, one per domain.

  Every state has `fanout` distinct successors with Dirichlet(1) probabilities; each domain
  draws its own successors, so the domains' bigram statistics differ while sharing tokens.

  Returns:
    successors int32[num_domains, V, fanout], probs float64[num_domains, V, fanout].
  """
  rng = np.random.default_rng([seed, 7919])
  fanout = min(fanout, vocab_size)
  keys = rng.random((num_domains, vocab_size, vocab_size))
  successors = np.argsort(keys, axis=-1)[..., :fanout].astype(np.int32)
  probs = rng.dirichlet(np.ones(fanout), size=(num_domains, vocab_size))
  return successors, probs


def _sample_chains(rng, successors_VxF, probs_VxF, n: int, length: int) -> np.ndarray:
  """int32[n, length] samples of one Markov chain (uniform start state)."""
  vocab = successors_VxF.shape[0]
  cdf_VxF = np.cumsum(probs_VxF, axis=-1)
  cdf_VxF[:, -1] = 1.0
  out = np.empty((n, length), dtype=np.int32)
  state = rng.integers(0, vocab, size=n)
  out[:, 0] = state
  for t in range(1, length):
    u = rng.random(n)
    j = (cdf_VxF[state] < u[:, None]).sum(axis=1)
    state = successors_VxF[state, j]
    out[:, t] = state
  return out


def synthetic_corpus(*, num_domains: int, vocab_size: int, doc_len: int, num_docs: int,
                     seq_len: int, seed: int) -> SyntheticCorpus:
  """Generates packed single-domain sequences of length seq_len + 1.

  Args:
    num_domains: int >= 1, number of latent domains (Markov chains).
    vocab_size: int >= 2, number of chain states (EOS is id vocab_size).
    doc_len: int; 0 or seq_len + 1 means one document per sequence (no EOS); otherwise each
      sequence packs documents of doc_len tokens separated by EOS, all from one domain (the
      last document is cut at the sequence end).
    num_docs: int, number of documents to generate.
    seq_len: int, model sequence length L.
    seed: int, corpus seed (independent of the training seed).
  """
  if num_domains < 1 or vocab_size < 2 or num_docs < 1 or doc_len < 0:
    raise ValueError(
        f"synthetic needs num_domains >= 1, vocab_size >= 2, num_docs >= 1, doc_len >= 0; "
        f"got {num_domains}, {vocab_size}, {num_docs}, {doc_len}")
  width = seq_len + 1
  if doc_len in (0, width):
    doc_len, per_seq = width, 1
  else:
    per_seq = -(-width // (doc_len + 1))
  num_seqs = num_docs // per_seq
  if num_seqs < 1:
    raise ValueError(f"synthetic: num_docs={num_docs} makes no sequence ({per_seq} per sequence)")
  successors, probs = synthetic_chains(num_domains, vocab_size, seed)
  rng = np.random.default_rng([seed, 104729])
  domain = np.arange(num_seqs, dtype=np.int32) % num_domains
  rng.shuffle(domain)
  tokens = np.empty((num_seqs, width), dtype=np.int32)
  for d in range(num_domains):
    rows = np.nonzero(domain == d)[0]
    if not len(rows):
      continue
    docs = _sample_chains(rng, successors[d], probs[d], len(rows) * per_seq, doc_len)
    if per_seq == 1:
      tokens[rows] = docs
    else:
      docs = docs.reshape(len(rows), per_seq, doc_len)
      eos = np.full((len(rows), per_seq, 1), vocab_size, dtype=np.int32)
      packed = np.concatenate([docs, eos], axis=-1).reshape(len(rows), -1)
      tokens[rows] = packed[:, :width]
  logging.info("synthetic corpus: %d sequences, %d domains", num_seqs, num_domains)
  return SyntheticCorpus(tokens, domain, np.arange(num_seqs, dtype=np.int64), successors, probs)
