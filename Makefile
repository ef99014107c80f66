# dalda_aug developer targets.
#
#   make test                      type-check the public API, then run the test suite (offline, CPU)
#                                  against the package installed from its wheel
#   make demo                      end-to-end demo -> $(DEMO_OUT)/contact_sheet.png (hub models, GPU if any)
#   DALDA_MODELS=tiny make demo    the same, offline on a CPU with tiny random models (< 2 min)
#
# Both create the virtual environment $(VENV) if needed and install the package into it, editable,
# with its test extras and, only when the environment has no torch and torchvision yet, this
# machine's torch build ($(TORCH)); the install is redone only when setup.cfg or pyproject.toml is
# newer than the stamp file. `make test TORCH="torch torchvision"` lets pip choose the newest torch
# for a new environment. To reuse a torch already installed (no multi-GB download):
#   make demo VENV=/path/to/env                        an existing virtual environment (its torch is kept)
#   make demo VENV_ARGS=--system-site-packages         a new .venv that sees the system's torch
#
# `make test` does not test the source tree: it builds the wheel, installs it (without
# dependencies, which come from $(VENV)) into $(INSTALLED), and runs pytest from there with that
# folder first on PYTHONPATH, so a file the wheel leaves out fails the suite. Developers keep
# running `HF_HUB_OFFLINE=1 .venv/bin/python -m pytest tests/...` from the repository root, which
# tests their source edits.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
# Extra arguments of `python -m venv` when $(VENV) is created (e.g. --system-site-packages).
VENV_ARGS ?=
DEMO_OUT ?= demo_out
TORCH ?= torch==2.14.1 torchvision==0.29.1
# What `make test` runs, relative to the repository root (e.g. TESTS=tests/test_package.py).
TESTS ?= tests

PY := $(VENV)/bin/python
STAMP := $(VENV)/.dalda-aug-installed
WHEEL_DIR := build/wheel
INSTALLED := build/installed
ROOT := $(CURDIR)

# The demo reads these from the environment (models: tiny | path/to/models.json | unset = hub).
export DALDA_MODELS
export DALDA_LLM

.PHONY: test typecheck wheel demo

test: typecheck wheel
	cd $(INSTALLED) && PYTHONPATH=$(ROOT)/$(INSTALLED) DALDA_TEST_INSTALLED=$(ROOT)/$(INSTALLED) HF_HUB_OFFLINE=1 \
		$(ROOT)/$(PY) -m pytest -q -c $(ROOT)/pyproject.toml --rootdir $(ROOT) $(addprefix $(ROOT)/,$(TESTS))

# mypy --strict on the modules listed in pyproject.toml's [tool.mypy] files.
typecheck: $(STAMP)
	$(PY) -m mypy

# A fresh wheel every time (build/lib is removed first: setuptools never deletes stale files there).
wheel: $(STAMP)
	rm -rf build/lib build/bdist.* $(WHEEL_DIR) $(INSTALLED)
	$(PY) -m pip wheel --quiet --no-deps --no-build-isolation --wheel-dir $(WHEEL_DIR) .
	$(PY) -m pip install --quiet --no-deps --no-compile --target $(INSTALLED) $(WHEEL_DIR)/dalda_aug-*.whl

demo: $(STAMP)
	$(PY) -m dalda_aug.cli.demo --out $(DEMO_OUT)

$(STAMP): setup.cfg pyproject.toml | $(PY)
	$(PY) -c "import torch, torchvision" 2>/dev/null || $(PY) -m pip install $(TORCH)
	$(PY) -m pip install 'setuptools>=70.1'
	$(PY) -m pip install -e '.[test]'
	touch $@

$(PY):
	$(PYTHON) -m venv $(VENV_ARGS) $(VENV)
