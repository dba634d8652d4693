"""Tokenizers: bytes, SentencePiece (trained on the training split, cached) and cl100k_base.

Every tokenizer exposes `encode(str) -> list[int]`, `decode(list[int]) -> str`, `vocab_size`
and `eos_id`. Packing inserts `eos_id` between documents; no padding id is needed because
sequences are packed to full length.

Token ids:
  bytes          0..255 are the UTF-8 bytes, 256 is EOS; vocab_size 257.
  sentencepiece  0 is <unk>, 1 is EOS (</s>), byte-fallback pieces <0x00>..<0xFF>, then the
                 learned pieces; vocab_size == sp_vocab_size. Trained with identity
                 normalisation and no whitespace stripping so source code keeps its indentation.
  cl100k         the cl100k_base vocabulary (the paper's tokenizer) read from the file shipped in
                 the `bpe-openai` wheel (MIT licence); EOS is <|endoftext|> = 100257;
                 vocab_size = n_vocab = 100277 (ids 100261..100275 are unused).
  synthetic      0..V-1 are the Markov-chain states, V is EOS; vocab_size V + 1.
"""
from __future__ import annotations

import base64
import gzip
import hashlib
import io
import logging
import os
import socket
import warnings
from typing import Iterable, Sequence

TOKENIZERS = ("bytes", "sentencepiece", "cl100k")

CL100K_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
    r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s""")
CL100K_SPECIAL_TOKENS = {
    "<|endoftext|>": 100257,
    "<|fim_prefix|>": 100258,
    "<|fim_middle|>": 100259,
    "<|fim_suffix|>": 100260,
    "<|endofprompt|>": 100276,
}
CL100K_VOCAB_SIZE = 100277
# bpe_openai refuses a string of 1M characters or one giving > 200k tokens: longer texts are
# split at newlines (and halved again on a token-limit error).
_CL100K_MAX_CHARS = 100_000


class BytesTokenizer:
  """UTF-8 bytes as tokens: ids 0..255, EOS 256, vocab 257."""

  name = "bytes"
  vocab_size = 257
  eos_id = 256

  def encode(self, text: str) -> list[int]:
    """Encodes `text` to its UTF-8 byte values (list of ints in [0, 256))."""
    return list(text.encode("utf-8"))

  def encode_array(self, text: str):
    """Like `encode` but returns uint8[n] without a Python list (fast path for packing)."""
    import numpy as np  # pylint: disable=g-import-not-at-top
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)

  def decode(self, ids: Sequence[int]) -> str:
    """Decodes ids back to text; EOS and out-of-range ids are dropped, bad UTF-8 replaced."""
    return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

  @property
  def fingerprint(self) -> str:
    return "bytes-v1"


class SyntheticTokenizer:
  """Tokenizer of the synthetic source: ids 0..V-1 are chain states, V is EOS.

  Text form is whitespace-separated integers, so `decode(encode(s))` round-trips.
  """

  name = "synthetic"

  def __init__(self, num_states: int):
    self.num_states = int(num_states)
    self.vocab_size = self.num_states + 1
    self.eos_id = self.num_states

  def encode(self, text: str) -> list[int]:
    """Parses whitespace-separated ints in [0, vocab_size)."""
    ids = [int(t) for t in text.split()]
    bad = [i for i in ids if not 0 <= i < self.vocab_size]
    if bad:
      raise ValueError(f"synthetic token ids out of range [0, {self.vocab_size}): {bad[:5]}")
    return ids

  def decode(self, ids: Sequence[int]) -> str:
    """Formats ids as whitespace-separated ints."""
    return " ".join(str(int(i)) for i in ids)

  @property
  def fingerprint(self) -> str:
    return f"synthetic-{self.num_states}"


def cl100k_file() -> str:
  """Path of `cl100k_base.tiktoken.gz` inside the installed `bpe-openai` wheel.

  Raises:
    FileNotFoundError: package or file missing (never downloads anything).
  """
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.find_spec("bpe_openai")  # locate without importing (import loads data)
  if spec is None or not spec.origin:
    raise FileNotFoundError(
        "tokenizer 'cl100k' needs the PyPI package `bpe-openai` (it ships "
        "bpe_openai/data/cl100k_base.tiktoken.gz): pip install bpe-openai")
  path = os.path.join(os.path.dirname(spec.origin), "data", "cl100k_base.tiktoken.gz")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"cl100k_base vocabulary file missing: {path} (reinstall bpe-openai)")
  return path


def load_cl100k_ranks(path: str | None = None) -> dict[bytes, int]:
  """Reads the mergeable ranks (token bytes -> id) of cl100k_base from the .tiktoken.gz file."""
  path = path or cl100k_file()
  ranks = {}
  with gzip.open(path, "rt", encoding="utf-8") as f:
    for line in f:
      if line.strip():
        token_b64, rank = line.split()
        ranks[base64.b64decode(token_b64)] = int(rank)
  return ranks


def tiktoken_cl100k(ranks: dict[bytes, int] | None = None):
  """A `tiktoken.Encoding` for cl100k_base built from local ranks (never downloads)."""
  import tiktoken  # pylint: disable=g-import-not-at-top
  return tiktoken.Encoding(
      "cl100k_base", pat_str=CL100K_PATTERN, mergeable_ranks=ranks or load_cl100k_ranks(),
      special_tokens=dict(CL100K_SPECIAL_TOKENS))


def _split_long(text: str, limit: int) -> list[str]:
  """Splits `text` into pieces of at most `limit` chars, preferably just after a newline."""
  pieces = []
  while len(text) > limit:
    cut = text.rfind("\n", 0, limit) + 1
    if cut <= 0:
      cut = limit
    pieces.append(text[:cut])
    text = text[cut:]
  pieces.append(text)
  return pieces


class Cl100kTokenizer:
  """cl100k_base (GPT-4's tokenizer, used by the paper) through the `bpe-openai` Rust encoder.

  bpe-openai encodes ~2x faster than tiktoken on Python source and gives identical ids; the
  vocabulary file is checked before anything else so a missing file is an immediate error.
  Special-token text inside documents is encoded as ordinary text.
  """

  name = "cl100k"
  vocab_size = CL100K_VOCAB_SIZE
  eos_id = CL100K_SPECIAL_TOKENS["<|endoftext|>"]

  def __init__(self):
    cl100k_file()
    with warnings.catch_warnings():  # bpe_openai uses a deprecated importlib.resources call
      warnings.simplefilter("ignore", DeprecationWarning)
      import bpe_openai  # pylint: disable=g-import-not-at-top
      self._enc = bpe_openai.get_encoding("cl100k_base")
    self._limit_error = bpe_openai.TokenLimitError
    if self._enc.n_vocab != CL100K_VOCAB_SIZE:
      raise ValueError(f"unexpected cl100k vocabulary size {self._enc.n_vocab}")

  def encode(self, text: str) -> list[int]:
    """Encodes `text` (special-token strings are treated as plain text)."""
    ids = []
    for piece in _split_long(text, _CL100K_MAX_CHARS):
      ids.extend(self._encode_piece(piece))
    return ids

  def _encode_piece(self, text: str) -> list[int]:
    try:
      return self._enc.encode_ordinary(text)
    except self._limit_error:
      if len(text) < 2:
        raise
      halves = _split_long(text, len(text) // 2 + 1)
      return [i for half in halves for i in self._encode_piece(half)]

  def decode(self, ids: Sequence[int]) -> str:
    """Decodes ids to text (invalid UTF-8 replaced)."""
    return self._enc.decode([int(i) for i in ids])

  @property
  def fingerprint(self) -> str:
    return "cl100k_base"


class SentencePieceTokenizer:
  """A SentencePiece model loaded from `model_path`."""

  name = "sentencepiece"

  def __init__(self, model_path: str):
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top
    self.model_path = model_path
    self._sp = spm.SentencePieceProcessor(model_file=model_path)
    self.vocab_size = int(self._sp.get_piece_size())
    self.eos_id = int(self._sp.eos_id())
    with open(model_path, "rb") as f:
      self._digest = hashlib.sha1(f.read()).hexdigest()[:16]

  def encode(self, text: str) -> list[int]:
    """Encodes `text` to piece ids."""
    return self._sp.encode(text)

  def decode(self, ids: Sequence[int]) -> str:
    """Decodes piece ids to text."""
    return self._sp.decode([int(i) for i in ids])

  @property
  def fingerprint(self) -> str:
    return f"sp-{self._digest}"


def _sp_sentences(texts: Iterable[str], max_chars: int) -> Iterable[str]:
  """Non-empty lines of `texts`, at most `max_chars` characters in total."""
  total = 0
  for text in texts:
    for line in text.splitlines():
      if not line.strip():
        continue
      line = line[:4096]
      yield line
      total += len(line)
      if total >= max_chars:
        return


def train_sentencepiece(texts: Iterable[str], model_path: str, *, vocab_size: int,
                        max_chars: int = 2_000_000) -> str:
  """Trains a SentencePiece BPE model on (a bounded sample of) `texts`; writes `model_path`.

  Args:
    texts: iterable of str documents (the training split only).
    model_path: where to write the model (written atomically).
    vocab_size: int, total vocabulary incl. <unk>, EOS and 256 byte-fallback pieces.
    max_chars: int, training sample size in characters (bounds training time).

  Returns:
    `model_path`.
  """
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  if vocab_size < 300:
    raise ValueError(f"sp_vocab_size must be >= 300 (256 byte pieces + specials), got {vocab_size}")
  sentences = list(_sp_sentences(texts, max_chars))
  if not sentences:
    raise ValueError("cannot train SentencePiece: the training split has no text")
  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model, vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, character_coverage=0.9995,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        split_digits=True, allow_whitespace_only_pieces=True, unk_id=0, eos_id=1, bos_id=-1,
        pad_id=-1, num_threads=max(1, min(8, os.cpu_count() or 1)), minloglevel=2,
        hard_vocab_limit=False)
  except RuntimeError as e:
    raise ValueError(f"SentencePiece training failed (sp_vocab_size={vocab_size} may be too "
                     f"large for a {sum(map(len, sentences))}-character sample): {e}") from e
  os.makedirs(os.path.dirname(model_path) or ".", exist_ok=True)
  tmp = f"{model_path}.tmp{socket.gethostname()}.{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(model.getvalue())
  os.replace(tmp, model_path)
  logging.info("trained SentencePiece (vocab %d) on %d lines -> %s", vocab_size,
               len(sentences), model_path)
  return model_path


def check_tokenizer_name(name: str) -> None:
  """Raises ValueError naming the valid tokenizers when `name` is not one of them."""
  if name not in TOKENIZERS:
    raise ValueError(f"unknown tokenizer {name!r}; valid: {', '.join(TOKENIZERS)}")
