"""Eval-time analysis of a model's routing and experts: PES and the change between evaluations.

(The metrics computed from the eval step's sums live in the registry `eval_metrics`.)

`RoutingTracker` measures, at every evaluation, how much routing and experts changed since the
previous one: the routing churn of a fixed probe set of eval tokens (`metrics.routing_churn`)
and each expert's relative weight movement (`metrics.expert_movement`, stagnant experts).

`layer_pes` computes the paper's PES on a sample of tokens: the inputs of every MoE block are
captured with `flax.linen.intercept_methods` (on a copy of the model without `remat`: the
parameter tree is the same, and a value captured inside `nn.remat` would be a leaked tracer),
then every expert's SwiGLU is run from the stacked parameters on the sampled tokens and
`specialization.pes` averages the pairwise cosines, all in one jitted program (run op by op,
the model would compile every operation of every block separately).
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from simbal_jax import metrics as metrics_lib
from simbal_jax import model as model_lib
from simbal_jax import moe
from simbal_jax import programs
from simbal_jax import specialization


def _intercept_moe_inputs(model, params, tokens_BxL, expert_bias):
  """[(module path tuple, float[B, L, D])] of every MoE block of `model` (traceable)."""
  captured = []

  def interceptor(next_fun, args, kwargs, context):
    if isinstance(context.module, moe.MoEBlock) and context.method_name == "__call__":
      captured.append((tuple(context.module.path), args[0]))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    model.apply({"params": params}, tokens_BxL,
                expert_bias=expert_bias if model.config.moe is not None else None)
  return captured


def _without_remat(model):
  # nn.remat traces the block in its own scope: an input captured there is a tracer that
  # escapes. Remat does not change parameters or values, so run the model without it.
  return model_lib.Transformer(dataclasses.replace(model.config, remat=False))


def capture_moe_inputs(model, params, tokens_BxL, expert_bias=None):
  """Runs the model (compiled, one program) and returns the inputs of every MoE block, in
  layer order.

  Args:
    model: model.Transformer (with or without remat). params: its parameters.
    tokens_BxL: int32[B, L].
    expert_bias: float32[Lm, E] or None.
  Returns:
    list of (module path tuple, float[B, L, D]) per MoE block.
  """
  plain, paths = _without_remat(model), []

  def run(params, tokens, bias):
    captured = _intercept_moe_inputs(plain, params, tokens, bias)
    paths.extend(path for path, _ in captured)
    return [x for _, x in captured]

  inputs = jax.jit(run)(params, tokens_BxL, expert_bias)
  return list(zip(paths, inputs))


def all_expert_outputs(block_params, x_TxD):
  """Every expert's SwiGLU output for every token.

  Args:
    block_params: the MoE block's params (wi_gate, wi_up float[E, D, F], wo float[E, F, D]).
    x_TxD: float[T, D] block inputs.
  Returns:
    float32[T, E, D].
  """
  p = nn.unbox(block_params)
  x = x_TxD.astype(jnp.float32)
  hp = jax.lax.Precision.HIGHEST
  g = jnp.einsum("td,edf->tef", x, p["wi_gate"].astype(jnp.float32), precision=hp)
  u = jnp.einsum("td,edf->tef", x, p["wi_up"].astype(jnp.float32), precision=hp)
  return jnp.einsum("tef,efd->ted", jax.nn.silu(g) * u, p["wo"].astype(jnp.float32),
                    precision=hp)


def layer_pes(key, model, params, tokens_BxL, *, num_tokens=256, expert_bias=None):
  """Exact PES (all expert pairs) per MoE layer on `num_tokens` sampled tokens.

  The model, the sampling of the block inputs and every layer's PES run as one compiled
  program (no block input leaves the device).

  Args:
    key: PRNG key for the token sample.
    model: model.Transformer (MoE). params: its parameters.
    tokens_BxL: int32[B, L] input tokens (e.g. an eval batch).
    num_tokens: int, tokens sampled per layer (same positions for every layer).
    expert_bias: float32[Lm, E] or None.
  Returns:
    dict: pes float64[Lm] per layer, min, mean, num_tokens.
  """
  if not model.config.moe_layer_ids:
    raise ValueError("layer_pes: the model has no MoE layer")
  total = int(np.prod(tokens_BxL.shape))
  n = min(int(num_tokens), total)
  idx = jax.random.choice(key, total, (n,), replace=False)
  plain = _without_remat(model)

  def per_layer(params, tokens, idx, bias):
    p, values = nn.unbox(params), []
    for path, x_BxLxD in _intercept_moe_inputs(plain, params, tokens, bias):
      block = p
      for name in path:
        block = block[name]
      x_TxD = x_BxLxD.reshape(total, -1)[idx]
      values.append(specialization.pes(all_expert_outputs(block, x_TxD)))
    return jnp.stack(values)

  run = programs.program("layer_pes", (model.config, total), lambda: jax.jit(per_layer))
  values = np.asarray(jax.device_get(run(params, tokens_BxL, idx, expert_bias)), np.float64)
  return {"pes": values, "min": float(values.min()), "mean": float(values.mean()),
          "num_tokens": n}


# ----------------------------------------------------------------------------------------------
# Change between evaluations: routing churn and expert movement.

EXPERT_WEIGHTS = ("wi_gate", "wi_up", "wo")


def expert_weights(params, mcfg):
  """The routed experts' weights stacked over MoE layers, in layer order.

  Returns:
    (wi_gate [Lm, E, D, F], wi_up [Lm, E, D, F], wo [Lm, E, F, D]) in the parameter dtype.
  """
  p = nn.unbox(params)
  return tuple(jnp.stack([p[f"layers_{i}"]["ffn"][name] for i in mcfg.moe_layer_ids])
               for name in EXPERT_WEIGHTS)


def layer_expert_norms(tree, layer_ids):
  """Each routed expert's norm per MoE layer, of the parameters or of their gradients.

  Args:
    tree: the model's parameter tree or a tree of the same structure (gradients): block i's
      experts at tree["layers_<i>"]["ffn"][wi_gate | wi_up | wo], [E, ...] each.
    layer_ids: the MoE layers' block indices (ModelConfig.moe_layer_ids).
  Returns:
    float32[Lm, E]: metrics.expert_norms of (wi_gate, wi_up, wo) per layer (no stacked copy of
    the weights is made).
  """
  p = nn.unbox(tree)
  return jnp.stack([metrics_lib.expert_norms([p[f"layers_{i}"]["ffn"][n] for n in EXPERT_WEIGHTS])
                    for i in layer_ids])


class RoutingTracker:
  """Routing churn and expert movement of a run since its previous evaluation.

  `start(state, step)` takes the reference: the top-k experts (expert choice: the assignment
  masks) of every MoE layer for the probe tokens (the first `probe_tokens` tokens of the evaluation batches, sequence-major, or all of
  them when there are fewer: the same tokens for every run with the same data settings) and a
  copy of every expert's weights (one extra copy of the expert parameters on the devices). Each call `tracker(state, step)` compares the
  state with the reference, returns the metrics and makes the state the new reference. The
  reference of a run's first evaluation is its start: step 0, or the step a resumed run
  restarts from (the previous evaluation's state when a checkpoint was written at it, as at the
  convergence tool's checkpoints); `eval/churn_since_step` names the reference's step.
  """

  def __init__(self, model, eval_batches, *, probe_tokens, movement=True, out_sharding=None):
    """Args:
      model: model.Transformer (no-op for a dense model).
      eval_batches: the global evaluation batches (dicts with inputs int32[B, L]).
      probe_tokens: int, probe tokens for the churn (0: no churn).
      movement: bool, measure expert movement.
      out_sharding: sharding of small results every process reads (replicated).
    """
    moe_model = model.config.moe is not None and bool(eval_batches)
    self.mcfg = model.config
    batch_tokens = int(np.prod(eval_batches[0]["inputs"].shape)) if eval_batches else 0
    self.num_tokens = min(int(probe_tokens), batch_tokens * len(eval_batches)) if moe_model else 0
    self.movement = bool(movement) and moe_model
    self._ref = None
    if self.num_tokens > 0:
      per_batch = min(self.num_tokens, batch_tokens)
      self._batches = eval_batches[:-(-self.num_tokens // per_batch)]

      def route(params, expert_bias, batch):
        _, aux = model.apply({"params": params}, batch["inputs"], expert_bias=expert_bias,
                             segment_ids=batch.get("segment_ids"))
        if aux.assigned is not None:  # expert choice: bool[Lm, n, E] actual assignments
          return aux.assigned[:, :per_batch]
        return aux.router.expert_index[:, :per_batch]  # int32[Lm, n, K], sequence-major

      self._route = programs.program(
          "routing_probe", (self.mcfg, per_batch, out_sharding),
          lambda: jax.jit(route, out_shardings=out_sharding))
    if self.movement:  # the programs close over the model config, not over this tracker
      mcfg = self.mcfg
      self._copy = programs.program(
          "expert_weights", mcfg, lambda: jax.jit(lambda p: expert_weights(p, mcfg)))
      self._move = programs.program("expert_movement", (mcfg, out_sharding), lambda: jax.jit(
          lambda old, p: jax.vmap(metrics_lib.expert_movement)(old, expert_weights(p, mcfg)),
          out_shardings=out_sharding))

  @property
  def enabled(self):
    return self.num_tokens > 0 or self.movement

  def _probe(self, state):
    parts = [np.asarray(jax.device_get(self._route(state.params, state.expert_bias, b)))
             for b in self._batches]
    return np.concatenate(parts, axis=1)[:, :self.num_tokens]

  def start(self, state, step):
    """Takes `state` (at `step`) as the reference."""
    if self.enabled:
      self._ref = (int(step), self._probe(state) if self.num_tokens else None,
                   self._copy(state.params) if self.movement else None)

  def __call__(self, state, step, layer_ids=None):
    """Metrics since the reference, then `state` becomes the reference.

    Returns:
      (dict of python floats: eval/churn_since_step, and per MoE layer i and as the mean over
      layers eval[/layer_<i>]/churn (metrics.routing_churn of the probe tokens; for expert
      choice metrics.assignment_churn of their actual assignments),
      eval[/layer_<i>]/expert_move and expert_move_min (mean and minimum over the layer's
      experts of metrics.expert_movement), eval[/layer_<i>]/stagnant (metrics.stagnant_experts,
      rel 0.1); movement float64[Lm, E] per expert or None).
    """
    if not self.enabled or self._ref is None:
      return {}, None
    since, old_index, old_weights = self._ref
    per, move = {}, None
    index = None
    if self.num_tokens:
      index = self._probe(state)
      churn = (metrics_lib.assignment_churn if index.dtype == bool
               else metrics_lib.routing_churn)
      per["churn"] = np.asarray(jax.vmap(churn)(old_index, index))
    if self.movement:
      move = np.asarray(jax.device_get(self._move(old_weights, state.params)), np.float64)
      per["expert_move"], per["expert_move_min"] = move.mean(-1), move.min(-1)
      per["stagnant"] = np.asarray(metrics_lib.stagnant_experts(move), np.float64)
    self._ref = (int(step), index, self._copy(state.params) if self.movement else None)
    n_moe = self.mcfg.num_moe_layers
    layer_ids = self.mcfg.moe_layer_ids if layer_ids is None else layer_ids
    out = {"eval/churn_since_step": float(since)}
    for name, values in per.items():
      values = np.asarray(values, np.float64).reshape(n_moe)
      out.update({f"eval/layer_{i}/{name}": float(v) for i, v in zip(layer_ids, values)})
      out[f"eval/{name}"] = float(values.mean())
    return out, move
