# `make lab` and `make test` are the whole quick start; both create .venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
NOTEBOOKS := $(sort $(wildcard notebooks/[0-9]*.ipynb))

.PHONY: setup lab test unit checkpoints nbval lint notebooks benchmark clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

lab: setup
	$(BIN)/jupyter lab notebooks/

test: lint unit checkpoints nbval

lint: setup
	$(BIN)/ruff check .

unit: setup
	$(BIN)/pytest tests -q -m "not slow"

# Every shipped checkpoint re-evaluated on the full test set (about 4 minutes on 2 cores).
checkpoints: setup
	$(BIN)/pytest tests -q -m slow

nbval: setup
ifneq ($(NOTEBOOKS),)
	$(BIN)/pytest --nbval --nbval-sanitize-with notebooks/sanitize.cfg -p no:cacheprovider $(NOTEBOOKS)
endif

# Re-execute every notebook in place, top to bottom from a fresh kernel.
notebooks: setup
	for nb in $(NOTEBOOKS); do \
	  $(BIN)/jupyter nbconvert --to notebook --execute --inplace \
	    --ExecutePreprocessor.timeout=600 "$$nb" || exit 1; \
	done

benchmark: setup
	$(BIN)/python benchmarks/throughput.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
