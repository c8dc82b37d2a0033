# Two entry points on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# CI (CI=true) runs the slow end-to-end tests too; a plain local `make test` runs the fast ones.
ifeq ($(CI),true)
PYTEST_MARK ?=
else
PYTEST_MARK ?= -m "not slow"
endif

.PHONY: install test test-all demo docs bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# Pinned CPU wheel: an unpinned torch pulls a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_MARK) $(PYTEST_ARGS)

test-all: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: $(STAMP)
	$(VENV)/bin/llm2emb demo

# The documentation site: docs/ -> site/ (reference pages generated from the code by docs/hooks.py).
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

bench: $(STAMP)
	$(PY) bench/tokenize.py
	$(PY) bench/hardware_limit.py
	$(PY) bench/encode_throughput.py
	$(PY) bench/train_throughput.py
	$(PY) bench/eval_speed.py
	$(PY) bench/quality_per_step.py

clean:
	rm -rf $(VENV) build *.egg-info site
