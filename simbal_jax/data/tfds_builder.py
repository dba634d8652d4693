"""The project's own TFDS builder: local text files -> array_record train/validation splits.

Local text (the stdlib corpus, user globs) goes through a real `GeneratorBasedBuilder` writing
`file_format="array_record"`, so the same reading path (`builder_from_directory(...)
.as_data_source(split)`) serves local files and any prepared TFDS dataset, with no TensorFlow.
Prepared data lives in `<cache_dir>/tfds/<key>/`, where the key hashes the file list (paths,
sizes, mtimes), the corpus root and the split parameters: a second run with the same parameters
reuses it (without reading the files again). Records are keyed and split by the document id, the
path relative to the corpus root, so the split and the record order do not depend on where the
corpus lies.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time

from simbal_jax.runio import paths
from simbal_jax.data import sources

BUILDER_NAME = "simbal_text_corpus"
_VERSION = "1.0.0"
_builder_class = None


def _get_builder_class():
  """Defines the builder class on first use (keeps tensorflow_datasets a lazy import)."""
  global _builder_class
  if _builder_class is not None:
    return _builder_class
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  class SimbalTextCorpus(tfds.core.GeneratorBasedBuilder):
    """Text documents split by document hash into train / validation."""

    name = BUILDER_NAME
    VERSION = tfds.core.Version(_VERSION)
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    # No code directory / checksums file: avoids tfds' lookup of the defining module's resources
    # (which needs the optional `importlib_resources` package) and there is nothing to download.
    code_path = None
    url_infos = None

    def __init__(self, *, files=(), root=None, eval_fraction=0.05, strict=True, **kwargs):
      self._files = list(files)
      self._root = sources.corpus_root(self._files) if root is None and self._files else root
      self._eval_fraction = float(eval_fraction)
      self._strict = strict
      super().__init__(**kwargs)

    # tfds prints "Downloading and preparing dataset Unknown size..." and "...downloaded and
    # prepared" to stdout: misleading for local files (nothing is downloaded). Logged instead.
    def _log_download_bytes(self):
      logging.info("writing %s (%d local files) to %s", self.name, len(self._files),
                   self.data_dir)

    def _log_download_done(self):
      pass  # prepare_text_corpus logs the result

    def _info(self):
      # Built directly: dataset_info_from_configs needs a registered package layout.
      return tfds.core.DatasetInfo(
          builder=self,
          description="Local UTF-8 text documents (one file = one document).",
          features=tfds.features.FeaturesDict({
              "id": tfds.features.Text(),
              "text": tfds.features.Text(),
          }),
      )

    def _split_generators(self, dl_manager):
      del dl_manager
      return {
          "train": self._generate_examples(False),
          "validation": self._generate_examples(True),
      }

    def _generate_examples(self, want_eval):
      for path in self._files:
        doc_id = sources.doc_id(path, self._root)
        if sources.is_eval_doc(doc_id, self._eval_fraction) != want_eval:
          continue
        text = sources.read_text(path, strict=self._strict)
        if text is None or not text.strip():
          continue
        yield doc_id, {"id": doc_id, "text": text}

  _builder_class = SimbalTextCorpus
  return _builder_class


def cache_key(payload) -> str:
  """Short stable hash of a JSON-serialisable payload."""
  blob = json.dumps(payload, sort_keys=True, default=str).encode("utf-8")
  return hashlib.sha1(blob).hexdigest()[:16]


def check_text_files(files: list[str]) -> None:
  """Raises ValueError naming every file of `files` that is unreadable or not UTF-8 text."""
  bad = []
  for f in files:
    try:
      sources.read_text(f, strict=True)
    except ValueError as e:
      bad.append(str(e))
  if len(bad) == 1:
    raise ValueError(bad[0])
  if bad:
    raise ValueError(f"{len(bad)} files of data.globs are unreadable or not text: " +
                     "; ".join(bad))


def text_corpus_dir(files: list[str], *, eval_fraction: float, cache_dir: str, strict: bool,
                    tag: str, root: str | None = None) -> str:
  """The builder directory `prepare_text_corpus` writes for these arguments (nothing written).

  Raises:
    ValueError: the files give an empty train or validation split.
  """
  root = sources.corpus_root(files) if root is None and files else root
  n_eval = sum(sources.is_eval_doc(sources.doc_id(f, root), eval_fraction) for f in files)
  if n_eval == 0 or n_eval == len(files):
    if strict:  # an unreadable or binary file is the cause to name, even when it is the only one
      check_text_files(files)
    raise ValueError(
        f"{tag}: {len(files)} documents give an empty {'validation' if n_eval == 0 else 'train'}"
        f" split with eval_fraction={eval_fraction}; add documents or change data.eval_fraction")
  # The key covers every file's size and mtime: a cached dataset needs no second read.
  key = cache_key({"v": 2, "files": sources.file_fingerprint(files), "root": paths.absolute(root),
                   "eval_fraction": eval_fraction, "strict": strict})
  return os.path.join(cache_dir, "tfds", f"{tag}_{key}", BUILDER_NAME, _VERSION)


def prepare_text_corpus(files: list[str], *, eval_fraction: float, cache_dir: str,
                        strict: bool, tag: str, root: str | None = None) -> str:
  """Writes (or reuses) the array_record dataset of `files`; returns its builder directory.

  Args:
    files: sorted list of text file paths (one document each).
    eval_fraction: float in [0, 1), share of documents held out (by document-id hash).
    cache_dir: str, root of the data cache.
    strict: bool; True turns an unreadable or binary file into a ValueError naming it (user
      globs), False skips such files with a log line (the stdlib has a few on purpose).
    tag: str, short name of the source for the directory name.
    root: str, corpus root; document ids are paths relative to it (`sources.doc_id`). None:
      `sources.corpus_root(files)`.
  """
  root = sources.corpus_root(files) if root is None and files else root
  expected = text_corpus_dir(files, eval_fraction=eval_fraction, cache_dir=cache_dir,
                             strict=strict, tag=tag, root=root)
  data_dir = os.path.dirname(os.path.dirname(expected))
  cls = _get_builder_class()
  builder = cls(files=files, root=root, eval_fraction=eval_fraction, strict=strict,
                data_dir=data_dir, file_format="array_record")
  builder_dir = str(builder.data_dir)
  if os.path.normpath(builder_dir) != os.path.normpath(expected):  # tfds changed its layout
    raise RuntimeError(f"TFDS wrote the corpus to {builder_dir}, not {expected}")
  if os.path.isfile(os.path.join(builder_dir, "dataset_info.json")):
    return builder_dir
  if strict:  # every file is valid text before anything is written, so errors come first
    check_text_files(files)
  start = time.time()
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    tfds.disable_progress_bar()
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(
            download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS))
  except Exception:  # another host sharing the cache may have finished first: use its copy
    if not os.path.isfile(os.path.join(builder_dir, "dataset_info.json")):
      raise
  logging.info("prepared %s (%d files) in %.1f s -> %s", tag, len(files), time.time() - start,
               builder_dir)
  return builder_dir


def read_split(builder_dir: str, split: str, text_key: str = "text", max_docs: int = 0):
  """Yields `(doc_id, text)` of one split of a prepared array_record dataset.

  Args:
    builder_dir: directory holding dataset_info.json (…/name/config/version).
    split: split name ("train", "validation", "train[:90%]", …).
    text_key: feature holding the text.
    max_docs: int, 0 = all records, else the first max_docs records.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  source = tfds.builder_from_directory(builder_dir).as_data_source(split=split)
  yield from iter_records(source, text_key, max_docs, where=f"{builder_dir} [{split}]")


def num_records(source, max_docs: int = 0) -> int:
  """Records of a random-access source that are read: all, or the first max_docs."""
  return min(len(source), max_docs) if max_docs else len(source)


def iter_records(source, text_key: str, max_docs: int, where: str, start: int = 0,
                 stop: int | None = None):
  """Yields (doc_id, text) from a random-access TFDS data source.

  Args:
    max_docs: int, 0 = every record, else only the first max_docs records.
    start, stop: the record range [start, stop) read (None: to the end), clipped to max_docs.
  """
  n = num_records(source, max_docs)
  for i in range(start, n if stop is None else min(stop, n)):
    record = source[i]
    if text_key not in record:
      raise ValueError(f"{where}: records have no feature {text_key!r} (data.tfds_text_key); "
                       f"features: {sorted(record)}")
    text = record[text_key]
    if isinstance(text, bytes):
      text = text.decode("utf-8", errors="replace")
    doc_id = record.get("id", i)
    if isinstance(doc_id, bytes):
      doc_id = doc_id.decode("utf-8", errors="replace")
    yield str(doc_id), str(text)
