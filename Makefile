# Two entry points: `make demo` and `make test`. Both create .venv and install everything.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test lint format bench demo demo-bigbench mini-study
DEMO_DIR ?= /tmp/hir_demo

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test,ray]'
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

# What HIR does, on CPU in about a minute after set-up: HIR next to the same loop without
# hindsight, and FARL, on the synthetic 3-option colour task (tasks/synthetic.py) from one
# format-only warm-up (bench/mini_study.py; README "The miniature study").
demo: $(STAMP)
	rm -rf $(DEMO_DIR)
	$(BIN)/python bench/mini_study.py --root_dir $(DEMO_DIR) --tasks three --seeds 0 \
		--columns hir-paper hir-no_hindsight farl --one_table --plot_name learning_curve.png
	@echo "learning curve: $(DEMO_DIR)/learning_curve.png  runs: $(DEMO_DIR)/runs"

# A second example: HIR on BigBench date_understanding with a tiny random T5
# (gin_configs/experiments/demo.gin; its 98.6% is the task's answer prior, not HIR's effect).
demo-bigbench: $(STAMP)
	rm -rf $(DEMO_DIR)-bigbench
	$(BIN)/python run.py --gin_file=experiments/demo.gin --gin.MODEL_DIR="'$(DEMO_DIR)-bigbench'"
	$(BIN)/python -m hir_jax.report $(DEMO_DIR)-bigbench
	@echo "learning curve: $(DEMO_DIR)-bigbench/learning_curve.png"

# The paper's comparison in miniature (bench/mini_study.py; about 30 minutes on 2 cores).
mini-study: $(STAMP)
	$(BIN)/python bench/mini_study.py --root_dir /tmp/hir_mini_study

# Benchmarks vs HF transformers (long; not part of the tests).
bench: $(STAMP)
	$(BIN)/python bench/forward.py
	$(BIN)/python bench/sampling.py
	$(BIN)/python bench/train_step.py
	$(BIN)/python bench/checkpoint_load.py
	$(BIN)/python bench/round.py
