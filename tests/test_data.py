"""Tests of simbal_jax.data: tokenizers, sources, split, packing, iterator state, sharding, errors.

Everything runs on tiny corpora written to tmp dirs (and a 30-file slice of the stdlib).
Expected values come from independent computations (hashlib, plain byte strings, tiktoken).
"""
import glob
import hashlib
import json
import os
import re

import numpy as np
import pytest

from simbal_jax.data import pipeline
from simbal_jax.data import sources
from simbal_jax.data import tfds_builder
from simbal_jax.data import tokenizers

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi "
         "rho sigma tau upsilon phi chi psi omega def class return import yield lambda").split()


def _write_corpus(root, num_files=40, lines=30, seed=0):
  rng = np.random.default_rng(seed)
  os.makedirs(root, exist_ok=True)
  for i in range(num_files):
    body = "\n".join(" ".join(rng.choice(WORDS, size=8)) for _ in range(lines))
    with open(os.path.join(root, f"doc_{i:03d}.txt"), "w", encoding="utf-8") as f:
      f.write(f"# document {i}\n{body}\n")
  return root


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  base = tmp_path_factory.mktemp("data")
  root = _write_corpus(str(base / "txt"))
  return {"root": root, "glob": os.path.join(root, "*.txt"), "workdir": str(base / "work")}


def _text_cfg(corpus, **kw):
  cfg = {"source": "text_files", "globs": corpus["glob"], "eval_fraction": 0.25}
  cfg.update(kw)
  return cfg


def _split_by_hash(ids, frac):
  """Independent re-implementation of the split rule (sha1 of the document id, first 8 bytes)."""
  out = set()
  for i in ids:
    u = int(hashlib.sha1(i.encode()).hexdigest()[:16], 16) / 2.0**64
    if u < frac:
      out.add(i)
  return out


# ---------------------------------------------------------------------------------------------
# Tokenizers


def test_bytes_tokenizer_round_trip():
  tok = tokenizers.BytesTokenizer()
  text = "héllo\tworld\n€"
  assert tok.encode(text) == list(b"h\xc3\xa9llo\tworld\n\xe2\x82\xac")
  assert tok.decode(tok.encode(text)) == text
  assert (tok.vocab_size, tok.eos_id) == (257, 256)
  assert tok.decode([104, 105, 256]) == "hi"  # EOS dropped


def test_cl100k_known_ids_and_vocab():
  tok = tokenizers.Cl100kTokenizer()
  assert tok.encode("hello world") == [15339, 1917]  # published cl100k ids
  assert tok.vocab_size == 100277 and tok.eos_id == 100257
  text = "def f(x):\n    return x ** 2  # ünïcode\n"
  assert tok.decode(tok.encode(text)) == text
  # Special-token text inside a document is ordinary text, never EOS.
  assert tok.eos_id not in tok.encode("a <|endoftext|> b")


def test_cl100k_matches_tiktoken():
  pytest.importorskip("tiktoken")
  ref = tokenizers.tiktoken_cl100k()
  tok = tokenizers.Cl100kTokenizer()
  assert ref.n_vocab == tok.vocab_size
  with open(os.__file__, encoding="utf-8") as f:
    source = f.read()[:20000]
  for text in ["hello world", "  indented\n\n\ttabs  ", "Ünïcödé — 日本語 1234567", source]:
    assert tok.encode(text) == ref.encode_ordinary(text)


def test_cl100k_long_text_is_split_at_newlines():
  tok = tokenizers.Cl100kTokenizer()
  line = "x = [1, 2, 3]  # some code\n"
  text = line * (tokenizers._CL100K_MAX_CHARS // len(line) + 50)  # pylint: disable=protected-access
  ids = tok.encode(text)
  assert ids == tok.encode(line) * (len(text) // len(line))


def test_sentencepiece_trains_once_and_is_cached(corpus, tmp_path, monkeypatch):
  cfg = _text_cfg(corpus, tokenizer="sentencepiece", sp_vocab_size=320)
  trainings = []
  real_train = tokenizers.train_sentencepiece
  monkeypatch.setattr(tokenizers, "train_sentencepiece",
                      lambda *a, **kw: trainings.append(1) or real_train(*a, **kw))
  ds = pipeline.make_datasets(cfg, seq_len=16, batch_size=4, workdir=str(tmp_path), seed=0)
  assert len(trainings) == 1
  model = ds.tokenizer.model_path
  assert model.startswith(str(tmp_path)) and os.path.isfile(model)
  mtime = os.stat(model).st_mtime_ns
  ds2 = pipeline.make_datasets(cfg, seq_len=16, batch_size=4, workdir=str(tmp_path), seed=0)
  assert len(trainings) == 1  # no retraining
  assert os.stat(ds2.tokenizer.model_path).st_mtime_ns == mtime
  text = "alpha beta\n    gamma  omega\n"
  assert ds2.tokenizer.decode(ds2.tokenizer.encode(text)) == text
  assert ds2.vocab_size <= 320 and ds2.tokenizer.eos_id == 1
  batch = next(ds2.train_iter())
  assert batch["inputs"].max() < ds2.vocab_size


# ---------------------------------------------------------------------------------------------
# Sources, split, packing


def test_text_files_split_is_deterministic_and_disjoint(corpus):
  files = sources.glob_files(corpus["glob"])
  assert len(files) == 40
  d1 = tfds_builder.prepare_text_corpus(files, eval_fraction=0.25, cache_dir=corpus["workdir"],
                                        strict=True, tag="text_files")
  d2 = tfds_builder.prepare_text_corpus(files, eval_fraction=0.25, cache_dir=corpus["workdir"],
                                        strict=True, tag="text_files")
  assert d1 == d2  # cached, same directory
  train = {i for i, _ in tfds_builder.read_split(d1, "train")}
  val = {i for i, _ in tfds_builder.read_split(d1, "validation")}
  names = {os.path.basename(f) for f in files}  # ids are paths relative to the glob's root
  assert not train & val and train | val == names
  assert val == _split_by_hash(names, 0.25) and 0 < len(val) < len(files)


def _copy_tree(files, src_root, dst_root):
  for f in files:
    dst = os.path.join(dst_root, os.path.relpath(f, src_root))
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    with open(f, "rb") as a, open(dst, "wb") as b:
      b.write(a.read())


def test_split_does_not_depend_on_the_corpus_location(corpus, tmp_path):
  files = sources.glob_files(corpus["glob"])
  roots = [str(tmp_path / "a" / "txt"), str(tmp_path / "b" / "deeper" / "copy")]
  splits, evals = [], []
  for root in roots:
    _copy_tree(files, corpus["root"], os.path.join(root, "sub"))
    pattern = os.path.join(root, "**", "*.txt")
    assert sources.glob_root(pattern) == root
    ds = pipeline.make_datasets(_text_cfg(corpus, globs=pattern), seq_len=16, batch_size=4,
                                workdir=str(tmp_path / "work"), seed=0)
    builder_dir = ds.info["corpus"].split(" at ")[-1]
    splits.append({i for i, _ in tfds_builder.read_split(builder_dir, "validation")})
    evals.append(ds.eval_batches(2))
  expected = _split_by_hash({"sub/" + os.path.basename(f) for f in files}, 0.25)
  assert splits[0] == splits[1] == expected
  for a, b in zip(*evals):
    np.testing.assert_array_equal(a["inputs"], b["inputs"])


def test_stdlib_split_and_subset_do_not_depend_on_the_install_path(monkeypatch, tmp_path):
  stdlib = sources.stdlib_dir()
  files = [f for f in sources.stdlib_files() if 2000 < os.path.getsize(f) < 6000][:40]
  infos = []
  for name in ("py_a", "opt/py_b"):
    root = str(tmp_path / name / "lib")
    _copy_tree(files, stdlib, root)
    monkeypatch.setattr(sources, "stdlib_dir", lambda root=root: root)
    chosen = sources.select_files(sources.stdlib_files(), 25, 0, root=root)
    ds = pipeline.make_datasets({"source": "stdlib", "max_docs": 25, "eval_fraction": 0.3},
                                seq_len=8, batch_size=2, workdir=str(tmp_path / "w"), seed=0)
    infos.append(([os.path.relpath(f, root) for f in chosen], ds.info["splits"]))
  assert infos[0] == infos[1]
  assert len(infos[0][0]) == 25 and min(s["docs"] for s in infos[0][1].values()) > 0
  assert sources.doc_id(os.path.join(stdlib, "json", "decoder.py"), stdlib) == "json/decoder.py"


def test_cached_corpus_is_not_read_again(corpus, tmp_path, monkeypatch):
  files = sources.glob_files(corpus["glob"])
  kw = dict(eval_fraction=0.25, cache_dir=str(tmp_path), strict=True, tag="text_files")
  tfds_builder.prepare_text_corpus(files, **kw)
  reads = []
  real = sources.read_text
  monkeypatch.setattr(sources, "read_text", lambda *a, **k: reads.append(a) or real(*a, **k))
  tfds_builder.prepare_text_corpus(files, **kw)
  assert not reads  # the cache key already covers every file's size and mtime


class _CountingSource:
  """A random-access TFDS-like data source that counts record reads."""

  def __init__(self, records):
    self.records, self.reads = records, [0] * len(records)

  def __len__(self):
    return len(self.records)

  def __getitem__(self, i):
    self.reads[i] += 1
    return self.records[i]


def test_tfds_held_out_split_reads_each_record_once(monkeypatch, tmp_path):
  from simbal_jax.data import corpora  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(1)
  texts = [" ".join(rng.choice(WORDS, size=40)) for _ in range(60)]
  src = _CountingSource([{"id": f"doc{i}".encode(), "text": t.encode()}
                         for i, t in enumerate(texts)])
  monkeypatch.setattr(corpora, "tfds_data_source", lambda cfg, split: src)
  ds = pipeline.make_datasets({"source": "tfds", "tfds_name": "fake", "tfds_eval_split": "",
                               "eval_fraction": 0.25}, seq_len=16, batch_size=4,
                              workdir=str(tmp_path), seed=0)
  assert src.reads == [1] * len(texts)  # train and validation streams written in one pass
  val = _split_by_hash({f"tfds:doc{i}" for i in range(len(texts))}, 0.25)
  val_texts = [t for i, t in enumerate(texts) if f"tfds:doc{i}" in val]
  assert ds.info["splits"]["validation"]["docs"] == len(val_texts)
  assert ds.info["splits"]["train"]["docs"] == len(texts) - len(val_texts)
  stream = b"".join(t.encode() + b"\x00" for t in val_texts)  # EOS (256) shown as 0 below
  row = ds.eval_batches(1)[0]["inputs"][0]  # the first eval sequence is the split's first
  assert bytes(np.where(row == 256, 0, row).astype(np.uint8)) == stream[:16]


def test_packing_shapes_shift_eos_and_documents(corpus):
  ds = pipeline.make_datasets(_text_cfg(corpus), seq_len=32, batch_size=4,
                              workdir=corpus["workdir"], seed=0)
  assert ds.vocab_size == 257
  for batch in [next(ds.train_iter())] + ds.eval_batches(2):
    assert set(batch) == {"inputs", "targets"}
    assert batch["inputs"].shape == batch["targets"].shape == (4, 32)
    assert batch["inputs"].dtype == np.int32
    np.testing.assert_array_equal(batch["targets"][:, :-1], batch["inputs"][:, 1:])
    assert batch["inputs"].min() >= 0 and batch["inputs"].max() < 257
  # Asked for more than the split holds, the eval set is every validation window in order:
  # rebuild the stream and check that every EOS-delimited piece is a whole validation file.
  rows = [r for b in ds.eval_batches(len(ds.eval)) for r in b["inputs"]]
  stream = np.concatenate(rows)
  assert (stream == 256).sum() >= 2
  val_names = _split_by_hash({os.path.basename(f) for f in sources.glob_files(corpus["glob"])},
                             0.25)
  contents = {open(os.path.join(corpus["root"], f), "rb").read() for f in val_names}
  pieces = bytes(stream.astype(np.uint8) * (stream != 256)).split(b"\x00")
  eos_pos = np.nonzero(stream == 256)[0]
  whole = [bytes(stream[a + 1:b].astype(np.uint8)) for a, b in zip(eos_pos[:-1], eos_pos[1:])]
  assert whole and all(w in contents for w in whole), pieces[:1]


def test_stdlib_small_corpus(tmp_path):
  files = sources.stdlib_files()
  assert files == sorted(files) and any(f.endswith(os.sep + "os.py") for f in files)
  assert not any("site-packages" in f for f in files)
  ds = pipeline.make_datasets({"source": "stdlib", "max_docs": 30, "eval_fraction": 0.2},
                              seq_len=64, batch_size=8, workdir=str(tmp_path), seed=3)
  assert ds.info["splits"]["train"]["docs"] + ds.info["splits"]["validation"]["docs"] <= 30
  batch = next(ds.train_iter())
  assert batch["inputs"].shape == (8, 64)
  text = ds.tokenizer.decode(batch["inputs"].ravel())
  assert re.search(r"\b(def|import|return|class|if)\b", text)


def test_tfds_source_reads_prepared_array_record(corpus):
  files = sources.glob_files(corpus["glob"])
  data_dir = os.path.dirname(os.path.dirname(tfds_builder.prepare_text_corpus(
      files, eval_fraction=0.25, cache_dir=corpus["workdir"], strict=True, tag="text_files")))
  by_name = pipeline.make_datasets(
      {"source": "tfds", "tfds_name": "simbal_text_corpus", "tfds_data_dir": data_dir},
      seq_len=32, batch_size=4, workdir=corpus["workdir"], seed=0)
  local = pipeline.make_datasets(_text_cfg(corpus), seq_len=32, batch_size=4,
                                 workdir=corpus["workdir"], seed=0)
  assert by_name.info["splits"] == local.info["splits"]
  np.testing.assert_array_equal(by_name.eval_batches(1)[0]["inputs"],
                                local.eval_batches(1)[0]["inputs"])
  with pytest.raises(ValueError, match="tfds build no_such_dataset_xyz --file_format=array_record"):
    pipeline.make_datasets({"source": "tfds", "tfds_name": "no_such_dataset_xyz",
                            "tfds_data_dir": data_dir}, seq_len=32, batch_size=4,
                           workdir=corpus["workdir"], seed=0)


def _tv_distance(counts_a, counts_b):
  """Mean total-variation distance between row-normalised transition counts (shared rows)."""
  rows = (counts_a.sum(1) > 20) & (counts_b.sum(1) > 20)
  pa = counts_a[rows] / counts_a[rows].sum(1, keepdims=True)
  pb = counts_b[rows] / counts_b[rows].sum(1, keepdims=True)
  return 0.5 * np.abs(pa - pb).sum(1).mean()


def test_synthetic_domains_have_distinct_transitions(tmp_path):
  v = 32
  cfg = {"source": "synthetic", "eval_fraction": 0.1,
         "synthetic": {"num_domains": 3, "vocab_size": v, "num_docs": 600}}
  ds = pipeline.make_datasets(cfg, seq_len=64, batch_size=16, workdir=str(tmp_path), seed=0)
  assert ds.vocab_size == v + 1
  it = ds.train_iter()
  batches = [next(it) for _ in range(30)]
  counts = np.zeros((3, 2, v, v))  # [domain, half, from, to]
  for n, b in enumerate(batches):
    assert b["domain"].shape == (16,) and b["domain"].dtype == np.int32
    assert set(b["domain"].tolist()) <= {0, 1, 2}
    for row, d in zip(np.concatenate([b["inputs"], b["targets"][:, -1:]], 1), b["domain"]):
      np.add.at(counts[d, n % 2], (row[:-1], row[1:]), 1)
  within = max(_tv_distance(counts[d, 0], counts[d, 1]) for d in range(3))
  between = min(_tv_distance(counts[a].sum(0), counts[b].sum(0))
                for a in range(3) for b in range(a + 1, 3))
  assert between > 0.8 and within < 0.3, (between, within)
  assert "domain" in ds.eval_batches(1)[0]


def test_synthetic_packed_documents_keep_one_domain(tmp_path):
  cfg = {"source": "synthetic", "synthetic": {"num_domains": 2, "vocab_size": 16,
                                              "doc_len": 10, "num_docs": 400}}
  ds = pipeline.make_datasets(cfg, seq_len=32, batch_size=4, workdir=str(tmp_path), seed=0)
  b = next(ds.train_iter())
  eos_cols = np.nonzero((b["inputs"] == 16).all(0))[0]
  np.testing.assert_array_equal(eos_cols, [10, 21])  # doc_len tokens, then EOS, repeated


# ---------------------------------------------------------------------------------------------
# Iterator state and per-host sharding


def test_iterator_state_round_trip(corpus):
  ds = pipeline.make_datasets(_text_cfg(corpus), seq_len=16, batch_size=4,
                              workdir=corpus["workdir"], seed=5)
  it = ds.train_iter()
  first = [next(it) for _ in range(3)]
  state = json.loads(json.dumps(it.get_state()))
  expected = [next(it) for _ in range(4)]
  assert not np.array_equal(first[0]["inputs"], expected[0]["inputs"])
  resumed = pipeline.make_datasets(_text_cfg(corpus), seq_len=16, batch_size=4,
                                   workdir=corpus["workdir"], seed=5).train_iter()
  resumed.set_state(state)
  for a, b in zip(expected, [next(resumed) for _ in range(4)]):
    np.testing.assert_array_equal(a["inputs"], b["inputs"])
    np.testing.assert_array_equal(a["targets"], b["targets"])
  fresh = ds.train_iter()
  np.testing.assert_array_equal(next(fresh)["inputs"], first[0]["inputs"])
  other = pipeline.make_datasets(_text_cfg(corpus), seq_len=16, batch_size=4,
                                 workdir=corpus["workdir"], seed=6).train_iter()
  with pytest.raises(ValueError, match="different data pipeline"):
    other.set_state(state)


def test_primary_host_state_resumes_every_host(corpus):
  """Orbax saves the data state from process 0 only; every host restores that same state
  (here with every host holding the whole corpus: data.shard_hosts=False)."""
  cfg = _text_cfg(corpus, shard_hosts=False)
  kw = dict(seq_len=16, batch_size=8, workdir=corpus["workdir"], seed=4, process_count=2)
  host0 = pipeline.make_datasets(cfg, process_index=0, **kw).train_iter()
  for _ in range(3):
    next(host0)
  state = json.loads(json.dumps(host0.get_state()))
  host1 = pipeline.make_datasets(cfg, process_index=1, **kw).train_iter()
  host1.set_state(state)  # raised "different data pipeline" when the state named the host
  # Independent reference: the single-host iterator's 4th global batch, rows [4, 8).
  glob_it = pipeline.make_datasets(cfg, **{**kw, "process_count": 1}).train_iter()
  full = [next(glob_it) for _ in range(4)][3]
  got = next(host1)
  for key in full:
    np.testing.assert_array_equal(got[key], full[key][4:])
  assert host1.get_state()["next_batch"] == 4


def test_train_epochs_cover_every_sequence(tmp_path):
  cfg = {"source": "synthetic", "synthetic": {"num_domains": 2, "vocab_size": 64,
                                              "num_docs": 64}, "eval_fraction": 0.25}
  ds = pipeline.make_datasets(cfg, seq_len=8, batch_size=2, workdir=str(tmp_path), seed=0)
  n = len(ds.train)
  it = ds.train_iter()
  rows = np.concatenate([next(it)["inputs"] for _ in range(n // 2)])
  train_rows = {bytes(r) for r in ds.train.tokens_NxW[:, :-1]}
  assert len(train_rows) == n  # random rows are distinct
  seen = [bytes(r) for r in rows]
  assert len(set(seen)) == len(seen) == (n // 2) * 2  # no repeat within the first epoch
  assert set(seen) <= train_rows


@pytest.mark.parametrize("source", ["text", "synthetic"])
def test_per_host_batches_are_disjoint_slices_of_the_global_batch(corpus, tmp_path, source):
  if source == "text":  # every host holds the whole corpus (sharded hosts: test_shards.py)
    cfg, workdir = _text_cfg(corpus, shard_hosts=False), corpus["workdir"]
  else:
    cfg, workdir = {"source": "synthetic", "synthetic": {"num_docs": 256}}, str(tmp_path)
  kw = dict(seq_len=16, batch_size=8, workdir=workdir, seed=2)
  glob_it = pipeline.make_datasets(cfg, **kw).train_iter()
  hosts = [pipeline.make_datasets(cfg, process_index=p, process_count=4, **kw) for p in range(4)]
  host_its = [h.train_iter() for h in hosts]
  for _ in range(3):
    full = next(glob_it)
    parts = [next(h) for h in host_its]
    assert all(p["inputs"].shape == (2, 16) for p in parts)
    for key in full:
      np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), full[key])
    if source == "synthetic":  # random rows: any repeat would mean overlapping hosts
      assert len({bytes(r) for p in parts for r in p["inputs"]}) == 8
  evals = [h.eval_batches(1)[0]["inputs"] for h in hosts]
  np.testing.assert_array_equal(np.concatenate(evals),
                                pipeline.make_datasets(cfg, **kw).eval_batches(1)[0]["inputs"])


# ---------------------------------------------------------------------------------------------
# Errors before training


def test_error_empty_glob(tmp_path):
  pattern = str(tmp_path / "nothing" / "*.txt")
  with pytest.raises(ValueError, match=re.escape(pattern)):
    pipeline.make_datasets({"source": "text_files", "globs": pattern}, seq_len=8, batch_size=2,
                           workdir=str(tmp_path), seed=0)


@pytest.mark.parametrize("payload", [b"abc\x00def\n", b"caf\xe9 latin-1\n"])
def test_error_binary_or_undecodable_file(tmp_path, payload):
  root = _write_corpus(str(tmp_path / "txt"), num_files=10)
  bad = os.path.join(root, "zz_bad.txt")
  with open(bad, "wb") as f:
    f.write(payload)
  with pytest.raises(ValueError, match=re.escape(bad)):
    pipeline.make_datasets({"source": "text_files", "globs": os.path.join(root, "*.txt")},
                           seq_len=8, batch_size=2, workdir=str(tmp_path), seed=0)
  assert not glob.glob(str(tmp_path / "data" / "tokens" / "*"))  # nothing prepared


def test_error_unknown_names(tmp_path):
  with pytest.raises(ValueError, match="stdlib, text_files, tfds, synthetic"):
    pipeline.make_datasets({"source": "c4"}, seq_len=8, batch_size=2, workdir=str(tmp_path),
                           seed=0)
  with pytest.raises(ValueError, match="bytes, sentencepiece, cl100k"):
    pipeline.make_datasets({"tokenizer": "gpt2"}, seq_len=8, batch_size=2,
                           workdir=str(tmp_path), seed=0)


def test_error_corpus_too_small_and_bad_batch(corpus, tmp_path):
  with pytest.raises(ValueError, match="fewer than one global batch"):
    pipeline.make_datasets(_text_cfg(corpus), seq_len=4096, batch_size=64,
                           workdir=corpus["workdir"], seed=0)
  with pytest.raises(ValueError, match="not divisible by process_count"):
    pipeline.make_datasets(_text_cfg(corpus), seq_len=8, batch_size=6,
                           workdir=corpus["workdir"], seed=0, process_count=4)
  one = _write_corpus(str(tmp_path / "one"), num_files=1)
  with pytest.raises(ValueError, match="empty (validation|train) split"):
    pipeline.make_datasets({"source": "text_files", "globs": one + "/*.txt"}, seq_len=8,
                           batch_size=2, workdir=str(tmp_path), seed=0)


def test_cl100k_missing_file_is_a_clear_error(monkeypatch):
  import importlib.util  # pylint: disable=g-import-not-at-top
  real = importlib.util.find_spec
  fake = real("bpe_openai")
  fake = type(fake)(fake.name, fake.loader, origin="/nonexistent/bpe_openai/__init__.py")
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: fake if name == "bpe_openai" else real(name, *a))
  with pytest.raises(FileNotFoundError, match="cl100k_base"):
    tokenizers.Cl100kTokenizer()


def test_data_modules_do_not_import_jax():
  pkg = os.path.dirname(pipeline.__file__)
  for path in glob.glob(os.path.join(pkg, "*.py")):
    with open(path, encoding="utf-8") as f:
      assert not re.search(r"^\s*(import|from)\s+(jax|flax)\b", f.read(), re.M), path


@pytest.mark.parametrize("source", ["text_files", "jsonl"])
def test_preparing_a_local_corpus_prints_nothing(corpus, tmp_path, capsys, source):
  cfg = _text_cfg(corpus)
  if source == "jsonl":
    path = str(tmp_path / "c.jsonl")
    with open(path, "w", encoding="utf-8") as f:
      for name in sorted(os.listdir(corpus["root"])):
        with open(os.path.join(corpus["root"], name), encoding="utf-8") as doc:
          f.write(json.dumps({"text": doc.read()}) + "\n")
    cfg = _text_cfg(corpus, source="jsonl", globs=path)
  capsys.readouterr()
  ds = pipeline.make_datasets(cfg, seq_len=16, batch_size=2, workdir=str(tmp_path / "w"), seed=0)
  ds.eval_batches(1)
  next(ds.train_iter())
  assert capsys.readouterr().out == ""  # e.g. no TFDS "Downloading and preparing dataset"


def test_document_mask_batches_carry_segment_ids(tmp_path):
  short = {"glob": _write_corpus(str(tmp_path / "short"), lines=1) + "/*.txt"}  # ~80 bytes each
  kw = dict(seq_len=64, batch_size=4, workdir=str(tmp_path / "w"), seed=0)
  plain = pipeline.make_datasets(_text_cfg(short), **kw)
  masked = pipeline.make_datasets(_text_cfg(short, document_mask=True), **kw)
  assert "segment_ids" not in next(plain.train_iter())
  eos = masked.tokenizer.eos_id
  batches = [next(masked.train_iter())] + masked.eval_batches(2)
  assert any((b["inputs"] == eos).any() for b in batches)  # some sequence crosses documents
  for batch, other in zip(batches, [next(plain.train_iter())] + plain.eval_batches(2)):
    np.testing.assert_array_equal(batch["inputs"], other["inputs"])  # tokens unchanged
    seg = batch["segment_ids"]
    assert seg.shape == batch["inputs"].shape and seg.dtype == np.int32
    for row, ids in zip(batch["inputs"], seg):  # independent: a new document at every EOS
      expected, current = [], 0
      for token in row:
        current += int(token == eos)
        expected.append(current)
      assert ids.tolist() == expected
