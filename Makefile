# Two entry points: `make demo` and `make test`. Both create .venv and install everything.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test lint format bench demo
DEMO_DIR ?= /tmp/hir_demo

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

# HIR on a real BigBench task with a tiny random T5 on CPU (gin_configs/experiments/demo.gin).
demo: $(STAMP)
	rm -rf $(DEMO_DIR)
	$(BIN)/python run.py --gin_file=experiments/demo.gin --gin.MODEL_DIR="'$(DEMO_DIR)'"
	$(BIN)/python -m hir_jax.report $(DEMO_DIR)
	@echo "learning curve: $(DEMO_DIR)/learning_curve.png  metrics: $(DEMO_DIR)/metrics.jsonl"

# Benchmarks vs HF transformers (long; not part of the tests).
bench: $(STAMP)
	$(BIN)/python bench/forward.py
	$(BIN)/python bench/sampling.py
	$(BIN)/python bench/train_step.py
	$(BIN)/python bench/checkpoint_load.py
