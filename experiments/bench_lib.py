"""Helpers of experiments/benchmark.py: round-robin timing, environment, shapes, presets, tables."""

import datetime
import os
import platform
import time

import jax
import numpy as np

from simbal_jax import memory

# name -> (top_k K, experts E, d_model D, expert d_ff F)
SHAPES = {"bench_s": (8, 64, 1024, 512), "moe_m": (4, 32, 768, 768),
          "olmoe": (8, 64, 2048, 1024)}
# Datasheet HBM bandwidth (GB/s) by device kind substring (the FLOP/s peaks are in
# simbal_jax.memory.PEAK_TFLOPS).
KNOWN_GBPS = {"H100": 3350.0, "H200": 4800.0}


# ----------------------------------------------------------------------------------------------
# Train-step presets (synthetic random tokens; no data is read).


def preset_config(name):
  """ConfigDict of a named train-step benchmark.

  bench_s: the peer's run (`shared/bench/peer_olmoe_bench.py` defaults, HF OLMoE): 8 layers,
    d 1024, 16 heads, 64 experts top-8, expert d_ff 512, vocab 50304, seq 2048, batch 8,
    bf16 parameters and compute, AdamW; LBL 0.01 as OLMoE trains. (OLMoE also has QK-norm,
    which this model does not.)
  moe_m: configs/moe_m.py (the paper's MoE-M, bf16 compute, float32 master weights) at batch 8.
  tiny_s / tiny_m: the same settings shrunk for CPU smoke runs (2 layers, d 64, seq 64).
  Dispatch is left at the config's ("capacity"); pass --config.moe.dispatch=ragged etc.
  """
  from simbal_jax.configs import base  # pylint: disable=g-import-not-at-top
  from simbal_jax.configs import moe_m  # pylint: disable=g-import-not-at-top
  tiny = name.startswith("tiny_")
  if name in ("bench_s", "tiny_s"):
    cfg = base.get_config("lbl")
    m, e = cfg.model, cfg.moe
    m.vocab_size, m.d_model, m.num_layers, m.num_heads = 50304, 1024, 8, 16
    m.dtype = m.param_dtype = "bfloat16"
    e.num_experts, e.top_k, e.d_ff = 64, 8, 512
    e.capacity_factor, e.num_groups = 1.25, 0
    cfg.opt.warmup_steps = 10
  elif name in ("moe_m", "tiny_m"):
    cfg = moe_m.get_config("lbl")
    cfg.moe.capacity_factor = 1.25
  else:
    raise ValueError(f"unknown preset {name!r}; valid: bench_s, moe_m, tiny_s, tiny_m")
  cfg.data.source = "synthetic"
  cfg.train.seq_len, cfg.train.global_batch_size = 2048, 8
  cfg.train.num_steps = 1000
  cfg.ckpt.enabled = False
  if tiny:
    cfg.model.vocab_size, cfg.model.d_model, cfg.model.num_layers = 512, 64, 2
    cfg.model.num_heads, cfg.moe.d_ff, cfg.train.seq_len = 4, 32, 64
  return cfg

# ----------------------------------------------------------------------------------------------
# Timing and environment.


def timed(calls, *, warmup, iters):
  """Times several variants round-robin, so that background load hits them alike.

  Args:
    calls: dict name -> `call(i)` returning arrays to wait for (i counts that variant's calls).
    warmup: untimed calls per variant after its first (compiling) call.
    iters: timed calls per variant; iteration j times every variant once, in order.

  Returns:
    dict name -> dict(median_ms, p10_ms, p90_ms, min_ms, first_call_s, iters).
  """
  if iters < 1:
    raise ValueError(f"iters must be >= 1, got {iters}")
  first, ms = {}, {name: [] for name in calls}
  for name, call in calls.items():
    t0 = time.perf_counter()
    jax.block_until_ready(call(0))
    first[name] = time.perf_counter() - t0
    for i in range(warmup):
      jax.block_until_ready(call(1 + i))
  for j in range(iters):
    for name, call in calls.items():
      t0 = time.perf_counter()
      jax.block_until_ready(call(1 + warmup + j))
      ms[name].append((time.perf_counter() - t0) * 1e3)
  out = {}
  for name, m in ms.items():
    m = np.asarray(m)
    out[name] = dict(median_ms=float(np.median(m)), p10_ms=float(np.percentile(m, 10)),
                     p90_ms=float(np.percentile(m, 90)), min_ms=float(m.min()),
                     first_call_s=round(first[name], 3), iters=int(iters),
                     times_ms=[round(x, 4) for x in m.tolist()])
  return out


def peaks(peak_tflops=0.0, peak_gbps=0.0):
  """(TFLOP/s, GB/s) per device: flags if > 0, else datasheet by device kind, 989 on any GPU."""
  dev = jax.devices()[0]
  tf = memory.device_peak_tflops(dev, peak_tflops) or (989.0 if dev.platform == "gpu" else None)
  gb = peak_gbps if peak_gbps > 0 else next(
      (v for k, v in KNOWN_GBPS.items() if k in dev.device_kind), None)
  return tf, gb


def environment():
  dev = jax.devices()[0]
  return dict(platform=dev.platform, device_kind=dev.device_kind, device_count=jax.device_count(),
              jax_version=jax.__version__, python=platform.python_version(),
              cpu_count=os.cpu_count(), date=datetime.date.today().isoformat(),
              load_avg_1m=os.getloadavg()[0] if hasattr(os, "getloadavg") else None)


def parse_shape(name):
  """'moe_m' or 'K:E:D:F' -> (name, (K, E, D, F))."""
  if name in SHAPES:
    return name, SHAPES[name]
  parts = name.split(":")
  if len(parts) != 4 or not all(p.isdigit() for p in parts):
    raise ValueError(f"unknown shape {name!r}: use one of {sorted(SHAPES)} or 'K:E:D:F'")
  return name, tuple(int(p) for p in parts)



# ----------------------------------------------------------------------------------------------
# Report.


def _fmt(v, digits=4):
  if v is None:
    return "n/a"
  if isinstance(v, float):
    return f"{v:.{digits}g}"
  return str(v)


def table(rows, cols):
  """Plain-text table of `rows` (dicts) with (header, key[, digits]) columns."""
  cells = [[_fmt(r.get(c[1]), *(c[2:])) for c in cols] for r in rows]
  widths = [max(len(c[0]), *(len(x[i]) for x in cells)) for i, c in enumerate(cols)]
  lines = ["  ".join(c[0].rjust(w) for c, w in zip(cols, widths)),
           "  ".join("-" * w for w in widths)]
  lines += ["  ".join(x.rjust(w) for x, w in zip(row, widths)) for row in cells]
  return "\n".join(lines)


def vocab_size(cfg):
  """cfg.model.vocab_size, or the tokenizer's size when it is 0 (no data is loaded)."""
  if int(cfg.model.vocab_size) > 0:
    return int(cfg.model.vocab_size)
  if cfg.data.source == "synthetic":
    return int(cfg.data.synthetic.vocab_size) + 1
  if cfg.data.tokenizer == "sentencepiece":
    return int(cfg.data.sp_vocab_size)
  from simbal_jax.data import tokenizers  # pylint: disable=g-import-not-at-top  (stdlib only)
  known = {"bytes": tokenizers.BytesTokenizer.vocab_size, "cl100k": tokenizers.CL100K_VOCAB_SIZE}
  if cfg.data.tokenizer in known:
    return known[cfg.data.tokenizer]
  raise ValueError(f"set --config.model.vocab_size (tokenizer {cfg.data.tokenizer!r})")


def build_env(config, devices=None):
  """`env_lib.build(data=False)` for a config whose vocabulary is derived without loading data."""
  from simbal_jax import env as env_lib  # pylint: disable=g-import-not-at-top
  cfg = env_lib.prepare_config(config)
  cfg.model.vocab_size = vocab_size(cfg)
  return env_lib.build(cfg, devices=devices, data=False)
