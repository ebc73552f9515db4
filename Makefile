# KubeDream developer entry points. `make demo` and `make test` are the README's two commands.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml requirements/constraints.txt | sha256sum | cut -c1-16)

.PHONY: install demo test lint typecheck unit testbed-bins manifests check-manifests clean

$(STAMP): pyproject.toml requirements/constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c requirements/constraints.txt -e ".[train,dev]"
	rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP)

# The README's first command: train the tiny model on the shipped example data, on CPU.
demo: install
	$(VENV)/bin/kubedream train examples/tiny-job.yaml

# Build (or reuse) the test bed's Go binaries: etcd, kube-apiserver, kube-controller-manager, MinIO, helm.
testbed-bins:
	bash scripts/build-testbed.sh

lint: install
	$(VENV)/bin/ruff check operator trainer tests bench scripts
	$(VENV)/bin/ruff format --check operator trainer tests bench scripts
	$(VENV)/bin/lint-imports --config pyproject.toml

typecheck: install
	$(VENV)/bin/mypy

unit: install
	$(PY) -m pytest -m "not testbed"

# The README's second command: everything, including the tests on the real test bed.
test: install testbed-bins lint typecheck
	$(PY) -m pytest

# The chart's CRD template (from `kubedream crd`) and manifests/ (the chart rendered with its
# defaults). Needs helm: the test bed's (`make testbed-bins`), $$HELM or helm on PATH.
manifests: install
	$(PY) scripts/render-manifests.py

# Fails when the generated files differ from what their sources give (tests/chart checks it too).
check-manifests: install
	$(PY) scripts/render-manifests.py --check

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
