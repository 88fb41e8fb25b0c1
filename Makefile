# Two entry points (see README): `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test bench
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[lab,test]' -e ./lab
	@touch $@

demo: setup
	$(BIN)/antenna-flows demo

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/antenna-flows bench --scenario ../shared/bench/seed-6-jobs.json --strategy fair
