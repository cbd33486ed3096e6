# Two entry points: `make demo` and `make test`. Both create .venv and install everything.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test lint format bench demo

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	# bigbench==1.0.0 cannot be pip-installed (see tasks/install_bigbench.py); fetch its task files.
	$(BIN)/python -m tasks.install_bigbench
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest -q tests

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .
