# Two commands for a fresh clone: `make reports` (the main job) and `make test`.
# Both create .venv and install the project on first use.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU-only machines get the small tensorflow-cpu wheel; a machine with an NVIDIA driver keeps the GPU build.
TF ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo tensorflow || echo tensorflow-cpu)
DATASETS ?= mias,breakhis
CONFIG ?= demo

.PHONY: install test test-all nbtest pytest reports export clean-nbs sync-check docs-check help

help:
	@echo "make reports  - run the evaluation reports on the bundled sample (writes reports/)"
	@echo "make test     - run the notebook tests (nbdev_test) and the integration tests (pytest)"
	@echo "make test-all - the same, with the long end-to-end tests marked slow"

$(VENV)/.installed: settings.ini setup.py
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	BREAST_CANCER_TF=$(TF) $(PY) -m pip install -q -e ".[dev]"
	@touch $@

install: $(VENV)/.installed

nbtest: install
	$(VENV)/bin/nbdev_test

# pytest exits 5 when it collects no test: that is not a failure of the suite.
pytest: install
	$(PY) -m pytest tests/ -q --durations=15; rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest: no tests collected"; rc=0; fi; exit $$rc

test: nbtest pytest

# Also the long end-to-end tests marked slow (a few more minutes).
test-all:
	BREAST_CANCER_SLOW_TESTS=1 $(MAKE) test

reports: install
	$(VENV)/bin/breast-cancer report --datasets $(DATASETS) --config $(CONFIG)

export: install
	$(VENV)/bin/nbdev_export && $(VENV)/bin/nbdev_clean

# Fails when the modules are not what the notebooks export, or a notebook is not clean.
sync-check: install
	$(VENV)/bin/nbdev_export
	$(VENV)/bin/nbdev_clean
	@git diff --exit-code --stat -- nbs breast_cancer || { echo "notebooks and modules are out of sync, or notebooks are not clean: run 'make export' and commit"; exit 1; }
	@test -z "$$(git status --porcelain --untracked-files=all -- breast_cancer nbs)" || { git status --porcelain -- breast_cancer nbs; echo "untracked generated files: commit them"; exit 1; }

docs-check: install
	PATH="$(CURDIR)/.ci/bin:$$PATH" $(VENV)/bin/nbdev_proc_nbs
