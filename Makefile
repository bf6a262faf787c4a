# Entry points. Each target sets up .venv on first use (Python >= 3.10 and pip are all it needs).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat setup.py | cksum | cut -d' ' -f1)
# Extra pytest arguments, e.g. `make test PYTEST_ARGS="-m 'not slow'"`.
PYTEST_ARGS ?=

.PHONY: venv test test-fast demo lint clean

venv: $(STAMP)

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test,lint]"
	rm -f $(VENV)/.installed-* && touch $@

# The suite on TEST_WORKERS pytest-xdist workers, each test file on one worker (its module fixtures and
# order kept). Each worker is its own TensorFlow process (~0.6 GB resident, more while a test trains).
TEST_WORKERS ?= 2
test: venv
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

test-fast: venv
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

# Each demo run lands in a fresh directory (runs are never overwritten): runs/demo-YYYYmmdd-HHMMSS.
ifndef DEMO_DIR
DEMO_DIR := runs/demo-$(shell date +%Y%m%d-%H%M%S)
endif
demo: venv
	$(PY) -m bot_keras.train --flagfile=configs/demo.flags --model_dir=$(DEMO_DIR)
	$(PY) -m bot_keras.evaluate --model_dir=$(DEMO_DIR)

lint: venv
	$(VENV)/bin/ruff check bot_keras tests tools

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache
