"""simbal_jax/data/packing.py: packed sequences (shapes, shift, EOS between whole documents) and
the segment ids of document masking."""
import os

import numpy as np

from simbal_jax.data import pipeline
from simbal_jax.data import sources

from conftest import split_by_hash
from conftest import text_cfg
from conftest import write_corpus


def test_packing_shapes_shift_eos_and_documents(corpus):
  ds = pipeline.make_datasets(text_cfg(corpus), seq_len=32, batch_size=4,
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
  val_names = split_by_hash({os.path.basename(f) for f in sources.glob_files(corpus["glob"])},
                             0.25)
  contents = {open(os.path.join(corpus["root"], f), "rb").read() for f in val_names}
  pieces = bytes(stream.astype(np.uint8) * (stream != 256)).split(b"\x00")
  eos_pos = np.nonzero(stream == 256)[0]
  whole = [bytes(stream[a + 1:b].astype(np.uint8)) for a, b in zip(eos_pos[:-1], eos_pos[1:])]
  assert whole and all(w in contents for w in whole), pieces[:1]


def test_document_mask_batches_carry_segment_ids(tmp_path):
  short = {"glob": write_corpus(str(tmp_path / "short"), lines=1) + "/*.txt"}  # ~80 bytes each
  kw = dict(seq_len=64, batch_size=4, workdir=str(tmp_path / "w"), seed=0)
  plain = pipeline.make_datasets(text_cfg(short), **kw)
  masked = pipeline.make_datasets(text_cfg(short, document_mask=True), **kw)
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
