"""Triton kernels of mae_fast, shipped as ``mae_fast.kernels``. Importing this package never
requires triton; each kernel module imports it and is only loaded where Triton can run.

  patch_gather      encoder input: gather of kept patches from the image (and its backward
                    scatter), positional rows + cls epilogue
  masked_loss       the masked reconstruction loss, target built from the pixels in registers
  patch_embed_gemm  stretch: image -> encoder tokens in one GEMM (MAE_FAST_PATCH_EMBED=gemm)

The torch ops around them live in ``mae_fast.ops``; ``tools/triton_aot.py`` AOT-compiles them.
"""
