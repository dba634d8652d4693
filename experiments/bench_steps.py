"""Whole-step benchmarks of experiments/benchmark.py: the jitted train step (`train_step`), its
memory against the estimate (`memory`), and the balancing losses' share of a step (`routing`).
"""

import copy
import math

import jax
import jax.numpy as jnp
import numpy as np

from simbal_jax.experiments.bench_lib import build_env, parse_shape, timed


# ----------------------------------------------------------------------------------------------
# train_step.


def train_step_runner(config, *, input_sets=2, devices=None, seed=0):
  """(call(i) running one train step on rotating random-token batches, env). Call it inside
  `sharding.mesh_rules(env.mesh, env.rules)`."""
  from simbal_jax import step as step_lib  # pylint: disable=g-import-not-at-top
  from simbal_jax import env as env_lib  # pylint: disable=g-import-not-at-top
  from simbal_jax import sharding  # pylint: disable=g-import-not-at-top
  env = build_env(config, devices)
  cfg, t = env.cfg, env.cfg.train
  b, l = int(t.global_batch_size), int(t.seq_len)
  rng = np.random.default_rng(seed)
  batches = []
  for _ in range(input_sets):
    toks = rng.integers(0, cfg.model.vocab_size, size=(b, l + 1), dtype=np.int32)
    batches.append(sharding.to_global({"inputs": toks[:, :-1], "targets": toks[:, 1:]},
                                   env.batch_sharding))
  state = jax.jit(lambda k: step_lib.unbox(env.init(k)),
                  out_shardings=env.shardings)(jax.random.key(seed))
  train_step = env_lib.make_train_step(env)
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
  from simbal_jax import env as env_lib  # pylint: disable=g-import-not-at-top
  env = build_env(config, devices)
  t = env.cfg.train
  b, l = int(t.global_batch_size), int(t.seq_len)
  est = memory.memory_estimate(env.mcfg, dict(env.mesh.shape), global_batch_size=b, seq_len=l,
                               grad_accum=int(t.grad_accum))
  batch = {k: jax.ShapeDtypeStruct((b, l), jnp.int32, sharding=env.batch_sharding)
           for k in ("inputs", "targets")}
  with sharding.mesh_rules(env.mesh, env.rules):
    ma = env_lib.make_train_step(env).lower(env.abstract, batch).compile().memory_analysis()
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
