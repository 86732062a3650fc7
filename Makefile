# `make test` builds its own virtual environment from scratch and runs lint + tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: test lint install compare clean

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/activate pyproject.toml
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

install: $(VENV)/.installed

lint: install
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/ruff format --check src tests benchmarks examples

# the README's main job: OrchMoE, LoRA, Poly and MHR on the built-in suite with the default model
compare: install
	$(BIN)/orchmoe compare $(ARGS)

test: install lint
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
