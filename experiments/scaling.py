"""A method against its baselines across model sizes: the final validation loss difference,
paired by seed (mean and 95 % t-interval), against the non-embedding active parameters.

  python -m simbal_jax.experiments.scaling --workdirs=runs/scale_xs,runs/scale_s,runs/scale_m \
      --method=simbal --baselines=lbl,lbl_micro1 --out=runs/scaling

Each workdir holds one model size, trained by experiments/convergence.py (the same seeds, the
same evaluation set within a workdir); only finished runs count (`convergence.load_runs`), and
a seed counts for a pair only when both methods finished it. The size of a workdir is the
non-embedding active parameter count (`model.count_params`) of its runs' config.json (all of a
workdir's runs must agree; a workdir without a finished run of the method is left out, with
a line saying so). Writes `<out>.md` (the table), `<out>.json` and `<out>.png`
(`plots.diff_vs_size`) and prints the table.

`<out>.json`: {method, baselines, sizes: [{workdir, non_embedding_active, tokens, final_loss
{<method>: {mean, std, seeds}}, diff.<baseline>: {mean, ci95, per_seed, seeds}}]} (ci95 null
for fewer than two seeds), left_out [reason per workdir left out].
"""

import json
import sys

from simbal_jax import plots
from simbal_jax.runio import paths
from simbal_jax.experiments.convergence import load_runs
from simbal_jax.experiments.convergence_table import mean_ci, mean_std


def size_of(run_dir):
  """Non-embedding active parameters of a run (from its config.json)."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from simbal_jax import model as model_lib  # pylint: disable=g-import-not-at-top
  cfg = json.loads(paths.resolve(run_dir).joinpath("config.json").read_text())
  mcfg = model_lib.ModelConfig.from_config(ml_collections.ConfigDict(cfg))
  return int(model_lib.count_params(mcfg)["non_embedding_active"])


def size_row(workdir, method, baselines):
  """One workdir's row of the table (see the module docstring's JSON schema)."""
  runs, _ = load_runs(workdir)
  runs = [r for r in runs if r["lr"] is None]  # the config's learning rate only
  if not runs:
    raise ValueError(f"{workdir}: no finished run")
  sizes = {size_of(r["dir"]) for r in runs}
  tokens = {r["tokens"] for r in runs}
  if len(sizes) != 1 or len(tokens) != 1:
    raise ValueError(f"{workdir}: runs of different sizes or token budgets ({sorted(sizes)}, "
                     f"{sorted(tokens)}): one workdir per size")
  final = {}
  for r in runs:
    final.setdefault(r["method"], {})[r["seed"]] = float(r["final"]["eval/loss"])
  if method not in final:
    raise ValueError(f"{workdir}: no finished run of {method!r}")
  row = dict(workdir=workdir, non_embedding_active=sizes.pop(), tokens=tokens.pop(),
             final_loss={m: dict(mean_std(list(v.values())), seeds=sorted(v))
                         for m, v in sorted(final.items())}, diff={})
  for b in baselines:
    seeds = sorted(set(final[method]) & set(final.get(b, {})))
    per_seed = [final[method][s] - final[b][s] for s in seeds]
    mean, ci = mean_ci(per_seed)
    row["diff"][b] = dict(mean=mean, ci95=ci, per_seed=per_seed, seeds=seeds)
  return row


def format_table(result):
  """Markdown: one row per size."""
  method, baselines = result["method"], result["baselines"]
  head = ["non-embedding active params", "tokens"] + [f"{m} final loss" for m in
                                                     [method] + baselines]
  head += [f"{method} − {b} [95 % CI] (seeds)" for b in baselines]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for row in result["sizes"]:
    cells = [f"{row['non_embedding_active']:,}", f"{row['tokens']:,}"]
    for m in [method] + baselines:
      f = row["final_loss"].get(m)
      cells.append("-" if f is None else f"{f['mean']:.4f}" + (
          f" ± {f['std']:.4f}" if f["std"] is not None else "") + f" ({len(f['seeds'])})")
    for b in baselines:
      d = row["diff"][b]
      if d["mean"] is None:
        cells.append("-")
      else:
        ci = (f" [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}]" if d["ci95"] else "")
        cells.append(f"{d['mean']:+.4f}{ci} ({len(d['seeds'])})")
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def run(workdirs, method, baselines, out):
  """Builds the table, writes <out>.md/.json/.png and returns the result dict.

  A workdir without a finished run of `method` (a study still running) is left out with a
  printed line; none usable is an error (ValueError).
  """
  rows, skipped = [], []
  for w in workdirs:
    try:
      rows.append(size_row(w, method, baselines))
    except ValueError as e:
      skipped.append(str(e))
  if not rows:
    raise ValueError("; ".join(skipped))
  for line in skipped:
    print(f"left out: {line}")
  rows.sort(key=lambda r: r["non_embedding_active"])
  result = dict(method=method, baselines=list(baselines), sizes=rows, left_out=skipped)
  md = format_table(result)
  paths.resolve(out + ".md").write_text(md + "\n")
  paths.resolve(out + ".json").write_text(json.dumps(result, indent=1) + "\n")
  series = {b: [(r["non_embedding_active"], r["diff"][b]["mean"], r["diff"][b]["ci95"])
                for r in rows if r["diff"][b]["mean"] is not None] for b in baselines}
  fig = plots.diff_vs_size(series, title=f"{method} − baseline (mean, 95 % CI over seeds)")
  with paths.resolve(out + ".png").open("wb") as f:
    fig.savefig(f, format="png", dpi=120)
  print(md)
  print(f"wrote {out}.md, {out}.json, {out}.png")
  return result


def main(argv):
  del argv
  fv = flags.FLAGS
  run(list(fv.workdirs), fv.method, list(fv.baselines), fv.out)


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=g-import-not-at-top,g-multiple-import
  flags.DEFINE_list("workdirs", None, "Convergence workdirs, one per model size.",
                    required=True)
  flags.DEFINE_string("method", "simbal", "The method compared.")
  flags.DEFINE_list("baselines", ["lbl", "lbl_micro1"], "Baselines (methods of the workdirs).")
  flags.DEFINE_string("out", "runs/scaling", "Output path prefix (local or gs://).")
  try:
    app.run(main)
  except ValueError as e:
    sys.exit(f"error: {e}")
