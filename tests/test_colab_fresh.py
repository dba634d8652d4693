"""colab/simbal_demo.ipynb from a fresh runtime: nothing installed but Jupyter's execution stack.

A new virtualenv gets nbclient, nbformat and ipykernel alone (pip, from the package index or its
cache). The checkout's working tree is committed into a new git repository in a temporary
folder, which stands for the repository's URL: the test sets the first cell's REPO_URL form
field to its file:// URL and REF to its branch, as a user sets them in Colab's form. nbclient
(in that virtualenv) then runs every cell headless in one kernel of that virtualenv, started
in a folder outside any checkout, with SIMBAL_NOTEBOOK_TINY=1 (12 steps) and the CPU jax build
(SIMBAL_ACCELERATOR=cpu): the first cell clones the URL, pip-installs it with the train extra as
a regular package, and the next cells import it in the same kernel, without a restart.

Checked: every cell ran, once, in one kernel process (one pid from the first cell to the last,
execution counts 1..N); run again, the first cell installs nothing; simbal_jax is imported from the virtualenv's site-packages, installed
from the clone without an editable pointer (direct_url.json, no .pth or __editable__ finder
naming the clone); both methods trained. Several minutes (pip installs the training stack:
about 1 GB with pip's cache warm); `make test-install` runs it, not `make test`.
"""
import json
import os
import shutil
import subprocess
import sys
import time
import venv

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_colab import set_fields  # noqa: E402  pylint: disable=g-import-not-at-top

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "colab", "simbal_demo.ipynb")
BRANCH = "main"
CELL_TIMEOUT_S = 1200  # the setup cell: pip installs the training stack
# Imported in the runtime: where simbal_jax came from, how pip installed it, and the kernel.
_AFTER_SETUP = 'import os\nprint("KERNEL_PID", os.getpid())'
_LAST = r'''
import importlib.metadata, json, os, sys, sysconfig
import simbal_jax
dist = importlib.metadata.distribution("simbal_jax")
site = sysconfig.get_paths()["purelib"]
pointers = []  # .pth files and editable finders in site-packages that name the clone
for name in os.listdir(site):
  path = os.path.join(site, name)
  if (name.endswith(".pth") or name.startswith("__editable__")) and os.path.isfile(path):
    with open(path, errors="replace") as f:
      if REPO in f.read() or "simbal" in name.lower():
        pointers.append(name)
print("RESULT", json.dumps({
    "pid": os.getpid(), "prefix": sys.prefix, "site": site, "file": simbal_jax.__file__,
    "repo": REPO, "direct_url": json.loads(dist.read_text("direct_url.json") or "{}"),
    "pointers": pointers, "in_path": [p for p in sys.path if p.startswith(REPO)]}))
'''
_RUNNER = r'''
import json, sys, time
import nbclient, nbformat
from jupyter_client import KernelManager
from jupyter_client.kernelspec import KernelSpecManager
notebook, kernels, work, out, timeout = sys.argv[1:]
nb = nbformat.read(notebook, as_version=4)
km = KernelManager(kernel_name="fresh", kernel_spec_manager=KernelSpecManager(kernel_dirs=[kernels]))
client = nbclient.NotebookClient(nb, km=km, timeout=int(timeout),
                                 resources={"metadata": {"path": work}})
t0 = time.time()
try:
  client.execute()
finally:
  nbformat.write(nb, out)
  print("SECONDS", time.time() - t0)
'''


def _git(cwd, *args):
  return subprocess.run(["git", "-c", "user.name=test", "-c", "user.email=test@example.com",
                         "-c", "commit.gpgsign=false", *args], cwd=cwd, check=True,
                        capture_output=True, text=True).stdout


def _snapshot(dest):
  """A new git repository at `dest` whose one commit (branch BRANCH) is the working tree's
  files: tracked and untracked, ignored ones left out; what the test installs."""
  files = _git(ROOT, "ls-files", "-z", "--cached", "--others", "--exclude-standard").split("\0")
  os.makedirs(dest)
  for name in filter(None, files):
    src = os.path.join(ROOT, name)
    if os.path.isfile(src):  # a file deleted but not yet committed is skipped
      os.makedirs(os.path.dirname(os.path.join(dest, name)), exist_ok=True)
      shutil.copy2(src, os.path.join(dest, name))
  _git(dest, "init", "-q", "-b", BRANCH)
  _git(dest, "add", "-A")
  _git(dest, "commit", "-q", "-m", "working tree")


def _env(tmp, env_dir):
  """The runtime's environment: none of this test session's Python, jax or simbal settings."""
  drop = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "XLA_FLAGS", "MPLBACKEND",
          "PIP_REQUIRE_VIRTUALENV", "TPU_ACCELERATOR_TYPE")
  env = {k: v for k, v in os.environ.items()
         if k not in drop and not k.startswith(("JAX_", "SIMBAL_", "PYTEST_"))}
  env.update(PATH=os.pathsep.join([str(env_dir / "bin"), env.get("PATH", "")]),
             JAX_PLATFORMS="cpu", SIMBAL_ACCELERATOR="cpu", SIMBAL_NOTEBOOK_TINY="1",
             SIMBAL_NOTEBOOK_WORKDIR=str(tmp / "runs"), PIP_DISABLE_PIP_VERSION_CHECK="1")
  return env


def _text(cell):
  """A cell's printed output (the notebook file keeps multi-line text as a list of lines)."""
  return "".join("".join(o["text"]) for o in cell["outputs"] if o["output_type"] == "stream")


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_notebook_runs_from_a_fresh_runtime(tmp_path, record_property):
  repo, env_dir, work = tmp_path / "repo", tmp_path / "venv", tmp_path / "work"
  _snapshot(str(repo))
  work.mkdir()
  venv.create(env_dir, with_pip=True)
  python = str(env_dir / "bin" / "python")
  env = _env(tmp_path, env_dir)
  got = subprocess.run([python, "-m", "pip", "install", "-q", "nbclient", "nbformat", "ipykernel"],
                       cwd=work, env=env, capture_output=True, text=True, timeout=600, check=False)
  assert got.returncode == 0, got.stderr[-3000:]

  with open(NOTEBOOK, encoding="utf-8") as f:
    nb = json.load(f)
  setup = nb["cells"][1]
  setup["source"] = set_fields("".join(setup["source"]), REPO_URL=f"file://{repo}", REF=BRANCH)
  # Added: the pid after the setup, the setup cell run again (installs nothing), a last report.
  extra = [{"cell_type": "code", "id": cid, "metadata": {}, "outputs": [],
            "execution_count": None, "source": source}
           for cid, source in (("after-setup", _AFTER_SETUP), ("setup-again", setup["source"]),
                               ("last", _LAST))]
  nb["cells"] = nb["cells"][:2] + extra[:2] + nb["cells"][2:] + extra[2:]
  (tmp_path / "in.ipynb").write_text(json.dumps(nb))
  kernel_dir = tmp_path / "kernels" / "fresh"
  kernel_dir.mkdir(parents=True)
  (kernel_dir / "kernel.json").write_text(json.dumps(
      {"argv": [python, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
       "display_name": "fresh runtime", "language": "python"}))

  t0 = time.time()
  got = subprocess.run(
      [python, "-c", _RUNNER, str(tmp_path / "in.ipynb"), str(tmp_path / "kernels"), str(work),
       str(tmp_path / "out.ipynb"), str(CELL_TIMEOUT_S)],
      cwd=work, env=env, capture_output=True, text=True, timeout=2400, check=False)
  seconds = time.time() - t0
  record_property("wall_s", round(seconds, 1))
  print(f"fresh runtime: notebook (pip install included) executed in {seconds:.1f} s")
  assert got.returncode == 0, (got.stdout + got.stderr)[-6000:]

  with open(tmp_path / "out.ipynb", encoding="utf-8") as f:
    cells = [c for c in json.load(f)["cells"] if c["cell_type"] == "code"]
  # Every cell ran once, in order, in one kernel (a restart resets the execution count).
  assert [c["execution_count"] for c in cells] == list(range(1, len(cells) + 1))
  assert not [o for c in cells for o in c["outputs"] if o["output_type"] == "error"]
  setup_out, by_id = _text(cells[0]), {c["id"]: _text(c) for c in cells}
  assert f"file://{repo} at {BRANCH} in " in setup_out, setup_out
  assert "installing " in setup_out and "[train]" in setup_out, setup_out
  assert "Restart session" not in setup_out, setup_out  # the cell's restart warning
  assert "CpuDevice" in setup_out, setup_out
  pid = int(by_id["after-setup"].split()[-1])
  again = by_id["setup-again"]
  assert "nothing to install" in again and "Restart session" not in again, again
  result = json.loads(by_id["last"].split("RESULT ", 1)[1])
  assert result["pid"] == pid  # the same kernel process from the setup to the last cell
  assert os.path.realpath(result["prefix"]) == os.path.realpath(env_dir)
  # Imported from site-packages, not from the clone; pip's record: a folder, not editable.
  assert os.path.realpath(result["file"]).startswith(os.path.realpath(result["site"]) + os.sep)
  assert not os.path.realpath(result["file"]).startswith(os.path.realpath(result["repo"]))
  assert result["direct_url"].get("url") == "file://" + result["repo"], result["direct_url"]
  assert not result["direct_url"].get("dir_info", {}).get("editable", False), result
  assert result["pointers"] == [] and result["in_path"] == [], result
  train = by_id["train"]
  for method in ("lbl", "simbal"):
    assert f"{method}: done at step 12, validation loss " in train, train
    assert (tmp_path / "runs" / method / "seed0" / "metrics.jsonl").exists()
