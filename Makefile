# Everything a fresh machine needs: `make demo` (the main job) and `make test` (the test suite) set up first.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3

.PHONY: setup tools demo test lint bench clean

setup: $(VENV)/.installed tools

# Exact versions from constraints.txt (the same pins the Docker images install), so CI and every machine test the
# same dependency set; `pip install -c` pins whatever of the closure gets installed.
$(VENV)/.installed: pyproject.toml constraints.txt
	bash scripts/install_data.sh
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -c constraints.txt -e ".[dev]"
	touch $@

# System tools for the tests (Prometheus, unpacked into .tools/); idempotent and quick once installed.
tools:
	bash scripts/install_system.sh

demo: setup
	$(VENV)/bin/l3rs demo

test: setup
	$(VENV)/bin/ruff check l3rs tests benchmarks
	$(PY) -m pytest -q

bench: setup
	$(PY) benchmarks/step_overhead.py
	$(PY) benchmarks/inner_loop.py
	$(PY) benchmarks/service_scaling.py
	$(PY) benchmarks/driver_scale.py

clean:
	rm -rf $(VENV) runs
