"""Expert computation of the MoE block: one entry point, `apply`, over the router's assignments.

`apply(x_TxD, assign, wg, wu, wo, cfg)` runs the stacked SwiGLU experts (`wg`, `wu` [E, D, F],
`wo` [E, F, D]) on a `routing.Assignments` (token choice, expert choice or any other router's
(token, expert, gate) rows) and holds the one branch over the dispatch implementations
(`MoEConfig.dispatch`); it returns `(y_TxD, kept_NxM)`:

* "capacity": per-group buffers [G, E, C, D] of static C (`dispatch.dispatch_plan`), batched
  einsums; assignments beyond C are dropped.
* "buckets": "capacity" at the smallest static bucket C that holds the call's largest expert
  load (`jax.lax.switch`): dropless at that bucket's padding.
* "ragged": the assignments sorted by expert (`dispatch.sorted_plan`), grouped matmuls
  (`ragged_dot`: tokamax, megablox or `jax.lax.ragged_dot`); dropless, no padding; under the
  project's mesh local to each device (shard_map, expert parallelism along "expert").

`capacities` is the one place the static buffer capacities are computed (the MoE block, the
memory estimate and the benchmarks use it); `padding` gives their rows per assignment. Rows
move between tokens and buffers by the gather-only dispatch / combine of `dispatch.py`.
"""

import functools
import math

from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name as _checkpoint_name

from simbal_jax import dispatch
from simbal_jax import routing
from simbal_jax import sharding

DISPATCHES = ("capacity", "buckets", "ragged")

# ----------------------------------------------------------------------------------------------
# The entry point and the buffer sizes of each dispatch.


def capacities(cfg, group_tokens, num_experts, top_k):
  """Static per-expert buffer capacities C of one routing group, for `cfg.dispatch`.

  Args:
    cfg: dispatch settings (a `moe.MoEConfig`: dispatch, capacity_factor, capacity_buckets).
    group_tokens: static int T, tokens per routing group.
    num_experts: static int E.
    top_k: static int K, assignments per token (their mean, rounded up, for expert choice).

  Returns:
    tuple of Python ints: "capacity" (C,), `dispatch.capacity(T, E, K, capacity_factor)` (T when
    dropless); "buckets" the ascending `dispatch.capacity_buckets(T, E, K, capacity_buckets)`,
    ending with T; "ragged" () (rows sorted by expert, no per-expert buffer).
  """
  if cfg.dispatch == "ragged":
    return ()
  if cfg.dispatch == "buckets":
    return dispatch.capacity_buckets(group_tokens, num_experts, top_k, cfg.capacity_buckets)
  return (dispatch.capacity(group_tokens, num_experts, top_k, cfg.capacity_factor),)


def padding(cfg, num_experts, top_k, expert_axis=1):
  """Buffer rows per routed assignment, independent of T (for memory estimates).

  "capacity": min(capacity_factor, E / K) (E / K when dropless: C = T); "buckets": the smallest
  bucket, min(min(capacity_buckets), E / K) (a skewed step runs at a larger one); "ragged": 1,
  on an expert axis of size X > 1 the dropless worst case X, or min(expert_buffer_factor, X)
  (+ 1 with `expert_overflow="fallback"`, its second buffer, when that is below X).
  Router "expert_choice" (`cfg.router`): its exact C-slot buffers hold E * C = T * K * f rows,
  f = capacity_factor when > 0 else 1 (`moe.MoEConfig.expert_capacity`).

  Args:
    cfg: dispatch settings (a `moe.MoEConfig`).
    num_experts: E. top_k: K.
    expert_axis: size of the mesh's "expert" axis.
  """
  if getattr(cfg, "router", "token_choice") == "expert_choice":
    return min(cfg.capacity_factor if cfg.capacity_factor > 0 else 1.0, num_experts / top_k)
  if cfg.dispatch == "ragged":
    if expert_axis == 1 or cfg.expert_buffer_factor <= 0:
      return float(expert_axis)
    bounded = min(cfg.expert_buffer_factor, expert_axis)
    return min(bounded + 1.0, expert_axis) if cfg.expert_overflow == "fallback" else bounded
  factor = min(cfg.capacity_buckets) if cfg.dispatch == "buckets" else cfg.capacity_factor
  if factor is None or factor <= 0:
    return num_experts / top_k
  return min(factor, num_experts / top_k)


def apply(x_TxD, assign, wg, wu, wo, cfg, capacity=None):
  """The routed experts' output: `out[t] = sum of gate[a] * SwiGLU_{expert[a]}(x[t])` over the
  assignments a of token t that `cfg.dispatch` keeps (all but capacity drops).

  Args:
    x_TxD: float[T, D] tokens in the compute dtype.
    assign: routing.Assignments with rows [N, M] (token choice: [T, K]).
    wg, wu: float[E, D, F] and wo: float[E, F, D] expert kernels in the compute dtype.
    cfg: dispatch settings, a `moe.MoEConfig`: dispatch, num_groups (G, dividing T and N),
      capacity_factor, capacity_buckets, ragged_impl, expert_buffer_factor, expert_overflow.
    capacity: static int, or None. Given (a router whose per-expert load is known statically:
      expert choice, C per expert and group), "capacity" and "buckets" run buffers of exactly
      this many slots per expert and group (no padding; nothing dropped when no expert gets
      more); "ragged" ignores it. None: the buffers of `capacities`.

  Returns:
    (float[T, D] combined outputs in the dtype of x, bool[N, M] kept assignments).

  Raises:
    ValueError: T or N not divisible by G.
  """
  tokens, rows, groups = x_TxD.shape[0], assign.expert.shape[0], cfg.num_groups
  if tokens % groups or rows % groups:
    raise ValueError(f"T = {tokens} tokens and N = {rows} assignment rows must be divisible "
                     f"by num_groups={groups}")
  if cfg.dispatch == "ragged":
    return _ragged_experts(x_TxD, assign, wg, wu, wo, impl=cfg.ragged_impl,
                           buffer_factor=cfg.expert_buffer_factor,
                           overflow=cfg.expert_overflow)
  if capacity is not None:
    return _capacity_experts(x_TxD, assign, wg, wu, wo, num_groups=groups, capacity=capacity)
  top_k = -(-assign.expert.size // tokens)  # K of token choice; else the mean, rounded up
  caps = capacities(cfg, tokens // groups, wg.shape[0], top_k)
  if cfg.dispatch == "buckets":
    return _bucket_experts(x_TxD, assign, wg, wu, wo, num_groups=groups, caps=caps)
  return _capacity_experts(x_TxD, assign, wg, wu, wo, num_groups=groups, capacity=caps[0])


# ----------------------------------------------------------------------------------------------
# Expert computation over capacity buffers.


def _capacity_experts(x_TxD, assign, wg, wu, wo, *, num_groups, capacity):
  """Capacity dispatch per routing group: buffers [G, E, C, D], batched SwiGLU einsums.

  Tokens and assignment rows split into G contiguous groups; each group fills its own `[E, C]`
  slots in assignment order (`dispatch.dispatch_plan`) and drops what does not fit. Arguments
  as `apply`, with the static C; returns (float[T, D], bool[N, M] kept).
  """
  n_exp = wg.shape[0]
  tokens, d_model = x_TxD.shape
  groups, cap = num_groups, capacity
  group_tokens = tokens // groups
  assign_G = jax.tree.map(lambda a: a.reshape(groups, -1, a.shape[-1]), assign)
  plan = jax.vmap(lambda a: dispatch.with_tokens(dispatch.dispatch_plan(a.expert, n_exp, cap),
                                                 a.token, group_tokens))(assign_G)
  x_GxTxD = x_TxD.reshape(groups, group_tokens, d_model)
  group_axis = "expert_group" if groups > 1 else None
  buf_GxSxD = jax.vmap(dispatch.to_slots)(x_GxTxD, assign_G, plan)
  buf_GxExCxD = nn.with_logical_constraint(buf_GxSxD.reshape(groups, n_exp, cap, d_model),
                                           (group_axis, "expert", None, "embed"))
  h_gate = jnp.einsum("gecd,edf->gecf", buf_GxExCxD, wg)
  h_up = jnp.einsum("gecd,edf->gecf", buf_GxExCxD, wu)
  h_GxExCxF = nn.with_logical_constraint(jax.nn.silu(h_gate) * h_up,
                                         (group_axis, "expert", None, "mlp"))
  y_GxExCxD = jnp.einsum("gecf,efd->gecd", h_GxExCxF, wo)
  y_GxExCxD = nn.with_logical_constraint(y_GxExCxD, (group_axis, "expert", None, "embed"))
  combine = functools.partial(dispatch.to_tokens, num_tokens=group_tokens)
  y_GxTxD = jax.vmap(combine)(y_GxExCxD.reshape(groups, n_exp * cap, d_model), assign_G, plan)
  return y_GxTxD.reshape(tokens, d_model), plan.kept.reshape(assign.expert.shape)


def _bucket_experts(x_TxD, assign, wg, wu, wo, *, num_groups, caps):
  """Dropless capacity dispatch at the smallest static capacity bucket that fits this call.

  The buckets are `caps` (`capacities`: ascending, the last one T / G, which always fits).
  `jax.lax.switch` picks, from the largest per-expert load over all groups, the smallest bucket
  holding it; its branch is `_capacity_experts` at that static C. Nothing is dropped, so values,
  `kept` (all True) and gradients equal `_capacity_experts` at C = T / G; the cost is the chosen
  bucket's padding instead of E / K times the useful FLOPs. Every branch is compiled, and each
  is rematerialised (`jax.checkpoint`): the backward pass recomputes the chosen branch's forward
  (+1/3 of its FLOPs) instead of storing residuals.
  """
  expert_GxNxM = assign.expert.reshape(num_groups, -1, assign.expert.shape[-1])
  branch = dispatch.bucket_index(dispatch.max_group_load(expert_GxNxM, wg.shape[0]), caps)
  # Rematerialised branches: the switch's residuals are then its operands, common to all
  # branches. Without it, the backward keeps zero-filled copies of every other branch's
  # residuals (the C = T branch's among them), which cost more than recomputing the forward.
  branches = [jax.checkpoint(functools.partial(_capacity_experts, num_groups=num_groups,
                                               capacity=c)) for c in caps]
  return jax.lax.switch(branch, branches, x_TxD, assign, wg, wu, wo)


# ----------------------------------------------------------------------------------------------
# Grouped matmuls (dropless, no padding).

# "auto": by the platform of the devices the step is compiled for (`resolve_ragged_impl`; the
# trainer resolves it from its mesh's devices, so an ahead-of-time compile for TPU on a CPU host
# picks the TPU kernel): CPU "xla"; GPU "tokamax" (its own choice of Pallas kernels: Mosaic GPU
# on Hopper and later, Triton); TPU "megablox" (JAX's Pallas TPU grouped matmul,
# `jax.experimental.pallas.ops.tpu.megablox.gmm`, which compiles ahead of time; tokamax's Mosaic
# TPU kernel asks the host's backend and refuses to trace on a CPU host). "tokamax" =
# implementation None anywhere. "xla" / "triton" / "mosaic": that tokamax implementation (the
# kernels raise NotImplementedError where they do not run, e.g. on CPU). "lax": jax.lax.ragged_dot,
# no tokamax (on GPU and in XLA's TPU cost model a dense E-times-larger computation).
RAGGED_IMPLS = ("auto", "tokamax", "xla", "triton", "mosaic", "megablox", "lax")
_AUTO_IMPL = {"cpu": "xla", "gpu": "tokamax", "cuda": "tokamax", "rocm": "tokamax",
              "tpu": "megablox"}
EXPERT_OVERFLOWS = ("fallback", "drop")  # a bounded expert-axis buffer's excess (_ragged_experts)


def resolve_ragged_impl(impl, backend=None):
  """Maps `MoEConfig.ragged_impl` to the concrete choice: one of RAGGED_IMPLS minus "auto".

  Args:
    impl: one of RAGGED_IMPLS.
    backend: platform of the devices the computation is compiled for ("cpu" | "gpu" | "tpu",
      e.g. `devices[0].platform`), or None for `jax.default_backend()` (the host's).
  """
  if impl not in RAGGED_IMPLS:
    raise ValueError(f"ragged_impl={impl!r}; valid: {RAGGED_IMPLS}")
  if impl != "auto":
    return impl
  return _AUTO_IMPL.get(backend or jax.default_backend(), "tokamax")


def _megablox_dot(lhs_SxD, rhs_ExDxF, group_sizes_E):
  """`megablox.gmm` with the row count padded to its tile (it needs S % tile == 0)."""
  from jax.experimental.pallas.ops.tpu.megablox import gmm  # pylint: disable=g-import-not-at-top
  rows = lhs_SxD.shape[0]
  tile = min(128, -(-rows // 8) * 8)
  lhs = jnp.pad(lhs_SxD, ((0, -(-rows // tile) * tile - rows), (0, 0)))
  sizes = group_sizes_E.astype(jnp.int32)
  return gmm(lhs, rhs_ExDxF, sizes, lhs_SxD.dtype, (tile, 128, 128))[:rows]


def ragged_dot(lhs_SxD, rhs_ExDxF, group_sizes_E, impl="auto"):
  """Grouped matmul: rows of expert e (contiguous, in expert order) times `rhs[e]`.

  Args:
    lhs_SxD: float[S, D] rows sorted by group.
    rhs_ExDxF: float[E, D, F] one matrix per group (same dtype as lhs).
    group_sizes_E: int32[E] rows per group (sum <= S; rows beyond give zeros).
    impl: one of RAGGED_IMPLS (`resolve_ragged_impl`).

  Returns:
    float[S, F] in the dtype of lhs.
  """
  impl = resolve_ragged_impl(impl)
  if impl == "lax":
    return jax.lax.ragged_dot(lhs_SxD, rhs_ExDxF, group_sizes_E)
  if impl == "megablox":
    return _megablox_dot(lhs_SxD, rhs_ExDxF, group_sizes_E)
  try:
    import tokamax  # pylint: disable=g-import-not-at-top  (lazy: ~1 s to import)
  except ImportError as e:
    raise ImportError("moe.dispatch='ragged' runs through tokamax (pip install tokamax; "
                      "Python >= 3.11); set moe.ragged_impl='lax' for jax.lax.ragged_dot") from e
  if not flags.FLAGS.is_parsed():
    # tokamax reads its absl flags at call time and would parse sys.argv itself, which fails
    # under pytest or Jupyter (foreign arguments); use the defaults, as app.run would.
    flags.FLAGS.mark_as_parsed()
  return tokamax.ragged_dot(lhs_SxD, rhs_ExDxF, group_sizes_E,
                            implementation=None if impl == "tokamax" else impl)


_SAVED_ROWS = ("expert_rows", "expert_gate", "expert_up")  # what the overflow's backward keeps


def _ragged_swiglu(x_TxD, assign, wg, wu, wo, expert_offset, impl, num_slots=None):
  """The held experts' part of the MoE output: (float[T, D] with zero rows for tokens whose
  experts are all held elsewhere, bool[N, M] held here but beyond the buffer's `num_slots`
  rows). Experts `[expert_offset, expert_offset + wg.shape[0])` are held."""
  plan, group_sizes_E = dispatch.sorted_plan(assign.expert, wg.shape[0], expert_offset,
                                             num_slots)
  plan = dispatch.with_tokens(plan, assign.token, x_TxD.shape[0])
  buf_SxD = _checkpoint_name(dispatch.to_slots(x_TxD, assign, plan), _SAVED_ROWS[0])
  h_gate = _checkpoint_name(ragged_dot(buf_SxD, wg, group_sizes_E, impl), _SAVED_ROWS[1])
  h_up = _checkpoint_name(ragged_dot(buf_SxD, wu, group_sizes_E, impl), _SAVED_ROWS[2])
  y_SxD = ragged_dot(jax.nn.silu(h_gate) * h_up, wo, group_sizes_E, impl)
  held = jnp.asarray(assign.expert) - expert_offset
  return (dispatch.to_tokens(y_SxD, assign, plan, x_TxD.shape[0]),
          (held >= 0) & (held < wg.shape[0]) & ~plan.kept)


def _sharded_mesh():
  """The context mesh when it is this project's mesh (`sharding.MESH_AXES`) over > 1 device."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1 or not set(sharding.MESH_AXES) <= set(mesh.axis_names):
    return None
  return mesh


_FORCE_NO_VMA_CHECK = False  # tests: the megablox path's unchecked shard_map, on CPU kernels


def _varying(x, axis):
  """`x` cast to vary along the manual `axis` (inside shard_map); unchanged if it already does."""
  aval = jax.typeof(x)
  varying = aval.vma if hasattr(aval, "vma") else aval.mat.varying  # renamed in jax 0.10
  if axis in varying:
    return x
  if hasattr(jax.lax, "pcast"):
    return jax.lax.pcast(x, axis, to="varying")
  return jax.lax.pvary(x, axis)  # jax < 0.10


def _ragged_experts(x_TxD, assign, wg, wu, wo, *, impl="auto", buffer_factor=0.0,
                    overflow="fallback"):
  """Dropless dispatch: the assignments sorted by expert, grouped SwiGLU matmuls.

  Without a mesh (or on one device) one grouped matmul over all N * M assignment rows. Under this
  project's mesh (`sharding.mesh_rules`) the computation is local to each device
  (`jax.shard_map`), so nothing in it scales with the global batch:

  * each device takes its own tokens (the batch axis is split over data x fsdp x expert) and
    all-gathers those of its expert group (the devices along "expert") with gates and choices;
  * it all-gathers its experts' kernels over "fsdp" ([E / expert, D, F / model]: the FSDP
    gather of one layer, whose transpose reduce-scatters the gradients);
  * it sorts the group's assignments to its own experts (`dispatch.sorted_plan` with an expert
    offset) and runs the grouped matmuls on them;
  * the partial outputs are summed back: reduce-scatter along "expert" (each device gets its
    own tokens) and all-reduce along "model" (the F / model slices).

  The buffer: with `buffer_factor` <= 0 every assignment of the expert group (expert x local
  tokens x K rows), the worst case where all pick this device's experts: the kernels touch
  only the filled rows, but memory and the kernels' static cost estimate are that worst case.
  `buffer_factor` f > 0 bounds it at f x the device's mean load (local tokens x K rows); the
  rest is dropped there. `overflow="drop"` leaves it out (`kept` False, `MoEAux.dropped`).
  `overflow="fallback"` (dropless) computes it where its tokens are: when a device of the group
  got more than its buffer (all of them see the same gathered choices, so all agree), a
  `lax.cond` all-gathers the layer's expert kernels along "expert" and runs each device's
  dropped assignments (a buffer of local tokens x K rows) through them, moving weights instead
  of tokens; its backward gathers them again rather than keeping them. The cost estimate
  counts both buffers (f + 1 x the mean load; where that reaches expert x, the worst-case
  buffer runs instead); memory, the bounded buffer plus one layer's gathered kernels.

  Under a mesh the assignments must be token choice (`assign.token` None): rows are the tokens
  sharded along the batch axes.

  Args:
    x_TxD, assign, wg, wu, wo: as `apply`.
    impl: grouped-matmul implementation, one of RAGGED_IMPLS.
    buffer_factor, overflow: as above (<= 0: the worst case; one of EXPERT_OVERFLOWS).

  Returns:
    (float[T, D] combined outputs, bool[N, M] kept assignments: all True when dropless).
  """
  mesh = _sharded_mesh()
  if mesh is None:
    return (_ragged_swiglu(x_TxD, assign, wg, wu, wo, 0, impl)[0],
            jnp.ones(assign.expert.shape, bool))
  if assign.token is not None:
    raise NotImplementedError("dispatch='ragged' under a mesh takes token-major assignments "
                              "(token choice) only")
  P = jax.sharding.PartitionSpec
  tok, w_in, w_out = (P(sharding.BATCH_AXES), P("expert", "fsdp", "model"),
                      P("expert", "model", "fsdp"))
  # Pallas TPU kernels (megablox) declare no varying-axis types, so shard_map cannot check them:
  # without the check, its transpose sums the cotangents of inputs replicated along an axis.
  check_vma = resolve_ragged_impl(impl) != "megablox" and not _FORCE_NO_VMA_CHECK
  local_tokens = x_TxD.shape[0] // math.prod(mesh.shape[a] for a in sharding.BATCH_AXES)
  top_k = assign.expert.shape[1]
  group_assign = local_tokens * mesh.shape["expert"] * top_k
  num_slots = None
  if buffer_factor > 0 and mesh.shape["expert"] > 1:
    num_slots = min(group_assign,
                    -(-int(math.ceil(local_tokens * top_k * buffer_factor)) // 8) * 8)
  fallback = overflow == "fallback" and num_slots is not None
  if fallback and num_slots + local_tokens * top_k >= group_assign:  # the worst case is smaller
    num_slots, fallback = None, False

  def refill(x, gates, index, wg, wu, wo):  # the dropped rows, through all experts' kernels
    wg, wu, wo = (jax.lax.all_gather(w, "expert", axis=0, tiled=True) for w in (wg, wu, wo))
    return _ragged_swiglu(x, routing.Assignments(token=None, expert=index, gate=gates),
                          wg, wu, wo, 0, impl)[0]

  def local(x, gates, index, wg, wu, wo):
    wg, wu = (jax.lax.all_gather(w, "fsdp", axis=1, tiled=True) for w in (wg, wu))
    wo = jax.lax.all_gather(wo, "fsdp", axis=2, tiled=True)
    # The kernels vary along "model" (their F slices), so the dispatch / combine custom VJPs
    # see model-varying cotangents: mark their float inputs varying too, so the transpose of
    # that cast sums the token and gate gradients over "model".
    if check_vma:
      x, gates = (_varying(a, "model") for a in (x, gates))
    group_x, group_gates, group_index = (jax.lax.all_gather(a, "expert", axis=0, tiled=True)
                                         for a in (x, gates, index))
    offset = jax.lax.axis_index("expert") * wg.shape[0]
    y, dropped = _ragged_swiglu(
        group_x, routing.Assignments(token=None, expert=group_index, gate=group_gates),
        wg, wu, wo, offset, impl, num_slots)
    y = jax.lax.psum_scatter(y, "expert", scatter_dimension=0, tiled=True)
    # Each assignment is held on one device of the group: the sum says whether it was dropped.
    dropped = jax.lax.psum_scatter(dropped.astype(jnp.int32), "expert", scatter_dimension=0,
                                   tiled=True) > 0
    if fallback:
      # Overflow, from the group's choices (the same on all its devices: one branch for all).
      # The dropped rows alone go through the gathered kernels (the others get an expert past
      # the last: held nowhere); the backward keeps its rows and gated halves, not the kernels
      # (gathered again; no matmul is recomputed).
      shard = group_index.reshape(-1, 1) // wg.shape[0]
      overflowed = jnp.max(jnp.sum(shard == jnp.arange(mesh.shape["expert"]), 0)) > num_slots
      index = jnp.where(dropped, index, wg.shape[0] * mesh.shape["expert"])
      policy = jax.checkpoint_policies.save_only_these_names(*_SAVED_ROWS)
      y = y + jax.lax.cond(overflowed, jax.checkpoint(refill, policy=policy),
                           lambda x, *_: jnp.zeros_like(x), x, gates, index, wg, wu, wo)
      dropped = jnp.zeros_like(dropped)
    return jax.lax.psum(y, "model"), ~dropped

  return jax.shard_map(local, mesh=mesh, in_specs=(tok, tok, tok, w_in, w_in, w_out),
                       out_specs=(tok, tok), check_vma=check_vma)(x_TxD, assign.gate, assign.expert,
                                                                  wg, wu, wo)
