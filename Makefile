# The two commands of the README. Each works on a fresh machine with only Python 3.11 installed.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
DEMO   := demo-out

.PHONY: demo test test-slow lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.base: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[train,bench,dev,ray]'
	touch $@ $(VENV)/.base

demo: $(VENV)/.base
	$(BIN)/archivecolor models pull
	$(BIN)/archivecolor index examples/references --catalog $(DEMO)/catalog.sqlite --collection examples
	$(BIN)/archivecolor run examples/scans --out $(DEMO)/colorized --catalog $(DEMO)/catalog.sqlite --top-k 2
	@echo
	@echo "Colorized outputs, each with its <output>.json provenance sidecar: $(DEMO)/colorized/"
	@ls -1 $(DEMO)/colorized

test: $(VENV)/.test
	$(BIN)/python -m pytest -q

test-slow: $(VENV)/.test
	$(BIN)/python -m pytest -q -m slow -s

lint: $(VENV)/.test
	$(BIN)/ruff check .

bench: $(VENV)/.test
	$(BIN)/archivecolor bench ../shared/data/kodak24 ../shared/data/cbsd68 ../shared/data/mcmaster18 \
		--references ../shared/data/sun-hays80 --out bench-report

clean:
	rm -rf $(DEMO) bench-report .pytest_cache
