"""Balancing terms: the one place a balancing loss is registered (pure JAX, imports `losses`).

A *term* is a pure function of ONE MoE layer's routing outputs and router kernel::

    term(layer: LayerInputs, options: Options) -> float32[]

The trainer (`step.loss_fn`) vmaps every configured term over the MoE layers, takes the mean
over layers, multiplies by the term's coefficient once and adds it to the loss; each term's
layer-mean is logged as `train/<name>`. Which terms run, with which coefficients, is the config
string `balance.terms`, e.g. "lbl:0.01", "simbal:0.1", "simbal:0.1+lbl:0.01" ("+" or ","
separate terms; a name without ":coef" takes the term's default coefficient; "" = none).
Loss-Free balancing (aux-loss-free bias) is not a loss and has its own switch,
`balance.loss_free`.

Adding a balancing loss is one pure function and one line::

    def my_term(layer, options):
      return jnp.mean(layer.router.probs.max(-1))  # float32[]
    balance.register("my_term", my_term, default_coef=0.01)

then `--config.balance.terms=my_term:0.01`. Named methods (`configs/base.py:simbal`, the
convergence tool's `--methods`) are aliases for settings of `balance.*`, defined once in
`METHODS` below.

Built-in terms (values for one layer with router kernel R float32[D, E], T tokens):
  lbl:         E * sum_i f_i P_i (Switch / OLMoE; 1.0 for a uniform router), scope from
               `options.lbl_scope` ("sequence": mean over sequences of the per-sequence value;
               "micro": mean over groups of `options.lbl_micro_sequences` consecutive
               sequences of each group's value; "batch": the (micro-)batch; "global": the
               batch with `expert_fraction` of the whole global batch when the trainer
               provides it under gradient accumulation).
  simbal:      ||R^T R - I||_1 (paper), or the squared Frobenius norm (`simbal_norm="fro2"`),
               summed or averaged over the E x E entries (`simbal_reduction`).
  simbal_unit: the same on unit-norm columns (cosine Gram): directions only, no scale.
  colnorm:     sum_e |(R^T R)_ee - 1|: only holds each column's squared norm at 1 (the diagonal
               of SimBal), no angular term - the "scale, not direction" control.
  router_z:    mean over tokens of logsumexp(router logits)^2 (ST-MoE router z-loss).
"""

import dataclasses
from typing import Callable, NamedTuple

import jax

from simbal_jax import losses
from simbal_jax import routing


class LayerInputs(NamedTuple):
  """What a term sees of one MoE layer (T = tokens of the (micro-)batch, flattened B * L).

  Attributes:
    router: routing.RouterOutput with logits/probs float32[T, E], gates float32[T, K],
      expert_index int32[T, K].
    kernel: float32[D, E] the layer's router kernel (scores = x @ kernel).
    mask: float32[T] token weights (0 = padding) or None.
    expert_fraction: float32[E] f of the whole global batch (stop-gradient) when the trainer
      accumulates gradients with lbl_scope="global", else None.
  """
  router: routing.RouterOutput
  kernel: jax.Array
  mask: jax.Array | None
  expert_fraction: jax.Array | None


@dataclasses.dataclass(frozen=True)
class Options:
  """Static options of the built-in terms (hashable; from `cfg.balance`).

  Attributes:
    lbl_scope: one of losses.SCOPES.
    lbl_micro_sequences: int >= 1, sequences per group of the "micro" scope (else unused).
    simbal_norm: one of losses.SIMBAL_NORMS.
    simbal_reduction: one of losses.SIMBAL_REDUCTIONS.
    batch_shape: (B, L) of the batch the tokens come from (set by the trainer per call; the
      "sequence" scope needs it).
  """
  lbl_scope: str = "batch"
  lbl_micro_sequences: int = 1
  simbal_norm: str = "l1"
  simbal_reduction: str = "sum"
  batch_shape: tuple = ()

  def __post_init__(self):
    for field, valid in (("lbl_scope", losses.SCOPES), ("simbal_norm", losses.SIMBAL_NORMS),
                         ("simbal_reduction", losses.SIMBAL_REDUCTIONS)):
      if getattr(self, field) not in valid:
        raise ValueError(f"balance.{field}={getattr(self, field)!r}; valid: {', '.join(valid)}")
    m = self.lbl_micro_sequences
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
      raise ValueError(f"balance.lbl_micro_sequences must be an int >= 1, got {m!r}")


class Term(NamedTuple):
  """A registered term: `fn(LayerInputs, Options) -> float32[]` and its default coefficient."""
  name: str
  fn: Callable
  default_coef: float


TERMS: dict[str, Term] = {}
# Names the trainer logs itself as `train/<name>`, which a term (logged as `train/<term>`) may
# not shadow: step.train_step's scalars, the train loop's `tokens`, telemetry's throughput;
# `layer_*` is the per-layer namespace (train_step's layer_load, layer_maxvio, layer_entropy
# arrays, split by the host into `train/layer_<i>/...`). tests/test_step.py checks the step's.
RESERVED = ("loss", "ce", "z_loss", "dropped", "grad_norm", "param_norm", "lr", "maxvio",
            "bias_absmax", "tokens", "tokens_per_second", "mfu", "expert_wnorm_ratio",
            "expert_gnorm_ratio", "expert_wnorm_ratio_min", "expert_gnorm_ratio_min")
RESERVED_PREFIX = "layer_"


def register(name: str, fn: Callable, default_coef: float) -> Term:
  """Registers `fn` under `name` (replacing an earlier registration) and returns the Term."""
  if not name.isidentifier() or name in RESERVED or name.startswith(RESERVED_PREFIX):
    raise ValueError(f"balancing term name {name!r} must be an identifier, not one of "
                     f"{', '.join(RESERVED)} and not start with {RESERVED_PREFIX!r}")
  TERMS[name] = Term(name, fn, float(default_coef))
  return TERMS[name]


def parse_terms(spec: str) -> tuple[tuple[str, float], ...]:
  """Parses `balance.terms` ("simbal:0.1+lbl:0.01") into ((name, coef), ...), in order.

  Raises:
    ValueError naming `balance.terms`: unknown name (lists the registered ones), a coefficient
    that is not a finite number >= 0, or a name given twice.
  """
  out = []
  for token in str(spec).replace(",", "+").split("+"):
    token = token.strip()
    if not token:
      continue
    name, _, coef = token.partition(":")
    name = name.strip()
    if name not in TERMS:
      raise ValueError(f"balance.terms={spec!r}: unknown term {name!r}; registered: "
                       f"{', '.join(sorted(TERMS))}")
    try:
      value = float(coef) if coef.strip() else TERMS[name].default_coef
    except ValueError:
      raise ValueError(f"balance.terms={spec!r}: coefficient {coef!r} of {name!r} is not a "
                       "number") from None
    if not value >= 0.0 or value == float("inf"):
      raise ValueError(f"balance.terms={spec!r}: coefficient of {name!r} must be a finite "
                       f"number >= 0, got {value}")
    if name in dict(out):
      raise ValueError(f"balance.terms={spec!r}: term {name!r} given twice")
    out.append((name, value))
  return tuple(out)


def format_terms(terms) -> str:
  """Inverse of `parse_terms`: ((name, coef), ...) -> "name:coef+name:coef"."""
  return "+".join(f"{n}:{c:g}" for n, c in terms)


def layer_values(terms, router, kernels, mask_T, options, expert_fraction=None):
  """Per-layer values of each configured term.

  Args:
    terms: ((name, coef), ...) from `parse_terms`.
    router: RouterOutput stacked over MoE layers (leaves [Lm, T, ...]).
    kernels: float32[Lm, D, E] router kernels.
    mask_T: float32[T] or None.
    options: Options (with batch_shape set).
    expert_fraction: float32[Lm, E] or None.
  Returns:
    dict name -> float32[Lm].
  """
  out = {}
  for name, _ in terms:
    fn = TERMS[name].fn
    out[name] = jax.vmap(lambda r, k, f, fn=fn: fn(LayerInputs(r, k, mask_T, f), options))(
        router, kernels, expert_fraction)
  return out


# ----------------------------------------------------------------------------------------------
# Built-in terms.


def lbl(layer: LayerInputs, options: Options):
  """Load-balancing loss of one layer (see losses.load_balancing; uniform router -> 1.0)."""
  r = layer.router
  if options.lbl_scope in ("sequence", "micro"):
    b, l = options.batch_shape
    mask = None if layer.mask is None else layer.mask.reshape(b, l)
    micro = options.lbl_micro_sequences if options.lbl_scope == "micro" else None
    return losses.load_balancing(r.probs.reshape(b, l, -1), r.expert_index.reshape(b, l, -1),
                                 scope=options.lbl_scope, mask=mask, micro_sequences=micro)
  scope = "batch" if layer.expert_fraction is None else options.lbl_scope
  return losses.load_balancing(r.probs, r.expert_index, scope=scope, mask=layer.mask,
                               expert_fraction=layer.expert_fraction)


def simbal(layer: LayerInputs, options: Options):
  """SimBal ||R^T R - I|| of one router kernel (losses.simbal)."""
  return losses.simbal(layer.kernel, norm=options.simbal_norm,
                       reduction=options.simbal_reduction)


def simbal_unit(layer: LayerInputs, options: Options):
  """SimBal on unit-norm columns: penalises directions only (losses.simbal normalize=True)."""
  return losses.simbal(layer.kernel, norm=options.simbal_norm, normalize=True,
                       reduction=options.simbal_reduction)


def colnorm(layer: LayerInputs, options: Options):
  """sum_e |(R^T R)_ee - 1| (losses.column_norm_loss): scale only, no angular term."""
  del options
  return losses.column_norm_loss(layer.kernel)


def router_z(layer: LayerInputs, options: Options):
  """Router z-loss of one layer (losses.router_z_loss)."""
  del options
  return losses.router_z_loss(layer.router.logits, layer.mask)


register("lbl", lbl, default_coef=0.01)
register("simbal", simbal, default_coef=0.1)
register("simbal_unit", simbal_unit, default_coef=0.1)
register("colnorm", colnorm, default_coef=0.1)
register("router_z", router_z, default_coef=1e-3)


# ----------------------------------------------------------------------------------------------
# Named methods: aliases for balance settings (config variants, convergence --methods).

METHODS = {
    "none": dict(terms="", loss_free=False),
    "lbl": dict(terms="lbl", loss_free=False),
    "simbal": dict(terms="simbal", loss_free=False),
    "simbal_unit": dict(terms="simbal_unit", loss_free=False),
    "colnorm": dict(terms="colnorm", loss_free=False),
    "simbal_lbl": dict(terms="simbal+lbl", loss_free=False),
    "loss_free": dict(terms="", loss_free=True),
    "lf_lbl": dict(terms="lbl", loss_free=True),
    "lf_simbal": dict(terms="simbal", loss_free=True),
}


def method_settings(name: str) -> dict:
  """`balance.*` field values of a named method (terms with default coefficients resolved)."""
  if name not in METHODS:
    raise ValueError(f"unknown balancing method {name!r}; valid: {', '.join(METHODS)}")
  s = dict(METHODS[name])
  s["terms"] = format_terms(parse_terms(s["terms"]))
  return s

