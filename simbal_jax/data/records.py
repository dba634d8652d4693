"""Record files as document sources: JSON Lines (plain, .gz, .zst) and Parquet, streamed.

Each record's text field is one document. Files are read record by record (a line of JSON, a
Parquet batch of rows), never whole, so DCLM shards (`.jsonl.zst`) and Hugging Face Parquet
files are used as they are; no TensorFlow. A document's id is `<stem>:<index>`: the file's path
relative to the corpus root without its format and compression suffixes, and the 0-based line
(JSON Lines, blank lines counted) or row (Parquet). The id, and so the split by its hash, depends
neither on where the corpus lies nor on how a shard is compressed or stored. Files may be local
or cloud paths (`gs://`, read through etils.epath).
"""
from __future__ import annotations

import contextlib
import gzip
import io
import json
from typing import Iterator

from simbal_jax.runio import paths
from simbal_jax.data import sources

FORMATS = ("jsonl", "parquet")
_COMPRESSION = (".gz", ".zst", ".zstd")
_FORMAT_SUFFIXES = (".jsonl", ".ndjson", ".json", ".parquet")
_PARQUET_BATCH_ROWS = 1024


def record_id(path: str, root: str, index: int) -> str:
  """Id of record `index` of file `path`: `<relative path less suffixes>:<index>`."""
  stem = sources.doc_id(path, root)
  for suffixes in (_COMPRESSION, _FORMAT_SUFFIXES):
    for s in suffixes:
      if stem.endswith(s) and len(stem) > len(s):
        stem = stem[:-len(s)]
        break
  return f"{stem}:{index}"


def compression(path: str) -> str:
  """The compression suffix of `path` ("" when plain)."""
  return next((s for s in _COMPRESSION if path.endswith(s)), "")


@contextlib.contextmanager
def _open_binary(path: str, raw_wrapper=None):
  """A buffered binary stream of the decompressed bytes of `path` (by its suffix).

  `raw_wrapper`, if given, wraps the file object first (`_CountingReader`: bytes read).
  """
  with paths.resolve(path).open("rb") as raw:
    if raw_wrapper is not None:  # a small buffer: the count runs little ahead of the reader
      raw = io.BufferedReader(raw_wrapper(raw), buffer_size=1 << 16)
    if path.endswith(".gz"):
      with gzip.GzipFile(fileobj=raw, mode="rb") as f:
        yield f
    elif path.endswith((".zst", ".zstd")):
      import zstandard  # pylint: disable=g-import-not-at-top
      # Shards written in several frames (or with --long) are read to the end.
      reader = zstandard.ZstdDecompressor(max_window_size=2**31).stream_reader(
          raw, read_across_frames=True, closefd=False)
      with io.BufferedReader(reader, buffer_size=1 << 20) as f:
        yield f
    else:
      yield raw


def _check_text(value, where: str, field: str) -> str | None:
  if value is None:
    return None
  if isinstance(value, bytes):
    try:
      value = value.decode("utf-8")
    except UnicodeDecodeError as e:
      raise ValueError(f"{where}: field {field!r} is not valid UTF-8 ({e.reason})") from e
  if not isinstance(value, str):
    raise ValueError(f"{where}: field {field!r} holds {type(value).__name__}, not text "
                     "(data.text_field)")
  return value


def iter_jsonl(path: str, field: str, keep=None,
               raw_wrapper=None) -> Iterator[tuple[int, str | None]]:
  """Yields `(line index, text or None)` for each non-blank line of a JSON Lines file.

  `keep(line index) -> bool`, if given, skips the other lines unparsed (a host that wants
  only the validation records of a file it does not train on).

  Raises:
    ValueError: naming the file and line, for a line that is not a JSON object, an object
      without `field`, or a field that is not a string (null gives None: no document).
  """
  errors = (OSError, EOFError)  # unreadable, truncated or corrupt compressed file
  if path.endswith((".zst", ".zstd")):
    import zstandard  # pylint: disable=g-import-not-at-top
    errors += (zstandard.ZstdError,)
  try:
    with _open_binary(path, raw_wrapper) as f:
      for i, line in enumerate(f):
        if not line.strip() or (keep is not None and not keep(i)):
          continue
        where = f"{path}:{i + 1}"
        try:
          record = json.loads(line)
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
          raise ValueError(f"{where}: not a line of JSON ({e})") from e
        if not isinstance(record, dict):
          raise ValueError(f"{where}: a JSON {type(record).__name__}, not an object")
        if field not in record:
          raise ValueError(f"{where}: record has no field {field!r} (data.text_field); "
                           f"fields: {sorted(record)[:20]}")
        yield i, _check_text(record[field], where, field)
  except errors as e:
    raise ValueError(f"cannot read {path}: {type(e).__name__}: {e}") from e


def _parquet_file(path: str):
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  try:  # a cloud file is read through epath (seekable), a local one by pyarrow itself
    return pq.ParquetFile(path if paths.is_local(path) else paths.resolve(path).open("rb"))
  except Exception as e:  # pyarrow raises ArrowInvalid / OSError for a non-Parquet file
    raise ValueError(f"cannot read {path} as Parquet: {type(e).__name__}: {e}") from e


def iter_parquet(path: str, field: str, keep=None) -> Iterator[tuple[int, str | None]]:
  """Yields `(row index, text or None)` for each row of a Parquet file, batch by batch
  (only the rows `keep(row index)` accepts, when given).

  Raises:
    ValueError: naming the file, when it is not Parquet or has no column `field`.
  """
  pfile = _parquet_file(path)
  names = pfile.schema_arrow.names
  if field not in names:
    raise ValueError(f"{path}: no column {field!r} (data.text_field); columns: {names[:20]}")
  row = 0
  for batch in pfile.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=[field]):
    for value in batch.column(0).to_pylist():
      if keep is None or keep(row):
        yield row, _check_text(value, f"{path} row {row}", field)
      row += 1


def iter_documents(fmt: str, files: list[str], root: str, field: str,
                   max_docs: int = 0) -> Iterator[tuple[str, str]]:
  """Yields `(doc_id, text)` of the non-empty documents of `files`, in file then record order.

  Args:
    fmt: "jsonl" or "parquet".
    files: sorted file paths.
    root: corpus root; ids are relative to it (`record_id`).
    field: name of the text field / column.
    max_docs: int, 0 = all documents, else the first max_docs.
  """
  n = 0
  for path in files:
    for doc_id, text in iter_file_documents(fmt, path, root, field):
      yield doc_id, text
      n += 1
      if max_docs and n >= max_docs:
        return


def iter_file_documents(fmt: str, path: str, root: str, field: str,
                        keep_id=None) -> Iterator[tuple[str, str]]:
  """Yields `(doc_id, text)` of the non-empty documents of one file, in record order; with
  `keep_id(doc_id) -> bool` only those it accepts (the others are not parsed, as JSON Lines)."""
  if fmt not in FORMATS:
    raise ValueError(f"unknown record format {fmt!r}; valid: {FORMATS}")
  stem = record_id(path, root, 0)[:-len(":0")]
  keep = None if keep_id is None else (lambda i: keep_id(f"{stem}:{i}"))
  read = iter_jsonl if fmt == "jsonl" else iter_parquet
  for index, text in read(path, field, keep):
    if text is None or not text.strip():
      continue
    yield f"{stem}:{index}", text


class _CountingReader(io.RawIOBase):
  """A read-only file object that counts the bytes read through it."""

  def __init__(self, f):
    super().__init__()
    self._f, self.count = f, 0

  def readable(self):
    return True

  def readinto(self, buffer):
    data = self._f.read(len(buffer))
    buffer[:len(data)] = data
    self.count += len(data)
    return len(data)


def sample_text(fmt: str, path: str, field: str,
                max_text_bytes: int = 4 << 20) -> tuple[float, list[str]]:
  """(UTF-8 text bytes per byte of the file, the texts read) from the start of one file.

  JSON Lines (plain or compressed) are read until `max_text_bytes` of text, counting the file's
  bytes consumed (decompressors read ahead, so a compressed file's ratio is a little low);
  Parquet's ratio comes from its footer: the text column's uncompressed size over the file's.
  """
  texts, size = [], 0
  if fmt == "parquet":
    meta = _parquet_file(path).metadata
    cols = [meta.schema.column(j).name for j in range(meta.num_columns)]
    if field not in cols:
      raise ValueError(f"{path}: no column {field!r} (data.text_field); columns: {cols[:20]}")
    j = cols.index(field)
    text = sum(meta.row_group(g).column(j).total_uncompressed_size
               for g in range(meta.num_row_groups))
    for _, t in iter_parquet(path, field):
      if t:
        texts.append(t)
        size += len(t.encode("utf-8"))
      if size >= max_text_bytes:
        break
    return text / max(1, sources.file_size(path)), texts
  counter = []

  def wrap(raw):
    counter.append(_CountingReader(raw))
    return counter[0]

  for _, t in iter_jsonl(path, field, raw_wrapper=wrap):
    if t:
      texts.append(t)
      size += len(t.encode("utf-8"))
    if size >= max_text_bytes:
      break
  return size / max(1, counter[0].count if counter else 1), texts
