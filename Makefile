# The two commands of the README: `make demo` and `make test`. Both create .venv when missing
# and install the project with its dev extras; nothing else needs installing by hand.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.inferlane-installed
DURATION ?= 30
RATE ?= 500

.PHONY: install demo test lint typecheck unit integration bench clean

install: $(STAMP)
	@# The local stack's Apache Kafka broker: jars from Maven Central into ~/.cache/inferlane
	@# (needs Java 17+ and Maven); every run checks the cache, which is kept across clones.
	@$(BIN)/python -m pipeline.dev.kafkadist fetch

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: install
	$(BIN)/inferlane demo --duration $(DURATION) --rate $(RATE)

lint: install
	$(BIN)/ruff check .
	$(BIN)/lint-imports

typecheck: install
	$(BIN)/mypy

unit: install
	$(BIN)/python -m pytest tests/unit -q

integration: install
	$(BIN)/python -m pytest tests/integration -q

test: install
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/mypy
	$(BIN)/python -m pytest tests -q -rs

clean:
	rm -rf .inferlane .pytest_cache .mypy_cache .ruff_cache .grimp_cache
