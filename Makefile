# Two commands on a fresh machine: `make test` and `make run`; `make notebooks` re-executes the notebooks.
# Both create or refresh .venv from pyproject.toml; the stamp makes a second call instant.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test run notebooks setup clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

# The paper's figures at quick size, then the notebooks redrawn from what it measured.
run: $(STAMP)
	$(BIN)/python -m experiments.reproduce --quick
	$(MAKE) notebooks

# Execute every notebook in place at the quick size, reading back the figures `make run` measured.
notebooks: $(STAMP)
	$(BIN)/python -m experiments.notebooks --size quick

clean:
	rm -rf $(VENV)
