"""The optional trackers beside the metric files: a Weights & Biases run (`log.wandb_*`, the
`wandb` extra) that `writers.MetricWriter` feeds, and the jax.profiler trace of a span of steps
(`log.profile_steps`, `Profiler`). `check_log_config` checks their fields before a run starts.
"""

import importlib.util
import os
import re
import uuid

from absl import logging

# log.wandb_mode: "" lets wandb decide (WANDB_MODE from the environment, else online).
WANDB_MODES = ("", "online", "offline", "disabled")


def wandb_settings(log, config=None):
  """The `MetricWriter(wandb=...)` arguments of the `log` config section (None: W&B off).

  Args:
    log: the config's `log` section (`wandb_project`, `wandb_entity`, `wandb_mode`).
    config: the run's flat hparams ({dotted field: value}), W&B's config of the run.
  """
  project = str(log.get("wandb_project", "") or "")
  if not project:
    return None
  return dict(project=project, entity=str(log.get("wandb_entity", "") or ""),
              mode=str(log.get("wandb_mode", "") or ""), config=dict(config or {}))


def start_wandb(workdir, local, *, project, entity="", mode="", config=None):
  """A wandb Run for `workdir` writing under <local>/wandb, or None (logged) when it cannot
  start: like TensorBoard, W&B is an extra view, and the run keeps its JSONL and events."""
  try:
    import wandb  # pylint: disable=g-import-not-at-top
    id_file = "wandb/run_id"
    if (workdir / id_file).exists():  # a resumed run continues its W&B run
      run_id = (workdir / id_file).read_text().strip()
    else:
      run_id = uuid.uuid4().hex[:12]
      (local / "wandb").mkdir(parents=True, exist_ok=True)
      (local / id_file).write_text(run_id + "\n")
    run = wandb.init(project=project, entity=entity or None, mode=mode or None,
                     dir=os.fspath(local), name=workdir.name, id=run_id, resume="allow",
                     config=config or None, settings=wandb.Settings(console="off"))
    run.define_metric("step")
    run.define_metric("*", step_metric="step")  # every key against the trainer's step
    return run
  except Exception as e:  # pylint: disable=broad-except
    logging.error("W&B run unavailable (%s); metrics go to metrics.jsonl and TensorBoard only",
                  e)
    return None


def profile_steps(spec):
  """(START, STOP) of `log.profile_steps` ("START:STOP"), or None when it is empty.

  Raises:
    ValueError: not two integers 0 <= START < STOP (one line, naming the field).
  """
  if not spec:
    return None
  m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(spec))
  if m is None or int(m[1]) >= int(m[2]):
    raise ValueError(f"log.profile_steps={spec!r}: give START:STOP with 0 <= START < STOP "
                     "(the steps after START up to STOP are traced, e.g. 10:15)")
  return int(m[1]), int(m[2])


def check_log_config(log):
  """Checks the `log` fields that would otherwise fail mid-run: one line each.

  Raises:
    ValueError: a malformed `log.profile_steps`, an unknown `log.wandb_mode`, or
      `log.wandb_project` set without wandb installed (names the extra).
  """
  profile_steps(log.get("profile_steps", ""))
  mode = log.get("wandb_mode", "")
  if mode not in WANDB_MODES:
    raise ValueError(f"log.wandb_mode={mode!r}: one of online, offline, disabled, or '' "
                     "(WANDB_MODE from the environment, else online)")
  if log.get("wandb_project", "") and importlib.util.find_spec("wandb") is None:
    raise ValueError(f"log.wandb_project={log.get('wandb_project')!r} needs wandb, which is not "
                     "installed: pip install 'simbal_jax[wandb]'")


class Profiler:
  """A train-loop hook (`hook(step, state)`) that traces the steps START+1 .. STOP of
  `log.profile_steps` with jax.profiler into <workdir>/tb/plugins/profile/<time>/ (one
  `<host>.xplane.pb`), where TensorBoard's profile plugin finds it (`tensorboard --logdir
  <workdir>/tb`, Profile tab; `pip install tensorboard-plugin-profile`).

  The trace starts once step START has finished (or at once, when a resumed run starts inside
  the span) and stops once step STOP has finished (or at `close`): both wait for the devices, so
  those steps' device work is in the trace. Only process 0 traces; a cloud workdir's trace is
  staged locally and uploaded with the metrics.
  """

  def __init__(self, spec, writer, start_step):
    """Args:
      spec: `log.profile_steps` ("" or "START:STOP").
      writer: the run's MetricWriter (where to write; nothing when it is disabled).
      start_step: the step the loop starts from.
    """
    self.span = profile_steps(spec)
    self.logdir = writer.local_dir / "tb" if self.span and writer.enabled else None
    self.active = self.done = False
    if self.logdir is not None and self.span[0] <= start_step < self.span[1]:
      self._start()

  def _start(self, state=None):
    import jax  # pylint: disable=g-import-not-at-top
    jax.block_until_ready(state)
    self.logdir.mkdir(parents=True, exist_ok=True)
    jax.profiler.start_trace(os.fspath(self.logdir))
    self.active = True
    logging.info("profiling steps %d-%d into %s", self.span[0] + 1, self.span[1], self.logdir)

  def _stop(self, state=None):
    import jax  # pylint: disable=g-import-not-at-top
    jax.block_until_ready(state)
    jax.profiler.stop_trace()
    self.active, self.done = False, True
    logging.info("profile written to %s/plugins/profile", self.logdir)

  def __call__(self, step, state):
    if self.logdir is None or self.done:
      return
    if not self.active and self.span[0] <= step < self.span[1]:
      self._start(state)
    elif self.active and step >= self.span[1]:
      self._stop(state)

  def close(self):
    """Stops a trace still running (the run ended or stopped before STOP)."""
    if self.active:
      self._stop()
