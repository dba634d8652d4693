"""Evaluation: when a run evaluates, on what, and what it records.

`eval_steps` is the schedule; `EvalBatches` the evaluation set as global micro-batches made on
access; `make_eval_step` the jitted `step.eval_step` (additive sums per batch); `evaluate` turns
the sums into the metrics of the registry `eval_metrics`; `final_pes` adds PES at the end of a
run; `Evaluator` runs one evaluation inside the training loop: metrics, the routing change since
the previous evaluation (`analysis.RoutingTracker`), the per-sequence losses of the final one,
and the routing telemetry (expert_load.jsonl, TensorBoard images and histograms).

Extra evaluation sets (`train.eval_sets`, `Env.eval_sets`; `ExtraEvalSet`) are evaluated at
every evaluation after the main one, each the same way (`train.eval_tokens` tokens): the
registry's metrics, churn since the previous evaluation on its own first `log.churn_tokens`
tokens and, at the final evaluation, PES, all under `eval_<name>/` instead of `eval/`; and the
shift of expert load from the main set, `eval_<name>/layer_<i>/load_tv` (total variation
`metrics.load_tv` of the two sets' load distributions; 0 = the same) with its mean over layers
`eval_<name>/load_tv`. Each set's load goes to expert_load.jsonl (split "eval_<name>") and to
the TensorBoard image `routing/expert_load/<name>`. All go into the evaluation's one record.
"""

import collections.abc
import functools
import math

from absl import logging
import jax
import numpy as np

from simbal_jax import analysis
from simbal_jax import env as env_lib
from simbal_jax import eval_metrics
from simbal_jax import metrics as metrics_lib
from simbal_jax import model as model_lib
from simbal_jax import programs
from simbal_jax import sharding
from simbal_jax import step as step_lib
from simbal_jax import telemetry
from simbal_jax.runio import paths

EVAL_KEYS = env_lib.TRAIN_KEYS + ("domain",)  # domain int32[b] (synthetic source): specialisation


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
  if t.eval_spacing == "log":  # env.EVAL_SPACINGS
    points = np.geomspace(max(n / 100.0, 1.0), n, k)
  else:
    points = np.linspace(n / k, n, k)
  return sorted({min(max(int(round(p)), 1), n) for p in points} | {n})


class EvalBatches(collections.abc.Sequence):
  """The evaluation set as global micro-batches made on access (`sharding.to_global` of a host
  slice).

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
    return sharding.to_global(self._parts[i], self._sharding, EVAL_KEYS)


def make_eval_step(env, datasets=None):
  """The jitted eval step: (params, expert_bias, batch) -> additive statistics.

  Args:
    datasets: the data.Datasets evaluated (default env.datasets; an extra set's): with domain
      labels, the (domain, expert) counts are added.
  """
  datasets = env.datasets if datasets is None else datasets
  has_domain = datasets is not None and datasets.has_domain  # None: built without data
  num_domains = int(env.cfg.data.synthetic.num_domains) if has_domain else 0
  delta = float(env.cfg.log.get("undecided_delta", 0.05))
  return programs.program("eval_step", env.model_key + (num_domains, delta), lambda: jax.jit(
      functools.partial(step_lib.eval_step, model=env.model, num_domains=num_domains,
                        undecided_delta=delta),
      in_shardings=(env.shardings.params, env.shardings.expert_bias, env.batch_sharding),
      out_shardings=sharding.replicated(env.mesh)))  # every process reads the sums


def host_router_kernels(env, params):
  """float64[Lm, D, E] router kernels on the host, gathered from every device's shard (on
  several hosts too)."""
  mcfg = env.mcfg
  gather = programs.program("router_kernels", env.model_key, lambda: jax.jit(
      lambda p: model_lib.router_kernels(p, mcfg), out_shardings=sharding.replicated(env.mesh)))
  return np.asarray(jax.device_get(gather(params)), np.float64)


def eval_set(env, datasets=None):
  """The host-local evaluation batches: ceil(eval_tokens / (B * L)) global batches of
  sequences spread over the whole held-out split (data.Datasets.eval_indices), identical for
  every run with the same data settings. `datasets`: default env.datasets (an extra set's)."""
  t = env.cfg.train
  n = max(1, math.ceil(int(t.eval_tokens) / env_lib.tokens_per_step(env.cfg)))
  return (env.datasets if datasets is None else datasets).eval_batches(n)


def evaluate(env, eval_step, state, eval_batches, kernels=None):
  """Eval metrics of `state` (the registry `eval_metrics`) and the per-batch sums behind them.

  Args:
    eval_batches: global batches (e.g. `EvalBatches`).
    kernels: the state's `host_router_kernels` when the caller has them (fetched if None).
  """
  sums = [jax.device_get(eval_step(state.params, state.expert_bias, b)) for b in eval_batches]
  if kernels is None and env.mcfg.moe is not None:
    kernels = host_router_kernels(env, state.params)
  layer_ids = env.mcfg.moe_layer_ids
  return eval_metrics.compute(sums, kernels, layer_ids), sums


def final_pes(env, state, eval_batches):
  """Exact PES per MoE layer on `train.pes_tokens` tokens sampled from the first global eval
  batches (as many whole batches as hold that many tokens; whole batches keep the batch axis
  divisible by its shards, so every process runs the same computation).

  Args:
    eval_batches: global eval batches (e.g. `EvalBatches`).
  The tokens are sampled with the run's root key (`jax.random.key(cfg.seed)`, not the train
  key of the state): every run with the same seed and data measures PES on the same tokens.
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
        env.model, int(env.cfg.log.hist_tokens), sharding.replicated(env.mesh))

  def log_routing(state, step, load, kernels, movement=None):
    if env.mcfg.moe is None:
      return
    writer.write_record(telemetry.LOAD_FILE, telemetry.load_record(
        step, step * env_lib.tokens_per_step(env.cfg), "eval", layer_ids, load, movement))
    if not env.cfg.log.tensorboard:
      return
    logits = None
    if logit_fn is not None:
      logits = np.asarray(jax.device_get(logit_fn(state.params, state.expert_bias,
                                                  eval_batches[0])))
    telemetry.log_eval(writer, step, layer_ids=layer_ids, load=load, kernels=kernels,
                       logits=logits)

  return log_routing


def prefixed(metrics, name):
  """The `eval/...` metrics of an extra evaluation set as `eval_<name>/...`."""
  return {f"eval_{name}/{k[len('eval/'):]}": v for k, v in metrics.items()
          if k.startswith("eval/")}


class ExtraEvalSet:
  """One extra evaluation set of `train.eval_sets` inside the training loop (module docstring).

  `set(state, step, kernels, main_load, final)` -> its metrics under `eval_<name>/`, and writes
  its load telemetry; the caller writes the metrics with the main set's.
  """

  def __init__(self, env, name, datasets, writer, start_state, start_step):
    cfg = env.cfg
    self.env, self.name, self.writer = env, name, writer
    self.step_fn = make_eval_step(env, datasets)
    self.batches = EvalBatches(eval_set(env, datasets), env.batch_sharding,
                               int(cfg.train.grad_accum))
    self._tracker = analysis.RoutingTracker(  # churn on this set's own first tokens
        env.model, self.batches, probe_tokens=int(cfg.log.get("churn_tokens", 0)),
        movement=False, out_sharding=sharding.replicated(env.mesh))
    self._tracker.start(start_state, start_step)

  def __call__(self, state, step, kernels, main_load, final=False):
    """Args:
      kernels: host_router_kernels of the state (None: dense model).
      main_load: float64[Lm, E] the main set's load at this evaluation, or None.
      final: the final evaluation (PES added).
    Returns:
      dict eval_<name>/... of Python floats.
    """
    env = self.env
    layer_ids = env.mcfg.moe_layer_ids
    m, sums = evaluate(env, self.step_fn, state, self.batches, kernels)
    m.update(self._tracker(state, step, layer_ids)[0])
    load = eval_metrics.EvalInputs(sums).load
    if load is not None and main_load is not None:
      tv = np.asarray(metrics_lib.load_tv(main_load, load), np.float64)
      m.update({f"eval/layer_{i}/load_tv": float(v) for i, v in zip(layer_ids, tv)})
      m["eval/load_tv"] = float(tv.mean())
    if final:
      m.update(final_pes(env, state, self.batches))
    if load is not None:
      self.writer.write_record(telemetry.LOAD_FILE, telemetry.load_record(
          step, step * env_lib.tokens_per_step(env.cfg), f"eval_{self.name}", layer_ids, load))
      if env.cfg.log.tensorboard:
        self.writer.image(f"routing/expert_load/{self.name}", telemetry.load_image(load), step)
    return prefixed(m, self.name)


class Evaluator:
  """One evaluation inside the training loop: `evaluator(state, step)` -> eval metrics.

  Writes the metrics (the registry's, the routing change since the previous evaluation,
  `extra`, and the extra evaluation sets' `ExtraEvalSet`) to metrics.jsonl with `train/tokens`,
  the routing telemetry (`eval_telemetry`), and at the final evaluation each eval sequence's
  loss to eval_seq_loss.json (paired errors of the differences between runs; the main set). `last` holds the latest evaluation's expert load float64[Lm, E]
  and (domain, expert) counts (None for dense models / without domain labels).
  """

  def __init__(self, env, writer, workdir, start_state, start_step):
    cfg = env.cfg
    self.env, self.writer, self.workdir = env, writer, workdir
    self.step_fn = make_eval_step(env)
    self.batches = EvalBatches(eval_set(env), env.batch_sharding, int(cfg.train.grad_accum))
    self._log_routing = eval_telemetry(env, self.batches, writer)
    self._tracker = analysis.RoutingTracker(  # churn and expert movement since the last one
        env.model, self.batches, probe_tokens=int(cfg.log.get("churn_tokens", 0)),
        movement=bool(cfg.log.get("expert_movement", False)),
        out_sharding=sharding.replicated(env.mesh))
    self._tracker.start(start_state, start_step)
    self.extra_sets = [ExtraEvalSet(env, name, ds, writer, start_state, start_step)
                       for name, ds in env.eval_sets]
    self.last = {}

  def __call__(self, state, step, extra=None, final=False):
    env = self.env
    kernels = host_router_kernels(env, state.params) if env.mcfg.moe is not None else None
    m, sums = evaluate(env, self.step_fn, state, self.batches, kernels)
    change, movement = self._tracker(state, step, env.mcfg.moe_layer_ids)
    m.update(change, **(extra or {}))
    inputs = eval_metrics.EvalInputs(sums)
    for s in self.extra_sets:
      m.update(s(state, step, kernels, inputs.load, final=final))
    if final and jax.process_index() == 0:
      paths.write_json(self.workdir / "eval_seq_loss.json", {"step": step, "ce_seq": [
          float(x) for s in sums for x in np.asarray(s["ce_seq"]).reshape(-1)]})
    self.writer.write(step, {**m, "train/tokens": step * env_lib.tokens_per_step(env.cfg)})
    self.last = {"expert_load": inputs.load, "domain_expert_counts": inputs.domain_counts}
    self._log_routing(state, step, inputs.load, kernels, movement)
    logging.info("eval step %d: %s", step, telemetry.brief(m))
    return m

  def final(self, state, step):
    """The final evaluation, PES included (of the extra sets too)."""
    return self(state, step, final_pes(self.env, state, self.batches), final=True)
