"""Ahead-of-time compile of the train and eval steps for a TPU topology, on any host (no TPU).

  pip install -e .[aot]        # brings libtpu (jax[tpu]); or: make aot-install
  python -m simbal_jax.experiments.aot --config=configs/moe_m.py:simbal --topology=v5e:4x4 \
      --config.mesh.data=1 --config.mesh.fsdp=-1 [--config.x=y ...] [--out=row.json]

`jax.experimental.topologies.get_topology_desc(topology, platform="tpu")` gives the abstract chips
of a TPU slice; the steps are lowered on `ShapeDtypeStruct`s sharded over them and compiled by
the real TPU compiler (libtpu), which reports memory per chip (`memory_analysis`), its cost model
(`cost_analysis`: FLOPs and bytes per chip; a Pallas kernel counts its own cost estimate) and the
compiled HLO (collectives, custom-call kernels). Nothing runs.

The last stdout line is one JSON object (`report` below). A compile that runs out of memory
prints the same object with `fits: false` and the compiler's own figure (`compiler_error`),
not a traceback.
"""

import json
import math
import os
import re
import sys
import time

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
from ml_collections import config_flags

from simbal_jax import env as env_lib
from simbal_jax import configs as config_files
from simbal_jax import memory
from simbal_jax import model as model_lib
from simbal_jax import sharding
from simbal_jax import step as step_lib
from simbal_jax.experiments import bench_lib


def _define_flags():
  """The command line's flags, defined when run as a program only: importing this module (the
  tests, or beside experiments/benchmark.py) defines none."""
  return dict(
      topology=flags.DEFINE_string("topology", "v5e:2x2", "TPU topology, e.g. v5e:2x4, "
                                   "v5p:2x2x2, v6e:8x8, v4:2x2x2 (generation:chips per axis)."),
      eval=flags.DEFINE_bool("eval", True, "Also compile the eval step."),
      out=flags.DEFINE_string("out", "", "Also write the JSON object to this file."),
      config=config_flags.DEFINE_config_file("config", None,
                                             "Experiment config (as simbal-train)."))


GIB = 2.0 ** 30
# Per chip, from the vendor's datasheets: peak dense bf16 FLOP/s, HBM (GiB), HBM bandwidth
# (bytes/s), inter-chip interconnect bandwidth (bytes/s, the quoted per-chip figure).
TPU_CHIPS = {
    "v4": dict(peak_flops=275e12, hbm_gib=32.0, hbm_bw=1228e9, ici_bw=300e9),
    "v5e": dict(peak_flops=197e12, hbm_gib=16.0, hbm_bw=819e9, ici_bw=400e9),
    "v5p": dict(peak_flops=459e12, hbm_gib=95.0, hbm_bw=2765e9, ici_bw=600e9),
    "v6e": dict(peak_flops=918e12, hbm_gib=32.0, hbm_bw=1638e9, ici_bw=800e9),
}
COLLECTIVES = ("all-gather", "all-to-all", "reduce-scatter", "all-reduce", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1,
                "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4,
                "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16}


def chip_specs(topology):
  """(generation, TPU_CHIPS entry) of a topology string such as "v5e:2x4"."""
  gen = topology.split(":", 1)[0].lower().replace("litepod", "e")
  if gen not in TPU_CHIPS:
    raise ValueError(f"--topology={topology!r}: generation {gen!r} unknown; valid: "
                     f"{', '.join(TPU_CHIPS)} (e.g. v5e:2x4)")
  return gen, TPU_CHIPS[gen]


# ----------------------------------------------------------------------------------------------
# Compiled HLO: collectives (with while-loop trip counts) and custom-call kernels.

_COMP = re.compile(r"^(?P<entry>ENTRY\s+)?%?(?P<name>[\w.\-]+)\s*\(.*\{\s*$")
_CALLS = re.compile(r"\b(body|calls|to_apply|branch_computations|true_computation|"
                    r"false_computation)=\{?(%?[\w.\-]+(?:,\s*%?[\w.\-]+)*)")
# TPU bookkeeping targets of asynchronous collectives: not kernels.
_NOT_KERNELS = ("AsyncCollectiveStart", "AsyncCollectiveDone")


def _shape_bytes(shape):
  """Bytes of the largest array in an HLO shape string (a tuple's largest element: the output
  buffer of an async collective's start op)."""
  sizes = [math.prod(int(d) for d in dims.split(",") if d) * _DTYPE_BYTES.get(dt, 4)
           for dt, dims in re.findall(r"\b([a-z]\w*)\[([\d,]*)\]", shape)]
  return max(sizes, default=0)


def _instruction(line):
  """(name, shape, opcode, rest) of an HLO instruction line, or None."""
  body = line.strip()
  if body.startswith("ROOT "):
    body = body[5:]
  name, sep, rhs = body.partition(" = ")
  if not sep or " " in name:
    return None
  if rhs.startswith("("):  # tuple shape: up to its matching parenthesis
    depth = 0
    for i, ch in enumerate(rhs):
      depth += (ch == "(") - (ch == ")")
      if depth == 0:
        break
    shape, rhs = rhs[:i + 1], rhs[i + 1:].lstrip()
  else:
    shape, _, rhs = rhs.partition(" ")
  op, paren, rest = rhs.partition("(")
  return (name.lstrip("%"), shape, op, rest) if paren else None


def hlo_collectives(hlo_text):
  """Bytes moved per collective kind by one run of the compiled module, and the kernels.

  Each collective counts the bytes of its result (an all-gather's gathered array, an
  all-reduce's reduced one) times the trip count of every while loop around it: XLA's
  `known_trip_count`, else N where the loop's condition is `i < N` with a constant N (a scan
  or fori loop counting from 0, as JAX emits them); else 1, counted in `unknown_trip_counts`.
  One collective split
  by the compiler into start / done fusions (the same `async_collective_name`, or the same kind
  and channel in two computations) counts once; both branches of a conditional count.

  Returns:
    dict(collectives={kind: bytes}, kernels=sorted custom-call targets,
    unknown_trip_counts=int).
  """
  comps, entry, current = {}, None, None
  for line in hlo_text.splitlines():
    m = _COMP.match(line)
    if m:
      current = m["name"]
      comps[current] = {"own": {}, "calls": [], "kernels": set(), "consts": {},
                        "lt_bound": None}
      entry = current if m["entry"] else entry
      continue
    parsed = _instruction(line) if current is not None else None
    if parsed is None:
      continue
    name, shape, op, rest = parsed
    comp = comps[current]
    kind = op[:-len("-start")] if op.endswith("-start") else op
    if kind in COLLECTIVES:
      # XLA names each asynchronous collective. Without a name, the start / done fusions of one
      # share kind and channel, in different computations; the TPU compiler also reuses one
      # channel for distinct collectives, so within a computation each counts (its ordinal).
      async_name = re.search(r'async_collective_name="([^"]+)"', rest)
      channel = re.search(r"\bchannel_id=(\d+)", rest)
      if async_name:
        key = ("async", async_name.group(1))
      elif channel:
        ordinal = sum(k[:3] == ("channel", kind, channel.group(1)) for k in comp["own"])
        key = ("channel", kind, channel.group(1), ordinal)
      else:
        key = ("op", current, name)
      comp["own"][key] = (kind, _shape_bytes(shape), 1)
    if op == "custom-call":
      target = re.search(r'custom_call_target="([^"]+)"', rest)
      if target and target.group(1) not in _NOT_KERNELS:
        comp["kernels"].add(target.group(1))
    if op == "constant" and shape.startswith("s32[]"):
      value = re.match(r"\s*(-?\d+)\)", rest)
      if value:
        comp["consts"][name] = int(value.group(1))
    if op == "compare" and "direction=LT" in rest and line.lstrip().startswith("ROOT"):
      operands = re.findall(r"%([\w.\-]+)", rest.split(")")[0])
      comp["lt_bound"] = comp["consts"].get(operands[-1]) if len(operands) == 2 else None
    trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', rest)
    cond = re.search(r"\bcondition=%?([\w.\-]+)", rest)
    for attr, callees in _CALLS.findall(rest):
      for callee in re.split(r",\s*", callees):
        looped = attr == "body"
        times = int(trips.group(1)) if looped and trips else (None if looped else 1)
        comp["calls"].append((callee.lstrip("%"), times, cond.group(1) if cond else None))
  unknown = [0]

  def total(name, seen=()):
    """{key: (kind, bytes, count)} and kernels of one computation and all it calls."""
    comp = comps.get(name)
    if comp is None or name in seen:
      return {}, set()
    out, kernels = dict(comp["own"]), set(comp["kernels"])
    for callee, times, cond in comp["calls"]:
      if times is None:  # a loop without known_trip_count: `i < N` in its condition, from 0
        times = comps.get(cond, {}).get("lt_bound")
        unknown[0] += times is None
        times = times or 1
      sub, sub_kernels = total(callee, seen + (name,))
      kernels |= sub_kernels
      for key, (kind, nbytes, count) in sub.items():
        count *= times
        if key in out:  # the same collective reached twice (start / done): once
          count = max(count, out[key][2])
        out[key] = (kind, nbytes, count)
    return out, kernels

  found, kernels = total(entry) if entry else ({}, set())
  totals = {k: 0 for k in COLLECTIVES}
  for kind, nbytes, count in found.values():
    totals[kind] += nbytes * count
  return dict(collectives=totals, kernels=sorted(kernels), unknown_trip_counts=unknown[0])


# ----------------------------------------------------------------------------------------------
# Compiling.


def _oom_figure(message):
  """(needed GiB, limit GiB) from a TPU compiler out-of-memory message, or (None, None).

  Two forms: "Used 27.30G of 15.75G hbm" and "the total memory required for HLO temporaries
  (17.42G) exceeds available HBM (15.75G)" (then the figure is the temporaries alone)."""
  m = (re.search(r"Used ([\d.]+)([KMGT])? of ([\d.]+)([KMGT])? hbm", message) or
       re.search(r"required for [^(]*\(([\d.]+)([KMGT])?\) exceeds available HBM "
                 r"\(([\d.]+)([KMGT])?\)", message))
  if not m:
    return None, None
  scale = {"K": 2 ** -20, "M": 2 ** -10, "G": 1.0, "T": 2 ** 10, None: 2 ** -30}
  return float(m[1]) * scale[m[2]], float(m[3]) * scale[m[4]]


def _compile(fn, *args):
  """(compiled, None) or (None, the compiler's error text) for a resource-exhausted compile."""
  try:
    return fn.lower(*args).compile(), None
  except Exception as e:  # pylint: disable=broad-except  (XlaRuntimeError and kin)
    text = str(e)
    if "RESOURCE_EXHAUSTED" in text or "Ran out of memory" in text or "hbm" in text.lower():
      return None, text
    raise


def _memory(compiled):
  ma = compiled.memory_analysis()
  args, out = ma.argument_size_in_bytes, ma.output_size_in_bytes
  alias, temp = ma.alias_size_in_bytes, ma.temp_size_in_bytes
  return dict(args_gib=args / GIB, temp_gib=temp / GIB, out_gib=out / GIB,
              alias_gib=alias / GIB, total_gib=(args + out - alias + temp) / GIB)


def _cost(compiled):
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))


def abstract_batch(env, keys=("inputs", "targets"), micro=False):
  """ShapeDtypeStructs of one global batch (`micro`: one micro-batch, the eval step's),
  sharded over the batch axes."""
  t = env.cfg.train
  b, l = int(t.global_batch_size), int(t.seq_len)
  b = b // int(t.grad_accum) if micro else b
  if env.cfg.data.document_mask:
    keys = keys + ("segment_ids",)
  return {k: jax.ShapeDtypeStruct((b, l), jnp.int32, sharding=env.batch_sharding) for k in keys}


def report(config, topology, *, with_eval=True):
  """Compiles the train (and eval) step of `config` for `topology`; returns the JSON object.

  Fields: topology, chips, mesh, dispatch (and the grouped-matmul implementation), remat,
  grad_accum, tokens_per_step, hbm_gib_per_chip (datasheet), args / temp / out / alias /
  total_gib (train step, per chip), fits, xla_flops_per_chip (the compiler's cost model),
  model_flops_per_chip (`model.flops_per_token` x tokens / chips), flops_ratio, hbm_bytes
  (both from the cost model, which counts a loop body once: scaled by grad_accum, see
  cost_scaled_by)
  (cost model), collectives (bytes per kind per step per chip), kernels (custom calls), roofline
  (step seconds = max of compute, HBM and ICI time; tokens/s and MFU at that bound),
  estimate_gib (`memory.memory_estimate`, and its ratio to the compiler's total), eval (the eval
  step's memory, on one micro-batch as `evaluate.EvalBatches` feeds it), compile_s; on a compile
  out of memory: fits false and compiler_error /
  compiler_used_gib / compiler_limit_gib.
  """
  gen, chip = chip_specs(topology)
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  devices = topologies.get_topology_desc(topology, platform="tpu").devices
  env = bench_lib.build_env(config, devices=devices)
  t = env.cfg.train
  chips = len(devices)
  tokens = int(t.global_batch_size) * int(t.seq_len)
  moe = env.mcfg.moe
  row = dict(topology=topology, generation=gen, chips=chips, mesh=dict(env.mesh.shape),
             dispatch=(f"{moe.dispatch}:{moe.ragged_impl}" if moe and moe.dispatch == "ragged"
                       else (moe.dispatch if moe else "dense")),
             remat=bool(env.mcfg.remat), grad_accum=int(t.grad_accum), tokens_per_step=tokens,
             hbm_gib_per_chip=chip["hbm_gib"])
  est = memory.memory_estimate(env.mcfg, dict(env.mesh.shape),
                               global_batch_size=int(t.global_batch_size),
                               seq_len=int(t.seq_len), grad_accum=int(t.grad_accum))
  est_total = est["total_remat"] if env.mcfg.remat else est["total"]
  row["estimate_gib"] = est_total / GIB
  start = time.time()
  with sharding.mesh_rules(env.mesh, env.rules):
    compiled, error = _compile(env_lib.make_train_step(env), env.abstract, abstract_batch(env))
    row["compile_s"] = time.time() - start
    if compiled is None:
      used, limit = _oom_figure(error)
      row.update(fits=False, compiler_error=error.strip().splitlines()[0][:500],
                 compiler_used_gib=used, compiler_limit_gib=limit)
      return row
    row.update(_memory(compiled))
    row["fits"] = row["total_gib"] <= chip["hbm_gib"]
    row["estimate_vs_compiler"] = row["estimate_gib"] / max(row["total_gib"], 1e-12)
    # XLA's cost model counts a while loop's body once: with gradient accumulation (a scan of
    # grad_accum micro-batches) its FLOPs and bytes are one micro-batch's plus the update's.
    # Scaled by grad_accum (the update, elementwise, is then counted grad_accum times: it is
    # a few FLOPs per parameter against 6 per parameter and token).
    flops, hbm_bytes = (x * int(t.grad_accum) for x in _cost(compiled))
    model_flops = model_lib.flops_per_token(env.mcfg, int(t.seq_len)) * tokens / chips
    row.update(xla_flops_per_chip=flops, model_flops_per_chip=model_flops,
               flops_ratio=flops / model_flops, hbm_bytes_per_chip=hbm_bytes,
               cost_scaled_by=int(t.grad_accum))
    row.update(hlo_collectives(compiled.as_text()))
    comm = sum(row["collectives"].values())
    times = dict(compute_s=flops / chip["peak_flops"], hbm_s=hbm_bytes / chip["hbm_bw"],
                 ici_s=comm / chip["ici_bw"])
    step_s = max(times.values())
    row["roofline"] = dict(times, step_s=step_s, bound=max(times, key=times.get)[:-2],
                           tokens_per_s=tokens / step_s,
                           mfu=model_flops / (step_s * chip["peak_flops"]))
    if with_eval:
      eval_fn = jax.jit(lambda p, b, x: step_lib.eval_step(p, b, x, model=env.model),
                        in_shardings=(env.shardings.params, env.shardings.expert_bias,
                                      env.batch_sharding),
                        out_shardings=sharding.replicated(env.mesh))
      compiled_eval, error = _compile(eval_fn, env.abstract.params, env.abstract.expert_bias,
                                      abstract_batch(env, micro=True))
      row["eval"] = (_memory(compiled_eval) if compiled_eval is not None else
                     dict(fits=False, compiler_error=error.strip().splitlines()[0][:500]))
  return row


def main(argv, fl):
  del argv
  # Nothing runs on a TPU here: let several compiles share the host (libtpu's lockfile
  # otherwise refuses a second process).
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  if fl["config"].value is None:
    raise app.UsageError(f"--config is required (e.g. {config_files.DIR}/moe_m.py:simbal)")
  try:
    import libtpu  # pylint: disable=g-import-not-at-top,unused-import  # noqa: F401
  except ImportError:
    sys.exit("the TPU compiler is missing: pip install -e .[aot] (jax[tpu], libtpu)")
  logging.info("compiling for %s (this takes minutes for MoE-M on a small CPU host)",
               fl["topology"].value)
  row = report(fl["config"].value, fl["topology"].value, with_eval=fl["eval"].value)
  line = json.dumps(row, sort_keys=True, default=float)
  if fl["out"].value:
    with open(fl["out"].value, "w") as f:
      f.write(line + "\n")
  print(line)


if __name__ == "__main__":
  _flags = _define_flags()
  app.run(lambda argv: main(argv, _flags))
