"""Build of mae_fast and its C++/CUDA extension ``mae_fast._C``.

* ``pip install --no-build-isolation .`` builds ``_C`` against the torch already installed
  (build isolation would fetch another torch: installing mae_fast never installs or replaces torch).
* A ``CUDAExtension`` when a CUDA toolkit is found (``CUDA_HOME``, ``/usr/local/cuda``, or nvcc's
  real path) or ``FORCE_CUDA=1`` (no GPU needed to build); a ``CppExtension`` otherwise.
* ``MAE_FAST_SKIP_CUDA_BUILD=1`` builds the CPU-only extension; ``MAE_FAST_SKIP_EXT=1`` none
  (mae_fast then runs its reference paths).
* ``TORCH_CUDA_ARCH_LIST`` picks the GPU architectures (default "8.0;9.0+PTX": sm_80 and sm_90 machine code, plus PTX that newer GPUs JIT-compile); ``MAX_JOBS`` caps
  parallel compiles (default: by cores and memory).
* ``kernels/`` (Triton) ships as ``mae_fast.kernels``: a top-level ``kernels`` would collide on PyPI.
"""
import glob
import os
import shutil
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _find_cuda_home():
    """torch guesses CUDA_HOME from `which nvcc`, which is wrong when nvcc is a wrapper script
    (e.g. /usr/local/bin/nvcc exec'ing the real one). Prefer CUDA_HOME, then /usr/local/cuda,
    then the directory of nvcc's real binary."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda"
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        try:  # a wrapper script that exec's the real nvcc
            with open(real, "rb") as f:
                head = f.read(4096)
            if head.startswith(b"#!"):
                for tok in head.decode(errors="ignore").split():
                    if tok.endswith("/bin/nvcc") and os.path.exists(tok):
                        real = tok
                        break
        except OSError:
            pass
        return os.path.dirname(os.path.dirname(real))
    return None


def _max_jobs():
    if os.environ.get("MAX_JOBS"):
        return
    try:  # nvcc wants ~3 GiB a job
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
        os.environ["MAX_JOBS"] = str(max(1, min(os.cpu_count() or 1, int(mem_gib // 3))))
    except (ValueError, OSError, AttributeError):
        os.environ["MAX_JOBS"] = "1"


def _extensions():
    if _flag("MAE_FAST_SKIP_EXT"):
        print("mae_fast: MAE_FAST_SKIP_EXT=1, not building mae_fast._C", file=sys.stderr)
        return [], {}
    cpp_sources = sorted(glob.glob("csrc/*.cpp"))
    if not cpp_sources:
        return [], {}
    cuda_home = _find_cuda_home()
    if cuda_home:
        os.environ.setdefault("CUDA_HOME", cuda_home)
    # imported after CUDA_HOME is set: torch reads it at import time
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    import torch

    cu_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    want_cuda = not _flag("MAE_FAST_SKIP_CUDA_BUILD") and bool(cu_sources) and (
        _flag("FORCE_CUDA") or CUDA_HOME is not None)
    include_dirs = [os.path.join(HERE, "csrc")]
    cxx = ["-O3", "-std=c++20"]  # torch >= 2.10 headers need C++20
    if want_cuda:
        if CUDA_HOME is None:
            raise RuntimeError("FORCE_CUDA=1 but no CUDA toolkit found: set CUDA_HOME")
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
        # cuBLAS/cuSPARSE headers that ATen/cuda/CUDAContext.h includes ship with the
        # nvidia-* wheels torch depends on, not always with the toolkit
        import site
        for sp in site.getsitepackages() + [site.getusersitepackages()]:
            include_dirs += sorted(glob.glob(os.path.join(sp, "nvidia", "*", "include")))
        _max_jobs()
        print(f"mae_fast: building mae_fast._C with CUDA (CUDA_HOME={CUDA_HOME}, "
              f"archs {os.environ['TORCH_CUDA_ARCH_LIST']}, torch {torch.__version__})", file=sys.stderr)
        ext = CUDAExtension(
            "mae_fast._C", cpp_sources + cu_sources, include_dirs=include_dirs,
            define_macros=[("MAE_FAST_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++20", "--expt-relaxed-constexpr"]},
            py_limited_api=False)
    else:
        print("mae_fast: building mae_fast._C for CPU only", file=sys.stderr)
        ext = CppExtension("mae_fast._C", cpp_sources, include_dirs=include_dirs,
                           extra_compile_args={"cxx": cxx})
    return [ext], {"build_ext": BuildExtension.with_options(no_python_abi_suffix=False)}


ext_modules, cmdclass = _extensions()

setup(
    name="mae_fast",
    version="0.1.0",
    description="GPU-kernel-optimized, drop-in Masked Autoencoder (facebookresearch/mae)",
    long_description=open(os.path.join(HERE, "README.md")).read() if os.path.exists(os.path.join(HERE, "README.md")) else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=["mae_fast", "mae_fast.ops", "mae_fast.kernels"],
    package_dir={"mae_fast.kernels": "kernels"},
    install_requires=["torch>=2.4", "numpy"],
    extras_require={
        "triton": ["triton"],
        "xformers": ["xformers"],
        "demo": ["scikit-image", "scikit-learn", "tqdm", "pillow"],
        "test": ["pytest", "pytest-benchmark", "expecttest", "scikit-image", "scikit-learn", "tqdm", "pillow"],
    },
    entry_points={"console_scripts": ["mae-fast=mae_fast.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
