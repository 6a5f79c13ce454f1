"""The install story (docs/INSTALL.md): what setup.py and the first-use build decide, what the
sdist and the wheel carry, and the first-use (JIT) build of ``mae_fast._C`` itself on CPU.

The whole-install checks run in CI's second lane (`make test-compat`): a plain `pip install` of
the sdist into a venv with torch, `import mae_fast`, a forward, `python -m mae_fast.info`, then
this suite against that install.
"""
import os
import subprocess
import sys
import sysconfig
import tarfile
import textwrap
import zipfile
from types import SimpleNamespace

import pytest
import torch

from mae_fast import _build_spec, _ext
from mae_fast import _jit as mae_build

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IN_CHECKOUT = os.path.isfile(os.path.join(ROOT, "setup.py")) and _build_spec.is_csrc_dir(os.path.join(ROOT, "csrc"))
needs_checkout = pytest.mark.skipif(not IN_CHECKOUT, reason="needs the source checkout (setup.py, csrc/)")


def fake_torch(version="2.14.1", cuda="13.0", hip=None):
    return SimpleNamespace(__version__=version, version=SimpleNamespace(cuda=cuda, hip=hip, git_version="x"))


@pytest.fixture
def toolkit(monkeypatch):
    """A CUDA toolkit of a chosen nvcc version, and none of the build switches set."""
    for name in ("MAE_FAST_SKIP_EXT", "MAE_FAST_SKIP_CUDA_BUILD", "FORCE_CUDA", "TORCH_CUDA_ARCH_LIST"):
        monkeypatch.delenv(name, raising=False)
    state = {"nvcc": (13, 0)}
    monkeypatch.setattr(_build_spec, "find_cuda_home", lambda: "/opt/cuda")
    monkeypatch.setattr(_build_spec, "nvcc_version", lambda home: state["nvcc"])
    return state


# ---- what gets built, and why (one plan for setup.py and the first-use build) -------------------
def test_plan_builds_cuda_with_matching_toolkit(toolkit):
    p = _build_spec.plan(fake_torch())
    assert (p.kind, p.std, p.arch_list, p.cuda_home) == ("cuda", "c++20", "8.0;9.0+PTX", "/opt/cuda")


def test_plan_cpu_only_torch_with_toolkit_builds_cpu_extension(toolkit):
    p = _build_spec.plan(fake_torch(cuda=None))
    assert p.kind == "cpu" and "CPU-only" in p.reason


def test_plan_rocm_builds_cpu_extension_with_reason(toolkit):
    p = _build_spec.plan(fake_torch(cuda=None, hip="6.2.1"))
    assert p.kind == "cpu" and "ROCm" in p.reason and "inline PTX" in p.reason


@pytest.mark.parametrize("torch_version,nvcc,kind,std", [
    ("2.11.0", (11, 8), "cpu", "c++20"),   # torch >= 2.10 needs C++20, nvcc 11 has none
    ("2.9.1", (11, 8), "cuda", "c++17"),   # older torch headers build as C++17, nvcc 11 is fine
    ("2.11.0", (12, 0), "cuda", "c++20"),
])
def test_plan_cxx_standard_suits_torch_and_nvcc(toolkit, torch_version, nvcc, kind, std):
    toolkit["nvcc"] = nvcc
    p = _build_spec.plan(fake_torch(version=torch_version, cuda=f"{nvcc[0]}.{nvcc[1]}"))
    assert (p.kind, p.std) == (kind, std), p.reason


def test_plan_toolkit_of_another_cuda_major_builds_cpu_extension(toolkit):
    toolkit["nvcc"] = (12, 8)
    p = _build_spec.plan(fake_torch(cuda="13.0"))
    assert p.kind == "cpu" and "major version" in p.reason


def test_plan_force_cuda_that_cannot_be_honoured_is_an_error(toolkit, monkeypatch):
    monkeypatch.setenv("FORCE_CUDA", "1")
    with pytest.raises(RuntimeError, match="FORCE_CUDA=1 but torch .* is a CPU-only build"):
        _build_spec.plan(fake_torch(cuda=None))


def test_plan_switches(toolkit, monkeypatch):
    monkeypatch.setenv("MAE_FAST_SKIP_CUDA_BUILD", "1")
    assert _build_spec.plan(fake_torch()).kind == "cpu"
    monkeypatch.setenv("MAE_FAST_SKIP_EXT", "1")
    assert _build_spec.plan(fake_torch()).kind == "none"


@needs_checkout
def test_extension_flags():
    csrc = os.path.join(ROOT, "csrc")
    cpu = _build_spec.extension(_build_spec.Plan("cpu", "test", "c++20"), csrc)
    assert "-std=c++20" in cpu.extra_compile_args["cxx"]
    assert not any(s.endswith(".cu") for s in cpu.sources)
    assert not any("cuda" in lib for lib in cpu.libraries), cpu.libraries  # no c10_cuda link
    from torch.utils import cpp_extension
    if cpp_extension.CUDA_HOME is None:
        pytest.skip("no CUDA toolkit here: CUDAExtension needs one")
    cuda = _build_spec.extension(_build_spec.Plan("cuda", "test", "c++20", cpp_extension.CUDA_HOME,
                                                  os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0")), csrc)
    assert "-lineinfo" in cuda.extra_compile_args["nvcc"] and "-std=c++20" in cuda.extra_compile_args["nvcc"]
    assert {os.path.basename(s) for s in cuda.sources} >= {"masking_kernels.cu", "unshuffle_kernels.cu"}


def test_cache_key_names_torch_cuda_python_and_changes_with_the_sources(tmp_path):
    csrc = mae_build.csrc_dir()
    assert csrc is not None, "the C++ sources are neither in the package nor in the checkout"
    p = _build_spec.Plan("cuda", "test", "c++20", "/opt/cuda", "8.0")
    key = mae_build.cache_key(fake_torch(), p, csrc)
    assert key.startswith("torch2.14.1-cu13.0-py%d%d-" % sys.version_info[:2])
    assert mae_build.cache_key(fake_torch(version="2.11.0"), p, csrc) != key
    assert mae_build.cache_key(fake_torch(), _build_spec.Plan("cpu", "test", "c++20"), csrc) != key
    changed = tmp_path / "csrc"
    import shutil
    shutil.copytree(csrc, changed)
    assert mae_build.cache_key(fake_torch(), p, str(changed)) == key  # same content, same key
    (changed / "hd.h").write_text((changed / "hd.h").read_text() + "\n// changed\n")
    assert mae_build.cache_key(fake_torch(), p, str(changed)) != key


# ---- what ships ---------------------------------------------------------------------------------
@needs_checkout
def test_sdist_and_wheel_carry_every_build_file(tmp_path):
    env = dict(os.environ, MAE_FAST_SKIP_EXT="1")
    subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path)], cwd=ROOT, env=env,
                   check=True, capture_output=True)
    (sdist,) = tmp_path.glob("mae_fast-*.tar.gz")
    needed = [os.path.relpath(f, ROOT) for f in _build_spec.source_files(os.path.join(ROOT, "csrc"))]
    needed += ["setup.py", "mae_fast/_build_spec.py", "mae_fast/build.py", "kernels/patch_gather.py"]
    with tarfile.open(sdist) as tar:
        top = tar.getnames()[0].split("/")[0]
        names = {n[len(top) + 1:] for n in tar.getnames()}
        tar.extractall(tmp_path / "unpacked", filter="data")
    assert not [f for f in needed if f not in names], sorted(names)
    # the wheel built from the sdist (no torch needed: pure Python) carries the sources as package data
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path / "wheel"), str(tmp_path / "unpacked" / top)], env=env, check=True,
                   capture_output=True)
    (wheel,) = (tmp_path / "wheel").glob("mae_fast-*.whl")
    with zipfile.ZipFile(wheel) as whl:
        in_wheel = set(whl.namelist())
    csrc_files = ["mae_fast/" + os.path.relpath(f, ROOT) for f in _build_spec.source_files(os.path.join(ROOT, "csrc"))]
    assert not [f for f in csrc_files + ["mae_fast/kernels/patch_gather.py"] if f not in in_wheel]
    # and every module of the package (a subpackage left out of setup.py fails only once installed)
    modules = [os.path.relpath(os.path.join(d, f), ROOT) for d, _, files in os.walk(os.path.join(ROOT, "mae_fast"))
               if "__pycache__" not in d for f in files if f.endswith(".py")]
    assert "mae_fast/train/step.py" in modules
    assert not [f for f in modules if f not in in_wheel], sorted(in_wheel)
    assert not [f for f in in_wheel if f.endswith(".so")]


# ---- the first-use build, for real (CPU kernels) ----------------------------------------------
def _installed_layout(dest):
    """mae_fast as a wheel lays it out (no prebuilt _C): mae_fast/, mae_fast/kernels, mae_fast/csrc."""
    import shutil
    import mae_fast
    src = os.path.dirname(os.path.abspath(mae_fast.__file__))
    ignore = shutil.ignore_patterns("*.so", "__pycache__", "csrc", "kernels")
    shutil.copytree(src, dest / "mae_fast", ignore=ignore)
    import mae_fast.kernels
    shutil.copytree(os.path.dirname(os.path.abspath(mae_fast.kernels.__file__)), dest / "mae_fast" / "kernels",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(mae_build.csrc_dir(), dest / "mae_fast" / "csrc", ignore=shutil.ignore_patterns("__pycache__"))
    return dest


CHILD = textwrap.dedent("""
    import warnings, torch
    warnings.simplefilter("always")
    with warnings.catch_warnings(record=True) as caught:
        import mae_fast
        from mae_fast import _ext, reference, ops
    print("SOURCE", _ext.SOURCE, _ext.PATH)
    print("WARNINGS", len([w for w in caught if "mae_fast._C is missing" in str(w.message)]))
    print("HOW", _ext.how_obtained())
    assert _ext.PATH is None or _ext.PATH.startswith({cache!r}), _ext.PATH
    noise = torch.rand(3, 11, generator=torch.Generator().manual_seed(0))
    got = ops.masking_indices(noise, 4)  # backend="auto": the C++ op when _C loaded
    want = reference.masking_indices(noise, 4)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    x = torch.randn(3, 5, 6, requires_grad=True)
    tok = torch.randn(1, 1, 6, requires_grad=True)
    out = ops.unshuffle(x, tok, want[1])
    ref = reference.unshuffle(x, tok, want[1])
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(torch.autograd.grad(out.sum(), x), torch.autograd.grad(ref.sum(), x))
    print("CHOICE", mae_fast.choose("unshuffle", "cpu").impl)
""")


def _child_env(layout, cache, **env):
    """``python -S`` with this env sees the copied layout, then torch & co., but no .pth file: an
    editable install's finder would otherwise hand out the checkout's prebuilt mae_fast._C."""
    site_dirs = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    return dict({k: v for k, v in os.environ.items() if k != "MAE_FAST_JIT"},
                PYTHONPATH=os.pathsep.join([str(layout), *site_dirs]), MAE_FAST_CACHE_DIR=str(cache),
                MAE_FAST_SKIP_CUDA_BUILD="1", **env)


def _run_children(layout, cache, n=1, **env):
    env = _child_env(layout, cache, **env)
    code = CHILD.format(cache=str(cache))
    procs = [subprocess.Popen([sys.executable, "-S", "-c", code], cwd=str(layout), env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(n)]
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, f"child failed:\n{out}\n{err}"
    return outs


def _field(out, name):
    return next(line.split(" ", 1)[1] for line in out.splitlines() if line.startswith(name + " "))


def test_first_use_build_failure_degrades_to_reference_with_one_warning(tmp_path):
    layout = _installed_layout(tmp_path / "site")
    cache = tmp_path / "cache"
    # a compiler that fails at once: the build fails, import mae_fast does not
    ((out, err),) = _run_children(layout, cache, CXX="false", CC="false", MAX_JOBS="1")
    assert _field(out, "SOURCE").startswith("None") and _field(out, "WARNINGS") == "1", (out, err)
    assert _field(out, "CHOICE") == "reference"
    assert "mae_fast: building mae_fast._C" in err
    assert list(cache.glob("*.failed")), "a failed build is remembered"
    # the next import does not retry (other ranks, later runs): no build line, one warning
    ((out, err),) = _run_children(layout, cache, CXX="false", CC="false")
    assert "building mae_fast._C" not in err and _field(out, "WARNINGS") == "1", (out, err)
    # MAE_FAST_JIT=0: no build at all, one warning, the reference runs
    ((out, err),) = _run_children(layout, tmp_path / "empty-cache", MAE_FAST_JIT="0")
    assert "building" not in err and _field(out, "WARNINGS") == "1" and _field(out, "CHOICE") == "reference"
    assert _field(out, "HOW").startswith("missing (no prebuilt mae_fast._C; first-use build disabled"), out
    assert "python -m mae_fast.build" in _field(out, "HOW")
    assert not (tmp_path / "empty-cache").exists()
    # the explicit command retries a remembered failure, shows the compiler's output, exits 1
    build = subprocess.run([sys.executable, "-S", "-m", "mae_fast.build"], cwd=str(layout), capture_output=True,
                           text=True, env=_child_env(layout, cache, CXX="false", CC="false", MAE_FAST_JIT="0"))
    assert build.returncode == 1, (build.stdout, build.stderr)
    assert "mae_fast: building mae_fast._C failed (exit status" in build.stderr.splitlines()[-1], build.stderr
    assert "building mae_fast._C for torch" in build.stderr  # it did try again


@pytest.mark.skipif(os.environ.get("MAE_FAST_TEST_JIT_BUILD", "0") != "1",
                    reason="a real compile (1-5 min on 2 cores): runs in `make test-compat` (CI), "
                           "or with MAE_FAST_TEST_JIT_BUILD=1")
def test_first_use_build_two_ranks_build_once_and_load_it(tmp_path):
    """Two processes import mae_fast at once with an empty cache (DDP ranks on one node): one
    builds the CPU extension, the other waits on the lock and loads the same library; the ops
    match the reference; a third import loads it from the cache without building."""
    layout = _installed_layout(tmp_path / "site")
    cache = tmp_path / "cache"
    outs = _run_children(layout, cache, n=2)
    errs = "".join(err for _, err in outs)
    assert errs.count("mae_fast: building mae_fast._C") == 1, errs
    paths = {_field(out, "SOURCE") for out, _ in outs}
    assert len(paths) == 1 and next(iter(paths)).startswith("jit " + str(cache)), paths
    assert all(_field(out, "WARNINGS") == "0" and _field(out, "CHOICE") == "c++" for out, _ in outs)
    ((out, err),) = _run_children(layout, cache)
    assert "building" not in err and _field(out, "SOURCE") in paths
    info = subprocess.run([sys.executable, "-S", "-m", "mae_fast.info"], cwd=str(layout), capture_output=True,
                          text=True, env=_child_env(layout, cache), check=True).stdout
    assert f"mae_fast._C: built on first use / by `python -m mae_fast.build`, cached at {cache}" in info, info


def test_info_says_how_c_was_obtained():
    out = subprocess.run([sys.executable, "-m", "mae_fast.info"], capture_output=True, text=True, check=True).stdout
    line = next(line for line in out.splitlines() if line.startswith("mae_fast._C:"))
    want = {"prebuilt": "prebuilt at install time", "jit": "built on first use", None: "missing"}[_ext.SOURCE]
    assert want in line, line
