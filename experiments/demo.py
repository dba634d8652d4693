"""`make demo`: a small MoE trained with LBL and with SimBal on the stdlib corpus (CPU, minutes).

  python -m experiments.demo --workdir=runs/demo [--steps=1500] [--seeds=0] [--methods=lbl,simbal]

The convergence tool (experiments/convergence.py) at demo size: every method trains on the same
data order from the same initialisation, is evaluated 12 times on the same 65,536 held-out tokens
spread over the standard library's held-out files, and the table gives the final validation
loss (with its standard error over evaluation sequences), the difference to LBL, the tokens
SimBal needs to reach LBL's final loss, routing metrics and PES. One seed by default: pass
`--seeds=0,1,2` for intervals. Writes table.md, table.json and loss_vs_tokens.png into the
workdir (each run in <workdir>/<method>/seed<k>/); a finished run is reused.
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


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  from simbal_jax.experiments import convergence  # pylint: disable=g-import-not-at-top
  from simbal_jax.configs import demo as demo_config  # pylint: disable=g-import-not-at-top

  logging.set_verbosity(logging.WARNING)
  workdir = os.path.abspath(_WORKDIR.value)
  os.makedirs(workdir, exist_ok=True)
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
  print(f"\nplot: {os.path.join(workdir, 'loss_vs_tokens.png')}; table: "
        f"{os.path.join(workdir, 'table.md')}")
  _say(f"total wall time {time.time() - _T0:.1f} s")


if __name__ == "__main__":
  app.run(main)
