# Two commands that work on a fresh machine (each creates what it needs in .venv):
#   make demo   - a short MAE pretraining on built-in real images, writes a reconstruction PNG
#   make test   - the test suite, then every benchmark body once (timing off)
# CI (.ci/run) also runs `make test-compat`: the suite on the oldest supported torch/triton, in
# .venv-compat, with mae_fast installed from its sdist by a plain `pip install` (no torch in the
# build env, so no _C at install) and _C built on first use.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch guesses CUDA_HOME from `which nvcc`; point it at the real toolkit when there is one
CUDA_HOME ?= $(shell [ -x /usr/local/cuda/bin/nvcc ] && echo /usr/local/cuda)
export CUDA_HOME
TORCH_CUDA_ARCH_LIST ?= 8.0;9.0+PTX
export TORCH_CUDA_ARCH_LIST
PYTEST_ARGS ?=
# the compat lane re-runs the suite on the floor pair; the randomized sweeps (marker `slow`) run once, in `make test`
COMPAT_PYTEST_ARGS ?= -m "not slow"
BENCH_ARGS ?=
# `make test` runs each benchmark once at these small sizes (a broken benchmark fails CI)
BENCH_SMOKE_ARGS ?= --benchmark-disable --bench-size=tiny --bench-batch=2 --bench-op-batch=2 --bench-rounds=1
COMPAT_VENV ?= .venv-compat
COMPAT_BIN := $(COMPAT_VENV)/bin
COMPAT_ENV = MAE_FAST_CACHE_DIR=$(abspath $(COMPAT_VENV))/jit-cache MAE_FAST_SKIP_CUDA_BUILD=1
BUILD_INPUTS := setup.py mae_fast/_build_spec.py $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*.cu)

.PHONY: venv test bench-smoke test-compat sdist demo info bench clean
venv: $(VENV)/.installed

$(VENV)/.installed: requirements-dev.txt $(BUILD_INPUTS)
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
	$(MAKE) --no-print-directory bench-smoke

# the benchmarks as plain tests, once each; their own conftest (not tests/'s: no interpreter)
bench-smoke: venv
	$(BIN)/python -m pytest benchmarks -q -p no:cacheprovider $(BENCH_SMOKE_ARGS)

sdist: venv
	rm -rf dist && $(BIN)/python setup.py -q sdist -d dist && ls dist

# The suite on the floor pair (requirements-compat.txt), against mae_fast installed from the sdist
# with a plain `pip install` (build isolation: pure Python), its _C built on first use into
# $(COMPAT_VENV)/jit-cache (CPU kernels: the CUDA build is the main venv's). pytest runs as a
# script from tests/, so it imports the installed mae_fast, not this checkout. Here the suite
# also runs its real first-use-build test (two "ranks", one build; MAE_FAST_TEST_JIT_BUILD=1).
test-compat: sdist
	[ -x $(COMPAT_BIN)/python ] || $(PY) -m venv $(COMPAT_VENV)
	[ -f $(COMPAT_VENV)/.deps ] && cmp -s requirements-compat.txt $(COMPAT_VENV)/.deps || ( \
	  $(COMPAT_BIN)/python -m pip install -q --upgrade pip setuptools wheel && \
	  $(COMPAT_BIN)/python -m pip install -q -r requirements-compat.txt && \
	  cp requirements-compat.txt $(COMPAT_VENV)/.deps )
	$(COMPAT_BIN)/python -m pip uninstall -q -y mae_fast 2>/dev/null || true
	$(COMPAT_BIN)/python -m pip install -q dist/mae_fast-*.tar.gz
	rm -rf $(COMPAT_VENV)/jit-cache
	cd tests && $(COMPAT_ENV) ../$(COMPAT_BIN)/python -c "import mae_fast, torch; \
	  m = mae_fast.MaskedAutoencoderViT(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, \
	      decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2); \
	  loss, pred, mask = m(torch.randn(2, 3, 32, 32)); assert torch.isfinite(loss).item(), loss; \
	  from mae_fast import _ext; assert _ext.SOURCE == 'jit', _ext.how_obtained(); print('plain install + first-use build: ok, loss', loss.item())" \
	  && $(COMPAT_ENV) ../$(COMPAT_BIN)/python -m mae_fast.info
	cd tests && $(COMPAT_ENV) MAE_FAST_TEST_JIT_BUILD=1 ../$(COMPAT_BIN)/pytest -q -p no:cacheprovider $(COMPAT_PYTEST_ARGS) $(PYTEST_ARGS) .

demo: venv
	$(BIN)/mae-fast pretrain --output-dir runs/demo

info: venv
	$(BIN)/python -m mae_fast.info

bench: venv
	$(BIN)/python -m pytest benchmarks -q $(BENCH_ARGS)

clean:
	rm -rf build dist $(VENV) $(COMPAT_VENV) mae_fast/_C*.so *.egg-info

# On a GPU machine: build _C for this GPU, run the CUDA test lane, time the fused ops and the
# training steps; writes $(GPU_CHECK_OUT)/report.md + report.json (docs/GPU_CHECK.md). Uses the
# python that already has torch (PY=python3): no venv, nothing downloaded.
GPU_CHECK_OUT ?= gpu-report
GPU_CHECK_ARGS ?=
.PHONY: gpu-check
gpu-check:
	$(PY) tools/gpu_check.py --out $(GPU_CHECK_OUT) $(GPU_CHECK_ARGS)
