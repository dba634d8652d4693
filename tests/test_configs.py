"""Configs: every paper experiment loads, variants map to the right fields, errors are clear."""
import os

from absl import flags
from ml_collections import config_flags
import pytest

from configs import base, demo, dense_l, dense_m, moe_l, moe_m
from simbal_jax import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("mod", [moe_m, moe_l])
@pytest.mark.parametrize("variant,method,gating", [
    ("lbl", "lbl", "softmax_topk"), ("simbal", "simbal", "softmax_topk"),
    ("none", "none", "softmax_topk"), ("loss_free", "loss_free", "softmax_topk"),
    ("lf_lbl", "lf_lbl", "softmax_topk"), ("lf_simbal", "lf_simbal", "softmax_topk"),
    ("loss_free_sigmoid", "loss_free", "sigmoid"), ("lf_lbl_sigmoid", "lf_lbl", "sigmoid"),
    ("lf_simbal_sigmoid", "lf_simbal", "sigmoid"), ("simbal_lbl", "simbal_lbl", "softmax_topk"),
])
def test_variants(mod, variant, method, gating):
  cfg = mod.get_config(variant)
  assert cfg.balance.method == method
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
    assert c.train.z_loss == 1e-5 and c.balance.lbl_coef == 0.01
    assert c.balance.simbal_coef == 0.1 and c.moe.router_init == "orthogonal"
    assert c.moe.capacity_factor <= 0  # dropless
    # steps cover the token budget and no more than one extra step
    assert c.train.num_steps == 0  # derived from the budget after command-line overrides
    steps = train.prepare_config(c).train.num_steps
    tokens = steps * c.train.global_batch_size * c.train.seq_len
    assert c.train.token_budget <= tokens < c.train.token_budget + (
        c.train.global_batch_size * c.train.seq_len)
  assert m.train.token_budget == 19_900_000_000 and l.train.token_budget == 78_600_000_000


def test_sweep_and_dense():
  for x in ("1", "0.1", "0.01"):
    c = moe_m.get_config("simbal_coef" + x)
    assert c.balance.method == "simbal" and c.balance.simbal_coef == float(x)
  for d, ref in ((dense_m, 768), (dense_l, 1536)):
    c = d.get_config()
    assert c.moe.num_experts == 0 and c.model.d_ff == 4 * ref and c.balance.method == "none"


def test_unknown_method_lists_valid():
  with pytest.raises(ValueError, match="simbal_lbl"):
    moe_m.get_config("bogus")
  with pytest.raises(ValueError, match="lf_simbal"):
    base.apply_variant(base.get_config(), "bogus_sigmoid")


def test_key_value_variant():
  c = demo.get_config("simbal,moe.num_experts=4,ckpt.async_save=false,train.num_steps=1e3")
  assert c.moe.num_experts == 4 and c.ckpt.async_save is False and c.balance.method == "simbal"
  assert c.train.num_steps == 1000 and isinstance(c.train.num_steps, int)


@pytest.mark.parametrize("variant,match", [
    ("train.num_steps=2.5", "train.num_steps"), ("moe.no_such_field=1", "moe.no_such_field"),
    ("simbal_coef1_sigmoid", "simbal_coef<number>"), ("opt.peak_lr=fast", "opt.peak_lr")])
def test_bad_variant_names_the_key(variant, match):
  with pytest.raises(ValueError, match=match):
    demo.get_config(variant)


def test_budget_follows_batch_overrides():
  c = moe_m.get_config()
  c.train.global_batch_size = 256  # a command-line override, applied after get_config
  steps = train.prepare_config(c).train.num_steps
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
  assert cfg.balance.method == "lf_simbal" and cfg.moe.gating == "sigmoid"
  argv2 = ["prog", f"--config={ROOT}/configs/demo.py", "--config.moe.not_a_field=1"]
  fv2 = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, flag_values=fv2, lock_config=True,
                                  sys_argv=argv2)
  with pytest.raises(Exception):  # locked config: unknown field
    fv2(argv2)


def test_config_methods_match_the_trainer():
  from simbal_jax import step  # pylint: disable=g-import-not-at-top
  assert base.METHODS == step.BALANCE_METHODS
