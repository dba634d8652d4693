"""Benchmarks: the MoE block against a dense FFN, the full train step, and the balancing losses.

  python -m simbal_jax.experiments.benchmark --what=moe_layer --shapes=moe_m --tokens=16384
  python -m simbal_jax.experiments.benchmark --what=train_step --config=configs/moe_m.py:simbal \
      --config.train.global_batch_size=16
  python -m simbal_jax.experiments.benchmark --what=routing --config=configs/demo.py --tokens=16384
  python -m simbal_jax.experiments.benchmark --what=train_step --preset=bench_s \
      --set=moe.dispatch=ragged

Modes:
  moe_layer   `moe.MoEBlock` forward+backward against a dense SwiGLU `moe.MLP` with
              d_ff = K * expert d_ff (the same useful FLOPs). Useful FLOPs count only the K routed
              expert matmuls: 6 * T * K * 3 * D * F (fwd + bwd); capacity padding is not useful.
  train_step  the jitted train step of `simbal_jax.train` on synthetic random tokens (no data
              pipeline): step ms, tokens/s, MFU from `model.flops_per_token`.
  memory      the per-device memory estimate (`memory.memory_estimate`, what the trainer checks
              before compiling) against XLA's memory analysis of the compiled train step
              (arguments, outputs, temporaries per device), and on a device that reports it
              the peak bytes in use after a few steps. Nothing is timed.
  routing     the balancing machinery alone at MoE-M scale (route + dispatch plan, LBL, SimBal,
              all MoE layers of a step), then the train step of --config under each named method (configs/base.py)
              none / lbl / simbal: the losses' share of a training step.

Timing (see the device METHOD notes): one untimed first call (compile), `--warmup` untimed calls,
then `--iters` calls each closed by `jax.block_until_ready`; the median is reported, with the
10th/90th percentiles as the spread. Inputs rotate over `--input_sets` random sets (never zeros).
Prints a table; `--out` also writes JSON with the device kind, jax version and every number.
The moe_layer mode is defined here, the whole-step modes in bench_steps, shared helpers (timing,
shapes, presets, tables) in bench_lib.
"""

import json
import os
import sys
import types

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from simbal_jax import configs as config_files
from simbal_jax.experiments.bench_lib import (  # noqa: F401  pylint: disable=unused-import
    SHAPES, build_env, environment, parse_shape, peaks, preset_config, table, timed,
    vocab_size)
from simbal_jax.experiments.bench_steps import bench_memory, bench_routing, bench_train_step


_WHAT = flags.DEFINE_enum("what", "moe_layer", ["moe_layer", "train_step", "routing", "memory"],
                          "Which benchmark to run.")
_SHAPES = flags.DEFINE_list("shapes", ["bench_s", "moe_m", "olmoe"],
                            f"moe_layer: shape names {sorted(SHAPES)} or 'K:E:D:F'. routing "
                            "uses the first one for its loss timings.")
_TOKENS = flags.DEFINE_integer("tokens", 16384, "Tokens T per MoE layer call (moe_layer, routing).")
_CF = flags.DEFINE_float("capacity_factor", 1.25, "moe_layer: capacity factor (<= 0: dropless).")
_DISPATCH = flags.DEFINE_enum("dispatch", "capacity", ["capacity", "buckets", "ragged"],
                               "moe_layer: MoEConfig.dispatch (buckets: dropless at the smallest "
                               "fitting capacity bucket; ragged: dropless tokamax.ragged_dot, "
                               "Pallas kernels on GPU/TPU; both ignore capacity_factor).")
_DTYPE = flags.DEFINE_string("dtype", "bfloat16", "moe_layer: compute dtype.")
_PARAM_DTYPE = flags.DEFINE_string("param_dtype", "float32", "moe_layer: parameter dtype.")
_MOE_LAYERS = flags.DEFINE_integer("moe_layers", 8, "routing: MoE layers per step (MoE-M: 8).")
_METHODS = flags.DEFINE_list("methods", ["none", "lbl", "simbal"],
                             "routing: named balancing methods (lbl, simbal, ...) compared in the train step.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed calls after the compiling call.")
_ITERS = flags.DEFINE_integer("iters", 20, "Timed calls (median reported).")
_INPUT_SETS = flags.DEFINE_integer("input_sets", 2, "Random input sets rotated over the calls.")
_NUM_DEVICES = flags.DEFINE_integer("num_devices", 0, "train_step/routing: devices (0: all).")
_PEAK = flags.DEFINE_float("peak_tflops", 0.0, "Per-device peak TFLOP/s for MFU (0: 989 on GPU, "
                           "else n/a).")
_PEAK_GBPS = flags.DEFINE_float("peak_gbps", 0.0, "Per-device memory GB/s for the byte floor "
                                "(0: datasheet for H100/H200, else n/a).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed for parameters and inputs.")
_OUT = flags.DEFINE_string("out", "", "Write the JSON report here ('' = do not write).")
_PRESET = flags.DEFINE_string("preset", "", "train_step/routing: a named config instead of "
                              "--config: bench_s (the peer's OLMoE run), moe_m, tiny_s, tiny_m.")
_SET = flags.DEFINE_string("set", "", "Comma-separated key=value overrides of --preset, e.g. "
                           "moe.dispatch=ragged,moe.num_groups=1.")
_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(config_files.DIR, "demo.py"),
    "train_step/routing: config file[:variant]; fields overridable (--config.train.seq_len=...).",
    lock_config=False)


# ----------------------------------------------------------------------------------------------
# moe_layer.


def _fwd_bwd(module):
  """jit(params, x, dy) -> (grads wrt (params, x), aux): one forward + backward of `module`."""
  def f(params, x):
    out = module.apply({"params": params}, x)
    return out if isinstance(out, tuple) else (out, None)

  def run(params, x, dy):
    y, pullback, aux = jax.vjp(f, params, x, has_aux=True)
    return pullback(dy.astype(y.dtype)), aux
  return jax.jit(run)


def bench_moe_layer(shape, tokens, *, capacity_factor=1.25, dispatch="capacity", dtype="bfloat16",
                    param_dtype="float32", warmup=3, iters=20, input_sets=2, seed=0,
                    peak_tflops=None, peak_gbps=None):
  """MoEBlock fwd+bwd vs dense SwiGLU (d_ff = K * F) on T tokens; returns one result row."""
  from simbal_jax import dispatch as dispatch_lib  # pylint: disable=g-import-not-at-top
  from simbal_jax import experts  # pylint: disable=g-import-not-at-top
  from simbal_jax import moe  # pylint: disable=g-import-not-at-top
  name, (k, e, d, f) = parse_shape(shape)
  dt, pdt = jnp.dtype(dtype), jnp.dtype(param_dtype)
  mcfg = moe.MoEConfig(num_experts=e, top_k=k, d_ff=f, capacity_factor=capacity_factor,
                       dispatch=dispatch)
  caps = experts.capacities(mcfg, tokens, e, k)  # one routing group
  blocks = {"moe": moe.MoEBlock(mcfg, dtype=dt, param_dtype=pdt),
            "dense": moe.MLP(k * f, dtype=dt, param_dtype=pdt)}
  keys = jax.random.split(jax.random.key(seed), 2 + 2 * input_sets)
  xs = [jax.random.normal(keys[2 + 2 * i], (1, tokens, d), jnp.float32).astype(dt)
        for i in range(input_sets)]
  dys = [jax.random.normal(keys[3 + 2 * i], (1, tokens, d), jnp.float32).astype(dt)
         for i in range(input_sets)]
  flops = 6 * tokens * k * 3 * d * f
  row = dict(shape=name, top_k=k, experts=e, d_model=d, d_ff=f, dense_d_ff=k * f, tokens=tokens,
             capacity_factor=capacity_factor, dispatch=dispatch,
             capacity=caps[0] if dispatch == "capacity" else None,
             dtype=dt.name, param_dtype=pdt.name, useful_gflop=flops / 1e9)
  calls, outs = {}, []
  for i, (label, block) in enumerate(blocks.items()):
    params = jax.jit(block.init)(keys[i], xs[0])["params"]
    params = jax.tree.map(lambda p: p.value if hasattr(p, "value") else p, params,
                          is_leaf=lambda p: hasattr(p, "value"))
    n_params = sum(p.size for p in jax.tree.leaves(params))
    # Byte floor: params read fwd + read bwd + grads written; x, dy read, y, dx written.
    row[f"{label}_min_bytes"] = 3 * n_params * pdt.itemsize + 4 * tokens * d * dt.itemsize

    def call(j, step=_fwd_bwd(block), params=params, label=label):
      out = step(params, xs[j % input_sets], dys[j % input_sets])
      if label == "moe":
        outs.append(out[1])
      return out
    calls[label] = call
  for label, t in timed(calls, warmup=warmup, iters=iters).items():
    row[f"{label}_ms"] = t["median_ms"]
    row[f"{label}_p10_ms"], row[f"{label}_p90_ms"] = t["p10_ms"], t["p90_ms"]
    row[f"{label}_first_call_s"] = t["first_call_s"]
    row[f"{label}_tflops"] = flops / (t["median_ms"] * 1e-3) / 1e12
  row["dropped"] = float(np.mean([float(a.dropped) for a in outs[-input_sets:]]))
  if dispatch == "buckets":  # the bucket each input set ran at
    row["capacity"] = "/".join(str(caps[int(dispatch_lib.bucket_index(int(np.max(a.counts)),
                                                                      caps))])
                               for a in outs[-input_sets:])
  row["ratio"] = row["moe_ms"] / row["dense_ms"]
  row["iters"] = iters
  if peak_tflops:
    row["flop_floor_ms"] = flops / (peak_tflops * 1e12) * 1e3
  if peak_gbps:
    row["moe_byte_floor_ms"] = row["moe_min_bytes"] / (peak_gbps * 1e9) * 1e3
  return row


MOE_COLS = (("shape", "shape"), ("T", "tokens"), ("C", "capacity"), ("moe ms", "moe_ms"),
            ("dense ms", "dense_ms"), ("ratio", "ratio", 3), ("moe TF/s", "moe_tflops", 3),
            ("dense TF/s", "dense_tflops", 3), ("dropped", "dropped", 3),
            ("moe p10-p90 ms", "moe_spread"))
STEP_COLS = (("method", "method"), ("step ms", "step_ms"), ("p10", "p10_ms"), ("p90", "p90_ms"),
             ("tokens/s", "tokens_per_s"), ("MFU", "mfu", 3), ("vs none", "overhead_vs_none", 3),
             ("compile s", "first_call_s"), ("peak GiB", "peak_mem_gib", 3),
             ("dispatch", "dispatch"))
MEM_COLS = (("dispatch", "dispatch"), ("remat", "remat"), ("est state", "est_state_gib", 4),
            ("est act", "est_activations_gib", 4), ("est total", "est_total_gib", 4),
            ("xla args", "xla_args_gib", 4), ("xla temp", "xla_temp_gib", 4),
            ("xla total", "xla_total_gib", 4), ("temp/est", "temp_vs_est", 3),
            ("peak", "peak_gib", 4))
LOSS_COLS = (("part", "part"), ("shape", "shape"), ("T", "tokens"), ("layers", "moe_layers"),
             ("ms", "ms"), ("p10", "p10_ms"), ("p90", "p90_ms"))


def run(what, flags_values, config=None):
  """Runs one mode; returns the JSON-able report (environment, settings, results)."""
  fv = types.SimpleNamespace(**flags_values)
  tf, gb = peaks(fv.peak_tflops, fv.peak_gbps)
  devices = jax.devices()[:fv.num_devices] if fv.num_devices > 0 else None
  command = " ".join(["python -m simbal_jax.experiments.benchmark"] + sys.argv[1:])
  report = dict(what=what, env=environment(), peak_tflops=tf, peak_gbps=gb,
                settings=flags_values, command=command)
  common = dict(warmup=fv.warmup, iters=fv.iters, input_sets=fv.input_sets, seed=fv.seed)
  if what == "moe_layer":
    rows = [bench_moe_layer(s, fv.tokens, capacity_factor=fv.capacity_factor,
                            dispatch=getattr(fv, "dispatch", "capacity"), dtype=fv.dtype,
                            param_dtype=fv.param_dtype, peak_tflops=tf, peak_gbps=gb, **common)
            for s in fv.shapes]
    for r in rows:
      r["moe_spread"] = f"{r['moe_p10_ms']:.4g}-{r['moe_p90_ms']:.4g}"
    report["results"] = rows
    report["text"] = table(rows, MOE_COLS)
  elif what == "train_step":
    row = bench_train_step(config, devices=devices, peak_tflops=tf, **common)
    report["results"] = [row]
    report["config"] = config.to_dict()
    report["text"] = table([row], STEP_COLS[:6] + STEP_COLS[7:])  # no "vs none" column
  elif what == "memory":
    row = bench_memory(config, devices=devices, seed=fv.seed)
    report["results"] = [row]
    report["config"] = config.to_dict()
    report["text"] = table([row], MEM_COLS)
  elif what == "routing":
    res = bench_routing(config, fv.methods, fv.shapes[0], fv.tokens, fv.moe_layers,
                        devices=devices, peak_tflops=tf, **common)
    report["results"] = res
    report["config"] = config.to_dict()
    report["text"] = table(res["losses"], LOSS_COLS) + "\n\n" + table(res["train_steps"],
                                                                       STEP_COLS)
  else:
    raise ValueError(f"unknown --what={what!r}")
  return report


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Too many command-line arguments: {argv[1:]}")
  names = ("shapes", "tokens", "capacity_factor", "dispatch", "dtype", "param_dtype", "moe_layers",
           "methods", "warmup", "iters", "input_sets", "num_devices", "peak_tflops",
           "peak_gbps", "seed")
  values = {n: flags.FLAGS[n].value for n in names}
  env = environment()
  print(f"jax {env['jax_version']} on {env['device_count']} x {env['device_kind']} "
        f"({env['platform']}), {env['cpu_count']} host CPUs (load {env['load_avg_1m']:.2f}), "
        f"{env['date']}", flush=True)
  config = _CONFIG.value
  if _PRESET.value:
    from simbal_jax.configs import base  # pylint: disable=g-import-not-at-top
    config = base.apply_variant(preset_config(_PRESET.value), _SET.value) if _SET.value else (
        preset_config(_PRESET.value))
  report = run(_WHAT.value, values, config)
  print(report["text"])
  if report["peak_tflops"] is None and _WHAT.value != "memory":
    print("MFU: n/a (no --peak_tflops for this platform)")
  if _OUT.value:
    from simbal_jax.runio import paths  # pylint: disable=g-import-not-at-top
    out = paths.resolve(_OUT.value)  # local or gs://
    out.parent.mkdir(parents=True, exist_ok=True)
    paths.write_text(out, json.dumps(report, indent=1, default=str))
    print(f"wrote {_OUT.value}")


if __name__ == "__main__":
  app.run(main)
