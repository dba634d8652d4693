"""The package as installed: a non-editable install trains from a directory outside the checkout.

This checkout is installed with pip (no dependencies, no build isolation, no network) into a
temporary folder, which alone is then on PYTHONPATH; every command runs in another temporary
folder. `simbal-train --config=demo:simbal` finds the installed config by name and trains;
`--help` lists the flags, the config names and the variants; a config path still works; an
unknown config name ends in one line.
"""
import json
import os
import subprocess
import sys

import pytest

from simbal_jax import balance
from simbal_jax.configs import base

from conftest import copy_package_sources
from conftest import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# demo:simbal shrunk to seconds: one MoE layer of 4 experts, 2 steps, one small evaluation
# (TensorBoard and the progress bar left on, so their packages run too).
TINY = ("--config.model.num_layers=1", "--config.model.d_model=32", "--config.moe.num_experts=4",
        "--config.train.seq_len=16", "--config.train.global_batch_size=8",
        "--config.train.num_steps=2", "--config.train.num_evals=1",
        "--config.train.eval_tokens=256", "--config.train.pes_tokens=0",
        "--config.data.max_docs=40", "--config.ckpt.enabled=False")


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
  """(site, env, cwd): the install folder, an environment that imports only from it, and a
  working directory outside the checkout."""
  tmp = tmp_path_factory.mktemp("packaging")
  src, site, cwd = tmp / "src", tmp / "site", tmp / "elsewhere"
  copy_package_sources(src)
  got = subprocess.run(
      [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
       "--no-build-isolation", "--target", str(site), str(src)],
      capture_output=True, text=True, timeout=300, check=False)
  assert got.returncode == 0, ("pip could not build the package offline (the test extra "
                               f"brings setuptools and wheel):\n{got.stderr[-3000:]}")
  cwd.mkdir()
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  # One CPU device, as a user's machine has (conftest.py gives this process 8 fake ones).
  env.update(PYTHONPATH=str(site), JAX_PLATFORMS="cpu", JAX_DISABLE_MOST_OPTIMIZATIONS="1",
             XLA_FLAGS=xla_flags())
  return site, env, cwd


def _run(installed, *args, console_script=True):
  site, env, cwd = installed
  command = ([str(site / "bin" / "simbal-train")] if console_script
             else [sys.executable, "-m", "simbal_jax.main"])
  return subprocess.run(command + list(args), cwd=cwd, env=env, capture_output=True, text=True,
                        timeout=300, check=False)


def test_imports_come_from_the_install(installed):
  site, env, cwd = installed
  modules = ("simbal_jax", "simbal_jax.main", "simbal_jax.configs.demo",
             "simbal_jax.experiments.convergence")
  got = subprocess.run(
      [sys.executable, "-c", "import importlib, sys\nfor m in sys.argv[1:]: "
       "print(importlib.import_module(m).__file__)", *modules],
      cwd=cwd, env=env, capture_output=True, text=True, timeout=120, check=True)
  files = got.stdout.split()
  assert len(files) == len(modules)
  for f in files:
    assert os.path.realpath(f).startswith(os.path.realpath(site) + os.sep), f


@pytest.mark.slow
def test_config_name_trains_outside_the_checkout(installed):
  workdir = installed[2] / "run"
  got = _run(installed, "--config=demo:simbal", f"--workdir={workdir}", *TINY)
  assert got.returncode == 0, got.stderr[-3000:]
  with open(workdir / "metrics.jsonl", encoding="utf-8") as f:
    records = [json.loads(line) for line in f]
  assert any(r["step"] == 2 and "train/simbal" in r for r in records)
  assert any("eval/loss" in r for r in records)
  assert any(n.startswith("events.") for n in os.listdir(workdir / "tb"))


@pytest.mark.parametrize("console_script", [True, False])
def test_help_lists_flags_config_names_and_variants(installed, console_script):
  got = _run(installed, "--help", console_script=console_script)
  text = " ".join(got.stdout.split())
  for token in ("--config", "--workdir", "demo:simbal", *base.variants(), *balance.METHODS):
    assert token in text, (token, got.stdout)
  for name in ("base", "demo", "small", "moe_m", "moe_l", "dense_m", "dense_l"):
    assert name in text, (name, got.stdout)


def test_a_config_file_path_still_works_and_wins_over_a_name(installed):
  """--config=demo.py loads ./demo.py where there is one (the installed demo elsewhere)."""
  site, env, cwd = installed
  own = cwd / "own"
  own.mkdir()
  (own / "demo.py").write_text("def get_config(arg=None):\n"
                               "  raise ValueError(f'local demo.py, variant {arg}')\n")
  got = subprocess.run([str(site / "bin" / "simbal-train"), "--config=demo.py:simbal",
                        f"--workdir={own / 'unused'}"],
                       cwd=own, env=env, capture_output=True, text=True, timeout=300, check=False)
  lines = [line for line in got.stderr.splitlines() if line.strip()]
  assert got.returncode == 2 and len(lines) == 1, got.stderr
  assert lines[0].endswith("--config=demo.py:simbal: local demo.py, variant simbal"), lines[0]


def test_unknown_config_name_is_one_line(installed):
  got = _run(installed, "--config=nope:simbal", f"--workdir={installed[2] / 'unused'}")
  lines = [line for line in got.stderr.splitlines() if line.strip()]
  assert got.returncode == 2 and len(lines) == 1, got.stderr
  assert "no such config name 'nope'" in lines[0] and "demo, dense_l" in lines[0]
  assert not os.path.exists(installed[2] / "unused")


# The extras: the core install is jax and numpy; the train extra is the training stack.

def _setup_cfg():
  import configparser  # pylint: disable=g-import-not-at-top
  cfg = configparser.ConfigParser()
  cfg.read(os.path.join(ROOT, "setup.cfg"))
  return cfg


def _names(text):
  import re  # pylint: disable=g-import-not-at-top
  lines = [s.strip() for s in text.splitlines() if s.strip() and not s.strip().startswith("#")]
  return {re.match(r"[A-Za-z0-9._-]+", s).group(0).lower() for s in lines}


def test_core_requirements_are_jax_and_numpy_and_train_has_the_stack():
  cfg = _setup_cfg()
  assert _names(cfg["options"]["install_requires"]) == {"jax", "numpy"}
  extras = cfg["options.extras_require"]
  assert {"flax", "optax", "orbax-checkpoint", "grain", "tensorflow-datasets", "ml-collections",
          "tensorboardx", "matplotlib", "tokamax", "sentencepiece", "pyarrow"} <= _names(
              extras["train"])
  assert not _names(extras["train"]) & {"jax", "numpy"}


def test_optional_extras():
  extras = _setup_cfg()["options.extras_require"]
  assert _names(extras["wandb"]) == {"wandb"} and "wandb" in _names(extras["test"])
  assert "equinox" in _names(extras["test"])  # README's Equinox example is tested
  gcs = [line.strip() for line in extras["gcs"].splitlines() if line.strip()]
  assert any(line.startswith("etils[") and "epath-gcs" in line for line in gcs), gcs
  assert "google-cloud-storage" in _names(extras["gcs"])
  with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
    readme = f.read()
  assert 'pip install -e ".[train,tpu,gcs]"' in readme  # the TPU VM's line


def test_min_versions_pin_the_train_extra_too():
  import re  # pylint: disable=g-import-not-at-top
  with open(os.path.join(ROOT, "Makefile"), encoding="utf-8") as f:
    makefile = f.read()
  extras = re.search(r"min_requirements\.py --extras=(\S+)", makefile).group(1)
  assert set(extras.split(",")) >= {"train", "test"}
  # make install, make test: uv, and pip where uv fails
  assert re.search(r'uv pip install -q --python \S+ -e "\.\[train,test', makefile)
  assert re.search(r'pip install -q -e "\.\[train,test', makefile)
  got = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "min_requirements.py"),
                        f"--extras={extras}"], capture_output=True, text=True, check=True)
  pins = got.stdout.split()
  assert {"jax==0.8.2", "numpy==2.0.0", "flax==0.10.4", "optax==0.2.5", "pytest==8.0.0"} <= set(
      pins)


_PURE_WITHOUT_THE_STACK = r'''
import sys
# The training stack made unimportable: `import flax` (etc.) raises ImportError.
for name in ("flax", "optax", "orbax", "etils", "ml_collections", "grain", "tensorflow_datasets",
             "tensorboardX", "matplotlib", "tokamax", "absl", "pyarrow", "sentencepiece",
             "array_record", "tqdm", "zstandard"):
  sys.modules[name] = None
import importlib, simbal_jax
for m in sorted(simbal_jax.PURE_MODULES):
  importlib.import_module("simbal_jax." + m)
print("ok", len(simbal_jax.PURE_MODULES))
'''

_TRAIN_WITHOUT_THE_STACK = r'''
import importlib.metadata as md
version = md.version
def fake(name):  # these two distributions are "not installed"
  if name in ("flax", "optax"):
    raise md.PackageNotFoundError(name)
  return version(name)
md.version = fake
import simbal_jax.losses  # a pure module: fine
import simbal_jax.{module}
'''


def test_pure_modules_import_without_the_training_stack():
  got = subprocess.run([sys.executable, "-c", _PURE_WITHOUT_THE_STACK], cwd=ROOT,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
                       timeout=120, check=False)
  assert got.returncode == 0, got.stderr[-3000:]
  assert got.stdout.split() == ["ok", "9"]


@pytest.mark.parametrize("module", ["train", "moe", "data.pipeline"])
def test_a_training_module_without_the_stack_names_the_extra(module):
  got = subprocess.run([sys.executable, "-c", _TRAIN_WITHOUT_THE_STACK.format(module=module)],
                       cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True,
                       text=True, timeout=120, check=False)
  assert got.returncode == 1
  last = got.stderr.strip().splitlines()[-1]
  assert last == (f"ImportError: simbal_jax.{module.split('.')[0]} needs the training stack "
                  "(missing: flax, optax): pip install 'simbal_jax[train]'"), got.stderr


def test_the_check_passes_with_the_stack_installed():
  import simbal_jax  # pylint: disable=g-import-not-at-top
  assert simbal_jax.missing_training_stack() == []
