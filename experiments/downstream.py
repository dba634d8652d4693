"""Downstream accuracy with lm-evaluation-harness (PyPI `lm-eval`): the paper's benchmark columns.

  python -m simbal_jax.experiments.downstream --run=runs/conv/simbal/seed0 \
      --tasks=arc_easy,hellaswag,piqa

`SimbalLM` lets lm-eval score a trained run by log-likelihood, so the standard tasks (ARC-C/E,
HellaSwag, PIQA, WinoGrande, GLUE...) run unchanged wherever their datasets are available (this
tool downloads nothing itself; lm-eval's tasks fetch their data through Hugging Face `datasets`,
or read local files named in a task YAML passed with --include_path).

Scoring: a request (context, continuation) is tokenized with the run's own tokenizer as
`context ids + continuation ids` (an empty context starts from EOS), cut from the left to the
model's training length, and scored in one forward pass: the sum of the continuation tokens'
log-probabilities, and whether each was the greedy (argmax) choice. `loglikelihood_rolling`
scores a whole text in windows of the training length; `generate_until` decodes greedily
(without a KV cache: slow, meant for short answers).
"""

import json

import numpy as np

from lm_eval.api.model import LM


class SimbalLM(LM):
  """lm-eval model of a simbal_jax run (an Env and its TrainState).

  Args:
    env: env_lib.Env of the run (its tokenizer, model and mesh).
    state: the restored TrainState.
    batch_size: sequences per forward pass.
    max_gen_toks: generation limit of `generate_until`.
  """

  def __init__(self, env, state, batch_size=16, max_gen_toks=64):
    super().__init__()
    import jax  # pylint: disable=g-import-not-at-top
    self.env, self.state = env, state
    self.tok = env.datasets.tokenizer
    self.seq_len = int(env.cfg.train.seq_len)
    self.batch_size = int(batch_size)
    self.max_gen_toks = int(max_gen_toks)
    model = env.model

    @jax.jit
    def log_probs(params, bias, inputs_BxL):
      logits, _ = model.apply({"params": params}, inputs_BxL, expert_bias=bias)
      return jax.nn.log_softmax(logits.astype("float32"), axis=-1)

    self._log_probs = log_probs

  @classmethod
  def from_run(cls, run_dir, **kwargs):
    from simbal_jax import env as env_lib  # pylint: disable=g-import-not-at-top
    env, state = env_lib.restore_run(run_dir)
    return cls(env, state, **kwargs)

  def _forward(self, rows):
    """Log-probabilities float32[N, L, V] of int rows (each <= seq_len tokens, right-padded)."""
    from simbal_jax import sharding  # pylint: disable=g-import-not-at-top
    out = []
    for i in range(0, len(rows), self.batch_size):
      chunk = rows[i:i + self.batch_size]
      batch = np.zeros((self.batch_size, self.seq_len), np.int32)  # fixed shape: one compile
      for j, r in enumerate(chunk):
        batch[j, :len(r)] = r
      with sharding.mesh_rules(self.env.mesh, self.env.rules):
        lp = self._log_probs(self.state.params, self.state.expert_bias, batch)
      out.append(np.asarray(lp)[:len(chunk)])
    return np.concatenate(out) if out else np.zeros((0, self.seq_len, 1), np.float32)

  def score(self, pairs):
    """[(context, continuation)] -> [(sum log p(continuation | context), is_greedy)]."""
    rows, spans = [], []
    for context, continuation in pairs:
      ctx = self.tok.encode(context) if context else [self.tok.eos_id]
      cont = self.tok.encode(continuation)
      if not cont:
        raise ValueError(f"empty continuation after tokenization: {continuation!r}")
      ids = (ctx + cont)[-(self.seq_len + 1):]
      n = min(len(cont), len(ids) - 1)
      rows.append(ids[:-1])  # inputs; position p predicts ids[p + 1]
      spans.append((ids[-n:], len(ids) - 1 - n))
    lps = self._forward(rows)
    out = []
    for lp, (targets, start) in zip(lps, spans):
      pos = np.arange(start, start + len(targets))
      picked = lp[pos, targets]
      out.append((float(picked.sum()), bool(np.all(lp[pos].argmax(-1) == targets))))
    return out

  # lm-eval interface ----------------------------------------------------------------------

  def loglikelihood(self, requests, disable_tqdm=False):
    del disable_tqdm
    return self.score([r.args for r in requests])

  def loglikelihood_rolling(self, requests, disable_tqdm=False):
    del disable_tqdm
    out = []
    for r in requests:
      ids = [self.tok.eos_id] + self.tok.encode(r.args[0])
      total = 0.0
      for s in range(0, len(ids) - 1, self.seq_len):
        window = ids[s:s + self.seq_len + 1]
        lp = self._forward([window[:-1]])[0]
        total += float(lp[np.arange(len(window) - 1), window[1:]].sum())
      out.append(total)
    return out

  def generate_until(self, requests, disable_tqdm=False):
    del disable_tqdm
    out = []
    for r in requests:
      context, gen_kwargs = r.args
      until = gen_kwargs.get("until", []) if isinstance(gen_kwargs, dict) else []
      until = [until] if isinstance(until, str) else list(until)
      limit = int(gen_kwargs.get("max_gen_toks", self.max_gen_toks)) if isinstance(
          gen_kwargs, dict) else self.max_gen_toks
      ids = self.tok.encode(context) if context else [self.tok.eos_id]
      new = []
      for _ in range(limit):
        window = (ids + new)[-self.seq_len:]
        nxt = int(self._forward([window])[0][len(window) - 1].argmax())
        if nxt == self.tok.eos_id:
          break
        new.append(nxt)
        text = self.tok.decode(new)
        if any(u and u in text for u in until):
          break
      text = self.tok.decode(new)
      for u in until:
        if u and u in text:
          text = text[:text.index(u)]
      out.append(text)
    return out


def evaluate(run_dir, tasks, *, include_path=None, limit=None, num_fewshot=None, batch_size=16):
  """lm_eval.simple_evaluate of a run on `tasks`; returns lm-eval's results dict."""
  import lm_eval  # pylint: disable=g-import-not-at-top
  from lm_eval.tasks import TaskManager  # pylint: disable=g-import-not-at-top
  model = SimbalLM.from_run(run_dir, batch_size=batch_size)
  return lm_eval.simple_evaluate(
      model=model, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
      task_manager=TaskManager(include_path=include_path) if include_path else None,
      bootstrap_iters=1000, log_samples=False)


def main(argv):
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  fv = flags.FLAGS
  res = evaluate(fv.run, fv.tasks, include_path=fv.include_path, limit=fv.limit,
                 num_fewshot=fv.num_fewshot, batch_size=fv.batch_size)
  from simbal_jax.runio import paths  # pylint: disable=g-import-not-at-top
  paths.write_text(paths.resolve(fv.run) / "downstream.json",
                   json.dumps(res["results"], indent=1, default=str))
  for task, metrics in res["results"].items():
    print(task, {k: v for k, v in metrics.items() if isinstance(v, float)})


def _define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("run", None, "Run directory (config.json + checkpoints/), local or gs://.",
                      required=True)
  flags.DEFINE_list("tasks", ["arc_easy"], "lm-eval task names.")
  flags.DEFINE_string("include_path", None, "Folder of extra task YAML files (local datasets).")
  flags.DEFINE_integer("limit", None, "Examples per task (default: all).")
  flags.DEFINE_integer("num_fewshot", None, "Few-shot examples (default: the task's).")
  flags.DEFINE_integer("batch_size", 16, "Sequences per forward pass.")


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  _define_flags()
  app.run(main)
