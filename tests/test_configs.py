"""Configs: every paper experiment loads, variants map to the right fields, errors are clear."""
import os

from absl import flags
from ml_collections import config_flags
import pytest

from simbal_jax.configs import base, demo, dense_l, dense_m, moe_l, moe_m
from simbal_jax import env as env_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("mod", [moe_m, moe_l])
@pytest.mark.parametrize("variant,terms,loss_free,gating", [
    # Every variant that existed before the term registry, with the terms and coefficients it
    # meant then (lbl_coef 0.01, simbal_coef 0.1), plus the ablation aliases.
    ("lbl", "lbl:0.01", False, "softmax_topk"), ("simbal", "simbal:0.1", False, "softmax_topk"),
    ("none", "", False, "softmax_topk"), ("loss_free", "", True, "softmax_topk"),
    ("lf_lbl", "lbl:0.01", True, "softmax_topk"), ("lf_simbal", "simbal:0.1", True,
                                                   "softmax_topk"),
    ("loss_free_sigmoid", "", True, "sigmoid"), ("lf_lbl_sigmoid", "lbl:0.01", True, "sigmoid"),
    ("lf_simbal_sigmoid", "simbal:0.1", True, "sigmoid"),
    ("simbal_lbl", "simbal:0.1+lbl:0.01", False, "softmax_topk"),
    ("simbal_coef1", "simbal:1", False, "softmax_topk"),
    ("simbal_coef0.01,lbl_sigmoid", "lbl:0.01", False, "sigmoid"),
    ("simbal_unit", "simbal_unit:0.1", False, "softmax_topk"),
    ("colnorm", "colnorm:0.1", False, "softmax_topk"),
])
def test_variants(mod, variant, terms, loss_free, gating):
  cfg = mod.get_config(variant)
  assert cfg.balance.terms == terms and cfg.balance.loss_free is loss_free
  assert cfg.moe.gating == gating
  assert cfg.moe.num_experts == 32 and cfg.moe.top_k == 4
  assert cfg.model.vocab_size == 100277 and cfg.data.tokenizer == "cl100k"


def test_paper_values():
  m, l = moe_m.get_config(), moe_l.get_config()
  assert (m.model.d_model, m.model.num_layers, m.model.num_heads, m.moe.d_ff) == (768, 8, 8, 768)
  assert (l.model.d_model, l.model.num_layers, l.model.num_heads, l.moe.d_ff) == (1536, 12, 12,
                                                                                   1536)
  assert (m.model.rope_theta, l.model.rope_theta) == (1e4, 1e5)
  assert (m.opt.peak_lr, l.opt.peak_lr) == (5e-4, 3e-4)
  for c in (m, l):
    assert c.opt.weight_decay == 0.01 and c.opt.warmup_steps == 2000
    assert c.opt.warmup_init_frac == 0.1 and c.opt.final_frac == 0.1
    assert c.train.z_loss == 1e-5 and c.balance.terms == "lbl:0.01"
    assert c.moe.router_init == "orthogonal"
    assert c.moe.capacity_factor <= 0 and c.moe.dispatch == "ragged"  # dropless, grouped
    assert c.train.global_batch_size * c.train.seq_len == 1_048_576  # tokens per step
    assert c.train.global_batch_size // c.train.grad_accum == (16 if c is m else 8)
    # steps cover the token budget and no more than one extra step
    assert c.train.num_steps == 0  # derived from the budget after command-line overrides
    steps = env_lib.prepare_config(c).train.num_steps
    tokens = steps * c.train.global_batch_size * c.train.seq_len
    assert c.train.token_budget <= tokens < c.train.token_budget + (
        c.train.global_batch_size * c.train.seq_len)
  assert m.train.token_budget == 19_900_000_000 and l.train.token_budget == 78_600_000_000


def test_sweep_and_dense():
  for x in ("1", "0.1", "0.01"):
    c = moe_m.get_config("simbal_coef" + x)
    assert c.balance.terms == f"simbal:{x}" and not c.balance.loss_free
  for d, ref in ((dense_m, 768), (dense_l, 1536)):
    c = d.get_config()
    assert c.moe.num_experts == 0 and c.model.d_ff == 4 * ref and c.balance.terms == ""


def test_unknown_method_lists_valid():
  with pytest.raises(ValueError, match="simbal_lbl"):
    moe_m.get_config("bogus")
  with pytest.raises(ValueError, match="lf_simbal"):
    base.apply_variant(base.get_config(), "bogus_sigmoid")


@pytest.mark.parametrize("variant,match", [
    ("moe.num_experts=4", "--config.moe.num_experts"),
    ("simbal_coef1_sigmoid", "simbal_coef<number>"), ("bogus_softmax", "lf_simbal")])
def test_bad_variant_names_the_problem(variant, match):
  with pytest.raises(ValueError, match=match):
    demo.get_config(variant)


def test_budget_follows_batch_overrides():
  c = moe_m.get_config()
  c.train.global_batch_size = 256  # a command-line override, applied after get_config
  steps = env_lib.prepare_config(c).train.num_steps
  assert steps == -(-19_900_000_000 // (256 * 2048))  # ceil, computed independently


def test_config_flags_override():
  argv = ["prog", f"--config={ROOT}/configs/moe_m.py:lf_simbal_sigmoid",
          "--config.moe.num_experts=16", "--config.train.num_steps=7"]
  fv = flags.FlagValues()  # override flags are defined from the argv seen at definition time
  config_flags.DEFINE_config_file("config", None, flag_values=fv, lock_config=True,
                                  sys_argv=argv)
  fv(argv)
  cfg = fv.config
  assert cfg.moe.num_experts == 16 and cfg.train.num_steps == 7
  assert cfg.balance.terms == "simbal:0.1" and cfg.balance.loss_free
  assert cfg.moe.gating == "sigmoid"
  argv2 = ["prog", f"--config={ROOT}/configs/demo.py", "--config.moe.not_a_field=1"]
  fv2 = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, flag_values=fv2, lock_config=True,
                                  sys_argv=argv2)
  with pytest.raises(Exception):  # locked config: unknown field
    fv2(argv2)


def test_configs_import_from_outside_the_checkout(tmp_path):
  """configs/ is installed as simbal_jax.configs: no sys.path edits, any working directory."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  out = subprocess.run(
      [sys.executable, "-c", "from simbal_jax.configs import demo; "
       "print(demo.get_config('simbal').balance.terms)"],
      cwd=tmp_path, capture_output=True, text=True, check=True,
      env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
  assert out.stdout.strip() == "simbal:0.1"
  for name in os.listdir(os.path.join(ROOT, "configs")):
    if name.endswith(".py"):
      text = open(os.path.join(ROOT, "configs", name), encoding="utf-8").read()
      assert "sys.path" not in text, name
