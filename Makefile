# Two commands on a fresh machine:  make demo  |  make test
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev

.PHONY: demo test test-gpu mutation lint unit install install-dev clean tensorboard

# The demo needs the package and its runtime dependencies only; the dev extra (pytest, ruff, mutmut,
# bandit, hypothesis, moto and s3fs for the object-store tests) is installed on top of them
# by the targets that use it, so `make demo` downloads nothing it does not run.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -e .
	touch $(STAMP)

$(DEV_STAMP): $(STAMP)
	$(BIN)/pip install -e '.[dev]'
	touch $(DEV_STAMP)

install: $(STAMP)

install-dev: $(DEV_STAMP)

demo: $(STAMP)
	$(BIN)/python jobs/self_play.py

# Bandit is configured (and its one skipped rule justified) in pyproject.toml [tool.bandit]; the
# project's own source scanner (tests/unit/test_security.py) runs with the tests.
lint: $(DEV_STAMP)
	$(BIN)/ruff check spin_ray jobs tests bench
	$(BIN)/bandit -q -c pyproject.toml -r spin_ray jobs bench

test: lint
	$(BIN)/python -m pytest -q -m "not gpu" $(PYTEST_ARGS)

unit: $(DEV_STAMP)
	$(BIN)/python -m pytest -q tests/unit

# The tests marked gpu (CUDA training in bf16, CPU/CUDA noise draws, the bf16 reference errors):
# all skipped, and the target passes, on a machine without CUDA. docs/TESTING.md records where they ran.
test-gpu: $(DEV_STAMP)
	$(BIN)/python -m pytest -q -rs -m gpu $(PYTEST_ARGS)

# Mutation testing of the core modules with mutmut ([tool.mutmut] in pyproject.toml), niced; writes
# mutation-report.json (git-ignored). About 20 minutes on an idle 2-core machine (over an hour when
# other jobs share it), so not part of `make test` or CI.
mutation: $(DEV_STAMP)
	nice -n 19 $(BIN)/python scripts/mutation_report.py $(MUTATION_ARGS)

# The default run's training curves, evaluation scores and image grid (tracking.backends: tensorboard).
tensorboard: $(DEV_STAMP)
	$(BIN)/tensorboard --logdir $(or $(RUN_DIR),runs/default)/logs --host 127.0.0.1

clean:
	rm -rf $(VENV) runs
