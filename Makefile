# shoplens: `make demo` runs the whole nightly pipeline end to end; `make test` runs the tests.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
RUN := .run

.PHONY: all venv deps test test-fast demo demo-up demo-down serve benchmarks clean

all: test

# The virtualenv, re-created only when the pinned dependencies or the package metadata change:
# the dependencies (with the test tools), then shoplens itself, editable, so that the `shoplens`
# command and every `python -m` alias run this checkout without PYTHONPATH.
$(VENV)/.installed: requirements.in requirements-dev.in constraints.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.in -r requirements-dev.in -c constraints.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

venv: $(VENV)/.installed

# Debian packages the pipeline needs: Chromium for Playwright (never `playwright install`) and
# CJK fonts for its screenshots of Korean pages,
# PostgreSQL and Redis servers only when none is reachable on 127.0.0.1.
deps:
	@need=""; \
	test -x /usr/bin/chromium || need="$$need chromium"; \
	dpkg -s fonts-noto-cjk >/dev/null 2>&1 || need="$$need fonts-noto-cjk"; \
	(exec 3<>/dev/tcp/127.0.0.1/5432) 2>/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need="$$need postgresql"; \
	(exec 3<>/dev/tcp/127.0.0.1/6379) 2>/dev/null || command -v redis-server >/dev/null || need="$$need redis-server"; \
	if [ -n "$$need" ]; then \
	  echo "installing Debian packages:$$need"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q $$need; \
	fi

# The suite on TEST_WORKERS processes (0 = one process), a test file per process at a time: the
# tests that start Airflow wait on it most of their time, and module fixtures are built once.
TEST_WORKERS ?= 2
test: venv deps
	$(PY) -m shoplens.dev.services ensure --state-dir $(RUN)
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

# The whole nightly pipeline on embedded defaults: generated replica shop, SeaweedFS, PostgreSQL,
# a real Airflow (CeleryExecutor, Redis); prints the run summary and stops what it started.
demo: venv deps
	$(PY) -m shoplens.dev.demo --state-dir $(RUN)

# The product search page and POST /search on http://127.0.0.1:$(SEARCH_PORT)/ over the index in
# $(SEARCH_INDEX); a newer index saved there is picked up without restart.
SEARCH_INDEX ?= $(RUN)/search-index
SEARCH_PORT ?= 8090
serve: venv
	@test -f $(SEARCH_INDEX)/index.json || { echo "no search index in $(SEARCH_INDEX): run \`make demo\` first (or set SEARCH_INDEX=DIR)"; exit 2; }
	$(PY) -m modeling serve --index $(SEARCH_INDEX) --port $(SEARCH_PORT)

benchmarks: venv deps
	$(PY) benchmarks/crawl.py
	$(PY) benchmarks/dedup.py
	$(PY) benchmarks/filter.py

clean:
	-$(PY) -m shoplens.dev.services down --state-dir $(RUN)
	rm -rf $(RUN)
