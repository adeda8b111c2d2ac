# `make demo` and `make test` set up a project-local virtualenv (.venv) on first use, so the system Python
# stays untouched. Override the interpreter with `make PY=python3.12 ...`.
PY ?= python3
VENV := .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.requirements-installed

.PHONY: test demo venv clean

venv: $(STAMP)

$(STAMP): requirements.txt
	test -x $(PYTHON) || $(PY) -m venv $(VENV)
	$(PYTHON) -m pip install -q -r requirements.txt
	touch $(STAMP)

test: $(STAMP)
	$(PYTHON) -m pytest -q tests

# Finished stages are skipped on a second run; `make demo FORCE=1` redoes them all.
demo: $(STAMP)
	$(PYTHON) demo.py $(if $(filter 1,$(FORCE)),--force)

clean:
	rm -rf out
