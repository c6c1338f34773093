# solo_d2 — the two commands a new user needs are `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# Tests and the demo use both cores; torch would otherwise oversubscribe.
export OMP_NUM_THREADS ?= 2

.PHONY: setup test test-fast demo clean

# Idempotent: each step is skipped when its stamp (or a working import) says it is done.
setup: $(VENV)/.solo_d2_installed

$(VENV)/.solo_d2_installed: setup.cfg setup.py tools/install_detectron2.sh
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch, torchvision" 2>/dev/null || $(PIP) install -q "torch==2.14.1" "torchvision==0.29.1"
	bash tools/install_detectron2.sh $(PY)
	$(PIP) install -q --no-build-isolation -e ".[dev]"
	touch $@

test: setup
	$(PY) -m pytest -q tests

# Without the end-to-end trainings (pytest marker "slow"): a quick loop while editing.
test-fast: setup
	$(PY) -m pytest -q -m "not slow" tests

demo: setup
	$(PY) tools/demo_run.py

clean:
	rm -rf $(VENV) output datasets/shapes *.egg-info
