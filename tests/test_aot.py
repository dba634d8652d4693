"""experiments/aot.py: the train step compiled ahead of time by the TPU compiler (libtpu) for an
abstract v5e:2x2 slice, and the HLO accounting of collectives on hand-written modules."""
import importlib.util

import pytest

from simbal_jax.configs import demo
from simbal_jax.experiments import aot

HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None


def test_collectives_count_loop_trips_and_one_channel_once():
  """A while body of known trip count 3 with an all-gather of bf16[4,8] (64 bytes), a loop
  `i < 5` without a known trip count around a collective-permute of f32[2,2] (16 bytes), an
  all-reduce of f32[16] (64 bytes) split into start / done fusions on one channel, and a
  reduce-scatter of f32[2,2] (16 bytes) in the entry: 3 * 64, 5 * 16, 64 and 16 bytes. Then
  two more all-gathers of bf16[4,8] and two reduce-scatters of f32[2,2] that reuse channel 1,
  as XLA's TPU compiler emits them (the all-gathers told apart by their async collective names,
  the reduce-scatters by being two in one computation): each counts."""
  hlo = """
HloModule m

%body (p: (s32[], bf16[1,8])) -> (s32[], bf16[1,8]) {
  %p = (s32[], bf16[1,8]) parameter(0)
  %ag = bf16[4,8]{1,0} all-gather(%x), channel_id=7, dimensions={0}
  ROOT %t = (s32[], bf16[1,8]) tuple(%i, %y)
}

%start (a: f32[16]) -> (f32[16], /*index=1*/f32[16]) {
  %ar = f32[16]{0} all-reduce(%a), channel_id=9, to_apply=%add
  ROOT %c = (f32[16], /*index=1*/f32[16]) custom-call(%ar), custom_call_target="AsyncCollectiveStart"
}

%done (a: f32[16]) -> f32[16] {
  %ar2 = f32[16]{0} all-reduce(%a), channel_id=9, to_apply=%add
  ROOT %k = f32[16]{0} custom-call(%ar2), custom_call_target="tpu_custom_call"
}

%cond2 (q: (s32[], f32[2,2])) -> pred[] {
  %c5 = s32[]{:T(128)} constant(5), metadata={op_name="x"}
  %q = (s32[], f32[2,2]) parameter(0)
  %i = s32[]{:T(128)} get-tuple-element(%q), index=0
  ROOT %lt = pred[]{:T(512)} compare(%i, %c5), direction=LT
}

%body2 (q: (s32[], f32[2,2])) -> (s32[], f32[2,2]) {
  %cp = f32[2,2]{1,0} collective-permute-start(%z), channel_id=13, source_target_pairs={{0,1}}
  ROOT %t2 = (s32[], f32[2,2]) tuple(%i, %cp)
}

ENTRY %main (x: bf16[1,8]) -> f32[2] {
  %w = (s32[], bf16[1,8]) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  %w2 = (s32[], f32[2,2]) while(%init2), condition=%cond2, body=%body2
  %f1 = (f32[16], /*index=1*/f32[16]) fusion(%a), kind=kCustom, calls=%start
  %f2 = f32[16]{0} fusion(%f1), kind=kCustom, calls=%done
  %g1 = bf16[4,8]{1,0} all-gather(%x), channel_id=1, frontend_attributes={async_collective_name="all-gather-start"}
  %g2 = bf16[4,8]{1,0} all-gather(%x), channel_id=1, frontend_attributes={async_collective_name="all-gather-start.1"}
  %rs1 = f32[2,2]{1,0} reduce-scatter(%z), channel_id=1, dimensions={0}
  %rs2 = f32[2,2]{1,0} reduce-scatter(%z), channel_id=1, dimensions={0}
  ROOT %rs = f32[2,2]{1,0} reduce-scatter(%z), channel_id=11, dimensions={0}
}
"""
  got = aot.hlo_collectives(hlo)
  assert got["collectives"] == {"all-gather": (3 + 2) * 4 * 8 * 2, "all-to-all": 0,
                                "reduce-scatter": 3 * 2 * 2 * 4, "all-reduce": 16 * 4,
                                "collective-permute": 5 * 2 * 2 * 4}
  assert got["kernels"] == ["tpu_custom_call"]
  assert got["unknown_trip_counts"] == 0


def test_oom_figure_and_unknown_generation():
  msg = ("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space "
         "hbm. Used 27.30G of 15.75G hbm. Exceeded hbm capacity by 11.55G.")
  assert aot._oom_figure(msg) == (27.30, 15.75)
  assert aot._oom_figure("Used 512.00M of 15.75G hbm")[0] == pytest.approx(0.5)
  assert aot._oom_figure("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory "
                         "required for HLO temporaries (17.42G) exceeds available HBM "
                         "(15.75G).") == (17.42, 15.75)
  with pytest.raises(ValueError, match="v9x"):
    aot.chip_specs("v9x:2x2")


@pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu (the TPU compiler) is not installed: "
                    "pip install -e .[aot]")
def test_tiny_config_compiles_for_v5e_2x2():
  cfg = demo.get_config("simbal")
  cfg.moe.dispatch = "ragged"
  cfg.mesh.data, cfg.mesh.fsdp = 1, -1
  row = aot.report(cfg, "v5e:2x2")
  assert row["chips"] == 4 and row["mesh"] == {"data": 1, "fsdp": 4, "expert": 1, "model": 1}
  assert row["dispatch"] == "ragged:megablox"  # the TPU kernel, chosen by the compile platform
  assert "tpu_custom_call" in row["kernels"]  # the Pallas kernel is in the compiled step
  assert row["fits"] is True and row["hbm_gib_per_chip"] == 16.0
  for key in ("args_gib", "temp_gib", "out_gib", "total_gib"):
    assert row[key] > 0
  assert row["total_gib"] == pytest.approx(row["args_gib"] + row["out_gib"] - row["alias_gib"]
                                           + row["temp_gib"])
  assert 0.5 < row["flops_ratio"] < 1.5  # the kernel's own cost, not a dense count
  assert row["collectives"]["all-gather"] > 0  # FSDP gathers the parameters
  assert row["roofline"]["step_s"] == max(row["roofline"][k]
                                          for k in ("compute_s", "hbm_s", "ici_s"))
  assert row["eval"]["total_gib"] > 0
