"""TrainState and the pure train / eval steps.

Loss = cross-entropy + z_loss * logit z-loss + sum over the configured balancing terms of
coef * (mean over MoE layers of the term), the terms coming from the registry in
`simbal_jax.balance` (`balance.terms`, e.g. "lbl:0.01", "simbal:0.1"); each term's layer mean is
logged as `train/<name>`. Loss-Free balancing (`balance.loss_free`) updates the per-layer
selection bias (TrainState.expert_bias, state not parameter) after the optimizer step from the
expert counts of the whole global batch (all micro-batches).

Gradient accumulation (`grad_accum` > 1) scans over micro-batches. Every term sees one
micro-batch (the LBL with lbl_scope "micro" groups that micro-batch's sequences, a number that
lbl_micro_sequences must divide, so its mean over micro-batches is the same as without
accumulation), except the LBL with lbl_scope "global": then a forward-only pass over all
micro-batches first computes f of the whole global batch, and each micro-batch's LBL uses that f
with its own P, so the mean over equal-sized micro-batches is exactly the global-batch LBL in
value and gradient (losses.lbl_from_stats explains why). That costs one extra forward pass.
"""

import dataclasses
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from simbal_jax import analysis
from simbal_jax import balance
from simbal_jax import losses
from simbal_jax import metrics as metrics_lib
from simbal_jax import model as model_lib
from simbal_jax import routing
from simbal_jax import specialization


@flax.struct.dataclass
class TrainState:
  """Everything a step reads and writes (checkpointed as one pytree).

  Attributes:
    step: int32[] optimizer steps done.
    params: model parameters (unboxed).
    opt_state: optax state.
    expert_bias: float32[Lm, E] Loss-Free selection bias (a dense model: one unused 0 of shape
      [1, 1]; a zero-size array cannot be checkpointed).
    rng: uint32[2] raw data of the train PRNG key (`jax.random.key_data`; raw so that every
      checkpoint format stores it). Each step splits it into the next state's key and the
      step's key, and the step's key into one key per use (`step_keys`): anything stochastic
      in training (router noise, dropout) takes its own key from there, never the init key.
  """
  step: jax.Array
  params: Any
  opt_state: Any
  expert_bias: jax.Array
  rng: jax.Array


# The uses of a step's key (`step_keys`), in a fixed order: a new use is appended, so the keys
# of the others do not change.
STEP_KEY_USES = ("router", "dropout")


def step_keys(rng):
  """(next state's rng uint32[2], {use: PRNG key} of this step) from a state's `rng`."""
  nxt, this = jax.random.split(jax.random.wrap_key_data(rng))
  keys = jax.random.split(this, len(STEP_KEY_USES))
  return jax.random.key_data(nxt), dict(zip(STEP_KEY_USES, keys))


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """Static settings of the steps (hashable; bound by closure).

  Attributes:
    terms: ((name, coef), ...) balancing terms (balance.parse_terms of `balance.terms`).
    loss_free: update the Loss-Free selection bias after each step.
    lf_rate: Loss-Free update rate u.
    options: balance.Options of the built-in terms.
    z_loss: output-logit z-loss coefficient.
    grad_accum: micro-batches per step.
    expert_norms: also return each routed expert's weight and gradient norm (log.expert_norms).
  """
  terms: tuple = (("lbl", 0.01),)
  loss_free: bool = False
  lf_rate: float = 1e-3
  options: balance.Options = balance.Options()
  z_loss: float = 1e-5
  grad_accum: int = 1
  expert_norms: bool = False

  def __post_init__(self):
    for name, coef in self.terms:
      if name not in balance.TERMS or not coef >= 0:
        raise ValueError(f"balance.terms: bad term {(name, coef)!r}; registered: "
                         f"{', '.join(sorted(balance.TERMS))}")
    if self.grad_accum < 1:
      raise ValueError(f"train.grad_accum must be >= 1, got {self.grad_accum}")

  @property
  def global_lbl_accum(self):
    """Whether the LBL needs the global batch's f computed before the micro-batches."""
    return (self.grad_accum > 1 and self.options.lbl_scope == "global"
            and any(n == "lbl" for n, _ in self.terms))

  @classmethod
  def from_config(cls, cfg):
    """From cfg.balance and cfg.train; checks that balance.lbl_micro_sequences divides the
    sequences of each accumulation micro-batch when lbl_scope is "micro"."""
    b, t = cfg.balance, cfg.train
    micro = int(b.get("lbl_micro_sequences", 1))
    if b.lbl_scope == "micro":
      per_step = int(t.global_batch_size) // max(int(t.grad_accum), 1)
      if micro < 1 or per_step % micro:
        raise ValueError(f"balance.lbl_micro_sequences={micro} must be >= 1 and divide the "
                         f"{per_step} sequences of each forward pass (train.global_batch_size / "
                         "train.grad_accum)")
    return cls(terms=balance.parse_terms(b.terms), loss_free=bool(b.loss_free),
               lf_rate=float(b.lf_rate),
               options=balance.Options(lbl_scope=b.lbl_scope, lbl_micro_sequences=micro,
                                       simbal_norm=b.simbal_norm,
                                       simbal_reduction=b.simbal_reduction),
               z_loss=float(t.z_loss), grad_accum=int(t.grad_accum),
               expert_norms=bool(cfg.log.get("expert_norms", False)))


def init_state(key, model, tx):
  """Builds a (boxed) TrainState; call under jax.eval_shape / jit(out_shardings=...).

  Parameter shapes do not depend on the sequence length (RoPE has no table), so init runs on
  one dummy sequence of `num_groups` tokens: divisible by the MoE routing groups, and cheap.

  Args:
    key: the run's root PRNG key (`jax.random.key(cfg.seed)`), split into the parameters' key
      and the train key (the state's `rng`).
    model: model.Transformer.
    tx: optax transformation.
  """
  mcfg = model.config
  dummy_len = mcfg.moe.num_groups if mcfg.moe else 1
  init_key, train_key = jax.random.split(key)
  params = model.init(init_key, jnp.zeros((1, dummy_len), jnp.int32))["params"]
  bias_shape = (mcfg.num_moe_layers, mcfg.moe.num_experts) if mcfg.moe else (1, 1)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    expert_bias=jnp.zeros(bias_shape, jnp.float32),
                    rng=jax.random.key_data(train_key))


def _bias_arg(model, expert_bias):
  return expert_bias if model.config.moe is not None else None


def loss_fn(params, batch, expert_bias, *, model, sc, expert_fraction=None, rngs=None):
  """Total loss of one (micro-)batch.

  Args:
    params: model parameters.
    batch: dict(inputs=int32[B, L], targets=int32[B, L], optional mask=[B, L] and
      segment_ids=int32[B, L] (document masking: attention stays within a document)).
    expert_bias: float32[Lm, E].
    model: model.Transformer. sc: StepConfig.
    expert_fraction: float32[Lm, E] f of the whole global batch (lbl_scope "global" under
      gradient accumulation), or None.
    rngs: {use: PRNG key} of this (micro-)batch (`step_keys`), passed to the model as Flax
      RNG streams; None for a deterministic call.
  Returns:
    (loss float32[], (aux dict of float32[] scalars, counts float32[Lm, E] or None)).
  """
  mcfg = model.config
  logits, aux = model.apply({"params": params}, batch["inputs"],
                            expert_bias=_bias_arg(model, expert_bias),
                            segment_ids=batch.get("segment_ids"), rngs=rngs)
  ce, z = losses.cross_entropy(logits, batch["targets"], batch.get("mask"))
  loss = ce + sc.z_loss * z
  out = {"ce": ce, "z_loss": z}
  counts = None
  if mcfg.moe is not None:
    mask = batch.get("mask")  # padding tokens (none in packed batches) leave the statistics
    mask_T = None if mask is None else mask.reshape(-1).astype(jnp.float32)
    options = dataclasses.replace(sc.options, batch_shape=tuple(batch["inputs"].shape))
    values = balance.layer_values(sc.terms, aux.router, model_lib.router_kernels(params, mcfg),
                                  mask_T, options, expert_fraction)
    for name, coef in sc.terms:
      out[name] = jnp.mean(values[name])  # mean over MoE layers, coefficient applied once
      loss = loss + coef * out[name]
    counts = aux.counts.astype(jnp.float32)
    out["dropped"] = jnp.mean(aux.dropped)
    out["layer_entropy"] = jax.vmap(lambda p: metrics_lib.routing_entropy(p, mask_T))(
        aux.router.probs)
  out["loss"] = loss
  return loss, (out, counts)


def global_expert_fraction(params, micro, expert_bias, *, model, rngs=None):
  """f float32[Lm, E] of all micro-batches together (forward only, stop-gradient).

  Args:
    micro: dict of int32[A, b, L] micro-batches.
    rngs: the step's keys (`step_keys`), folded with each micro-batch's index as the train
      step does, so a noisy router routes here as in the loss; None: deterministic.
  """
  k = model.config.moe.top_k

  def body(total, xs):
    i, mb = xs
    keys = None if rngs is None else {u: jax.random.fold_in(r, i) for u, r in rngs.items()}
    _, aux = model.apply({"params": params}, mb["inputs"],
                         expert_bias=_bias_arg(model, expert_bias),
                         segment_ids=mb.get("segment_ids"), rngs=keys)
    mask = mb.get("mask")
    mask_T = None if mask is None else mask.reshape(-1)
    assigned = jax.vmap(lambda i: routing.expert_counts(i, aux.router.probs.shape[-1], mask_T))(
        aux.router.expert_index)
    tokens = jnp.float32(mb["inputs"].size) if mask is None else jnp.sum(mask, dtype=jnp.float32)
    return (total[0] + assigned.astype(jnp.float32), total[1] + tokens), None

  n_moe, e = model.config.num_moe_layers, model.config.moe.num_experts
  zeros = (jnp.zeros((n_moe, e), jnp.float32), jnp.zeros((), jnp.float32))
  num_micro = jax.tree.leaves(micro)[0].shape[0]
  (assigned, tokens), _ = jax.lax.scan(body, zeros, (jnp.arange(num_micro), micro))
  return jax.lax.stop_gradient(assigned / jnp.maximum(k * tokens, 1.0))


def train_step(state, batch, *, model, tx, sc, schedule=None):
  """One optimizer step: (state, batch) -> (state, metrics). Pure; jit it once.

  Args:
    state: TrainState.
    batch: dict of int32[B, L] (B = global batch, split into sc.grad_accum micro-batches).
  Returns:
    (new TrainState, flat dict of metrics, all under 'train/': float32[] loss, ce, z_loss,
    one per balancing term, grad_norm, param_norm, lr, and for MoE maxvio (mean over layers),
    dropped, with Loss-Free bias_absmax, and the per-layer arrays layer_load float32[Lm, E]
    (each layer's fraction of routed assignments per expert; rows sum to 1), layer_maxvio
    float32[Lm] and layer_entropy float32[Lm] (mean routing entropy, nats)), with
    sc.expert_norms layer_expert_wnorm and layer_expert_gnorm float32[Lm, E] (each routed
    expert's norm of the updated weights and of the step's gradient, before clipping:
    analysis.layer_expert_norms). The host splits the arrays into `train/layer_<i>/...` scalars
    (telemetry.split_layer_metrics, telemetry.expert_norm_metrics).
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  kw = dict(model=model, sc=sc)
  rng, rngs = step_keys(state.rng)
  if sc.grad_accum == 1:
    (_, (out, counts)), grads = grad_fn(state.params, batch, state.expert_bias, rngs=rngs, **kw)
  else:
    a = sc.grad_accum
    micro = jax.tree.map(lambda x: x.reshape(a, x.shape[0] // a, *x.shape[1:]), batch)
    if sc.global_lbl_accum:
      kw["expert_fraction"] = global_expert_fraction(state.params, micro, state.expert_bias,
                                                     model=model, rngs=rngs)

    def body(carry, xs):
      i, mb = xs  # each micro-batch its own keys
      keys = {u: jax.random.fold_in(k, i) for u, k in rngs.items()}
      (_, (o, c)), g = grad_fn(state.params, mb, state.expert_bias, rngs=keys, **kw)
      return jax.tree.map(jnp.add, carry, (g, o, c)), None

    (_, (o0, c0)), g0 = jax.eval_shape(
        lambda: grad_fn(state.params, jax.tree.map(lambda x: x[0], micro), state.expert_bias,
                        **kw))
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (g0, o0, c0))
    (grads, out, counts), _ = jax.lax.scan(body, zeros, (jnp.arange(a), micro))
    grads = jax.tree.map(lambda g: g / a, grads)
    out = jax.tree.map(lambda v: v / a, out)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  bias = state.expert_bias
  if sc.loss_free and counts is not None:
    bias = routing.loss_free_update(bias, counts, sc.lf_rate)
  metrics = {f"train/{k}": v for k, v in out.items()}
  metrics["train/grad_norm"] = optax.tree.norm(grads)
  metrics["train/param_norm"] = optax.tree.norm(params)
  if schedule is not None:
    metrics["train/lr"] = schedule(state.step)
  if counts is not None:
    load = metrics_lib.load_fractions(counts)
    layer_maxvio = jax.vmap(metrics_lib.max_vio)(load)
    metrics["train/maxvio"] = jnp.mean(layer_maxvio)
    metrics["train/layer_maxvio"] = layer_maxvio
    metrics["train/layer_load"] = load
    if sc.loss_free:
      metrics["train/bias_absmax"] = jnp.max(jnp.abs(bias))
  if sc.expert_norms and model.config.moe is not None:  # outputs only: loss and update unchanged
    ids = model.config.moe_layer_ids
    metrics["train/layer_expert_wnorm"] = analysis.layer_expert_norms(params, ids)
    metrics["train/layer_expert_gnorm"] = analysis.layer_expert_norms(grads, ids)
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                            expert_bias=bias, rng=rng)
  return new_state, metrics


def eval_step(params, expert_bias, batch, *, model, num_domains=0, undecided_delta=0.05):
  """Additive evaluation statistics of one batch (the host sums them over batches).

  Args:
    params: model parameters. expert_bias: float32[Lm, E].
    batch: dict(inputs, targets int32[B, L], optional domain int32[B]).
    model: model.Transformer.
    num_domains: static int D; when > 0 and the batch carries `domain`, the (domain, expert)
      count table is added (every token has its sequence's domain).
    undecided_delta: static float, the margin of `undecided_sum` (log.undecided_delta).
  Returns:
    dict: ce_sum float32[], tokens float32[], ce_seq float32[B] (each sequence's mean
    cross-entropy: the host's standard errors and paired comparisons), and for MoE models
    counts float32[Lm, E],
    entropy_sum float32[Lm] (token-summed routing entropy), seu_sum float32[Lm]
    (sequence-summed SEU), no_expert_sum float32[Lm] (tokens assigned to no expert: 0 for
    token choice), undecided_sum float32[Lm] (tokens whose top-1 router probability is below
    1/E + undecided_delta: metrics.undecided_share), seqs float32[], and with domains
    domain_counts float32[Lm, D, E] (routed assignments per domain and expert, see
    specialization.domain_expert_counts).
    SEU, the domain counts and no_expert_sum count the actual assignments (`MoEAux.assigned`
    for expert choice). With router "expert_choice" also causal_ce_sum float32[]: the
    cross-entropy sum of the causal evaluation (the same parameters, every token routed by
    token-choice top-K of the same router probabilities, dropless: `MoEConfig.causal`), as
    expert choice's own routing looks at later tokens of the sequence.
  """
  logits, aux = model.apply({"params": params}, batch["inputs"],
                            expert_bias=_bias_arg(model, expert_bias),
                            segment_ids=batch.get("segment_ids"))
  b, l = batch["inputs"].shape
  ce_seq, _ = jax.vmap(losses.cross_entropy)(logits, batch["targets"])
  out = {"ce_sum": jnp.sum(ce_seq) * l, "tokens": jnp.float32(b * l), "seqs": jnp.float32(b),
         "ce_seq": ce_seq}
  if aux is not None:
    r = aux.router
    e = r.probs.shape[-1]
    # The actual assignments per token: [Lm, T, K], or [Lm, T, E] padded with E (any number).
    index = r.expert_index if aux.assigned is None else routing.padded_index(aux.assigned)
    k = index.shape[-1]
    out["counts"] = aux.counts.astype(jnp.float32)
    out["entropy_sum"] = jax.vmap(metrics_lib.routing_entropy)(r.probs) * (b * l)
    out["seu_sum"] = jax.vmap(lambda i: metrics_lib.seu(i.reshape(b, l, k), e))(index) * b
    out["no_expert_sum"] = (jnp.zeros(aux.counts.shape[:1], jnp.float32) if aux.assigned is None
                            else jnp.sum(~jnp.any(aux.assigned, axis=-1), axis=-1,
                                         dtype=jnp.float32))
    out["undecided_sum"] = jax.vmap(
        lambda p: metrics_lib.undecided_share(p, undecided_delta))(r.probs) * (b * l)
    if num_domains > 0 and "domain" in batch:
      domain_T = jnp.repeat(batch["domain"].astype(jnp.int32), l)  # tokens are sequence-major
      out["domain_counts"] = jax.vmap(
          lambda i: specialization.domain_expert_counts(i, domain_T, e, num_domains))(index)
    if model.config.moe.router == "expert_choice":
      causal = model_lib.Transformer(dataclasses.replace(model.config,
                                                         moe=model.config.moe.causal()))
      causal_logits, _ = causal.apply({"params": params}, batch["inputs"],
                                      expert_bias=_bias_arg(model, expert_bias),
                                      segment_ids=batch.get("segment_ids"))
      causal_seq, _ = jax.vmap(losses.cross_entropy)(causal_logits, batch["targets"])
      out["causal_ce_sum"] = jnp.sum(causal_seq) * l
  return out


def unbox(tree):
  """Removes flax partitioning boxes."""
  return nn.meta.unbox(tree)
