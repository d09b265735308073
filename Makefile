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

.PHONY: install test lint typecheck pytest demo bench chaos clean ui-check chromium

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

chaos: $(STAMP)
	$(BIN)/pytest -q -p no:cacheprovider -m chaos tests/test_chaos.py

demo: $(STAMP)
	$(BIN)/python scripts/demo.py

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

clean:
	rm -rf $(VENV) $(BENCH_VENV) .venv-airflow-3.0 .mypy_cache .ruff_cache .pytest_cache
