"""Triton kernels of mae_fast, shipped as ``mae_fast.kernels``. Importing this package never
requires triton; each kernel module imports it and is only loaded where Triton can run."""
