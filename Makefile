# Transfer Studio: `make run` starts the dashboard, `make test` runs the suite.
# Both create the virtual environment on first use, so a fresh clone needs nothing else.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PORT ?= 8501
# Folders the dashboard may train from, besides its own data/ folder (samples, uploads).
# ../shared/data is the real data beside this checkout in the project's workplace.
DATA_ROOTS ?= $(abspath $(wildcard ../shared/data))

.PHONY: run test test-fast test-all clean-venv browser-runtime

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

# The browser bundle's runtime (onnxruntime-web and its wasm files, pinned in package.json and
# package-lock.json), from npm. Without npm the app still runs; only the browser bundle export says why it
# cannot be made.
node_modules/.installed: package.json package-lock.json
	@if command -v npm >/dev/null 2>&1; then npm ci --no-audit --no-fund --silent && touch $@; \
	else echo "npm not found: the browser bundle export is unavailable (apt-get install npm)"; fi

browser-runtime: node_modules/.installed

run: $(VENV)/.runtime-installed browser-runtime
	TRANSFER_STUDIO_DATA_ROOTS="$${TRANSFER_STUDIO_DATA_ROOTS:-$(DATA_ROOTS)}" \
		$(BIN)/python -m streamlit run streamlit_app.py --server.port $(PORT)

# Two workers, each taking whole test files (--dist loadfile): much of the suite waits on browsers,
# servers and child processes, and tests in one file that share a server stay on one worker.
test: $(VENV)/.dev-installed browser-runtime
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

# The edit-test loop: no real training, no browser, no real data (about two minutes).
test-fast: $(VENV)/.dev-installed
	$(BIN)/python -m pytest -q -m "not slow and not training and not browser and not real_data"

# Everything, including the slow marks (every backbone's build, real-data training).
test-all: $(VENV)/.dev-installed
	$(BIN)/python -m pytest -q -m ""

clean-venv:
	rm -rf $(VENV)
