"""Device mesh, logical-axis rules and multi-host setup.

One mesh with axes ("data", "fsdp", "expert", "model") and Auto axis types (GSPMD
propagation). The batch is split over data * fsdp * expert devices (`BATCH_AXES`), experts'
leading axis over "expert" (expert parallelism), the model width ("embed") of every parameter and
of its optimizer state over "fsdp" (fully sharded data parallelism: GSPMD all-gathers a weight
where it is used and reduce-scatters its gradient), wide matmul dimensions (mlp, heads, vocab)
over "model". Expert kernels [E, D, F] thus shard over expert x fsdp x model. Typical use:

  initialize_distributed(cfg.mesh.multihost)        # before any other jax call
  validate(cfg.mesh, model_cfg, global_batch, jax.device_count())
  mesh, rules = make_mesh(cfg.mesh), LOGICAL_RULES
  with mesh_rules(mesh, rules):                        # sharding constraints become active
    abstract = jax.eval_shape(init_fn, key)
    shardings = state_shardings(abstract, mesh, rules)
    state = jax.jit(init_fn, out_shardings=shardings)(key)
"""

import contextlib
import math

import flax.linen as nn
import jax
import numpy as np

MESH_AXES = ("data", "fsdp", "expert", "model")
# Mesh axes the batch (and the MoE routing groups) are split over.
BATCH_AXES = ("data", "fsdp", "expert")

_DISTRIBUTED = {"initialized": False}


def mesh_shape(mesh_cfg, num_devices):
  """Resolves (data, fsdp, expert, model) sizes; at most one may be -1 (= all remaining devices).

  Args:
    mesh_cfg: cfg.mesh (ConfigDict or dict with int fields data, fsdp, expert, model; the
      defaults live in configs/base.py).
    num_devices: total number of devices (all hosts).

  Returns:
    tuple of 4 ints (in MESH_AXES order) whose product is num_devices.

  Raises:
    ValueError: sizes not ints >= 1 (or -1), more than one -1, or not dividing num_devices.
  """
  sizes = [mesh_cfg[axis] for axis in MESH_AXES]
  for axis, size in zip(MESH_AXES, sizes):
    if not isinstance(size, int) or isinstance(size, bool) or (size < 1 and size != -1):
      raise ValueError(f"mesh.{axis} must be an int >= 1 or -1, got {size!r}")
  free = [i for i, s in enumerate(sizes) if s == -1]
  if len(free) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
  fixed = math.prod(s for s in sizes if s != -1)
  if num_devices % fixed:
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} does not divide {num_devices} devices")
  if free:
    sizes[free[0]] = num_devices // fixed
  elif fixed != num_devices:
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} uses {fixed} devices, "
                     f"but {num_devices} are available (set one axis to -1)")
  return tuple(sizes)


def batch_shards(mesh_cfg, num_devices):
  """Number of batch shards, data * fsdp * expert (one MoE routing group each in auto mode)."""
  data, fsdp, expert, _ = mesh_shape(mesh_cfg, num_devices)
  return data * fsdp * expert


def make_mesh(mesh_cfg, devices=None):
  """Builds the ("data", "fsdp", "expert", "model") mesh with Auto axis types.

  Args:
    mesh_cfg: see `mesh_shape`.
    devices: devices to use (default: all global devices, `jax.devices()`).

  Returns:
    jax.sharding.Mesh.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_cfg, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 4,
                       devices=devices)


# Logical-to-mesh axis rules (first matching free mesh axis wins, flax semantics); they do not
# depend on the mesh sizes (size-1 axes are simply free). batch -> ("data", "fsdp", "expert");
# expert -> "expert"; expert_group (routing groups in the MoE buffers) -> ("data", "fsdp");
# vocab, heads, mlp -> "model"; embed -> "fsdp" (parameters; in activations "fsdp" is already
# taken by batch, so their embed stays replicated); length, kv -> replicated. Use with
# `mesh_rules(mesh, LOGICAL_RULES)`.
LOGICAL_RULES = (("batch", BATCH_AXES), ("expert", "expert"), ("expert_group", ("data", "fsdp")),
                 ("vocab", "model"), ("heads", "model"), ("mlp", "model"),
                 ("embed", "fsdp"), ("length", None), ("kv", None))


def boxed_param(module, name, init, shape, names, dtype):
  """`module.param` with logical axis names attached (nn.with_logical_partitioning): the one
  place parameters get the names `LOGICAL_RULES` maps onto the mesh."""
  return module.param(name, nn.with_logical_partitioning(init, names), shape, dtype)


@contextlib.contextmanager
def mesh_rules(mesh, rules):
  """Context in which the model's logical sharding constraints apply (mesh + axis rules)."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def validate(mesh_cfg, model_config, global_batch_size, num_devices, *, seq_len=None):
  """Checks that mesh, model and batch fit together; raises ValueError before anything compiles.

  Args:
    mesh_cfg: see `mesh_shape`.
    model_config: model.ModelConfig.
    global_batch_size: int, sequences per step over all hosts.
    num_devices: int, total devices.
    seq_len: optional int; checks that each MoE routing group gets whole tokens.

  Returns:
    (data, fsdp, expert, model) sizes.
  """
  data, fsdp, expert, model = mesh_shape(mesh_cfg, num_devices)
  cfg = model_config
  if cfg.d_model % fsdp:
    raise ValueError(f"mesh.fsdp={fsdp} does not divide d_model={cfg.d_model}")
  if cfg.d_model % cfg.num_heads:
    raise ValueError(f"num_heads={cfg.num_heads} does not divide d_model={cfg.d_model}")
  if cfg.num_heads % model:
    raise ValueError(f"mesh.model={model} does not divide num_heads={cfg.num_heads}")
  if cfg.num_moe_layers < cfg.num_layers and cfg.d_ff % model:
    raise ValueError(f"mesh.model={model} does not divide d_ff={cfg.d_ff}")
  if not isinstance(global_batch_size, int) or global_batch_size < 1:
    raise ValueError(f"global_batch_size must be an int >= 1, got {global_batch_size!r}")
  if global_batch_size % (data * fsdp * expert):
    raise ValueError(f"global batch {global_batch_size} not divisible by mesh data * fsdp * "
                     f"expert = {data} * {fsdp} * {expert}")
  if cfg.moe is None:
    if expert > 1:
      raise ValueError(f"mesh.expert={expert} > 1 needs an MoE model (moe is None)")
  else:
    m = cfg.moe
    if m.num_experts % expert:
      raise ValueError(f"mesh.expert={expert} does not divide num_experts={m.num_experts}")
    if m.d_ff % model or m.shared_expert_d_ff % model:
      raise ValueError(f"mesh.model={model} does not divide the expert d_ff={m.d_ff} / "
                       f"shared_expert_d_ff={m.shared_expert_d_ff}")
    if m.num_groups > 1 and m.num_groups % (data * fsdp):
      raise ValueError(f"moe.num_groups={m.num_groups} not divisible by mesh data * fsdp = "
                       f"{data} * {fsdp}")
    if seq_len is not None and (global_batch_size * seq_len) % m.num_groups:
      raise ValueError(f"{global_batch_size} x {seq_len} tokens not divisible by "
                       f"moe.num_groups={m.num_groups}")
  return data, fsdp, expert, model


def initialize_distributed(enabled, **kwargs):
  """Calls `jax.distributed.initialize(**kwargs)` once when `enabled` (multi-host runs).

  Must run before any other JAX call. With no kwargs JAX auto-detects the cluster (Cloud TPU,
  SLURM, Open MPI, GKE). No-op when disabled or already initialised.

  Returns:
    bool, whether the distributed runtime is initialised by this module.
  """
  if enabled and not _DISTRIBUTED["initialized"]:
    jax.distributed.initialize(**kwargs)
    _DISTRIBUTED["initialized"] = True
  return _DISTRIBUTED["initialized"]


def state_shardings(abstract_tree, mesh, rules):
  """NamedSharding for every leaf of a (possibly abstract) tree with boxed logical names.

  Args:
    abstract_tree: pytree, e.g. `jax.eval_shape(init)` output holding nn.LogicallyPartitioned
      boxes (unboxed leaves are replicated).
    mesh: jax.sharding.Mesh.
    rules: logical rules (see `LOGICAL_RULES`).

  Returns:
    pytree of jax.sharding.NamedSharding matching the tree's structure (boxes count as leaves).
  """
  specs = nn.get_partition_spec(abstract_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def to_global(batch, batch_sharding, keys=None):
  """Host-local numpy batch -> global jax arrays (those named in `keys`, default all) sharded
  over the batch axis (`jax.make_array_from_process_local_data`: each process passes its own
  rows)."""
  return {k: jax.make_array_from_process_local_data(batch_sharding, np.asarray(v))
          for k, v in batch.items() if keys is None or k in keys}


def replicated(mesh):
  """The sharding of a value every process holds whole (small results read on the host)."""
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
