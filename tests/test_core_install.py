"""`pip install simbal_jax` with no extras, in a fresh virtualenv: the pure modules work there.

The checkout's sources are installed (a regular, non-editable install; its requirements from
the package index or pip's cache, jax and numpy alone) into a new virtualenv without the
training stack. There the losses give SimBal and the LBL of a random router (checked against
NumPy), Flax is not importable, and importing a training module fails with one line naming the
`train` extra. About a minute with pip's cache warm (the venv, the build, jax's wheels).
"""
import json
import os
import subprocess
import venv

import pytest

from conftest import copy_package_sources

# Distributions of the train extra that must not come with the core install.
TRAINING_STACK = ("flax", "optax", "orbax-checkpoint", "etils", "ml-collections", "grain",
                  "tensorflow-datasets", "tensorboardX", "matplotlib", "tokamax", "absl-py")

_CHECK = r'''
import importlib, importlib.metadata, json, sys
import numpy as np
import jax
from simbal_jax import balance, dispatch, eval_metrics, init, losses, metrics, routing
from simbal_jax import specialization

out = {}
try:
  import flax  # noqa: F401
  out["flax"] = "importable"
except ImportError as e:
  out["flax"] = f"{type(e).__name__}: {e}"
kernel = 0.1 * jax.random.normal(jax.random.key(1), (16, 4))
x = jax.random.normal(jax.random.key(0), (64, 16))
routed = routing.route(x @ kernel, top_k=2)
out["simbal"] = float(losses.simbal(kernel))
out["lbl"] = float(losses.load_balancing(routed.probs, routed.expert_index, scope="batch"))
k = np.asarray(kernel, np.float64)
out["simbal_np"] = float(np.abs(k.T @ k - np.eye(4)).sum())
idx = np.asarray(routed.expert_index)
f = np.bincount(idx.ravel(), minlength=4) / idx.size
out["lbl_np"] = float(4 * (f * np.asarray(routed.probs, np.float64).mean(0)).sum())
out["errors"] = {}
for name in ("simbal_jax.train", "simbal_jax.moe", "simbal_jax.model"):
  try:
    importlib.import_module(name)
    out["errors"][name] = None
  except ImportError as e:
    out["errors"][name] = f"{type(e).__name__}: {e}"
out["installed"] = sorted(d.metadata["Name"] for d in importlib.metadata.distributions())
out["origin"] = losses.__file__
print(json.dumps(out))
'''


@pytest.mark.slow
def test_core_install_has_the_losses_and_no_training_stack(tmp_path):
  src, env_dir = tmp_path / "src", tmp_path / "venv"
  copy_package_sources(src)
  venv.create(env_dir, with_pip=True)
  python = str(env_dir / "bin" / "python")
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PIP_REQUIRE_VIRTUALENV")}
  env.update(JAX_PLATFORMS="cpu", PIP_DISABLE_PIP_VERSION_CHECK="1")
  got = subprocess.run([python, "-m", "pip", "install", "--quiet", str(src)], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=600, check=False)
  assert got.returncode == 0, f"pip install (no extras) failed:\n{got.stderr[-3000:]}"
  got = subprocess.run([python, "-c", _CHECK], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=300, check=False)
  assert got.returncode == 0, got.stderr[-3000:]
  out = json.loads(got.stdout.strip().splitlines()[-1])
  assert os.path.realpath(out["origin"]).startswith(os.path.realpath(env_dir) + os.sep)
  normal = {n.lower().replace("_", "-") for n in out["installed"]}
  assert {"jax", "numpy", "simbal-jax"} <= normal
  assert not normal & {n.lower() for n in TRAINING_STACK}, normal
  assert out["flax"].startswith(("ModuleNotFoundError", "ImportError")), out["flax"]
  assert out["simbal"] == pytest.approx(out["simbal_np"], rel=1e-5)
  assert out["lbl"] == pytest.approx(out["lbl_np"], rel=1e-5)
  for name, error in out["errors"].items():
    assert error is not None and "\n" not in error, (name, error)
    assert error.startswith(f"ImportError: {name} needs the training stack (missing: ")
    assert error.endswith("pip install 'simbal_jax[train]'"), error
