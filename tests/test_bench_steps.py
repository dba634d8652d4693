"""experiments/bench_steps.py: train-step timing and MFU, the memory estimate against the
compiled step, and the routing-overhead rows, on tiny configs. No timing thresholds (CPU times
are not checked)."""

import jax
import pytest

from simbal_jax.experiments import bench_steps

import conftest

TINY_SHAPE = "2:4:32:16"  # K:E:D:F
FAST = dict(warmup=1, iters=2, input_sets=2, seed=0)


def tiny_config(method="lbl"):
  """The tests' tiny config with one layer, expert d_ff 16, batch 4 (random tokens, no data)."""
  return conftest.tiny_config(method, model=dict(num_layers=1), moe=dict(d_ff=16),
                              train=dict(global_batch_size=4))


def _positive(row, *keys):
  for k in keys:
    assert row[k] > 0, (k, row[k])


def test_train_step_mfu():
  row = bench_steps.bench_train_step(tiny_config("simbal"), devices=jax.devices()[:1],
                                     peak_tflops=1.0, **FAST)
  assert row["method"] == "simbal:0.1" and row["devices"] == 1  # the terms, unnamed
  assert row["tokens_per_step"] == 4 * 16
  _positive(row, "step_ms", "tokens_per_s", "flops_per_token", "mfu", "first_call_s")
  assert abs(row["tokens_per_s"] - 64 / (row["step_ms"] * 1e-3)) < 1e-6 * row["tokens_per_s"]
  # MFU = model FLOPs per second over the peak (1 TFLOP/s, one device)
  assert row["mfu"] == pytest.approx(row["flops_per_token"] * row["tokens_per_s"] / 1e12)


@pytest.mark.slow
def test_routing_rows():
  res = bench_steps.bench_routing(tiny_config(), ["none", "lbl", "simbal"], TINY_SHAPE, 64, 2,
                                  devices=jax.devices()[:1], **FAST)
  assert [r["part"] for r in res["losses"]] == ["router_fwd_bwd", "dispatch_plan", "lbl_fwd_bwd",
                                                "simbal_fwd_bwd"]
  for r in res["losses"]:
    _positive(r, "ms")
  assert [s["method"] for s in res["train_steps"]] == ["none", "lbl", "simbal"]
  for s in res["train_steps"]:
    _positive(s, "step_ms", "tokens_per_s")
    assert s["mfu"] is None  # no peak given
  assert res["train_steps"][0]["overhead_vs_none"] == 0.0


def test_memory_row_compares_the_estimate_with_the_compiled_step():
  from simbal_jax.experiments import bench_lib  # pylint: disable=g-import-not-at-top
  cfg = tiny_config("lbl")
  row = bench_steps.bench_memory(cfg, devices=jax.devices()[:1])
  env = bench_lib.build_env(cfg, jax.devices()[:1])
  gib = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)) / 2**30
  state_gib = gib(env.abstract)
  # XLA's arguments are the train state and the batch: the state's bytes plus 2 x B x L int32.
  batch_gib = 2 * 4 * 16 * 4 / 2**30
  assert abs(row["xla_args_gib"] - state_gib - batch_gib) < 1e-6
  assert abs(row["est_params_gib"] - gib(env.abstract.params)) < 1e-12
  _positive(row, "xla_temp_gib", "est_activations_gib", "temp_vs_est")
  assert row["peak_gib"] is None  # CPU: no memory stats
