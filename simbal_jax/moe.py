"""Feed-forward blocks: dense SwiGLU and the sparse Mixture-of-Experts block (Flax linen).

The MoE block routes each token to K of E SwiGLU experts (`routing.route`) and hands the router's
assignments (`RouterOutput.assignments`: which token goes to which expert, with which gate) to
the one expert computation, `experts.apply`, which dispatches them in one of three ways
(`MoEConfig.dispatch`):

* "capacity" (default): per-expert buffers `[E, C, D]` of static capacity C
  (`dispatch.dispatch_plan`), all experts run as batched einsums (`'ecd,edf->ecf'`). Dropless
  (`capacity_factor <= 0`) means C = T, i.e. E / K times the useful expert FLOPs.
* "buckets": dropless capacity dispatch at a per-call capacity picked from a few static buckets
  (`MoEConfig.capacity_buckets` x the mean load T*K/E, then T) by `jax.lax.switch`: the smallest
  bucket that holds the largest expert load. Same values and gradients as C = T, at the cost of
  that bucket's padding. The dropless choice where no grouped-matmul kernel exists (CPU).
* "ragged": the T * K assignments sorted by expert into exactly T * K rows
  (`dispatch.sorted_plan`), experts run as grouped matmuls (tokamax's or megablox's Pallas
  kernels on GPU and TPU with their own backward passes; on CPU tokamax's XLA fallback, a
  masked dense computation equal to `jax.lax.ragged_dot`); never drops. Under a mesh it runs
  local to each device (shard_map, expert parallelism along "expert"). `MoEConfig.ragged_impl`
  picks the implementation.

All combine the expert outputs weighted by the gates, through the gather-only dispatch /
combine of `dispatch.py` (custom VJPs, no scatter, no one-hot).

The router (`MoEConfig.router`) is token choice (`routing.route`, above), expert choice
(`routing.expert_choice`: every expert takes its C best tokens of each routing group; exact
capacity-C buffers) or Sinkhorn (BASE layers: token choice selecting by a balanced plan in
training, plain top-k at evaluation); all hand `experts.apply` one `routing.Assignments`.

Everything the balancing losses and metrics need is returned per call as one `MoEAux`
(router logits/probs/gates/indices, per-expert counts, dropped fraction); the router kernel
float32[D, E] is the parameter `router` of the block (see `model.router_kernels`).
"""

import dataclasses
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from simbal_jax import dispatch
from simbal_jax import experts
from simbal_jax import init as init_lib
from simbal_jax import routing
from simbal_jax import sharding

DISPATCHES = experts.DISPATCHES


@dataclasses.dataclass(frozen=True)
class MoEConfig:
  """Sparse FFN settings (validated on construction).

  Attributes:
    num_experts: E >= 1 routed experts.
    top_k: K experts per token, 1 <= K <= E.
    d_ff: hidden width F of each SwiGLU expert.
    gating: one of `routing.GATINGS`.
    renormalize: renormalise the K gates to sum 1 (softmax_topk only).
    capacity_factor: C = ceil(T*K/E * factor) slots per expert per group; <= 0 means no drops
      (C = T, every expert can take every token of its group). Used by dispatch="capacity" only,
      and by router "expert_choice" (its C, factor 1 when <= 0: `expert_capacity`).
    capacity_buckets: capacity factors of the static buckets of dispatch="buckets" (each gives
      C = ceil(T*K/E * factor) per group, capped at T; T itself is always the last bucket).
    shared_expert_d_ff: hidden width of an always-on dense SwiGLU beside the experts (0: none).
    router_init: "orthogonal" (orthonormal columns, as the paper) or "normal"
      (N(0, scale^2 / D): expected column norm `router_init_scale`, like the orthogonal init).
    router_init_scale: column norm of the initial router.
    num_groups: tokens are split into this many contiguous routing groups, each with its own
      capacity and dispatch (1 = all tokens of the batch together). Under sharding set it to a
      multiple of the number of batch shards (mesh data * expert) so dispatch stays local.
      Must be 1 with dispatch="ragged" (ragged_dot cannot be batched over groups without a
      copy of the expert weights per group; without drops groups would not change the output).
    dispatch: "capacity" (buffers [E, C, D], batched einsums, drops beyond C), "buckets"
      (dropless: the same buffers at the smallest of the static `capacity_buckets` that holds the
      call's largest per-expert load over all groups, chosen by `jax.lax.switch`; values and
      gradients equal capacity_factor <= 0, the cost is the bucket's padding instead of E / K;
      every bucket is compiled; use it on CPU) or "ragged" (dropless: T * K rows sorted by
      expert, grouped matmuls `tokamax.ragged_dot`, see `ragged_impl`). "buckets" and
      "ragged" ignore `capacity_factor`.
    ragged_impl: grouped matmuls of dispatch="ragged", one of `experts.RAGGED_IMPLS`: "auto"
      (CPU: tokamax "xla", a masked dense computation; GPU: tokamax's own choice of its Pallas
      kernels; TPU: "megablox"; the trainer resolves it for the platform of its mesh's
      devices, this module for the host's), "tokamax" (its choice anywhere), "xla" | "triton" |
      "mosaic" (that tokamax implementation), "megablox" (JAX's Pallas TPU grouped matmul),
      "lax" (`jax.lax.ragged_dot`: on GPU a dense E-times-larger computation).
    expert_buffer_factor: dispatch="ragged" on a mesh with an expert axis > 1: each device's
      buffer holds this factor x its mean load (local tokens x K rows); a call where one device
      gets more does what `expert_overflow` says (default 1.25); <= 0: the worst case, expert x
      local tokens x K rows (`experts.apply`).
    expert_overflow: one of `experts.EXPERT_OVERFLOWS`: "fallback" (dropless: the assignments
      beyond a buffer are computed on their tokens' devices through the layer's expert kernels
      gathered along "expert", in that call only) or "drop" (left out: `MoEAux.dropped`).
    min_gate: inference-time dynamic-K pruning (the paper's Table 6): chosen experts whose gate
      is below this value are left out of the token's output (their gate is set to 0); 0 keeps
      all K. `MoEAux.router` still reports the unpruned gates.
    router_noise: one of `routing.ROUTER_NOISES`, in training only (when the model is applied
      with a "router" RNG stream, as the train step does; evaluation is deterministic):
      "jitter" (Switch Transformer: the router input times Uniform[1 - eps, 1 + eps]),
      "gaussian" (logits + eps * N(0, 1)), "gaussian_learned" (noisy top-k: logits +
      softplus(x @ W_noise) * N(0, 1), parameter `router_noise` [D, E], init 0), "none".
      The noisy logits are what the balancing losses see.
    router_noise_eps: eps of "jitter" and "gaussian".
    router: one of `routing.ROUTERS`:
      "token_choice" (default): each token takes its top-K experts (`routing.route`).
      "expert_choice" (Zhou et al. 2022): in each routing group of T tokens every expert takes
      its C = ceil(T * K / E * f) most probable tokens (f = capacity_factor when > 0, else 1;
      `expert_capacity`), gates the softmax probabilities; the load is exactly even and a token
      gets 0 to E experts (`MoEAux.assigned`). Needs gating "softmax_topk" and dispatch
      "capacity" or "buckets" (both run exact C-slot buffers: no padding, no drops). Causality
      caveat: an expert's choice looks at every token of the group, the later positions of the
      same sequence included, so in a decoder LM a token's routing (and output) depends on
      future tokens; the loss of this forward pass is not a causal LM's. The trainer therefore
      also reports a causal evaluation (`eval/causal_loss`: the same parameters, each token
      routed by token-choice top-K on the same router probabilities, dropless; `causal()`).
      "sinkhorn" (BASE layers, Lewis et al. 2021; S-BASE, Clark et al. 2022): in training
      (with a "router" RNG stream, as router noise) each token takes the top-K experts of the
      balanced plan of `sinkhorn_iters` Sinkhorn iterations on exp(logits) per routing group
      (`routing.sinkhorn_log_plan`, not differentiated), its gates the gating's at those
      experts; at evaluation plain top-k (= token choice), so evaluation is causal.
    sinkhorn_iters: Sinkhorn iterations of router "sinkhorn" (>= 1).
  """
  num_experts: int
  top_k: int
  d_ff: int
  gating: str = "softmax_topk"
  renormalize: bool = False
  capacity_factor: float = 1.25
  capacity_buckets: tuple = (1.25, 1.5, 2.0, 3.0)
  shared_expert_d_ff: int = 0
  router_init: str = "orthogonal"
  router_init_scale: float = 1.0
  num_groups: int = 1
  dispatch: str = "capacity"
  ragged_impl: str = "auto"
  expert_buffer_factor: float = 1.25
  expert_overflow: str = "fallback"
  min_gate: float = 0.0
  router_noise: str = "none"
  router_noise_eps: float = 0.0
  router: str = "token_choice"
  sinkhorn_iters: int = 8

  def __post_init__(self):
    for name in ("num_experts", "top_k", "d_ff", "num_groups"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"MoEConfig.{name} must be an int >= 1, got {value!r}")
    if self.top_k > self.num_experts:
      raise ValueError(f"MoEConfig.top_k={self.top_k} exceeds num_experts={self.num_experts}")
    if self.gating not in routing.GATINGS:
      raise ValueError(f"MoEConfig.gating={self.gating!r}; valid: {routing.GATINGS}")
    if self.router_init not in init_lib.ROUTER_INITS:
      raise ValueError(f"MoEConfig.router_init={self.router_init!r}; valid: {init_lib.ROUTER_INITS}")
    if self.router_noise not in routing.ROUTER_NOISES:
      raise ValueError(f"MoEConfig.router_noise={self.router_noise!r}; valid: "
                       f"{routing.ROUTER_NOISES}")
    if self.router_noise in ("jitter", "gaussian") and not 0.0 < self.router_noise_eps < 1.0:
      raise ValueError(f"MoEConfig.router_noise={self.router_noise!r} needs router_noise_eps "
                       f"in (0, 1), got {self.router_noise_eps}")
    if not 0.0 <= self.min_gate < 1.0:
      raise ValueError(f"MoEConfig.min_gate must be in [0, 1), got {self.min_gate}")
    if self.dispatch not in DISPATCHES:
      raise ValueError(f"MoEConfig.dispatch={self.dispatch!r}; valid: {DISPATCHES}")
    if self.ragged_impl not in experts.RAGGED_IMPLS:
      raise ValueError(f"MoEConfig.ragged_impl={self.ragged_impl!r}; valid: "
                       f"{experts.RAGGED_IMPLS}")
    if self.expert_overflow not in experts.EXPERT_OVERFLOWS:
      raise ValueError(f"MoEConfig.expert_overflow={self.expert_overflow!r}; valid: "
                       f"{experts.EXPERT_OVERFLOWS}")
    if self.dispatch == "ragged" and self.num_groups != 1:
      raise ValueError(f"MoEConfig.dispatch='ragged' needs num_groups=1, got "
                       f"{self.num_groups} (ragged_dot has no batching over groups without "
                       f"copying the expert weights; use dispatch='capacity' for groups)")
    buckets = tuple(float(f) for f in self.capacity_buckets)
    if any(not f > 0 for f in buckets):
      raise ValueError(f"MoEConfig.capacity_buckets must be factors > 0, got {buckets!r}")
    object.__setattr__(self, "capacity_buckets", buckets)  # hashable even from a list
    if not isinstance(self.shared_expert_d_ff, int) or self.shared_expert_d_ff < 0:
      raise ValueError(f"MoEConfig.shared_expert_d_ff must be an int >= 0, "
                       f"got {self.shared_expert_d_ff!r}")
    if self.router not in routing.ROUTERS:
      raise ValueError(f"MoEConfig.router={self.router!r}; valid: {routing.ROUTERS}")
    iters = self.sinkhorn_iters
    if not isinstance(iters, int) or isinstance(iters, bool) or iters < 1:
      raise ValueError(f"MoEConfig.sinkhorn_iters must be an int >= 1, got {iters!r}")
    if self.router == "expert_choice" and self.gating != "softmax_topk":
      raise ValueError(f"MoEConfig.router='expert_choice' needs gating='softmax_topk' (its "
                       f"gates are softmax probabilities), got {self.gating!r}")
    if self.router == "expert_choice" and self.dispatch == "ragged":
      raise ValueError("MoEConfig.router='expert_choice' needs dispatch='capacity' or 'buckets' "
                       "(every expert takes exactly C tokens: C-slot buffers have no padding "
                       "and drop nothing), got 'ragged'")

  def expert_capacity(self, group_tokens):
    """C of router "expert_choice": tokens each expert takes from a group of `group_tokens`.

    `dispatch.capacity(T, E, K, f)` with f = capacity_factor when > 0, else 1: ceil(T*K/E*f)
    clipped to [1, T], so the mean assignments per token is about K * f.
    """
    factor = self.capacity_factor if self.capacity_factor > 0 else 1.0
    return dispatch.capacity(group_tokens, self.num_experts, self.top_k, factor)

  def causal(self):
    """This config routed causally: token choice (the same router, top-K per token), dropless.

    What the causal evaluation of an "expert_choice" model runs (`step.eval_step`); the
    parameters are the same.
    """
    return dataclasses.replace(self, router="token_choice", capacity_factor=0.0)


class MoEAux(NamedTuple):
  """Per-call routing outputs of one MoE block (the model stacks them over MoE layers: [Lm, ...]).

  Attributes:
    router: routing.RouterOutput with fields [T, E] / [T, K] (T = B * L, row-major over B, L).
      Token choice and Sinkhorn: the actual routing. Expert choice: the token-choice top-K of
      the same router probabilities (what the causal evaluation routes by; the LBL's f and
      `router.expert_index` users see this view), the actual assignments being `assigned`.
    counts: float32[E] actual assignments per expert before capacity drops (expert choice:
      C per expert and group, so the load is exactly even).
    dropped: float32[] fraction of the assignments dropped by capacity (0 for "ragged").
    assigned: bool[T, E] the actual assignments per token (`routing.assignment_mask`) when a
      token may have any number of experts (expert choice), else None (they are
      `router.expert_index`). The routing metrics (SEU, churn, domain counts, tokens without
      an expert) read it when it is given.
  """
  router: routing.RouterOutput
  counts: jax.Array
  dropped: jax.Array
  assigned: jax.Array | None = None


# ----------------------------------------------------------------------------------------------
# Modules.


class MLP(nn.Module):
  """Dense SwiGLU FFN: `(silu(x Wg) * (x Wu)) Wo`, no biases.

  Attributes:
    d_ff: hidden width F.
    dtype: compute dtype. param_dtype: storage dtype.
  """
  d_ff: int
  dtype: Any = jnp.bfloat16
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxLxD):
    """Args: x_BxLxD: float[B, L, D]. Returns float[B, L, D] in `dtype`."""
    d_model = x_BxLxD.shape[-1]
    init = init_lib.kernel_init()
    wg = sharding.boxed_param(self, "wi_gate", init, (d_model, self.d_ff), ("embed", "mlp"),
                     self.param_dtype)
    wu = sharding.boxed_param(self, "wi_up", init, (d_model, self.d_ff), ("embed", "mlp"),
                     self.param_dtype)
    wo = sharding.boxed_param(self, "wo", init, (self.d_ff, d_model), ("mlp", "embed"), self.param_dtype)
    x = x_BxLxD.astype(self.dtype)
    h = jax.nn.silu(x @ wg.astype(self.dtype)) * (x @ wu.astype(self.dtype))
    h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
    return h @ wo.astype(self.dtype)


class MoEBlock(nn.Module):
  """Sparse SwiGLU Mixture-of-Experts FFN (router in float32, experts stacked [E, D, F]).

  Parameters: `router` [D, E] (no bias), `wi_gate`, `wi_up` [E, D, F], `wo` [E, F, D], and a
  `shared` MLP when `config.shared_expert_d_ff > 0`.

  Attributes:
    config: MoEConfig.
    dtype: compute dtype of the experts (router, softmax and gates are float32 regardless).
    param_dtype: storage dtype.
  """
  config: MoEConfig
  dtype: Any = jnp.bfloat16
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxLxD, expert_bias_E=None):
    """Routes, dispatches, runs the experts and combines.

    Args:
      x_BxLxD: float[B, L, D] block input (the normalised residual stream after attention).
      expert_bias_E: float32[E] Loss-Free selection bias, or None. Not differentiated.

    Returns:
      (y float[B, L, D] in `dtype`, MoEAux for the B * L tokens).
    """
    cfg = self.config
    if x_BxLxD.ndim != 3:
      raise ValueError(f"x_BxLxD must be rank 3 [B, L, D], got shape {x_BxLxD.shape}")
    batch, length, d_model = x_BxLxD.shape
    n_exp, top_k, d_ff = cfg.num_experts, cfg.top_k, cfg.d_ff
    tokens = batch * length
    if expert_bias_E is not None:
      if expert_bias_E.shape != (n_exp,):
        raise ValueError(f"expert_bias_E must have shape ({n_exp},), got {expert_bias_E.shape}")
      expert_bias_E = jax.lax.stop_gradient(expert_bias_E.astype(jnp.float32))

    router = sharding.boxed_param(self, "router", init_lib.router_init(cfg.router_init,
                                                            cfg.router_init_scale),
                         (d_model, n_exp), ("embed", None), self.param_dtype)
    e_init = init_lib.kernel_init(batch_axis=(0,))
    wg = sharding.boxed_param(self, "wi_gate", e_init, (n_exp, d_model, d_ff), ("expert", "embed", "mlp"),
                     self.param_dtype)
    wu = sharding.boxed_param(self, "wi_up", e_init, (n_exp, d_model, d_ff), ("expert", "embed", "mlp"),
                     self.param_dtype)
    wo = sharding.boxed_param(self, "wo", e_init, (n_exp, d_ff, d_model), ("expert", "mlp", "embed"),
                     self.param_dtype)

    x_BxLxD = nn.with_logical_constraint(x_BxLxD, ("batch", "length", "embed"))
    x_TxD = x_BxLxD.reshape(tokens, d_model)
    hp = jax.lax.Precision.HIGHEST
    x_router = x_TxD.astype(jnp.float32)
    noisy = cfg.router_noise != "none" and self.has_rng("router")  # training only
    if noisy and cfg.router_noise == "jitter":
      x_router = routing.jitter(self.make_rng("router"), x_router, cfg.router_noise_eps)
    logits_TxE = jnp.einsum("td,de->te", x_router, router.astype(jnp.float32), precision=hp)
    if cfg.router_noise == "gaussian_learned":  # the parameter exists in evaluation too
      w_noise = sharding.boxed_param(self, "router_noise", nn.initializers.zeros,
                                     (d_model, n_exp), ("embed", None), self.param_dtype)
      if noisy:
        std = jax.nn.softplus(jnp.einsum("td,de->te", x_router, w_noise.astype(jnp.float32),
                                         precision=hp))
        logits_TxE = routing.gaussian_noise(self.make_rng("router"), logits_TxE, std)
    elif noisy and cfg.router_noise == "gaussian":
      logits_TxE = routing.gaussian_noise(self.make_rng("router"), logits_TxE,
                                          cfg.router_noise_eps)
    select_TxE = None
    if cfg.router != "token_choice" and tokens % cfg.num_groups:
      raise ValueError(f"T = {tokens} tokens must be divisible by num_groups={cfg.num_groups}")
    if cfg.router == "sinkhorn" and self.has_rng("router"):  # training only, as router noise
      select_TxE = jax.vmap(lambda lg: routing.sinkhorn_log_plan(lg, top_k, cfg.sinkhorn_iters))(
          logits_TxE.reshape(cfg.num_groups, -1, n_exp)).reshape(tokens, n_exp)
    router_out = routing.route(logits_TxE, top_k, gating=cfg.gating,
                               renormalize=cfg.renormalize, bias_E=expert_bias_E,
                               select_TxE=select_TxE)

    x_TxD = x_TxD.astype(self.dtype)
    wg, wu, wo = (w.astype(self.dtype) for w in (wg, wu, wo))
    assign, assigned, capacity = router_out.assignments, None, None
    if cfg.router == "expert_choice":
      capacity = cfg.expert_capacity(tokens // cfg.num_groups)
      assign = routing.expert_choice(logits_TxE, capacity, cfg.num_groups)
      assigned = routing.assignment_mask(assign, tokens, n_exp, cfg.num_groups)
    if cfg.min_gate > 0:  # dynamic-K pruning at inference
      assign = assign._replace(gate=jnp.where(assign.gate >= cfg.min_gate, assign.gate, 0.0))
    y_TxD, kept_TxK = experts.apply(x_TxD, assign, wg, wu, wo, cfg, capacity=capacity)
    y_BxLxD = y_TxD.reshape(batch, length, d_model)
    if cfg.shared_expert_d_ff:
      y_BxLxD = y_BxLxD + MLP(cfg.shared_expert_d_ff, self.dtype, self.param_dtype,
                              name="shared")(x_BxLxD)
    y_BxLxD = nn.with_logical_constraint(y_BxLxD, ("batch", "length", "embed"))

    aux = MoEAux(router=router_out,
                 counts=routing.expert_counts(
                     router_out.expert_index if assigned is None else assign.expert, n_exp),
                 dropped=1.0 - jnp.mean(kept_TxK.astype(jnp.float32)), assigned=assigned)
    return y_BxLxD, aux
