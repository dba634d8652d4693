"""simbal_jax/data/tokenizers.py: bytes, cl100k (against published ids and tiktoken) and a
SentencePiece model trained once on the training split and cached."""
import os

import pytest

from simbal_jax.data import pipeline
from simbal_jax.data import tokenizers

from conftest import text_cfg


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


def test_cl100k_missing_file_is_a_clear_error(monkeypatch):
  import importlib.util  # pylint: disable=g-import-not-at-top
  real = importlib.util.find_spec
  fake = real("bpe_openai")
  fake = type(fake)(fake.name, fake.loader, origin="/nonexistent/bpe_openai/__init__.py")
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: fake if name == "bpe_openai" else real(name, *a))
  with pytest.raises(FileNotFoundError, match="cl100k_base"):
    tokenizers.Cl100kTokenizer()


def test_sentencepiece_trains_once_and_is_cached(corpus, tmp_path, monkeypatch):
  cfg = text_cfg(corpus, tokenizer="sentencepiece", sp_vocab_size=320)
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
