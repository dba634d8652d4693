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
  train_step  the jitted train step of `train.make_steps` on synthetic random tokens (no data
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
"""

import copy
import json
import math
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


# ----------------------------------------------------------------------------------------------
# train_step.


def train_step_runner(config, *, input_sets=2, devices=None, seed=0):
  """(call(i) running one train step on rotating random-token batches, env). Call it inside
  `sharding.mesh_rules(env.mesh, env.rules)`."""
  from simbal_jax import step as step_lib  # pylint: disable=g-import-not-at-top
  from simbal_jax import train  # pylint: disable=g-import-not-at-top
  env = build_env(config, devices)
  cfg, t = env.cfg, env.cfg.train
  b, l = int(t.global_batch_size), int(t.seq_len)
  rng = np.random.default_rng(seed)
  batches = []
  for _ in range(input_sets):
    toks = rng.integers(0, cfg.model.vocab_size, size=(b, l + 1), dtype=np.int32)
    batches.append(train.to_global({"inputs": toks[:, :-1], "targets": toks[:, 1:]},
                                   env.batch_sharding))
  state = jax.jit(lambda k: step_lib.unbox(env.init(k)),
                  out_shardings=env.shardings)(jax.random.key(seed))
  train_step = train.make_train_step(env)
  box = {"state": state}

  def call(i):
    box["state"], box["metrics"] = train_step(box["state"], batches[i % input_sets])
    return box["state"], box["metrics"]
  call.last_metrics = lambda: box["metrics"]
  return call, env


def train_step_row(env, tm, last_metrics, peak_tflops=None):
  """Result row of one timed train step (tm from `timed`, last_metrics its last metrics)."""
  from simbal_jax import model as model_lib  # pylint: disable=g-import-not-at-top
  t = env.cfg.train
  b, l = int(t.global_batch_size), int(t.seq_len)
  n_dev, tokens = env.mesh.size, b * l
  fpt = model_lib.flops_per_token(env.mcfg, l)
  tok_s = tokens / (tm["median_ms"] * 1e-3)
  counts = model_lib.count_params(env.mcfg)
  method = env.cfg.get("bench_method", env.cfg.balance.terms)
  row = dict(method=method, step_ms=tm["median_ms"], p10_ms=tm["p10_ms"],
             p90_ms=tm["p90_ms"], first_call_s=tm["first_call_s"], tokens_per_step=tokens,
             tokens_per_s=tok_s, flops_per_token=fpt, devices=n_dev, mesh=dict(env.mesh.shape),
             batch=b, seq_len=l, dtype=env.cfg.model.dtype, active_params=counts["active"],
             total_params=counts["total"], iters=tm["iters"], times_ms=tm["times_ms"],
             last_loss=float(jax.device_get(last_metrics["train/loss"])))
  row["mfu"] = (fpt * tok_s / (n_dev * peak_tflops * 1e12)) if peak_tflops else None
  stats = jax.devices()[0].memory_stats() or {}  # None on CPU
  row["peak_mem_gib"] = stats.get("peak_bytes_in_use", 0) / 2**30 or None
  row["dispatch"] = env.cfg.moe.dispatch if env.mcfg.moe else "dense"
  return row


def bench_train_steps(configs, *, warmup=3, iters=20, input_sets=2, devices=None, seed=0,
                      peak_tflops=None):
  """Times the jitted train step of each config (round-robin) on random tokens; one row each.

  The configs must share the mesh settings (one mesh context for all).
  """
  from simbal_jax import sharding  # pylint: disable=g-import-not-at-top
  runners = [train_step_runner(c, input_sets=input_sets, devices=devices, seed=seed)
             for c in configs]
  env0 = runners[0][1]
  with sharding.mesh_rules(env0.mesh, env0.rules):
    tms = timed({i: call for i, (call, _) in enumerate(runners)}, warmup=warmup, iters=iters)
  return [train_step_row(env, tms[i], call.last_metrics(), peak_tflops)
          for i, (call, env) in enumerate(runners)]


def bench_train_step(config, **kw):
  """Times the jitted train step of one config; returns its result row."""
  return bench_train_steps([config], **kw)[0]


def bench_memory(config, devices=None, run_steps=3, seed=0):
  """The memory estimate against XLA's compiled train step; one row of GiB per device.

  est_* come from `memory.memory_estimate` (state exact, activations analytic); xla_* from
  `Compiled.memory_analysis()` of the train step (arguments = the state and batch, temp = the
  step's temporaries: activations, gradients and the optimizer's intermediates); peak from
  `memory_stats()["peak_bytes_in_use"]` after `run_steps` steps (None where the backend has no
  memory stats, e.g. CPU).
  """
  from simbal_jax import memory  # pylint: disable=g-import-not-at-top
  from simbal_jax import sharding  # pylint: disable=g-import-not-at-top
  from simbal_jax import train  # pylint: disable=g-import-not-at-top
  env = build_env(config, devices)
  t = env.cfg.train
  b, l = int(t.global_batch_size), int(t.seq_len)
  est = memory.memory_estimate(env.mcfg, dict(env.mesh.shape), global_batch_size=b, seq_len=l,
                               grad_accum=int(t.grad_accum))
  batch = {k: jax.ShapeDtypeStruct((b, l), jnp.int32, sharding=env.batch_sharding)
           for k in ("inputs", "targets")}
  with sharding.mesh_rules(env.mesh, env.rules):
    ma = train.make_train_step(env).lower(env.abstract, batch).compile().memory_analysis()
  gib = lambda x: float(x) / 2**30
  state = est["params"] + est["grads"] + est["opt_state"]
  acts = est["activations_remat"] if env.mcfg.remat else est["activations"]
  row = dict(dispatch=env.cfg.moe.dispatch if env.mcfg.moe else "dense", remat=env.mcfg.remat,
             mesh=dict(env.mesh.shape), batch=b, seq_len=l,
             est_params_gib=gib(est["params"]), est_state_gib=gib(state),
             est_activations_gib=gib(acts), est_total_gib=gib(state + acts),
             xla_args_gib=gib(ma.argument_size_in_bytes), xla_out_gib=gib(ma.output_size_in_bytes),
             xla_alias_gib=gib(ma.alias_size_in_bytes), xla_temp_gib=gib(ma.temp_size_in_bytes),
             xla_total_gib=gib(ma.argument_size_in_bytes + ma.output_size_in_bytes
                               - ma.alias_size_in_bytes + ma.temp_size_in_bytes))
  # The estimate's grads + activations against XLA's temporaries (which hold both).
  row["temp_vs_est"] = row["xla_temp_gib"] / max(gib(est["grads"]) + row["est_activations_gib"],
                                                 1e-12)
  row["peak_gib"] = None
  if run_steps > 0 and (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use"):
    call, env = train_step_runner(config, devices=devices, seed=seed)
    with sharding.mesh_rules(env.mesh, env.rules):
      for i in range(run_steps):
        jax.block_until_ready(call(i))
    row["peak_gib"] = gib(jax.devices()[0].memory_stats()["peak_bytes_in_use"])
  return row


# ----------------------------------------------------------------------------------------------
# routing.


def bench_routing_losses(shape, tokens, num_layers, *, warmup=3, iters=20, input_sets=2, seed=0):
  """Route + dispatch plan, LBL and SimBal over `num_layers` MoE layers (one step's worth).

  Returns:
    list of rows {part, ms, ...}: router (logits, softmax, top-k; fwd + bwd), dispatch_plan
    (fwd; integer), lbl (fwd + bwd w.r.t. probs), simbal (fwd + bwd w.r.t. the kernels).
  """
  from simbal_jax import dispatch  # pylint: disable=g-import-not-at-top
  from simbal_jax import losses  # pylint: disable=g-import-not-at-top
  from simbal_jax import routing  # pylint: disable=g-import-not-at-top
  name, (k, e, d, _) = parse_shape(shape)
  cap = dispatch.capacity(tokens, e, k, 1.25)
  keys = jax.random.split(jax.random.key(seed), 2 * input_sets)
  kerns = [jax.random.normal(keys[2 * i], (num_layers, d, e), jnp.float32) / math.sqrt(d)
           for i in range(input_sets)]
  xs = [jax.random.normal(keys[2 * i + 1], (num_layers, tokens, d), jnp.float32)
        for i in range(input_sets)]

  def route_all(r_LxDxE, x_LxTxD):  # float32 router at HIGHEST precision, as moe.MoEBlock
    logits = jnp.einsum("ltd,lde->lte", x_LxTxD, r_LxDxE, precision=jax.lax.Precision.HIGHEST)
    return jax.vmap(lambda lg: routing.route(lg, k))(logits)

  def router(r, x):
    out = route_all(r, x)
    return jnp.sum(out.gates), out

  router_fb = jax.jit(jax.grad(router, argnums=(0, 1), has_aux=True))
  route = jax.jit(route_all)
  outs = [route(r, x) for r, x in zip(kerns, xs)]
  plan = jax.jit(jax.vmap(lambda idx: dispatch.dispatch_plan(idx, e, cap)))
  lbl_fb = jax.jit(jax.value_and_grad(lambda p, i: jnp.mean(jax.vmap(losses.load_balancing)(p, i))))
  sim_fb = jax.jit(jax.value_and_grad(lambda r: jnp.mean(losses.simbal(r))))
  parts = {
      "router_fwd_bwd": lambda j: router_fb(kerns[j % input_sets], xs[j % input_sets]),
      "dispatch_plan": lambda j: plan(outs[j % input_sets].expert_index),
      "lbl_fwd_bwd": lambda j: lbl_fb(outs[j % input_sets].probs,
                                      outs[j % input_sets].expert_index),
      "simbal_fwd_bwd": lambda j: sim_fb(kerns[j % input_sets]),
  }
  rows = []
  for part, tm in timed(parts, warmup=warmup, iters=iters).items():
    rows.append(dict(part=part, shape=name, top_k=k, experts=e, d_model=d, tokens=tokens,
                     moe_layers=num_layers, ms=tm["median_ms"], p10_ms=tm["p10_ms"],
                     p90_ms=tm["p90_ms"], iters=iters))
  return rows


def bench_routing(config, methods, shape, tokens, num_layers, *, warmup=3, iters=20,
                  input_sets=2, devices=None, seed=0, peak_tflops=None):
  """Loss-part timings plus the train step of `config` under each balance.method."""
  parts = bench_routing_losses(shape, tokens, num_layers, warmup=warmup, iters=iters,
                               input_sets=input_sets, seed=seed)
  configs = []
  from simbal_jax.configs import base  # pylint: disable=g-import-not-at-top
  for method in methods:
    cfg = copy.deepcopy(config)
    base.set_method(cfg, method)
    cfg.bench_method = method  # the name the rows report
    configs.append(cfg)
  steps = bench_train_steps(configs, warmup=warmup, iters=iters, input_sets=input_sets,
                            devices=devices, seed=seed, peak_tflops=peak_tflops)
  base = next((s for s in steps if s["method"] == "none"), None)
  for s in steps:  # paired: the median over iterations of (step / the none step run beside it)
    s["overhead_vs_none"] = None if base is None else float(
        np.median(np.asarray(s["times_ms"]) / np.asarray(base["times_ms"])) - 1.0)
  return dict(losses=parts, train_steps=steps)


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
    from simbal_jax import paths  # pylint: disable=g-import-not-at-top
    out = paths.resolve(_OUT.value)  # local or gs://
    out.parent.mkdir(parents=True, exist_ok=True)
    paths.write_text(out, json.dumps(report, indent=1, default=str))
    print(f"wrote {_OUT.value}")


if __name__ == "__main__":
  app.run(main)
