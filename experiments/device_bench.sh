#!/usr/bin/env bash
# One device call: bench_s and MoE-M train steps (capacity 1.25 and dropless tokamax ragged),
# the memory estimate against the compiled step and the measured peak,
# the MoE block vs a dense FFN, and the peer's HF OLMoE (torch.compile) beside them.
#
#   bash experiments/device_bench.sh PEER_SCRIPT [--tiny]
#
# PEER_SCRIPT: path of peer_olmoe_bench.py inside the repository copy (on the device machine
# only the repository travels: copy ../shared/bench/ into it first, e.g. to shared/bench/), or
# "none" to skip it. --tiny: CPU smoke mode (tiny presets and shapes, peer at a tiny size).
# Results (JSON + logs) go to $OUT (default runs/device_bench); one command failing does not
# stop the others; each is capped by `timeout` (100 s, the peer 180 s).
set -u
PEER=${1:?usage: device_bench.sh PEER_SCRIPT|none [--tiny]}
MODE=${2:-}
OUT=${OUT:-runs/device_bench}
mkdir -p "$OUT"
PY=${PYTHON:-python}
B="$PY -m simbal_jax.experiments.benchmark"
if [ "$MODE" = "--tiny" ]; then
  S=tiny_s; M=tiny_m; SHAPES=2:8:32:16,4:8:32:32; TOK=256; IT="--warmup=1 --iters=2"; T=300
  PEER_ARGS="--layers 2 --d_model 64 --heads 4 --experts 8 --top_k 2 --expert_ff 32 --vocab 512 --seq 64 --batch 2 --steps 2 --warmup 1"
else
  S=bench_s; M=moe_m; SHAPES=bench_s,moe_m; TOK=16384; IT="--warmup=2 --iters=10"; T=100
  PEER_ARGS="--compile"
fi
run() {  # name, command... (the peer's torch.compile gets longer)
  local name=$1; shift
  local t=$T; [ "$name" = peer_olmoe ] && t=$((T + 80))
  echo "== $name: $*" | tee -a "$OUT/summary.txt"
  timeout "$t" "$@" > "$OUT/$name.log" 2>&1
  echo "rc=$?" >> "$OUT/$name.log"
  grep -v "^I[0-9]\|^W[0-9]" "$OUT/$name.log" | tail -6 | tee -a "$OUT/summary.txt"
}
{ date -u; nvidia-smi --query-gpu=name,memory.total --format=csv 2>/dev/null; uptime;
  $PY -c "import jax, tokamax; print('jax', jax.__version__, jax.devices())" 2>&1 | tail -1
  git rev-parse --short HEAD 2>/dev/null; } > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt" | tee -a "$OUT/summary.txt"
run step_${S}_capacity $B --what=train_step --preset=$S $IT --out="$OUT/step_${S}_capacity.json"
run step_${S}_ragged $B --what=train_step --preset=$S --set=moe.dispatch=ragged,moe.num_groups=1 $IT --out="$OUT/step_${S}_ragged.json"
run step_${M}_capacity $B --what=train_step --preset=$M $IT --out="$OUT/step_${M}_capacity.json"
run step_${M}_ragged $B --what=train_step --preset=$M --set=moe.dispatch=ragged,moe.num_groups=1 $IT --out="$OUT/step_${M}_ragged.json"
run memory_${S}_ragged $B --what=memory --preset=$S --set=moe.dispatch=ragged,moe.num_groups=1 --out="$OUT/memory_${S}_ragged.json"
run memory_${M}_ragged $B --what=memory --preset=$M --set=moe.dispatch=ragged,moe.num_groups=1 --out="$OUT/memory_${M}_ragged.json"
run layer_capacity $B --what=moe_layer --shapes=$SHAPES --tokens=$TOK --capacity_factor=1.25 $IT --out="$OUT/layer_capacity.json"
run layer_ragged $B --what=moe_layer --shapes=$SHAPES --tokens=$TOK --dispatch=ragged $IT --out="$OUT/layer_ragged.json"
if [ "$PEER" != "none" ]; then
  run peer_olmoe $PY "$PEER" $PEER_ARGS
fi
echo "done; results in $OUT" | tee -a "$OUT/summary.txt"
