"""Decoder-only language model with optional Mixture-of-Experts FFNs (Flax linen).

Pre-norm blocks: `h = x + Attn(RMSNorm(x))`, `out = h + FFN(RMSNorm(h))` where FFN is a dense
SwiGLU or a `moe.MoEBlock` (so the router sees the normalised residual stream after attention).
RoPE on queries and keys, causal attention through `jax.nn.dot_product_attention` (cuDNN on GPU
where possible), optionally kept within documents by segment ids, untied LM head, no biases.
Compute in `config.dtype` (bf16 by default); norms, router, softmax and the returned logits are
float32. Parameters carry logical axis names ("vocab", "embed", "heads", "kv", "mlp", "expert")
mapped to mesh axes by `sharding.py`.

Parameter tree: `embedding` [V, D], `layers_{i}` {`attn_norm`, `attn` {`wq`, `wk`, `wv`
[D, H, Dh], `wo` [H, Dh, D]}, `ffn_norm`, `ffn` (MLP or MoEBlock)}, `final_norm`, `lm_head` [D, V].
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from simbal_jax import init as init_lib
from simbal_jax.moe import MLP, MoEAux, MoEBlock, MoEConfig
from simbal_jax.sharding import boxed_param

__all__ = ["ModelConfig", "MoEConfig", "MoEAux", "Transformer", "router_kernels", "segment_mask",
           "count_params", "flops_per_token", "ATTENTION_IMPLS", "DTYPES"]

ATTENTION_IMPLS = ("auto", "xla", "cudnn")
DTYPES = ("bfloat16", "float32", "float16")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Transformer shape and numerics (validated on construction).

  Attributes:
    vocab_size: V. d_model: D. num_layers: number of blocks. num_heads: H (divides D).
    d_ff: width of the dense SwiGLU FFN (dense layers only; Dense-M/L use 4 * D).
    rope_theta: RoPE base.
    moe: MoEConfig or None (dense model).
    moe_every: layer i is MoE iff `moe` is set and (i + 1) % moe_every == 0 (1: every layer).
    dtype: compute dtype name. param_dtype: parameter storage dtype name.
    attention_impl: "auto" (cuDNN on GPU for bf16/fp16 and head_dim % 8 == 0 <= 128, else XLA),
      "xla" or "cudnn".
    norm_eps: RMSNorm epsilon.
    remat: rematerialise each block in the backward pass (nn.remat).
  """
  vocab_size: int
  d_model: int
  num_layers: int
  num_heads: int
  d_ff: int
  rope_theta: float = 1e4
  moe: MoEConfig | None = None
  moe_every: int = 1
  dtype: str = "bfloat16"
  param_dtype: str = "float32"
  attention_impl: str = "auto"
  norm_eps: float = 1e-6
  remat: bool = False

  def __post_init__(self):
    for name in ("vocab_size", "d_model", "num_layers", "num_heads", "d_ff", "moe_every"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"ModelConfig.{name} must be an int >= 1, got {value!r}")
    if self.d_model % self.num_heads:
      raise ValueError(f"num_heads={self.num_heads} does not divide d_model={self.d_model}")
    if (self.d_model // self.num_heads) % 2:
      raise ValueError(f"head_dim={self.d_model // self.num_heads} must be even for RoPE")
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in DTYPES:
        raise ValueError(f"ModelConfig.{name}={getattr(self, name)!r}; valid: {DTYPES}")
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ValueError(f"attention_impl={self.attention_impl!r}; valid: {ATTENTION_IMPLS}")
    if self.moe is not None and not isinstance(self.moe, MoEConfig):
      raise ValueError(f"ModelConfig.moe must be a MoEConfig or None, got {type(self.moe)}")
    if self.moe is not None and self.num_moe_layers == 0:
      raise ValueError(f"moe_every={self.moe_every} > num_layers={self.num_layers}: no MoE layer")

  @property
  def head_dim(self):
    return self.d_model // self.num_heads

  def is_moe_layer(self, i):
    """Whether block i (0-based) has an MoE FFN."""
    return self.moe is not None and (i + 1) % self.moe_every == 0

  @property
  def moe_layer_ids(self):
    """Block indices of the MoE layers, in order (the i of `layer_<i>` metric names)."""
    return [i for i in range(self.num_layers) if self.is_moe_layer(i)]

  @property
  def num_moe_layers(self):
    return len(self.moe_layer_ids)

  @classmethod
  def from_config(cls, cfg, **overrides):
    """Builds a ModelConfig from an experiment config's `model` and `moe` groups.

    Args:
      cfg: the experiment ConfigDict (configs/base.py). `moe.num_experts == 0` gives a dense
        model. `moe.num_groups == 0` (auto: one routing group per batch shard, resolved by the
        trainer for its mesh) counts as 1 here. `model.vocab_size == 0` (take the tokenizer's)
        needs a `vocab_size=` override.
      **overrides: ModelConfig fields that win over the config (e.g. vocab_size).
    """
    def pick(group, klass, skip=()):
      return {f.name: group[f.name] for f in dataclasses.fields(klass)
              if f.name not in skip and f.name in group}

    model_kw = pick(cfg.model, cls, skip=("moe",))
    moe_cfg = None
    if int(cfg.moe.num_experts) > 0:
      moe_kw = pick(cfg.moe, MoEConfig)
      moe_kw["num_groups"] = int(moe_kw.get("num_groups", 1)) or 1
      moe_kw["capacity_buckets"] = tuple(moe_kw.get("capacity_buckets", (1.25, 1.5, 2.0, 3.0)))
      moe_cfg = MoEConfig(**moe_kw)
    model_kw.update(overrides)
    model_kw.setdefault("moe", moe_cfg)
    if int(model_kw.get("vocab_size", 0)) < 1:
      raise ValueError("model.vocab_size is 0 (taken from the tokenizer when training): pass "
                       "vocab_size= or set model.vocab_size")
    return cls(**model_kw)


def resolve_attention_impl(impl, dtype, head_dim):
  """Maps "auto" to "cudnn" on GPU for bf16/fp16 with a cuDNN-friendly head_dim, else "xla"."""
  if impl != "auto":
    return impl
  ok = (jax.default_backend() == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
        and head_dim % 8 == 0 and head_dim <= 128)
  return "cudnn" if ok else "xla"


def apply_rope(x_BxLxHxK, positions_L, theta):
  """Rotary embedding, rotate-half convention (pairs (i, i + K/2)), computed in float32.

  Args:
    x_BxLxHxK: float[B, L, H, K] queries or keys, K even.
    positions_L: int32[L] positions.
    theta: RoPE base.

  Returns:
    float[B, L, H, K] in the input dtype.
  """
  half = x_BxLxHxK.shape[-1] // 2
  freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angle_LxK2 = positions_L.astype(jnp.float32)[:, None] * freq[None, :]
  sin, cos = jnp.sin(angle_LxK2)[None, :, None, :], jnp.cos(angle_LxK2)[None, :, None, :]
  x = x_BxLxHxK.astype(jnp.float32)
  x1, x2 = x[..., :half], x[..., half:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxLxHxK.dtype)


class RMSNorm(nn.Module):
  """RMSNorm with a learned scale (init 1), computed in float32, output in `dtype`."""
  eps: float = 1e-6
  dtype: Any = jnp.bfloat16
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxLxD):
    scale = boxed_param(self, "scale", nn.initializers.ones, (x_BxLxD.shape[-1],), ("embed",),
                        self.param_dtype)
    x = x_BxLxD.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
    return (x * scale.astype(jnp.float32)).astype(self.dtype)


def segment_mask(segment_ids_BxL):
  """bool[B, 1, L, L]: query i may attend to key j iff both lie in the same segment.

  Args:
    segment_ids_BxL: int[B, L] segment (document) index of each position.
  """
  return segment_ids_BxL[:, None, :, None] == segment_ids_BxL[:, None, None, :]


class Attention(nn.Module):
  """Causal multi-head self-attention with RoPE, no biases; within segments when given."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD, positions_L, segment_ids_BxL=None):
    cfg = self.config
    dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    heads, head_dim, d_model = cfg.num_heads, cfg.head_dim, cfg.d_model
    qkv_init = init_lib.kernel_init(in_axis=0, out_axis=(1, 2))
    proj = {}
    for name in ("wq", "wk", "wv"):
      w = boxed_param(self, name, qkv_init, (d_model, heads, head_dim), ("embed", "heads", "kv"),
                      pdtype)
      y = jnp.einsum("bld,dhk->blhk", x_BxLxD.astype(dtype), w.astype(dtype))
      proj[name] = nn.with_logical_constraint(y, ("batch", "length", "heads", "kv"))
    q = apply_rope(proj["wq"], positions_L, cfg.rope_theta)
    k = apply_rope(proj["wk"], positions_L, cfg.rope_theta)
    impl = resolve_attention_impl(cfg.attention_impl, dtype, head_dim)
    # RoPE is relative, so a document's attention does not depend on where it starts.
    mask = None if segment_ids_BxL is None else segment_mask(segment_ids_BxL)
    out = jax.nn.dot_product_attention(q, k, proj["wv"], mask=mask, is_causal=True,
                                       implementation=impl)
    out = nn.with_logical_constraint(out, ("batch", "length", "heads", "kv"))
    wo = boxed_param(self, "wo", init_lib.kernel_init(in_axis=(0, 1), out_axis=2),
                     (heads, head_dim, d_model), ("heads", "kv", "embed"), pdtype)
    return jnp.einsum("blhk,hkd->bld", out, wo.astype(dtype))


class Block(nn.Module):
  """Pre-norm transformer block; returns (x, MoEAux or None)."""
  config: ModelConfig
  is_moe: bool

  @nn.compact
  def __call__(self, x_BxLxD, expert_bias_E=None, segment_ids_BxL=None):
    cfg = self.config
    dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    positions_L = jnp.arange(x_BxLxD.shape[1], dtype=jnp.int32)
    h = RMSNorm(cfg.norm_eps, dtype, pdtype, name="attn_norm")(x_BxLxD)
    x_BxLxD = x_BxLxD + Attention(cfg, name="attn")(h, positions_L, segment_ids_BxL)
    x_BxLxD = nn.with_logical_constraint(x_BxLxD, ("batch", "length", "embed"))
    h = RMSNorm(cfg.norm_eps, dtype, pdtype, name="ffn_norm")(x_BxLxD)
    if self.is_moe:
      y, aux = MoEBlock(cfg.moe, dtype, pdtype, name="ffn")(h, expert_bias_E)
    else:
      y, aux = MLP(cfg.d_ff, dtype, pdtype, name="ffn")(h), None
    x_BxLxD = nn.with_logical_constraint(x_BxLxD + y, ("batch", "length", "embed"))
    return x_BxLxD, aux


class Transformer(nn.Module):
  """Decoder-only LM. `__call__(tokens, *, expert_bias=None, segment_ids=None) -> (logits
  float32[B, L, V], aux)`."""
  config: ModelConfig

  @nn.compact
  def __call__(self, tokens_BxL, *, expert_bias=None, segment_ids=None):
    """Forward pass.

    Args:
      tokens_BxL: int32[B, L] token ids.
      expert_bias: float32[Lm, E] Loss-Free selection bias per MoE layer (state, not a
        parameter; never differentiated), or None.
      segment_ids: int32[B, L] document index of each position (the batch's `segment_ids`,
        given when `data.document_mask` is set), or None. Given, a position attends only to
        earlier positions of its own segment, so no attention weight crosses a document
        boundary; None: plain causal attention over the packed sequence.

    Returns:
      (logits float32[B, L, V], aux): aux is a MoEAux whose leaves have a leading [Lm] axis
      (stacked over MoE layers in layer order), or None for a dense model.
    """
    cfg = self.config
    dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    if tokens_BxL.ndim != 2 or not jnp.issubdtype(tokens_BxL.dtype, jnp.integer):
      raise ValueError(f"tokens must be int[B, L], got {tokens_BxL.dtype}{tokens_BxL.shape}")
    n_moe = cfg.num_moe_layers
    if expert_bias is not None:
      if cfg.moe is None:
        raise ValueError("expert_bias given for a dense model")
      if expert_bias.shape != (n_moe, cfg.moe.num_experts):
        raise ValueError(f"expert_bias must have shape {(n_moe, cfg.moe.num_experts)}, "
                         f"got {expert_bias.shape}")
    if segment_ids is not None and (segment_ids.shape != tokens_BxL.shape or
                                    not jnp.issubdtype(segment_ids.dtype, jnp.integer)):
      raise ValueError(f"segment_ids must be int{tokens_BxL.shape}, got "
                       f"{segment_ids.dtype}{segment_ids.shape}")

    embedding = boxed_param(self, "embedding", nn.initializers.normal(1.0),
                            (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), pdtype)
    x = jnp.take(embedding, tokens_BxL, axis=0).astype(dtype)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    block_cls = nn.remat(Block) if cfg.remat else Block
    auxes = []
    for i in range(cfg.num_layers):
      is_moe = cfg.is_moe_layer(i)
      bias = expert_bias[len(auxes)] if (is_moe and expert_bias is not None) else None
      x, aux = block_cls(cfg, is_moe, name=f"layers_{i}")(x, bias, segment_ids)
      if is_moe:
        auxes.append(aux)
    x = RMSNorm(cfg.norm_eps, dtype, pdtype, name="final_norm")(x)
    head = boxed_param(self, "lm_head", init_lib.kernel_init(), (cfg.d_model, cfg.vocab_size),
                       ("embed", "vocab"), pdtype)
    logits = jnp.einsum("bld,dv->blv", x, head.astype(dtype), preferred_element_type=jnp.float32)
    logits = nn.with_logical_constraint(logits, ("batch", "length", "vocab"))
    aux = jax.tree.map(lambda *a: jnp.stack(a), *auxes) if auxes else None
    return logits.astype(jnp.float32), aux


def router_kernels(params, config):
  """Stacks the router kernels of the MoE layers.

  Args:
    params: the model's params, boxed or not, either `{"params": ...}` or the inner dict.
    config: ModelConfig.

  Returns:
    float32[Lm, D, E] (x @ R gives the router scores), in layer order.
  """
  if config.moe is None:
    raise ValueError("router_kernels: dense model has no routers")
  params = nn.unbox(params)
  if "params" in params and "embedding" not in params:
    params = params["params"]
  kernels = [params[f"layers_{i}"]["ffn"]["router"] for i in config.moe_layer_ids]
  return jnp.stack(kernels).astype(jnp.float32)


def as_model_config(config):
  """`config` as a ModelConfig: a ModelConfig as it is, an experiment ConfigDict through
  `ModelConfig.from_config`."""
  return config if isinstance(config, ModelConfig) else ModelConfig.from_config(config)


def count_params(config):
  """Analytic parameter counts (nothing is materialised) of a ModelConfig or experiment config.

  Counting follows the paper: embeddings (input and untied output) are included; routers and
  norms count as active; routed experts count K of E per token as active.

  Returns:
    dict of ints: total, active, embedding (input + output), attention, dense_ffn, experts
    (all routed experts), active_experts, shared_expert, router, norm, non_embedding_active.
  """
  config = as_model_config(config)
  d, n_layers = config.d_model, config.num_layers
  n_moe = config.num_moe_layers
  n_dense = n_layers - n_moe
  embedding = 2 * config.vocab_size * d
  attention = n_layers * 4 * d * d
  norm = (2 * n_layers + 1) * d
  dense_ffn = n_dense * 3 * d * config.d_ff
  experts = active_experts = shared = router = 0
  if config.moe is not None:
    m = config.moe
    experts = n_moe * m.num_experts * 3 * d * m.d_ff
    active_experts = n_moe * m.top_k * 3 * d * m.d_ff
    shared = n_moe * 3 * d * m.shared_expert_d_ff
    router = n_moe * d * m.num_experts
  common = embedding + attention + norm + dense_ffn + shared + router
  active = common + active_experts
  return dict(total=common + experts, active=active, embedding=embedding, attention=attention,
              dense_ffn=dense_ffn, experts=experts, active_experts=active_experts,
              shared_expert=shared, router=router, norm=norm,
              non_embedding_active=active - embedding)


def flops_per_token(config, seq_len):
  """Training FLOPs per token (forward + backward) for MFU.

  `6 * N_matmul + 12 * num_layers * d_model * seq_len` (PaLM appendix B convention): N_matmul
  = active parameters used in matmuls = active - input embedding (a lookup) - norm scales (the
  LM head and the routers are matmuls and count); the attention term counts QK^T and AV for
  the full L x L score matrix (no causal discount). Capacity padding of the expert buffers is
  not counted (useful FLOPs only).
  """
  if not isinstance(seq_len, int) or seq_len < 1:
    raise ValueError(f"seq_len must be an int >= 1, got {seq_len!r}")
  config = as_model_config(config)
  counts = count_params(config)
  matmul = counts["active"] - config.vocab_size * config.d_model - counts["norm"]
  return 6 * matmul + 12 * config.num_layers * config.d_model * seq_len
