"""experiments/bench_lib.py: the benchmark's shapes and named train-step presets."""
import pytest

from simbal_jax import model
from simbal_jax.experiments import bench_lib


def test_bad_shape_names_the_valid_ones():
  with pytest.raises(ValueError, match="moe_m"):
    bench_lib.parse_shape("huge")


def test_presets_match_the_peer_run():
  cfg = bench_lib.preset_config("bench_s")
  m, e = cfg.model, cfg.moe
  assert (m.num_layers, m.d_model, m.num_heads, m.vocab_size) == (8, 1024, 16, 50304)
  assert (e.num_experts, e.top_k, e.d_ff) == (64, 8, 512)
  assert (cfg.train.seq_len, cfg.train.global_batch_size) == (2048, 8)
  assert m.dtype == m.param_dtype == "bfloat16" and cfg.data.source == "synthetic"
  mm = bench_lib.preset_config("moe_m")
  assert (mm.model.d_model, mm.moe.num_experts, mm.moe.top_k, mm.train.global_batch_size) == (
      768, 32, 4, 8)
  for name in ("tiny_s", "tiny_m"):
    tiny = bench_lib.preset_config(name)
    tiny.moe.num_groups = 1
    assert model.count_params(model.ModelConfig.from_config(tiny))["total"] < 2_000_000
  with pytest.raises(ValueError, match="bench_s"):
    bench_lib.preset_config("huge")
