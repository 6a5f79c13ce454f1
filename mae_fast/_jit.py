"""Build ``mae_fast._C`` for the torch in this environment: on first use, or by ``python -m mae_fast.build``.

A plain ``pip install .`` installs mae_fast as pure Python with its C++/CUDA sources inside the
package (``mae_fast/csrc``). The first ``import mae_fast`` that finds no prebuilt ``_C`` builds
it here (``mae_fast._ext`` calls ``load_or_build``):

* with the same Extension and flags as ``setup.py`` (``mae_fast/_build_spec.py``), run by
  setuptools in a child process whose output goes to a log file (ninja when installed, else
  serial compiles: no ninja needed);
* into a cache directory keyed by the torch version, its CUDA version, the Python version and a
  hash of the sources, flags, archs and toolkit: ``$MAE_FAST_CACHE_DIR``, else
  ``$XDG_CACHE_HOME/mae_fast``, else ``~/.cache/mae_fast``. Another torch, another entry;
* under a file lock (``fcntl.flock``, released by the OS if a process dies), so the DDP ranks of
  one node build once: the first builds, the others wait and load its result;
* with one line on stderr while it builds, and ONE warning if it fails: mae_fast then runs the
  reference for the ``_C`` ops. A failed build is remembered (``<entry>.failed``) so the other
  ranks and later runs do not retry it; ``python -m mae_fast.build`` retries and shows the log.

``MAE_FAST_JIT=0`` turns the first-use build off (a cached build still loads). A prebuilt
``_C`` (``pip install --no-build-isolation .``, ``make venv``) always wins over the cache.

``python -m mae_fast.build`` (mae_fast/build.py) is the explicit command.
"""
import contextlib
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from typing import Optional, Tuple

from . import _build_spec

ENV_JIT = "MAE_FAST_JIT"
ENV_CACHE = "MAE_FAST_CACHE_DIR"
LOG_TAIL_LINES = 25


class BuildError(RuntimeError):
    pass


def jit_enabled() -> bool:
    return os.environ.get(ENV_JIT, "1").strip().lower() not in ("0", "false", "no", "off")


def cache_root() -> str:
    if os.environ.get(ENV_CACHE):
        return os.environ[ENV_CACHE]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "mae_fast")


def csrc_dir() -> Optional[str]:
    """The C++/CUDA sources: inside the installed package (``mae_fast/csrc``), or ``csrc/`` of a
    source checkout (editable install)."""
    here = os.path.dirname(os.path.abspath(__file__))
    candidates = [os.path.join(here, "csrc")]
    checkout = os.path.dirname(here)
    if os.path.isfile(os.path.join(checkout, "setup.py")):
        candidates.append(os.path.join(checkout, "csrc"))
    return next((c for c in candidates if _build_spec.is_csrc_dir(c)), None)


def cache_key(torch, plan: _build_spec.Plan, csrc: str) -> str:
    """``torch<version>-<cu<version>|cpu>-py<XY>-<hash of sources, flags, archs, toolkit>``."""
    h = hashlib.sha256()
    named = [(os.path.relpath(path, csrc), path) for path in _build_spec.source_files(csrc)]
    for name, path in named + [("_build_spec.py", _build_spec.__file__)]:  # where they lie does not count
        with open(path, "rb") as f:
            h.update(name.encode() + b"\0" + f.read() + b"\0")
    h.update(repr((plan.kind, plan.std, plan.arch_list, plan.reason, torch.__version__,
                   getattr(torch.version, "git_version", None), torch.version.cuda, sys.version,
                   sysconfig.get_platform())).encode())
    device = f"cu{torch.version.cuda}" if plan.kind == "cuda" else "cpu"
    return (f"torch{torch.__version__}-{device}-py{sys.version_info[0]}{sys.version_info[1]}-"
            f"{h.hexdigest()[:16]}")


def library_path(entry: str) -> str:
    return os.path.join(entry, "mae_fast", "_C" + sysconfig.get_config_var("EXT_SUFFIX"))


@contextlib.contextmanager
def _file_lock(path: str):
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock (one process per machine, please)
        yield
        return
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"mae_fast: waiting for another process that is building mae_fast._C (lock {path})",
                  file=sys.stderr, flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _tail(path: str, n: int = LOG_TAIL_LINES) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return ""


def build(torch=None, *, force: bool = False, verbose: bool = False) -> str:
    """Build ``_C`` into the cache unless it is there (``force``: build again, and retry a build
    that failed before); returns the library's path. Raises ``BuildError`` saying why not."""
    if torch is None:
        import torch
    csrc = csrc_dir()
    if csrc is None:
        raise BuildError("the C++/CUDA sources are not installed with mae_fast (mae_fast/csrc is missing): "
                         "reinstall mae_fast")
    try:
        plan = _build_spec.plan(torch)
    except RuntimeError as e:  # FORCE_CUDA=1 that cannot be honoured
        raise BuildError(str(e)) from None
    if plan.kind == "none":
        raise BuildError(plan.reason)
    root = cache_root()
    entry = os.path.join(root, cache_key(torch, plan, csrc))
    library = library_path(entry)
    if os.path.isfile(library) and not force:
        return library
    try:
        os.makedirs(root, exist_ok=True)
    except OSError as e:
        raise BuildError(f"cannot create the build cache {root} ({e}); set {ENV_CACHE}") from None
    failed, log = entry + ".failed", entry + ".log"
    with _file_lock(entry + ".lock"):
        if os.path.isfile(library) and not force:  # another process built it while we waited
            return library
        if os.path.isfile(failed) and not force:
            raise BuildError(f"an earlier build of mae_fast._C failed (log: {log}); "
                             "`python -m mae_fast.build` retries it")
        print(f"mae_fast: building mae_fast._C for torch {torch.__version__}: {plan.describe()}; "
              f"once per torch/CUDA/source version, cached in {entry} (log: {log}). "
              f"{ENV_JIT}=0 skips this (mae_fast then runs the reference for its ops).",
              file=sys.stderr, flush=True)
        work = tempfile.mkdtemp(prefix=os.path.basename(entry) + ".building-", dir=root)
        try:
            args = [sys.executable, _build_spec.__file__, os.path.join(work, "lib"), os.path.join(work, "obj"),
                    csrc, plan.kind, plan.std] + ([plan.arch_list] if plan.arch_list else [])
            env = dict(os.environ, **({"CUDA_HOME": plan.cuda_home} if plan.cuda_home else {}))
            with open(log, "w") as log_file:
                proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
                                        errors="replace")
                for line in proc.stdout:
                    log_file.write(line)
                    if verbose:
                        sys.stderr.write(line)
                rc = proc.wait()
            built = os.path.join(work, "lib")
            if rc != 0 or not os.path.isfile(library_path(built)):
                with open(failed, "w") as f:
                    f.write(f"exit status {rc}; log: {log}\n")
                raise BuildError(f"building mae_fast._C failed (exit status {rc}; log: {log})\n{_tail(log)}")
            if os.path.isdir(entry):
                shutil.rmtree(entry)
            os.rename(built, entry)  # the library appears whole or not at all
            if os.path.exists(failed):
                os.remove(failed)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return library


def load_library(path: str):
    """Import the built ``_C`` at ``path`` as ``mae_fast._C`` (registers torch.ops.mae_fast.*)."""
    spec = importlib.util.spec_from_file_location("mae_fast._C", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules["mae_fast._C"] = module
    return module


def load_or_build(why_no_prebuilt: str) -> Tuple[bool, Optional[str], Optional[str]]:
    """Called once by ``mae_fast._ext`` when no prebuilt ``_C`` loads: (loaded, library path,
    error). Never raises: a failure is returned, and mae_fast runs the reference for its ops."""
    try:
        import torch
        if not jit_enabled():
            # a build someone already made (python -m mae_fast.build) still loads
            csrc = csrc_dir()
            plan = _build_spec.plan(torch) if csrc else None
            library = library_path(os.path.join(cache_root(), cache_key(torch, plan, csrc))) \
                if plan is not None and plan.kind != "none" else None
            if library is None or not os.path.isfile(library):
                return False, None, f"{why_no_prebuilt}; first-use build disabled ({ENV_JIT}=0)"
        else:
            library = build(torch)
        load_library(library)
        return True, library, None
    except Exception as e:  # noqa: BLE001 - never break `import mae_fast` over the optional extension
        first_line = (str(e).splitlines() or [""])[0]  # the log holds the rest
        return False, None, f"{why_no_prebuilt}; first-use build: {type(e).__name__}: {first_line}"
