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

from simbal_jax import paths
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


@contextlib.contextmanager
def _open_binary(path: str):
  """A buffered binary stream of the decompressed bytes of `path` (by its suffix)."""
  with paths.resolve(path).open("rb") as raw:
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


def iter_jsonl(path: str, field: str) -> Iterator[tuple[int, str | None]]:
  """Yields `(line index, text or None)` for each non-blank line of a JSON Lines file.

  Raises:
    ValueError: naming the file and line, for a line that is not a JSON object, an object
      without `field`, or a field that is not a string (null gives None: no document).
  """
  errors = (OSError, EOFError)  # unreadable, truncated or corrupt compressed file
  if path.endswith((".zst", ".zstd")):
    import zstandard  # pylint: disable=g-import-not-at-top
    errors += (zstandard.ZstdError,)
  try:
    with _open_binary(path) as f:
      for i, line in enumerate(f):
        if not line.strip():
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


def iter_parquet(path: str, field: str) -> Iterator[tuple[int, str | None]]:
  """Yields `(row index, text or None)` for each row of a Parquet file, batch by batch.

  Raises:
    ValueError: naming the file, when it is not Parquet or has no column `field`.
  """
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  try:  # a cloud file is read through epath (seekable), a local one by pyarrow itself
    pfile = pq.ParquetFile(path if paths.is_local(path) else paths.resolve(path).open("rb"))
  except Exception as e:  # pyarrow raises ArrowInvalid / OSError for a non-Parquet file
    raise ValueError(f"cannot read {path} as Parquet: {type(e).__name__}: {e}") from e
  names = pfile.schema_arrow.names
  if field not in names:
    raise ValueError(f"{path}: no column {field!r} (data.text_field); columns: {names[:20]}")
  row = 0
  for batch in pfile.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=[field]):
    for value in batch.column(0).to_pylist():
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
  if fmt not in FORMATS:
    raise ValueError(f"unknown record format {fmt!r}; valid: {FORMATS}")
  read = iter_jsonl if fmt == "jsonl" else iter_parquet
  n = 0
  for path in files:
    for index, text in read(path, field):
      if text is None or not text.strip():
        continue
      yield record_id(path, root, index), text
      n += 1
      if max_docs and n >= max_docs:
        return
