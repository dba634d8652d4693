"""data.evalsets: the train.eval_sets syntax, its one-line errors, and the sets' data."""
import os

import pytest

from simbal_jax import env as env_lib
from simbal_jax.data import evalsets
from simbal_jax.data import pipeline

from conftest import text_cfg, tiny_config


def test_parse_inherits_the_run_data_fields_and_sets_the_argument(corpus):
  base = text_cfg(corpus, max_docs=7)
  sets = evalsets.parse_eval_sets(
      " same=text_files , syn=synthetic,web=jsonl:/d/a/*.jsonl.zst|/d/b/*.jsonl,"
      "ds=tfds:my_builder,", base)
  assert [n for n, _ in sets] == ["same", "syn", "web", "ds"]
  cfg = dict(sets)
  assert cfg["same"]["globs"] == corpus["glob"] and cfg["same"]["max_docs"] == 7
  assert cfg["syn"]["source"] == "synthetic" and cfg["syn"]["eval_fraction"] == 0.25
  assert cfg["web"]["globs"] == "/d/a/*.jsonl.zst,/d/b/*.jsonl"
  assert cfg["ds"]["tfds_name"] == "my_builder"
  assert evalsets.parse_eval_sets("", base) == evalsets.parse_eval_sets(None, base) == ()
  assert evalsets.parse_eval_sets(" , ", {"source": "tfds"}) == ()  # no set: data not checked


@pytest.mark.parametrize("spec,match", [
    ("py", r"entry 'py': expected name=source\[:arg\]"),
    ("p-y=stdlib", r"entry 'p-y=stdlib': expected name=source"),
    ("=stdlib", r"entry '=stdlib': expected"),
    ("py=stdlb", r"entry 'py=stdlb': unknown source 'stdlb'; valid: stdlib, "),
    ("py=stdlib:/x/*.py", r"entry 'py=stdlib:/x/\*.py': source 'stdlib' takes no ':' argument"),
    ("web=jsonl", r"entry 'web=jsonl': source 'jsonl' needs its files: web=jsonl:GLOB"),
    ("ds=tfds", r"entry 'ds=tfds': source 'tfds' needs its dataset: ds=tfds:NAME"),
    ("a=stdlib,a=synthetic", r"train.eval_sets: the name 'a' is given twice"),
])
def test_bad_entries_are_one_line_errors(spec, match):
  with pytest.raises(ValueError, match=match) as err:
    evalsets.parse_eval_sets(spec, {"source": "stdlib"})
  assert "\n" not in str(err.value)


def test_a_bad_entry_stops_the_run_before_any_data_is_prepared(tmp_path):
  cfg = tiny_config("lbl", steps=2, train=dict(eval_sets="syn=synthetic,web=parquet"))
  with pytest.raises(ValueError, match="entry 'web=parquet': source 'parquet' needs its files"):
    env_lib.build(cfg, str(tmp_path))
  assert not os.path.exists(tmp_path / "data")  # nothing prepared, nothing written


def test_sets_are_read_with_the_run_tokenizer_and_their_errors_name_them(corpus, tmp_path):
  run = pipeline.make_datasets(text_cfg(corpus), seq_len=16, batch_size=4,
                               workdir=corpus["workdir"], seed=0)
  sets = evalsets.parse_eval_sets("copy=text_files,syn=synthetic", text_cfg(corpus))
  kw = dict(seq_len=16, batch_size=4, workdir=corpus["workdir"], seed=0)
  (_, copy), (_, syn) = evalsets.make_eval_sets(sets, tokenizer=run.tokenizer, **kw)
  assert copy.tokenizer is run.tokenizer
  assert [b["inputs"].tolist() for b in copy.eval_batches(2)] == [
      b["inputs"].tolist() for b in run.eval_batches(2)]  # the run's own held-out split
  assert syn.has_domain and syn.tokenizer.name == "synthetic"
  empty = evalsets.parse_eval_sets(f"none=text_files:{tmp_path}/nothing/*.txt", text_cfg(corpus))
  with pytest.raises(ValueError, match="train.eval_sets set 'none': "):
    evalsets.make_eval_sets(empty, tokenizer=run.tokenizer, **kw)
