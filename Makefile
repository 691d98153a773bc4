# make demo / make test / make bench: each creates .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Install torch on its own first: a bare "torch" requirement would pull a multi-GB CUDA build.
TORCH ?= torch==2.13.0

.PHONY: demo test test-fast bench lint clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/gpt2lab demo

test: $(VENV)/.installed
	$(PY) -m pytest -q -x

test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -x -m "not slow"

bench: $(VENV)/.installed
	cd bench && ../$(PY) cpu.py

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
