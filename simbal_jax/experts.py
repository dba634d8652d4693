"""Expert computation of the MoE block: gather-only dispatch / combine and the three paths.

Plain functions of arrays (jax, and tokamax imported lazily for "ragged"); `moe.MoEBlock` calls
them after routing. Every path takes the tokens `x_TxD`, the router's `gates_TxK` and
`index_TxK` and the stacked SwiGLU kernels `wg`, `wu` [E, D, F] and `wo` [E, F, D], and returns
`(y_TxD, kept_TxK)`:

* `capacity_experts`: per-group buffers [G, E, C, D] of static C (`dispatch.dispatch_plan`),
  batched einsums; assignments beyond C are dropped.
* `bucket_experts`: `capacity_experts` at the smallest static bucket C that holds the call's
  largest expert load (`jax.lax.switch`): dropless at that bucket's padding.
* `ragged_experts`: the T * K assignments sorted by expert (`dispatch.sorted_plan`), grouped
  matmuls (`ragged_dot`: tokamax, megablox or `jax.lax.ragged_dot`); dropless, no padding; under
  the project's mesh local to each device (shard_map, expert parallelism along "expert").

Dispatch and combine are the gather-only custom VJPs of `dispatch.py`: no scatter and no one-hot
`[T, E, C]` tensor appears anywhere (the scatters and one-hot einsums of other MoE codes cost
more than the experts).
"""

import functools
import math

from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp

from simbal_jax import dispatch
from simbal_jax import sharding

# ----------------------------------------------------------------------------------------------
# Expert computation over capacity buffers (plain functions of arrays; used by MoEBlock).


def capacity_experts(x_TxD, gates_TxK, index_TxK, wg, wu, wo, *, num_groups, capacity):
  """Capacity dispatch per routing group: buffers [G, E, C, D], batched SwiGLU einsums.

  Tokens are split into G contiguous groups of T / G; each group fills its own `[E, C]` slots
  in token order (`dispatch.dispatch_plan`) and drops what does not fit.

  Args:
    x_TxD: float[T, D] tokens in the compute dtype.
    gates_TxK: float32[T, K] combine weights.
    index_TxK: int32[T, K] chosen experts.
    wg, wu: float[E, D, F] and wo: float[E, F, D] expert kernels in the compute dtype.
    num_groups: static int G dividing T.
    capacity: static int C >= 1, slots per expert per group.

  Returns:
    (float[T, D] combined outputs, bool[T, K] kept assignments).
  """
  n_exp = wg.shape[0]
  tokens, d_model = x_TxD.shape
  top_k = index_TxK.shape[1]
  groups, cap = num_groups, capacity
  group_tokens = tokens // groups
  index_GxTxK = index_TxK.reshape(groups, group_tokens, top_k)
  plan = jax.vmap(lambda idx: dispatch.dispatch_plan(idx, n_exp, cap))(index_GxTxK)
  x_GxTxD = x_TxD.reshape(groups, group_tokens, d_model)
  group_axis = "expert_group" if groups > 1 else None
  buf_GxSxD = jax.vmap(dispatch.dispatch)(x_GxTxD, plan.slot_token, plan.slot)
  buf_GxExCxD = nn.with_logical_constraint(buf_GxSxD.reshape(groups, n_exp, cap, d_model),
                                           (group_axis, "expert", None, "embed"))
  h_gate = jnp.einsum("gecd,edf->gecf", buf_GxExCxD, wg)
  h_up = jnp.einsum("gecd,edf->gecf", buf_GxExCxD, wu)
  h_GxExCxF = nn.with_logical_constraint(jax.nn.silu(h_gate) * h_up,
                                         (group_axis, "expert", None, "mlp"))
  y_GxExCxD = jnp.einsum("gecf,efd->gecd", h_GxExCxF, wo)
  y_GxExCxD = nn.with_logical_constraint(y_GxExCxD, (group_axis, "expert", None, "embed"))
  gates_GxTxK = gates_TxK.reshape(groups, group_tokens, top_k)
  y_GxTxD = jax.vmap(dispatch.combine)(y_GxExCxD.reshape(groups, n_exp * cap, d_model),
                                       gates_GxTxK, plan.slot, plan.slot_assignment)
  return y_GxTxD.reshape(tokens, d_model), plan.kept.reshape(tokens, top_k)


def bucket_experts(x_TxD, gates_TxK, index_TxK, wg, wu, wo, *, num_groups, factors):
  """Dropless capacity dispatch at the smallest static capacity bucket that fits this call.

  The buckets are `dispatch.capacity_buckets(T / G, E, K, factors)` (ascending, the last one
  T / G, which always fits). `jax.lax.switch` picks, from the largest per-expert load over all
  groups, the smallest bucket holding it; its branch is `capacity_experts` at that static C.
  Nothing is dropped, so values, `kept` (all True) and gradients equal `capacity_experts` at
  C = T / G; the cost is the chosen bucket's padding instead of E / K times the useful FLOPs.
  Every branch is compiled, and each is rematerialised (`jax.checkpoint`): the backward pass
  recomputes the chosen branch's forward (+1/3 of its FLOPs) instead of storing residuals.

  Args:
    x_TxD, gates_TxK, index_TxK, wg, wu, wo, num_groups: as `capacity_experts`.
    factors: static tuple of floats > 0, capacity factors of the buckets below T / G.

  Returns:
    (float[T, D] combined outputs, bool[T, K] kept assignments, all True).
  """
  n_exp = wg.shape[0]
  tokens, top_k = index_TxK.shape
  caps = dispatch.capacity_buckets(tokens // num_groups, n_exp, top_k, factors)
  index_GxTxK = index_TxK.reshape(num_groups, tokens // num_groups, top_k)
  branch = dispatch.bucket_index(dispatch.max_group_load(index_GxTxK, n_exp), caps)
  # Rematerialised branches: the switch's residuals are then its operands, common to all
  # branches. Without it, the backward keeps zero-filled copies of every other branch's
  # residuals (the C = T branch's among them), which cost more than recomputing the forward.
  branches = [jax.checkpoint(functools.partial(capacity_experts, num_groups=num_groups,
                                               capacity=c)) for c in caps]
  return jax.lax.switch(branch, branches, x_TxD, gates_TxK, index_TxK, wg, wu, wo)


# ----------------------------------------------------------------------------------------------
# Grouped matmuls (dropless, no padding).

# "auto": by the platform of the devices the step is compiled for (`resolve_ragged_impl`; the
# trainer resolves it from its mesh's devices, so an ahead-of-time compile for TPU on a CPU host
# picks the TPU kernel): CPU "xla"; GPU "tokamax" (its own choice of Pallas kernels: Mosaic GPU
# on Hopper and later, Triton); TPU "megablox" (JAX's Pallas TPU grouped matmul,
# `jax.experimental.pallas.ops.tpu.megablox.gmm`, which compiles ahead of time; tokamax's Mosaic
# TPU kernel asks the host's backend and refuses to trace on a CPU host). "tokamax" =
# implementation None anywhere. "xla" / "triton" / "mosaic": that tokamax implementation (the
# kernels raise NotImplementedError where they do not run, e.g. on CPU). "lax":
# jax.lax.ragged_dot, no tokamax (on GPU and in XLA's TPU cost model a dense E-times-larger
# computation).
RAGGED_IMPLS = ("auto", "tokamax", "xla", "triton", "mosaic", "megablox", "lax")
_AUTO_IMPL = {"cpu": "xla", "gpu": "tokamax", "cuda": "tokamax", "rocm": "tokamax",
              "tpu": "megablox"}


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
  padded = -(-rows // tile) * tile
  lhs = jnp.pad(lhs_SxD, ((0, padded - rows), (0, 0))) if padded != rows else lhs_SxD
  out = gmm(lhs, rhs_ExDxF, group_sizes_E.astype(jnp.int32), lhs_SxD.dtype,
            (tile, 128, 128))
  return out[:rows]


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


def _ragged_swiglu(x_TxD, gates_TxK, index_TxK, wg, wu, wo, expert_offset, impl,
                   num_slots=None):
  """The held experts' part of the MoE output: (float[T, D] with zero rows for tokens whose
  experts are all held elsewhere, bool[T, K] held here but beyond the buffer's `num_slots`
  rows). Experts `[expert_offset, expert_offset + wg.shape[0])` are held."""
  plan, group_sizes_E = dispatch.sorted_plan(index_TxK, wg.shape[0], expert_offset, num_slots)
  buf_SxD = dispatch.dispatch(x_TxD, plan.slot_token, plan.slot)
  h_gate = ragged_dot(buf_SxD, wg, group_sizes_E, impl)
  h_up = ragged_dot(buf_SxD, wu, group_sizes_E, impl)
  y_SxD = ragged_dot(jax.nn.silu(h_gate) * h_up, wo, group_sizes_E, impl)
  y_TxD = dispatch.combine(y_SxD, gates_TxK, plan.slot, plan.slot_assignment)
  held = jnp.asarray(index_TxK) - expert_offset
  dropped_TxK = (held >= 0) & (held < wg.shape[0]) & ~plan.kept
  return y_TxD, dropped_TxK


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


def ragged_experts(x_TxD, gates_TxK, index_TxK, wg, wu, wo, *, impl="auto", buffer_factor=0.0):
  """Dropless dispatch: the T * K assignments sorted by expert, grouped SwiGLU matmuls.

  Without a mesh (or on one device) one grouped matmul over all T * K rows. Under this
  project's mesh (`sharding.mesh_rules`) the computation is local to each device
  (`jax.shard_map`), so nothing in it scales with the global batch:

  * each device takes its own tokens (the batch axis is split over data x fsdp x expert) and
    all-gathers the tokens, gates and expert choices of the devices along "expert" (its expert
    group: the tokens whose experts it shares out);
  * it all-gathers its experts' kernels over "fsdp" ([E / expert, D, F / model]: the FSDP
    gather of one layer, whose transpose reduce-scatters the gradients);
  * it sorts the group's assignments to its own experts (`dispatch.sorted_plan` with an expert
    offset; the others are computed on the device holding their expert) and runs the grouped
    matmuls on them;
  * the partial outputs are summed back: reduce-scatter along "expert" (each device gets its
    own tokens) and all-reduce along "model" (the F / model slices).

  Dropless by default: the buffer holds every assignment of the expert group (expert x local
  tokens x K rows), the worst case where all of them pick this device's experts. The
  grouped-matmul kernels touch only the filled rows, but the buffer's memory, and the FLOPs a
  kernel's static cost estimate reports, are that worst case. `buffer_factor` f > 0 bounds the
  buffer at f x the device's mean load (local tokens x K rows): an expert group whose load on
  one device exceeds it drops the excess (`kept` False, reported as `MoEAux.dropped`).

  Args:
    x_TxD, gates_TxK, index_TxK, wg, wu, wo: as `capacity_experts`.
    impl: grouped-matmul implementation, one of RAGGED_IMPLS.
    buffer_factor: float; > 0 bounds each device's buffer as above (with an expert axis > 1
      only); <= 0 dropless.

  Returns:
    (float[T, D] combined outputs, bool[T, K] kept assignments: all True when dropless).
  """
  mesh = _sharded_mesh()
  if mesh is None:
    return (_ragged_swiglu(x_TxD, gates_TxK, index_TxK, wg, wu, wo, 0, impl)[0],
            jnp.ones(index_TxK.shape, bool))
  P = jax.sharding.PartitionSpec
  tok = P(sharding.BATCH_AXES)
  # Pallas TPU kernels (megablox) declare no varying-axis types, so shard_map cannot check them:
  # without the check, its transpose sums the cotangents of inputs replicated along an axis.
  check_vma = resolve_ragged_impl(impl) != "megablox" and not _FORCE_NO_VMA_CHECK

  w_in, w_out = P("expert", "fsdp", "model"), P("expert", "model", "fsdp")

  local_tokens = x_TxD.shape[0] // math.prod(mesh.shape[a] for a in sharding.BATCH_AXES)
  group_assign = local_tokens * mesh.shape["expert"] * index_TxK.shape[1]
  num_slots = None
  if buffer_factor > 0 and mesh.shape["expert"] > 1:
    num_slots = min(group_assign,
                    -(-int(math.ceil(local_tokens * index_TxK.shape[1] * buffer_factor)) // 8) * 8)

  def local(x, gates, index, wg, wu, wo):
    wg, wu = (jax.lax.all_gather(w, "fsdp", axis=1, tiled=True) for w in (wg, wu))
    wo = jax.lax.all_gather(wo, "fsdp", axis=2, tiled=True)
    x, gates, index = (jax.lax.all_gather(a, "expert", axis=0, tiled=True)
                       for a in (x, gates, index))
    # The kernels vary along "model" (their F slices), so the dispatch / combine custom VJPs
    # see model-varying cotangents: mark their float inputs varying too, so the transpose of
    # that cast sums the token and gate gradients over "model".
    if check_vma:
      x, gates = (_varying(a, "model") for a in (x, gates))
    offset = jax.lax.axis_index("expert") * wg.shape[0]
    y, dropped = _ragged_swiglu(x, gates, index, wg, wu, wo, offset, impl, num_slots)
    y = jax.lax.psum_scatter(y, "expert", scatter_dimension=0, tiled=True)
    # Each assignment is held on one device of the group: the sum says whether it was dropped.
    dropped = jax.lax.psum_scatter(dropped.astype(jnp.int32), "expert", scatter_dimension=0,
                                   tiled=True)
    return jax.lax.psum(y, "model"), dropped == 0

  return jax.shard_map(local, mesh=mesh, in_specs=(tok, tok, tok, w_in, w_in, w_out),
                       out_specs=(tok, tok), check_vma=check_vma)(x_TxD, gates_TxK, index_TxK,
                                                                  wg, wu, wo)
