"""Expert specialisation and diversity metrics for Mixture-of-Experts layers (pure JAX).

Conventions as in `simbal_jax.metrics` (float32 inside, static sizes, eager `ValueError`s);
every public name here is also available as `simbal_jax.metrics.<name>`.

PES (Pairwise Expert Similarity, arXiv 2506.14038): for a token x run *all* E experts,
C(x) = mean over pairs i < j of cos(f_i(x), f_j(x)); PES = mean of C(x) over tokens. 1 means
identical (parallel) experts, 0 mutually orthogonal ones; lower means more diverse experts.

Routing consistency: Spearman correlation between the similarity of two tokens and the overlap
of their chosen experts.

Domain specialisation: with ground-truth domain labels (the synthetic data source), the mutual
information I(expert; domain) of the routing, normalised by H(domain) to [0, 1]. Its additive
statistic is the [D, E] (domain, expert) count table: sum tables over batches, then call
`specialization_from_counts`.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from simbal_jax import _checks

_EPS = 1e-8


class PESEstimate(NamedTuple):
  """Monte-Carlo estimate of PES (see `pes_sampled`).

  mean: float32[], the estimate (mean over sampled tokens of per-token mean pair cosine).
  stderr: float32[], its standard error (tokens are the unit of independence).
  num_tokens: int, tokens sampled.  num_pairs: int, expert pairs per token.
  """
  mean: jax.Array
  stderr: jax.Array
  num_tokens: int
  num_pairs: int


# ------------------------------------------------------------------------------------- PES


def pes(expert_outputs_TxExD, mask_T=None, *, eps=_EPS):
  """Exact Pairwise Expert Similarity, as defined in the SimBal paper.

  For each token t with outputs f_1(x_t), ..., f_E(x_t) of *all* experts,
  C_t = 2 / (E (E - 1)) * sum_{i<j} cos(f_i, f_j); PES = mean of C_t over (valid) tokens.

  No [T, E, E] Gram tensor is formed: with unit vectors u_i = f_i / max(||f_i||, eps) and
  s = sum_i u_i, sum_{i != j} u_i . u_j = ||s||^2 - sum_i ||u_i||^2 (= ||s||^2 - E when no
  output is zero), so each token costs O(E D) and memory stays O(T D) beyond the input. An
  output with norm 0 has u_i = 0 and therefore cosine 0 with everything (outputs with norm
  below `eps` are scaled by 1/eps and contribute proportionally less).

  Args:
    expert_outputs_TxExD: float[T, E, D], every expert's output for every token (E >= 2).
    mask_T: optional bool[T]; masked tokens are left out of the mean.
    eps: float, floor of the norms.

  Returns:
    float32[] in [-1/(E-1), 1]: 1 for identical (parallel) experts, 0 for mutually orthogonal
    outputs, ~0 for independent random experts in high dimension.
  """
  outputs = _checks.check_rank("expert_outputs", expert_outputs_TxExD, 3, "[T, E, D]")
  num_experts = outputs.shape[1]
  if num_experts < 2:
    raise ValueError(f"pes needs at least 2 experts, got E={num_experts}")
  return _pes(outputs, _checks.bool_mask("mask_T", mask_T, outputs.shape[:1]), eps)


@jax.jit
def _pes(outputs, mask, eps):
  num_experts = outputs.shape[1]
  outputs = outputs.astype(jnp.float32)
  norm_TxE = jnp.sqrt(jnp.sum(jnp.square(outputs), axis=-1))
  inv_TxE = 1.0 / jnp.maximum(norm_TxE, eps)
  # Elementwise products and sums (no dot): exact float32 on every backend.
  sum_TxD = jnp.sum(outputs * inv_TxE[..., None], axis=1)
  self_T = jnp.sum(jnp.square(norm_TxE * inv_TxE), axis=-1)
  cross_T = jnp.sum(jnp.square(sum_TxD), axis=-1) - self_T
  return _checks.masked_mean(cross_T / (num_experts * (num_experts - 1)), mask)


def pes_sample_indices(key, num_total_tokens, num_experts, num_tokens, num_pairs):
  """Draws the tokens and expert pairs that `pes_sampled` evaluates.

  Exposed so that callers can run only the experts they need on the sampled tokens (the point
  of a cheaper PES), then feed the outputs to `pes_sampled` or compute the cosines themselves.

  Args:
    key: PRNG key.
    num_total_tokens: static int T, tokens available.
    num_experts: static int E >= 2.
    num_tokens: static int N >= 2; drawn without replacement when N <= T, with replacement
      otherwise.
    num_pairs: static int P in [1, E (E - 1) / 2]; for each token, P distinct unordered expert
      pairs drawn uniformly without replacement (P = E (E - 1) / 2 gives all pairs).

  Returns:
    (token_index int32[N], expert_i int32[N, P], expert_j int32[N, P]) with expert_i < expert_j.
  """
  num_total_tokens = _checks.static_int("num_total_tokens", num_total_tokens, 1)
  num_experts = _checks.static_int("num_experts", num_experts, 2)
  num_tokens = _checks.static_int("num_tokens", num_tokens, 2)
  num_pairs = _checks.static_int("num_pairs", num_pairs, 1)
  total_pairs = num_experts * (num_experts - 1) // 2
  if num_pairs > total_pairs:
    raise ValueError(f"num_pairs={num_pairs} exceeds the {total_pairs} distinct pairs of "
                     f"E={num_experts} experts")
  return _sample_indices(key, num_total_tokens, num_experts, num_tokens, num_pairs)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _sample_indices(key, num_total_tokens, num_experts, num_tokens, num_pairs):
  token_key, pair_key = jax.random.split(key)
  if num_tokens > num_total_tokens:
    token_index = jax.random.randint(token_key, (num_tokens,), 0, num_total_tokens)
  else:  # the first N of a random permutation
    token_index = jax.random.permutation(token_key, num_total_tokens)[:num_tokens]
  # The P largest of i.i.d. uniforms index a uniform random P-subset of the pairs.
  total_pairs = num_experts * (num_experts - 1) // 2
  noise_NxA = jax.random.uniform(pair_key, (num_tokens, total_pairs))
  pair_id_NxP = jax.lax.top_k(noise_NxA, num_pairs)[1]
  first, second = np.triu_indices(num_experts, k=1)
  return (token_index.astype(jnp.int32), jnp.asarray(first, jnp.int32)[pair_id_NxP],
          jnp.asarray(second, jnp.int32)[pair_id_NxP])


def pes_sampled(key, expert_outputs_TxExD, num_tokens, num_pairs, *, eps=_EPS):
  """Monte-Carlo PES: random tokens, random expert pairs per token, with a standard error.

  Draws N = `num_tokens` tokens and, for each, P = `num_pairs` distinct expert pairs (see
  `pes_sample_indices`); m_t = mean cosine over the token's pairs (zero-norm outputs as in
  `pes`). The estimate mean_t m_t is unbiased for `pes` (exact when P is all pairs and N = T).

  Standard error: std(m_t, ddof=1) / sqrt(N). The unit of independence is the token: the
  spread of the per-token means includes both the token-to-token variation of C(x) and the
  pair-sampling noise within a token, so it is the right error for i.i.d. tokens. Tokens of
  one sequence are correlated, so draw from many sequences; sampling without replacement from
  a small pool makes it conservative (no finite-population correction).

  Args:
    key: PRNG key.
    expert_outputs_TxExD: float[T, E, D], every expert's output for every token.
    num_tokens: static int N >= 2.
    num_pairs: static int P in [1, E (E - 1) / 2].
    eps: float, floor of the norms.

  Returns:
    PESEstimate(mean float32[], stderr float32[], num_tokens, num_pairs).
  """
  outputs = _checks.check_rank("expert_outputs", expert_outputs_TxExD, 3, "[T, E, D]")
  total, num_experts, _ = outputs.shape
  indices = pes_sample_indices(key, total, num_experts, num_tokens, num_pairs)
  mean, stderr = _pes_sampled(outputs, *indices, eps)
  return PESEstimate(mean, stderr, num_tokens, num_pairs)


@jax.jit
def _pes_sampled(outputs, token_N, first_NxP, second_NxP, eps):
  picked_NxExD = outputs[token_N].astype(jnp.float32)
  take = jax.vmap(lambda out_ExD, idx_P: out_ExD[idx_P])
  a_NxPxD, b_NxPxD = take(picked_NxExD, first_NxP), take(picked_NxExD, second_NxP)
  norm = lambda v: jnp.maximum(jnp.sqrt(jnp.sum(jnp.square(v), axis=-1)), eps)
  cos_NxP = jnp.sum(a_NxPxD * b_NxPxD, axis=-1) / (norm(a_NxPxD) * norm(b_NxPxD))
  per_token_N = jnp.mean(cos_NxP, axis=-1)
  stderr = jnp.std(per_token_N, ddof=1) / np.sqrt(per_token_N.shape[0])
  return jnp.mean(per_token_N), stderr


# ---------------------------------------------------------------------- routing consistency


def spearman(a_N, b_N):
  """Spearman rank correlation of two samples (Pearson correlation of average-tie ranks).

  Args:
    a_N: float[N].
    b_N: float[N], same N >= 2.

  Returns:
    float32[] in [-1, 1]; 0 when either sample is constant (correlation undefined).
  """
  a = _checks.check_rank("a_N", a_N, 1, "[N]").astype(jnp.float32)
  b = _checks.check_rank("b_N", b_N, 1, "[N]").astype(jnp.float32)
  if a.shape != b.shape or a.shape[0] < 2:
    raise ValueError(f"spearman needs two samples of equal size >= 2, got {a.shape}, {b.shape}")
  return _spearman(a, b)


@jax.jit
def _spearman(a, b):
  # Ties get their average 1-based rank (as scipy's rankdata); a NaN makes all ranks NaN (-> 0).
  ra, rb = (jax.scipy.stats.rankdata(v, method="average").astype(jnp.float32) for v in (a, b))
  ra, rb = ra - jnp.mean(ra), rb - jnp.mean(rb)
  denom = jnp.sqrt(jnp.sum(jnp.square(ra)) * jnp.sum(jnp.square(rb)))
  return jnp.where(denom > 0, jnp.sum(ra * rb) / jnp.where(denom > 0, denom, 1.0), 0.0)


def routing_consistency(key, x_TxD, expert_index_TxK, num_pairs, *, eps=_EPS):
  """How well token similarity predicts shared experts (a similarity-preservation score).

  Draws `num_pairs` ordered token pairs (i, j), i != j, uniformly with replacement, and returns
  the Spearman correlation between cos(x_i, x_j) and the Jaccard overlap
  |S_i & S_j| / |S_i | S_j| of their chosen-expert sets S (ties, common in Jaccard, get
  average ranks). Near 1: similar tokens go to the same experts (routing is a function of
  direction); near 0: expert choice ignores the representation.

  Args:
    key: PRNG key.
    x_TxD: float[T, D], the router inputs (T >= 2).
    expert_index_TxK: int[T, K], chosen experts; a row must not repeat an expert (top-k).
    num_pairs: static int N >= 2.
    eps: float, floor of the norms in the cosine.

  Returns:
    float32[], the rank correlation (0 when either quantity is constant over the pairs).
  """
  x = _checks.check_rank("x_TxD", x_TxD, 2, "[T, D]")
  index = _checks.check_index("expert_index", expert_index_TxK, 2, "[T, K]")
  num_pairs = _checks.static_int("num_pairs", num_pairs, 2)
  total = x.shape[0]
  if index.shape[0] != total:
    raise ValueError(f"x_TxD and expert_index_TxK disagree on T: {x.shape} vs {index.shape}")
  if total < 2:
    raise ValueError(f"routing_consistency needs T >= 2 tokens, got {total}")
  return _routing_consistency(key, x, index, num_pairs, eps)


@functools.partial(jax.jit, static_argnums=3)
def _routing_consistency(key, x, index, num_pairs, eps):
  total = x.shape[0]
  first_key, offset_key = jax.random.split(key)
  first_N = jax.random.randint(first_key, (num_pairs,), 0, total)
  second_N = (first_N + jax.random.randint(offset_key, (num_pairs,), 1, total)) % total
  x = x.astype(jnp.float32)
  xa, xb = x[first_N], x[second_N]
  norm = lambda v: jnp.maximum(jnp.sqrt(jnp.sum(jnp.square(v), axis=-1)), eps)
  cos_N = jnp.sum(xa * xb, axis=-1) / (norm(xa) * norm(xb))
  ia, ib = index[first_N], index[second_N]
  inter_N = jnp.sum(ia[:, :, None] == ib[:, None, :], axis=(1, 2)).astype(jnp.float32)
  jaccard_N = inter_N / (2.0 * index.shape[1] - inter_N)
  return _spearman(cos_N, jaccard_N)


# ------------------------------------------------------------------- domain specialisation


class DomainSpecialization(NamedTuple):
  """How much the routed expert says about a token's latent domain (`domain_specialization`).

  With p(d, e) the joint share of routed assignments (each of a token's K assignments weighs
  1/K) and p(d), p(e) its marginals:
  mutual_info: float32[...], I(expert; domain) = H(D) + H(E) - H(D, E), in nats.
  normalized: float32[...], mutual_info / H(D) in [0, 1]: 0 when routing ignores the domain
    (p(e | d) the same for every domain), 1 when the expert determines the domain (every expert
    serves a single domain). 0 when H(D) = 0 (one domain: nothing to predict).
  domain_entropy: float32[...], H(D) in nats (log D for balanced domains).
  expert_entropy: float32[...], H(E) in nats (log E for a balanced load).
  joint_DxE: float32[..., D, E], p(d, e); sums to 1 (all zero when nothing was counted).
  expert_given_domain_DxE: float32[..., D, E], p(e | d), the per-domain expert load; each row
    sums to 1 (rows of domains without tokens are zero).
  """
  mutual_info: jax.Array
  normalized: jax.Array
  domain_entropy: jax.Array
  expert_entropy: jax.Array
  joint_DxE: jax.Array
  expert_given_domain_DxE: jax.Array


def domain_expert_counts(expert_index_TxK, domain_T, num_experts, num_domains, mask_T=None):
  """The additive statistic of `domain_specialization`: a (domain, expert) histogram.

  Sum the tables of several batches (on the host, in float64 for very large evaluations) and
  pass the total to `specialization_from_counts`; that equals `domain_specialization` on all
  the batches' tokens at once.

  Args:
    expert_index_TxK: int[T, K], the chosen experts of each token (values in [0, E)).
    domain_T: int[T], the domain label of each token (values in [0, D)); for per-sequence
      labels int[B] with tokens in sequence-major order use `jnp.repeat(domain_B, L)`.
    num_experts: static int E.
    num_domains: static int D.
    mask_T: optional bool[T]; False tokens are not counted.

  Returns:
    float32[D, E], counts[d, e] = number of routed assignments (token, slot) of valid tokens of
    domain d to expert e. Every valid token contributes K in total, so counts / K is in tokens
    and counts / sum(counts) is p(d, e) with each assignment weighing 1/K. Integers, exact up to
    2^24 per cell. Expert indices outside [0, E) and domains outside [0, D) are not counted.
  """
  num_experts = _checks.static_int("num_experts", num_experts, 1)
  num_domains = _checks.static_int("num_domains", num_domains, 1)
  index = _checks.check_index("expert_index", expert_index_TxK, 2, "[T, K]")
  domain = _checks.check_index("domain_T", domain_T, 1, "[T]")
  if domain.shape[0] != index.shape[0]:
    raise ValueError(f"domain_T and expert_index_TxK disagree on T: {domain.shape} vs "
                     f"{index.shape}")
  mask = _checks.bool_mask("mask_T", mask_T, index.shape[:1])
  return _domain_expert_counts(index, domain, mask, num_experts, num_domains)


@functools.partial(jax.jit, static_argnums=(3, 4))
def _domain_expert_counts(index_TxK, domain_T, mask_T, num_experts, num_domains):
  # Flat cell id d * E + e; masked or out-of-range assignments go to a sentinel cell D * E.
  valid_TxK = (mask_T & (domain_T >= 0) & (domain_T < num_domains))[:, None] & (
      (index_TxK >= 0) & (index_TxK < num_experts))
  cell_TxK = domain_T[:, None].astype(jnp.int32) * num_experts + index_TxK.astype(jnp.int32)
  size = num_domains * num_experts
  cell = jnp.where(valid_TxK, cell_TxK, size).reshape(-1)
  counts = jnp.bincount(cell, length=size + 1)[:size].astype(jnp.float32)
  return counts.reshape(num_domains, num_experts)


def specialization_from_counts(counts_DxE):
  """Mutual information between domain and expert from a (summed) count table.

  Args:
    counts_DxE: float[..., D, E], non-negative (domain, expert) counts or weights, e.g. the sum
      of `domain_expert_counts` over batches; leading axes (a stacked [Lm, D, E]) give one
      result each. Only the proportions matter.

  Returns:
    DomainSpecialization with float32 fields ([...] scalars, [..., D, E] tables). An all-zero
    table gives zeros everywhere.
  """
  counts = _checks.check_min_rank("counts_DxE", counts_DxE, 2, "[..., D, E]")
  return _specialization_from_counts(counts.astype(jnp.float32))


@jax.jit
def _specialization_from_counts(counts):
  total = jnp.sum(counts, axis=(-2, -1), keepdims=True)
  joint = counts / jnp.maximum(total, 1e-30)
  p_d, p_e = jnp.sum(joint, axis=-1), jnp.sum(joint, axis=-2)
  entropy = lambda p, axes: jnp.sum(jax.scipy.special.entr(p), axis=axes)
  h_d, h_e, h_de = entropy(p_d, -1), entropy(p_e, -1), entropy(joint, (-2, -1))
  # H(D) + H(E) - H(D, E) can round a hair outside [0, min(H(D), H(E))]; clamp it there.
  mi = jnp.clip(h_d + h_e - h_de, 0.0, jnp.minimum(h_d, h_e))
  normalized = jnp.where(h_d > 0, mi / jnp.where(h_d > 0, h_d, 1.0), 0.0)
  row = jnp.sum(counts, axis=-1, keepdims=True)
  given_d = jnp.where(row > 0, counts / jnp.where(row > 0, row, 1.0), 0.0)
  return DomainSpecialization(mutual_info=mi, normalized=jnp.clip(normalized, 0.0, 1.0),
                              domain_entropy=h_d, expert_entropy=h_e, joint_DxE=joint,
                              expert_given_domain_DxE=given_d)


def domain_specialization(expert_index_TxK, domain_T, num_experts, num_domains, mask_T=None):
  """Expert specialisation against ground-truth domains: I(expert; domain) of a routing.

  Treats each routed assignment as a draw of (domain of the token, expert), every token's K
  assignments weighing 1/K, and measures how much knowing the expert reduces the uncertainty
  about the domain. Unlike SEU or per-sequence load, it needs domain labels (the synthetic data
  source supplies them) and separates "experts specialise on domains" from "experts specialise
  on something else". Estimated from a finite sample it is biased upwards by about
  (D - 1)(E - 1) / (2 N) nats for N independent draws; tokens of one sequence are not
  independent, so compare against a baseline (e.g. shuffled domain labels) rather than 0.

  Args:
    expert_index_TxK: int[T, K], chosen experts (values in [0, E)).
    domain_T: int[T], domain of each token (values in [0, D)).
    num_experts: static int E.
    num_domains: static int D.
    mask_T: optional bool[T]; masked tokens are ignored.

  Returns:
    DomainSpecialization (scalars float32[], tables float32[D, E]); see its docstring.
  """
  return specialization_from_counts(
      domain_expert_counts(expert_index_TxK, domain_T, num_experts, num_domains, mask_T))
