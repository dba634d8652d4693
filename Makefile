# Two entry points for a fresh machine: `make demo` (the main job) and `make test`.
# Both create or reuse the virtualenv $(VENV) and install what they need; CPU jax unless an
# NVIDIA GPU (nvidia-smi) or a TPU VM (/dev/accel0) is found.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRA := $(shell if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then echo ,gpu; \
	elif [ -e /dev/accel0 ]; then echo ,tpu; fi)
WORKDIR ?= runs/demo
PYTEST_ARGS ?=

.PHONY: install test demo clean

$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test$(EXTRA)]"
	touch $@

install: $(VENV)/.installed

test: $(VENV)/.installed
	$(PY) -m pytest -q -n 2 tests $(PYTEST_ARGS)

demo: $(VENV)/.installed
	$(PY) -m simbal_jax.experiments.demo --workdir=$(WORKDIR)

clean:
	rm -rf $(VENV) runs .pytest_cache
