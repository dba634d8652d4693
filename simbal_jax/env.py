"""A run's environment: the prepared config, the data, the model, the mesh and the state.

`build(config, workdir)` validates the config and prepares the data (every config or data error
raises here, one line naming the field, before anything compiles), then builds the mesh, the
model, the optimizer and the abstract TrainState with its shardings (`Env`). `initial_state`
restores or initialises the state (workdir > ckpt.resume_from > ckpt.init_from > scratch);
`restore_run` gives the Env and final state of a finished run (analysis tools). The loop that
uses them is `train.py`; evaluation is `evaluate.py`.
"""

import collections
import copy
import dataclasses
import functools
import json
import math
from typing import Any

from absl import logging
import jax
import ml_collections

from simbal_jax import balance
from simbal_jax import data as data_lib
from simbal_jax import experts
from simbal_jax import memory
from simbal_jax import model as model_lib
from simbal_jax import optim
from simbal_jax import programs
from simbal_jax import routing
from simbal_jax import sharding
from simbal_jax import step as step_lib
from simbal_jax import validate
from simbal_jax.runio import checkpoint
from simbal_jax.runio import paths
from simbal_jax.runio import rundir

TRAIN_KEYS = ("inputs", "targets", "mask", "segment_ids")  # segment_ids: data.document_mask
EVAL_SPACINGS = ("linear", "log")  # train.eval_spacing: see evaluate.eval_steps


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
  data_lib.parse_eval_sets(t.get("eval_sets", ""), cfg.data)  # names, sources: before any data
  sc = step_lib.StepConfig.from_config(cfg)  # validates balance.* (lists valid terms)
  router = cfg.moe.get("router", "token_choice")
  if router not in routing.ROUTERS:
    raise ValueError(f"moe.router={router!r}; valid: {', '.join(routing.ROUTERS)}")
  if sc.loss_free and router != "token_choice":
    raise ValueError(f"balance.loss_free=True needs moe.router='token_choice' (its bias "
                     f"balances a top-k choice), got moe.router={router!r}")
  if cfg.moe.num_experts <= 0 and (sc.terms or sc.loss_free):
    raise ValueError(f"balance.terms={cfg.balance.terms!r} / balance.loss_free="
                     f"{cfg.balance.loss_free} need an MoE model (moe.num_experts > 0); use "
                     "balance.terms='' and loss_free=False (variant 'none') for a dense model")
  return cfg


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
  eval_sets: tuple = ()  # ((name, data.Datasets), ...): train.eval_sets, the extra eval sets
  # What the jitted programs depend on (hashable; Envs with equal keys share them, `programs.program`):
  # the model's own programs (evaluation, analyses) on model_key = (model config, mesh, rules);
  # init on state_key (also the optimizer config and the step count); the train step on
  # program_key (also the step config and its balancing-term functions).
  model_key: tuple = ()
  state_key: tuple = ()
  program_key: tuple = ()


def build(config, workdir=None, devices=None, *, data=True):
  """Builds the run's Env; raises config / data / mesh errors before anything compiles.

  Args:
    config: ConfigDict (configs/base.py).
    workdir: run directory, local or cloud (the data cache defaults to <workdir>/data, or a
      local directory for a cloud workdir: data.make_datasets); needed with data.
    devices: devices for the mesh (default: all).
    data: prepare the data (train iterator, eval set, the extra eval sets of
      train.eval_sets); without it `model.vocab_size` must be set (benchmarks).
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
  datasets, eval_sets = None, ()
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
    eval_sets = data_lib.make_eval_sets(
        data_lib.parse_eval_sets(t.get("eval_sets", ""), cfg.data),
        tokenizer=datasets.tokenizer, seq_len=int(t.seq_len),
        batch_size=int(t.global_batch_size), workdir=workdir, seed=int(cfg.seed),
        process_index=jax.process_index(), process_count=jax.process_count())
    for name, ds in eval_sets:
      if ds.vocab_size > vocab:
        raise ValueError(f"train.eval_sets set {name!r}: its tokens need a vocabulary of "
                         f"{ds.vocab_size}, more than the model's {vocab} (model.vocab_size)")
  if int(cfg.model.vocab_size) < 1:
    raise ValueError("build(data=False) needs model.vocab_size > 0")
  mcfg = model_lib.ModelConfig.from_config(cfg)
  if mcfg.moe is not None:  # ragged_impl "auto" by the platform compiled for, not the host's
    mcfg = dataclasses.replace(mcfg, moe=dataclasses.replace(
        mcfg.moe, ragged_impl=experts.resolve_ragged_impl(mcfg.moe.ragged_impl,
                                                          devices[0].platform)))
  mesh = sharding.make_mesh(cfg.mesh, devices)
  sc = step_lib.StepConfig.from_config(cfg)
  rules = sharding.LOGICAL_RULES
  opt_key = json.dumps(cfg.opt.to_dict(), sort_keys=True)
  # The balancing terms' functions too: a term registered again under its name is a new program.
  terms = tuple(balance.TERMS[name].fn for name, _ in sc.terms)
  model_key = (mcfg, mesh, rules)
  state_key = model_key + (opt_key, int(t.num_steps))
  program_key = state_key + (sc, terms)
  model, tx, schedule, init, boxed = _model_and_optimizer(mcfg, cfg.opt, opt_key,
                                                         int(t.num_steps))
  shardings = sharding.state_shardings(boxed, mesh, rules)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          step_lib.unbox(boxed), shardings)
  batch_sharding = jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec(sharding.BATCH_AXES))
  return Env(cfg=cfg, sc=sc, model=model, mcfg=mcfg, tx=tx, schedule=schedule, mesh=mesh,
             rules=rules, init=init, abstract=abstract, shardings=shardings,
             batch_sharding=batch_sharding, datasets=datasets, eval_sets=eval_sets,
             model_key=model_key, state_key=state_key, program_key=program_key)


_MODELS = collections.OrderedDict()  # (mcfg, opt_key, num_steps) -> _model_and_optimizer


def _model_and_optimizer(mcfg, opt_cfg, opt_key, num_steps):
  """(model, tx, schedule, init, boxed abstract state) of a model config and cfg.opt (`opt_key`:
  its sorted JSON): the same objects for equal keys (the newest 8 kept), so that the programs
  closing over them are shared (`programs.program`) and the abstract state is traced once."""
  def make():
    model = model_lib.Transformer(mcfg)
    tx, schedule = optim.make_optimizer(opt_cfg, num_steps)
    init = functools.partial(step_lib.init_state, model=model, tx=tx)
    return model, tx, schedule, init, jax.eval_shape(init, jax.random.key(0))

  return programs.shared(_MODELS, (mcfg, opt_key, num_steps), make, 8)


def clear_programs():
  """Forgets the shared programs (`programs.program`) and models: the next run traces afresh."""
  programs.clear()
  _MODELS.clear()
  memory.clear_caches()


def resolve_num_groups(cfg, num_devices):
  """Resolves `moe.num_groups = 0` (auto) in place: one routing group per batch shard.

  With the batch split over mesh data x expert, one group per shard keeps each token's dispatch
  on its own device and bounds a dropless buffer by the shard's tokens. `dispatch="ragged"`
  needs a single group, so auto gives 1 there.
  """
  if int(cfg.moe.num_experts) > 0 and int(cfg.moe.num_groups) == 0:
    shards = sharding.batch_shards(cfg.mesh, num_devices)
    cfg.moe.num_groups = 1 if cfg.moe.dispatch == "ragged" else shards


def tokens_per_step(cfg):
  """Tokens of one optimizer step: global batch x sequence length."""
  return int(cfg.train.global_batch_size) * int(cfg.train.seq_len)


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
  init_fn = env.init  # the program keeps init_fn alive, not the Env and its data
  init = programs.program("init", env.state_key, lambda: jax.jit(
      lambda k: step_lib.unbox(init_fn(k)), out_shardings=env.shardings))
  state = init(key)
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
    ValueError: no run directory given.
    FileNotFoundError: no config.json or no checkpoint.
  """
  if not str(run_dir or "").strip():
    raise ValueError("a run directory is needed (--run=DIR: config.json + checkpoints/)")
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
  """The jitted train step (state donated): (state, batch) -> (state, metrics); one per
  Env.program_key in a process (`programs.program`)."""
  return programs.program("train_step", env.program_key, lambda: jax.jit(
      functools.partial(step_lib.train_step, model=env.model, tx=env.tx, sc=env.sc,
                        schedule=env.schedule),
      in_shardings=(env.shardings, env.batch_sharding), out_shardings=(env.shardings, None),
      donate_argnums=(0,)))
