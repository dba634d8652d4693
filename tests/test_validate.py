"""simbal_jax/validate.py: a config value out of range (or not finite) stops the run in one line
before anything is created."""
import os

import pytest

from simbal_jax import train

from conftest import tiny_config as tiny

@pytest.mark.parametrize("field,value", [("opt.peak_lr", float("nan")),
                                         ("balance.lf_rate", float("inf"))])
def test_non_finite_config_is_rejected_before_anything(tmp_path, field, value):
  cfg = tiny()
  group, name = field.split(".")
  cfg[group][name] = value
  steps = []
  with pytest.raises(ValueError, match=f"{field}={value}"):
    train.train_and_evaluate(cfg, str(tmp_path / "run"), hooks=[lambda s, _: steps.append(s)])
  assert not steps and not os.path.exists(tmp_path / "run")  # nothing created on disk


@pytest.mark.parametrize("field,value,match", [
    ("ckpt.every", -1, "ckpt.every must be >= 0, got -1"),
    ("ckpt.max_to_keep", 0, "ckpt.max_to_keep must be >= 1, got 0"),
    ("log.every", 0, "log.every must be >= 1, got 0"),
    ("opt.warmup_steps", -10, "opt.warmup_steps must be >= 0, got -10"),
    ("opt.b1", 2.0, r"opt.b1 must be in \[0, 1\), got 2.0"),
    ("ckpt.allow_config_change", "bogus.field",
     "ckpt.allow_config_change names no field of the config: bogus.field"),
])
def test_bad_values_are_one_line_before_anything(tmp_path, field, value, match):
  cfg = tiny()
  group, name = field.split(".")
  cfg[group][name] = value
  with pytest.raises(ValueError, match=match) as err:
    train.train_and_evaluate(cfg, str(tmp_path / "run"))
  assert "\n" not in str(err.value) and not os.path.exists(tmp_path / "run")
