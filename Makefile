# The two commands a newcomer runs (see README.md):
#   make demo   set everything up, then run the main job offline on the embedded default model
#   make test   set everything up, then run lint and the whole test suite
#   make demo-real  a real pretrained model (SmolLM2-135M-Instruct, fetched once), LoRA on the CPU
# Set-up is idempotent: the venv is rebuilt only when a pyproject.toml, the constraints
# or a requirements/ file changes.

PYTHON      ?= python3
VENV        ?= .venv
PY          := $(VENV)/bin/python
PIP         := $(PY) -m pip
CONSTRAINTS := constraints/cpu.txt
PLUGINS     := $(wildcard plugins/tinkex-reg-*)
STAMP       := $(VENV)/.tinkex-installed
# the metrics loggers' packages (pyproject.toml extras), so their tests run too
EXTRAS      := tensorboard,mlflow,wandb
# tinker-cookbook, whose losses the tests run through tinkex: its requirements first, then
# the cookbook with --no-deps (its tml-renderers requirement is not on the package index)
COOKBOOK_DEPS := requirements/cookbook-deps.txt
COOKBOOK      := requirements/cookbook.txt
PYTEST_ARGS ?=

.PHONY: demo demo-real test lint format bench setup clean

setup: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS) $(COOKBOOK_DEPS) $(COOKBOOK) $(wildcard plugins/*/pyproject.toml)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "==> installing torch (CPU build, pinned by $(CONSTRAINTS))"
	$(PIP) install -q -c $(CONSTRAINTS) "torch==2.13.*"
	@echo "==> installing tinkex with the trackers' extras, the first-party plugins and dev tools (editable)"
	$(PIP) install -q -c $(CONSTRAINTS) -e ".[dev,$(EXTRAS)]" $(foreach p,$(PLUGINS),-e ./$(p))
	@echo "==> installing tinker-cookbook for the tests ($(COOKBOOK_DEPS), then $(COOKBOOK) --no-deps)"
	$(PIP) install -q -c $(CONSTRAINTS) -r $(COOKBOOK_DEPS)
	$(PIP) install -q -c $(CONSTRAINTS) --no-deps -r $(COOKBOOK)
	@# pytest-asyncio would fight pytest-trio over async tests (trio_mode): keep it out
	@if $(PY) -c "import importlib.util as u, sys; sys.exit(u.find_spec('pytest_asyncio') is None)"; then \
		echo "==> removing pytest-asyncio (it conflicts with pytest-trio)"; \
		$(PIP) uninstall -q -y pytest-asyncio; \
	fi
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/tinkex train

# Fetches the model once into the user cache (later runs are offline), then trains it:
# a few minutes on 2 CPU cores. The run directory is runs/smollm2_lora-<time>.
demo-real: $(STAMP)
	$(VENV)/bin/tinkex models fetch smollm2-135m-instruct
	$(VENV)/bin/tinkex train examples/configs/smollm2_lora.toml --out runs/smollm2_lora-$$(date +%Y%m%d-%H%M%S)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# pytest exits 5 when it collected no test at all; that alone is not a failure of
# the code, so it is reported and mapped to 0. Every other exit code passes through.
test: $(STAMP) lint
	@$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests (exit 5)"; exit 0; fi; \
	exit $$rc

# Every benchmark always runs; the exit status is 1 if any missed a target.
bench: $(STAMP)
	@$(PY) bench/bench_compose.py; c=$$?; $(PY) bench/bench_training.py --check; t=$$?; \
	$(PY) bench/bench_plugins.py; p=$$?; $(PY) bench/bench_real.py; r=$$?; \
	exit $$(( c || t || p || r ))

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
