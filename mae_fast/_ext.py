"""Loads the compiled extension ``mae_fast._C``; mae_fast works without it.

In this order: the prebuilt one (``pip install --no-build-isolation .``, ``make venv``); else one
built on first use into the cache (``mae_fast._jit``: a plain ``pip install .`` installs no
``_C``); else none, with ONE warning, and the ``_C`` ops run the reference.
"""
import importlib
import warnings

import torch

from . import _jit

LOAD_ERROR = None  # why _C is missing, when it is
SOURCE = None  # how _C was obtained: "prebuilt", "jit" (built on first use or by mae_fast.build), None
PATH = None  # the loaded library
try:  # import_module: a missing _C raises ModuleNotFoundError naming it (`from . import` would not)
    _C = importlib.import_module("._C", __package__)  # registers torch.ops.mae_fast.*
    LOADED, SOURCE, PATH = True, "prebuilt", _C.__file__
except ImportError as e:
    _why = ("no prebuilt mae_fast._C" if isinstance(e, ModuleNotFoundError) and e.name == "mae_fast._C"
            else f"the prebuilt mae_fast._C does not load ({type(e).__name__}: {e})")  # another torch's
    LOADED, PATH, LOAD_ERROR = _jit.load_or_build(_why)
    SOURCE = "jit" if LOADED else None
    if not LOADED:
        warnings.warn(f"mae_fast._C is missing ({LOAD_ERROR}). mae_fast works: random_masking and unshuffle run "
                      "the reference (slower). `python -m mae_fast.build` builds it and shows why it failed; "
                      "`python -m mae_fast.info` says what runs.", RuntimeWarning, stacklevel=2)


def how_obtained() -> str:
    """One line for ``python -m mae_fast.info``: how _C was obtained, and what to run if it was not."""
    if SOURCE == "prebuilt":
        return f"prebuilt at install time ({PATH})"
    if SOURCE == "jit":
        return f"built on first use / by `python -m mae_fast.build`, cached at {PATH}"
    return (f"missing ({LOAD_ERROR}); the _C ops run the reference. To build it for this torch: "
            "`python -m mae_fast.build` (or reinstall with `pip install --no-build-isolation .`)")


def built_with_cuda() -> bool:
    return LOADED and bool(getattr(torch.ops.mae_fast, "_built_with_cuda", None)) and bool(
        torch.ops.mae_fast._built_with_cuda())


def has_op(op_name: str) -> bool:
    """Whether the loaded ``_C`` registers ``torch.ops.mae_fast.<op_name>`` (a stale build may not)."""
    return LOADED and hasattr(torch.ops.mae_fast, op_name)


def probe(op_name: str, device: torch.device):
    """Where ``torch.ops.mae_fast.<op_name>`` runs: (runs, reason) for ``backends.register_fast``."""
    if not LOADED:
        return False, f"mae_fast._C is not built or does not load ({LOAD_ERROR})"
    if not has_op(op_name):
        return False, f"mae_fast._C has no {op_name} op (stale build: reinstall mae_fast)"
    if device.type == "cpu":
        return True, "mae_fast._C CPU kernel"
    if device.type == "cuda":
        from .backends import cuda_capability_ok
        ok, why = cuda_capability_ok(device)
        if not ok:
            return False, why
        if built_with_cuda():
            return True, "mae_fast._C CUDA kernel"
        return False, "mae_fast._C was built without CUDA (no toolkit at build time, or MAE_FAST_SKIP_CUDA_BUILD=1)"
    if device.type == "meta":
        return True, "mae_fast._C op, shapes only (its fake implementation)"
    return False, f"mae_fast._C has no kernel for {device.type} tensors"
