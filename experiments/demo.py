"""`make demo`: a small MoE trained with LBL and with SimBal on the stdlib corpus (CPU, minutes).

  python -m simbal_jax.experiments.demo --workdir=runs/demo [--steps=1500] [--seeds=0] [--methods=lbl,simbal]

The convergence tool (experiments/convergence.py) at demo size: every method trains on the same
data order from the same initialisation, is evaluated 12 times on the same 65,536 held-out tokens
spread over the standard library's held-out files, and the table gives the final validation
loss (with its standard error over evaluation sequences), the difference to LBL, the tokens
SimBal needs to reach LBL's final loss, routing metrics and PES. One seed by default: pass
`--seeds=0,1,2` for intervals. Writes table.md, table.json, loss_vs_tokens.png (validation loss
against training tokens, the methods on the same axes) and load_heatmap.png (each MoE layer's
expert load over training, one row per method, one colour scale) into the workdir (each run in
<workdir>/<method>/seed<k>/); a finished run is reused.
"""

import os
import time

_T0 = time.time()

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", "runs/demo", "Output directory.")
_STEPS = flags.DEFINE_integer("steps", 1500, "Training steps per run.")
_METHODS = flags.DEFINE_list("methods", ["lbl", "simbal"], "Balancing methods to compare.")
_SEEDS = flags.DEFINE_list("seeds", ["0"], "Seeds.")


def _say(msg):
  print(f"[demo {time.time() - _T0:6.1f}s] {msg}", flush=True)


def _load_heatmap(workdir, dirs, seed):
  """Writes load_heatmap.png from the expert_load.jsonl of the runs `dirs` {method: run
  directory}; returns its path (None without the files)."""
  from simbal_jax import plots  # pylint: disable=g-import-not-at-top
  try:
    loads = plots.read_expert_loads(dirs)
  except FileNotFoundError as e:  # runs made before the load log existed
    _say(f"no load heatmap: {e}")
    return None
  from simbal_jax.runio import paths  # pylint: disable=g-import-not-at-top
  path = paths.resolve(workdir) / "load_heatmap.png"
  fig = plots.load_heatmaps(loads, title=f"Expert load over training (training batches, seed "
                            f"{seed})")
  with path.open("wb") as f:  # local or gs://
    fig.savefig(f, format="png", dpi=120)
  return str(path)


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  from simbal_jax.runio import paths  # pylint: disable=g-import-not-at-top
  from simbal_jax.experiments import convergence  # pylint: disable=g-import-not-at-top
  from simbal_jax.configs import demo as demo_config  # pylint: disable=g-import-not-at-top

  logging.set_verbosity(logging.WARNING)
  workdir = paths.absolute(_WORKDIR.value)  # local or gs://
  paths.resolve(workdir).mkdir(parents=True, exist_ok=True)
  _say(f"jax {jax.__version__} on {jax.device_count()} {jax.devices()[0].platform} device(s); "
       f"workdir {workdir}")
  cfg = demo_config.get_config()
  cfg.train.num_steps = _STEPS.value
  cfg.ckpt.every = max(_STEPS.value // 2, 1)
  _say(f"{_STEPS.value} steps per run, {cfg.moe.num_experts} experts top-{cfg.moe.top_k}, "
       f"d_model {cfg.model.d_model}, batch {cfg.train.global_batch_size}x{cfg.train.seq_len} "
       f"bytes; methods {', '.join(_METHODS.value)}; seeds {', '.join(_SEEDS.value)}")
  convergence.run_matrix(cfg, workdir, list(_METHODS.value), [int(s) for s in _SEEDS.value],
                         say=_say)
  reference = "lbl" if "lbl" in _METHODS.value else _METHODS.value[0]
  _, md = convergence.write_outputs(workdir, reference)
  print("\nStandard-library corpus, byte tokenizer; validation loss in nats/byte on the same "
        f"{cfg.train.eval_tokens:,} held-out bytes for every run; PES exact on "
        f"{cfg.train.pes_tokens} tokens, minimum over layers as in the paper.\n")
  print(md)
  seed = int(_SEEDS.value[0])
  heatmap = _load_heatmap(workdir, {m: convergence.run_dir(workdir, m, seed)
                                    for m in _METHODS.value}, seed)
  print(f"\nplots: {os.path.join(workdir, 'loss_vs_tokens.png')}"
        + (f", {heatmap}" if heatmap else "") + f"; table: {os.path.join(workdir, 'table.md')}")
  _say(f"total wall time {time.time() - _T0:.1f} s")


if __name__ == "__main__":
  app.run(main)
