# Two commands do everything (README Quickstart):
#   make demo   create .venv (first time), install capsmed, run the whole pipeline on the demo data
#   make test   create .venv if needed, run the test suite
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.capsmed-installed
PYTEST_ARGS ?=

.PHONY: demo test test-fast lint install clean-results screenshot

install: $(STAMP)

# torch first and pinned: the CPU wheel 2.13.0 (an unpinned torch would pull a multi-GB CUDA build).
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check torch==2.13.0
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[dev,export]"
	@touch $(STAMP)

# --unlock clears a lock left by a killed run (never run two pipelines in one folder at once);
# the default profile reruns incomplete jobs, and training resumes from its last checkpoint.
demo: $(STAMP)
	$(BIN)/snakemake --unlock --quiet all >/dev/null 2>&1 || true
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/snakemake --profile workflow/profiles/default

# The README's study-page picture: the demo's first capsule segmenter test study in headless
# Chromium (.ci/install_browser.sh); runs the demo first when results/ is not complete.
screenshot: demo
	$(BIN)/python docs/screenshot.py results docs/study_page.png

test: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest -n 2 --dist loadgroup $(PYTEST_ARGS)

test-fast: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest -n 2 --dist loadgroup -m "not slow and not slurm and not browser" $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check capsmed tests benchmarks
	$(BIN)/snakemake --lint

clean-results:
	rm -rf results .snakemake
