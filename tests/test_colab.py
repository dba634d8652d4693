"""colab/simbal_demo.ipynb: stored stripped with stable cell ids, its first cell's REPO_URL
field defaulting to setup.cfg's url, that cell's clone and install decisions (pip faked), and
the notebook executed headless (nbclient) at its tiny setting in a fresh kernel of this
interpreter: every cell runs, both methods finish, every plot is drawn, in well under 3 minutes.
tests/test_colab_fresh.py runs it from a fresh environment with nothing installed
(`make test-install`)."""
import configparser
import copy
import importlib.util
import json
import os
import re
import subprocess
import sys
import time

import pytest

from conftest import xla_flags

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))
_NOTEBOOK = os.path.join(_ROOT, "colab", "simbal_demo.ipynb")
_PLOTS = ("loss-plot", "load-plot", "gram-plot", "pes-plot", "prune-plot")
_BUDGET_S = 180  # the limit for the headless run


def _strip_tool():
  spec = importlib.util.spec_from_file_location(
      "strip_outputs", os.path.join(_ROOT, "colab", "strip_outputs.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def _load():
  with open(_NOTEBOOK, encoding="utf-8") as f:
    return f.read()


def test_notebook_is_stored_stripped_with_stable_ids():
  text = _load()
  nb = json.loads(text)
  strip = _strip_tool()
  assert strip.problems(nb) == [], "run: python colab/strip_outputs.py colab/simbal_demo.ipynb"
  assert text == strip.dumps(nb)  # formatted as nbformat writes it: clean diffs
  nbformat.validate(nbformat.reads(text, as_version=4))
  assert (nb["nbformat"], nb["nbformat_minor"]) >= (4, 5)
  ids = [c["id"] for c in nb["cells"]]
  assert len(set(ids)) == len(ids) and set(_PLOTS) <= set(ids)
  first = "".join(nb["cells"][1]["source"])
  assert first.startswith("REPO_URL = ")  # the one thing to set, at the top
  params = [c for c in nb["cells"] if "parameters" in c["metadata"].get("tags", [])]
  assert [c["id"] for c in params] == ["parameters"]


def _form_fields():
  """The first code cell's Colab form fields: {name: default}."""
  cell = "".join(json.loads(_load())["cells"][1]["source"])
  return {m.group(1): json.loads(m.group(2)) for m in
          re.finditer(r'^(\w+) = ("[^"]*")  # @param \{type:"string"\}$', cell, re.M)}


def test_repo_url_field_defaults_to_the_declared_url():
  setup = configparser.ConfigParser()
  setup.read(os.path.join(_ROOT, "setup.cfg"))
  url = setup["metadata"]["url"]
  assert url.startswith("https://")
  assert _form_fields() == {"REPO_URL": url, "REF": ""}  # a fork changes both lines together


def test_strip_removes_outputs_and_run_metadata():
  nb = json.loads(_load())
  ran = copy.deepcopy(nb)
  ran["metadata"]["widgets"] = {"application/vnd.jupyter.widget-state+json": {"x": 1}}
  ran["metadata"]["language_info"]["version"] = "3.12.0"
  ran["metadata"]["colab"]["provenance"] = [{"file_id": "abc"}]
  code = [c for c in ran["cells"] if c["cell_type"] == "code"]
  code[0].update(execution_count=3, outputs=[{"output_type": "stream", "name": "stdout",
                                              "text": ["hi\n"]}])
  code[0]["metadata"]["colab"] = {"base_uri": "https://localhost:8080/"}
  code[1]["id"] = code[2]["id"]  # a duplicate id
  strip = _strip_tool()
  found = strip.problems(ran)
  assert "notebook metadata" in found and any("outputs" in p for p in found)
  assert any(": id" in p for p in found)
  clean = strip.strip(ran)
  assert strip.problems(clean) == []
  assert [c["source"] for c in clean["cells"]] == [c["source"] for c in nb["cells"]]
  assert clean["metadata"] == nb["metadata"]


_FAKE_PIP = """
import subprocess, sys
_run = subprocess.run
def _no_pip(cmd, *args, **kwargs):  # records the install the cell would make; git runs
  if list(cmd[:3]) == [sys.executable, "-m", "pip"]:
    print("PIP", " ".join(cmd[3:]))
    return subprocess.CompletedProcess(cmd, 0)
  return _run(cmd, *args, **kwargs)
subprocess.run = _no_pip
"""


def set_fields(cell, **fields):
  """The cell's source with the Colab form fields (REPO_URL=..., REF=...) set, as a user sets
  them in the form."""
  for name, value in fields.items():
    cell, n = re.subn(rf'^{name} = "[^"]*"(?=  # @param)', f"{name} = {json.dumps(value)}", cell,
                      flags=re.M)
    assert n == 1, name
  return cell


def _run_setup_cell(tmp_path, repo_url, runtime="cpu", ref=""):
  """Runs the first code cell (plain Python) with REPO_URL and REF set, in a new interpreter in
  `tmp_path`, outside any checkout, with pip replaced by a recorder and the runtime's accelerator faked (an
  `nvidia-smi` that lists a GPU; a TPU through SIMBAL_ACCELERATOR, since /dev cannot be faked
  here: tools/accelerator.py's own detection is tested in test_accelerator.py); returns the
  CompletedProcess."""
  import subprocess  # pylint: disable=g-import-not-at-top
  nb = json.loads(_load())
  cell = set_fields("".join(nb["cells"][1]["source"]), REPO_URL=repo_url, REF=ref)
  script = tmp_path / "setup_cell.py"
  script.write_text(_FAKE_PIP + cell)
  env = {k: v for k, v in os.environ.items()
         if k not in ("PYTHONPATH", "SIMBAL_ACCELERATOR", "TPU_ACCELERATOR_TYPE")}
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  if runtime == "gpu":
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: fake'\n")
    (bin_dir / "nvidia-smi").chmod(0o755)
  elif runtime == "tpu":
    env["SIMBAL_ACCELERATOR"] = "tpu"
  env["PATH"] = os.pathsep.join([str(bin_dir), env.get("PATH", "")])
  return subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, text=True,
                        capture_output=True, timeout=120)


def test_setup_cell_without_checkout_or_url_stops_with_one_line(tmp_path):
  proc = _run_setup_cell(tmp_path, "")
  assert proc.returncode == 1 and "PIP" not in proc.stdout
  assert proc.stderr.strip() == ("No simbal_jax checkout found: set REPO_URL at the top of this "
                                 "cell to the repository's clone URL.")


def _git(*args):
  return subprocess.run(["git", "-C", _ROOT, *args], capture_output=True, text=True,
                        check=True).stdout.strip()


@pytest.mark.parametrize("ref", ["", "head-commit"])
def test_setup_cell_clones_the_url_and_keeps_a_working_jax(tmp_path, ref):
  commit = _git("rev-parse", "HEAD")
  if ref == "head-commit":  # a commit, not a branch: the cell clones the history and checks out
    ref = commit
  # The checkout as a file:// URL stands for the repository's URL.
  proc = _run_setup_cell(tmp_path, "file://" + _ROOT, ref=ref)
  assert proc.returncode == 0, proc.stderr
  src = tmp_path / "simbal_jax_src"
  assert (src / "setup.cfg").exists()
  assert subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True,
                        text=True, check=True).stdout.strip() == commit
  # The clone is installed as a regular (not editable) package, with jax pinned to the
  # installed version (which satisfies setup.cfg's minimum), so pip cannot replace it.
  import jax  # pylint: disable=g-import-not-at-top
  assert f"PIP install -q {src}[train] jax=={jax.__version__}\n" in proc.stdout
  assert "jax " + jax.__version__ in proc.stdout
  assert "Restart session" not in proc.stdout  # the warning: nothing was imported before


def test_setup_cell_reports_a_url_it_cannot_clone_in_one_line(tmp_path):
  proc = _run_setup_cell(tmp_path, "file://" + str(tmp_path / "nothing-here"), ref="v1")
  assert proc.returncode == 1 and "PIP" not in proc.stdout
  assert proc.stderr.startswith("Could not clone REPO_URL 'file://")
  assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


_PLUGINS = {"gpu": ("jax-cuda12-plugin", "jax-cuda13-plugin"), "tpu": ("libtpu", "libtpu-nightly")}


def _installed(name):
  import importlib.metadata  # pylint: disable=g-import-not-at-top
  try:
    return bool(importlib.metadata.version(name))
  except importlib.metadata.PackageNotFoundError:
    return False


@pytest.mark.parametrize("runtime", ["gpu", "tpu"])
def test_setup_cell_installs_the_accelerator_extra_over_a_cpu_jax(tmp_path, runtime):
  proc = _run_setup_cell(tmp_path, "file://" + _ROOT, runtime)
  assert proc.returncode == 0, proc.stderr
  if any(_installed(p) for p in _PLUGINS[runtime]):
    # The runtime's plugin is here (libtpu of the `aot` extra on a CPU machine): jax is kept.
    import jax  # pylint: disable=g-import-not-at-top
    assert f"PIP install -q {tmp_path}/simbal_jax_src[train] jax=={jax.__version__}\n" in proc.stdout
    assert "jax for the" not in proc.stdout
  else:  # a CPU-only jax: the runtime's extra, jax unpinned
    assert f"PIP install -q {tmp_path}/simbal_jax_src[train,{runtime}]\n" in proc.stdout
    assert f"missing: jax for the {runtime.upper()}" in proc.stdout


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
  """The notebook after a headless run (SIMBAL_NOTEBOOK_TINY=1), and its wall time in s."""
  from jupyter_client import KernelManager  # pylint: disable=g-import-not-at-top
  from jupyter_client.kernelspec import KernelSpecManager  # pylint: disable=g-import-not-at-top
  tmp = tmp_path_factory.mktemp("notebook")
  kernel_dir = tmp / "kernels" / "simbal-test"
  kernel_dir.mkdir(parents=True)
  with open(kernel_dir / "kernel.json", "w") as f:  # this interpreter, whatever else is installed
    json.dump({"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
               "display_name": "simbal test", "language": "python"}, f)
  env = dict(os.environ, SIMBAL_NOTEBOOK_TINY="1", SIMBAL_NOTEBOOK_WORKDIR=str(tmp / "runs"),
             JAX_PLATFORMS="cpu", MPLBACKEND="module://matplotlib_inline.backend_inline")
  env["PYTHONPATH"] = os.pathsep.join([_ROOT] + [p for p in [env.get("PYTHONPATH")] if p])
  # One CPU device, as a user's runtime has (conftest.py gives this process 8 fake ones).
  env["XLA_FLAGS"] = xla_flags()
  nb = nbformat.reads(_load(), as_version=4)
  km = KernelManager(kernel_name="simbal-test",
                     kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(tmp / "kernels")]))
  client = nbclient.NotebookClient(nb, km=km, timeout=_BUDGET_S,
                                   resources={"metadata": {"path": os.path.join(_ROOT, "colab")}})
  t0 = time.time()
  client.execute(env=env)  # raises CellExecutionError (with the cell's traceback) on an error
  return nb, time.time() - t0, tmp / "runs"


def _cell(nb, cid):
  (cell,) = [c for c in nb.cells if c.get("id") == cid]
  return cell


def _text(cell):
  return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")


@pytest.mark.slow
def test_notebook_runs_headless_within_the_budget(executed):
  nb, seconds, runs = executed
  print(f"notebook executed in {seconds:.1f} s")
  assert seconds < _BUDGET_S
  assert "nothing to install" in _text(_cell(nb, "setup"))  # the checkout, already installed
  assert "CpuDevice" in _text(_cell(nb, "setup"))
  losses = _text(_cell(nb, "losses"))
  line = [l for l in losses.splitlines() if l.startswith("SimBal of an orthogonal init")][0]
  assert abs(float(line.split(":")[1])) < 1e-4
  assert "MaxVio, dead experts" in losses
  train = _text(_cell(nb, "train"))
  for method in ("lbl", "simbal"):
    assert re.search(rf"^{method}: done at step 12, validation loss \d+\.\d+", train, re.M), train
    assert (runs / method / "seed0" / "metrics.jsonl").exists()
  simbal_gap = float(re.search(r"^simbal: .*‖RᵀR−I‖₁ (\S+)$", train, re.M).group(1))
  lbl_gap = float(re.search(r"^lbl: .*‖RᵀR−I‖₁ (\S+)$", train, re.M).group(1))
  assert simbal_gap < lbl_gap  # SimBal keeps the router near orthonormal
  assert "experts/token" in _text(_cell(nb, "prune-plot"))
  tensorboard = _text(_cell(nb, "tensorboard"))
  if importlib.util.find_spec("tensorboard"):
    assert "TensorBoard extension loaded" in tensorboard  # %load_ext ran headless
  else:
    assert "TensorBoard is not installed" in tensorboard


@pytest.mark.slow  # executes the notebook (fixture `executed`)
@pytest.mark.parametrize("cid", _PLOTS)
def test_every_plot_is_drawn(executed, cid):
  outputs = _cell(executed[0], cid).outputs
  images = [o for o in outputs if "image/png" in o.get("data", {})]
  assert len(images) == 1, [o.get("data", {}).keys() for o in outputs]
