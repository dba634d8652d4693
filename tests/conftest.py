"""Test setup and shared helpers.

Set before jax is imported anywhere: 8 fake CPU devices, and one persistent XLA compilation
cache for the whole session (a temporary directory made by the first pytest process and
inherited through the environment by the xdist workers and by the subprocesses tests start):
the tests compile the same tiny models again and again (fresh closures, fresh processes), and
a repeated compile becomes a file read. The directory is removed when that process ends.
Every compile, in this process and in those it starts, is a fast one (most optimizations off,
no XLA CPU fusion emitters, one LLVM module per program: see below).

`tiny_config` is the one tiny training config the end-to-end tests derive theirs from,
`tiny_model_config` the model-level tests' tiny model, fixture `trained` a finished tiny run;
`losses_of` and `state_of` read a finished run back, `tree` fingerprints a directory;
`nan_loss_at_step` injects a divergence. The data tests write
their text corpora with `write_corpus` (module fixture `corpus`).
"""
import atexit
import hashlib
import os
import re
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  _flags += " --xla_force_host_platform_device_count=8"
# The tests' programs are tiny: they compile without most optimizations, in this process and
# in the subprocesses tests start, and without XLA CPU's fusion emitters, which at that level
# halve the compile time of a tiny train step (2.2 -> 1.1 s; with optimizations on they would
# lengthen it). The flag exists from jax 0.8.2 (the floor) on; an unknown XLA flag stops jax.
if "xla_cpu_use_fusion_emitters" not in _flags:
  _flags += " --xla_cpu_use_fusion_emitters=false"
# Nor is a program's LLVM module split into parts compiled on several threads: with both cores
# busy (two xdist workers) the split only adds work; one part cuts LLVM's time for a tiny init
# and train step by about a fifth (1.22 -> 0.99 s, measured 2026-12-07).
if "xla_cpu_parallel_codegen_split_count" not in _flags:
  _flags += " --xla_cpu_parallel_codegen_split_count=1"
os.environ["XLA_FLAGS"] = _flags.strip()
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "true")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _CACHE = tempfile.mkdtemp(prefix="simbal_jax_tests_xla_cache_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
  atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
  # Every computation, however small or quick to compile, is written to the cache.
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")

import jax  # noqa: E402

jax.config.update("jax_platforms", "cpu")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402


# The longest test modules, longest first (worker-seconds of `pytest --durations=0` summed per
# module on the 2-core machine, 2026-12-07: 65, 52, 37, 34, 33, 29, 28, 27 s; the next is 21 s).
_LONGEST = ("test_train", "test_step", "test_sharding", "test_multiprocess", "test_colab",
            "test_routers", "test_moe", "test_reliability")


def pytest_collection_modifyitems(items):
  """Module order: the longest modules (`_LONGEST`), then the other modules with tests marked
  slow, then the rest; each module's tests kept together. `make test` hands whole modules to
  its two xdist workers in this order (--dist loadscope, so that a module-scoped fixture is
  built once; --no-loadscope-reorder, so that xdist keeps this order rather than putting the
  modules with the most tests first): they start the long modules early and end together on
  short ones. (Measured: with xdist's order one worker ended 49 s after the other.)"""
  slow = {item.module.__name__ for item in items if item.get_closest_marker("slow")}

  def rank(item):
    name = item.module.__name__
    if name in _LONGEST:
      return _LONGEST.index(name)
    return len(_LONGEST) + (name not in slow)

  items.sort(key=rank)


def xla_flags(device_count=None):
  """XLA_FLAGS for a subprocess: this session's compile flags with `device_count` fake CPU
  devices (None: the platform's one device) in place of the session's 8."""
  flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ["XLA_FLAGS"])
  if device_count is not None:
    flags += f" --xla_force_host_platform_device_count={device_count}"
  return " ".join(flags.split())


def one_device():
  """[the first CPU device]: what an end-to-end test trains on when sharding is not its subject.
  On the session's 8 fake devices a tiny run compiles a partitioned program and steps 8 shards
  on 2 cores: about 2 s more at its first compile and 1 s more per repeat (measured
  2026-12-07). The sharding tests, the bit-exact SIGTERM resume (test_train.py), the moved
  workdir (test_reliability.py) and the two-process run keep all 8."""
  return jax.devices()[:1]


def tiny_config(method="lbl", steps=8, analysis=False, **sections):
  """configs/demo.py shrunk for end-to-end tests.

  2 layers, d_model 32, 2 heads, dense d_ff 64; 4 experts top-2 with d_ff 32; the synthetic
  corpus (vocab 64, 256 documents); seq_len 16, global batch 8, `steps` steps, warmup 2; one
  evaluation (at the end) of 128 tokens; async checkpoints every 4 steps; a metrics record every
  step, no progress bar, no TensorBoard. Without `analysis`, the eval-time analyses that cost
  compiles but that most tests do not read are off: final PES (train.pes_tokens), routing churn
  (log.churn_tokens), expert movement and the per-expert norms of the train step.

  Args:
    method: a variant of configs/demo.py ("lbl", "simbal", "lf_lbl", "none", "dense", ...).
    steps: train.num_steps.
    analysis: keep the demo config's PES, churn, expert movement and expert norms on.
    **sections: field overrides by config section, applied last, e.g.
      `tiny_config("lbl", train=dict(seq_len=12), moe=dict(num_groups=8))`.

  Returns:
    ml_collections.ConfigDict.
  """
  from simbal_jax.configs import demo  # pylint: disable=g-import-not-at-top
  cfg = demo.get_config(method)
  cfg.model.d_model, cfg.model.num_heads, cfg.model.d_ff = 32, 2, 64
  cfg.moe.num_experts, cfg.moe.top_k, cfg.moe.d_ff = 4, 2, 32
  cfg.data.source = "synthetic"
  cfg.data.synthetic.vocab_size = 64
  cfg.data.synthetic.num_docs = 256
  cfg.train.seq_len, cfg.train.global_batch_size = 16, 8
  cfg.train.num_steps, cfg.train.num_evals, cfg.train.eval_tokens = steps, 0, 128
  cfg.opt.warmup_steps = 2
  cfg.ckpt.every, cfg.ckpt.async_save = 4, True
  cfg.log.every, cfg.log.progress, cfg.log.tensorboard = 1, False, False
  if not analysis:
    cfg.train.pes_tokens, cfg.log.churn_tokens = 0, 0
    cfg.log.expert_movement = cfg.log.expert_norms = False
  for section, fields in sections.items():
    for name, value in fields.items():
      if name not in cfg[section]:
        raise KeyError(f"tiny_config: no field {section}.{name}")
      cfg[section][name] = value
  return cfg


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
  """A finished 6-step SimBal run of `tiny_config` on a byte-level text corpus, restored from
  disk on one device: (summary, env, state). Read by the experiments' tests (prune, pes,
  downstream)."""
  from simbal_jax import env as env_lib  # pylint: disable=g-import-not-at-top
  from simbal_jax import train  # pylint: disable=g-import-not-at-top
  docs = tmp_path_factory.mktemp("docs")
  for i in range(40):  # a byte-level text corpus, so lm-eval's text tasks can be tokenized
    (docs / f"doc{i}.txt").write_text(f"q{i}: a b x y zz a b a " * (5 + i % 7))
  cfg = tiny_config("simbal", steps=6)  # 4 experts, top-2
  cfg.data.update(source="text_files", globs=str(docs / "*.txt"), tokenizer="bytes",
                  eval_fraction=0.2)
  workdir = str(tmp_path_factory.mktemp("run"))
  summary, _ = train.train_and_evaluate(cfg, workdir, devices=jax.devices()[:1])
  env, state = env_lib.restore_run(workdir, devices=jax.devices()[:1])
  return summary, env, state


def tiny_model_config(moe=True, **fields):
  """A tiny model.ModelConfig for model-level tests (no training config).

  Vocab 61, d_model 32, 2 layers, 4 heads, d_ff 48, float32; with `moe` every block is MoE:
  4 experts top-2 of d_ff 16, dropless, orthogonal router.

  Args:
    moe: True, False (dense), or a dict of MoEConfig field overrides.
    **fields: ModelConfig field overrides.
  """
  from simbal_jax import model  # pylint: disable=g-import-not-at-top
  moe_cfg = None
  if moe:
    moe_args = dict(num_experts=4, top_k=2, d_ff=16, capacity_factor=0.0,
                    router_init="orthogonal")
    moe_args.update(moe if isinstance(moe, dict) else {})
    moe_cfg = model.MoEConfig(**moe_args)
  args = dict(vocab_size=61, d_model=32, num_layers=2, num_heads=4, d_ff=48, moe=moe_cfg,
              dtype="float32")
  args.update(fields)
  return model.ModelConfig(**args)


def nan_loss_at_step(monkeypatch, bad_step):
  """Makes the trainer's step report a NaN loss at `bad_step` (the fault is injected here, not
  by a hook in production code)."""
  from simbal_jax import env as env_lib  # pylint: disable=g-import-not-at-top
  real_make_train_step = env_lib.make_train_step

  def poisoned_make_train_step(env):
    step_fn = real_make_train_step(env)

    def poisoned(state, batch):
      state, metrics = step_fn(state, batch)
      if int(state.step) == bad_step:
        metrics = dict(metrics, **{"train/loss": jnp.float32(jnp.nan)})
      return state, metrics
    return poisoned

  monkeypatch.setattr(env_lib, "make_train_step", poisoned_make_train_step)


def losses_of(workdir):
  """{step: train/loss} of the run in `workdir` (its metrics.jsonl)."""
  from simbal_jax.runio import writers  # pylint: disable=g-import-not-at-top
  return {r["step"]: r["train/loss"] for r in writers.read_jsonl(
      os.path.join(workdir, "metrics.jsonl")) if "train/loss" in r}


def state_of(state):
  """A train state as a tree of host NumPy arrays."""
  return jax.tree.map(np.asarray, jax.device_get(state))


def tree(d):
  """{relative path: sha1 of the content} of every file under `d` (byte-identity of a workdir)."""
  out = {}
  for r, _, fs in os.walk(d):
    for f in fs:
      p = os.path.join(r, f)
      out[os.path.relpath(p, d)] = hashlib.sha1(open(p, "rb").read()).hexdigest()
  return out


# ---------------------------------------------------------------------------------------------
# Text corpora of the data tests.


CORPUS_WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi "
         "rho sigma tau upsilon phi chi psi omega def class return import yield lambda").split()


def write_corpus(root, num_files=40, lines=30, seed=0):
  """`num_files` text files doc_<i>.txt of `lines` lines of 8 CORPUS_WORDS under `root`."""
  rng = np.random.default_rng(seed)
  os.makedirs(root, exist_ok=True)
  for i in range(num_files):
    body = "\n".join(" ".join(rng.choice(CORPUS_WORDS, size=8)) for _ in range(lines))
    with open(os.path.join(root, f"doc_{i:03d}.txt"), "w", encoding="utf-8") as f:
      f.write(f"# document {i}\n{body}\n")
  return root


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """A 40-file text corpus (write_corpus) for one test module: root, glob and a workdir."""
  base = tmp_path_factory.mktemp("data")
  root = write_corpus(str(base / "txt"))
  return {"root": root, "glob": os.path.join(root, "*.txt"), "workdir": str(base / "work")}


def text_cfg(corpus, **kw):
  """A data config (dict) reading `corpus`'s text files, a quarter held out."""
  cfg = {"source": "text_files", "globs": corpus["glob"], "eval_fraction": 0.25}
  cfg.update(kw)
  return cfg


def split_by_hash(ids, frac):
  """Independent re-implementation of the split rule (sha1 of the document id, first 8 bytes)."""
  out = set()
  for i in ids:
    u = int(hashlib.sha1(i.encode()).hexdigest()[:16], 16) / 2.0**64
    if u < frac:
      out.add(i)
  return out


# What a build of the package reads (tests/test_packaging.py, tests/test_core_install.py).
PACKAGE_SOURCES = ("setup.cfg", "pyproject.toml", "README.md", "simbal_jax", "configs",
                   "experiments")


def copy_package_sources(dst):
  """Copies what a build reads (PACKAGE_SOURCES, without caches or links) from the checkout into
  the folder `dst`, so that building writes nothing into the checkout."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

  def ignore(folder, names):
    return [n for n in names if n == "__pycache__" or os.path.islink(os.path.join(folder, n))]

  os.makedirs(dst, exist_ok=True)
  for name in PACKAGE_SOURCES:
    path = os.path.join(root, name)
    if os.path.isdir(path):
      shutil.copytree(path, os.path.join(dst, name), ignore=ignore)
    else:
      shutil.copy2(path, os.path.join(dst, name))
