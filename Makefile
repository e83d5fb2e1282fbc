# `make run` and `make test` are the whole set-up: each creates .venv if needed,
# installs the project with every extra (sim, plot, conformance, test) into it,
# compiling csrc/ through cffi into both native modules (ifcvf._native from
# csrc/driver/, sim._native from csrc/sim/), and runs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
SCENARIO ?= scenarios/live-migration.toml

.PHONY: run test install clean

$(STAMP): pyproject.toml setup.py $(wildcard csrc/*/*.c csrc/*/*.h csrc/*/*.py)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[all]'
	@touch $@

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/ifcvf sim run $(SCENARIO)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info ifcvf/_native.* sim/_native.* .pytest_cache .hypothesis
