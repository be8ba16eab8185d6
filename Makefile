# Transfer Studio: `make run` starts the dashboard, `make test` runs the suite.
# Both create the virtual environment on first use, so a fresh clone needs nothing else.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PORT ?= 8501

.PHONY: run test test-all bench clean-venv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# The stamp files re-run pip only when a requirements file changes.
$(VENV)/.runtime-installed: requirements.txt | $(BIN)/python
	$(BIN)/python -m pip install --quiet -r requirements.txt
	touch $@

$(VENV)/.dev-installed: requirements.txt requirements-dev.txt | $(BIN)/python
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt
	touch $(VENV)/.runtime-installed $@

run: $(VENV)/.runtime-installed
	$(BIN)/python -m streamlit run streamlit_app.py --server.port $(PORT)

test: $(VENV)/.dev-installed
	$(BIN)/python -m pytest -q

# Everything, including the slow marks (every backbone's build, real-data training).
test-all: $(VENV)/.dev-installed
	$(BIN)/python -m pytest -q -m ""

bench: $(VENV)/.runtime-installed
	$(BIN)/python bench/run_benchmarks.py

clean-venv:
	rm -rf $(VENV)
