"""Per-device memory estimate of a training run: parameters, gradients, optimizer state,
activations with and without rematerialisation (next to `model.count_params`).

Parameters are sharded as the trainer shards them: the model's logical axis names mapped by
`sharding.LOGICAL_RULES` onto the mesh (fsdp over d_model, expert, model over heads / mlp /
vocab), so the parameter, gradient and AdamW-moment bytes per device are exact (nothing is
materialised: `jax.eval_shape` of the model's init). Activations are an analytic estimate of
what the backward pass keeps (see `activation_bytes_per_token`); XLA's fusion and buffer reuse
make the real peak differ, so treat them as an order of magnitude.
"""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from simbal_jax import experts
from simbal_jax import model as model_lib
from simbal_jax import sharding

GIB = 2.0 ** 30


def _mesh_sizes(mesh_shape):
  """dict axis -> size from a dict / Mesh.shape, or a tuple in `sharding.MESH_AXES` order."""
  if isinstance(mesh_shape, (tuple, list)):
    return dict(zip(sharding.MESH_AXES, mesh_shape))
  sizes = {a: 1 for a in sharding.MESH_AXES}
  sizes.update({k: int(v) for k, v in dict(mesh_shape).items()})
  return sizes


def _shard_elems(shape, spec, sizes):
  """Elements of the largest per-device shard of an array of `shape` under PartitionSpec."""
  elems = 1
  for i, dim in enumerate(shape):
    axes = spec[i] if i < len(spec) else None
    axes = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
    elems *= math.ceil(dim / math.prod(sizes.get(a, 1) for a in axes))
  return elems


def param_bytes_per_device(config, mesh_shape, rules=sharding.LOGICAL_RULES):
  """(bytes per device, total bytes) of the parameters of `model.Transformer(config)`."""
  leaves, spec_leaves = _param_leaves(config, rules)
  sizes = _mesh_sizes(mesh_shape)
  per_dev = sum(_shard_elems(a.shape, s, sizes) * a.dtype.itemsize
                for a, s in zip(leaves, spec_leaves))
  return per_dev, sum(a.size * a.dtype.itemsize for a in leaves)


@functools.lru_cache(maxsize=16)
def _param_leaves(config, rules):
  """(abstract parameter leaves, their PartitionSpecs) of `model.Transformer(config)`, traced
  once per config and rules (a ModelConfig is hashable)."""
  groups = config.moe.num_groups if config.moe else 1
  boxed = jax.eval_shape(model_lib.Transformer(config).init, jax.random.key(0),
                         jnp.zeros((1, groups), jnp.int32))["params"]
  specs = nn.logical_to_mesh(nn.get_partition_spec(boxed), rules)
  spec_leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  return jax.tree.leaves(nn.unbox(boxed)), spec_leaves


def clear_caches():
  """Forgets the traced parameter shapes (`_param_leaves`)."""
  _param_leaves.cache_clear()


def activation_bytes_per_token(config, seq_len, model_axis=1, expert_axis=1):
  """Bytes the backward pass keeps per token: (per transformer block, once for the model).

  Per block (compute dtype a bytes, float32 where the model computes in float32): residual and
  RMSNorm inputs (2 D float32), q, k, v and attention output (4 D a / model), the attention
  scores and probabilities (2 H L float32 / model) unless cuDNN's fused attention runs (then a
  float32 log-sum-exp per head), the output projection (D a); dense FFN: the SwiGLU's three
  hidden [F] (a / model) and its output; MoE: router logits and probabilities (2 E float32),
  and per buffer row the dispatched input and expert output (2 D a) and three hidden [F]
  (a / model). Rows per token: K x the dispatch's padding (`experts.padding`: 1 for "ragged",
  on an expert axis its size or `expert_buffer_factor`, + 1 for the overflow fallback's buffer;
  the capacity factor, at most E / K; the smallest bucket).
  Once per model: the embedding output (D a) and the float32 logits with their gradient
  (2 V float32 / model).
  """
  d, h, a = config.d_model, config.num_heads, jnp.dtype(config.dtype).itemsize
  attn_impl = model_lib.resolve_attention_impl(config.attention_impl, config.dtype,
                                               config.head_dim)
  scores = (h * 4 if attn_impl == "cudnn" else 2 * h * seq_len * 4) / model_axis
  common = 2 * d * 4 + 4 * d * a / model_axis + scores + d * a
  dense = 3 * config.d_ff * a / model_axis + d * a
  per_block = []
  for i in range(config.num_layers):
    if not config.is_moe_layer(i):
      per_block.append(common + dense)
      continue
    m = config.moe
    rows = m.top_k * experts.padding(m, m.num_experts, m.top_k, expert_axis)
    moe_b = 2 * m.num_experts * 4 + rows * (2 * d * a + 3 * m.d_ff * a / model_axis) + d * a
    if m.shared_expert_d_ff:
      moe_b += 3 * m.shared_expert_d_ff * a / model_axis + d * a
    per_block.append(common + moe_b)
  once = d * a + 2 * config.vocab_size * 4 / model_axis
  return per_block, once


def memory_estimate(config, mesh_shape, *, global_batch_size, seq_len, grad_accum=1,
                    opt_moments=2, rules=sharding.LOGICAL_RULES, document_mask=False):
  """Per-device bytes of a training step of `config` on a mesh.

  Args:
    config: model.ModelConfig.
    mesh_shape: dict axis -> size (e.g. `dict(mesh.shape)`) or a tuple in MESH_AXES order
      (data, fsdp, expert, model).
    global_batch_size: sequences per optimizer step; seq_len: tokens per sequence.
    grad_accum: micro-batches per step (activations are those of one micro-batch).
    opt_moments: optimizer moments per parameter (AdamW: 2, in the parameter dtype).
    rules: logical axis rules.

  Returns:
    dict of floats (bytes per device): params, grads, opt_state, activations (no remat),
    activations_remat (block inputs kept, one block recomputed at a time), batch (one global
    batch's int32 inputs and targets, and segment ids with `document_mask`), eval (the eval
    step: forward only, one block's activations live at a time plus the logits, on one
    micro-batch of its own; the eval set stays on the host between batches), total, total_remat
    (the state + batch + the larger of the train step's activations and the eval step's);
    and params_total (bytes of all parameters, unsharded), tokens_per_device.
  The state (params, grads, opt_state) is exact. The activations are analytic and a lower
  bound of what a compiler keeps: on CPU XLA's temporaries were 1.3x the estimated gradients +
  activations, more with remat or tokamax's dense fallback (docs/PERFORMANCE.md;
  `experiments/benchmark.py --what=memory` compares them for any config).
  """
  sizes = _mesh_sizes(mesh_shape)
  params, params_total = param_bytes_per_device(config, sizes, rules)
  batch_shards = math.prod(sizes.get(ax, 1) for ax in sharding.BATCH_AXES)
  tokens = global_batch_size // max(grad_accum, 1) * seq_len / batch_shards
  per_block, once = activation_bytes_per_token(config, seq_len, sizes.get("model", 1),
                                               sizes.get("expert", 1))
  a = jnp.dtype(config.dtype).itemsize
  act = tokens * (sum(per_block) + once)
  act_remat = tokens * (config.num_layers * config.d_model * a + max(per_block) + once)
  state = params * (2 + opt_moments)  # params, grads, moments
  step_tokens = global_batch_size * seq_len / batch_shards  # a whole step's batch per device
  batch = step_tokens * 4 * (3 if document_mask else 2)
  # The eval step runs on micro-batches of the train step's size, its own batch beside it.
  evaluation = tokens * (max(per_block) + once + 4 * (3 if document_mask else 2))
  return dict(params=float(params), grads=float(params), opt_state=float(opt_moments * params),
              activations=act, activations_remat=act_remat, batch=batch, eval=evaluation,
              total=state + batch + max(act, evaluation),
              total_remat=state + batch + max(act_remat, evaluation),
              params_total=float(params_total), tokens_per_device=tokens)


def summary(est, device_bytes=None):
  """One line: the estimate in GiB (and the device's memory when known)."""
  parts = [f"{k} {est[k] / GIB:.3g}" for k in ("params", "grads", "opt_state", "activations",
                                                "activations_remat", "batch", "eval", "total",
                                                "total_remat")]
  line = "GiB per device: " + ", ".join(parts)
  if device_bytes:
    line += f" (device {device_bytes / GIB:.3g} GiB)"
  return line


def device_memory_bytes(device=None):
  """The device's memory limit in bytes from `memory_stats()`, or None (e.g. CPU)."""
  device = device or jax.devices()[0]
  try:
    stats = device.memory_stats() or {}
  except Exception:  # pylint: disable=broad-except  (backends without memory stats)
    return None
  return stats.get("bytes_limit")


# Datasheet dense bf16 matmul peaks in TFLOP/s per device (chip), by a substring of
# `device.device_kind`; more specific names first.
PEAK_TFLOPS = (("H200", 989.0), ("H100", 989.0), ("A100", 312.0), ("L4", 121.0),
               ("TPU v6 lite", 918.0), ("TPU v6e", 918.0), ("TPU v5 lite", 197.0),
               ("TPU v5e", 197.0), ("TPU v5p", 459.0), ("TPU v5", 459.0), ("TPU v4", 275.0))


def device_peak_tflops(device=None, override=0.0):
  """Peak bf16 TFLOP/s of one device for MFU: `override` if > 0, else the datasheet value of
  the device kind (PEAK_TFLOPS), else None (CPUs and unknown devices: no MFU is reported)."""
  if override and override > 0:
    return float(override)
  kind = (device or jax.devices()[0]).device_kind
  return next((v for k, v in PEAK_TFLOPS if k in kind), None)
