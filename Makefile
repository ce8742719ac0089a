# Two entry points (README): `make demo` and `make test`. Both set up .venv on first use.
# On a machine that already has a CUDA torch (the GPU hosts), pass PYTHON=python3 to skip
# the venv and build against the installed torch.
VENV        ?= .venv
PYTHON      ?= $(VENV)/bin/python
TORCH_PIN   ?= torch==2.13.0
USE_VENV    := $(filter $(VENV)/bin/python,$(PYTHON))
SETUP_STAMP := $(if $(USE_VENV),$(VENV)/.setup-done,.setup-system-done)
PYTEST_ARGS ?=

.PHONY: setup build test test-fast test-wheel test-asan cmake-check lint demo clean

setup: $(SETUP_STAMP)

$(VENV)/bin/python:
	python3 -m venv $(VENV)

# Torch is installed only when none is importable: an unpinned torch would pull a CUDA build.
# The stamp follows every compiled source, csrc/cuda included (a CUDA torch builds it).
$(SETUP_STAMP): $(if $(USE_VENV),$(VENV)/bin/python) pyproject.toml setup.py \
		$(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cuda/*)
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install "$(TORCH_PIN)"
	$(PYTHON) -m pip install "setuptools>=77" wheel ninja
	$(PYTHON) -m pip install -e ".[dev]" --no-build-isolation
	touch $@

build: setup
	$(PYTHON) setup.py build_ext --inplace

# lint, then the test suite while the build checks run beside it (scripts/run_tests.sh): the
# CUDA kernels compiled for sm_80 / sm_90 (nvcc-check), the CUDA build against the GPU
# hosts' torch (torch-abi-check), the wheel as a user installs it (test-wheel) and the CMake
# library (cmake-check)
test: setup
	$(PYTHON) -m ruff check .
	PYTHON=$(PYTHON) bash scripts/run_tests.sh $(PYTEST_ARGS)

# builds the wheel, installs it into a throw-away venv (torch reused, no checkout, no triton)
# and checks that every module imports and the ops and the runtime run (scripts/check_wheel.sh)
test-wheel: setup
	PYTHON=$(PYTHON) bash scripts/check_wheel.sh

# the C++ library built by CMake against $(PYTHON)'s libtorch, without Python: build/cmake,
# the example examples/cpp/ops_check run from the build tree and from an install
# (scripts/cmake_check.sh; under a minute from scratch on 2 cores, about 20 s again)
cmake-check: setup
	PYTHON=$(PYTHON) bash scripts/cmake_check.sh

# compile-only check of the CUDA kernels (csrc/cuda) for sm_80 and sm_90, no GPU needed:
# fails on a compile error or a register spill, prints registers per kernel; skips without
# nvcc (scripts/nvcc_check.sh; about 20 s on 2 cores)
.PHONY: nvcc-check
nvcc-check: setup
	PYTHON=$(PYTHON) bash scripts/nvcc_check.sh

# the CUDA build of the extension compiled and linked against another torch (default
# torch==2.11.0, the GPU hosts'; TORCH_ABI_SPEC): its headers, C++ standard and libraries,
# fetched once into build/torch-abi/ (scripts/torch_abi_check.sh; about 25 s on 2 cores)
.PHONY: torch-abi-check
torch-abi-check: setup
	PYTHON=$(PYTHON) bash scripts/torch_abi_check.sh

# the op tests against the extension built with ASan + UBSan, in a copy of the tree
# (scripts/test_asan.sh); not part of `make test`
test-asan: setup
	PYTHON=$(PYTHON) bash scripts/test_asan.sh

test-fast: setup
	TRITON_INTERPRET=1 $(PYTHON) -m pytest -q -m "not slow" $(PYTEST_ARGS)

lint: setup
	$(PYTHON) -m ruff check .

demo: setup
	$(PYTHON) -m eenet demo

# Benchmarks (bench/README.md): results go to bench/results/<device>/ (md, csv, png).
.PHONY: bench bench-gpu bench-pytest
bench: setup
	$(PYTHON) -m bench.micro
	$(PYTHON) -m bench.micro --backend reference --no-compile
	$(PYTHON) -m bench.e2e
	$(PYTHON) -m bench.serve

# the CPU microbenchmarks under pytest-benchmark (add --benchmark-autosave to keep a run)
bench-pytest: setup
	$(PYTHON) -m pytest -q bench/test_pytest_micro.py --benchmark-only $(PYTEST_ARGS)

bench-gpu: setup
	$(PYTHON) -m bench.micro --device cuda
	$(PYTHON) -m bench.micro --device cuda --backend reference --no-compile
	$(PYTHON) -m bench.e2e --device cuda
	$(PYTHON) -m bench.serve --device cuda

clean:
	rm -rf build *.egg-info eenet_kernels/*.so .setup-system-done $(VENV)

# RDI-Nets vs the PGD-trained single-exit baseline, the slowdown attack and the budget guard
# on the digits (python/eenet/robust/reproduce.py, about 15 minutes on 2 CPU cores); the
# tables go to bench/results/cpu/robust.md (and robust.json)
.PHONY: robust
robust: setup
	$(PYTHON) -m eenet.robust.reproduce --out bench/results/cpu

# SST-2 with a multi-exit all-MiniLM-L6-v2 (python/eenet/text, about 20 minutes on 2 CPU
# cores): fine-tune, fit every policy on the dev sentences, evaluate on the test sentences;
# the tables go to bench/results/cpu/sst2.md (with .json and .png). SST2_DIR points at the
# data (train.tsv, dev.tsv, test.tsv).
SST2_DIR ?= ../shared/data/sst2
.PHONY: text-demo
text-demo: setup
	$(PYTHON) -m eenet text --data-dir $(SST2_DIR) --out text_out --report bench/results/cpu/sst2.md
