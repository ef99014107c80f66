# dalda_aug developer targets.
#
#   make test                      run the test suite (offline, CPU)
#   make demo                      end-to-end demo -> $(DEMO_OUT)/contact_sheet.png (hub models, GPU if any)
#   DALDA_MODELS=tiny make demo    the same, offline on a CPU with tiny random models (< 2 min)
#
# Both create the virtual environment $(VENV) if needed and install the package into it; the
# install is redone only when setup.cfg is newer than the stamp file.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
DEMO_OUT ?= demo_out

PY := $(VENV)/bin/python
STAMP := $(VENV)/.dalda-aug-installed

# The demo reads these from the environment (models: tiny | path/to/models.json | unset = hub).
export DALDA_MODELS
export DALDA_LLM

.PHONY: test demo

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

demo: $(STAMP)
	$(PY) -m dalda_aug.demo --out $(DEMO_OUT)

$(STAMP): setup.cfg | $(PY)
	$(PY) -m pip install torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -e '.[test]'
	touch $@

$(PY):
	$(PYTHON) -m venv $(VENV)
