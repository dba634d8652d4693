#!/usr/bin/env bash
# The CPU convergence matrices of docs/RESULTS.md, in the order they were run (one job at a time
# on a 2-core machine: about 1 to 1.5 hours in all when the cores are not shared).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PY:-.venv/bin/python}
$PY -m simbal_jax.experiments.convergence --config=configs/small.py --methods=lbl,simbal,none --seeds=0,1,2 --workdir=runs/conv_stdlib
$PY -m simbal_jax.experiments.convergence --config=configs/small.py --methods=simbal_coef1,simbal_coef0.01,simbal_unit,colnorm --seeds=0,1 --workdir=runs/conv_stdlib
$PY -m simbal_jax.experiments.convergence --config=configs/small.py --config.data.source=synthetic --config.train.num_steps=150 --methods=lbl,simbal,none --seeds=0,1,2 --workdir=runs/conv_synth
# "When does SimBal help?": the LBL's scope (groups of 1, 2, 4 sequences; the global batch of 16)
# against SimBal and no balancing, with routing churn; seed by seed, so that an interrupted
# matrix still pairs every method on the seeds it finished (rerunning resumes).
for seed in 0 1 2; do
  $PY -m simbal_jax.experiments.convergence --config=configs/small.py --methods=lbl,lbl_micro1,simbal,lbl_micro4,lbl_micro2,none --seeds=$seed --workdir=runs/scope
done
