# Two entry points for a fresh machine: `make demo` (the main job) and `make test`.
# Both create or reuse the virtualenv $(VENV) and install what they need: jax for the machine's
# accelerator, as tools/accelerator.py detects it (the TPU build on a TPU VM of any generation,
# the CUDA build where `nvidia-smi -L` sees a GPU, else CPU jax; SIMBAL_ACCELERATOR=cpu|gpu|tpu
# overrides it; the notebook's first cell asks the same script). `make min-versions` proves the
# minimum versions setup.cfg declares: a separate virtualenv $(VENV_MIN) with exactly those
# (each `>=` as `==`: install_requires, the train and the test extra) runs a smoke subset of the
# tests. Both virtualenvs get the `train` extra (the core install is jax and numpy alone).
# `make test-install` runs the install-level tests that `make test` leaves out (INSTALL_TESTS):
# each makes a fresh virtualenv and pip-installs the package into it (several minutes).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRA := $(shell $(PYTHON) tools/accelerator.py --extra || echo failed)
ifeq ($(EXTRA),failed)
$(error tools/accelerator.py could not choose the jax build (the line above says why))
endif
# On a machine without an accelerator the test virtualenv also gets the TPU compiler (the `aot`
# extra: libtpu) so that tests/test_aot.py compiles for a TPU slice ahead of time; the CPU jobs
# then pin JAX_PLATFORMS=cpu (libtpu would otherwise look for a TPU at start-up and log it).
comma := ,
AOT := $(if $(EXTRA),,$(comma)aot)
CPU_ENV := $(if $(EXTRA),,JAX_PLATFORMS=cpu)
WORKDIR ?= runs/demo
# make aot CONFIG=configs/moe_m.py:simbal TOPOLOGY=v5e:2x4 ARGS="--config.mesh.fsdp=8 ..."
CONFIG ?= configs/moe_m.py:simbal
TOPOLOGY ?= v5e:2x4
ARGS ?=
PYTEST_ARGS ?=
VENV_MIN ?= .venv-min
PY_MIN := $(VENV_MIN)/bin/python
# Smoke subset for min-versions (a few minutes): the pure math, model, one train step, the data
# sources and pipeline, checkpoints, configs and the command line, a tiny training run with a
# checkpoint, and the package installed and trained from outside the checkout.
MIN_TESTS ?= tests/test_losses.py tests/test_routing.py tests/test_balance.py \
	tests/test_optim.py tests/test_model.py tests/test_records.py tests/test_pipeline.py \
	tests/test_tokenizers.py tests/test_sources.py tests/test_corpora.py tests/test_packing.py \
	tests/test_tfds_builder.py \
	tests/test_checkpoint.py tests/test_preemption.py tests/test_integrity.py tests/test_configs.py \
	tests/test_packaging.py tests/test_telemetry.py tests/test_colab.py \
	"tests/test_step.py::test_steps_compile_once[lbl]" \
	"tests/test_moe.py::test_ragged_impl_resolution_and_tokamax_use" \
	tests/test_train.py::test_corrupt_latest_checkpoint_is_skipped

# Install-level tests: a fresh virtualenv each, the package pip-installed from the sources (the
# core install; the notebook from a fresh runtime, the training stack included).
INSTALL_TESTS := tests/test_core_install.py tests/test_colab_fresh.py

.PHONY: install test test-quick test-install demo min-versions aot clean

# uv (from PyPI) installs the virtualenv: parallel downloads and no byte-compiling of all of
# site-packages: 23-37 s on the 2-core machine with uv's cache empty (16 s warm) against pip's
# 64-106 s; pip where uv cannot be installed or fails.
# Modules are byte-compiled when first imported instead: `make test` lets Python write .pyc
# files (PYTHONDONTWRITEBYTECODE emptied; some machines set it), or each of the suite's
# processes would compile jax, flax and the rest again (import 4.3 s instead of 2.4 s); so
# does `make demo`.
$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip uv
	$(VENV)/bin/uv pip install -q --python $(PY) -e ".[train,test$(EXTRA)$(AOT)]" \
		|| $(PY) -m pip install -q -e ".[train,test$(EXTRA)$(AOT)]"
	touch $@

install: $(VENV)/.installed

test: $(VENV)/.installed
	PYTHONDONTWRITEBYTECODE= $(PY) -m pytest -q -n 2 --dist loadscope --no-loadscope-reorder tests $(addprefix --ignore=,$(INSTALL_TESTS)) $(PYTEST_ARGS)

# Everything but the tests marked slow (setup.cfg's markers): whole training runs, subprocesses.
test-quick: $(VENV)/.installed
	PYTHONDONTWRITEBYTECODE= $(PY) -m pytest -q -n 2 --dist loadscope --no-loadscope-reorder -m "not slow" tests $(addprefix --ignore=,$(INSTALL_TESTS)) $(PYTEST_ARGS)

test-install: $(VENV)/.installed
	$(PY) -m pytest -q -s -p no:cacheprovider $(INSTALL_TESTS) $(PYTEST_ARGS)

$(VENV_MIN)/.installed: setup.cfg pyproject.toml tools/min_requirements.py
	rm -rf $(VENV_MIN)
	$(PYTHON) -m venv $(VENV_MIN)
	$(PYTHON) tools/min_requirements.py --extras=train,test --skip=lm-eval,pytest-xdist,equinox,wandb \
		> $(VENV_MIN)/min-requirements.txt
	$(PY_MIN) -m pip install -q --upgrade pip
	$(PY_MIN) -m pip install -q -r $(VENV_MIN)/min-requirements.txt
	$(PY_MIN) -m pip install -q --no-deps -e .
	$(PY_MIN) -m pip check
	touch $@

min-versions: $(VENV_MIN)/.installed
	$(PY_MIN) -m pytest -q -p no:cacheprovider $(MIN_TESTS) $(PYTEST_ARGS)

demo: $(VENV)/.installed
	$(CPU_ENV) PYTHONDONTWRITEBYTECODE= $(PY) -m simbal_jax.experiments.demo --workdir=$(WORKDIR)

# Ahead-of-time compile of CONFIG's train and eval steps for a TPU slice (no TPU needed).
aot: $(VENV)/.installed
	$(PY) -m pip install -q -e ".[aot]"
	JAX_PLATFORMS=cpu $(PY) -m simbal_jax.experiments.aot --config=$(CONFIG) \
		--topology=$(TOPOLOGY) $(ARGS)

clean:
	rm -rf $(VENV) $(VENV_MIN) runs .pytest_cache
