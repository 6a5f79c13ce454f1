"""What ``mae_fast._C`` is built from and with which flags: the one list of sources and flags.

Two builders read this file and nothing else decides a flag:
  * ``setup.py`` (``pip install --no-build-isolation .`` / ``make venv``): loads it by file path,
    because importing the ``mae_fast`` package would import torch;
  * ``mae_fast.build`` (the first-use JIT build and ``python -m mae_fast.build``): runs it as a
    script in a child process, ``python _build_spec.py OUT_DIR BUILD_TEMP``, which builds the
    same extension with setuptools into ``OUT_DIR`` (ninja when installed, else serial).

So this module imports only the standard library at load time; torch is passed in or imported
inside functions. Decisions (``plan``):
  * ``MAE_FAST_SKIP_EXT=1``: no extension;
  * ROCm torch (``torch.version.hip``): the CPU extension, one message (the .cu files use inline
    PTX and nobody has tested them on AMD GPUs: CUDA tensors run the reference);
  * CPU-only torch (``torch.version.cuda is None``), ``MAE_FAST_SKIP_CUDA_BUILD=1``, no CUDA
    toolkit, an nvcc whose major version differs from torch's CUDA, or an nvcc too old for the
    C++ standard torch's headers need: the CPU extension, one message saying why
    (``FORCE_CUDA=1`` turns each of these into an error instead);
  * otherwise the CUDA extension.
C++ standard: torch >= 2.10 headers need C++20 (older ones build as C++17); nvcc supports
``-std=c++20`` from CUDA 12.0.
"""
import glob
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

EXT_NAME = "mae_fast._C"
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"  # sm_80, sm_90 machine code + PTX newer GPUs JIT-compile
TORCH_CXX20_FROM = (2, 10)  # torch headers need C++20 from this version on
NVCC_CXX20_FROM = (12, 0)  # nvcc accepts -std=c++20 from CUDA 12.0
SOURCE_MARKERS = ("unshuffle.cpp", "masking.cpp")  # what a csrc/ directory must hold


def flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def csrc_sources(csrc_dir: str) -> Tuple[List[str], List[str]]:
    """(C++ sources, CUDA sources) under ``csrc_dir``, sorted; paths as ``csrc_dir`` is given."""
    cpp = sorted(glob.glob(os.path.join(csrc_dir, "*.cpp")))
    cu = sorted(glob.glob(os.path.join(csrc_dir, "cuda", "*.cu")))
    return cpp, cu


def source_files(csrc_dir: str) -> List[str]:
    """Every file the build reads (sources and headers): what the JIT cache key hashes and what
    the sdist and the wheel must carry."""
    cpp, cu = csrc_sources(csrc_dir)
    return sorted(cpp + cu + glob.glob(os.path.join(csrc_dir, "*.h"))
                  + glob.glob(os.path.join(csrc_dir, "cuda", "*.h")))


def is_csrc_dir(path: str) -> bool:
    return all(os.path.isfile(os.path.join(path, m)) for m in SOURCE_MARKERS)


def find_cuda_home() -> Optional[str]:
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


def nvcc_version(cuda_home: str) -> Optional[Tuple[int, int]]:
    """(major, minor) of ``cuda_home``/bin/nvcc, or None when it does not run."""
    try:
        out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"],
                             capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else None


def version_tuple(version: str) -> Tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", version)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def cxx_std(torch_version: str) -> str:
    return "c++20" if version_tuple(torch_version) >= TORCH_CXX20_FROM else "c++17"


def set_max_jobs() -> None:
    """MAX_JOBS (parallel compiles) from the cores and the memory, unless the user set it."""
    if os.environ.get("MAX_JOBS"):
        return
    try:  # nvcc wants ~3 GiB a job
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
        os.environ["MAX_JOBS"] = str(max(1, min(os.cpu_count() or 1, int(mem_gib // 3))))
    except (ValueError, OSError, AttributeError):
        os.environ["MAX_JOBS"] = "1"


@dataclass
class Plan:
    kind: str  # "cuda", "cpu" or "none"
    reason: str  # one sentence: why this kind
    std: str = "c++20"
    cuda_home: Optional[str] = None
    arch_list: Optional[str] = None
    notes: List[str] = field(default_factory=list)

    def describe(self) -> str:
        what = {"cuda": "CPU + CUDA kernels", "cpu": "CPU kernels only", "none": "not built"}[self.kind]
        return f"{what} ({self.reason})"


def plan(torch, default_arch_list: str = DEFAULT_ARCH_LIST) -> Plan:
    """What to build against this ``torch`` in this environment, and why (see module doc)."""
    if flag("MAE_FAST_SKIP_EXT"):
        return Plan("none", "MAE_FAST_SKIP_EXT=1")
    std = cxx_std(torch.__version__)
    force = flag("FORCE_CUDA")

    def cpu(reason):
        if force:
            raise RuntimeError(f"mae_fast: FORCE_CUDA=1 but {reason}")
        return Plan("cpu", reason, std)

    if getattr(torch.version, "hip", None):
        # not FORCE_CUDA-able: the .cu files use inline PTX
        return Plan("cpu", f"ROCm torch (HIP {torch.version.hip}): the CUDA kernels use inline PTX and are "
                           "untested on AMD GPUs, so only the CPU kernels are built", std)
    if flag("MAE_FAST_SKIP_CUDA_BUILD"):
        return Plan("cpu", "MAE_FAST_SKIP_CUDA_BUILD=1", std)
    if torch.version.cuda is None:
        return cpu(f"torch {torch.__version__} is a CPU-only build")
    cuda_home = find_cuda_home()
    if cuda_home is None:
        return cpu("no CUDA toolkit found (set CUDA_HOME to build the CUDA kernels)")
    nvcc = nvcc_version(cuda_home)
    if nvcc is None:
        return cpu(f"{cuda_home}/bin/nvcc does not run")
    torch_cuda = version_tuple(torch.version.cuda)
    if nvcc[0] != torch_cuda[0]:
        return cpu(f"nvcc {nvcc[0]}.{nvcc[1]} ({cuda_home}) and torch's CUDA {torch.version.cuda} differ in "
                   "major version (torch refuses to mix them): point CUDA_HOME at a CUDA "
                   f"{torch_cuda[0]}.x toolkit")
    if std == "c++20" and nvcc < NVCC_CXX20_FROM:
        return cpu(f"nvcc {nvcc[0]}.{nvcc[1]} has no -std=c++20, which torch {torch.__version__}'s headers "
                   "need: use a CUDA 12+ toolkit")
    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST") or default_arch_list
    return Plan("cuda", f"nvcc {nvcc[0]}.{nvcc[1]} at {cuda_home}, archs {arch_list}", std, cuda_home, arch_list)


def _nvidia_wheel_includes() -> List[str]:
    """cuBLAS/cuSPARSE headers that ATen/cuda/CUDAContext.h includes ship with the nvidia-*
    wheels torch depends on, not always with the toolkit."""
    import site
    dirs = []
    for sp in site.getsitepackages() + [site.getusersitepackages()]:
        dirs += sorted(glob.glob(os.path.join(sp, "nvidia", "*", "include")))
    return dirs


def extension(p: Plan, csrc_dir: str):
    """The setuptools Extension for plan ``p`` (kind "cpu" or "cuda"), sources under ``csrc_dir``.
    Sets CUDA_HOME / TORCH_CUDA_ARCH_LIST / MAX_JOBS in os.environ for torch's BuildExtension."""
    if p.kind == "cuda":  # torch.utils.cpp_extension reads CUDA_HOME when first imported
        os.environ.setdefault("CUDA_HOME", p.cuda_home)
        os.environ["TORCH_CUDA_ARCH_LIST"] = p.arch_list
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    cpp, cu = csrc_sources(csrc_dir)
    include_dirs = [os.path.abspath(csrc_dir)]
    cxx = ["-O3", f"-std={p.std}"]
    set_max_jobs()
    if p.kind == "cuda":
        nvcc = ["-O3", f"-std={p.std}", "--expt-relaxed-constexpr",
                "-lineinfo"]  # source lines for profilers and compute-sanitizer; no speed cost
        return CUDAExtension(EXT_NAME, cpp + cu, include_dirs=include_dirs + _nvidia_wheel_includes(),
                             define_macros=[("MAE_FAST_WITH_CUDA", "1")],
                             extra_compile_args={"cxx": cxx, "nvcc": nvcc}, py_limited_api=False)
    return CppExtension(EXT_NAME, cpp, include_dirs=include_dirs, extra_compile_args={"cxx": cxx})


def build_ext_cmdclass():
    from torch.utils.cpp_extension import BuildExtension
    return {"build_ext": BuildExtension.with_options(no_python_abi_suffix=False)}


def build_into(out_dir: str, build_temp: str, csrc_dir: str, p: Plan) -> str:
    """Build plan ``p`` with setuptools (the same Extension and command setup.py uses) into
    ``out_dir``; returns the path of the built ``_C`` shared library."""
    from setuptools import Distribution

    dist = Distribution({"name": "mae_fast_jit", "ext_modules": [extension(p, csrc_dir)],
                         "cmdclass": build_ext_cmdclass()})
    cmd = dist.get_command_obj("build_ext")
    cmd.build_lib, cmd.build_temp, cmd.inplace = out_dir, build_temp, False
    cmd.ensure_finalized()
    cmd.run()
    (path,) = cmd.get_outputs()
    return path


def _main(argv) -> int:
    """Child process of mae_fast.build: ``python _build_spec.py OUT_DIR BUILD_TEMP CSRC_DIR
    KIND STD [ARCH_LIST]``; prints the built library's path on its last line."""
    out_dir, build_temp, csrc_dir, kind, std = argv[:5]
    arch_list = argv[5] if len(argv) > 5 else None
    cuda_home = (os.environ.get("CUDA_HOME") or find_cuda_home()) if kind == "cuda" else None
    p = Plan(kind, "given by mae_fast.build", std, cuda_home, arch_list)
    print(build_into(out_dir, build_temp, csrc_dir, p))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
