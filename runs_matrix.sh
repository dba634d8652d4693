#!/usr/bin/env bash
# The CPU convergence matrices of docs/RESULTS.md, one after another.
set -euo pipefail
cd "$(dirname "$0")"
PY=.venv/bin/python
$PY -m experiments.convergence --config=configs/small.py --methods=lbl,simbal,none --seeds=0,1,2 --workdir=runs/conv_stdlib
$PY -m experiments.convergence --config=configs/small.py --config.data.source=synthetic --methods=lbl,simbal,none --seeds=0,1,2 --workdir=runs/conv_synth
$PY -m experiments.convergence --config=configs/small.py --methods=lbl,simbal,simbal_coef1,simbal_coef0.01,simbal_unit,colnorm --seeds=0,1 --workdir=runs/conv_stdlib
