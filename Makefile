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

demo: $(STAMP)
	$(PYTHON) train_pretrain.py --device cpu

clean:
	rm -rf out
