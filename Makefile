# The two commands a fresh clone needs. Each installs what it needs by itself.
#   make demo   - the local fleet demo: aggregator + simulated appliances on loopback
#   make test   - the whole test suite, QEMU boot tests included (what CI runs)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
DEMO_ARGS ?=
PYTEST_ARGS ?=
# Every version the venv and the development image install (pip constraints), made by `make lock`.
LOCK   := requirements/dev.lock
# The lock's inputs besides pyproject.toml: torch 2.13.0, the CPU build on disk (see the file).
LOCK_CONSTRAINTS := requirements/torch-cpu.txt
LOCK_ARGS ?= --upgrade
LOCK_TOOLS := .cache/pip-tools
PIP    := pip==26.3

.PHONY: demo test lint venv host-packages lock

$(VENV)/.installed: pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(PIP)"
	# torch (a host-side tools dependency) comes from the lock too: 2.13.0+cpu, never the CUDA build.
	$(PY) -m pip install -q -c $(LOCK) -e ".[dev]"
	touch $@

venv: $(VENV)/.installed

$(LOCK_TOOLS)/bin/pip-compile:
	$(PYTHON) -m venv $(LOCK_TOOLS)
	$(LOCK_TOOLS)/bin/pip install -q "$(PIP)" "pip-tools==7.7.0"

# Re-resolve the lock for this Python (3.11) on this platform: the newest versions pyproject.toml allows.
# `make lock LOCK_ARGS=` keeps the current pins and only resolves what pyproject.toml changed;
# `make lock LOCK_ARGS="--upgrade-package onnxruntime"` moves one package.
lock: $(LOCK_TOOLS)/bin/pip-compile
	CUSTOM_COMPILE_COMMAND="make lock" $(LOCK_TOOLS)/bin/pip-compile -q $(LOCK_ARGS) --extra dev --strip-extras \
	    --unsafe-package fl-edge --no-emit-index-url --no-emit-find-links -c $(LOCK_CONSTRAINTS) \
	    -o $(LOCK) pyproject.toml

host-packages:
	bash tools/install-host-packages.sh

demo: venv
	$(VENV)/bin/flctl demo $(DEMO_ARGS)

lint: venv
	$(VENV)/bin/ruff check .

# pytest runs even when ruff finds something, so one run reports both; the exit code is pytest's if it
# failed (5 included: .ci/run treats "no tests" as a failure), else ruff's.
test: host-packages venv
	@$(VENV)/bin/ruff check . ; lint=$$? ; \
	$(PY) -m pytest $(PYTEST_ARGS) ; rc=$$? ; \
	if [ $$rc -ne 0 ]; then exit $$rc; fi ; exit $$lint
