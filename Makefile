# Entry points that work on a fresh clone:
#   make demo       the main job end to end on the embedded default data (no network)
#   make test       lint + the fast tier (tests not marked slow): the everyday loop, about 5 minutes on 2 cores
#   make test-all   lint + every test: what CI runs, about 15 minutes on 2 cores
# All create .venv on first use. PYTHON picks the interpreter that creates it.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.stvit-installed

.PHONY: demo test test-all lint venv clean

# TORCH_INDEX: where PyTorch comes from, e.g. https://download.pytorch.org/whl/cpu for a CPU-only build (PyPI's
# default for Linux brings several GB of CUDA libraries); empty: PyPI.
TORCH_INDEX ?=

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(if $(TORCH_INDEX),$(BIN)/python -m pip install --quiet torch torchvision --index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install --quiet -e ".[test,plot]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/stvit demo --output runs/demo --force

# ruff: pyflakes and import order; lint-imports: the layers of stvit_core (contracts in pyproject.toml)
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports

# -n auto: one test process per core (each test process uses one torch thread, see tests/conftest.py).
# --durations=15 names the slowest tests, so a test that grew slow is seen (mark it slow, or make it fast).
PYTEST := $(BIN)/python -m pytest -q -n auto --durations=15

test: $(STAMP) lint
	$(PYTEST) -m "not slow"

test-all: $(STAMP) lint
	$(PYTEST)

clean:
	rm -rf runs build dist *.egg-info
