"""The convergence-speed table: does a method reach the reference's final validation loss with
fewer tokens, by how much, how sure are we.

  python -m simbal_jax.experiments.convergence --config=configs/small.py --methods=lbl,simbal,none \
      --seeds=0,1,2 --workdir=runs/conv [--lrs=1e-3,3e-3] [--config.<field>=...]
  python -m simbal_jax.experiments.convergence --aggregate --workdir=runs/conv [--reference=lbl]

Running trains methods x seeds (x learning rates) one after another, one run directory each:
`<workdir>/<method>[/lr<x>]/seed<k>`. A method is any config variant (`lbl`, `simbal`,
`simbal_coef1`, `lf_simbal_sigmoid`, `simbal_unit`, ...: configs/base.py), applied after the
command-line overrides. Finished runs (a `summary.json`) are skipped; an interrupted run resumes
from its checkpoint. Seed k gives every method the same initialisation (apart from what a method
prescribes) and the same data order; all runs share one prepared corpus and therefore one
evaluation set. Then the table is aggregated.

`--aggregate` reads run directories made anywhere (e.g. on several machines and copied
together): it needs each run's `metrics.jsonl` and `config.json` (and uses `eval_seq_loss.json`
when present, for the paired evaluation-set error of a difference). It writes `table.md`,
`table.json` and `loss_vs_tokens.png` into the workdir and prints the table. The workdir may be
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
  learning rates  with --lrs every method runs every rate and is compared at its own best
                  rate (lowest mean final loss); the other rates are listed.

table.json schema:
  reference, target_loss, reference_tokens, incomplete [str], runs [{method, lr, seed, dir,
  final_loss, tokens}], methods.<name>: {lr, seeds, final_loss {mean, std, per_seed},
  final_ppl {mean, std}, eval_loss_se, diff_vs_reference {mean, ci95, per_seed, eval_se}
  (not for the reference), tokens_to_target {per_seed, reached, mean}, fewer_tokens_pct
  {per_seed, mean, ci95}, metrics.<maxvio|load_cv|seu|entropy|dead|ortho_l1|ortho_mse|pes_min>
  {mean, std}, per_layer.<metric>.<layer_i> {mean, std}, other_lrs.<lr>.final_loss {mean, std}}
  (std is null for a single seed; ci95 null for fewer than two).
"""

import json
import math
import os
import re
import sys
import time

import numpy as np

from simbal_jax import paths
from simbal_jax import plots
from simbal_jax import writers

_ROUTING = ("maxvio", "load_cv", "seu", "entropy", "dead", "ortho_l1", "ortho_mse", "pes_min")
# Two-sided 95 % Student t quantiles t_{0.975, df} for df = 1..30 (larger df: normal 1.96).
_T975 = (12.706205, 4.302653, 3.182446, 2.776445, 2.570582, 2.446912, 2.364624, 2.306004,
         2.262157, 2.228139, 2.200985, 2.178813, 2.160369, 2.144787, 2.131450, 2.119905,
         2.109816, 2.100922, 2.093024, 2.085963, 2.079614, 2.073873, 2.068658, 2.063899,
         2.059539, 2.055529, 2.051831, 2.048407, 2.045230, 2.042272)


def t975(df):
  """The 0.975 quantile of Student's t with `df` degrees of freedom (df >= 1)."""
  return _T975[df - 1] if df <= len(_T975) else 1.959964


def mean_ci(values):
  """(mean, [lo, hi] 95 % t-interval or None for fewer than 2 values) of a list of floats."""
  v = np.asarray(values, np.float64)
  if v.size == 0:
    return None, None
  m = float(v.mean())
  if v.size < 2:
    return m, None
  h = t975(v.size - 1) * float(v.std(ddof=1)) / math.sqrt(v.size)
  return m, [m - h, m + h]


def mean_std(values):
  v = np.asarray([x for x in values if x is not None], np.float64)
  if v.size == 0:
    return {"mean": None, "std": None}
  return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else None}


def tokens_to_target(curve, target):
  """First crossing of `target` by an evaluation curve, interpolated linearly in tokens.

  Args:
    curve: [(tokens, loss), ...] in increasing tokens.
    target: float.
  Returns:
    float tokens, or None when no evaluation reaches the target (never extrapolated).
  """
  prev = None
  for tokens, loss in curve:
    if loss <= target:
      if prev is None:
        return float(tokens)
      (t0, l0), (t1, l1) = prev, (tokens, loss)
      return float(t0 + (l0 - target) / (l0 - l1) * (t1 - t0))
    prev = (tokens, loss)
  return None


# ----------------------------------------------------------------------------------------------
# Reading runs.

_LR_DIR = re.compile(r"^lr(.+)$")
_SEED_DIR = re.compile(r"^seed(\d+)$")


def load_runs(workdir):
  """Finds `<method>[/lr<x>]/seed<k>` run directories under `workdir`.

  Returns:
    (runs, incomplete): runs is a list of dicts (method, lr float or None, seed, dir, curve
    [(tokens, loss)], final {eval metrics of the last step}, tokens, seq_loss list or None);
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
                     lr_config=float(cfg["opt"]["peak_lr"])))
  return runs, incomplete


# ----------------------------------------------------------------------------------------------
# Aggregation.


def _group(runs):
  """{method: {lr: {seed: run}}}."""
  out = {}
  for r in runs:
    out.setdefault(r["method"], {}).setdefault(r["lr"], {})[r["seed"]] = r
  return out


def _final_loss_stats(by_seed):
  return mean_std([r["final"]["eval/loss"] for r in by_seed.values()])


def aggregate(runs, incomplete=(), reference="lbl"):
  """The convergence table as a dict (schema in the module docstring).

  Raises:
    ValueError: the reference method has no finished run.
  """
  groups = _group(runs)
  if reference not in groups:
    raise ValueError(f"reference method {reference!r} has no finished run; methods with "
                     f"finished runs: {', '.join(sorted(groups)) or 'none'}")
  best = {}
  for method, by_lr in groups.items():
    best[method] = min(by_lr, key=lambda lr: (_final_loss_stats(by_lr[lr])["mean"],
                                              -1 if lr is None else lr))
  ref = groups[reference][best[reference]]
  target = float(np.mean([r["final"]["eval/loss"] for r in ref.values()]))
  ref_tokens = float(np.mean([r["tokens"] for r in ref.values()]))
  table = {"reference": reference, "target_loss": target, "reference_tokens": ref_tokens,
           "incomplete": list(incomplete),
           "runs": [dict(method=r["method"], lr=r["lr"], seed=r["seed"], dir=r["dir"],
                         final_loss=r["final"]["eval/loss"], tokens=r["tokens"]) for r in runs],
           "methods": {}}
  order = [reference] + sorted(m for m in groups if m != reference)
  for method in order:
    by_seed = groups[method][best[method]]
    seeds = sorted(by_seed)
    finals = [by_seed[s]["final"]["eval/loss"] for s in seeds]
    entry = {"lr": best[method], "seeds": seeds,
             "final_loss": dict(mean_std(finals), per_seed=finals),
             "final_ppl": mean_std([math.exp(min(x, 80.0)) for x in finals]),
             "eval_loss_se": mean_std([by_seed[s]["final"].get("eval/loss_se")
                                       for s in seeds])["mean"]}
    if method != reference:
      paired = [s for s in seeds if s in ref]
      diffs = [by_seed[s]["final"]["eval/loss"] - ref[s]["final"]["eval/loss"] for s in paired]
      m, ci = mean_ci(diffs)
      ses = []
      for s in paired:
        a, b = by_seed[s]["seq_loss"], ref[s]["seq_loss"]
        if a is not None and b is not None and len(a) == len(b) and len(a) > 1:
          d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
          ses.append(float(d.std(ddof=1) / math.sqrt(d.size)))
      entry["diff_vs_reference"] = {"mean": m, "ci95": ci, "per_seed": diffs, "seeds": paired,
                                    "eval_se": float(np.mean(ses)) if ses else None}
    ttt = [tokens_to_target(by_seed[s]["curve"], target) for s in seeds]
    reached = [t for t in ttt if t is not None]
    entry["tokens_to_target"] = {"per_seed": ttt, "reached": len(reached),
                                 "mean": float(np.mean(reached)) if reached else None}
    pct = [None if t is None else 100.0 * (1.0 - t / ref_tokens) for t in ttt]
    pm, pci = mean_ci(pct) if reached and len(reached) == len(ttt) else (None, None)
    entry["fewer_tokens_pct"] = {"per_seed": pct, "mean": pm, "ci95": pci}
    entry["metrics"] = {k: mean_std([by_seed[s]["final"].get(f"eval/{k}") for s in seeds])
                        for k in _ROUTING}
    per_layer = {}
    for key in sorted(by_seed[seeds[0]]["final"]):
      mm = re.match(r"^eval/(layer_\d+)/(\w+)$", key)
      if mm:
        per_layer.setdefault(mm.group(2), {})[mm.group(1)] = mean_std(
            [by_seed[s]["final"].get(key) for s in seeds])
    entry["per_layer"] = per_layer
    entry["other_lrs"] = {str(lr): {"final_loss": _final_loss_stats(groups[method][lr])}
                          for lr in sorted(groups[method], key=lambda x: (x is None, x))
                          if lr != best[method]}
    table["methods"][method] = entry
  return table


def _fmt(x, spec=".4f"):
  return "-" if x is None else format(x, spec)


def _pm(d, spec=".4f"):
  if d["mean"] is None:
    return "-"
  return f"{d['mean']:{spec}}" + ("" if d["std"] is None else f" ± {d['std']:{spec}}")


def _ci(m, ci, spec="+.4f"):
  if m is None:
    return "-"
  return f"{m:{spec}}" + ("" if ci is None else f" [{ci[0]:{spec}}, {ci[1]:{spec}}]")


def format_table(table):
  """Markdown tables: losses and tokens, then routing metrics."""
  ref = table["reference"]
  lines = [f"Target: the reference `{ref}`'s final validation loss {table['target_loss']:.4f} "
           f"after {table['reference_tokens']:,.0f} training tokens (mean over its seeds).", "",
           "| method | lr | seeds | final loss | ppl | Δ vs " + ref + " [95% CI] | eval-set SE of Δ"
           " | tokens to target (reached) | % fewer tokens [95% CI] |",
           "|---|---|---|---|---|---|---|---|---|"]
  for name, e in table["methods"].items():
    d = e.get("diff_vs_reference", {"mean": None, "ci95": None, "eval_se": None})
    t = e["tokens_to_target"]
    tt = "-" if t["mean"] is None else f"{t['mean']:,.0f}"
    pct = e["fewer_tokens_pct"]
    pct_s = (_ci(pct["mean"], pct["ci95"], "+.1f") if pct["mean"] is not None else
             "not reached" if t["reached"] == 0 else f"{t['reached']}/{len(e['seeds'])} reached")
    lines.append(f"| {name} | {_fmt(e['lr'], 'g')} | {len(e['seeds'])} | "
                 f"{_pm(e['final_loss'])} | {_pm(e['final_ppl'], '.3f')} | "
                 f"{_ci(d['mean'], d['ci95']) if name != ref else '(reference)'} | "
                 f"{_fmt(d['eval_se'])} | {tt} ({t['reached']}/{len(e['seeds'])}) | {pct_s} |")
  lines += ["", "| method | MaxVio | load CV | SEU | entropy | dead | ‖RᵀR−I‖₁ | mean (RᵀR−I)² |"
            " PES min |", "|---|---|---|---|---|---|---|---|---|"]
  for name, e in table["methods"].items():
    m = e["metrics"]
    lines.append(f"| {name} | " + " | ".join(
        _pm(m[k], ".2e" if k == "ortho_mse" else ".4f") for k in _ROUTING) + " |")
  others = [(n, lr, v) for n, e in table["methods"].items() for lr, v in e["other_lrs"].items()]
  if others:
    lines += ["", "Other learning rates (final loss, mean ± std over seeds):", ""]
    lines += [f"- {n} lr {lr}: {_pm(v['final_loss'])}" for n, lr, v in others]
  if table["incomplete"]:
    lines += ["", "Not included (unfinished or incomplete):", ""]
    lines += [f"- {x}" for x in table["incomplete"]]
  return "\n".join(lines)


def plot(table, runs, path):
  """loss_vs_tokens.png: validation loss against tokens of every method at its chosen rate
  (mean and min-max band over seeds, the target as a line; `plots.loss_vs_tokens`) and each
  seed's difference against the reference."""
  groups = _group(runs)
  curves = {name: {s: groups[name][e["lr"]][s]["curve"] for s in e["seeds"]}
            for name, e in table["methods"].items()}
  fig = plots.loss_vs_tokens(curves, reference=table["reference"], target=table["target_loss"],
                             title="Validation loss (mean, min-max band over seeds)")
  with paths.resolve(path).open("wb") as f:  # local or cloud
    fig.savefig(f, format="png", dpi=120)


def write_outputs(workdir, reference="lbl"):
  """Aggregates the runs under `workdir`, writes table.md / table.json / loss_vs_tokens.png.

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


def run_matrix(base_cfg, workdir, methods, seeds, lrs=(None,), say=print):
  """Trains every (lr, method, seed) not finished yet; returns the list of run directories."""
  from simbal_jax import train  # pylint: disable=g-import-not-at-top
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
  print(f"\nwrote {os.path.join(workdir, 'table.md')}, table.json, loss_vs_tokens.png")
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
