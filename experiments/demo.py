"""`make demo`: a small MoE trained with LBL and with SimBal on the stdlib corpus (CPU, minutes).

  python -m experiments.demo --workdir=runs/demo [--steps=1500]

Prints a comparison table (validation loss, PES, MaxVio, SEU, orthogonality gap) and writes
loss_curves.png and expert_load.png into the workdir (each run in <workdir>/<method>/).
"""

import json
import os
import sys
import time

_T0 = time.time()

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", "runs/demo", "Output directory.")
_STEPS = flags.DEFINE_integer("steps", 1500, "Training steps per run.")
_METHODS = flags.DEFINE_list("methods", ["lbl", "simbal"], "Balancing methods to compare.")
_PES_TOKENS = flags.DEFINE_integer("pes_tokens", 512, "Tokens sampled for PES.")


def _say(msg):
  print(f"[demo {time.time() - _T0:6.1f}s] {msg}", flush=True)


def _plots(workdir, results):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  from simbal_jax import writers  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(7, 4))
  for name, r in results.items():
    recs = [x for x in writers.read_jsonl(os.path.join(r["dir"], "metrics.jsonl"))
            if "train/ce" in x]
    ax.plot([x["step"] for x in recs], [x["train/ce"] for x in recs], label=f"{name} (train CE)")
    ev = [x for x in writers.read_jsonl(os.path.join(r["dir"], "metrics.jsonl"))
          if "eval/loss" in x]
    ax.scatter([x["step"] for x in ev], [x["eval/loss"] for x in ev], marker="o",
               label=f"{name} (validation)")
  ax.set_xlabel("step")
  ax.set_ylabel("cross-entropy (nats/byte)")
  ax.set_title("Loss curves")
  ax.legend()
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, "loss_curves.png"), dpi=120)
  plt.close(fig)
  loads = {n: r["summary"]["expert_load"] for n, r in results.items()}
  n_layers = max(l.shape[0] for l in loads.values())
  fig, axes = plt.subplots(n_layers, len(loads), figsize=(4 * len(loads), 2.5 * n_layers),
                           squeeze=False)
  for j, (name, load) in enumerate(loads.items()):
    for i in range(load.shape[0]):
      ax = axes[i, j]
      ax.bar(range(load.shape[1]), load[i])
      ax.axhline(1.0 / load.shape[1], color="k", ls="--", lw=1)
      ax.set_title(f"{name}: MoE layer {i}")
      ax.set_xlabel("expert")
      ax.set_ylabel("share of tokens")
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, "expert_load.png"), dpi=120)
  plt.close(fig)


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from configs import demo as demo_config  # pylint: disable=g-import-not-at-top
  from simbal_jax import analysis  # pylint: disable=g-import-not-at-top
  from simbal_jax import model as model_lib  # pylint: disable=g-import-not-at-top
  from simbal_jax import train  # pylint: disable=g-import-not-at-top
  from simbal_jax import writers  # pylint: disable=g-import-not-at-top

  logging.set_verbosity(logging.WARNING)
  workdir = os.path.abspath(_WORKDIR.value)
  os.makedirs(workdir, exist_ok=True)
  _say(f"jax {jax.__version__} on {jax.device_count()} {jax.devices()[0].platform} device(s); "
       f"workdir {workdir}")
  results = {}
  for method in _METHODS.value:
    cfg = demo_config.get_config(method)
    cfg.train.num_steps = _STEPS.value
    cfg.train.eval_every = max(_STEPS.value // 4, 1)
    cfg.ckpt.every = max(_STEPS.value // 2, 1)
    cfg.data.cache_dir = os.path.join(workdir, "data")  # prepared once, shared by the runs
    run_dir = os.path.join(workdir, method)
    _say(f"training {method}: {cfg.train.num_steps} steps, {cfg.moe.num_experts} experts "
         f"top-{cfg.moe.top_k}, d_model {cfg.model.d_model}, batch {cfg.train.global_batch_size}"
         f"x{cfg.train.seq_len} bytes -> {run_dir}")
    summary = train.train_and_evaluate(cfg, run_dir)
    if summary["status"] != "done" or summary["start_step"] >= summary["step"]:
      _say(f"{method}: reused a finished run in {run_dir} (status {summary['status']})")
    model = model_lib.Transformer(summary["model_config"])
    st = summary["final_state"]
    tokens = jax.numpy.asarray(summary["eval_batch"]["inputs"])
    pes = analysis.layer_pes(jax.random.key(0), model, st.params, tokens,
                             num_tokens=_PES_TOKENS.value, expert_bias=st.expert_bias)
    summary["pes_min"], summary["pes_mean"] = pes["min"], pes["mean"]
    _say(f"{method}: validation loss {summary['eval/loss']:.4f}, PES per layer "
         f"{[round(float(v), 4) for v in pes['pes']]}, {summary['tokens_per_second']:,.0f} tokens/s")
    results[method] = {"dir": run_dir, "summary": summary}
  columns = [("val loss", "eval/loss"), ("val ppl", "eval/ppl"), ("PES min", "pes_min"),
             ("PES mean", "pes_mean"), ("MaxVio", "moe/maxvio"), ("load CV", "moe/load_cv"),
             ("SEU", "moe/seu"), ("dead", "moe/dead"), ("ortho L1", "moe/ortho_l1"),
             ("tok/s", "tokens_per_second")]
  for r in results.values():
    r["summary"]["tokens_per_second"] = int(r["summary"]["tokens_per_second"])
  table = writers.format_table([(n, r["summary"]) for n, r in results.items()], columns)
  _plots(workdir, results)
  keep = [k for _, k in columns]
  with open(os.path.join(workdir, "comparison.json"), "w", encoding="utf-8") as f:
    json.dump({n: {k: r["summary"].get(k) for k in keep} for n, r in results.items()}, f,
              indent=1)
  print("\nValidation comparison (stdlib corpus, bytes; PES = exact, all expert pairs, on "
        f"{_PES_TOKENS.value} sampled tokens; 'PES min' = minimum over layers as in the paper):")
  print(table)
  print(f"\nplots: {os.path.join(workdir, 'loss_curves.png')}, "
        f"{os.path.join(workdir, 'expert_load.png')}")
  _say(f"total wall time {time.time() - _T0:.1f} s")


if __name__ == "__main__":
  app.run(main)
