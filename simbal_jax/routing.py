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
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from simbal_jax import _checks

GATINGS = ("softmax_topk", "topk_softmax", "sigmoid")


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


def route(logits_TxE, top_k, *, gating="softmax_topk", renormalize=False, bias_E=None):
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
  "topk_softmax" and "sigmoid", whose gates already sum to 1.

  Args:
    logits_TxE: float[T, E] router scores (bf16 etc. computed in float32; float64 stays). Rank 2:
      callers flatten batch and length first.
    top_k: static int K, 1 <= K <= E.
    gating: one of `GATINGS`.
    renormalize: bool; "softmax_topk" only: divide the K gates by their sum.
    bias_E: float32[E] Loss-Free selection bias, or None.

  Returns:
    RouterOutput with logits/probs float32[T, E], gates float32[T, K], expert_index int32[T, K].

  Raises:
    ValueError: bad rank, top_k out of range, unknown gating, or bias of the wrong shape.
  """
  _checks.check_name("gating", gating, GATINGS)
  _checks.check_rank("logits_TxE", logits_TxE, 2, "[T, E]")
  num_experts = jnp.shape(logits_TxE)[1]
  top_k = _checks.static_int("top_k", top_k, 1, num_experts)
  if bias_E is not None and jnp.shape(bias_E) != (num_experts,):
    raise ValueError(f"bias_E must have shape ({num_experts},), got {jnp.shape(bias_E)}.")

  logits_TxE = jnp.asarray(logits_TxE)
  logits_TxE = logits_TxE.astype(jnp.promote_types(logits_TxE.dtype, jnp.float32))
  if gating == "sigmoid":
    sig_TxE = jax.nn.sigmoid(logits_TxE)
    probs_TxE = sig_TxE / jnp.sum(sig_TxE, axis=-1, keepdims=True)
    score_TxE = sig_TxE
  else:
    probs_TxE = jax.nn.softmax(logits_TxE, axis=-1)
    score_TxE = probs_TxE if gating == "softmax_topk" else logits_TxE

  select_TxE = jax.lax.stop_gradient(score_TxE)
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
    expert_index_TxK: int[T, K] chosen experts in [0, E).
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


def expert_choice(logits_TxE, capacity):
  """Expert-choice routing (Zhou et al. 2022): every expert picks its C most probable tokens.

  With `p = softmax(logits)` over the experts of each token, expert e takes the tokens
  `token[e] = top_C(p[:, e])` (descending; ties go to the lower token index) with gates
  `gate[e, c] = p[token[e, c], e]`. Every expert gets exactly C tokens, a token 0 to E experts.
  The choice is not differentiated; gradients flow into the gates. Balancing losses that need
  per-expert probabilities use `p` (what `route` reports as `probs`).

  Args:
    logits_TxE: float[T, E] router scores (computed in float32, float64 stays). Rank 2.
    capacity: static int C, 1 <= C <= T, tokens per expert (e.g. `dispatch.capacity(T, E, K,
      factor)` for K assignments per token on average).

  Returns:
    Assignments with N = E rows of M = C: token int32[E, C], expert int32[E, C] (row e all e),
    gate float32[E, C].

  Raises:
    ValueError: bad rank or capacity out of range.
  """
  _checks.check_rank("logits_TxE", logits_TxE, 2, "[T, E]")
  num_tokens, num_experts = jnp.shape(logits_TxE)
  cap = _checks.static_int("capacity", capacity, 1, num_tokens)
  logits_TxE = jnp.asarray(logits_TxE)
  logits_TxE = logits_TxE.astype(jnp.promote_types(logits_TxE.dtype, jnp.float32))
  probs_ExT = jax.nn.softmax(logits_TxE, axis=-1).T
  _, token_ExC = jax.lax.top_k(jax.lax.stop_gradient(probs_ExT), cap)
  token_ExC = token_ExC.astype(jnp.int32)
  expert_ExC = jnp.broadcast_to(jnp.arange(num_experts, dtype=jnp.int32)[:, None],
                                (num_experts, cap))
  return Assignments(token=token_ExC, expert=expert_ExC,
                     gate=jnp.take_along_axis(probs_ExT, token_ExC, axis=-1))
