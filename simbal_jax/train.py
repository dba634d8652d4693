"""The training loop: config -> `env.build` -> restore or init -> steps, evaluations, saves.

`train_and_evaluate(config, workdir)` is the one entry point (main.py, tests, Colab). Order of
work: validate the config and build the data (all config / data errors raise here, before
anything compiles: `env.build`), restore or initialise the state (workdir > ckpt.resume_from >
ckpt.init_from > scratch: `env.initial_state`), then `run_loop`: jitted steps, evaluations at
`evaluate.eval_steps` (`evaluate.Evaluator`), checkpoints and preemption (`runio`), per-step
logging (`telemetry.StepLogger`). docs/ARCHITECTURE.md shows how the modules fit together.
"""

import time

from absl import logging
import jax

from simbal_jax import env as env_lib
from simbal_jax import eval_metrics
from simbal_jax import evaluate
from simbal_jax import sharding
from simbal_jax import telemetry
from simbal_jax.runio import checkpoint
from simbal_jax.runio import paths
from simbal_jax.runio import rundir
from simbal_jax.runio import storage
from simbal_jax.runio import tracking
from simbal_jax.runio import writers

# Raised on a NaN or Inf training loss or gradient norm (kept here: callers catch train's).
NonFiniteLossError = telemetry.NonFiniteLossError


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
    (state, step, status "done" | "preempted", timing dict of `telemetry.Timer.result` with the
    last logged expert-norm summary `telemetry.expert_norm_metrics`, if any).
  """
  cfg, t = env.cfg, env.cfg.train
  num_steps, start = int(t.num_steps), int(jax.device_get(state.step))
  train_step = env_lib.make_train_step(env)
  due_evals = set(evaluate.eval_steps(t))
  tokens_per_step = env_lib.tokens_per_step(cfg)
  progress = writers.Progress(start, num_steps, tokens_per_step,
                              enabled=cfg.log.progress and jax.process_index() == 0)
  timer = telemetry.Timer(start)
  log = telemetry.StepLogger(env, writer, progress, timer)
  pending, step, status = None, start, "done"

  def save(st, step, force=False):
    return ckpt is not None and ckpt.save(step, st, it.get_state(), config=cfg.to_dict(),
                                          force=force)

  with checkpoint.PreemptionHandler() as preempt:
    while step < num_steps:
      state, metrics = train_step(state, sharding.to_global(next(it), env.batch_sharding,
                                                           env_lib.TRAIN_KEYS))
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
  return state, step, status, {**timer.result(step, tokens_per_step), **log.health}


def train_and_evaluate(config, workdir, *, hooks=(), devices=None):
  """Trains and evaluates; returns (summary dict, final TrainState).

  The summary holds the final eval metrics (`eval/...`, with PES when train.pes_tokens > 0),
  `status` ("done" | "preempted"), `step`, `start_step`, `resumed_from`, the timings of
  `telemetry.Timer.result` (`tokens_per_second` is the throughput of the compiled step,
  evaluations and saves excluded) and `wall_seconds`; the last logged expert-norm ratios
  (`train/expert_{w,g}norm_ratio...`, log.expert_norms); `expert_load` float64[Lm, E] and
  `domain_expert_counts` of the last evaluation; `model_config`.

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
  tracking.check_log_config(config.log)  # log.profile_steps, log.wandb_*: one line
  workdir = paths.resolve(workdir)  # a cloud path stays one (never ./gs:/...)
  is_main = jax.process_index() == 0
  rundir.WorkdirLock.check(workdir, enabled=is_main)  # in use: fail now (reads only)
  t0 = time.time()
  env = env_lib.build(config, workdir, devices)  # validates before anything is written
  cfg = env.cfg
  logging.info("devices: %d (%d processes), mesh %s", jax.device_count(), jax.process_count(),
               dict(env.mesh.shape))
  env_lib.check_memory(env)
  ckpt = None
  if cfg.ckpt.enabled:  # writes nothing until its first save
    ckpt = checkpoint.Checkpointer(workdir / "checkpoints", every=cfg.ckpt.every,
                                   max_to_keep=cfg.ckpt.max_to_keep,
                                   async_save=cfg.ckpt.async_save)
  summary = {}
  lock = writer = profiler = None
  try:
    with sharding.mesh_rules(env.mesh, env.rules):
      # Every check, the restore included, before anything is written: a refused start leaves
      # the workdir as it was (no lock taken over, no events file, nothing renamed).
      state, data_state, source = env_lib.initial_state(env, ckpt)
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
        paths.write_json(workdir / "config.json", cfg.to_dict())
      writer = writers.MetricWriter(
          workdir, tensorboard=cfg.log.tensorboard, enabled=is_main,
          record_files=(telemetry.LOAD_FILE,),
          wandb=tracking.wandb_settings(cfg.log, telemetry.hparams(cfg.to_dict())))
      logging.info("starting at step %d from %s", start, source)
      writer.drop_after(start)  # records of steps after the checkpoint (crash) are redone
      it = env.datasets.train_iter()
      if data_state:
        it.set_state(data_state)
      evaluator = evaluate.Evaluator(env, writer, workdir, state, start)
      profiler = tracking.Profiler(cfg.log.get("profile_steps", ""), writer, start)

      state, step, status, timing = run_loop(env, state, it, ckpt=ckpt, writer=writer,
                                             on_eval=evaluator, hooks=(*hooks, profiler))
      if status == "done":
        summary.update(evaluator.final(state, step))
        writer.hparams(telemetry.hparams(cfg.to_dict()), {
            k: summary[k] for k in eval_metrics.hparam_metrics() if k in summary})
      summary.update(evaluator.last)  # the load (and domain counts) of the last evaluation
  except NonFiniteLossError as e:
    if start > 0:
      raise NonFiniteLossError(e.step, e.value, resumed_from=source, what=e.what) from None
    raise
  finally:
    try:
      if profiler is not None:
        profiler.close()
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
    print(telemetry.summary_table(summary))
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
    print(telemetry.summary_table(summary))
  return summary, state