"""Data pipeline: sources -> tokenizer -> packed sequences -> grain iterators (no jax import).

  from simbal_jax import data
  ds = data.make_datasets(cfg.data, seq_len=256, batch_size=32, workdir=workdir, seed=0)
  it = ds.train_iter()            # infinite; it.get_state() / it.set_state(state)
  batch = next(it)                # inputs/targets int32[b, L] (+ domain int32[b], synthetic;
                                  # + segment_ids int32[b, L] with data.document_mask)
  evals = ds.eval_batches(4)      # fixed list, spread over the held-out split
  extra = data.make_eval_sets(data.parse_eval_sets("py=stdlib", cfg.data), tokenizer=ds.tokenizer,
                              seq_len=256, batch_size=32, workdir=workdir, seed=0)
                                  # ((name, Datasets), ...): more held-out sets (train.eval_sets)

Sources: "stdlib" (this interpreter's standard library .py files), "text_files" (globs),
"jsonl" (.jsonl, .jsonl.gz, .jsonl.zst: DCLM shards) and "parquet" (Hugging Face files), both
streamed from `data.globs` reading `data.text_field`, "tfds" (any dataset prepared with
`tfds build NAME --file_format=array_record`), "synthetic" (Markov chains of several latent
domains, batches carry the domain). Tokenizers: "bytes", "sentencepiece" (trained on the
train split, cached), "cl100k" (offline, from bpe-openai).
With several hosts each prepares only its share of the training data and the whole validation
split, tokenizing with a pool of processes (shards.py); the disk it needs is logged first.
Heavy packages (grain, tensorflow_datasets, sentencepiece, bpe_openai, pyarrow, zstandard)
load on first use.
"""
import importlib

_EXPORTS = {
    "make_datasets": "pipeline", "Datasets": "pipeline",
    "resolve_config": "pipeline", "SOURCES": "sources", "TOKENIZERS": "tokenizers",
    "parse_eval_sets": "evalsets", "make_eval_sets": "evalsets",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
  if name in _EXPORTS:
    module = importlib.import_module(f"simbal_jax.data.{_EXPORTS[name]}")
    return getattr(module, name)
  raise AttributeError(f"module 'simbal_jax.data' has no attribute {name!r}")
