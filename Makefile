# make demo / make test / make bench: each sets up everything first (a .venv with torch and the rest, then
# the build), so a fresh clone needs nothing else. The build is redone only when csrc/ or the build
# rules change.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The release a Linux user gets from PyPI (a CUDA 13.0 build); the CUDA kernels compile against it.
TORCH ?= torch==2.14.1
# Its matching torchvision (each release pins one torch): real models for the benchmark's model group.
TORCHVISION ?= torchvision==0.29.1
BUILD_INPUTS := $(shell find csrc -type f) setup.py pyproject.toml torch_cs231n/_build_config.py

.PHONY: demo demo-ddp test bench build clean gpu-check lint format

demo: $(VENV)/.built
	$(PY) -m torch_cs231n demo

# The main job on 2 processes of this machine: DistributedDataParallel with SyncBatchNorm over gloo.
demo-ddp: $(VENV)/.built
	$(VENV)/bin/torchrun --standalone --nproc-per-node 2 -m torch_cs231n demo --ddp --out demo-output-ddp

test: $(VENV)/.built
	$(PY) -m pytest

bench: $(VENV)/.built
	$(PY) -m torch_cs231n bench

# Style: ruff's lint rules for the Python (pyproject.toml) and .clang-format for csrc/. CI runs `make lint`;
# `make format` applies clang-format and ruff's fixes.
CSRC_FILES = $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh')
lint: $(VENV)/.deps
	$(VENV)/bin/ruff check .
	$(VENV)/bin/clang-format --style=file --dry-run --Werror $(CSRC_FILES)

format: $(VENV)/.deps
	$(VENV)/bin/clang-format --style=file -i $(CSRC_FILES)
	$(VENV)/bin/ruff check --fix .

build: $(VENV)/.built

# On a GPU machine, with its own torch and no network: build for the local card, `check --device cuda`,
# the CUDA tests and the GPU benchmark suite, every log in gpu-check/ (tools/gpu_check.sh).
gpu-check:
	bash tools/gpu_check.sh

$(VENV)/.deps: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade "setuptools>=64" wheel
	$(PY) -m pip install "$(TORCH)" "$(TORCHVISION)"
	$(PY) -m pip install ninja numpy pytest hypothesis expecttest scikit-learn matplotlib tqdm
	$(PY) -m pip install "ruff==0.17.6" "clang-format==23.1.5"  # pinned: another version formats otherwise
	touch $@

# --no-build-isolation: compile against the torch in the venv, not a fresh download of another one.
$(VENV)/.built: $(VENV)/.deps $(BUILD_INPUTS)
	MAX_JOBS=$${MAX_JOBS:-2} $(PY) -m pip install --no-build-isolation --no-deps -e .
	touch $@

clean:
	rm -rf build *.egg-info torch_cs231n/_C*.so bench-results demo-output demo-output-ddp gpu-check
