# Two commands on a fresh machine with Python 3.11: `make demo` and `make test`.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP_RUN := $(VENV)/.installed-run
STAMP_DEV := $(VENV)/.installed-dev

.PHONY: demo test bench lint clean

$(PY):
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "$(PYTHON) not found; set PYTHON=/path/to/python3.11"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP_RUN): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e .
	touch $@

$(STAMP_DEV): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP_RUN) $@

demo: $(STAMP_RUN)
	$(VENV)/bin/gradwatch demo

test: $(STAMP_DEV)
	$(PY) -m pytest -q

lint: $(STAMP_DEV)
	$(VENV)/bin/ruff check gradwatch tests examples benchmarks

bench: $(STAMP_DEV)
	$(PY) benchmarks/overhead.py

clean:
	rm -rf $(VENV) runs build *.egg-info
