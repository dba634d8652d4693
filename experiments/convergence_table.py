"""The convergence table's statistics and formatting (pure: lists and dicts of numbers).

`aggregate` turns the runs found by `convergence.load_runs` into the table dict (schema and
definitions in `simbal_jax.experiments.convergence`), `format_table` into markdown.
Routing change over training: every evaluation logs `eval/churn` (routing churn of the probe
tokens since the previous evaluation, mean over layers) and `eval/expert_move` /
`eval/stagnant` (simbal_jax.analysis.RoutingTracker); the table gives each method's mean over
seeds at every evaluation (`change_vs_tokens`).
"""

import math
import re

import numpy as np
import scipy.stats

from simbal_jax import eval_metrics

# Logged at every evaluation (change since the previous one): eval/<name>, mean over layers.
CHANGE_METRICS = ("churn", "expert_move", "stagnant")


def t975(df):
  """The 0.975 quantile of Student's t with `df` degrees of freedom (df >= 1)."""
  return float(scipy.stats.t.ppf(0.975, df))


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
# Aggregation.


def group_runs(runs):
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
  groups = group_runs(runs)
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
    entry["metrics"] = {m.name: mean_std([by_seed[s]["final"].get(m.key) for s in seeds])
                        for m in eval_metrics.table_metrics()}
    per_layer = {}
    for key in sorted(by_seed[seeds[0]]["final"]):
      mm = re.match(r"^eval/(layer_\d+)/(\w+)$", key)
      if mm:
        per_layer.setdefault(mm.group(2), {})[mm.group(1)] = mean_std(
            [by_seed[s]["final"].get(key) for s in seeds])
    entry["per_layer"] = per_layer
    entry["eval_sets"] = eval_set_stats([by_seed[s]["final"] for s in seeds])
    entry["other_lrs"] = {str(lr): {"final_loss": _final_loss_stats(groups[method][lr])}
                          for lr in sorted(groups[method], key=lambda x: (x is None, x))
                          if lr != best[method]}
    entry["change_vs_tokens"] = {k: change_curve([by_seed[s]["change"][k] for s in seeds])
                                 for k in CHANGE_METRICS if all(
                                     by_seed[s].get("change", {}).get(k) for s in seeds)}
    table["methods"][method] = entry
  return table


_EVAL_SET_LOSS = re.compile(r"^eval_(\w+)/loss$")


def eval_set_stats(finals):
  """The extra evaluation sets (train.eval_sets) that every seed's final evaluation holds:
  {name: {loss {mean, std}, load_tv {mean, std}}} over seeds (load_tv: the load shift from the
  main evaluation set, mean over layers)."""
  names = [m.group(1) for m in map(_EVAL_SET_LOSS.match, finals[0]) if m] if finals else []
  return {n: {k: mean_std([f.get(f"eval_{n}/{k}") for f in finals]) for k in ("loss", "load_tv")}
          for n in names if all(f"eval_{n}/loss" in f for f in finals)}


def change_curve(curves):
  """Mean and std over seeds at the evaluations (tokens) that every seed logged.

  Args:
    curves: one [(tokens, value), ...] per seed.
  Returns:
    {tokens [int], mean [float], std [float or None]}.
  """
  common = sorted(set.intersection(*[{t for t, _ in c} for c in curves]))
  by_tokens = [dict(c) for c in curves]
  stats = [mean_std([d[t] for d in by_tokens]) for t in common]
  return {"tokens": common, "mean": [x["mean"] for x in stats], "std": [x["std"] for x in stats]}


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
  columns = eval_metrics.table_metrics()
  lines += ["", "| method | " + " | ".join(c.table for c in columns) + " |",
            "|---" * (len(columns) + 1) + "|"]
  for name, e in table["methods"].items():
    m = e["metrics"]
    lines.append(f"| {name} | " + " | ".join(_pm(m.get(c.name, {"mean": None}), c.fmt) for c in columns) + " |")
  lines += format_eval_sets(table)
  lines += format_change(table)
  others = [(n, lr, v) for n, e in table["methods"].items() for lr, v in e["other_lrs"].items()]
  if others:
    lines += ["", "Other learning rates (final loss, mean ± std over seeds):", ""]
    lines += [f"- {n} lr {lr}: {_pm(v['final_loss'])}" for n, lr, v in others]
  if table["incomplete"]:
    lines += ["", "Not included (unfinished or incomplete):", ""]
    lines += [f"- {x}" for x in table["incomplete"]]
  return "\n".join(lines)



def format_eval_sets(table):
  """Markdown lines: each method's final loss and load shift on every extra evaluation set
  (train.eval_sets; empty when no method has one)."""
  names = list(dict.fromkeys(n for e in table["methods"].values() for n in e.get("eval_sets", {})))
  if not names:
    return []
  lines = ["", "Extra evaluation sets (train.eval_sets): final loss / load shift from the main "
           "set (total variation, mean over layers), mean ± std over seeds:", "",
           "| method | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
  for name, e in table["methods"].items():
    sets = e.get("eval_sets", {})
    cells = [f"{_pm(sets[n]['loss'])} / {_pm(sets[n]['load_tv'], '.3f')}" if n in sets else "-"
             for n in names]
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return lines


_CHANGE_TITLES = {
    "churn": "Routing churn since the previous evaluation (1 − top-k overlap / K on the probe "
             "tokens, mean over layers; the first column is since the initialisation), mean "
             "over seeds:",
    "expert_move": "Expert weight movement since the previous evaluation (‖ΔW_e‖ / ‖W_e‖, mean "
                   "over experts and layers), mean over seeds:",
    "stagnant": "Stagnant experts per layer (moving less than a tenth of the layer's median), "
                "mean over layers and seeds:",
}


def format_change(table):
  """Markdown lines: one table per CHANGE_METRICS metric, methods by evaluation tokens (empty
  when no method logged it)."""
  lines = []
  for k in CHANGE_METRICS:
    rows = {n: e["change_vs_tokens"][k] for n, e in table["methods"].items()
            if k in e.get("change_vs_tokens", {})}
    if not rows:
      continue
    tokens = sorted(set().union(*[r["tokens"] for r in rows.values()]))
    spec = ".3f" if k == "stagnant" else ".4f"
    lines += ["", _CHANGE_TITLES[k], "",
              "| method | " + " | ".join(f"{t / 1e3:,.0f}k" for t in tokens) + " |",
              "|---|" + "---|" * len(tokens)]
    for name, r in rows.items():
      at = dict(zip(r["tokens"], r["mean"]))
      lines.append(f"| {name} | " + " | ".join(_fmt(at.get(t), spec) for t in tokens) + " |")
  return lines
