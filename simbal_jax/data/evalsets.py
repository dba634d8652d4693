"""Extra evaluation sets (`train.eval_sets`): their syntax, their checks and their data.

  train.eval_sets = "py=stdlib,syn=synthetic,web=jsonl:/data/web/*.jsonl.zst|/data/x/*.jsonl"

Comma-separated entries `name=source[:arg]`; `name` (letters, digits, `_`; unique) is the
metrics' prefix `eval_<name>/`, `source` one of `sources.SOURCES`, and `arg`:
  text_files, jsonl, parquet  the files: globs separated by `|` (`data.globs` of that set);
  tfds                        the dataset name or prepared builder directory (`data.tfds_name`);
  stdlib, synthetic           none.
Every other data field is the run's (`data.*`: eval_fraction, max_docs, max_bytes, text_field,
synthetic.*, document_mask, ...), so an extra set is the held-out split that a run trained on
that source would hold out, and it is read with the run's tokenizer (the `tokenizer` argument of
`make_eval_sets`; a synthetic set has its own token ids). Without `arg`, a set of the run's own
source takes the run's `data.globs` / `data.tfds_name` (another source needs its own).

`parse_eval_sets` checks the syntax, the names and every set's resolved data config (one line
naming the entry, before any data is prepared); `make_eval_sets` prepares each set through
`pipeline.make_datasets` (cached like the run's data).
"""
from __future__ import annotations

import re

from simbal_jax.data import pipeline
from simbal_jax.data import sources

# The data field that a source's `arg` sets (the sources absent take none).
ARG_FIELDS = {"text_files": "globs", "jsonl": "globs", "parquet": "globs", "tfds": "tfds_name"}
_NAME = re.compile(r"^[A-Za-z0-9_]+$")
SYNTAX = "name=source[:arg] (e.g. py=stdlib, syn=synthetic, web=jsonl:/data/*.jsonl.zst)"


def _entry_cfg(entry: str, base: dict) -> tuple[str, dict]:
  """(name, resolved data config) of one `name=source[:arg]` entry; raises ValueError."""
  where = f"train.eval_sets entry {entry!r}"
  name, eq, rest = entry.partition("=")
  name = name.strip()
  if not eq or not _NAME.match(name):
    raise ValueError(f"{where}: expected {SYNTAX}; the name is letters, digits and _")
  source, colon, arg = rest.strip().partition(":")
  source, arg = source.strip(), arg.strip()
  if source not in sources.SOURCES:
    raise ValueError(f"{where}: unknown source {source!r}; valid: {', '.join(sources.SOURCES)}")
  cfg = dict(base, source=source, synthetic=dict(base["synthetic"]))
  field = ARG_FIELDS.get(source)
  if colon and field is None:
    raise ValueError(f"{where}: source {source!r} takes no ':' argument (it uses the run's "
                     "data.* settings)")
  if field is not None:
    if arg:
      cfg[field] = ",".join(g.strip() for g in arg.split("|")) if field == "globs" else arg
    elif source != base["source"] or not str(base[field]).strip(" ,"):
      what = ("files", "GLOB[|GLOB...]") if field == "globs" else ("dataset", "NAME")
      raise ValueError(f"{where}: source {source!r} needs its {what[0]}: "
                       f"{name}={source}:{what[1]}")
  try:
    return name, pipeline.resolve_config(cfg)
  except ValueError as e:
    raise ValueError(f"{where}: {e}") from None


def parse_eval_sets(spec, data_cfg) -> tuple[tuple[str, dict], ...]:
  """The extra evaluation sets of `train.eval_sets`, checked (see the module docstring).

  Args:
    spec: str, comma-separated `name=source[:arg]` entries ("" or None: no extra set).
    data_cfg: the run's cfg.data (ConfigDict or dict), whose fields each set inherits.
  Returns:
    ((name, resolved data config dict), ...) in the order given.
  Raises:
    ValueError: one line naming the entry: bad syntax or name, a repeated name, an unknown
      source, a missing or unexpected argument, or a bad inherited data field.
  """
  entries = [e.strip() for e in str(spec or "").split(",") if e.strip()]
  if not entries:
    return ()  # the run's data config is checked where it is prepared
  base = pipeline.resolve_config(data_cfg)
  out, seen = [], set()
  for entry in entries:
    name, cfg = _entry_cfg(entry, base)
    if name in seen:
      raise ValueError(f"train.eval_sets: the name {name!r} is given twice")
    seen.add(name)
    out.append((name, cfg))
  return tuple(out)


def make_eval_sets(sets, *, tokenizer, seq_len: int, batch_size: int, workdir, seed: int,
                   process_index: int = 0, process_count: int = 1):
  """Prepares every set of `parse_eval_sets` (`pipeline.make_datasets`, eval_only).

  Args:
    sets: ((name, data config dict), ...) from `parse_eval_sets`.
    tokenizer: the run's tokenizer (`Datasets.tokenizer`); a synthetic run's (token ids, no
      text) is not used: text sets then take `data.tokenizer`'s (bytes or cl100k).
    seq_len, batch_size, workdir, seed, process_index, process_count: as the run's data
      (`pipeline.make_datasets`).
  Returns:
    ((name, pipeline.Datasets), ...); evaluate with `Datasets.eval_batches`.
  Raises:
    ValueError: a set's data error (no files, a split smaller than one global batch, ...),
      naming the set.
  """
  text_tok = tokenizer if getattr(tokenizer, "name", "synthetic") != "synthetic" else None
  out = []
  for name, cfg in sets:
    if text_tok is None and cfg["source"] != "synthetic" and cfg["tokenizer"] == "sentencepiece":
      raise ValueError(f"train.eval_sets set {name!r}: a synthetic-data run has no text "
                       "tokenizer to read it with; use data.tokenizer=bytes or cl100k")
    try:
      ds = pipeline.make_datasets(
          cfg, seq_len=seq_len, batch_size=batch_size, workdir=workdir, seed=seed,
          process_index=process_index, process_count=process_count, tokenizer=text_tok,
          eval_only=True)
    except ValueError as e:
      raise ValueError(f"train.eval_sets set {name!r}: {e}") from None
    out.append((name, ds))
  return tuple(out)
