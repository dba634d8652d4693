"""The convergence-speed table: does a method reach the reference's final validation loss with
fewer tokens, by how much, how sure are we.

  python -m simbal_jax.experiments.convergence --config=configs/small.py --methods=lbl,simbal,none \
      --seeds=0,1,2 --workdir=runs/conv [--lrs=1e-3,3e-3] [--config.<field>=...]
  python -m simbal_jax.experiments.convergence --aggregate --workdir=runs/conv [--reference=lbl]

Running trains methods x seeds (x learning rates) one after another, one run directory each:
`<workdir>/<method>[/lr<x>]/seed<k>`. A method is any config variant (`lbl`, `simbal`,
`simbal_coef1`, `lf_simbal_sigmoid`, `simbal_unit`, routers `simbal+ec`, `ec`, `lbl+sinkhorn`,
...: configs/base.py), applied after the command-line overrides (every method is checked before
the first run trains). Finished runs (a `summary.json`) are skipped; an interrupted run resumes
from its checkpoint. Seed k gives every method the same initialisation (apart from what a method
prescribes) and the same data order; all runs share one prepared corpus and therefore one
evaluation set. Then the table is aggregated.

`--aggregate` reads run directories made anywhere (e.g. on several machines and copied
together): it needs each run's `metrics.jsonl` and `config.json` (and uses `eval_seq_loss.json`
when present, for the paired evaluation-set error of a difference). It writes `table.md`,
`table.json`, `loss_vs_tokens.png` and `churn_vs_tokens.png` into the workdir and prints the
table (statistics and formatting: convergence_table.py). The workdir may be
a cloud path (`gs://bucket/conv`): runs, aggregation and outputs go through etils.epath.

Definitions (all on the shared evaluation set; per seed, then over seeds):
  final loss      eval/loss at the last step; mean ± std over seeds, and perplexity.
  Δ vs reference  final loss minus the reference's, paired by seed; mean and 95 % t-interval
                  over seeds. `eval_se` is the paired evaluation-set standard error of that
                  difference (sequence-level, mean over seeds), where per-sequence losses exist.
  target          the reference's final loss, mean over its seeds.
  tokens to target  the first crossing of the target by the run's evaluations, linearly
                  interpolated in tokens between the evaluation before and the one at the
                  crossing (the first evaluation itself when it is already below); "not
                  reached" (null) when no evaluation reaches it - never extrapolated.
  % fewer tokens  100 * (1 - tokens_to_target / reference tokens) per seed (the reference's
                  total training tokens); mean and 95 % t-interval over seeds, reported only
                  when every seed reached the target.
  routing         MaxVio, load CV, SEU, routing entropy, dead experts, ||R^T R - I||_1,
                  mean (R^T R - I)^2 and PES (exact; minimum over layers, as the paper) of the
                  final evaluation: mean ± std over seeds; per layer in table.json.
  churn           routing churn since the previous evaluation (1 - mean over the probe tokens
                  of the top-k overlap / K, mean over layers; log.churn_tokens eval tokens),
                  at every evaluation: mean ± std over seeds (table and churn_vs_tokens.png);
                  the first evaluation's is since the initialisation.
  expert movement ||W_e(now) - W_e(previous evaluation)|| / ||W_e(previous)|| of each expert's
                  weights, mean over experts and layers, and `stagnant` (experts per layer
                  moving less than a tenth of their layer's median), at every evaluation.
  learning rates  with --lrs every method runs every rate and is compared at its own best
                  rate (lowest mean final loss); the other rates are listed.

table.json schema:
  reference, target_loss, reference_tokens, incomplete [str], runs [{method, lr, seed, dir,
  final_loss, tokens}], methods.<name>: {lr, seeds, final_loss {mean, std, per_seed},
  final_ppl {mean, std}, eval_loss_se, diff_vs_reference {mean, ci95, per_seed, eval_se}
  (not for the reference), tokens_to_target {per_seed, reached, mean}, fewer_tokens_pct
  {per_seed, mean, ci95}, metrics.<maxvio|load_cv|seu|entropy|dead|ortho_l1|ortho_mse|pes_min>
  {mean, std}, per_layer.<metric>.<layer_i> {mean, std}, eval_sets.<name> {loss, load_tv}
  {mean, std} (the extra evaluation sets of train.eval_sets), other_lrs.<lr>.final_loss {mean, std},
  change_vs_tokens.<churn|expert_move|stagnant> {tokens, mean, std} (evaluations every seed
  logged)} (std is null for a single seed; ci95 null for fewer than two).
"""

import json
import os
import re
import sys
import time

from simbal_jax.runio import paths
from simbal_jax import plots
from simbal_jax.runio import writers
from simbal_jax.experiments.convergence_table import (  # the statistics, re-exported
    CHANGE_METRICS, aggregate, format_table, group_runs, mean_ci, mean_std, t975,
    tokens_to_target)

# ----------------------------------------------------------------------------------------------
# Reading runs.

_LR_DIR = re.compile(r"^lr(.+)$")
_SEED_DIR = re.compile(r"^seed(\d+)$")


def load_runs(workdir):
  """Finds `<method>[/lr<x>]/seed<k>` run directories under `workdir`.

  Returns:
    (runs, incomplete): runs is a list of dicts (method, lr float or None, seed, dir, curve
    [(tokens, loss)], final {eval metrics of the last step}, tokens, seq_loss list or None,
    change {metric of CHANGE_METRICS: [(tokens, value)] of the evaluations that logged it});
    incomplete lists "<dir>: <reason>" for directories that are missing a file or whose last
    evaluation is not at the configured final step.
  """
  runs, incomplete = [], []
  top = paths.resolve(workdir)
  for root, dirs, _ in top.walk():
    dirs.sort()
    m = _SEED_DIR.match(root.name)
    if not m or root == top:
      continue
    rel = paths.relpath(root, top).split("/")
    lr = None
    parts = rel[:-1]
    if len(parts) >= 2 and _LR_DIR.match(parts[-1]):
      lr = float(_LR_DIR.match(parts[-1]).group(1))
      parts = parts[:-1]
    if len(parts) != 1:
      continue
    method = parts[0]
    cfg_path, met_path = root / "config.json", root / "metrics.jsonl"
    missing = [p for p in (cfg_path, met_path) if not p.exists()]
    if missing:
      incomplete.append(f"{root}: missing {', '.join(p.name for p in missing)}")
      continue
    cfg = json.loads(cfg_path.read_text())
    num_steps = int(cfg["train"]["num_steps"])
    tokens_per_step = int(cfg["train"]["global_batch_size"]) * int(cfg["train"]["seq_len"])
    evals = [r for r in writers.read_jsonl(met_path) if "eval/loss" in r]
    last = evals[-1]["step"] if evals else None
    if last != num_steps:
      incomplete.append(f"{root}: unfinished (last evaluation at step {last}, run has "
                        f"{num_steps} steps)")
      continue
    seq_loss = None
    seq_path = root / "eval_seq_loss.json"
    if seq_path.exists():
      seq_loss = json.loads(seq_path.read_text()).get("ce_seq")
    runs.append(dict(method=method, lr=lr, seed=int(m.group(1)), dir=os.fspath(root),
                     curve=[(int(t), loss) for t, loss in
                            plots.eval_curve(evals, tokens_per_step)],
                     final=evals[-1], tokens=num_steps * tokens_per_step, seq_loss=seq_loss,
                     lr_config=float(cfg["opt"]["peak_lr"]),
                     change={k: [(int(r["step"]) * tokens_per_step, float(r[f"eval/{k}"]))
                                 for r in evals if f"eval/{k}" in r] for k in CHANGE_METRICS}))
  return runs, incomplete



def plot(table, runs, path):
  """loss_vs_tokens.png: validation loss against tokens of every method at its chosen rate
  (mean and min-max band over seeds, the target as a line; `plots.loss_vs_tokens`) and each
  seed's difference against the reference."""
  groups = group_runs(runs)
  curves = {name: {s: groups[name][e["lr"]][s]["curve"] for s in e["seeds"]}
            for name, e in table["methods"].items()}
  fig = plots.loss_vs_tokens(curves, reference=table["reference"], target=table["target_loss"],
                             title="Validation loss (mean, min-max band over seeds)")
  with paths.resolve(path).open("wb") as f:  # local or cloud
    fig.savefig(f, format="png", dpi=120)


def plot_change(table, runs, path):
  """churn_vs_tokens.png: routing churn and expert movement since the previous evaluation
  against tokens (`plots.change_vs_tokens`); False (nothing written) when no run logged them."""
  groups = group_runs(runs)
  panels = {k: {name: {s: groups[name][e["lr"]][s]["change"][k] for s in e["seeds"]}
                for name, e in table["methods"].items()} for k in ("churn", "expert_move")}
  if not any(c for by_method in panels.values() for by_seed in by_method.values()
             for c in by_seed.values()):
    return False
  fig = plots.change_vs_tokens(panels["churn"], panels["expert_move"])
  with paths.resolve(path).open("wb") as f:
    fig.savefig(f, format="png", dpi=120)
  return True


def write_outputs(workdir, reference="lbl"):
  """Aggregates the runs under `workdir`, writes table.md / table.json / loss_vs_tokens.png
  and churn_vs_tokens.png (when the runs logged routing churn).

  Returns:
    (table dict, markdown str).
  """
  runs, incomplete = load_runs(workdir)
  for x in incomplete:
    print(f"[convergence] not included: {x}", flush=True)
  table = aggregate(runs, incomplete, reference)
  md = format_table(table)
  out = paths.resolve(workdir)
  paths.write_text(out / "table.json", json.dumps(table, indent=1))
  paths.write_text(out / "table.md", md + "\n")
  plot(table, runs, out / "loss_vs_tokens.png")
  plot_change(table, runs, out / "churn_vs_tokens.png")
  return table, md


# ----------------------------------------------------------------------------------------------
# Running.


def run_dir(workdir, method, seed, lr=None):
  """`<workdir>/<method>[/lr<x>]/seed<k>`."""
  parts = [workdir, method] + ([f"lr{lr:g}"] if lr is not None else []) + [f"seed{seed}"]
  return os.path.join(*parts)


def run_config(base_cfg, method, seed, lr=None, cache_dir=""):
  """The config of one run: `base_cfg` (with command-line overrides) + the method's variant,
  the seed and the learning rate."""
  from simbal_jax.configs import base  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  cfg = ml_collections.ConfigDict(base_cfg.to_dict())
  base.apply_variant(cfg, method)
  cfg.seed = int(seed)
  if lr is not None:
    cfg.opt.peak_lr = float(lr)
  if cache_dir and not cfg.data.cache_dir:
    cfg.data.cache_dir = cache_dir  # one prepared corpus (and evaluation set) for every run
  return cfg


def check_methods(base_cfg, methods):
  """Raises ValueError (one line naming the method) unless every method's config is valid: the
  variant parses (a balancing method, a gating, router noise or a router such as `simbal+ec`,
  `lbl+sinkhorn`, `ec`) and the resulting config and model settings pass their checks, so a
  bad method fails before the first run trains, not after the others."""
  from simbal_jax import env as env_lib  # pylint: disable=g-import-not-at-top
  from simbal_jax import model as model_lib  # pylint: disable=g-import-not-at-top
  for method in methods:
    try:
      cfg = env_lib.prepare_config(run_config(base_cfg, method, 0))
      if int(cfg.moe.num_experts) > 0:
        model_lib.ModelConfig.from_config(cfg, vocab_size=max(int(cfg.model.vocab_size), 1))
    except ValueError as e:
      raise ValueError(f"method {method!r}: {e}") from None


def run_matrix(base_cfg, workdir, methods, seeds, lrs=(None,), say=print):
  """Trains every (lr, method, seed) not finished yet; returns the list of run directories."""
  from simbal_jax import train  # pylint: disable=g-import-not-at-top
  check_methods(base_cfg, methods)
  dirs = []
  jobs = [(lr, m, s) for lr in lrs for m in methods for s in seeds]
  for i, (lr, method, seed) in enumerate(jobs):
    d = run_dir(workdir, method, seed, lr)
    dirs.append(d)
    if (paths.resolve(d) / "summary.json").exists():
      say(f"[{i + 1}/{len(jobs)}] {d}: finished, skipped")
      continue
    cfg = run_config(base_cfg, method, seed, lr, os.path.join(workdir, "data"))
    say(f"[{i + 1}/{len(jobs)}] {method} seed {seed}" + ("" if lr is None else f" lr {lr:g}")
        + f" -> {d}")
    t0 = time.time()
    summary, _ = train.train_and_evaluate(cfg, d)
    if summary["status"] != "done":
      say(f"{d}: {summary['status']} at step {summary['step']}; rerun to resume")
      return dirs
    keep = {k: v for k, v in summary.items() if isinstance(v, (int, float, str))}
    paths.write_text(paths.resolve(d) / "summary.json", json.dumps(keep, indent=1))
    say(f"[{i + 1}/{len(jobs)}] done in {time.time() - t0:.0f} s: final eval loss "
        f"{summary['eval/loss']:.4f} ± {summary.get('eval/loss_se', float('nan')):.4f} (se)")
  return dirs


def main(argv):
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  from absl import logging  # pylint: disable=g-import-not-at-top
  fv = flags.FLAGS
  workdir = paths.absolute(fv.workdir)  # a cloud path stays one
  if not fv.aggregate:
    if fv.config is None:
      raise SystemExit("convergence: --config is required to train (or pass --aggregate)")
    logging.set_verbosity(logging.WARNING)
    lrs = [float(x) for x in fv.lrs] if fv.lrs else [None]
    seeds = [int(s) for s in fv.seeds]
    paths.resolve(workdir).mkdir(parents=True, exist_ok=True)
    run_matrix(fv.config, workdir, list(fv.methods), seeds, lrs,
               say=lambda m: print(f"[convergence] {m}", flush=True))
  table, md = write_outputs(workdir, fv.reference)
  print(md)
  print(f"\nwrote {os.path.join(workdir, 'table.md')}, table.json, loss_vs_tokens.png, "
        "churn_vs_tokens.png")
  del table  # app.run would print a returned value and exit with status 1


def _define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file("config", None, "Base config file (configs/<x>.py[:variant]); "
                                  "each method's variant is applied on top.", lock_config=False)
  flags.DEFINE_string("workdir", "runs/conv", "Directory holding one directory per run.")
  flags.DEFINE_list("methods", ["lbl", "simbal", "none"], "Methods (config variants).")
  flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds.")
  flags.DEFINE_list("lrs", [], "Peak learning rates to sweep (default: the config's).")
  flags.DEFINE_bool("aggregate", False, "Only aggregate the runs found under --workdir.")
  flags.DEFINE_string("reference", "lbl", "Reference method of the table.")


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  _define_flags()
  try:
    app.run(main)
  except ValueError as e:  # config and aggregation errors: one line, no traceback
    print(f"convergence: {e}", file=sys.stderr)
    sys.exit(2)
