# Two entry points that work on a fresh clone:
#   make demo   the main job end to end on the embedded default data (no network)
#   make test   the test suite (what CI runs)
# Both create .venv on first use. PYTHON picks the interpreter that creates it.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.stvit-installed

.PHONY: demo test test-fast lint venv clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test,plot]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/stvit demo --output runs/demo --force

lint: $(STAMP)
	$(BIN)/ruff check .

# -n auto: one test process per core (each test process uses one torch thread, see tests/conftest.py)
test: $(STAMP) lint
	$(BIN)/python -m pytest -q -n auto

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -n auto -m "not slow"

clean:
	rm -rf runs build dist *.egg-info
