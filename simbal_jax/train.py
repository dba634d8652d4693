"""The orchestrator: config -> data, model, mesh, state -> jitted loop with eval and checkpoints.

`train_and_evaluate(config, workdir)` is the one entry point (main.py, tests, Colab). Order of
work: validate the config and build the data (all config/data errors raise here, before anything
compiles), build the mesh and the abstract state (eval_shape -> shardings), restore or
initialise (workdir > ckpt.resume_from > ckpt.init_from > scratch), then loop.
"""

import copy
import functools
import math
import os
import time
import types

from absl import logging
import jax
import ml_collections
import numpy as np

from simbal_jax import analysis
from simbal_jax import checkpoint
from simbal_jax import data as data_lib
from simbal_jax import model as model_lib
from simbal_jax import optim
from simbal_jax import rundir
from simbal_jax import sharding
from simbal_jax import step as step_lib
from simbal_jax import writers


class NonFiniteLossError(FloatingPointError):
  """Raised when the training loss is NaN or Inf; `.step` is the offending step."""

  def __init__(self, step, value, resumed_from=None):
    msg = (f"non-finite training loss {value} at step {step}; stopping (no checkpoint is written "
           "for this step; earlier ones are kept)")
    if resumed_from:  # the run loaded a checkpoint: name it, without vouching for it
      msg += (f". This run started from {resumed_from}; if the loss diverged soon after, that "
              "checkpoint's state may be the cause")
    super().__init__(msg)
    self.step, self.value = step, value


def prepare_config(config):
  """Validated, unlocked copy with derived fields (num_steps from token_budget)."""
  cfg = ml_collections.ConfigDict(copy.deepcopy(config.to_dict()))
  rundir.check_finite(cfg)
  t = cfg.train
  if t.num_steps <= 0:
    if t.token_budget <= 0:
      raise ValueError("set train.num_steps > 0 or train.token_budget > 0")
    t.num_steps = int(math.ceil(t.token_budget / (t.global_batch_size * t.seq_len)))
  for name in ("seq_len", "global_batch_size", "grad_accum"):
    if int(t[name]) < 1:
      raise ValueError(f"train.{name} must be >= 1, got {t[name]}")
  if t.global_batch_size % t.grad_accum:
    raise ValueError(f"train.global_batch_size={t.global_batch_size} not divisible by "
                     f"train.grad_accum={t.grad_accum}")
  step_lib.StepConfig.from_config(cfg)  # validates balance.* (lists valid methods)
  if cfg.moe.num_experts <= 0 and cfg.balance.method != "none":
    raise ValueError(f"balance.method={cfg.balance.method!r} needs an MoE model "
                     "(moe.num_experts > 0); use balance.method='none' for a dense model")
  return cfg


def build(config, workdir, devices=None):
  """Builds everything the loop needs; raises config / data / mesh errors before compiling.

  Returns:
    types.SimpleNamespace `env`: `build_model`'s fields plus `datasets`.
  """
  cfg = prepare_config(config)
  t = cfg.train
  devices = list(jax.devices() if devices is None else devices)
  resolve_num_groups(cfg, len(devices))
  # Mesh and shape errors first, before any data is prepared (the vocabulary is not known yet).
  probe = model_lib.ModelConfig.from_config(cfg, vocab_size=max(cfg.model.vocab_size, 1))
  sharding.validate(cfg.mesh, probe, int(t.global_batch_size), len(devices),
                    seq_len=int(t.seq_len))
  datasets = data_lib.make_datasets(
      cfg.data, seq_len=int(t.seq_len), batch_size=int(t.global_batch_size), workdir=workdir,
      seed=int(cfg.seed), process_index=jax.process_index(), process_count=jax.process_count())
  vocab = int(cfg.model.vocab_size) or int(datasets.vocab_size)
  if vocab < datasets.vocab_size:
    raise ValueError(f"model.vocab_size={vocab} is smaller than the tokenizer's "
                     f"{datasets.vocab_size}")
  cfg.model.vocab_size = vocab
  env = build_model(cfg, devices)
  env.datasets = datasets
  return env


def resolve_num_groups(cfg, num_devices):
  """Resolves `moe.num_groups = 0` (auto) in place: one routing group per batch shard.

  With the batch split over mesh data x expert, one group per shard keeps each token's dispatch
  on its own device and bounds a dropless buffer by the shard's tokens. `dispatch="ragged"`
  needs a single group, so auto gives 1 there.
  """
  if int(cfg.moe.num_experts) > 0 and int(cfg.moe.num_groups) == 0:
    data, expert, _ = sharding.mesh_shape(cfg.mesh, num_devices)
    cfg.moe.num_groups = 1 if cfg.moe.dispatch == "ragged" else data * expert


def build_model(cfg, devices=None):
  """Model, optimizer, mesh and state shardings of a prepared config (no data).

  Args:
    cfg: ConfigDict from `prepare_config`, with `model.vocab_size` > 0.
    devices: devices for the mesh (default: all).
  Returns:
    types.SimpleNamespace with cfg, sc, model, mcfg, tx, schedule, mesh, rules, init,
    abstract (unboxed abstract TrainState with shardings), shardings, batch_sharding.
  """
  if int(cfg.model.vocab_size) < 1:
    raise ValueError("build_model needs cfg.model.vocab_size > 0")
  t = cfg.train
  devices = list(jax.devices() if devices is None else devices)
  resolve_num_groups(cfg, len(devices))
  mcfg = model_lib.ModelConfig.from_config(cfg)
  sharding.validate(cfg.mesh, mcfg, int(t.global_batch_size), len(devices),
                    seq_len=int(t.seq_len))
  mesh = sharding.make_mesh(cfg.mesh, devices)
  model = model_lib.Transformer(mcfg)
  tx, schedule = optim.make_optimizer(cfg.opt, int(t.num_steps))
  rules = sharding.LOGICAL_RULES
  init = functools.partial(step_lib.init_state, model=model, tx=tx)
  boxed = jax.eval_shape(init, jax.random.key(0))
  shardings = sharding.state_shardings(boxed, mesh, rules)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          step_lib.unbox(boxed), shardings)
  batch_sharding = jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec(("data", "expert")))
  return types.SimpleNamespace(
      cfg=cfg, sc=step_lib.StepConfig.from_config(cfg), model=model, mcfg=mcfg, tx=tx,
      schedule=schedule, mesh=mesh, rules=rules, init=init, abstract=abstract,
      shardings=shardings, batch_sharding=batch_sharding)


TRAIN_KEYS = ("inputs", "targets", "mask")
EVAL_KEYS = TRAIN_KEYS + ("domain",)  # domain int32[b] (synthetic source): specialisation


def to_global(batch, batch_sharding, keys=TRAIN_KEYS):
  """Host-local numpy batch -> global jax arrays (those named in `keys`) sharded over the
  batch axis."""
  return {k: jax.make_array_from_process_local_data(batch_sharding, np.asarray(v))
          for k, v in batch.items() if k in keys}


def initial_state(env, ckpt):
  """Resume order: workdir checkpoint > ckpt.resume_from > ckpt.init_from > scratch.

  Returns:
    (TrainState, data iterator state dict or None, source str).
  """
  c = env.cfg.ckpt
  if ckpt is not None:
    got = ckpt.restore(env.abstract, config=env.cfg.to_dict(), allow=c.allow_config_change,
                       start_over=c.start_over)
    if got is not None:
      return got[1], got[2], f"checkpoint step {got[0]} in {ckpt.directory}"
  if c.resume_from:
    other = checkpoint.Checkpointer(c.resume_from, every=0, async_save=False)
    try:
      got = other.restore(env.abstract, config=env.cfg.to_dict(), allow=c.allow_config_change)
    finally:
      other.close()
    if got is None:
      raise FileNotFoundError(f"ckpt.resume_from={c.resume_from}: no readable checkpoint")
    return got[1], got[2], f"resume_from {c.resume_from} step {got[0]}"
  key = jax.random.key(int(env.cfg.seed))
  state = jax.jit(lambda k: step_lib.unbox(env.init(k)), out_shardings=env.shardings)(key)
  if c.init_from:
    params = checkpoint.restore_params_only(c.init_from, env.abstract.params)
    state = state.replace(params=params)
    return state, None, f"init_from {c.init_from}"
  return state, None, "scratch"


def make_train_step(env):
  """The jitted train step (state donated): (state, batch) -> (state, metrics)."""
  return jax.jit(
      functools.partial(step_lib.train_step, model=env.model, tx=env.tx, sc=env.sc,
                        schedule=env.schedule),
      in_shardings=(env.shardings, env.batch_sharding), out_shardings=(env.shardings, None),
      donate_argnums=(0,))


def make_steps(env):
  """Jitted train step (state donated) and eval step."""
  num_domains = int(env.cfg.data.synthetic.num_domains) if env.datasets.has_domain else 0
  evaluate = jax.jit(
      functools.partial(step_lib.eval_step, model=env.model, num_domains=num_domains),
      in_shardings=(env.shardings.params, env.shardings.expert_bias, env.batch_sharding))
  return make_train_step(env), evaluate


def eval_batches_of(env, host_batches=None):
  """The global eval batches (with domain labels when the source has them).

  `host_batches`: the host-local numpy batches when already loaded (default: load them).
  """
  if host_batches is None:
    host_batches = env.datasets.eval_batches(int(env.cfg.train.eval_batches))
  return [to_global(b, env.batch_sharding, EVAL_KEYS) for b in host_batches]


def evaluate(env, eval_step, state, eval_batches):
  """Eval metrics of `state` (analysis.eval_metrics) and the per-batch sums behind them."""
  sums = [jax.device_get(eval_step(state.params, state.expert_bias, b)) for b in eval_batches]
  kernels = None
  if env.mcfg.moe is not None:
    kernels = np.asarray(jax.device_get(model_lib.router_kernels(state.params, env.mcfg)))
  layer_ids = [i for i in range(env.mcfg.num_layers) if env.mcfg.is_moe_layer(i)]
  return analysis.eval_metrics(sums, kernels, layer_ids), sums


def _host(metrics):
  return {k: float(v) for k, v in jax.device_get(metrics).items()}


def train_and_evaluate(config, workdir, *, hooks=(), devices=None):
  """Trains and evaluates; returns a summary dict (final eval metrics, timings, status).

  Timings: `wall_seconds` is the whole call; `first_step_seconds` the first step of this run
  (compilation); `train_seconds` the loop after the first step less `eval_ckpt_seconds` (the
  evals and checkpoint saves inside the loop), so `tokens_per_second` is the training
  throughput of the compiled step (a one-step run can only time its compiling step).

  Args:
    config: ConfigDict (see configs/base.py).
    workdir: str, run directory (checkpoints/, metrics.jsonl, tb/, data cache).
    hooks: callables hook(step, state) run on the host after each dispatched step (testing,
      profiling); they must not block on the state unless they mean to.
    devices: devices for the mesh (default: all).
  Raises:
    ValueError: bad config / data / mesh (before training starts).
    NonFiniteLossError: NaN or Inf training loss (names the step).
  """
  workdir = os.path.abspath(workdir)
  rundir.WorkdirLock.check(workdir, enabled=jax.process_index() == 0)  # in use: fail now
  t0 = time.time()
  env = build(config, workdir, devices)
  cfg, t = env.cfg, env.cfg.train
  is_main = jax.process_index() == 0
  logging.info("devices: %d (%d processes), mesh %s", jax.device_count(), jax.process_count(),
               dict(env.mesh.shape))
  ckpt = None
  if cfg.ckpt.enabled:
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), every=cfg.ckpt.every,
                                   max_to_keep=cfg.ckpt.max_to_keep,
                                   async_save=cfg.ckpt.async_save)
  writer = writers.MetricWriter(workdir, tensorboard=cfg.log.tensorboard, enabled=is_main)
  tokens_per_step = int(t.global_batch_size) * int(t.seq_len)
  summary = {"status": "running"}
  lock = None
  try:
    lock = rundir.WorkdirLock(workdir, enabled=is_main)  # held until the run ends
    with sharding.mesh_rules(env.mesh, env.rules):
      state, data_state, source = initial_state(env, ckpt)
      start = int(jax.device_get(state.step))
      logging.info("starting at step %d from %s", start, source)
      writer.drop_after(start)  # records of steps after the checkpoint (crash) are redone
      it = env.datasets.train_iter()
      if data_state:
        it.set_state(data_state)
      train_step, eval_step = make_steps(env)
      host_eval = env.datasets.eval_batches(int(t.eval_batches))
      eval_batches = eval_batches_of(env, host_eval)

      def run_eval(st, step):
        m, sums = evaluate(env, eval_step, st, eval_batches)
        writer.write(step, m)
        summary["expert_load"] = analysis.eval_load(sums)
        summary["domain_expert_counts"] = analysis.eval_domain_counts(sums)
        return m

      def save(st, step, force=False):
        if ckpt is None:
          return False
        return ckpt.save(step, st, it.get_state(), config=cfg.to_dict(), force=force)

      progress = writers.Progress(start, int(t.num_steps), tokens_per_step,
                                  enabled=cfg.log.progress and is_main)
      pending = None  # (step, metrics on device) of the previous step
      last_eval, step = {}, start
      t_loop = t_first = time.time()  # t_first: end of the first (compiling) step
      paused = 0.0  # seconds of evals and checkpoint saves inside the loop
      with checkpoint.PreemptionHandler() as preempt:
        while step < int(t.num_steps):
          batch = to_global(next(it), env.batch_sharding)
          state, metrics = train_step(state, batch)
          step += 1
          preempt.stop_now(step)  # several processes: all agree on the step they stop at
          if step == start + 1:
            jax.block_until_ready(metrics)
            t_first = time.time()
          for hook in hooks:
            hook(step, state)
          if pending is not None:  # fetch step t-1 after dispatching step t
            _check_and_log(pending, writer, progress, cfg)
          pending = (step, metrics)
          due_save = ckpt is not None and ckpt.should_save(step)
          due_eval = t.eval_every > 0 and step % int(t.eval_every) == 0
          if due_save or due_eval or preempt.requested or step == int(t.num_steps):
            _check_and_log(pending, writer, progress, cfg)  # never save a NaN state
            pending = None
          t_pause = time.time()
          if due_eval and step < int(t.num_steps):
            last_eval = run_eval(state, step)
            logging.info("eval step %d: %s", step, _brief(last_eval))
          if due_save:
            save(state, step)
          if preempt.requested:
            save(state, step, force=True)
          paused += time.time() - t_pause
          if preempt.requested:
            summary["status"] = "preempted"
            logging.warning("preempted at step %d: checkpoint saved, exiting", step)
            break
      progress.close()
      timed_steps = step - start - 1  # steps after the compiling one
      train_seconds = time.time() - t_first - paused
      if timed_steps < 1:  # a one-step run: only the compiling step to measure
        timed_steps, train_seconds = step - start, t_first - t_loop
      if summary["status"] != "preempted":
        save(state, step, force=True)
        last_eval = run_eval(state, step)
        summary["status"] = "done"
      summary.update(last_eval)
      summary.update(step=step, start_step=start, resumed_from=source,
                     first_step_seconds=t_first - t_loop, train_seconds=train_seconds,
                     eval_ckpt_seconds=paused,
                     tokens_per_second=timed_steps * tokens_per_step / max(train_seconds, 1e-9),
                     wall_seconds=time.time() - t0)
      summary.update(final_state=state, model_config=env.mcfg, config=cfg,
                     eval_batch=host_eval[0] if host_eval else None)
  except NonFiniteLossError as e:
    if start > 0:
      raise NonFiniteLossError(e.step, e.value, resumed_from=source) from None
    raise
  finally:
    if ckpt is not None:
      ckpt.close()
    writer.close()
    if lock is not None:
      lock.release()
  if is_main:
    print(summary_table(summary))
  return summary


def _check_and_log(pending, writer, progress, cfg):
  step, metrics = pending
  m = _host(metrics)
  loss = m["train/loss"]
  if not math.isfinite(loss):
    raise NonFiniteLossError(step, loss)
  progress.update(step, loss)
  if step % max(int(cfg.log.every), 1) == 0 or step == int(cfg.train.num_steps):
    writer.write(step, m)


def _brief(m):
  keys = ("eval/loss", "eval/ppl", "moe/maxvio", "moe/load_cv", "moe/dead", "moe/seu",
          "moe/domain_mi_norm")
  return ", ".join(f"{k}={m[k]:.4g}" for k in keys if k in m)


def summary_table(summary):
  """A small table of the final metrics."""
  keys = ("eval/loss", "eval/ppl", "moe/maxvio", "moe/load_cv", "moe/dead", "moe/seu",
          "moe/entropy", "moe/ortho_l1", "moe/ortho_mse", "moe/domain_mi_norm",
          "tokens_per_second", "wall_seconds")
  rows = [(k, summary[k]) for k in keys if k in summary]
  width = max([len(k) for k, _ in rows] + [6])
  lines = [f"{'metric'.ljust(width)}  value", "-" * (width + 14)]
  lines += [f"{k.ljust(width)}  {v:.6g}" for k, v in rows]
  lines.append(f"{'status'.ljust(width)}  {summary.get('status')} at step {summary.get('step')}")
  return "\n".join(lines)
