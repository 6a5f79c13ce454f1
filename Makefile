# Two commands that work on a fresh machine (each creates what it needs in .venv):
#   make demo   - a short MAE pretraining on built-in real images, writes a reconstruction PNG
#   make test   - the test suite
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch guesses CUDA_HOME from `which nvcc`; point it at the real toolkit when there is one
CUDA_HOME ?= $(shell [ -x /usr/local/cuda/bin/nvcc ] && echo /usr/local/cuda)
export CUDA_HOME
TORCH_CUDA_ARCH_LIST ?= 8.0;9.0+PTX
export TORCH_CUDA_ARCH_LIST
PYTEST_ARGS ?=
BENCH_ARGS ?=

.PHONY: venv test demo info bench clean
venv: $(VENV)/.installed

$(VENV)/.installed: setup.py requirements-dev.txt $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*.cu)
	[ -x $(BIN)/python ] || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	$(BIN)/python -m pip install -q -r requirements-dev.txt
	@echo "building mae_fast (log: $(VENV)/build.log)"
	$(BIN)/python -m pip install -v --no-build-isolation --no-deps -e . > $(VENV)/build.log 2>&1 \
	  || (tail -60 $(VENV)/build.log; exit 1)
	@grep -oE "mae_fast: building.*" $(VENV)/build.log | sort -u || true
	$(BIN)/python -c "import mae_fast"
	touch $@

test: venv
	$(BIN)/python -m pytest tests -q $(PYTEST_ARGS)

demo: venv
	$(BIN)/mae-fast pretrain --output-dir runs/demo

info: venv
	$(BIN)/python -m mae_fast.info

bench: venv
	$(BIN)/python -m pytest benchmarks -q $(BENCH_ARGS)

clean:
	rm -rf build $(VENV) mae_fast/_C*.so *.egg-info

# On a GPU machine: build _C for this GPU, run the CUDA test lane, time the fused ops and the
# training steps; writes $(GPU_CHECK_OUT)/report.md + report.json (docs/GPU_CHECK.md). Uses the
# python that already has torch (PY=python3): no venv, nothing downloaded.
GPU_CHECK_OUT ?= gpu-report
GPU_CHECK_ARGS ?=
.PHONY: gpu-check
gpu-check:
	$(PY) tools/gpu_check.py --out $(GPU_CHECK_OUT) $(GPU_CHECK_ARGS)
