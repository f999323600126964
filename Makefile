# Two commands on a fresh machine (Python 3.11 + make): `make serve` and `make test`.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: serve test test-fast lint bench clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

serve: $(STAMP)  ## serve the bundled default model on http://localhost:8000
	$(PY) -m service serve

test: $(STAMP)  ## the whole test suite
	$(PY) -m pytest

test-fast: $(STAMP)  ## everything but the slow tests
	$(PY) -m pytest -m 'not slow'

lint: $(STAMP)
	$(PY) -m ruff check .

bench: $(STAMP)
	$(PY) -m bench.unet_throughput

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
