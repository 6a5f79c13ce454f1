"""Build of mae_fast and, when torch is importable, its C++/CUDA extension ``mae_fast._C``.

* ``pip install .`` (build isolation: no torch in the build environment) installs mae_fast as
  pure Python, with the C++/CUDA sources inside the package (``mae_fast/csrc``): ``_C`` is then
  built on first use (``import mae_fast``) into a cache, or by ``python -m mae_fast.build``
  (see mae_fast/_jit.py, docs/INSTALL.md). No torch is downloaded for the build.
* ``pip install --no-build-isolation .`` builds ``_C`` now, against the torch already installed
  (what ``make venv`` and CI do). Installing mae_fast never installs or replaces a torch >= the floor.
* What is built, with which flags, and why (CUDA or CPU-only, C++ standard, ROCm, toolkit
  checks): ``mae_fast/_build_spec.py``, the one list both builders read. Switches:
  ``MAE_FAST_SKIP_EXT=1`` (no extension), ``MAE_FAST_SKIP_CUDA_BUILD=1`` (CPU-only extension),
  ``FORCE_CUDA=1`` (CUDA kernels or an error), ``TORCH_CUDA_ARCH_LIST`` (default "8.0;9.0+PTX":
  sm_80 and sm_90 machine code, plus PTX that newer GPUs JIT-compile), ``MAX_JOBS``.
* ``kernels/`` (Triton) ships as ``mae_fast.kernels``: a top-level ``kernels`` would collide on PyPI.
"""
import importlib.util
import os
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
TORCH_FLOOR = "2.11"  # the oldest torch CI runs the suite on (with triton 3.6): `make test-compat`
TRITON_FLOOR = "3.6"


def _load_build_spec():
    # by path: `import mae_fast._build_spec` would run mae_fast/__init__.py, which imports torch
    spec = importlib.util.spec_from_file_location(
        "_mae_fast_build_spec", os.path.join(HERE, "mae_fast", "_build_spec.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _extensions():
    build_spec = _load_build_spec()
    if build_spec.flag("MAE_FAST_SKIP_EXT"):
        print("mae_fast: MAE_FAST_SKIP_EXT=1, not building mae_fast._C", file=sys.stderr)
        return [], {}
    try:
        import torch
    except ImportError:
        print("mae_fast: torch is not importable in this build environment (pip's build isolation): "
              "installing pure Python. mae_fast._C is built on first use (import mae_fast) or by "
              "`python -m mae_fast.build`; `pip install --no-build-isolation .` builds it now.",
              file=sys.stderr)
        return [], {}
    plan = build_spec.plan(torch)
    print(f"mae_fast: building mae_fast._C against torch {torch.__version__}: {plan.describe()}",
          file=sys.stderr)
    if plan.kind == "none":
        return [], {}
    # relative source paths: setuptools wants them so (sdist, build dirs)
    return [build_spec.extension(plan, "csrc")], build_spec.build_ext_cmdclass()


ext_modules, cmdclass = _extensions()

setup(
    name="mae_fast",
    version="0.1.0",
    description="GPU-kernel-optimized, drop-in Masked Autoencoder (facebookresearch/mae)",
    long_description=open(os.path.join(HERE, "README.md")).read() if os.path.exists(os.path.join(HERE, "README.md")) else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    # every package under mae_fast/ (a hand-kept list missed mae_fast.train), plus the two mapped dirs
    packages=sorted(find_packages(include=["mae_fast", "mae_fast.*"])) + ["mae_fast.kernels", "mae_fast.csrc"],
    # the C++/CUDA sources ship inside the package: a first-use (JIT) build compiles them there
    package_dir={"mae_fast.kernels": "kernels", "mae_fast.csrc": "csrc"},
    package_data={"mae_fast.csrc": ["*.h", "*.cpp", "cuda/*.cu", "cuda/*.h"]},
    install_requires=[f"torch>={TORCH_FLOOR}", "numpy"],
    extras_require={
        "triton": [f"triton>={TRITON_FLOOR}"],
        "xformers": ["xformers"],
        # decode + crop with torchvision (the default when it imports; PIL otherwise). torchvision pins an
        # exact torch: install the one matching yours, or pip may replace your torch
        "torchvision": ["torchvision"],
        "demo": ["scikit-image", "scikit-learn", "tqdm", "pillow"],
        "test": ["pytest", "pytest-benchmark", "expecttest", "scikit-image", "scikit-learn", "tqdm", "pillow"],
    },
    entry_points={"console_scripts": ["mae-fast=mae_fast.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
