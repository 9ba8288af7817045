# One entry point for a fresh machine: `make test` creates .venv, installs, and runs the suite.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: test demo install bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -qq --upgrade pip
	# torch first and pinned: 2.13.0 is the CPU build here; an open range would pull GBs of CUDA wheels.
	$(PY) -m pip install -qq torch==2.13.0
	# (-qq and no warnings: errors still show; setuptools' notes about editable installs do not)
	PYTHONWARNINGS=ignore $(PY) -m pip install -qq -e ".[test,bench]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

# The main job end to end on the demo data: flows, fine-tuning, MLflow registry, served answers.
demo: $(STAMP)
	$(VENV)/bin/sllm demo

bench: $(STAMP)
	$(PY) bench/bench_inference.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
