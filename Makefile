# Two commands on a fresh machine (Python 3.11 + make): `make serve` and `make test`.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

MODEL ?= model_store/mnist
# stamp: the compiled UNet for this machine's default (auto) dtype was built
COMPILED := $(MODEL)/compiled/.built

.PHONY: serve compile test test-fast lint bench clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

serve: $(STAMP) $(COMPILED)  ## serve the bundled default model on http://localhost:8000
	$(PY) -m service serve

# The AOT-compiled UNet for this machine and the server's default dtype (`auto`: bf16 where the CPU has bf16 dot
# products), once, ~1.5 min; needs a C++ compiler. If it cannot be built the server runs the eager UNet, so a
# failure here does not stop `make serve`.
$(COMPILED): $(STAMP) $(MODEL)/model.safetensors
	-$(PY) -m service compile --model $(MODEL) --dtype auto --max-batch-rows 64 && touch $@

compile: $(STAMP)  ## (re)build the compiled UNet, e.g. after changing machines
	$(PY) -m service compile --model $(MODEL) --dtype auto --max-batch-rows 64 && touch $(COMPILED)

test: $(STAMP)  ## the whole test suite, on every core (pytest-xdist; a file's tests stay on one worker)
	$(PY) -m pytest -n auto --dist loadfile

test-fast: $(STAMP)  ## everything but the slow tests
	$(PY) -m pytest -n auto --dist loadfile -m 'not slow'

lint: $(STAMP)
	$(PY) -m ruff check .

bench: $(STAMP)
	$(PY) -m bench.unet_throughput

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
