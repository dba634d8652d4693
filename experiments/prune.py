"""Dynamic-K pruning at inference (the paper's Table 6) on a trained run.

  python -m simbal_jax.experiments.prune --run=runs/conv/simbal/seed0 [--thresholds=0,0.1,0.15,0.2]

For each threshold, every MoE layer leaves out the chosen experts whose gate is below it
(`MoEConfig.min_gate`; 0 keeps all K) and the run's own evaluation set is scored: validation
loss and perplexity, mean experts kept per token (over tokens and MoE layers), and evaluation
throughput (tokens/s of the jitted eval step after a warm-up pass, median of 3 passes). Writes
`prune.json` into the run directory and prints a table.

Throughput: the pruned assignments are zero-weighted inside the dispatch the run was trained
with, so on the capacity and bucket paths the experts still run on them; the loss and the
experts-per-token columns are exact, the speed column shows what this implementation gains
(nothing, by construction, until dispatch skips zero-gate assignments).
"""

import dataclasses
import statistics
import time

from absl import app
from absl import flags

from simbal_jax.experiments import run_tool



def prune_table(env, state, thresholds, passes=3):
  """Rows {threshold, loss, ppl, experts_per_token, tokens_per_second} on the run's eval set."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from simbal_jax import eval_metrics  # pylint: disable=g-import-not-at-top
  from simbal_jax import losses  # pylint: disable=g-import-not-at-top
  from simbal_jax import model as model_lib  # pylint: disable=g-import-not-at-top
  from simbal_jax import programs  # pylint: disable=g-import-not-at-top
  from simbal_jax import sharding  # pylint: disable=g-import-not-at-top
  from simbal_jax import env as env_lib  # pylint: disable=g-import-not-at-top
  from simbal_jax import evaluate  # pylint: disable=g-import-not-at-top
  if env.mcfg.moe is None:
    raise ValueError("prune: the run's model has no MoE layer")
  host = evaluate.eval_set(env)
  batches = [sharding.to_global(b, env.batch_sharding, env_lib.TRAIN_KEYS) for b in host]
  rows = []
  for thr in thresholds:
    mcfg = dataclasses.replace(env.mcfg, moe=dataclasses.replace(env.mcfg.moe, min_gate=thr))
    model = model_lib.Transformer(mcfg)

    def score_fn(params, bias, batch, model=model, thr=thr):
      logits, aux = model.apply({"params": params}, batch["inputs"], expert_bias=bias)
      b, l = batch["inputs"].shape
      ce, _ = losses.cross_entropy(logits, batch["targets"])
      kept = jnp.sum(aux.router.gates >= thr, axis=-1).astype(jnp.float32)  # [Lm, T]
      return {"ce_sum": ce * (b * l), "tokens": jnp.float32(b * l), "kept_sum": jnp.mean(
          jnp.sum(kept, axis=-1))}

    # One program per model and threshold, shared by the runs pruned in one process (methods,
    # seeds: the notebook prunes each method's run).
    score = programs.program("prune_score", (mcfg, env.mesh, env.rules),
                             lambda fn=score_fn: jax.jit(fn))

    with sharding.mesh_rules(env.mesh, env.rules):
      sums = [jax.device_get(score(state.params, state.expert_bias, b)) for b in batches]
      times = []
      for _ in range(passes):
        t0 = time.perf_counter()
        jax.block_until_ready([score(state.params, state.expert_bias, b) for b in batches])
        times.append(time.perf_counter() - t0)
    tokens = sum(float(s["tokens"]) for s in sums)
    loss = sum(float(s["ce_sum"]) for s in sums) / tokens
    m = eval_metrics.compute(sums)
    rows.append(dict(threshold=thr, loss=loss, ppl=m["eval/ppl"],
                     experts_per_token=sum(float(s["kept_sum"]) for s in sums) / tokens,
                     tokens_per_second=tokens / statistics.median(times), eval_tokens=tokens))
  return rows


def main(argv):
  del argv
  env, state = run_tool.restore()
  rows = prune_table(env, state, [float(t) for t in flags.FLAGS.thresholds])
  run_tool.report("prune.json", rows, [(f"gate >= {r['threshold']:g}", r) for r in rows],
                  [("val loss", "loss"), ("ppl", "ppl"), ("experts/token", "experts_per_token"),
                   ("eval tok/s", "tokens_per_second")])


def _define_flags():
  run_tool.define_run_flag()
  flags.DEFINE_list("thresholds", ["0", "0.1", "0.15", "0.2"], "Gate thresholds.")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
