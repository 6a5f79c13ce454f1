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
