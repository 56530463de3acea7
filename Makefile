# Two commands on a fresh machine:  make demo  |  make test
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint unit install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python jobs/self_play.py

# Bandit is configured (and its one skipped rule justified) in pyproject.toml [tool.bandit]; the
# project's own source scanner (tests/unit/test_security.py) runs with the tests.
lint: $(STAMP)
	$(BIN)/ruff check spin_ray jobs tests bench
	$(BIN)/bandit -q -c pyproject.toml -r spin_ray jobs bench

test: lint
	$(BIN)/python -m pytest -q -m "not gpu" $(PYTEST_ARGS)

unit: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit

clean:
	rm -rf $(VENV) runs
