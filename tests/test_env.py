"""env.py: building a run's Env, and restoring a finished run (`restore_run`)."""

import os

import jax
import numpy as np
import pytest

from simbal_jax import env as env_lib
from simbal_jax import programs
from simbal_jax import train

from conftest import one_device, state_of, tiny_config

def test_restore_run_names_what_is_missing(tmp_path):
  for empty in ("", "  ", None):
    with pytest.raises(ValueError, match=r"^a run directory is needed \(--run=DIR"):
      env_lib.restore_run(empty)
  with pytest.raises(FileNotFoundError, match="no config.json"):
    env_lib.restore_run(str(tmp_path))


def test_prepare_config_derives_steps_and_refuses_in_one_line():
  cfg = tiny_config("lbl", steps=0)
  cfg.train.token_budget = 1000  # 8 x 16 tokens a step: ceil(1000 / 128) steps
  assert env_lib.prepare_config(cfg).train.num_steps == 8
  assert env_lib.tokens_per_step(env_lib.prepare_config(cfg)) == 8 * 16
  cfg.train.token_budget = 0
  with pytest.raises(ValueError, match="train.num_steps > 0 or train.token_budget > 0"):
    env_lib.prepare_config(cfg)
  cfg = tiny_config("lbl", steps=2)
  cfg.train.grad_accum = 3
  with pytest.raises(ValueError, match=r"^train.global_batch_size=8 not divisible by "
                                       r"train.grad_accum=3$"):
    env_lib.prepare_config(cfg)
  cfg = tiny_config("lbl", steps=2)
  cfg.train.eval_spacing = "cubic"
  with pytest.raises(ValueError, match=r"^train.eval_spacing='cubic'"):
    env_lib.prepare_config(cfg)


def test_num_groups_auto_is_one_per_batch_shard():
  cfg = tiny_config("lbl", steps=2)
  cfg.moe.num_groups = 0
  cfg.mesh.data, cfg.mesh.fsdp = 2, 4
  env_lib.resolve_num_groups(cfg, 8)
  assert cfg.moe.num_groups == 8  # the batch is split over data x fsdp (x expert)
  cfg.moe.num_groups, cfg.moe.dispatch = 0, "ragged"
  env_lib.resolve_num_groups(cfg, 8)
  assert cfg.moe.num_groups == 1


def test_a_dense_run_checkpoints_and_restores(tmp_path):
  """A dense model (no experts, no balancing) saves its state and restores it bit-exactly."""
  cfg = tiny_config("none", steps=2)
  cfg.moe.num_experts, cfg.balance.terms, cfg.balance.loss_free = 0, "", False
  cfg.ckpt.every = 1
  summary, state = train.train_and_evaluate(cfg, str(tmp_path), devices=one_device())
  assert summary["status"] == "done" and "eval/maxvio" not in summary
  assert os.path.isdir(tmp_path / "checkpoints" / "2")
  _, restored = env_lib.restore_run(str(tmp_path))
  jax.tree.map(np.testing.assert_array_equal, state_of(state), state_of(restored))


def test_equal_runs_share_their_programs_and_give_the_same_state(tmp_path):
  """Envs that differ only in what the programs do not read (seed, checkpointing, logging)
  share one jitted train step; anything the step reads (steps, balancing terms, mesh) gets its
  own; the eval step needs only the same model and mesh. A run on shared programs ends in the
  same state as one on fresh programs."""
  from simbal_jax import analysis, balance, evaluate  # pylint: disable=g-import-not-at-top
  one = jax.devices()[:1]
  build = lambda cfg, d: env_lib.build(cfg, str(tmp_path / d), devices=one)
  a = build(tiny_config("lbl", steps=4), "a")
  other = tiny_config("lbl", steps=4)
  other.seed, other.ckpt.every, other.log.every = 7, 2, 3
  b = build(other, "b")
  assert a.program_key == b.program_key
  assert env_lib.make_train_step(a) is env_lib.make_train_step(b)
  assert evaluate.make_eval_step(a) is evaluate.make_eval_step(b)
  assert env_lib.make_train_step(build(tiny_config("lbl", steps=5), "c")) is not (
      env_lib.make_train_step(a))  # the schedule's length is compiled in
  simbal = build(tiny_config("simbal", steps=4), "d")
  assert env_lib.make_train_step(simbal) is not env_lib.make_train_step(a)
  assert evaluate.make_eval_step(simbal) is evaluate.make_eval_step(a)  # the same model
  # init reads the model and the optimizer, not the balancing terms
  assert simbal.state_key == a.state_key and simbal.program_key != a.program_key
  lr = tiny_config("lbl", steps=4)
  lr.opt.peak_lr *= 2
  assert build(lr, "lr").state_key != a.state_key
  # the analyses of the evaluations (churn probe, expert copy and movement)
  batches = [{"inputs": np.zeros((8, 16), np.int32)}]
  trackers = [analysis.RoutingTracker(env.model, batches, probe_tokens=16, out_sharding=None)
              for env in (a, simbal)]
  for name in ("_route", "_copy", "_move"):
    assert getattr(trackers[0], name) is getattr(trackers[1], name), name
  assert env_lib.make_train_step(env_lib.build(
      tiny_config("lbl", steps=4), str(tmp_path / "e"), devices=jax.devices()[:2])) is not (
          env_lib.make_train_step(a))  # another mesh
  lbl = balance.TERMS["lbl"]
  try:  # the same term registered again (edited in a notebook): a new program
    balance.register("lbl", lambda *args: lbl.fn(*args), lbl.default_coef)
    assert env_lib.make_train_step(build(tiny_config("lbl", steps=4), "f")) is not (
        env_lib.make_train_step(a))
  finally:
    balance.TERMS["lbl"] = lbl

  runs, before = {}, env_lib.make_train_step(a)
  for name in ("first", "shared", "fresh"):  # "shared" reuses the programs "first" ran
    if name == "fresh":
      env_lib.clear_programs()
    cfg = tiny_config("lbl", steps=4)
    cfg.ckpt.enabled = False
    _, state = train.train_and_evaluate(cfg, str(tmp_path / name), devices=one)
    runs[name] = state_of(state)
    if name == "first":  # the run's init is the one program of its state_key
      programs.program("init", a.state_key, lambda: pytest.fail("init was not shared"))
  jax.tree.map(np.testing.assert_array_equal, runs["shared"], runs["first"])
  jax.tree.map(np.testing.assert_array_equal, runs["shared"], runs["fresh"])
  assert env_lib.make_train_step(a) is not before  # cleared: the fresh run made new programs
