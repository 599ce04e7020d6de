# The README's commands. Needs only python3 (3.10+) and make.
#   make demo   train the default (digits) preset, sample, evaluate, print where the results are
#   make test   run the test suite
#   make test-avx2   the suite with oneDNN and MKL limited to AVX2 kernels (on an AVX-512 CPU: the
#                    convolution and GEMM code paths of an AVX2-only machine, whose rounding the
#                    tolerances must allow; README "Development" says why ATen is left alone)
#   make bench  side-by-side speed against diffusers (BENCH_ARGS="--quick --threads 1" etc.)
#   make bench-gpu         one prepared GPU run (benchmarks/gpu.sh); make bench-gpu-wheels first, here
#
# torch: a torch already importable by $(PY) is used as is (the venv sees system packages), so
# GPU users install their CUDA build first. Otherwise the CPU build $(TORCH_SPEC) is installed
# before the package, so the package's plain `torch` requirement never pulls a CUDA build.

PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
DEMO ?= demo
BENCH_ARGS ?=
STAMP := $(VENV)/.installed

.PHONY: demo test test-avx2 bench bench-gpu bench-gpu-wheels install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv --system-site-packages $(VENV)
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test]"
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m ddpm.demo --out $(DEMO)

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-avx2: $(STAMP)
	ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 $(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py $(BENCH_ARGS)

# One GPU run (H100/H200, <= 8 min, no network there): benchmarks/gpu.sh, with diffusers from the
# wheels that bench-gpu-wheels downloads here (benchmarks/wheels/, git-ignored: carry it along).
GPU_PY ?= python3
WHEEL_PYTHONS ?= 3.11 3.12 3.13

bench-gpu:
	PY=$(GPU_PY) benchmarks/gpu.sh $(BENCH_ARGS)

bench-gpu-wheels: $(STAMP)
	@for v in $(WHEEL_PYTHONS); do \
	  $(BIN)/python -m pip download -q --no-deps --only-binary=:all: --implementation cp --python-version $$v \
	    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	    -d benchmarks/wheels -r benchmarks/gpu-requirements.txt || exit 1; \
	done
	@du -sh benchmarks/wheels

clean:
	rm -rf $(VENV) $(DEMO) .pytest_cache
