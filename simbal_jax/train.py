"""The orchestrator: config -> data, model, mesh, state -> jitted loop with eval and checkpoints.

`train_and_evaluate(config, workdir)` is the one entry point (main.py, tests, Colab). Order of
work: validate the config and build the data (all config/data errors raise here, before anything
compiles), build the mesh and the abstract state (eval_shape -> shardings), restore or
initialise (workdir > ckpt.resume_from > ckpt.init_from > scratch), then loop.
"""

import collections.abc
import copy
import dataclasses
import functools
import json
import math
import time
from typing import Any

from absl import logging
import jax
import ml_collections
import numpy as np

from simbal_jax import analysis
from simbal_jax.runio import checkpoint
from simbal_jax import data as data_lib
from simbal_jax import experts
from simbal_jax import memory
from simbal_jax import model as model_lib
from simbal_jax import optim
from simbal_jax.runio import paths
from simbal_jax.runio import rundir
from simbal_jax import sharding
from simbal_jax import step as step_lib
from simbal_jax.runio import storage
from simbal_jax import telemetry
from simbal_jax import validate
from simbal_jax.runio import writers


class NonFiniteLossError(FloatingPointError):
  """Raised when the training loss is NaN or Inf; `.step` is the offending step."""

  def __init__(self, step, value, resumed_from=None, what="training loss"):
    msg = (f"non-finite {what} {value} at step {step}; stopping (no checkpoint is written "
           "for this step; earlier ones are kept)")
    if resumed_from:  # the run loaded a checkpoint: name it, without vouching for it
      msg += (f". This run started from {resumed_from}; if the loss diverged soon after, that "
              "checkpoint's state may be the cause")
    super().__init__(msg)
    self.step, self.value, self.what = step, value, what


def prepare_config(config):
  """Validated, unlocked copy with derived fields (num_steps from token_budget)."""
  cfg = ml_collections.ConfigDict(copy.deepcopy(config.to_dict()))
  rundir.check_finite(cfg)
  validate.check(cfg)  # counts, intervals, coefficients; ckpt.allow_config_change
  t = cfg.train
  if t.num_steps <= 0:
    if t.token_budget <= 0:
      raise ValueError("set train.num_steps > 0 or train.token_budget > 0")
    t.num_steps = int(math.ceil(t.token_budget / (t.global_batch_size * t.seq_len)))
  if t.eval_spacing not in EVAL_SPACINGS:
    raise ValueError(f"train.eval_spacing={t.eval_spacing!r}; valid: {', '.join(EVAL_SPACINGS)}")
  if t.global_batch_size % t.grad_accum:
    raise ValueError(f"train.global_batch_size={t.global_batch_size} not divisible by "
                     f"train.grad_accum={t.grad_accum}")
  sc = step_lib.StepConfig.from_config(cfg)  # validates balance.* (lists valid terms)
  if cfg.moe.num_experts <= 0 and (sc.terms or sc.loss_free):
    raise ValueError(f"balance.terms={cfg.balance.terms!r} / balance.loss_free="
                     f"{cfg.balance.loss_free} need an MoE model (moe.num_experts > 0); use "
                     "balance.terms='' and loss_free=False (variant 'none') for a dense model")
  return cfg


EVAL_SPACINGS = ("linear", "log")


def eval_steps(t):
  """The steps (sorted, the last one = num_steps) at which `train` evaluates.

  Args:
    t: cfg.train. `eval_every > 0`: every that many steps. Else `num_evals` evaluations,
      evenly spaced in steps ("linear") or in log(step) from step ~num_steps/100 ("log").
  """
  n = int(t.num_steps)
  if int(t.eval_every) > 0:
    return sorted(set(range(int(t.eval_every), n + 1, int(t.eval_every))) | {n})
  k = int(t.num_evals)
  if k <= 1:
    return [n]
  if t.eval_spacing == "log":
    points = np.geomspace(max(n / 100.0, 1.0), n, k)
  else:
    points = np.linspace(n / k, n, k)
  return sorted({min(max(int(round(p)), 1), n) for p in points} | {n})


@dataclasses.dataclass(frozen=True)
class Env:
  """Everything the loop needs, built once by `build` (immutable)."""
  cfg: ml_collections.ConfigDict  # prepared config (derived fields resolved)
  sc: step_lib.StepConfig
  model: model_lib.Transformer
  mcfg: model_lib.ModelConfig
  tx: Any  # optax transformation
  schedule: Any  # learning-rate schedule
  mesh: jax.sharding.Mesh
  rules: tuple  # logical axis rules
  init: Any  # key -> boxed TrainState
  abstract: Any  # unboxed abstract TrainState with shardings
  shardings: Any  # TrainState of NamedShardings
  batch_sharding: jax.sharding.NamedSharding
  datasets: Any = None  # data.Datasets, or None when built without data


def build(config, workdir=None, devices=None, *, data=True):
  """Builds the run's Env; raises config / data / mesh errors before anything compiles.

  Args:
    config: ConfigDict (configs/base.py).
    workdir: run directory, local or cloud (the data cache defaults to <workdir>/data, or a
      local directory for a cloud workdir: data.make_datasets); needed with data.
    devices: devices for the mesh (default: all).
    data: prepare the data (train iterator, eval set); without it `model.vocab_size` must be
      set (benchmarks).
  Returns:
    Env.
  """
  cfg = prepare_config(config)
  t = cfg.train
  devices = list(jax.devices() if devices is None else devices)
  resolve_num_groups(cfg, len(devices))
  # Mesh and shape errors first, before any data is prepared (the vocabulary is not known yet).
  probe = model_lib.ModelConfig.from_config(cfg, vocab_size=max(cfg.model.vocab_size, 1))
  sharding.validate(cfg.mesh, probe, int(t.global_batch_size), len(devices),
                    seq_len=int(t.seq_len))
  datasets = None
  if data:
    datasets = data_lib.make_datasets(
        cfg.data, seq_len=int(t.seq_len), batch_size=int(t.global_batch_size), workdir=workdir,
        seed=int(cfg.seed), process_index=jax.process_index(),
        process_count=jax.process_count())
    vocab = int(cfg.model.vocab_size) or int(datasets.vocab_size)
    if vocab < datasets.vocab_size:
      raise ValueError(f"model.vocab_size={vocab} is smaller than the tokenizer's "
                       f"{datasets.vocab_size}")
    cfg.model.vocab_size = vocab
  if int(cfg.model.vocab_size) < 1:
    raise ValueError("build(data=False) needs model.vocab_size > 0")
  mcfg = model_lib.ModelConfig.from_config(cfg)
  if mcfg.moe is not None:  # ragged_impl "auto" by the platform compiled for, not the host's
    mcfg = dataclasses.replace(mcfg, moe=dataclasses.replace(
        mcfg.moe, ragged_impl=experts.resolve_ragged_impl(mcfg.moe.ragged_impl,
                                                          devices[0].platform)))
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
      mesh, jax.sharding.PartitionSpec(sharding.BATCH_AXES))
  return Env(cfg=cfg, sc=step_lib.StepConfig.from_config(cfg), model=model, mcfg=mcfg, tx=tx,
             schedule=schedule, mesh=mesh, rules=rules, init=init, abstract=abstract,
             shardings=shardings, batch_sharding=batch_sharding, datasets=datasets)


def resolve_num_groups(cfg, num_devices):
  """Resolves `moe.num_groups = 0` (auto) in place: one routing group per batch shard.

  With the batch split over mesh data x expert, one group per shard keeps each token's dispatch
  on its own device and bounds a dropless buffer by the shard's tokens. `dispatch="ragged"`
  needs a single group, so auto gives 1 there.
  """
  if int(cfg.moe.num_experts) > 0 and int(cfg.moe.num_groups) == 0:
    shards = sharding.batch_shards(cfg.mesh, num_devices)
    cfg.moe.num_groups = 1 if cfg.moe.dispatch == "ragged" else shards


TRAIN_KEYS = ("inputs", "targets", "mask", "segment_ids")  # segment_ids: data.document_mask
EVAL_KEYS = TRAIN_KEYS + ("domain",)  # domain int32[b] (synthetic source): specialisation


def to_global(batch, batch_sharding, keys=TRAIN_KEYS):
  """Host-local numpy batch -> global jax arrays (those named in `keys`) sharded over the
  batch axis."""
  return {k: jax.make_array_from_process_local_data(batch_sharding, np.asarray(v))
          for k, v in batch.items() if k in keys}


class EvalBatches(collections.abc.Sequence):
  """The evaluation set as global micro-batches made on access (`to_global` of a host slice).

  The host keeps the whole set; the devices hold one micro-batch at a time, of the train step's
  micro-batch size (each host batch split into `micro` consecutive parts, in order), so the
  eval step fits wherever the train step does and a large eval set (MoE-M: 67M tokens) is never
  on the devices at once. Where a part would not split over the batch shards (a micro-batch
  smaller than the mesh), the largest number of parts below `micro` that does is used.
  """

  def __init__(self, host_batches, batch_sharding, micro=1):
    self._sharding = batch_sharding
    self._parts = []
    mesh = batch_sharding.mesh
    shards = math.prod(mesh.shape[a] for a in jax.tree.leaves(batch_sharding.spec[0]))
    for b in host_batches:
      rows = len(next(iter(b.values())))
      parts = next(m for m in range(max(int(micro), 1), 0, -1)
                   if rows % m == 0 and (rows // m * jax.process_count()) % shards == 0)
      step = rows // parts
      self._parts += [{k: v[i:i + step] for k, v in b.items()} for i in range(0, rows, step)]

  def __len__(self):
    return len(self._parts)

  def __getitem__(self, i):
    if isinstance(i, slice):
      return [self[j] for j in range(*i.indices(len(self)))]
    return to_global(self._parts[i], self._sharding, EVAL_KEYS)


def initial_state(env, ckpt):
  """Resume order: workdir checkpoint > ckpt.resume_from > ckpt.init_from > scratch.

  Returns:
    (TrainState, data iterator state dict or None, source str).
  """
  c = env.cfg.ckpt
  if ckpt is not None:  # damaged steps are set aside by ckpt.apply_moves(), once started
    got = ckpt.restore(env.abstract, config=env.cfg.to_dict(), allow=c.allow_config_change,
                       start_over=c.start_over, defer_moves=True)
    if got is not None:
      return got[1], got[2], f"checkpoint step {got[0]} in {ckpt.directory}"
  if c.resume_from:
    other = checkpoint.Checkpointer(c.resume_from, every=0, async_save=False,
                                    require_digests=False)  # from elsewhere: may have none
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


def check_memory(env):
  """Logs the per-device memory estimate; raises before compiling when it cannot fit.

  The parameter, gradient and optimizer-state bytes are exact (memory.memory_estimate): more
  than the device holds is an error. Activations are an analytic estimate: a total above the
  device's memory is a warning.
  """
  t = env.cfg.train
  est = memory.memory_estimate(env.mcfg, dict(env.mesh.shape),
                               global_batch_size=int(t.global_batch_size),
                               seq_len=int(t.seq_len), grad_accum=int(t.grad_accum))
  limit = memory.device_memory_bytes()
  logging.info("memory estimate: %s", memory.summary(est, limit))
  if not limit:
    return est
  state = est["params"] + est["grads"] + est["opt_state"]
  gib = lambda b: f"{b / 2**30:.3g} GiB"
  if state > limit:
    raise ValueError(
        f"parameters, gradients and optimizer state need {gib(state)} per device, more than "
        f"the device's {gib(limit)}: shard them with --config.mesh.fsdp=N (and/or "
        "mesh.expert), or use a smaller model")
  total = est["total_remat"] if env.mcfg.remat else est["total"]
  if total > limit:
    logging.warning("estimated %s per device (activations %s) exceed the device's %s: expect "
                    "an out-of-memory error; consider --config.model.remat=True, a smaller "
                    "batch per device or train.grad_accum", gib(total),
                    gib(total - state), gib(limit))
  return est


def restore_run(run_dir, devices=None):
  """The Env and final TrainState of a finished run directory (analysis tools: PES, pruning).

  Reads `<run_dir>/config.json`, prepares the data as the run did (its cache), and restores the
  newest verified checkpoint of `<run_dir>/checkpoints` (damaged ones are skipped, not renamed).

  Returns:
    (Env, TrainState).
  Raises:
    FileNotFoundError: no config.json or no checkpoint.
  """
  run_dir = paths.resolve(run_dir)
  path = run_dir / "config.json"
  if not path.exists():
    raise FileNotFoundError(f"{run_dir}: no config.json (not a run directory)")
  cfg = ml_collections.ConfigDict(json.loads(path.read_text()))
  env = build(cfg, run_dir, devices)
  ckpt = checkpoint.Checkpointer(run_dir / "checkpoints", every=0, async_save=False)
  try:
    with sharding.mesh_rules(env.mesh, env.rules):
      got = ckpt.restore(env.abstract, config=env.cfg.to_dict(), defer_moves=True)  # renames none
  finally:
    ckpt.close()
  if got is None:
    raise FileNotFoundError(f"{run_dir}: no checkpoint to restore")
  return env, got[1]


def make_train_step(env):
  """The jitted train step (state donated): (state, batch) -> (state, metrics)."""
  return jax.jit(
      functools.partial(step_lib.train_step, model=env.model, tx=env.tx, sc=env.sc,
                        schedule=env.schedule),
      in_shardings=(env.shardings, env.batch_sharding), out_shardings=(env.shardings, None),
      donate_argnums=(0,))


def make_eval_step(env):
  """The jitted eval step: (params, expert_bias, batch) -> additive statistics."""
  has_domain = env.datasets is not None and env.datasets.has_domain  # None: built without data
  num_domains = int(env.cfg.data.synthetic.num_domains) if has_domain else 0
  return jax.jit(
      functools.partial(step_lib.eval_step, model=env.model, num_domains=num_domains),
      in_shardings=(env.shardings.params, env.shardings.expert_bias, env.batch_sharding),
      out_shardings=replicated(env))  # every process reads the sums (several hosts)


def replicated(env):
  """The sharding of a value every process holds whole (small results read on the host)."""
  return jax.sharding.NamedSharding(env.mesh, jax.sharding.PartitionSpec())


def host_router_kernels(env, params):
  """float64[Lm, D, E] router kernels on the host, gathered from every device's shard (on
  several hosts too)."""
  return np.asarray(jax.device_get(_kernels_fn(env.mcfg, env.mesh)(params)), np.float64)


@functools.lru_cache(maxsize=8)
def _kernels_fn(mcfg, mesh):
  """The jitted router-kernel gather of a model and mesh (compiled once, not per evaluation)."""
  return jax.jit(lambda p: model_lib.router_kernels(p, mcfg),
                 out_shardings=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))


def tokens_per_step(cfg):
  """Tokens of one optimizer step: global batch x sequence length."""
  return int(cfg.train.global_batch_size) * int(cfg.train.seq_len)


def eval_set(env):
  """The host-local evaluation batches: ceil(eval_tokens / (B * L)) global batches of
  sequences spread over the whole held-out split (data.Datasets.eval_indices), identical for
  every run with the same data settings."""
  t = env.cfg.train
  n = max(1, math.ceil(int(t.eval_tokens) / tokens_per_step(env.cfg)))
  return env.datasets.eval_batches(n)


def evaluate(env, eval_step, state, eval_batches, kernels=None):
  """Eval metrics of `state` (analysis.eval_metrics) and the per-batch sums behind them.

  Args:
    eval_batches: global batches (`to_global(b, env.batch_sharding, EVAL_KEYS)`).
    kernels: the state's `host_router_kernels` when the caller has them (fetched if None).
  """
  sums = [jax.device_get(eval_step(state.params, state.expert_bias, b)) for b in eval_batches]
  if kernels is None and env.mcfg.moe is not None:
    kernels = host_router_kernels(env, state.params)
  layer_ids = env.mcfg.moe_layer_ids
  return analysis.eval_metrics(sums, kernels, layer_ids), sums


def final_pes(env, state, eval_batches):
  """Exact PES per MoE layer on `train.pes_tokens` tokens sampled from the first global eval
  batches (as many whole batches as hold that many tokens; whole batches keep the batch axis
  divisible by its shards, so every process runs the same computation).

  Args:
    eval_batches: global eval batches (`to_global(b, env.batch_sharding, EVAL_KEYS)`).
  Returns:
    dict eval/pes_min, eval/pes_mean, eval/layer_<i>/pes (empty for dense models or when
    pes_tokens is 0).
  """
  n = int(env.cfg.train.pes_tokens)
  if env.mcfg.moe is None or n <= 0 or not eval_batches:
    return {}
  inputs = []
  for b in eval_batches:
    inputs.append(b["inputs"])
    if sum(x.size for x in inputs) >= n:
      break
  tokens = inputs[0] if len(inputs) == 1 else jax.numpy.concatenate(inputs)
  pes = analysis.layer_pes(jax.random.key(int(env.cfg.seed)), env.model, state.params,
                           tokens, num_tokens=n, expert_bias=state.expert_bias)
  layer_ids = env.mcfg.moe_layer_ids
  out = {"eval/pes_min": pes["min"], "eval/pes_mean": pes["mean"]}
  out.update({f"eval/layer_{i}/pes": float(v) for i, v in zip(layer_ids, pes["pes"])})
  return out


def write_json(path, obj):
  """Writes `obj` as JSON to `path` (local or cloud) atomically (paths.write_text)."""
  paths.write_text(path, json.dumps(obj, indent=1, sort_keys=True, default=str))


def write_config(workdir, cfg):
  """Writes the resolved config as <workdir>/config.json."""
  write_json(paths.resolve(workdir) / "config.json", cfg.to_dict())


class _Timer:
  """Training throughput of the compiled step: time after the first (compiling) step less the
  evaluations and checkpoint saves inside the loop."""

  def __init__(self, start_step):
    self.start_step = start_step
    self.t_loop = self.t_first = time.time()
    self.paused = 0.0

  def first_step_done(self):
    self.t_first = time.time()

  def result(self, step, tokens_per_step):
    timed_steps = step - self.start_step - 1  # steps after the compiling one
    train_seconds = time.time() - self.t_first - self.paused
    if timed_steps < 1:  # a one-step run: only the compiling step to measure
      timed_steps, train_seconds = step - self.start_step, self.t_first - self.t_loop
    return dict(first_step_seconds=self.t_first - self.t_loop, train_seconds=train_seconds,
                eval_ckpt_seconds=self.paused,
                tokens_per_second=timed_steps * tokens_per_step / max(train_seconds, 1e-9))


def run_loop(env, state, it, *, ckpt, writer, on_eval, hooks=()):
  """Trains from `state` to train.num_steps (or a preemption).

  Args:
    state: TrainState (its step is where the loop starts).
    it: the train data iterator (checkpointed with the state).
    ckpt: checkpoint.Checkpointer or None.
    writer: writers.MetricWriter.
    on_eval: callable(state, step) run at every evaluation step before the last.
    hooks: callables hook(step, state) after each dispatched step.
  Returns:
    (state, step, status "done" | "preempted", timing dict of `_Timer.result`).
  """
  cfg, t = env.cfg, env.cfg.train
  num_steps, start = int(t.num_steps), int(jax.device_get(state.step))
  train_step = make_train_step(env)
  due_evals = set(eval_steps(t))
  progress = writers.Progress(start, num_steps, tokens_per_step(cfg),
                              enabled=cfg.log.progress and jax.process_index() == 0)
  timer = _Timer(start)
  log = _Logger(env, writer, progress, timer)
  pending, step, status = None, start, "done"

  def save(st, step, force=False):
    return ckpt is not None and ckpt.save(step, st, it.get_state(), config=cfg.to_dict(),
                                          force=force)

  with checkpoint.PreemptionHandler() as preempt:
    while step < num_steps:
      state, metrics = train_step(state, to_global(next(it), env.batch_sharding))
      step += 1
      preempt.stop_now(step)  # several processes: all agree on the step they stop at
      if step == start + 1:
        jax.block_until_ready(metrics)
        timer.first_step_done()
        log.throughput.start(step, timer.paused)
      for hook in hooks:
        hook(step, state)
      if pending is not None:  # fetch step t-1 after dispatching step t
        log(pending)
      pending = (step, metrics)
      due_save = ckpt is not None and ckpt.should_save(step)
      due_eval = step in due_evals and step < num_steps
      if due_save or due_eval or preempt.requested or step == num_steps:
        log(pending)  # no save after a NaN loss (the save checks the state too)
        pending = None
      t_pause = time.time()
      if due_eval:
        on_eval(state, step)
      if due_save:
        save(state, step)
      if preempt.requested:
        save(state, step, force=True)
      if due_save or preempt.requested:
        writer.flush()  # a cloud workdir's metrics.jsonl then holds every step saved
      timer.paused += time.time() - t_pause
      if preempt.requested:
        status = "preempted"
        logging.warning("preempted at step %d: checkpoint saved, exiting", step)
        break
  progress.close()
  if status == "done":
    save(state, step, force=True)
  return state, step, status, timer.result(step, tokens_per_step(cfg))


def train_and_evaluate(config, workdir, *, hooks=(), devices=None):
  """Trains and evaluates; returns (summary dict, final TrainState).

  The summary holds the final eval metrics (`eval/...`, with PES when train.pes_tokens > 0),
  `status` ("done" | "preempted"), `step`, `start_step`, `resumed_from`, the timings of
  `_Timer.result` (`tokens_per_second` is the throughput of the compiled step, evaluations and
  saves excluded) and `wall_seconds`; `expert_load` float64[Lm, E] and `domain_expert_counts`
  of the final evaluation; `model_config`.

  Args:
    config: ConfigDict (see configs/base.py).
    workdir: str or epath.Path, run directory, local or cloud (`gs://bucket/run`): config.json,
      checkpoints/, metrics.jsonl, tb/, data cache (local for a cloud workdir).
    hooks: callables hook(step, state) run on the host after each dispatched step (testing,
      profiling); they must not block on the state unless they mean to.
    devices: devices for the mesh (default: all).
  A start that is refused (config, data, lock or checkpoint errors) writes nothing in the
  workdir but the data cache: every check, the restore included, runs before the lock is taken
  and anything is written. A run whose checkpoint is at train.num_steps, with its final
  evaluation in metrics.jsonl, is complete: it is reported (summary `complete`: True, the
  metrics of that evaluation) and nothing is written.

  Raises:
    ValueError: bad config / data / mesh / workdir (before training starts).
    NonFiniteLossError: NaN or Inf training loss or gradient norm (names the step).
    checkpoint.NonFiniteStateError, checkpoint.CheckpointSaveError: a save refused or failed.
  """
  paths.check_dir_path(workdir, "workdir")  # empty, or a file in the way: one line
  workdir = paths.resolve(workdir)  # a cloud path stays one (never ./gs:/...)
  is_main = jax.process_index() == 0
  rundir.WorkdirLock.check(workdir, enabled=is_main)  # in use: fail now (reads only)
  t0 = time.time()
  env = build(config, workdir, devices)  # validates before anything is written
  cfg = env.cfg
  logging.info("devices: %d (%d processes), mesh %s", jax.device_count(), jax.process_count(),
               dict(env.mesh.shape))
  check_memory(env)
  ckpt = None
  if cfg.ckpt.enabled:  # writes nothing until its first save
    ckpt = checkpoint.Checkpointer(workdir / "checkpoints", every=cfg.ckpt.every,
                                   max_to_keep=cfg.ckpt.max_to_keep,
                                   async_save=cfg.ckpt.async_save)
  summary = {}
  lock = writer = None
  try:
    with sharding.mesh_rules(env.mesh, env.rules):
      # Every check, the restore included, before anything is written: a refused start leaves
      # the workdir as it was (no lock taken over, no events file, nothing renamed).
      state, data_state, source = initial_state(env, ckpt)
      start = int(jax.device_get(state.step))
      final = writers.final_eval(workdir, start) if start >= int(cfg.train.num_steps) else None
      if final is not None:  # a finished run started again: report it, change nothing
        return _complete(env, workdir, state, source, final, time.time() - t0)
      lock = rundir.WorkdirLock(workdir, enabled=is_main)  # held until the run ends
      if ckpt is not None:
        ckpt.apply_moves()  # damaged steps set aside, or ckpt.start_over
        if is_main:
          storage.check_space(ckpt.directory, env.abstract, int(cfg.ckpt.max_to_keep))
      if is_main:
        write_config(workdir, cfg)
      writer = writers.MetricWriter(workdir, tensorboard=cfg.log.tensorboard, enabled=is_main,
                                    record_files=(telemetry.LOAD_FILE,))
      logging.info("starting at step %d from %s", start, source)
      writer.drop_after(start)  # records of steps after the checkpoint (crash) are redone
      it = env.datasets.train_iter()
      if data_state:
        it.set_state(data_state)
      eval_step = make_eval_step(env)
      host_eval = eval_set(env)
      eval_batches = EvalBatches(host_eval, env.batch_sharding, int(cfg.train.grad_accum))
      log_routing = eval_telemetry(env, eval_batches, writer)
      tracker = analysis.RoutingTracker(  # churn and expert movement since the last evaluation
          env.model, eval_batches, probe_tokens=int(cfg.log.get("churn_tokens", 0)),
          movement=bool(cfg.log.get("expert_movement", False)), out_sharding=replicated(env))
      tracker.start(state, start)

      def run_eval(st, step, extra=None, final=False):
        kernels = host_router_kernels(env, st.params) if env.mcfg.moe is not None else None
        m, sums = evaluate(env, eval_step, st, eval_batches, kernels)
        change, movement = tracker(st, step, env.mcfg.moe_layer_ids)
        m.update(change, **(extra or {}))
        if final and is_main:  # per-sequence losses: paired errors of differences between runs
          write_json(workdir / "eval_seq_loss.json", {"step": step, "ce_seq": [
              float(x) for s in sums for x in np.asarray(s["ce_seq"]).reshape(-1)]})
        writer.write(step, {**m, "train/tokens": step * tokens_per_step(cfg)})
        summary["expert_load"] = analysis.eval_load(sums)
        summary["domain_expert_counts"] = analysis.eval_domain_counts(sums)
        log_routing(st, step, summary["expert_load"], kernels, movement)
        logging.info("eval step %d: %s", step, _brief(m))
        return m

      state, step, status, timing = run_loop(env, state, it, ckpt=ckpt, writer=writer,
                                             on_eval=run_eval, hooks=hooks)
      if status == "done":
        summary.update(run_eval(state, step, final_pes(env, state, eval_batches), final=True))
        writer.hparams(telemetry.hparams(cfg.to_dict()),
                       {k: summary[k] for k in telemetry.HPARAM_METRICS if k in summary})
  except NonFiniteLossError as e:
    if start > 0:
      raise NonFiniteLossError(e.step, e.value, resumed_from=source, what=e.what) from None
    raise
  finally:
    try:
      if ckpt is not None:
        ckpt.close()
    finally:
      if writer is not None:
        writer.close()
      if lock is not None:
        lock.release()
  summary.update(status=status, step=step, start_step=start, resumed_from=source,
                 wall_seconds=time.time() - t0, model_config=env.mcfg, **timing)
  if is_main:
    print(summary_table(summary))
  return summary, state


def _complete(env, workdir, state, source, final, wall_seconds):
  """The summary of a run found complete (its checkpoint at train.num_steps, its final
  evaluation `final` in metrics.jsonl); nothing is written."""
  step = int(jax.device_get(state.step))
  logging.warning("%s is complete: checkpoint at step %d (train.num_steps=%d) and its final "
                  "evaluation in metrics.jsonl; nothing to do, nothing was changed", workdir,
                  step, int(env.cfg.train.num_steps))
  summary = {k: v for k, v in final.items() if k != "step"}
  summary.update(status="done", complete=True, step=step, start_step=step, resumed_from=source,
                 wall_seconds=wall_seconds, model_config=env.mcfg)
  if jax.process_index() == 0:
    print(summary_table(summary))
  return summary, state


class _Logger:
  """Checks each step's loss (NaN/Inf stops the run) and writes the log steps' records:
  metrics.jsonl with per-layer routing metrics, tokens, tokens/s and MFU, and the per-expert
  load in expert_load.jsonl (simbal_jax.telemetry)."""

  def __init__(self, env, writer, progress, timer):
    t = env.cfg.train
    self.every, self.num_steps = max(int(env.cfg.log.every), 1), int(t.num_steps)
    self.tokens_per_step = tokens_per_step(env.cfg)
    self.writer, self.progress, self.timer = writer, progress, timer
    self.layer_ids = env.mcfg.moe_layer_ids
    peak = memory.device_peak_tflops(override=float(env.cfg.log.peak_tflops))
    self.throughput = telemetry.Throughput(
        self.tokens_per_step, model_lib.flops_per_token(env.mcfg, int(t.seq_len)),
        peak * 1e12 * len(env.mesh.devices.flat) if peak else None)

  def __call__(self, pending):
    step, metrics = pending
    m, load = telemetry.split_layer_metrics(jax.device_get(metrics), self.layer_ids)
    loss = m["train/loss"]
    if not math.isfinite(loss):
      raise NonFiniteLossError(step, loss)
    if not math.isfinite(m.get("train/grad_norm", 0.0)):  # the update of this step diverged
      raise NonFiniteLossError(step, m["train/grad_norm"], what="gradient norm")
    self.progress.update(step, loss)
    if step % self.every == 0 or step == self.num_steps:
      m["train/tokens"] = tokens = step * self.tokens_per_step
      m.update(self.throughput.mark(step, self.timer.paused))
      self.writer.write(step, m)
      if load is not None:
        self.writer.write_record(telemetry.LOAD_FILE, telemetry.load_record(
            step, tokens, "train", self.layer_ids, load))


def eval_telemetry(env, eval_batches, writer):
  """A callable(state, step, load, kernels, movement=None) writing an evaluation's routing
  telemetry (load: the eval load fractions, kernels: host_router_kernels of the state,
  movement: each expert's relative weight movement float[Lm, E] since the last evaluation):
  the eval load and movement in expert_load.jsonl and, with log.tensorboard, the images and
  logit histograms (telemetry.log_eval). Every process calls it (the logit histogram is a
  jitted computation); only the writer of process 0 writes."""
  layer_ids = env.mcfg.moe_layer_ids
  logit_fn = None
  if env.mcfg.moe is not None and env.cfg.log.tensorboard and int(env.cfg.log.hist_tokens) > 0:
    logit_fn = telemetry.router_logit_fn(
        env.model, int(env.cfg.log.hist_tokens), replicated(env))

  def log_routing(state, step, load, kernels, movement=None):
    if env.mcfg.moe is None:
      return
    writer.write_record(telemetry.LOAD_FILE, telemetry.load_record(
        step, step * tokens_per_step(env.cfg), "eval", layer_ids, load, movement))
    if not env.cfg.log.tensorboard:
      return
    logits = None
    if logit_fn is not None:
      logits = np.asarray(jax.device_get(logit_fn(state.params, state.expert_bias,
                                                  eval_batches[0])))
    telemetry.log_eval(writer, step, layer_ids=layer_ids, load=load, kernels=kernels,
                       logits=logits)

  return log_routing


def _brief(m):
  return ", ".join(f"{k}={m[k]:.4g}" for _, k in analysis.SUMMARY_COLUMNS if k in m)


def summary_table(summary):
  """A small table of the final metrics (analysis.SUMMARY_COLUMNS and throughput)."""
  rows = [(k, summary[k]) for _, k in analysis.SUMMARY_COLUMNS if k in summary]
  rows += [(k, summary[k]) for k in ("tokens_per_second", "wall_seconds") if k in summary]
  width = max([len(k) for k, _ in rows] + [6])
  lines = [f"{'metric'.ljust(width)}  value", "-" * (width + 14)]
  lines += [f"{k.ljust(width)}  {v:.6g}" for k, v in rows]
  lines.append(f"{'status'.ljust(width)}  {summary.get('status')} at step {summary.get('step')}")
  return "\n".join(lines)
