# `make run` and `make test` are the whole set-up: each creates .venv if needed,
# installs the project with every extra (sim, plot, conformance, test) into it,
# compiling csrc/ through cffi into both native modules (ifcvf._native from
# csrc/driver/, sim._native from csrc/sim/), and runs.
# The interpreter the venv is made from.  Debian's own CPython 3.11 (built with
# PGO and LTO, libpython linked into the executable) runs the simulator 6-10 %
# faster than a default pyenv build (a shared libpython, no PGO): 4 % fewer
# instructions for the same run and trace digest.  So it is preferred where it
# can make a venv and has its headers (csrc/ compiles against them); otherwise
# python3.  PYTHON=... overrides.
DISTRO_PYTHON := /usr/bin/python3.11
DISTRO_PYTHON_OK := import ensurepip, os, sysconfig, venv; \
    raise SystemExit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))
PYTHON ?= $(shell $(DISTRO_PYTHON) -c '$(DISTRO_PYTHON_OK)' >/dev/null 2>&1 && echo $(DISTRO_PYTHON) || echo python3)
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
