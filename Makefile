# The two commands a fresh clone needs. Each installs what it needs by itself.
#   make demo   - the local fleet demo: aggregator + simulated appliances on loopback
#   make test   - the whole test suite, QEMU boot tests included (what CI runs)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
DEMO_ARGS ?=
PYTEST_ARGS ?=

.PHONY: demo test lint venv host-packages

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch is a host-side (tools) dependency only; 2.13.0 is the CPU build available offline.
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

venv: $(VENV)/.installed

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
