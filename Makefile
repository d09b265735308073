# The README's two commands: `make demo` and `make test`. Each creates .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
EXTRAS ?= test
# e.g. PIP_ARGS="-c constraints/airflow-3.0.txt" for the oldest supported Airflow
PIP_ARGS ?= -c constraints/test.txt

BENCH_VENV ?= .bench-venv
BENCH_STAMP := $(BENCH_VENV)/.installed

E2E_VENV ?= .venv-e2e
E2E_STAMP := $(E2E_VENV)/.installed

.PHONY: install test lint typecheck pytest pytest-py demo docs bench chaos e2e e2e-system clean ui-check chromium

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(PIP_ARGS) -e '.[$(EXTRAS)]'
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP)
	$(BIN)/pytest -q -p no:cacheprovider $(PYTEST_ARGS)

test: lint typecheck pytest

# The suite alone (not lint, types or e2e again) on another Python, in its own venv: `make pytest-py PY=3.13`.
# Airflow 3.3 supports Python 3.10-3.13, pyproject's requires-python says >=3.10. PY_BIN names the interpreter when
# python$(PY) is not on PATH (e.g. PY_BIN=~/.pyenv/versions/3.13.0/bin/python3.13). Pins: constraints/test-py310.txt
# for PY=3.10 (a Python the newest providers no longer install on), constraints/test.txt where no such file exists.
PY ?= 3.13
PY_BIN ?= python$(PY)
PY_CONSTRAINTS = $(firstword $(wildcard constraints/test-py$(subst .,,$(PY)).txt) constraints/test.txt)

pytest-py:
	$(MAKE) pytest PYTHON="$(PY_BIN)" VENV=.venv-airflow-3.3-py$(PY) PIP_ARGS="-c $(PY_CONSTRAINTS)"

chaos: $(STAMP)
	$(BIN)/pytest -q -p no:cacheprovider -m chaos tests/test_chaos.py

demo: $(STAMP)
	$(BIN)/python scripts/demo.py

# The documentation site (docs/, mkdocs.yml) into build/docs/; a warning (a broken link or anchor, a page missing from
# the nav) fails it. tests/test_docs.py, part of `make test`, runs the pages' code blocks.
DOCS_STAMP := $(VENV)/.docs-installed

$(DOCS_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet $(PIP_ARGS) -e '.[$(EXTRAS),docs]'
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	$(BIN)/mkdocs build --strict -d build/docs

# Not part of `make test`: real Airflow services on 127.0.0.1 and Debian's Chromium driven by Playwright;
# screenshots land in build/ui-check/. Needs root (apt-get) the first time, when chromium is missing.
UI_STAMP := $(VENV)/.ui-installed

$(UI_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet $(PIP_ARGS) -e '.[$(EXTRAS),ui]'
	touch $(UI_STAMP)

chromium:
	@command -v chromium >/dev/null || { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium; }

ui-check: $(UI_STAMP) chromium
	$(BIN)/python scripts/ui_check.py

# The bench has its own venv: it also installs the official OpenAI provider as the anchor (never a dependency).
$(BENCH_STAMP): pyproject.toml
	test -x $(BENCH_VENV)/bin/python || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(BENCH_VENV)/bin/python -m pip install --quiet -c constraints/test.txt -e '.[test]'
	$(BENCH_VENV)/bin/python -m pip install --quiet --no-deps 'apache-airflow-providers-openai==2.2.0'
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(BENCH_VENV)/bin/python -m benchmarks.run

# make e2e: a real distributed Airflow (CeleryExecutor on Redis, PostgreSQL, two triggerers, two workers) on loopback,
# the provider's scenarios under kill -9, then everything stopped by recorded pid. Its own venv; PostgreSQL and Redis
# from Debian packages (installed when missing: needs root, as CI has). Logs and evidence: .e2e-runs/<time>/.
$(E2E_STAMP): pyproject.toml constraints/e2e.txt
	test -x $(E2E_VENV)/bin/python || $(PYTHON) -m venv $(E2E_VENV)
	$(E2E_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(E2E_VENV)/bin/python -m pip install --quiet -c constraints/e2e.txt -e '.[e2e]'
	touch $(E2E_STAMP)

e2e-system:
	@if ! command -v redis-server >/dev/null || ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql redis-server; fi

e2e: e2e-system $(E2E_STAMP)
	$(E2E_VENV)/bin/python -m e2e $(E2E_ARGS)

clean:
	rm -rf $(VENV) $(BENCH_VENV) $(E2E_VENV) .venv-airflow-3.0 .venv-airflow-3.3-py* .mypy_cache .ruff_cache .pytest_cache
