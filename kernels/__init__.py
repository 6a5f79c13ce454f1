"""Triton kernels of mae_fast, shipped as ``mae_fast.kernels``. Importing this package never
requires triton; each kernel module imports it and is only loaded where Triton can run.

  patch_gather      encoder input: gather of kept patches from the image (and its backward
                    scatter), positional rows + cls epilogue
  masked_loss       the masked reconstruction loss, target built from the pixels in registers
  patch_embed_gemm  stretch: image -> encoder tokens in one GEMM (MAE_FAST_PATCH_EMBED=gemm)
  mlp_gemm          opt-in: the MLP's GEMMs with GELU / GELU' / bias-grad epilogues (MAE_FAST_MLP=gemm)

The torch ops around them live in ``mae_fast.ops``; ``tools/triton_aot.py`` AOT-compiles them.
"""

import contextlib
import functools

import torch


def on_tensor_device(launcher):
    """Run a launcher with its first tensor argument's CUDA device current: Triton launches on
    the *current* device, so a model on cuda:1 while cuda:0 is current would otherwise run the
    kernel on the wrong GPU (the C++ ops get the same from a CUDAGuard)."""
    @functools.wraps(launcher)
    def wrapper(*args, **kwargs):
        t = next((a for a in args if isinstance(a, torch.Tensor)), None)
        guard = torch.cuda.device(t.device) if t is not None and t.is_cuda else contextlib.nullcontext()
        with guard:
            return launcher(*args, **kwargs)
    return wrapper
