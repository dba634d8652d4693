"""Range checks of the config's counts, intervals and coefficients (env.prepare_config).

Each field of `RANGES` is checked before anything is built: an error is one line naming the
field, its value and its range. 0 is accepted only where configs/base.py documents it as "off"
or "auto" (`ckpt.every`, `opt.warmup_steps`, `opt.grad_clip`, ...). `check_allowed` checks that
`ckpt.allow_config_change` names only fields or groups of the config. The data fields are
checked by the data module (`data.pipeline`), the balancing terms by `step.StepConfig`, the mesh
by `sharding.validate`, and the model's structure by `model.ModelConfig`.
"""

import difflib
import math

from simbal_jax.runio import rundir

INF = math.inf

# field: (lowest, highest, lowest included, highest included, integer)
RANGES = {
    # counts of at least one
    "model.d_model": (1, INF, True, False, True),
    "model.num_layers": (1, INF, True, False, True),
    "model.num_heads": (1, INF, True, False, True),
    "model.d_ff": (1, INF, True, False, True),
    "model.moe_every": (1, INF, True, False, True),
    "moe.top_k": (1, INF, True, False, True),
    "moe.d_ff": (1, INF, True, False, True),
    "moe.sinkhorn_iters": (1, INF, True, False, True),
    "train.seq_len": (1, INF, True, False, True),
    "train.global_batch_size": (1, INF, True, False, True),
    "train.grad_accum": (1, INF, True, False, True),
    "train.eval_tokens": (1, INF, True, False, True),
    "ckpt.max_to_keep": (1, INF, True, False, True),
    "log.every": (1, INF, True, False, True),
    # counts where 0 means "off" / "auto" / "derive" (documented in configs/base.py)
    "model.vocab_size": (0, INF, True, False, True),
    "moe.num_experts": (0, INF, True, False, True),
    "moe.shared_expert_d_ff": (0, INF, True, False, True),
    "moe.num_groups": (0, INF, True, False, True),
    "train.num_steps": (0, INF, True, False, True),
    "train.token_budget": (0, INF, True, False, True),
    "train.num_evals": (0, INF, True, False, True),
    "train.eval_every": (0, INF, True, False, True),
    "train.pes_tokens": (0, INF, True, False, True),
    "ckpt.every": (0, INF, True, False, True),
    "opt.warmup_steps": (0, INF, True, False, True),
    "log.hist_tokens": (0, INF, True, False, True),
    # coefficients and rates
    "model.rope_theta": (0, INF, False, False, False),
    "model.norm_eps": (0, INF, False, False, False),
    "moe.router_init_scale": (0, INF, False, False, False),
    "opt.peak_lr": (0, INF, False, False, False),
    "opt.warmup_init_frac": (0, 1, True, True, False),
    "opt.final_frac": (0, 1, True, True, False),
    "opt.b1": (0, 1, True, False, False),
    "opt.b2": (0, 1, True, False, False),
    "opt.eps": (0, INF, False, False, False),
    "opt.weight_decay": (0, INF, True, False, False),
    "opt.grad_clip": (0, INF, True, False, False),
    "train.z_loss": (0, INF, True, False, False),
    "balance.lf_rate": (0, INF, True, False, False),
    "log.peak_tflops": (0, INF, True, False, False),
    "log.undecided_delta": (0, 1, True, True, False),
}


def _range_text(lo, hi, lo_in, hi_in):
  if hi == INF:
    return f">= {lo}" if lo_in else f"> {lo}"
  return f"in {'[' if lo_in else '('}{lo}, {hi}{']' if hi_in else ')'}"


def check_ranges(flat):
  """Raises ValueError for the first field of `RANGES` outside its range.

  Args:
    flat: dict, the config flattened to dotted names (`rundir.flatten(cfg.to_dict())`); fields
      it lacks are not checked.
  """
  for name, (lo, hi, lo_in, hi_in, integer) in RANGES.items():
    if name not in flat:
      continue
    v = flat[name]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (
        integer and not float(v).is_integer()):
      raise ValueError(f"{name} must be {'an integer' if integer else 'a number'}, got {v!r}")
    ok = (v >= lo if lo_in else v > lo) and (v <= hi if hi_in else v < hi)
    if not ok:
      raise ValueError(f"{name} must be {_range_text(lo, hi, lo_in, hi_in)}, got {v}")


def check_allowed(allow, flat):
  """Raises ValueError when `ckpt.allow_config_change` names a field or group the config lacks.

  Args:
    allow: str, "" / "all" / comma-separated fields and groups ("opt.peak_lr", "balance").
    flat: dict, the flattened config.
  """
  unknown = []
  for tok in sorted(rundir.parse_allowed(allow)):
    if tok == "all" or tok in flat or (tok.endswith(".") and any(k.startswith(tok) for k in flat)):
      continue
    unknown.append(tok.rstrip("."))
  if unknown:
    groups = sorted({k.split(".")[0] for k in flat})
    close = difflib.get_close_matches(unknown[0], list(flat) + groups, n=1, cutoff=0.6)
    raise ValueError(
        f"ckpt.allow_config_change names no field of the config: {', '.join(unknown)}"
        + (f"; did you mean {close[0]}?" if close else "; give dotted field names "
           "(opt.peak_lr), groups (balance) or all"))


def check(cfg):
  """All of the above for a ConfigDict (configs/base.py); raises ValueError (one line)."""
  flat = rundir.flatten(cfg.to_dict())
  check_ranges(flat)
  check_allowed(flat.get("ckpt.allow_config_change", ""), flat)
