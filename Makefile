# The README's commands. Needs only python3 (3.10+) and make.
#   make demo   train the default (digits) preset, sample, evaluate, print where the results are
#   make test   run the test suite
#   make bench  side-by-side speed against diffusers (BENCH_ARGS="--quick --threads 1" etc.)
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

.PHONY: demo test bench install clean

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

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(DEMO) .pytest_cache
