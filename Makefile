# The README's two commands: `make bench` and `make test`. Each sets itself up on a
# fresh machine: a virtual environment, torch, the build tools, and fusedwd built in place.
#
#   TORCH_SPEC   what pip installs when the environment has no torch (default: the CPU build below)
#   VENV         where the virtual environment lives (default: .venv)
#   BENCH_ARGS   extra arguments for `python -m bench.run`, e.g. BENCH_ARGS="--sizes gpt2"
#   PYTEST_ARGS  extra arguments for pytest
#   GPU_CHECK_ARGS  extra arguments for `python -m bench.gpu_check` (make gpu-check)

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
BENCH_ARGS ?=
PYTEST_ARGS ?=
# triton: tests/test_triton.py runs the Triton kernels (in Triton's interpreter where there is no GPU)
# expecttest: torch.testing._internal, whose optimizer registry tests/test_torch_registry.py runs
# transformers, accelerate, lightning: the Hugging Face Trainer and Lightning recipes (tests/test_recipes.py)
DEV_DEPS := pytest pytest-timeout numpy tqdm matplotlib pytest-benchmark pybind11 setuptools wheel ninja triton scikit-learn \
	expecttest transformers accelerate lightning

SOURCES := setup.py pyproject.toml $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' 2>/dev/null)

.PHONY: test bench build clean help gpu-check

help:
	@echo "make bench      benchmark fusedwd against torch.optim.AdamW (writes bench/results/)"
	@echo "make test       build and run the test suite"
	@echo "make gpu-check  on a GPU machine: build for it, check every GPU path and time it (8 min)"

# --system-site-packages keeps a torch the machine already has (a user's CUDA build);
# only where none imports is the CPU build installed. That torch stays: it is pinned
# while the dev deps (lightning, accelerate) resolve.
$(VENV)/.deps:
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet $(DEV_DEPS) "torch==$$($(PY) -c 'import torch; print(torch.__version__.split("+")[0])')"
	touch $@

$(VENV)/.built: $(VENV)/.deps $(SOURCES)
	$(PY) -m pip install --quiet --no-build-isolation --no-deps -e .
	$(PY) -c "import fusedwd, fusedwd._C as C; print('fusedwd', fusedwd.__version__, '- CPU kernel:', C.isa())"
	touch $@

build: $(VENV)/.built

test: build
	$(PY) -m pytest tests -q $(PYTEST_ARGS)

bench: build
	$(PY) -m bench.run $(BENCH_ARGS)
	$(PY) -m bench.precision

# bench/gpu_check.py: rebuilds _C_cuda for the present GPU (FUSEDWD_CUDA_ARCHS), then prints one
# OK/BAD line per check and writes bench/results/gpu_check.json; without a GPU, one line and exit 0
GPU_CHECK_ARGS ?=
gpu-check: $(VENV)/.deps
	@$(PY) -m bench.gpu_check $(GPU_CHECK_ARGS)

clean:
	rm -rf build *.egg-info fusedwd/*.so $(VENV)

.PHONY: experiments
# the paper's claims, shown with fusedwd (docs/experiments.md); writes docs/experiments/
experiments: build
	$(PY) -m fusedwd.experiments all
