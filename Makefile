# `make test` builds its own virtual environment from scratch and runs lint + tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: test lint install compare clean test-wheel serve-env serve-demo

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
	$(BIN)/lint-imports --no-cache

# the README's main job: OrchMoE, LoRA, Poly and MHR on the built-in suite with the default model
compare: install
	$(BIN)/orchmoe compare $(ARGS)

test: install lint
	$(BIN)/python -m pytest -q tests
	$(MAKE) test-wheel

# `pip install orchmoe` as a peft user gets it: a wheel built from the checkout, installed in a fresh environment with
# the core requirements only; the tuner's tests run against that installed copy (the checkout's src/ is not on the path)
CORE_VENV := build/core-venv
test-wheel: install
	rm -rf build/wheel $(CORE_VENV)
	$(BIN)/pip wheel --quiet --no-deps --no-build-isolation --wheel-dir build/wheel .
	$(PYTHON) -m venv $(CORE_VENV)
	$(CORE_VENV)/bin/pip install --quiet torch==2.13.0
	$(CORE_VENV)/bin/pip install --quiet build/wheel/orchmoe-*.whl pytest
	$(CORE_VENV)/bin/python -c "import orchmoe; assert 'site-packages' in orchmoe.__file__, orchmoe.__file__"
	$(CORE_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/tuner tests/test_init.py

# the serving environment: vLLM's CPU build in a venv of its own (it pins its own transformers), made by
# `orchmoe serve-setup`; tests/front/test_vllm.py runs against it when it exists
SERVE_VENV := build/serve-venv
serve-env: $(SERVE_VENV)/.installed

$(SERVE_VENV)/.installed: $(VENV)/.installed
	$(BIN)/orchmoe serve-setup --no-gpu --dir $(SERVE_VENV)

# routed OrchMoE on vLLM end to end: a short Gemma 3 270M run on the built-in suite, exported, served by `orchmoe serve`,
# >= 32 requests from 8 concurrent clients checked against OrchMoE's own hard-routed generate; prints RESULT last
serve-demo: install serve-env
	$(BIN)/python benchmarks/serve_demo.py $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
