# `make demo` and `make test` set everything up on a fresh clone (a virtualenv in .venv), then run.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: install demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q torch==2.13.0   # the CPU build; keeps resolvers away from CUDA wheels
	$(BIN)/python -m pip install -q -e '.[dev,ui,ray]'   # ui: the web app and its browser test; ray: the study executor's test
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/erasekit demo

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

clean:
	rm -rf $(VENV) runs .pytest_cache
