# FSD-D2: `make demo` sets up .venv if needed and runs the demo; `make test` runs the suite.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# Python 3.10: pyenv's 3.10.13 when present, else python3.10 on PATH (conda users: see environment.yml).
PYTHON310 ?= $(shell p="$$(pyenv root 2>/dev/null)/versions/3.10.13/bin/python"; [ -x "$$p" ] && echo "$$p" || command -v python3.10)
STAMP := $(VENV)/.installed

.PHONY: venv demo test benchmark clean-venv

# Re-running costs seconds: the install only happens when setup.cfg changed or the venv is missing.
# The test extra includes the sweep extra (submitit launcher, Optuna sweeper): tests/engine/test_sweeps.py runs them;
# and the export extra (onnx, onnxruntime): tests/engine/test_export.py runs the ONNX files in ONNX Runtime.
$(STAMP): setup.cfg pyproject.toml
	@test -n "$(PYTHON310)" || { echo "Python 3.10 not found: install it (pyenv install 3.10.13) or set PYTHON310=/path/to/python3.10"; exit 1; }
	@test -x $(PY) || $(PYTHON310) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip>=23" "setuptools>=64" wheel
	$(PY) -m pip install -q -e ".[test]"
	@touch $(STAMP)

venv: $(STAMP)

DEMO_DIR := outputs/demo/$(shell date +%Y-%m-%d_%H-%M-%S)

demo: $(STAMP)
	$(PY) -m fsd_d2.run +stage=train +experiment=demo hydra.run.dir=$(DEMO_DIR)
	@echo; cat $(DEMO_DIR)/eval/metrics_deeplesion_test.md
	@echo "FROC curve:       $(DEMO_DIR)/eval/froc_deeplesion_test.png"
	@echo "Detections drawn: $(DEMO_DIR)/eval/detections_deeplesion_test/"
	@echo "W&B (offline):    $(DEMO_DIR)/wandb  (wandb sync to upload)"
	@echo "Next: the whole FSD pipeline (search, train, search the head, train FSD, evaluate), about 4 min on 2 cores:"
	@echo "  $(PY) -m fsd_d2.run +stage=pipeline +experiment=pipeline_small"

test: $(STAMP)
	$(PY) -m pytest -q tests

benchmark: $(STAMP)
	$(PY) benchmarks/search_cost.py
	$(PY) benchmarks/params.py

clean-venv:
	rm -rf $(VENV)
