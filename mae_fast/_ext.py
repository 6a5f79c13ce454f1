"""Loads the compiled extension ``mae_fast._C`` if it was built; mae_fast works without it."""
import torch

LOAD_ERROR = None
try:
    from . import _C  # noqa: F401  (registers torch.ops.mae_fast.*)
    LOADED = True
except ImportError as e:  # not built, or built against another torch
    LOADED, LOAD_ERROR = False, f"{type(e).__name__}: {e}"


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
