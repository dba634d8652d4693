"""Pairwise Expert Similarity (PES) of a trained run, exact and sampled, per MoE layer.

  python -m simbal_jax.experiments.pes --run=runs/conv/simbal/seed0 [--tokens=2048] [--pairs=16]

Exact PES runs all E experts on `--tokens` tokens drawn from the run's evaluation set and averages
the cosine of every expert pair (specialization.pes); its 95 % interval is over tokens (the
per-token mean pair cosines are the independent units). The sampled estimator uses `--pairs`
random expert pairs per token (specialization.pes_sampled) with its standard error. Each is
timed (seconds, after a compiling call). Writes `pes.json` into the run directory and prints a
table; the paper reports the minimum of exact PES over layers.
"""

import time

from absl import app
from absl import flags

from simbal_jax.experiments import run_tool



def _timed(fn):
  fn()  # compile
  t0 = time.perf_counter()
  out = fn()
  return out, time.perf_counter() - t0


def pes_rows(env, state, num_tokens, num_pairs, seed=0):
  """Per-layer rows: layer, exact, exact_ci95, exact_seconds, sampled, sampled_se,
  sampled_seconds, tokens."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  from simbal_jax import analysis  # pylint: disable=g-import-not-at-top
  from simbal_jax import specialization  # pylint: disable=g-import-not-at-top
  from simbal_jax import evaluate  # pylint: disable=g-import-not-at-top
  tokens = np.concatenate([b["inputs"] for b in evaluate.eval_set(env)])
  captured = analysis.capture_moe_inputs(env.model, state.params, jnp.asarray(tokens),
                                         state.expert_bias)
  total = tokens.size
  n = min(num_tokens, total)
  key_idx, key_pairs = jax.random.split(jax.random.key(seed))
  idx = jax.random.choice(key_idx, total, (n,), replace=False)
  params = nn.unbox(state.params)
  layer_ids = env.mcfg.moe_layer_ids
  rows = []
  for layer, (path, x) in zip(layer_ids, captured):
    block = params
    for name in path:
      block = block[name]
    x_TxD = x.reshape(total, -1)[idx]
    outputs = jax.jit(analysis.all_expert_outputs)(block, x_TxD)

    def exact():
      # per-token mean pair cosine: PES of each token alone; their mean is specialization.pes
      return jax.block_until_ready(jax.vmap(lambda o: specialization.pes(o[None]))(outputs))

    per_token, t_exact = _timed(exact)
    per_token = np.asarray(per_token, np.float64)
    mean = float(per_token.mean())
    half = 1.96 * float(per_token.std(ddof=1)) / np.sqrt(per_token.size)
    est, t_sampled = _timed(lambda: jax.block_until_ready(
        specialization.pes_sampled(key_pairs, outputs, n, num_pairs)))
    rows.append(dict(layer=layer, exact=mean, exact_ci95=[mean - half, mean + half],
                     exact_seconds=t_exact, sampled=float(est.mean),
                     sampled_se=float(est.stderr), sampled_seconds=t_sampled, tokens=n,
                     pairs=num_pairs))
  return rows


def main(argv):
  del argv
  env, state = run_tool.restore()
  rows = pes_rows(env, state, flags.FLAGS.tokens, flags.FLAGS.pairs, flags.FLAGS.seed)
  run_tool.report("pes.json", {"layers": rows, "min_exact": min(r["exact"] for r in rows)},
                  [(f"layer {r['layer']}", r) for r in rows],
                  [("exact", "exact"), ("exact s", "exact_seconds"), ("sampled", "sampled"),
                   ("sampled se", "sampled_se"), ("sampled s", "sampled_seconds")])
  print(f"PES min over layers (exact): {min(r['exact'] for r in rows):.4f}")


def _define_flags():
  run_tool.define_run_flag()
  flags.DEFINE_integer("tokens", 2048, "Tokens sampled from the evaluation set.")
  flags.DEFINE_integer("pairs", 16, "Expert pairs per token of the sampled estimator.")
  flags.DEFINE_integer("seed", 0, "Sampling seed.")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
