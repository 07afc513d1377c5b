# Everything a fresh machine needs: `make demo` (the main job) and `make test` (the test suite) set up first.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3

.PHONY: setup demo test lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	bash scripts/install_data.sh
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e ".[dev]"
	touch $@

demo: setup
	$(VENV)/bin/l3rs demo

test: setup
	$(VENV)/bin/ruff check l3rs tests benchmarks
	$(PY) -m pytest -q

bench: setup
	$(PY) benchmarks/step_overhead.py
	$(PY) benchmarks/inner_loop.py
	$(PY) benchmarks/service_scaling.py

clean:
	rm -rf $(VENV) runs
