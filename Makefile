# Two commands on a fresh machine with Python 3.11: `make demo` and `make test`.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP_RUN := $(VENV)/.installed-run
STAMP_DEV := $(VENV)/.installed-dev

.PHONY: demo test check bench lint clean browser-deps

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

# The browser tests (TensorBoard tab, HTML report) drive Debian's headless chromium.
browser-deps:
	@if [ -e /usr/bin/chromium ] && [ -e /usr/bin/chromedriver ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "Installing the Debian packages chromium and chromium-driver for the browser tests"; \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; } \
	  || echo "apt-get could not install chromium and chromium-driver: the browser tests will be skipped"; \
	else \
	  echo "/usr/bin/chromium or /usr/bin/chromedriver is missing and this is not root with apt-get:"; \
	  echo "the browser tests will be skipped (install the Debian packages chromium and chromium-driver)"; \
	fi

# Two pytest-xdist workers, one test file each at a time (module fixtures run once):
# 766 tests in 9 min 9 s here (clean clone of bfd5160, 2026-12-07, 2 cores of a slower VM than
# 2026-12-06's 6 min 0 s, in a noisy hour: 8 min 3 s on 2ecd93e; 13 min in one process on 2026-12-03).
test: $(STAMP_DEV) browser-deps
	$(PY) -m pytest -q -n 2 --dist loadfile

# The fast tier: tests marked `fast` (unit tests and synthetic-row detector tests; no
# subprocess, no browser, no fit beyond a trivial one): 527 tests, 64 s wall on 2026-12-07
# (a slower VM, a noisy hour); on 2026-12-06: 489 tests, 36-40 s wall
# with two workers (136 of them: 24-28 s, against 33-39 s in one process; 2026-12-06, 2 cores, TensorFlow
# import and collection included; each worker pays them, which -n 2 still wins back).
check: $(STAMP_DEV)
	$(PY) -m pytest -q -m fast -n 2

lint: $(STAMP_DEV)
	$(VENV)/bin/ruff check gradwatch tests examples benchmarks

# Issue 29's gate: every model, jit_compile off and on, 8 repetitions of 1,050-step fits
# per cell, each cell in a fresh process (well over an hour on 2 cores; --quick: the MLP).
bench: $(STAMP_DEV)
	$(PY) benchmarks/overhead.py

clean:
	rm -rf $(VENV) runs build *.egg-info
