# Set-up in two commands: `make demo` and `make test` each create .venv and install the project
# (with its test extra) on first use, then run. The install is redone only when pyproject.toml
# changes or the venv is gone, so later calls start at once.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install clean-venv

demo: $(STAMP)
	$(PY) cli.py demo

# The tests run in one pytest-xdist worker per core (at most 8), one torch thread each (tests/conftest.py).
test: $(STAMP)
	$(PY) -m pytest -n auto --maxprocesses 8

install: $(STAMP)

# pip resolves torch and torchvision together from the registry (a matching pair); the stamp is
# written only after a successful install, so an interrupted one is redone on the next call.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -e ".[test]"
	@touch $(STAMP)

clean-venv:
	rm -rf $(VENV)
