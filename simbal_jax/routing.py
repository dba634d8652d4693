"""Routing math for sparse Mixture-of-Experts layers: gates, token / expert choice, Loss-Free bias.

Pure functions of arrays (jax only; no Flax, no optax, no IO). Every function works under `jit`,
`vmap` and `grad`; integer arguments that fix shapes (`top_k`, `num_experts`, `capacity`) are
static Python ints and are validated eagerly with `ValueError` before anything is traced.

Conventions (shape letters as in `simbal_jax/__init__.py`):

* Router scores `logits_TxE = x_TxD @ R_DxE` are float32 (inputs of any float dtype are upcast).
* `RouterOutput.probs` is the per-expert probability P used by balancing losses; every row sums
  to 1. `RouterOutput.gates` are the combine weights of the chosen experts.
* A per-expert Loss-Free bias (Wang et al. 2024, "Auxiliary-Loss-Free Load Balancing") only
  changes *which* experts are chosen; gate values never include it.
* The router's decision, whatever chose it, is one `Assignments`: N rows of M (token, expert,
  gate) assignments. Token choice (`route`, `RouterOutput.assignments`) has N = T rows of M = K,
  row t being token t; expert choice (`expert_choice`) N = E rows of M = C, row e being the C
  tokens expert e picked. The expert computation (`experts.apply`) consumes either; buffer
  slots and the gather-only dispatch / combine are in `dispatch.py`.
* The routers of `ROUTERS` (`MoEConfig.router`): "token_choice" (`route`), "expert_choice"
  (`expert_choice`, per routing group) and "sinkhorn" (BASE layers / S-BASE: `route` selecting
  by the balanced plan of `sinkhorn_log_plan` in training, plain top-k at evaluation).
  `assignment_mask` and `padded_index` give any router's assignments per token ([T, E]), the
  form the routing metrics take when a token may have any number of experts.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from simbal_jax import _checks

GATINGS = ("softmax_topk", "topk_softmax", "sigmoid")
ROUTERS = ("token_choice", "expert_choice", "sinkhorn")


class RouterOutput(NamedTuple):
  """Result of `route` for T tokens and E experts, K of them chosen per token.

  Attributes:
    logits: float32[T, E] raw router scores.
    probs: float32[T, E] per-expert probability used by balancing losses (rows sum to 1):
      softmax(logits) for "softmax_topk" and "topk_softmax"; sigmoid(logits) / sum_E
      sigmoid(logits) for "sigmoid".
    gates: float32[T, K] combine weights of the chosen experts (bias-free).
    expert_index: int32[T, K] chosen experts, ordered by descending selection score.
  """
  logits: jax.Array
  probs: jax.Array
  gates: jax.Array
  expert_index: jax.Array

  @property
  def assignments(self):
    """The token-choice `Assignments` (row t: token t's K experts and gates; token None)."""
    return Assignments(token=None, expert=self.expert_index, gate=self.gates)


class Assignments(NamedTuple):
  """The router's decision: N rows of M assignments, each a token, an expert and a gate.

  The flat assignment index is `a = n * M + m` (row-major); it is also the priority order of
  capacity dispatch (earlier assignments take an expert's slots first). A (token, expert) pair
  appears at most once, so no expert holds more than T assignments.

  * Token choice (`RouterOutput.assignments`): N = T rows of M = K, row t holds token t's K
    experts (distinct), `token` None. Dispatch and combine are then gathers only.
  * Expert choice (`expert_choice`): N = E rows of M = C, row e holds the C tokens expert e
    picked, `expert[e, :] == e`; a token has 0 to E assignments.

  With G routing groups (`experts.apply`) the N rows split into G equal contiguous parts and the
  tokens of part g index the g-th T / G tokens (for token choice this holds by construction).

  Attributes:
    token: int32[N, M] token of each assignment in [0, T), or None: row n is token n (N = T).
    expert: int32[N, M] expert of each assignment in [0, E).
    gate: float32[N, M] combine weight (0 contributes nothing; gradients flow into it).
  """
  token: jax.Array | None
  expert: jax.Array
  gate: jax.Array


# ----------------------------------------------------------------------------------------------
# Gating.



ROUTER_NOISES = ("none", "jitter", "gaussian", "gaussian_learned")


def jitter(key, x_TxD, eps):
  """Switch Transformer's multiplicative input jitter of the router input.

  Args:
    key: PRNG key. x_TxD: float[T, D] router input. eps: float in [0, 1).
  Returns:
    float32[T, D] `x * u` with u ~ Uniform[1 - eps, 1 + eps] i.i.d. per entry (mean 1,
    variance eps^2 / 3).
  """
  u = jax.random.uniform(key, x_TxD.shape, jnp.float32, 1.0 - eps, 1.0 + eps)
  return x_TxD.astype(jnp.float32) * u


def gaussian_noise(key, logits_TxE, std):
  """Noisy top-k gating (Shazeer et al. 2017): `logits + std * N(0, 1)` i.i.d. per entry.

  Args:
    key: PRNG key. logits_TxE: float32[T, E]. std: float (fixed) or float32[T, E] (learned,
      `softplus(x @ W_noise)`).
  Returns:
    float32[T, E].
  """
  return logits_TxE + std * jax.random.normal(key, logits_TxE.shape, jnp.float32)


def route(logits_TxE, top_k, *, gating="softmax_topk", renormalize=False, bias_E=None,
          select_TxE=None):
  """Turns router scores into per-expert probabilities, chosen experts and their gates.

  With `s` the selection score and `b` the (optional) Loss-Free bias, the chosen experts are
  `expert_index[t] = top_k(s[t] + b)` (descending; ties go to the lower expert index), and:

  * "softmax_topk" (paper, OLMoE, Switch): `p = softmax(logits)`, `s = p`,
    `gates[t, k] = p[t, expert_index[t, k]]`; the K gates sum to `sum of the K largest p <= 1`.
    With `renormalize=True` they are divided by their sum (sum 1).
  * "topk_softmax" (Mixtral): `s = logits`, `gates[t] = softmax(logits[t, expert_index[t]])`
    over the K chosen *unbiased* logits (sum 1). `probs = softmax(logits)` over all E.
  * "sigmoid" (DeepSeek-V3): `sig = sigmoid(logits)`, `s = sig`,
    `gates[t] = sig[t, chosen] / sum(sig[t, chosen])` (sum 1);
    `probs = sig / sum_E sig` (rows sum to 1, for balancing losses).

  The bias enters only the choice: gates are the unbiased quantities above evaluated at the
  chosen experts, so gradients never flow into the bias. `renormalize` has no effect for
  "topk_softmax" and "sigmoid", whose gates already sum to 1. `select_TxE` replaces `s` in the
  choice only (the Sinkhorn router's balanced plan); gates and probs stay the gating's.

  Args:
    logits_TxE: float[T, E] router scores (bf16 etc. computed in float32; float64 stays). Rank 2:
      callers flatten batch and length first.
    top_k: static int K, 1 <= K <= E.
    gating: one of `GATINGS`.
    renormalize: bool; "softmax_topk" only: divide the K gates by their sum.
    bias_E: float32[E] Loss-Free selection bias, or None.
    select_TxE: float[T, E] selection score used instead of `s` (not differentiated), or None.

  Returns:
    RouterOutput with logits/probs float32[T, E], gates float32[T, K], expert_index int32[T, K].

  Raises:
    ValueError: bad rank, top_k out of range, unknown gating, or bias / selection score of the
      wrong shape.
  """
  _checks.check_name("gating", gating, GATINGS)
  _checks.check_rank("logits_TxE", logits_TxE, 2, "[T, E]")
  num_experts = jnp.shape(logits_TxE)[1]
  top_k = _checks.static_int("top_k", top_k, 1, num_experts)
  if bias_E is not None and jnp.shape(bias_E) != (num_experts,):
    raise ValueError(f"bias_E must have shape ({num_experts},), got {jnp.shape(bias_E)}.")
  if select_TxE is not None and jnp.shape(select_TxE) != jnp.shape(logits_TxE):
    raise ValueError(f"select_TxE must have shape {jnp.shape(logits_TxE)}, got "
                     f"{jnp.shape(select_TxE)}.")

  logits_TxE = jnp.asarray(logits_TxE)
  logits_TxE = logits_TxE.astype(jnp.promote_types(logits_TxE.dtype, jnp.float32))
  if gating == "sigmoid":
    sig_TxE = jax.nn.sigmoid(logits_TxE)
    probs_TxE = sig_TxE / jnp.sum(sig_TxE, axis=-1, keepdims=True)
    score_TxE = sig_TxE
  else:
    probs_TxE = jax.nn.softmax(logits_TxE, axis=-1)
    score_TxE = probs_TxE if gating == "softmax_topk" else logits_TxE

  select_TxE = jax.lax.stop_gradient(score_TxE if select_TxE is None else select_TxE)
  if bias_E is not None:
    select_TxE = select_TxE + jax.lax.stop_gradient(jnp.asarray(bias_E, jnp.float32))
  _, expert_index_TxK = jax.lax.top_k(select_TxE, top_k)
  expert_index_TxK = expert_index_TxK.astype(jnp.int32)

  chosen_TxK = jnp.take_along_axis(score_TxE, expert_index_TxK, axis=-1)
  if gating == "softmax_topk":
    gates_TxK = chosen_TxK
    if renormalize:
      gates_TxK = gates_TxK / jnp.sum(gates_TxK, axis=-1, keepdims=True)
  elif gating == "topk_softmax":
    gates_TxK = jax.nn.softmax(chosen_TxK, axis=-1)
  else:
    gates_TxK = chosen_TxK / jnp.sum(chosen_TxK, axis=-1, keepdims=True)
  return RouterOutput(logits=logits_TxE, probs=probs_TxE, gates=gates_TxK,
                      expert_index=expert_index_TxK)


def expert_counts(expert_index_TxK, num_experts, mask_T=None):
  """Number of assignments per expert (before capacity drops).

  `counts[e] = sum_t mask[t] * #{k : expert_index[t, k] == e}`; without a mask
  `sum_e counts[e] = T * K`.

  Args:
    expert_index_TxK: int[T, K] chosen experts in [0, E); entries equal to E (the sentinel of
      `padded_index`) are not counted. Any assignment rows [N, M] work (mask then [N]).
    num_experts: static int E >= 1.
    mask_T: bool/float[T] token weights (1 = real token, 0 = padding), or None.

  Returns:
    float32[E] assignment counts.
  """
  _checks.check_rank("expert_index_TxK", expert_index_TxK, 2, "[T, K]")
  num_experts = _checks.static_int("num_experts", num_experts, 1)
  num_tokens, top_k = jnp.shape(expert_index_TxK)
  _checks.check_mask("mask_T", mask_T, (num_tokens,))
  if mask_T is None:
    weight_TxK = jnp.ones((num_tokens, top_k), jnp.float32)
  else:
    weight_TxK = jnp.broadcast_to(jnp.asarray(mask_T, jnp.float32)[:, None], (num_tokens, top_k))
  return jnp.zeros((num_experts,), jnp.float32).at[expert_index_TxK.reshape(-1)].add(
      weight_TxK.reshape(-1), mode="drop")


def loss_free_update(bias, counts, rate):
  """One Loss-Free balancing step: `b <- b + rate * sign(mean(counts) - counts)`.

  Under-loaded experts (count below the mean) get their bias raised by `rate`, over-loaded ones
  lowered; experts exactly at the mean are unchanged. The mean is over the last (expert) axis,
  so stacked per-layer state `[Lm, E]` is updated layer by layer. `counts` must cover the whole
  global batch (sum over data-parallel shards and accumulation steps): that is the caller's job.
  The update is not differentiated; apply it after the optimizer step.

  Args:
    bias: float32[..., E] current bias.
    counts: float[..., E] assignments per expert (same shape as `bias`).
    rate: float scalar update rate gamma (e.g. 1e-3).

  Returns:
    Array with the shape and dtype of `bias`.
  """
  if jnp.shape(bias) != jnp.shape(counts) or jnp.ndim(bias) < 1:
    raise ValueError(f"bias and counts must have the same shape [..., E], got "
                     f"{jnp.shape(bias)} and {jnp.shape(counts)}.")
  if jnp.ndim(rate) != 0:
    raise ValueError(f"rate must be a scalar, got shape {jnp.shape(rate)}.")
  counts = jnp.asarray(counts, jnp.float32)
  step = jnp.sign(jnp.mean(counts, axis=-1, keepdims=True) - counts)
  bias = jnp.asarray(bias)
  return (bias + rate * step).astype(bias.dtype)


def expert_choice(logits_TxE, capacity, num_groups=1):
  """Expert-choice routing (Zhou et al. 2022): every expert picks its C most probable tokens.

  With `p = softmax(logits)` over the experts of each token, expert e takes the tokens
  `token[e] = top_C(p[:, e])` (descending; ties go to the lower token index) with gates
  `gate[e, c] = p[token[e, c], e]`. Every expert gets exactly C tokens, a token 0 to E experts.
  The choice is not differentiated; gradients flow into the gates. Balancing losses that need
  per-expert probabilities use `p` (what `route` reports as `probs`).

  With G routing groups the T tokens split into G contiguous groups of T / G and every expert
  picks C tokens of each group: rows [G * E, C], the rows of group g (g * E + e) holding token
  indices local to the group (in [0, T / G)), the layout `experts.apply` takes.

  The choice looks at every token of the group, later positions of a sequence included: in a
  decoder it is not causal (see `moe.MoEConfig.router`).

  Args:
    logits_TxE: float[T, E] router scores (computed in float32, float64 stays). Rank 2.
    capacity: static int C, 1 <= C <= T / G, tokens per expert and group (e.g.
      `dispatch.capacity(T / G, E, K, factor)` for K assignments per token on average).
    num_groups: static int G >= 1 dividing T.

  Returns:
    Assignments with N = G * E rows of M = C: token int32[G * E, C] (local to its group),
    expert int32[G * E, C] (row g * E + e all e), gate float32[G * E, C].

  Raises:
    ValueError: bad rank, G not dividing T, or capacity out of range.
  """
  _checks.check_rank("logits_TxE", logits_TxE, 2, "[T, E]")
  num_tokens, num_experts = jnp.shape(logits_TxE)
  groups = _checks.static_int("num_groups", num_groups, 1)
  if num_tokens % groups:
    raise ValueError(f"num_groups={groups} must divide the T = {num_tokens} tokens.")
  cap = _checks.static_int("capacity", capacity, 1, num_tokens // groups)
  logits_TxE = jnp.asarray(logits_TxE)
  logits_TxE = logits_TxE.astype(jnp.promote_types(logits_TxE.dtype, jnp.float32))
  probs_GxExT = jax.nn.softmax(logits_TxE, axis=-1).reshape(groups, -1, num_experts).transpose(
      0, 2, 1)
  _, token_GxExC = jax.lax.top_k(jax.lax.stop_gradient(probs_GxExT), cap)
  token_GxExC = token_GxExC.astype(jnp.int32)
  gate_GxExC = jnp.take_along_axis(probs_GxExT, token_GxExC, axis=-1)
  expert_NxC = jnp.broadcast_to(jnp.arange(num_experts, dtype=jnp.int32)[None, :, None],
                                (groups, num_experts, cap)).reshape(-1, cap)
  return Assignments(token=token_GxExC.reshape(-1, cap), expert=expert_NxC,
                     gate=gate_GxExC.reshape(-1, cap))


def sinkhorn_log_plan(logits_TxE, top_k, num_iters):
  """Log of the balanced assignment plan of Sinkhorn's iteration (BASE layers, S-BASE).

  The plan is `P = diag(u) exp(logits) diag(v)` with every token's total mass K (its K
  assignments) and every expert's total mass T * K / E (an even share): starting from v = 1,
  each of the `num_iters` iterations scales the rows to mass K (`u = K / (exp(logits) v)`),
  then the columns to mass T * K / E (`v = (T K / E) / (exp(logits)^T u)`), so after the last
  one the column sums are exact and the row sums converge to K. Computed in the log domain
  (logsumexp), so any logits are safe. Not differentiated (the plan only chooses experts).

  Args:
    logits_TxE: float[T, E] router scores of one routing group (computed in float32). Rank 2.
    top_k: static int K, 1 <= K <= E.
    num_iters: static int >= 1.

  Returns:
    float32[T, E] `log P` (float64 for float64 logits).
  """
  _checks.check_rank("logits_TxE", logits_TxE, 2, "[T, E]")
  num_tokens, num_experts = jnp.shape(logits_TxE)
  top_k = _checks.static_int("top_k", top_k, 1, num_experts)
  num_iters = _checks.static_int("num_iters", num_iters, 1)
  logits_TxE = jnp.asarray(logits_TxE)
  logits_TxE = jax.lax.stop_gradient(
      logits_TxE.astype(jnp.promote_types(logits_TxE.dtype, jnp.float32)))
  log_row = jnp.log(jnp.asarray(top_k, logits_TxE.dtype))
  log_col = jnp.log(jnp.asarray(num_tokens * top_k / num_experts, logits_TxE.dtype))

  def body(_, carry):
    _, log_v_E = carry
    log_u_T = log_row - jax.nn.logsumexp(logits_TxE + log_v_E[None, :], axis=1)
    log_v_E = log_col - jax.nn.logsumexp(logits_TxE + log_u_T[:, None], axis=0)
    return log_u_T, log_v_E

  init = (jnp.zeros((num_tokens,), logits_TxE.dtype), jnp.zeros((num_experts,), logits_TxE.dtype))
  log_u_T, log_v_E = jax.lax.fori_loop(0, num_iters, body, init)
  return logits_TxE + log_u_T[:, None] + log_v_E[None, :]


def assignment_mask(assign, num_tokens, num_experts, num_groups=1):
  """Which experts each token was assigned to, as a dense mask.

  Args:
    assign: Assignments (rows [N, M]; token None: row t is token t). With G groups the rows
      split into G contiguous parts whose tokens are local to their group (`expert_choice`).
    num_tokens: static int T. num_experts: static int E.
    num_groups: static int G dividing T and N.

  Returns:
    bool[T, E]: `mask[t, e]` iff some assignment sends token t to expert e (gates and capacity
    drops aside).
  """
  rows, cols = jnp.shape(assign.expert)
  if assign.token is None:
    token_NxM = jnp.broadcast_to(jnp.arange(rows, dtype=jnp.int32)[:, None], (rows, cols))
  else:
    offset_N = (jnp.arange(rows, dtype=jnp.int32) // (rows // num_groups)) * (
        num_tokens // num_groups)
    token_NxM = jnp.asarray(assign.token, jnp.int32) + offset_N[:, None]
  return jnp.zeros((num_tokens, num_experts), bool).at[
      token_NxM.reshape(-1), jnp.asarray(assign.expert).reshape(-1)].set(True, mode="drop")


def padded_index(assigned_TxE):
  """A dense assignment mask as per-token expert lists padded with the sentinel E.

  The form `expert_counts`, `metrics.seu` and `specialization.domain_expert_counts` take for
  tokens with any number of experts: they skip the entries equal to E.

  Args:
    assigned_TxE: bool[..., T, E] (`assignment_mask`).

  Returns:
    int32[..., T, E]: entry [t, e] is e if token t is assigned to expert e, else E.
  """
  num_experts = jnp.shape(assigned_TxE)[-1]
  return jnp.where(assigned_TxE, jnp.arange(num_experts, dtype=jnp.int32), num_experts).astype(
      jnp.int32)
