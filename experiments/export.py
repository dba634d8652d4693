"""Exports a trained run to Hugging Face format: safetensors weights and a `config.json`.

  python -m simbal_jax.experiments.export --workdir=runs/demo --out=runs/demo/hf [--dtype=bfloat16]

`transformers.AutoModelForCausalLM.from_pretrained(OUT)` then computes the run's logits
(`pip install -e .[export]`: torch, transformers, safetensors). The architecture is chosen per
config among those `transformers` implements exactly for ours (pre-norm RMSNorm blocks, causal
multi-head attention without biases, untied LM head, SwiGLU FFNs; our RoPE is the rotate-half
layout, pairs (i, i + Dh/2), which is theirs, so queries and keys need no permutation):

  dense model (moe.num_experts = 0)              LlamaForCausalLM
  topk_softmax, every layer MoE                  MixtralForCausalLM
  softmax_topk (renormalize or not); topk_softmax Qwen2MoeForCausalLM: softmax, top-k and
    with dense layers (moe_every > 1)            `norm_topk_prob` = renormalize (topk_softmax
                                                 is softmax over all experts, top-k, renormalised);
                                                 moe_every = `decoder_sparse_step`; q/k/v biases
                                                 and the sigmoid-gated shared expert are zeros
  sigmoid, MoE layers a suffix of the blocks     Glm4MoeForCausalLM: sigmoid scores, top-k of
    (moe_every = 1)                              score + `e_score_correction_bias` (the Loss-Free
                                                 bias), gates renormalised; the shared expert
                                                 (zeros when there is none) is ungated, padded
                                                 with zero units to a multiple of moe.d_ff

Refused in one line, before anything is written: a softmax gating with a non-zero Loss-Free
bias (it changes the choice, which no softmax architecture models), a softmax gating with a
shared expert (Qwen2-MoE gates it by a sigmoid, never exactly 1), sigmoid gating with dense
layers between MoE layers, `moe.min_gate > 0`.

The export is dropless: every token reaches its K experts. A run trained with
dispatch="capacity" and capacity_factor > 0 (or a bounded ragged buffer with expert_overflow="drop")
dropped assignments beyond capacity depending on the batch; the export then equals the run's
model evaluated dropless (logged). Documents are not masked from each other (one document per
sequence, as Hugging Face models read them). Written: `config.json` (`max_position_embeddings`
= the training length), `model.safetensors` (float32 by default), `simbal_export.json` (the
tokenizer kind, vocabulary sizes, EOS id, the source run and step) and the tokenizer: a Hugging
Face one (`tokenizer.json`: ids = UTF-8 bytes, EOS 256) for a byte-level run, the run's
`tokenizer.model` for a SentencePiece one, none for cl100k (`simbal_export.json` names it).
"""

import json
import os
import shutil
import sys

from absl import app
from absl import flags
from absl import logging
import numpy as np

DTYPES = ("float32", "bfloat16")
LLAMA, MIXTRAL, QWEN2_MOE, GLM4_MOE = ("LlamaForCausalLM", "MixtralForCausalLM",
                                       "Qwen2MoeForCausalLM", "Glm4MoeForCausalLM")
MODEL_TYPES = {LLAMA: "llama", MIXTRAL: "mixtral", QWEN2_MOE: "qwen2_moe", GLM4_MOE: "glm4_moe"}
META_FILE = "simbal_export.json"


def choose_architecture(mcfg):
  """The Hugging Face architecture that computes `mcfg`'s model exactly.

  Args:
    mcfg: model.ModelConfig of the run.

  Returns:
    One of LLAMA, MIXTRAL, QWEN2_MOE, GLM4_MOE.

  Raises:
    ValueError: one line saying why no architecture represents the config.
  """
  m = mcfg.moe
  if m is None:
    return LLAMA
  if m.min_gate > 0:
    raise ValueError(f"moe.min_gate={m.min_gate} (dynamic-K pruning) has no Hugging Face "
                     "equivalent")
  if m.gating == "sigmoid":
    if m.num_experts < 2:  # Glm4Moe scores groups by their top-2 experts
      raise ValueError("sigmoid gating with one expert: Glm4Moe needs moe.num_experts >= 2")
    moe_ids = mcfg.moe_layer_ids
    if moe_ids != list(range(moe_ids[0], mcfg.num_layers)):
      raise ValueError(f"sigmoid gating with MoE layers {moe_ids} of {mcfg.num_layers}: "
                       "Glm4Moe (the architecture with sigmoid routing) needs the MoE layers to "
                       "be the last blocks (model.moe_every=1)")
    return GLM4_MOE
  if m.shared_expert_d_ff:
    raise ValueError(f"{m.gating} gating with a shared expert (moe.shared_expert_d_ff="
                     f"{m.shared_expert_d_ff}): Qwen2-MoE gates its shared expert by a sigmoid, "
                     "which is never exactly 1, and no other softmax architecture has one")
  if m.gating == "topk_softmax" and mcfg.moe_every == 1:
    return MIXTRAL
  return QWEN2_MOE


def check_expert_bias(mcfg, expert_bias):
  """Raises ValueError (one line) when a softmax gating has a non-zero Loss-Free bias.

  Args:
    mcfg: model.ModelConfig.
    expert_bias: float32[Lm, E] the run's TrainState.expert_bias.
  """
  bias = np.asarray(expert_bias, np.float32)
  if mcfg.moe is None or mcfg.moe.gating == "sigmoid" or not np.any(bias):
    return
  raise ValueError(f"the run's Loss-Free expert bias is non-zero (max |b| = "
                   f"{np.abs(bias).max():.3g}) and changes which experts are chosen; no "
                   f"Hugging Face architecture adds it to {mcfg.moe.gating} scores")


def shared_width(mcfg):
  """Number of shared experts of width moe.d_ff that hold the shared expert (Glm4Moe): >= 1."""
  m = mcfg.moe
  return max(1, -(-m.shared_expert_d_ff // m.d_ff))


def hf_config(mcfg, arch, *, max_len, eos_id, dtype):
  """The `config.json` dict (keys read alike by transformers 4.57 and 5.x).

  Args:
    mcfg: model.ModelConfig. arch: one of `MODEL_TYPES`.
    max_len: int, the run's training sequence length (`max_position_embeddings`: the context
      lm-eval and generation assume).
    eos_id: int or None, the tokenizer's EOS id.
    dtype: "float32" or "bfloat16".
  """
  rope = {"rope_type": "default", "rope_theta": float(mcfg.rope_theta)}
  out = dict(
      architectures=[arch], model_type=MODEL_TYPES[arch], vocab_size=mcfg.vocab_size,
      hidden_size=mcfg.d_model, num_hidden_layers=mcfg.num_layers,
      num_attention_heads=mcfg.num_heads, num_key_value_heads=mcfg.num_heads,
      head_dim=mcfg.head_dim, intermediate_size=mcfg.d_ff, hidden_act="silu",
      rms_norm_eps=mcfg.norm_eps, rope_theta=float(mcfg.rope_theta), rope_scaling=None,
      rope_parameters=rope, max_position_embeddings=int(max_len), tie_word_embeddings=False,
      attention_dropout=0.0, attention_bias=False, initializer_range=0.02, use_cache=True,
      bos_token_id=None, eos_token_id=eos_id, pad_token_id=None, torch_dtype=dtype,
      dtype=dtype)
  m = mcfg.moe
  if arch == LLAMA:
    out.update(mlp_bias=False, pretraining_tp=1)
  elif arch == MIXTRAL:
    out.update(num_local_experts=m.num_experts, num_experts_per_tok=m.top_k,
               intermediate_size=m.d_ff, sliding_window=None, router_aux_loss_coef=0.0,
               router_jitter_noise=0.0, output_router_logits=False)
  elif arch == QWEN2_MOE:
    out.update(num_experts=m.num_experts, num_experts_per_tok=m.top_k,
               moe_intermediate_size=m.d_ff, shared_expert_intermediate_size=1,
               norm_topk_prob=m.renormalize or m.gating == "topk_softmax",
               decoder_sparse_step=mcfg.moe_every, mlp_only_layers=[], qkv_bias=True,
               use_sliding_window=False, sliding_window=None, max_window_layers=mcfg.num_layers,
               router_aux_loss_coef=0.0, output_router_logits=False)
  else:
    rope["partial_rotary_factor"] = 1.0
    out.update(n_routed_experts=m.num_experts, num_local_experts=m.num_experts,
               num_experts_per_tok=m.top_k, moe_intermediate_size=m.d_ff,
               n_shared_experts=shared_width(mcfg), routed_scaling_factor=1.0, n_group=1,
               topk_group=1, norm_topk_prob=True, first_k_dense_replace=mcfg.moe_layer_ids[0],
               partial_rotary_factor=1.0, use_qk_norm=False, num_nextn_predict_layers=0,
               num_mtp_layers=0)
  return out


def _mlp(prefix, p, width=None):
  """SwiGLU {wi_gate [D, F], wi_up [D, F], wo [F, D]} as nn.Linear weights, zero-padded to
  `width` hidden units (padded units compute silu(0) * 0 = 0)."""
  ws = {"gate_proj": p["wi_gate"].T, "up_proj": p["wi_up"].T, "down_proj": p["wo"]}
  out = {}
  for name, w in ws.items():  # gate/up: [F, D]; down: [F, D] here, transposed below
    if width is not None and width > w.shape[0]:
      w = np.concatenate([w, np.zeros((width - w.shape[0], w.shape[1]), w.dtype)])
    out[f"{prefix}{name}.weight"] = w.T if name == "down_proj" else w
  return out


def _zero_mlp(prefix, d_model, width):
  z = {"wi_gate": np.zeros((d_model, width), np.float32)}
  return _mlp(prefix, dict(z, wi_up=z["wi_gate"], wo=z["wi_gate"].T))


def hf_tensors(params, mcfg, arch, expert_bias=None):
  """The Hugging Face state dict (legacy per-expert names, which every version loads).

  Args:
    params: the run's params (nested dicts of arrays, see `model.py`).
    mcfg: model.ModelConfig. arch: the chosen architecture.
    expert_bias: float32[Lm, E] Loss-Free bias (Glm4Moe's `e_score_correction_bias`) or None.

  Returns:
    dict name -> float32 numpy array.
  """
  p = _to_numpy(params)
  d, h, k = mcfg.d_model, mcfg.num_heads, mcfg.head_dim
  out = {"model.embed_tokens.weight": p["embedding"], "model.norm.weight": p["final_norm"]["scale"],
         "lm_head.weight": p["lm_head"].T}
  moe_ids = mcfg.moe_layer_ids
  for i in range(mcfg.num_layers):
    lp, pre = p[f"layers_{i}"], f"model.layers.{i}."
    out[pre + "input_layernorm.weight"] = lp["attn_norm"]["scale"]
    out[pre + "post_attention_layernorm.weight"] = lp["ffn_norm"]["scale"]
    for name in ("q", "k", "v"):  # [D, H, Dh] -> [H * Dh, D], head-major like HF's view
      out[f"{pre}self_attn.{name}_proj.weight"] = lp["attn"][f"w{name}"].reshape(d, h * k).T
      if arch == QWEN2_MOE:
        out[f"{pre}self_attn.{name}_proj.bias"] = np.zeros(h * k, np.float32)
    out[pre + "self_attn.o_proj.weight"] = lp["attn"]["wo"].reshape(h * k, d).T
    f = lp["ffn"]
    if i not in moe_ids:
      out.update(_mlp(pre + "mlp.", f))
      continue
    moe = pre + ("block_sparse_moe." if arch == MIXTRAL else "mlp.")
    out[moe + "gate.weight"] = f["router"].T
    names = ("w1", "w3", "w2") if arch == MIXTRAL else ("gate_proj", "up_proj", "down_proj")
    for e in range(mcfg.moe.num_experts):
      for name, w in zip(names, (f["wi_gate"][e].T, f["wi_up"][e].T, f["wo"][e].T)):
        out[f"{moe}experts.{e}.{name}.weight"] = w
    if arch == QWEN2_MOE:  # zero shared expert: sigmoid(0) * 0 adds exactly 0
      out.update(_zero_mlp(moe + "shared_expert.", d, 1))
      out[moe + "shared_expert_gate.weight"] = np.zeros((1, d), np.float32)
    elif arch == GLM4_MOE:
      width = shared_width(mcfg) * mcfg.moe.d_ff
      out.update(_mlp(moe + "shared_experts.", f["shared"], width) if "shared" in f else
                 _zero_mlp(moe + "shared_experts.", d, width))
      bias = np.zeros(mcfg.moe.num_experts, np.float32) if expert_bias is None else np.asarray(
          expert_bias, np.float32)[moe_ids.index(i)]
      out[moe + "gate.e_score_correction_bias"] = bias
  return {name: np.array(w, np.float32, order="C") for name, w in out.items()}  # own copies


def _host(x):
  import jax  # pylint: disable=g-import-not-at-top
  return np.asarray(jax.device_get(x))


def _to_numpy(tree):
  import jax  # pylint: disable=g-import-not-at-top
  from flax import linen as nn  # pylint: disable=g-import-not-at-top
  return jax.tree.map(lambda a: np.asarray(a, np.float32), jax.device_get(nn.unbox(tree)))


def _byte_chars():
  """GPT-2's byte -> printable character map (what the ByteLevel pre-tokenizer emits)."""
  keep = {*range(33, 127), *range(161, 173), *range(174, 256)}
  extra = iter(range(256, 512))
  return {b: chr(b if b in keep else next(extra)) for b in range(256)}


def bytes_hf_tokenizer(eos_id, max_len):
  """A Hugging Face fast tokenizer whose ids are the UTF-8 bytes (0..255), EOS `eos_id` (256).

  Like `data.tokenizers.BytesTokenizer`, except that the text "<|endoftext|>" becomes EOS.
  """
  import tokenizers  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  vocab = {c: b for b, c in _byte_chars().items()}
  tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[]))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                          use_regex=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  tok.add_special_tokens(["<|endoftext|>"])
  if tok.token_to_id("<|endoftext|>") != eos_id:
    raise ValueError(f"bytes tokenizer: EOS id {eos_id} is not 256")
  return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                              model_max_length=int(max_len))


def write_tokenizer(tok, mcfg, out, hf_tok=None):
  """Writes what a user needs to tokenize for the export; returns its description.

  Bytes: a Hugging Face tokenizer (tokenizer.json, so `AutoTokenizer` and lm-eval read it).
  SentencePiece: the run's model file as `tokenizer.model`. cl100k and synthetic: nothing (the
  description names them).

  Args:
    tok: the run's tokenizer (`data.tokenizers`). mcfg: model.ModelConfig. out: directory.
    hf_tok: `bytes_hf_tokenizer(...)` for a byte-level run (built before anything is written).

  Returns:
    dict: kind, vocab_size, eos_id, model_vocab_size and, where written, files.
  """
  info = {"kind": tok.name, "vocab_size": int(tok.vocab_size), "eos_id": int(tok.eos_id),
          "model_vocab_size": mcfg.vocab_size}
  if hf_tok is not None:
    info["files"] = sorted(os.path.basename(f) for f in hf_tok.save_pretrained(out))
  elif tok.name == "sentencepiece":
    shutil.copyfile(tok.model_path, os.path.join(out, "tokenizer.model"))
    info["files"] = ["tokenizer.model"]
  return info


def _import_export_libs():
  try:
    import safetensors.torch  # pylint: disable=g-import-not-at-top
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f"export needs torch, transformers and safetensors ({e}): pip install "
                      "-e .[export]") from None
  return torch, transformers, safetensors.torch


def check_config(cfg):
  """Architecture of a run's experiment config (ConfigDict), before anything is restored."""
  from simbal_jax import model as model_lib  # pylint: disable=g-import-not-at-top
  vocab = max(int(cfg.model.vocab_size), 1)  # 0: the tokenizer's; not needed for the choice
  return choose_architecture(model_lib.ModelConfig.from_config(cfg, vocab_size=vocab))


def export_run(workdir, out, dtype="float32", devices=None):
  """Restores the run in `workdir` and writes its Hugging Face export into `out`.

  Every check (dtype, libraries, architecture, Loss-Free bias) runs before `out` is touched.

  Args:
    workdir: run directory (config.json + checkpoints/), local or gs://.
    out: local output directory (created; files of the same names are replaced).
    dtype: "float32" or "bfloat16", the stored weights' dtype.
    devices: devices to restore onto (default: all).

  Returns:
    The `simbal_export.json` dict.

  Raises:
    ValueError / ImportError / FileNotFoundError: one line, nothing written.
  """
  import ml_collections  # pylint: disable=g-import-not-at-top
  from simbal_jax import env as env_lib  # pylint: disable=g-import-not-at-top
  from simbal_jax.runio import paths  # pylint: disable=g-import-not-at-top
  if dtype not in DTYPES:
    raise ValueError(f"--dtype={dtype!r}; valid: {', '.join(DTYPES)}")
  torch, transformers, st_torch = _import_export_libs()
  config_path = paths.resolve(workdir) / "config.json"
  if not config_path.exists():
    raise FileNotFoundError(f"{workdir}: no config.json (not a run directory)")
  arch = check_config(ml_collections.ConfigDict(json.loads(config_path.read_text())))
  if not hasattr(transformers, arch):
    raise ValueError(f"transformers {transformers.__version__} has no {arch}: upgrade it")
  env, state = env_lib.restore_run(workdir, devices)
  mcfg, cfg = env.mcfg, env.cfg
  if mcfg.moe is not None:
    check_expert_bias(mcfg, _host(state.expert_bias))
    m = mcfg.moe
    if ((m.dispatch == "capacity" and m.capacity_factor > 0)
        or (m.expert_buffer_factor > 0 and m.expert_overflow == "drop")):
      logging.warning("the run dropped assignments beyond expert capacity; the export is "
                      "dropless (equal to the run's model with moe.capacity_factor=0)")
  bias = _host(state.expert_bias) if arch == GLM4_MOE else None
  tensors = hf_tensors(state.params, mcfg, arch, bias)
  tok, max_len = env.datasets.tokenizer, int(cfg.train.seq_len)
  config = hf_config(mcfg, arch, max_len=max_len, eos_id=int(tok.eos_id), dtype=dtype)
  hf_tok = bytes_hf_tokenizer(int(tok.eos_id), max_len) if tok.name == "bytes" else None
  meta = {"architecture": arch, "dtype": dtype, "transformers_version": transformers.__version__,
          "run": str(workdir), "step": int(_host(state.step))}

  os.makedirs(out, exist_ok=True)
  torch_dtype = getattr(torch, dtype)
  keep_fp32 = ("e_score_correction_bias",)
  st_torch.save_file(
      {n: torch.from_numpy(w).to(torch.float32 if n.endswith(keep_fp32) else torch_dtype)
       for n, w in tensors.items()}, os.path.join(out, "model.safetensors"),
      metadata={"format": "pt"})
  meta["tokenizer"] = write_tokenizer(tok, mcfg, out, hf_tok)
  for name, obj in (("config.json", config), (META_FILE, meta)):
    with open(os.path.join(out, name), "w", encoding="utf-8") as f:
      json.dump(obj, f, indent=2)
  logging.info("exported %s (%s, %s, step %d) to %s", workdir, arch, dtype, meta["step"], out)
  return meta


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Too many command-line arguments: {argv[1:]}")
  if not flags.FLAGS.workdir or not flags.FLAGS.out:
    raise app.UsageError("--workdir and --out are required")
  if not flags.FLAGS["verbosity"].present:  # the libraries' INFO lines only with --verbosity
    from simbal_jax import main as main_lib  # pylint: disable=g-import-not-at-top
    main_lib.quiet_library_logs()
  try:
    meta = export_run(flags.FLAGS.workdir, flags.FLAGS.out, flags.FLAGS.dtype)
  except (ValueError, ImportError, FileNotFoundError) as e:
    sys.exit(f"export refused: {e}")
  print(f"{meta['architecture']} ({meta['dtype']}, step {meta['step']}) -> {flags.FLAGS.out}")


def _define_flags():
  flags.DEFINE_string("workdir", None,
                      "Run directory (config.json + checkpoints/), local or gs://.")
  flags.DEFINE_string("out", None, "Output directory (local) of the Hugging Face export.")
  flags.DEFINE_enum("dtype", "float32", DTYPES, "dtype of the stored weights.")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
