# `make lab` and `make test` are the whole quick start; both create .venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
NOTEBOOKS := $(sort $(wildcard notebooks/[0-9]*.ipynb))
# Extra arguments for JupyterLab, e.g. `make lab LAB_ARGS="--port 8899"`.
LAB_ARGS ?=
# JupyterLab refuses to start as root (containers, cloud VMs) unless asked to.
ROOT_FLAG := $(if $(filter 0,$(shell id -u 2>/dev/null)),--allow-root,)
# Python 3.10 or newer; a .venv made by an older one is rebuilt.
PY_OK := import sys; sys.exit(sys.version_info < (3, 10))

.PHONY: setup lab test unit checkpoints checkpoints-full nbval lint notebooks benchmark clean \
	python-version test-lowest

python-version:
	@$(PYTHON) -c "$(PY_OK)" 2>/dev/null || { \
	  echo "error: this course needs Python 3.10 or newer; '$(PYTHON)' is" \
	       "$$($(PYTHON) --version 2>/dev/null || echo 'not found'). Run: make PYTHON=python3.12 ..." >&2; \
	  exit 2; }
	@if [ -x $(BIN)/python ] && ! $(BIN)/python -c "$(PY_OK)"; then \
	  echo "$(VENV) was made by $$($(BIN)/python --version); rebuilding it with $(PYTHON)"; \
	  rm -rf $(VENV); fi

$(STAMP): pyproject.toml
	@$(MAKE) --no-print-directory python-version
	@test -x $(BIN)/python || { echo "creating $(VENV) with $$($(PYTHON) --version)"; \
	  $(PYTHON) -m venv $(VENV); }
	@echo "installing the package and its tools into $(VENV) (pip shows its progress)"
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e ".[dev]"
	touch $(STAMP)

setup: python-version $(STAMP)

# Serves on 127.0.0.1 and holds this terminal until Ctrl+C; open the URL it prints.
lab: setup
	$(BIN)/jupyter lab --ip=127.0.0.1 $(ROOT_FLAG) $(LAB_ARGS) notebooks/

test: lint unit checkpoints nbval
	@echo "make test: all phases passed"

lint: setup
	@echo "== lint: ruff over the package, tests and notebooks (seconds)"
	$(BIN)/ruff check .

unit: setup
	@echo "== unit: the package's tests (about 2-3 min)"
	$(BIN)/pytest tests -q -m "not slow and not full"

# Every shipped checkpoint run on the first 1,000 test images against its recorded logits.
checkpoints: setup
	@echo "== checkpoints: the four shipped models' logits on 1,000 test images against the recorded ones (under a minute)"
	$(BIN)/pytest tests -q -m slow

# Every shipped checkpoint re-counted on all 10,000 test images (not part of `make test`).
checkpoints-full: setup
	@echo "== checkpoints-full: the four shipped models re-counted on 10,000 test images (about 5 min)"
	$(BIN)/pytest tests -q -m full

nbval: setup
ifneq ($(NOTEBOOKS),)
	@echo "== nbval: every notebook run top to bottom and compared with its saved outputs (about 5 min)"
	$(BIN)/pytest --nbval --nbval-sanitize-with tests/nbval_sanitize.cfg -p no:cacheprovider $(NOTEBOOKS)
endif

# Re-execute every notebook in place, top to bottom from a fresh kernel.
notebooks: setup
	for nb in $(NOTEBOOKS); do \
	  $(BIN)/jupyter nbconvert --to notebook --execute --inplace \
	    --ExecutePreprocessor.timeout=600 "$$nb" || exit 1; \
	done

# The unit tests on the lowest versions pyproject.toml allows, in .venv-lowest (about 4 GB).
test-lowest:
	bash .ci/lowest.sh

benchmark: setup
	$(BIN)/python benchmarks/throughput.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
