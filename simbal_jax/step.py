"""TrainState and the pure train / eval steps.

Loss = cross-entropy + z_loss * logit z-loss + the configured balancing terms:
  lbl:    lbl_coef * mean over MoE layers of E * sum_i f_i P_i (uniform router -> 1.0)
  simbal: simbal_coef * mean over MoE layers of ||R^T R - I||_1 (paper: entry-wise L1)
  router z-loss (optional): router_z_coef * mean over layers of mean logsumexp(router logits)^2
Coefficients are applied once, after the mean over layers. Loss-Free methods update the
per-layer selection bias (TrainState.expert_bias, state not parameter) after the optimizer step
from the expert counts of the whole global batch (all micro-batches).

Gradient accumulation (`grad_accum` > 1) scans over micro-batches; the LBL of each micro-batch
uses that micro-batch's f and P (the mean over micro-batches is reported and differentiated).
lbl_scope "global" (f and P of the whole global batch) is therefore rejected with grad_accum > 1.
"""

import dataclasses
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from simbal_jax import losses
from simbal_jax import metrics as metrics_lib
from simbal_jax import model as model_lib
from simbal_jax import routing

BALANCE_METHODS = ("none", "lbl", "simbal", "loss_free", "lf_lbl", "lf_simbal", "simbal_lbl")


@flax.struct.dataclass
class TrainState:
  """Everything a step reads and writes (checkpointed as one pytree).

  Attributes:
    step: int32[] optimizer steps done.
    params: model parameters (unboxed).
    opt_state: optax state.
    expert_bias: float32[Lm, E] Loss-Free selection bias ([0, 0] for a dense model).

  The step is deterministic (no dropout or router noise), so the state holds no RNG key; a
  stochastic addition would add one here and use `fold_in(key, step)` inside the step.
  """
  step: jax.Array
  params: Any
  opt_state: Any
  expert_bias: jax.Array


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """Static settings of the steps (hashable; bound by closure)."""
  method: str = "lbl"
  lbl_coef: float = 0.01
  lbl_scope: str = "batch"
  simbal_coef: float = 0.1
  simbal_norm: str = "l1"
  simbal_normalize: bool = False
  simbal_reduction: str = "sum"
  lf_rate: float = 1e-3
  router_z_coef: float = 0.0
  z_loss: float = 1e-5
  grad_accum: int = 1
  debug_nan_step: int = -1

  def __post_init__(self):
    if self.method not in BALANCE_METHODS:
      raise ValueError(f"unknown balance.method {self.method!r}; valid: "
                       f"{', '.join(BALANCE_METHODS)}")
    if self.lbl_scope not in losses.SCOPES:
      raise ValueError(f"balance.lbl_scope={self.lbl_scope!r}; valid: {losses.SCOPES}")
    if self.simbal_norm not in losses.SIMBAL_NORMS:
      raise ValueError(f"balance.simbal_norm={self.simbal_norm!r}; valid: {losses.SIMBAL_NORMS}")
    if self.simbal_reduction not in losses.SIMBAL_REDUCTIONS:
      raise ValueError(f"balance.simbal_reduction={self.simbal_reduction!r}; valid: "
                       f"{losses.SIMBAL_REDUCTIONS}")
    if self.grad_accum < 1:
      raise ValueError(f"train.grad_accum must be >= 1, got {self.grad_accum}")
    if self.use_lbl and self.lbl_scope == "global" and self.grad_accum > 1:
      raise ValueError(
          f"balance.lbl_scope='global' with train.grad_accum={self.grad_accum}: the global scope "
          "over gradient-accumulation steps is not implemented in the trainer (each micro-batch "
          "would silently use its own f and P). Use lbl_scope='batch' (per micro-batch) or "
          "train.grad_accum=1.")

  @property
  def use_lbl(self):
    return self.method in ("lbl", "lf_lbl", "simbal_lbl")

  @property
  def use_simbal(self):
    return self.method in ("simbal", "lf_simbal", "simbal_lbl")

  @property
  def use_loss_free(self):
    return self.method in ("loss_free", "lf_lbl", "lf_simbal")

  @classmethod
  def from_config(cls, cfg):
    b, t = cfg.balance, cfg.train
    return cls(method=b.method, lbl_coef=float(b.lbl_coef), lbl_scope=b.lbl_scope,
               simbal_coef=float(b.simbal_coef), simbal_norm=b.simbal_norm,
               simbal_normalize=bool(b.simbal_normalize), simbal_reduction=b.simbal_reduction,
               lf_rate=float(b.lf_rate), router_z_coef=float(b.router_z_coef),
               z_loss=float(t.z_loss), grad_accum=int(t.grad_accum),
               debug_nan_step=int(t.get("debug_nan_step", -1)))


def init_state(key, model, tx):
  """Builds a (boxed) TrainState; call under jax.eval_shape / jit(out_shardings=...).

  Parameter shapes do not depend on the sequence length (RoPE has no table), so init runs on
  one dummy sequence of `num_groups` tokens: divisible by the MoE routing groups, and cheap.

  Args:
    key: PRNG key for the parameters.
    model: model.Transformer.
    tx: optax transformation.
  """
  mcfg = model.config
  dummy_len = mcfg.moe.num_groups if mcfg.moe else 1
  init_key, _ = jax.random.split(key)  # the second half was the (unused) train key
  params = model.init(init_key, jnp.zeros((1, dummy_len), jnp.int32))["params"]
  bias_shape = (mcfg.num_moe_layers, mcfg.moe.num_experts) if mcfg.moe else (0, 0)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    expert_bias=jnp.zeros(bias_shape, jnp.float32))


def _bias_arg(model, expert_bias):
  return expert_bias if model.config.moe is not None else None


def loss_fn(params, batch, expert_bias, step, *, model, sc):
  """Total loss of one (micro-)batch.

  Args:
    params: model parameters.
    batch: dict(inputs=int32[B, L], targets=int32[B, L], optional mask=[B, L]).
    expert_bias: float32[Lm, E].
    step: int32[] the step being computed (1-based), for the NaN debug hook.
    model: model.Transformer. sc: StepConfig.
  Returns:
    (loss float32[], (aux dict of float32[] scalars, counts float32[Lm, E] or None)).
  """
  mcfg = model.config
  logits, aux = model.apply({"params": params}, batch["inputs"],
                            expert_bias=_bias_arg(model, expert_bias))
  ce, z = losses.cross_entropy(logits, batch["targets"], batch.get("mask"))
  if sc.debug_nan_step > 0:
    ce = ce + jnp.where(step == sc.debug_nan_step, jnp.nan, 0.0)
  loss = ce + sc.z_loss * z
  out = {"ce": ce, "z_loss": z}
  counts = None
  if mcfg.moe is not None:
    r = aux.router
    n_moe, e = r.probs.shape[0], r.probs.shape[-1]
    mask = batch.get("mask")  # padding tokens (none in packed batches) leave the statistics
    mask_T = None if mask is None else mask.reshape(-1)
    if sc.use_lbl:
      probs, index, lbl_mask = r.probs, r.expert_index, mask_T
      if sc.lbl_scope == "sequence":
        b, l = batch["inputs"].shape
        probs = probs.reshape(n_moe, b, l, e)
        index = index.reshape(n_moe, b, l, -1)
        lbl_mask = mask
      lbl = jnp.mean(jax.vmap(lambda p, i: losses.load_balancing(
          p, i, scope=sc.lbl_scope, mask=lbl_mask))(probs, index))
      loss = loss + sc.lbl_coef * lbl
      out["lbl"] = lbl
    if sc.use_simbal:
      kern = model_lib.router_kernels(params, mcfg)
      sim = jnp.mean(losses.simbal(kern, norm=sc.simbal_norm, normalize=sc.simbal_normalize,
                                   reduction=sc.simbal_reduction))
      loss = loss + sc.simbal_coef * sim
      out["simbal"] = sim
    if sc.router_z_coef > 0:
      rz = jnp.mean(jax.vmap(lambda x: losses.router_z_loss(x, mask_T))(r.logits))
      loss = loss + sc.router_z_coef * rz
      out["router_z"] = rz
    counts = aux.counts.astype(jnp.float32)
    out["dropped"] = jnp.mean(aux.dropped)
  out["loss"] = loss
  return loss, (out, counts)


def train_step(state, batch, *, model, tx, sc, schedule=None):
  """One optimizer step: (state, batch) -> (state, metrics). Pure; jit it once.

  Args:
    state: TrainState.
    batch: dict of int32[B, L] (B = global batch, split into sc.grad_accum micro-batches).
  Returns:
    (new TrainState, flat dict of float32[] metrics with 'train/' and 'moe/' namespaces).
  """
  step = state.step + 1
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  kw = dict(model=model, sc=sc)
  if sc.grad_accum == 1:
    (_, (out, counts)), grads = grad_fn(state.params, batch, state.expert_bias, step, **kw)
  else:
    a = sc.grad_accum
    micro = jax.tree.map(lambda x: x.reshape(a, x.shape[0] // a, *x.shape[1:]), batch)

    def body(carry, mb):
      (_, (o, c)), g = grad_fn(state.params, mb, state.expert_bias, step, **kw)
      return jax.tree.map(jnp.add, carry, (g, o, c)), None

    (_, (o0, c0)), g0 = jax.eval_shape(
        lambda: grad_fn(state.params, jax.tree.map(lambda x: x[0], micro), state.expert_bias,
                        step, **kw))
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (g0, o0, c0))
    (grads, out, counts), _ = jax.lax.scan(body, zeros, micro)
    grads = jax.tree.map(lambda g: g / a, grads)
    out = jax.tree.map(lambda v: v / a, out)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  bias = state.expert_bias
  if sc.use_loss_free and counts is not None:
    bias = routing.loss_free_update(bias, counts, sc.lf_rate)
  metrics = {f"train/{k}": v for k, v in out.items() if k != "dropped"}
  metrics["train/grad_norm"] = optax.tree.norm(grads)
  metrics["train/param_norm"] = optax.tree.norm(params)
  if schedule is not None:
    metrics["train/lr"] = schedule(state.step)
  if counts is not None:
    load = counts / jnp.maximum(jnp.sum(counts, axis=-1, keepdims=True), 1.0)
    metrics["moe/maxvio"] = jnp.mean(jax.vmap(metrics_lib.max_vio)(load))
    metrics["moe/dropped"] = out["dropped"]
    if sc.use_loss_free:
      metrics["moe/bias_absmax"] = jnp.max(jnp.abs(bias))
  new_state = state.replace(step=step, params=params, opt_state=opt_state, expert_bias=bias)
  return new_state, metrics


def eval_step(params, expert_bias, batch, *, model, num_domains=0):
  """Additive evaluation statistics of one batch (the host sums them over batches).

  Args:
    params: model parameters. expert_bias: float32[Lm, E].
    batch: dict(inputs, targets int32[B, L], optional domain int32[B]).
    model: model.Transformer.
    num_domains: static int D; when > 0 and the batch carries `domain`, the (domain, expert)
      count table is added (every token has its sequence's domain).
  Returns:
    dict: ce_sum float32[], tokens float32[], and for MoE models counts float32[Lm, E],
    entropy_sum float32[Lm] (token-summed routing entropy), seu_sum float32[Lm]
    (sequence-summed SEU), seqs float32[], and with domains domain_counts float32[Lm, D, E]
    (routed assignments per domain and expert, see metrics.domain_expert_counts).
  """
  logits, aux = model.apply({"params": params}, batch["inputs"],
                            expert_bias=_bias_arg(model, expert_bias))
  b, l = batch["inputs"].shape
  ce, _ = losses.cross_entropy(logits, batch["targets"])
  out = {"ce_sum": ce * (b * l), "tokens": jnp.float32(b * l), "seqs": jnp.float32(b)}
  if aux is not None:
    r = aux.router
    e, k = r.probs.shape[-1], r.expert_index.shape[-1]
    out["counts"] = aux.counts.astype(jnp.float32)
    out["entropy_sum"] = jax.vmap(metrics_lib.routing_entropy)(r.probs) * (b * l)
    out["seu_sum"] = jax.vmap(lambda i: metrics_lib.seu(i.reshape(b, l, k), e))(
        r.expert_index) * b
    if num_domains > 0 and "domain" in batch:
      domain_T = jnp.repeat(batch["domain"].astype(jnp.int32), l)  # tokens are sequence-major
      out["domain_counts"] = jax.vmap(
          lambda i: metrics_lib.domain_expert_counts(i, domain_T, e, num_domains))(
              r.expert_index)
  return out


def unbox(tree):
  """Removes flax partitioning boxes."""
  return nn.meta.unbox(tree)
